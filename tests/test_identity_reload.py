"""Reloading the facility registry (and the CRL) while connections stay open: in process
through the identity service, and in a real `gateway run` process through SIGHUP."""
from __future__ import annotations

import textwrap
import time

import pytest
import pytest_twisted
from process_support import child_environment, free_port, listening_port, start_gateway
from twisted.internet import defer, reactor, task, threads

from adapters.mllp.client import MllpClient
from gateway.config import load_config
from gateway.service import build_service, reload_service

HOST = "127.0.0.1"

REGISTRY = """\
facilities:
  - id: "INPE-100001"
    name: "CHU Ibn Rochd Casablanca"
    type: hospital
    applications: [HIS_CHU]
    facilities: [CHU_IBN_ROCHD]
"""

NEW_LAB = """\
  - id: "INPE-100002"
    name: "Laboratoire Al Amal, Rabat"
    type: laboratory
    facilities: [LAB_ALAMAL_RABAT]
"""

BROKEN = REGISTRY + """\
  - id: "INPE-100002"
    name: "Laboratoire Al Amal, Rabat"
    type: laboratoire
    facilities: [LAB_ALAMAL_RABAT]
    allow_sources: [10.0.0.300/8]
"""


def write_project(root, dev_pki: str, port: int, crl: str | None = None, tls_port: int | None = None) -> str:
    """conf/gateway.yaml (one plain listener refusing unknown senders, and a TLS one on
    `tls_port`; no mappings) and conf/facilities.yaml under `root`; returns the config path."""
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "facilities.yaml").write_text(REGISTRY, encoding="utf-8")
    crl_line = f"\n          crl: {crl}" if crl else ""
    tls_listener = (f"\n            - {{name: mllp-tls, port: {tls_port}, interface: 127.0.0.1, tls: true}}"
                    if tls_port else "")
    (conf / "gateway.yaml").write_text(textwrap.dedent(f"""\
        node:
          name: reload-test
        database:
          url: sqlite:///{root / 'gateway.sqlite'}
        pki:
          ca: {dev_pki}/ca.crt
          cert: {dev_pki}/gateway.crt
          key: {dev_pki}/gateway.key{crl_line}
        listeners:
          mllp:
            - name: mllp-plain
              port: {port}
              interface: 127.0.0.1
              accept_unknown_senders: false{tls_listener}
        facilities: conf/facilities.yaml
        pid_file: var/gateway.pid
        """), encoding="utf-8")
    return str(conf / "gateway.yaml")


def lab_message(control_id: str) -> bytes:
    return (f"MSH|^~\\&|LIS|LAB_ALAMAL_RABAT|GW|MA|20260114083512||ORU^R01^ORU_R01|{control_id}|P|2.5\r"
            "PID|1||4500123^^^FAC^PI||TEST^PATIENT\r").encode("ascii")


def msa(response: bytes | None) -> tuple[str, str | None]:
    """(MSA-1, ERR-5 code or None) of an answer."""
    assert response is not None, "no answer"
    segments = {s[:3]: s.split(b"|") for s in response.split(b"\r") if s}
    err = segments.get(b"ERR")
    return segments[b"MSA"][1].decode(), err[5].split(b"^")[0].decode() if err else None


class Connection:
    """One MLLP connection used from the test across reloads (its calls run in a thread)."""

    def __init__(self, port: int):
        self.client = MllpClient(HOST, port, timeout=10)

    def send(self, payload: bytes):
        return threads.deferToThread(lambda: msa(self.client.send(payload).response))

    def close(self):
        self.client.close()


@pytest.fixture
def gateway_of():
    """`start(config_path)` -> Deferred of the running service tree; stopped after the test."""
    services = []

    def start(path):
        service = build_service(load_config(path, environ={}), reactor)
        service.startService()
        services.append(service)
        return service

    yield start
    for service in services:
        pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


@pytest_twisted.inlineCallbacks
def test_reload_adds_a_facility_on_an_open_connection_and_refuses_a_broken_registry(
        tmp_path, dev_pki, gateway_of, caplog):
    """A laboratory refused as unknown is accepted on the same connection once a reload adds
    it; a broken registry is then refused with every problem logged, and the one in force kept."""
    caplog.set_level("INFO", logger="gateway.identity")
    port = free_port()
    path = write_project(tmp_path, dev_pki, port)
    service = gateway_of(path)
    yield listening_port(service.getServiceNamed("mllp-plain"))
    connection = Connection(port)
    try:
        assert (yield connection.send(lab_message("R-1"))) == ("AR", "SENDER_NOT_ALLOWED")

        (tmp_path / "conf" / "facilities.yaml").write_text(REGISTRY + NEW_LAB, encoding="utf-8")
        assert (yield reload_service(service)) == [True]
        assert (yield connection.send(lab_message("R-2"))) == ("AA", None)
        assert any("added: INPE-100002" in r.getMessage() for r in caplog.records)

        (tmp_path / "conf" / "facilities.yaml").write_text(BROKEN, encoding="utf-8")
        assert (yield reload_service(service)) == [False]
        assert (yield connection.send(lab_message("R-3"))) == ("AA", None)
    finally:
        connection.close()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "facility registry refused (2 problems); keeping the registry in force (2 facilities)" in logged
    assert "facilities.yaml:9: facilities[1].type" in logged and "laboratoire" in logged
    assert "allow_sources[0]" in logged


@pytest_twisted.inlineCallbacks
def test_reload_keeps_the_crl_in_force_when_the_new_file_is_broken(tmp_path, dev_pki, gateway_of, caplog):
    """A CRL file overwritten with garbage is refused on reload (logged), the old one stays, and
    the registry reloads all the same."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert = x509.load_pem_x509_certificate(open(f"{dev_pki}/ca.crt", "rb").read())
    ca_key = serialization.load_pem_private_key(open(f"{dev_pki}/ca.key", "rb").read(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
           .next_update(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    crl_path = tmp_path / "ca.crl"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    path = write_project(tmp_path, dev_pki, free_port(), crl=str(crl_path))
    service = gateway_of(path)
    identity = service.getServiceNamed("identity")
    before = identity.revocations.crl
    assert before is not None and before.serials == frozenset()

    crl_path.write_bytes(b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n")
    (tmp_path / "conf" / "facilities.yaml").write_text(REGISTRY + NEW_LAB, encoding="utf-8")
    caplog.set_level("INFO", logger="gateway.identity")
    assert (yield identity.reload()) is True
    assert identity.revocations.crl is before
    assert identity.registry.current.get("INPE-100002") is not None
    assert any("CRL refused" in r.getMessage() and "ca.crl" in r.getMessage() for r in caplog.records)


def chu_message(control_id: str) -> bytes:
    return (f"MSH|^~\\&|HIS_CHU|CHU_IBN_ROCHD|GW|MA|20260114083512||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
            "PID|1||4500123^^^FAC^PI||TEST^PATIENT\r").encode("ascii")


def write_crl(dev_pki: str, path, revoked: list[str]) -> None:
    """A CRL of the dev CA revoking `revoked`'s certificates, issued now (newer than the last)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_cert = x509.load_pem_x509_certificate(open(f"{dev_pki}/ca.crt", "rb").read())
    ca_key = serialization.load_pem_private_key(open(f"{dev_pki}/ca.key", "rb").read(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
               .next_update(now + datetime.timedelta(days=1)))
    for party in revoked:
        cert = x509.load_pem_x509_certificate(open(f"{dev_pki}/{party}.crt", "rb").read())
        builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder()
                                                  .serial_number(cert.serial_number).revocation_date(now).build())
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


@pytest.mark.parametrize("change", ["revoked", "rebound"])
@pytest_twisted.inlineCallbacks
def test_reload_closes_a_tls_connection_its_certificate_may_no_longer_hold(
        tmp_path, dev_pki, gateway_of, caplog, change):
    """An HIS keeps its MLLP connection for days. A reload that revokes its certificate (CRL),
    or binds its facility to another certificate (a compromised one replaced), closes that
    connection at once (it was kept, and its messages accepted, until the HIS reconnected);
    the other facility's connection stays open."""
    import hashlib

    from adapters.mllp.client import client_tls_context

    crl_path = tmp_path / "ca.crl"
    write_crl(dev_pki, crl_path, [])
    tls_port = free_port()
    path = write_project(tmp_path, dev_pki, free_port(), crl=str(crl_path), tls_port=tls_port)
    (tmp_path / "conf" / "facilities.yaml").write_text(REGISTRY + NEW_LAB, encoding="utf-8")
    service = gateway_of(path)
    yield listening_port(service.getServiceNamed("mllp-tls"))
    caplog.set_level("INFO", logger="gateway.identity")

    def connect(party: str) -> MllpClient:
        return MllpClient(HOST, tls_port, timeout=10, tls=client_tls_context(
            f"{dev_pki}/ca.crt", f"{dev_pki}/{party}.crt", f"{dev_pki}/{party}.key"))

    chu, lab = yield threads.deferToThread(lambda: (connect("INPE-100001"), connect("INPE-100002")))
    try:
        assert (yield threads.deferToThread(lambda: msa(chu.send(chu_message("C-1")).response))) == ("AA", None)
        if change == "revoked":
            yield task.deferLater(reactor, 1.1, lambda: None)  # a newer CRL, to the second
            write_crl(dev_pki, crl_path, ["INPE-100001"])
        else:
            other = hashlib.sha256(b"the facility's new certificate").hexdigest()
            (tmp_path / "conf" / "facilities.yaml").write_text(
                REGISTRY.replace("    type: hospital\n", f"    type: hospital\n    certificate_sha256: \"{other}\"\n", 1)
                + NEW_LAB, encoding="utf-8")
        assert (yield reload_service(service)) == [True]

        def closed() -> bool:
            try:
                return chu.send(chu_message("C-2")).response is None
            except OSError:
                return True

        assert (yield threads.deferToThread(closed))
        assert (yield threads.deferToThread(lambda: msa(lab.send(lab_message("L-1")).response))) == ("AA", None)
    finally:
        chu.close()
        lab.close()
    reason = "its certificate is revoked" if change == "revoked" else "names no facility of the registry now"
    assert any("closing the connection of facility INPE-100001" in r.getMessage() and reason in r.getMessage()
               for r in caplog.records)


@pytest_twisted.inlineCallbacks
def test_reload_closes_a_kept_alive_https_connection_whose_certificate_it_revokes(
        tmp_path, dev_pki, gateway_of, caplog):
    """The HTTPS door refused each further request of a revoked certificate (401), but kept its
    kept-alive connection open, where the README promises it is closed at once, as MLLP's is."""
    import http.client
    import ssl

    crl_path = tmp_path / "ca.crl"
    write_crl(dev_pki, crl_path, [])
    https_port = free_port()
    path = write_project(tmp_path, dev_pki, free_port(), crl=str(crl_path))
    config_file = tmp_path / "conf" / "gateway.yaml"
    config_file.write_text(config_file.read_text(encoding="utf-8").replace(
        "facilities: conf/facilities.yaml\n",
        f"  https:\n    - {{name: https, port: {https_port}, interface: 127.0.0.1}}\n"
        "facilities: conf/facilities.yaml\n"), encoding="utf-8")
    service = gateway_of(path)
    yield listening_port(service.getServiceNamed("https"))
    caplog.set_level("INFO", logger="gateway.identity")
    context = ssl.create_default_context(cafile=f"{dev_pki}/ca.crt")
    context.load_cert_chain(f"{dev_pki}/INPE-100001.crt", f"{dev_pki}/INPE-100001.key")
    connection = http.client.HTTPSConnection(HOST, https_port, context=context, timeout=10)

    def get() -> int:
        connection.request("GET", "/v1/openapi.json")
        answer = connection.getresponse()
        answer.read()
        return answer.status

    try:
        assert (yield threads.deferToThread(get)) == 200
        yield task.deferLater(reactor, 1.1, lambda: None)  # a newer CRL, to the second
        write_crl(dev_pki, crl_path, ["INPE-100001"])
        assert (yield reload_service(service)) == [True]

        def closed() -> bool:
            connection.sock.settimeout(5)
            try:
                return connection.sock.recv(1) == b""  # the gateway closed it: end of stream
            except TimeoutError:
                return False  # still open
            except OSError:  # reset, or TLS cut short
                return True

        assert (yield threads.deferToThread(closed))
    finally:
        connection.close()
    assert any("closing the connection of facility INPE-100001" in r.getMessage()
               and "its certificate is revoked" in r.getMessage() for r in caplog.records)


def test_reload_command_reloads_the_registry_of_a_running_gateway(tmp_path, dev_pki):
    """`gateway run`: `gateway reload` refuses a broken registry without signalling; after a
    good one, a facility added to facilities.yaml is accepted on the connection that was
    refused before, which stays open."""
    import subprocess
    import sys

    def reload_command():
        return subprocess.run([sys.executable, "-m", "gateway", "reload", "-c", path],
                              capture_output=True, text=True, env=child_environment(), timeout=60)

    port = free_port()
    path = write_project(tmp_path, dev_pki, port)
    process = start_gateway(path, tmp_path, port, "gateway.log")
    try:
        with MllpClient(HOST, port, timeout=10) as client:
            assert msa(client.send(lab_message("H-1")).response) == ("AR", "SENDER_NOT_ALLOWED")
            registry = tmp_path / "conf" / "facilities.yaml"
            registry.write_text(REGISTRY + NEW_LAB.replace("type: laboratory", "type: labo"),
                                encoding="utf-8")
            refused = reload_command()
            assert refused.returncode == 2 and "labo" in refused.stderr, refused.stderr
            registry.write_text(REGISTRY + NEW_LAB, encoding="utf-8")
            done = reload_command()
            assert done.returncode == 0 and f"pid {process.pid}" in done.stdout, done.stderr
            deadline = time.monotonic() + 30
            log = tmp_path / "gateway.log"
            while "facility registry reloaded" not in log.read_text("utf-8", "replace"):
                assert time.monotonic() < deadline, log.read_text("utf-8", "replace")[-2000:]
                time.sleep(0.05)
            assert msa(client.send(lab_message("H-2")).response) == ("AA", None)
    finally:
        process.terminate()
        assert process.wait(timeout=20) == 0

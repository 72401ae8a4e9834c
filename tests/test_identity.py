"""Identity and authorization on the MLLP doors, over real sockets against the real gateway
(pipeline, writer, SQLite): client certificates from a test CA made here (one of them revoked
by a CRL), facility types, MSH-4 against the certificate, plain MLLP senders by MSH-3/MSH-4
and source address. The pure rules (gateway.facilities) are in test_identity_rules.py."""
from __future__ import annotations

import dataclasses
import datetime
import ssl
from types import SimpleNamespace

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher

from adapters.mllp.client import MllpClient, MllpClientError, client_tls_context
from gateway.config import PkiConfig, SenderConfig
from gateway.pki import init_dev_pki
from gateway.service import build_service
from gateway.store.database import create_gateway_engine
from gateway.store.queries import get_message, list_messages
from process_support import listening_port

HOST = "127.0.0.1"
CHU, PHARMACY, REVOKED, STRANGER = "INPE-100001", "INPE-100004", "INPE-300001", "INPE-999999"

FACILITIES = [
    SenderConfig(id=CHU, name="CHU", type="hospital", applications=("HIS",), facilities=("CHU_A",)),
    SenderConfig(id=PHARMACY, name="Pharmacie", type="pharmacy", facilities=("PHARM_A",)),
    SenderConfig(id=REVOKED, name="Clinique", type="clinic", facilities=("CLIN_R",)),
    # Plain MLLP only from the 10.9/16 network: loopback is outside.
    SenderConfig(id="INPE-100005", name="Hôpital régional", type="hospital",
                 facilities=("HR_FAR",), allow_sources=("10.9.0.0/16",)),
    SenderConfig(id="INPE-100006", name="Hôpital local", type="hospital",
                 facilities=("HL_NEAR",), allow_sources=("127.0.0.0/8",)),
]


def hl7(facility: str, control_id: str, message_type: str = "ADT^A01^ADT_A01",
        application: str = "HIS") -> bytes:
    """A synthetic v2.5 message (no real patient) from MSH-3/MSH-4 `application`/`facility`."""
    return (f"MSH|^~\\&|{application}|{facility}|GW|MA|20260114083512||{message_type}|{control_id}"
            f"|P|2.5\rPID|1||4500123^^^FAC^PI||TEST^PATIENT\r").encode("ascii")


def ack(response: bytes | None) -> dict:
    """MSA-1, MSA-2 and the ERR's ERR-2, ERR-3 code, ERR-5 code and ERR-7 of an answer."""
    assert response is not None, "no answer"
    segments = {s[:3]: s.split(b"|") for s in response.split(b"\r") if s}
    msa, err = segments[b"MSA"], segments.get(b"ERR")
    out = dict(msa1=msa[1].decode(), msa2=msa[2].decode())
    if err:
        err += [b""] * 8
        out.update(err2=err[2].decode(), err3=err[3].split(b"^")[0].decode(),
                   err5=err[5].split(b"^")[0].decode(), err7=err[7].decode())
    return out


def stored(db_url: str) -> list:
    engine = create_gateway_engine(db_url)
    try:
        with engine.connect() as conn:
            return [get_message(conn, row.id) for row in reversed(list_messages(conn, limit=1000))]
    finally:
        engine.dispose()


def write_crl(directory, name: str, parties: list[str], age: datetime.timedelta,
              valid: datetime.timedelta, encoding=serialization.Encoding.DER) -> str:
    """A CRL of the CA in `directory` revoking the certificates of `parties`, issued `age`
    ago and valid `valid` from then; returns its path."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    issued = datetime.datetime.now(datetime.timezone.utc) - age
    builder = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
               .last_update(issued).next_update(issued + valid))
    for party in parties:
        cert = x509.load_pem_x509_certificate((directory / f"{party}.crt").read_bytes())
        builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(
            cert.serial_number).revocation_date(issued).build())
    path = directory / name
    path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(encoding))
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA with facility certificates (REVOKED's in its CRL, STRANGER's bound to no
    facility) and another CA issuing a certificate with CHU's name."""
    main = tmp_path_factory.mktemp("identity-pki")
    other = tmp_path_factory.mktemp("identity-other-ca")
    init_dev_pki(str(main), [CHU, PHARMACY, REVOKED, STRANGER])
    init_dev_pki(str(other), [CHU])
    write_crl(main, "crl.der", [REVOKED], datetime.timedelta(minutes=5), datetime.timedelta(days=7))
    revoked = x509.load_pem_x509_certificate((main / f"{REVOKED}.crt").read_bytes())
    return SimpleNamespace(main=main, other=other, revoked_serial=revoked.serial_number)


@pytest.fixture
def gateway(make_config, pki, tmp_path):
    """`start(mllp=[...], senders=FACILITIES, crl=True)` -> Deferred of (service, ports,
    db_url): a gateway on free ports with the test CA (and its CRL); stopped after the test."""
    services = []

    @defer.inlineCallbacks
    def start(mllp, senders=FACILITIES, crl="crl.der"):
        db_url = f"sqlite:///{tmp_path / f'identity-{len(services)}.sqlite'}"
        config = make_config(db_url, mllp=mllp, senders=list(senders))
        config = dataclasses.replace(config, pki=PkiConfig(
            ca=str(pki.main / "ca.crt"), cert=str(pki.main / "gateway.crt"),
            key=str(pki.main / "gateway.key"), dev_dir=str(pki.main),
            crl=str(pki.main / crl) if crl else None))
        service = build_service(config, reactor)
        service.startService()
        services.append(service)
        ports = {}
        for listener in config.mllp:
            port = yield listening_port(service.getServiceNamed(listener.name))
            ports[listener.name] = port.getHost().port
        return service, ports, db_url

    yield start
    for service in services:
        pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


@pytest.fixture
def twisted_log():
    """The formatted Twisted log events emitted during the test."""
    events: list[str] = []

    def observe(event):
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def tls_context(pki, party: str, ca_dir=None):
    directory = ca_dir or pki.main
    return client_tls_context(str(pki.main / "ca.crt"), str(directory / f"{party}.crt"),
                              str(directory / f"{party}.key"))


def exchange(port: int, payloads: list[bytes], tls=None) -> list:
    """Send each payload on one connection; the answers (None once the server closed), or the
    exception that ended the connection."""
    answers: list = []
    try:
        with MllpClient(HOST, port, timeout=5, tls=tls) as client:
            for payload in payloads:
                answers.append(client.send(payload).response)
    except (ssl.SSLError, OSError, MllpClientError) as error:
        answers.append(error)
    return answers


def in_thread(function, *args):
    return threads.deferToThread(function, *args)


TLS = [dict(name="mllp-tls", tls=True)]


# -- MLLP over TLS ---------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_pharmacy_certificate_cannot_send_adt(gateway, pki, caplog):
    """A pharmacy's certificate gets AR with ERR naming MSH-9 for an ADT, stored with its
    reason and logged without patient data; its dispensation on the same connection passes."""
    caplog.set_level("INFO", logger="gateway.ingest.inspect")
    _, ports, db_url = yield gateway(TLS)
    refused, accepted = yield in_thread(exchange, ports["mllp-tls"], [
        hl7("PHARM_A", "PH-ADT-1"), hl7("PHARM_A", "PH-RDS-1", "RDS^O13^RDS_O13")],
        tls_context(pki, PHARMACY))
    assert ack(refused) == dict(msa1="AR", msa2="PH-ADT-1", err2="MSH^1^9", err3="207",
                                err5="MESSAGE_TYPE_NOT_ALLOWED", err7=ack(refused)["err7"])
    assert r"ADT\S\A01 is not allowed for facility INPE-100004 (type pharmacy)" in ack(refused)["err7"]
    assert ack(accepted)["msa1"] == "AA"
    first, second = stored(db_url)
    assert (first.summary.status, first.sender_id, first.error_location) == ("rejected", PHARMACY, "MSH^1^9")
    assert "not allowed" in first.summary.error_reason
    assert (second.summary.status, second.sender_id) == ("received", PHARMACY)
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert "ADT^A01" in line and "PH-ADT-1" in line and "PHARM_A" in line and PHARMACY in line
    assert "TEST" not in line and "4500123" not in line  # no patient data


@pytest_twisted.inlineCallbacks
def test_certificate_of_one_facility_with_msh4_of_another_is_refused(gateway, pki):
    """CHU's certificate sending in the pharmacy's name (MSH-4 PHARM_A) gets AR naming MSH-4."""
    _, ports, db_url = yield gateway(TLS)
    [answer] = yield in_thread(exchange, ports["mllp-tls"], [hl7("PHARM_A", "SPOOF-1", "RDS^O13")],
                               tls_context(pki, CHU))
    fields = ack(answer)
    assert (fields["msa1"], fields["err2"], fields["err5"]) == ("AR", "MSH^1^4", "FACILITY_MISMATCH")
    assert "'PHARM_A' is not a name of facility INPE-100001" in fields["err7"]
    [row] = stored(db_url)
    assert row.summary.status == "rejected" and row.sender_id == CHU  # who really sent it


@pytest_twisted.inlineCallbacks
def test_unknown_certificate_from_our_ca_is_closed(gateway, pki, twisted_log):
    """A certificate from the CA that names no facility: the connection closes with no answer,
    nothing is stored, and the reason is logged."""
    _, ports, db_url = yield gateway(TLS)
    outcome = yield in_thread(exchange, ports["mllp-tls"], [hl7("CHU_A", "STRANGER-1")],
                              tls_context(pki, STRANGER))
    assert outcome[0] is None or isinstance(outcome[0], (ssl.SSLError, ConnectionError)), outcome
    assert stored(db_url) == []
    assert any("CN=INPE-999999" in line and "names no facility" in line for line in twisted_log)


@pytest_twisted.inlineCallbacks
def test_certificate_from_another_ca_cannot_connect(gateway, pki, twisted_log):
    """A certificate with a registered facility's name but from another CA never gets an answer."""
    _, ports, db_url = yield gateway(TLS)
    outcome = yield in_thread(exchange, ports["mllp-tls"], [hl7("CHU_A", "OTHER-CA-1")],
                              tls_context(pki, CHU, pki.other))
    assert isinstance(outcome[0], (ssl.SSLError, ConnectionError)) or outcome[0] is None, outcome
    assert stored(db_url) == []
    assert any("issued by a CA other than the configured one" in line for line in twisted_log)


@pytest_twisted.inlineCallbacks
def test_revoked_certificate_cannot_connect(gateway, pki, twisted_log):
    """A certificate in the CRL fails the handshake (logged as revoked); without the CRL the
    same certificate is served, so it is the CRL that refuses it."""
    _, ports, db_url = yield gateway(TLS)
    outcome = yield in_thread(exchange, ports["mllp-tls"], [hl7("CLIN_R", "REVOKED-1")],
                              tls_context(pki, REVOKED))
    assert isinstance(outcome[0], (ssl.SSLError, ConnectionError)) or outcome[0] is None, outcome
    assert stored(db_url) == []
    serial = f"{pki.revoked_serial:x}"
    assert any("revoked" in line and serial in line and "CN=INPE-300001" in line
               for line in twisted_log), twisted_log

    _, ports, _ = yield gateway(TLS, crl=None)
    [answer] = yield in_thread(exchange, ports["mllp-tls"], [hl7("CLIN_R", "REVOKED-2")],
                               tls_context(pki, REVOKED))
    assert ack(answer)["msa1"] == "AA"


def connects(port: int, pki, party: str, control_id: str) -> bool:
    """Whether `party`'s certificate gets an AA (False: refused by the handshake)."""
    [answer] = exchange(port, [hl7({CHU: "CHU_A", REVOKED: "CLIN_R"}[party], control_id)],
                        tls_context(pki, party))
    if isinstance(answer, Exception) or answer is None:
        return False
    assert ack(answer)["msa1"] == "AA"
    return True


@pytest_twisted.inlineCallbacks
def test_expired_crl_still_refuses_what_it_lists(gateway, pki, caplog):
    """A CRL past its nextUpdate is used (with a warning), not a reason to refuse everyone."""
    write_crl(pki.main, "expired.crl", [REVOKED], datetime.timedelta(days=10),
              datetime.timedelta(days=7), serialization.Encoding.PEM)
    caplog.set_level("WARNING", logger="gateway.identity")
    _, ports, _ = yield gateway(TLS, crl="expired.crl")
    assert any("past its nextUpdate" in r.getMessage() for r in caplog.records)
    port = ports["mllp-tls"]
    assert (yield in_thread(connects, port, pki, CHU, "EXP-1")) is True
    assert (yield in_thread(connects, port, pki, REVOKED, "EXP-2")) is False


@pytest_twisted.inlineCallbacks
def test_newer_crl_applies_to_the_next_handshakes(gateway, pki):
    """A newer CRL installed while the listener runs applies at once: it revokes CHU and no
    longer lists REVOKED (the newest CRL of the issuer wins); the same CRL again is a no-op."""
    from gateway.tls import load_crl

    service, ports, _ = yield gateway(TLS)
    revocations = service.getServiceNamed("identity").revocations
    port = ports["mllp-tls"]
    assert (yield in_thread(connects, port, pki, CHU, "NEW-1")) is True
    newer = load_crl(write_crl(pki.main, "newer.crl", [CHU], datetime.timedelta(0),
                               datetime.timedelta(days=7)), str(pki.main / "ca.crt"))
    assert revocations.use(newer) is True
    assert revocations.use(load_crl(newer.path, str(pki.main / "ca.crt"))) is False
    assert (yield in_thread(connects, port, pki, CHU, "NEW-2")) is False
    assert (yield in_thread(connects, port, pki, REVOKED, "NEW-3")) is True


def held_handshake(port: int, pki, party: str):
    """A TLS 1.2 client of `party` that sends its certificate and stops before its Finished:
    (send_rest(frame) -> the answer, None once the server closed); the server has verified
    the certificate, and ends its handshake only when the rest comes."""
    import socket
    import struct

    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate_file(str(pki.main / f"{party}.crt"))
    context.use_privatekey_file(str(pki.main / f"{party}.key"))
    context.load_verify_locations(str(pki.main / "ca.crt"))
    conn = SSL.Connection(context, None)
    conn.set_connect_state()
    sock = socket.create_connection((HOST, port), timeout=5)

    def pending() -> bytes:
        out = b""
        while True:
            try:
                out += conn.bio_read(65536)
            except SSL.WantReadError:
                return out

    def handshake() -> None:
        try:
            conn.do_handshake()
        except SSL.WantReadError:
            pass

    handshake()
    sock.sendall(pending())  # ClientHello
    flight = b""
    while not flight:  # the server's flight read, the client's second one made
        conn.bio_write(sock.recv(65536))
        handshake()
        flight = pending()
    # The first record holds Certificate, ClientKeyExchange and CertificateVerify; then come
    # ChangeCipherSpec and Finished.
    first = 5 + struct.unpack(">H", flight[3:5])[0]
    sock.sendall(flight[:first])

    def send_rest(frame: bytes) -> bytes | None:
        sock.sendall(flight[first:])
        try:
            while True:
                try:
                    conn.send(b"\x0b" + frame + b"\x1c\r")
                    break
                except SSL.WantReadError:
                    data = sock.recv(65536)
                    if not data:
                        return None
                    conn.bio_write(data)
            sock.sendall(pending())
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                try:
                    answer += conn.recv(65536)  # what the last read brought first (a close)
                except SSL.WantReadError:
                    data = sock.recv(65536)
                    if not data:
                        return None
                    conn.bio_write(data)
            return answer[1:-2]
        except (SSL.Error, OSError):
            return None
        finally:
            sock.close()

    return send_rest


@pytest_twisted.inlineCallbacks
def test_certificate_revoked_by_a_reload_during_its_handshake_is_refused(gateway, pki):
    """A client verified just before a reload installs a CRL revoking it, whose handshake ends
    just after (when the reload has closed the revoked connections it knew of), is refused."""
    import time

    from gateway.tls import load_crl

    service, ports, db_url = yield gateway(TLS)
    revocations = service.getServiceNamed("identity").revocations
    send_rest = yield in_thread(held_handshake, ports["mllp-tls"], pki, CHU)
    yield in_thread(time.sleep, 0.3)  # the server reads the certificate and verifies it
    newer = write_crl(pki.main, "race.crl", [REVOKED, CHU], datetime.timedelta(0),
                      datetime.timedelta(days=7))
    assert revocations.use(load_crl(newer, str(pki.main / "ca.crt"))) is True
    answer = yield in_thread(send_rest, hl7("CHU_A", "RACE-1"))
    assert answer is None, ack(answer)
    assert stored(db_url) == []


@pytest_twisted.inlineCallbacks
def test_facility_removed_by_reload_is_refused_on_its_open_connection(gateway, pki):
    """The connection keeps its certificate's facility; once a reload removes that facility,
    its next message is refused (SENDER_NOT_ALLOWED), without dropping the connection."""
    service, ports, db_url = yield gateway(TLS)
    identity = service.getServiceNamed("identity")
    from gateway.facilities import FacilityRegistry

    def run():
        with MllpClient(HOST, ports["mllp-tls"], timeout=5, tls=tls_context(pki, CHU)) as client:
            first = client.send(hl7("CHU_A", "RM-1")).response
            threads.blockingCallFromThread(reactor, setattr, identity.registry, "current",
                                           FacilityRegistry([f for f in FACILITIES if f.id != CHU]))
            return first, client.send(hl7("CHU_A", "RM-2")).response

    first, second = yield in_thread(run)
    assert ack(first)["msa1"] == "AA"
    assert (ack(second)["msa1"], ack(second)["err5"]) == ("AR", "SENDER_NOT_ALLOWED")
    assert "no longer in the facility registry" in ack(second)["err7"]


# -- plain MLLP ------------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_plain_unknown_sender_refused_unless_the_listener_accepts_unknown(gateway):
    """MSH-4 unknown to the registry: AR naming MSH-4 on a production-like listener, AA on a
    development listener (accept_unknown_senders) where no type check applies."""
    _, ports, db_url = yield gateway([dict(name="strict"), dict(name="dev", accept_unknown_senders=True)])
    [refused] = yield in_thread(exchange, ports["strict"], [hl7("NOBODY", "UNK-1")])
    [accepted] = yield in_thread(exchange, ports["dev"], [hl7("NOBODY", "UNK-2", "RDS^O13")])
    fields = ack(refused)
    assert (fields["msa1"], fields["err2"], fields["err3"], fields["err5"]) == (
        "AR", "MSH^1^4", "207", "SENDER_NOT_ALLOWED")
    assert "'NOBODY' (MSH-3/MSH-4) is not in the facility registry" in fields["err7"]
    assert ack(accepted)["msa1"] == "AA"
    assert [(r.summary.control_id, r.summary.status, r.sender_id) for r in stored(db_url)] == [
        ("UNK-1", "rejected", None), ("UNK-2", "received", None)]


@pytest_twisted.inlineCallbacks
def test_plain_known_sender_still_checked_on_a_development_listener(gateway):
    """accept_unknown_senders welcomes strangers only: a known pharmacy still may not send ADT."""
    _, ports, _ = yield gateway([dict(name="dev", accept_unknown_senders=True)])
    [answer] = yield in_thread(exchange, ports["dev"], [hl7("PHARM_A", "PH-DEV-1")])
    assert (ack(answer)["msa1"], ack(answer)["err5"]) == ("AR", "MESSAGE_TYPE_NOT_ALLOWED")


@pytest_twisted.inlineCallbacks
def test_plain_sender_outside_its_allow_sources_is_refused(gateway):
    """A facility allowed only from 10.9/16 is refused from loopback (SOURCE_NOT_ALLOWED); one
    allowed from 127/8 is accepted; the listener itself accepts both connections."""
    _, ports, db_url = yield gateway([dict(name="plain")])
    far, near = yield in_thread(exchange, ports["plain"], [hl7("HR_FAR", "FAR-1"), hl7("HL_NEAR", "NEAR-1")])
    fields = ack(far)
    assert (fields["msa1"], fields["err2"], fields["err5"]) == ("AR", "MSH^1^4", "SOURCE_NOT_ALLOWED")
    assert "INPE-100005 may not send from 127.0.0.1" in fields["err7"]
    assert ack(near)["msa1"] == "AA"
    assert [r.summary.status for r in stored(db_url)] == ["rejected", "received"]


@pytest_twisted.inlineCallbacks
def test_plain_batch_refuses_each_unauthorized_message(gateway):
    """In a batch, each message is authorized on its own: the pharmacy's ADT is refused, its
    RDS accepted, both answered in one batch ACK."""
    _, ports, db_url = yield gateway([dict(name="plain")])
    batch = (b"BHS|^~\\&|HIS|PHARM_A|GW|MA|20260114083512||||B-1\r" + hl7("PHARM_A", "B1-1")
             + hl7("PHARM_A", "B1-2", "RDS^O13") + b"BTS|2\r")
    [answer] = yield in_thread(exchange, ports["plain"], [batch])
    codes = [s.split(b"|")[1] for s in answer.split(b"\r") if s.startswith(b"MSA")]
    assert codes == [b"AR", b"AA"]
    assert [r.summary.status for r in stored(db_url)] == ["rejected", "received"]

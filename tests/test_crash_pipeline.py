"""The whole pipeline under SIGKILL: nothing acknowledged lost, no queued delivery lost,
nothing processed twice (../shared/DESIGN.md §2), from ingest to the peers.

Real processes everywhere: a `gateway run` on PostgreSQL with the repository's mappings, the
shipped registry and routes, and the sandbox peers (`gateway sandbox`: the shared record and
CNSS, over mutual TLS, in a process of their own). While a load runs:

- hospital senders over MLLP: ADT^A01 and ORU^R01, each about a patient of its own; a sender
  that got no positive ACK (killed connection, STORE_UNAVAILABLE) connects again and re-sends
  the same bytes until it gets one, as an HIS does;
- a doctor and a pharmacy through the REST door (their facilities' certificates): prescribe
  (RDE^O11 on POST /v1/hl7v2), look the prescription up (GET /v1/prescriptions/{id}), dispense
  all of it (RDS^O13), each POST with an Idempotency-Key it sends again unchanged after a
  failure; the dispensation becomes a care sheet at CNSS;

the gateway is killed with SIGKILL at random instants (seeded: GATEWAY_CRASH_SEED repeats a
run; the seed is in the failure message) and started again each time. Then it drains, and:

- every message sent is stored exactly once, with the ACK its sender got (those are the
  positive ACKs); none is left `received`, none failed;
- every delivery is delivered, with exactly one delivered attempt; the shared record holds one
  Provenance per message (version 1, naming its control id), one Patient per patient, every
  Observation and MedicationRequest and MedicationDispense once and in version 1;
- CNSS holds exactly one care sheet per dispensation, each prescription line billed once;
- each prescription message issued one id (the one its prescriber got back), each dispensation
  was recorded once;
- the audit trail verifies (`gateway audit verify`), with exactly one receipt per stored
  message, one translation record per message and one successful attempt per delivery.

The record's request counts (/_sandbox/stats) are printed, not checked: a batch cut by the kill
may go again in another batch (another key), which the record applies again; its content is
the same, so nothing is duplicated and no version is added (what is checked above).
Run it with `-s` to see the figures; about 30-40 s.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sqlite3
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import hl7msgs
import pytest

from adapters.mllp.client import MllpClient, describe
from gateway.prescriptions import qr
from prescription_support import AMOXIL, DOLIPRANE, rde, rds
from process_support import child_environment, free_port, start_gateway, stop_processes, wait_for_port
from translation_support import rows

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCTOR_ID, PHARMACY_ID = "INPE-200001", "INPE-100004"
MLLP_SENDERS = 3
KILLS = 4
SEND_PAUSE = 0.02  # between two messages of one sender: a load the drain can follow
DRAIN_TIMEOUT = 40.0
LINES = ((DOLIPRANE, 2), (AMOXIL, 1))


@pytest.fixture(scope="module")
def crash_pki(tmp_path_factory) -> str:
    """A dev PKI with the doctor's and the pharmacy's certificates, and the QR signing key."""
    from gateway.pki import init_dev_pki

    directory = str(tmp_path_factory.mktemp("crash-pki"))
    init_dev_pki(directory, [DOCTOR_ID, PHARMACY_ID])
    qr.ensure_signing_key(os.path.join(directory, "prescription-signing.key"))
    return directory


@dataclass
class Ports:
    mllp: int = field(default_factory=free_port)
    https: int = field(default_factory=free_port)
    record: int = field(default_factory=free_port)
    cnss: int = field(default_factory=free_port)


def write_config(root, pki: str, pg_url: str, ports: Ports) -> str:
    """The gateway's and the sandbox's configuration (one file, as `make run` has)."""
    path = root / "gateway.yaml"
    retry = "{base: 0.2, factor: 2, cap: 1}"
    path.write_text(textwrap.dedent(f"""\
        node: {{name: crash-node}}
        log_level: info
        database: {{url: "{pg_url}", pool_size: 4}}
        pki: {{ca: {pki}/ca.crt, cert: {pki}/gateway.crt, key: {pki}/gateway.key, dev_dir: {pki},
               prescription_key: {pki}/prescription-signing.key}}
        listeners:
          mllp:
            - {{name: mllp-plain, port: {ports.mllp}, interface: 127.0.0.1, accept_unknown_senders: true}}
          https:
            - {{name: https, port: {ports.https}, interface: 127.0.0.1}}
        facilities: {ROOT}/conf/facilities.yaml
        mappings: {{directory: {ROOT}/mappings}}
        destinations:
          - {{name: shared-record, kind: fhir-record, url: "https://127.0.0.1:{ports.record}/fhir",
             connect_timeout: 1, response_timeout: 2, retry: {retry}}}
          - {{name: cnss, kind: cnss, url: "https://127.0.0.1:{ports.cnss}/",
             connect_timeout: 1, response_timeout: 2, retry: {retry}}}
        routes: {ROOT}/conf/routes.yaml
        delivery: {{lease: 4, poll_interval: 0.1}}
        prescriptions: {{validity_days: 90, eligibility: cnss, eligibility_timeout: 3}}
        sandbox:
          record: {{port: {ports.record}, store: {root}/record.sqlite}}
          cnss: {{port: {ports.cnss}, store: {root}/cnss.sqlite}}
        """), encoding="utf-8")
    return str(path)


def start_sandbox(config: str, root, ports: Ports) -> subprocess.Popen:
    log = open(root / "sandbox.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "sandbox", "-c", config], cwd=root,
                               env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_for_port(ports.record, process, log=root / "sandbox.log")
    wait_for_port(ports.cnss, process, log=root / "sandbox.log")
    return process


# -- the load ---------------------------------------------------------------------------------

def hospital_message(kind: str, sender: int, n: int) -> tuple[str, str, bytes]:
    """(control id, patient id, message): the benchmark's ADT^A01 or ORU^R01 about a patient of
    its own (PID-3, the ADT's national number, the visit and order numbers all made unique)."""
    control_id = f"C{sender}{n:07d}"
    patient = f"7{sender}{n:08d}"
    text = hl7msgs.TEMPLATES[kind].replace(hl7msgs.CID, control_id)
    text = text.replace("4500123456", patient).replace("4500987654", patient)
    text = text.replace("2850775123456", f"29{sender}{n:010d}")
    text = text.replace("LAB-25014-0042", f"LAB-{control_id}").replace("CMD-778812", f"CMD-{control_id}")
    return control_id, patient, text.encode("utf-8")


@dataclass
class HospitalSender:
    """One MLLP connection at a time; each message is sent until it is positively acknowledged."""

    number: int
    sent: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)  # id: (kind, patient, raw)
    acks: dict[str, bytes] = field(default_factory=dict)  # id: the positive ACK received
    resends: int = 0
    error: str | None = None

    def run(self, port: int, stop: threading.Event, deadline: float) -> None:
        n = 0
        client = None
        try:
            while not stop.is_set():
                n += 1
                kind = "oru" if n % 3 else "adt"
                control_id, patient, raw = hospital_message(kind, self.number, n)
                self.sent[control_id] = (kind, patient, raw)
                while True:  # until acknowledged, even once `stop` is set: nothing half-sent
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{control_id} not acknowledged in time")
                    try:
                        if client is None:
                            client = MllpClient("127.0.0.1", port, timeout=10)
                        reply = client.send(raw).response
                    except OSError:
                        reply = None
                    code = describe(reply)["msa1"] if reply else None
                    if code in ("AA", "CA"):
                        self.acks[control_id] = reply
                        break
                    self.resends += 1
                    if client is not None:
                        client.close()
                        client = None
                    time.sleep(0.1)
                time.sleep(SEND_PAUSE)
        except BaseException as error:
            self.error = repr(error)
        finally:
            if client is not None:
                client.close()


class Https:
    """A facility's HTTPS client of the REST door (its certificate), one connection per call."""

    def __init__(self, pki: str, facility: str, port: int):
        self.context = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.context.load_cert_chain(os.path.join(pki, f"{facility}.crt"), os.path.join(pki, f"{facility}.key"))
        self.port = port

    def call(self, method: str, path: str, body: bytes | None = None, headers=None):
        """(status, headers, body); None when the gateway is away (no answer)."""
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=15)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()


@dataclass
class Prescribing:
    """The doctor and the pharmacy: prescribe, look up, dispense, again and again."""

    doctor: Https
    pharmacy: Https
    prescriptions: dict[str, str] = field(default_factory=dict)  # RDE control id: the id it got
    dispensed: dict[str, str] = field(default_factory=dict)  # RDS control id: prescription id
    answers: list[tuple[str, int, str]] = field(default_factory=list)  # (what, status, code) seen
    error: str | None = None

    def post(self, client: Https, raw: bytes, deadline: float) -> dict:
        """POST /v1/hl7v2 under one Idempotency-Key until it is answered 200."""
        key = str(uuid.uuid4())
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"no 200 in time for {raw[:80]!r}; answers {self.answers[-5:]}")
            answer = client.call("POST", "/v1/hl7v2", raw, {"Content-Type": "application/hl7-v2",
                                                            "Idempotency-Key": key})
            if answer is not None:
                status, _headers, body = answer
                data = json.loads(body) if body else {}
                self.answers.append((raw.split(b"|", 10)[9].decode(), status, data.get("ack_code") or ""))
                if status == 200:
                    return data
                # 409 (another request with this key, or the message, is still being
                # processed: stored, not processed yet), 503 (store away): send again, same
                # key, later. A request the kill cut is taken over by the restarted gateway.
            time.sleep(0.2)

    def run(self, stop: threading.Event, deadline: float) -> None:
        n = 0
        try:
            while not stop.is_set():
                n += 1
                control_id = f"RDE{n:05d}"
                data = self.post(self.doctor, rde(control_id, lines=LINES), deadline)
                assert data["ack_code"] == "AA", data
                orc = [s for s in data["ack"].split("\r") if s.startswith("ORC|")]
                prescription_id = orc[0].split("|")[3].split("^")[0]
                self.prescriptions[control_id] = prescription_id
                while True:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"look-up of {prescription_id} not answered in time")
                    found = self.pharmacy.call("GET", f"/v1/prescriptions/{prescription_id}")
                    if found is not None and found[0] == 200:
                        break
                    time.sleep(0.2)
                view = json.loads(found[2])
                assert [line["remaining"] for line in view["lines"]] == [q for _, q in LINES], view
                rds_id = f"RDS{n:05d}"
                data = self.post(self.pharmacy, rds(rds_id, prescription_id, lines=LINES), deadline)
                assert data["ack_code"] == "AA", data
                self.dispensed[rds_id] = prescription_id
        except BaseException as error:
            self.error = repr(error)


# -- the test ---------------------------------------------------------------------------------

def test_sigkill_at_random_instants_loses_nothing_and_does_nothing_twice(pg_url, crash_pki, tmp_path):
    seed = int(os.environ.get("GATEWAY_CRASH_SEED") or random.randrange(1 << 30))
    rand = random.Random(seed)
    started = time.monotonic()
    ports = Ports()
    config = write_config(tmp_path, crash_pki, pg_url, ports)
    sandbox = start_sandbox(config, tmp_path, ports)
    gateway = start_gateway(config, tmp_path, ports.mllp, "gateway-0.log")
    wait_for_port(ports.https, gateway, log=tmp_path / "gateway-0.log")
    stop = threading.Event()
    deadline = time.monotonic() + 45
    senders = [HospitalSender(n) for n in range(1, MLLP_SENDERS + 1)]
    prescribing = Prescribing(Https(crash_pki, DOCTOR_ID, ports.https), Https(crash_pki, PHARMACY_ID, ports.https))
    workers = [threading.Thread(target=s.run, args=(ports.mllp, stop, deadline)) for s in senders]
    workers.append(threading.Thread(target=prescribing.run, args=(stop, deadline)))
    kills = []
    try:
        for worker in workers:
            worker.start()
        for k in range(KILLS):
            pause = rand.uniform(0.5, 3.0)
            time.sleep(pause)
            gateway.send_signal(signal.SIGKILL)
            assert gateway.wait(10) == -signal.SIGKILL
            kills.append(round(pause, 2))
            gateway = start_gateway(config, tmp_path, ports.mllp, f"gateway-{k + 1}.log")
        time.sleep(rand.uniform(0.5, 2.0))
        stop.set()
        for worker in workers:
            worker.join(max(1.0, deadline - time.monotonic() + 5))
        about = f"seed {seed} (GATEWAY_CRASH_SEED={seed} repeats it), kills after {kills} s"
        assert not any(w.is_alive() for w in workers), about
        assert [s.error for s in senders] == [None] * len(senders), about
        assert prescribing.error is None, f"{about}: {prescribing.error}"
        drained(pg_url, DRAIN_TIMEOUT, about)
        record_stats = Https(crash_pki, "gateway", ports.record).call("GET", "/_sandbox/stats")
    finally:
        stop_processes(gateway, sandbox)

    hospital = {cid: sent for s in senders for cid, sent in s.sent.items()}
    acks = {cid: ack for s in senders for cid, ack in s.acks.items()}
    assert len(acks) >= 100 and len(prescribing.dispensed) >= 3, (
        f"{about}: too little load: {len(acks)} MLLP messages, {len(prescribing.dispensed)} dispensations")
    check_messages(pg_url, hospital, acks, prescribing, about)
    check_deliveries(pg_url, about)
    check_record(tmp_path / "record.sqlite", hospital, prescribing, about)
    check_cnss(tmp_path / "cnss.sqlite", pg_url, prescribing, about)
    check_prescriptions(pg_url, prescribing, about)
    check_audit(config, tmp_path, pg_url, about)
    [attempts] = rows(pg_url, "SELECT count(*) AS n FROM delivery_attempts")
    print(f"{about}: {len(acks)} MLLP messages ({sum(s.resends for s in senders)} re-sent), "
          f"{len(prescribing.prescriptions)} prescriptions, {len(prescribing.dispensed)} dispensations "
          f"({sum(1 for a in prescribing.answers if a[1] != 200)} POSTs answered otherwise first), "
          f"{attempts.n} delivery attempts, the record's requests {json.loads(record_stats[2])}, "
          f"{time.monotonic() - started:.1f} s")


def drained(pg_url: str, timeout: float, about: str) -> None:
    """Wait until nothing is left to translate or deliver."""
    end = time.monotonic() + timeout
    while True:
        [row] = rows(pg_url, """SELECT
            (SELECT count(*) FROM messages WHERE status = 'received') AS untranslated,
            (SELECT count(*) FROM deliveries WHERE status = 'pending') AS pending""")
        if row.untranslated == 0 and row.pending == 0:
            return
        if time.monotonic() > end:
            raise AssertionError(f"{about}: not drained after {timeout} s: {row.untranslated} messages "
                                 f"received, {row.pending} deliveries pending")
        time.sleep(0.2)


def check_messages(pg_url, hospital, acks, prescribing, about) -> None:
    stored = rows(pg_url, "SELECT m.id, m.control_id, m.status, m.accepted, m.ack, p.raw "
                          "FROM messages m JOIN message_payloads p ON p.message_id = m.id")
    per_id = Counter(r.control_id for r in stored)
    assert [cid for cid, n in per_id.items() if n > 1] == [], f"{about}: stored twice"
    by_id = {r.control_id: r for r in stored}
    expected = set(hospital) | set(prescribing.prescriptions) | set(prescribing.dispensed)
    # Every message sent got its positive answer in the end, so every one is stored, and
    # nothing else is.
    assert set(by_id) == expected, f"{about}: lost {sorted(expected - set(by_id))[:5]}, " \
                                   f"unexpected {sorted(set(by_id) - expected)[:5]}"
    for cid, (_kind, _patient, raw) in hospital.items():
        row = by_id[cid]
        assert row.accepted and bytes(row.raw) == raw, f"{about}: {cid}"
        assert bytes(row.ack) == acks[cid], f"{about}: {cid}: the stored ACK is not the one sent"
    statuses = Counter(r.status for r in stored)
    assert statuses == {"translated": len(stored)}, f"{about}: {statuses}"
    translations = rows(pg_url, "SELECT message_id, count(*) AS n FROM translations GROUP BY message_id")
    assert len(translations) == len(stored) and all(t.n == 1 for t in translations), about


def check_deliveries(pg_url, about) -> None:
    found = rows(pg_url, """
        SELECT d.id, d.message_id, d.destination, d.status,
               (SELECT count(*) FROM delivery_attempts a
                WHERE a.delivery_id = d.id AND a.outcome = 'delivered') AS delivered
        FROM deliveries d""")
    assert found, about
    assert Counter(d.status for d in found) == {"delivered": len(found)}, \
        f"{about}: {Counter(d.status for d in found)}"
    assert [d.id for d in found if d.delivered != 1] == [], f"{about}: not delivered exactly once"
    per_pair = Counter((d.message_id, d.destination) for d in found)
    assert max(per_pair.values()) == 1, about


def record_resources(path) -> list[tuple[str, str, int, dict]]:
    with sqlite3.connect(path) as db:
        return [(kind, rid, version, json.loads(content)) for kind, rid, version, content
                in db.execute("SELECT type, id, version, content FROM resources")]


def check_record(path, hospital, prescribing, about) -> None:
    resources = record_resources(path)
    by_type = Counter(kind for kind, *_ in resources)
    # One version each: a resource written twice with other content would show it.
    assert [(k, i, v) for k, i, v, _ in resources if v != 1] == [], f"{about}: written again"
    provenance = Counter(body["entity"][0]["what"]["identifier"]["value"]
                         for kind, _i, _v, body in resources if kind == "Provenance")
    expected = set(hospital) | set(prescribing.prescriptions) | set(prescribing.dispensed)
    assert set(provenance) == expected and set(provenance.values()) == {1}, \
        f"{about}: Provenance missing for {sorted(expected - set(provenance))[:5]}"
    patients = {p for _kind, p, _raw in hospital.values()}
    assert by_type["Patient"] == len(patients) + 1, f"{about}: {by_type}"  # + the prescriptions' one
    orus = sum(1 for kind, _p, _r in hospital.values() if kind == "oru")
    assert by_type["Observation"] == orus * len(hl7msgs.LAB), f"{about}: {by_type}"
    assert by_type["MedicationRequest"] == len(prescribing.prescriptions) * len(LINES), f"{about}: {by_type}"
    assert by_type["MedicationDispense"] == len(prescribing.dispensed) * len(LINES), f"{about}: {by_type}"


def check_cnss(path, pg_url, prescribing, about) -> None:
    with sqlite3.connect(path) as db:
        sheets = db.execute("SELECT count(*), count(DISTINCT cle) FROM feuilles").fetchone()
        lines = db.execute("SELECT numero, ligne FROM lignes_prescription").fetchall()
    assert sheets == (len(prescribing.dispensed), len(prescribing.dispensed)), f"{about}: {sheets}"
    assert sorted(lines) == sorted((p, n) for p in prescribing.dispensed.values()
                                   for n in range(1, len(LINES) + 1)), f"{about}: {lines}"
    [cnss] = rows(pg_url, "SELECT count(*) AS n FROM deliveries WHERE destination = 'cnss'")
    assert cnss.n == len(prescribing.dispensed), about


def check_prescriptions(pg_url, prescribing, about) -> None:
    issued = rows(pg_url, "SELECT p.id, m.control_id FROM prescriptions p "
                          "JOIN messages m ON m.id = p.source_message_id")
    assert Counter(r.control_id for r in issued) == Counter(set(prescribing.prescriptions)), \
        f"{about}: ids issued per prescription message: {Counter(r.control_id for r in issued)}"
    assert {r.control_id: r.id for r in issued} == prescribing.prescriptions, about
    dispensations = rows(pg_url, "SELECT m.control_id FROM dispensations d JOIN messages m ON m.id = d.message_id")
    assert Counter(r.control_id for r in dispensations) == Counter(
        {cid: len(LINES) for cid in prescribing.dispensed}), about


def check_audit(config, root, pg_url, about) -> None:
    verify = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", "-c", config], cwd=root,
                            env=child_environment(), capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, f"{about}: {verify.stdout}{verify.stderr}"
    # A re-sent copy's receipt is recorded too, marked a duplicate (and without a subject: it
    # stored nothing); the receipts counted here are those that stored a message.
    records = rows(pg_url, "SELECT action, outcome, subject, detail FROM audit_log")
    counts = Counter((r.action, r.outcome, r.subject) for r in records
                     if not json.loads(r.detail).get("duplicate"))
    messages = {f"message/{r.id}" for r in rows(pg_url, "SELECT id FROM messages")}
    deliveries = {f"delivery/{r.id}" for r in rows(pg_url, "SELECT id FROM deliveries")}

    def once(action: str, outcome: str, subjects: set[str]) -> None:
        seen = {s: n for (a, o, s), n in counts.items() if a == action and o == outcome}
        assert set(seen) == subjects, f"{about}: {action} {outcome}: missing " \
                                      f"{sorted(subjects - set(seen))[:5]}, extra {sorted(set(seen) - subjects)[:5]}"
        assert {s: n for s, n in seen.items() if n != 1} == {}, f"{about}: {action} {outcome} more than once"

    once("message.received", "success", messages)
    once("message.translated", "success", messages)
    once("delivery.attempted", "success", deliveries)
    assert not any(a in ("message.translation_failed", "delivery.dead") for a, _o, _s in counts), about

"""Delivery end to end, in one process with real sockets and real TLS: MLLP in, translation,
the outbox, mutual TLS out to the reference peers (shared record, CNSS) running on free ports,
on SQLite and PostgreSQL. Faults injected through the peers' own control path."""
from __future__ import annotations

import dataclasses
import os
from urllib.parse import quote

import pytest_twisted
from twisted.internet import reactor, threads

import hl7msgs
from adapters.mllp.client import MllpClient, describe
from gateway.config import DeliveryConfig, DestinationConfig, RetryConfig, RouteConfig, RouteMatch
from delivery_support import until
from translation_support import rows, with_mappings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_RETRY = RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600)


def send(port: int, *messages: bytes) -> list[bytes]:
    with MllpClient("127.0.0.1", port, timeout=15) as client:
        return [client.send(message).response for message in messages]


def adt(i: int) -> bytes:
    """The benchmark's ADT^A01 (always the same patient), control id B<i>."""
    return hl7msgs.message("adt", i).encode("utf-8")


def oru(i: int) -> bytes:
    return hl7msgs.message("oru", i).encode("utf-8")


def gateway_config(make_config, db_url, peers, **destination):
    config = with_mappings(make_config(db_url), os.path.join(ROOT, "mappings"))
    record = DestinationConfig("shared-record", "fhir-record", peers.url("record"),
                               response_timeout=5, retry=FAST_RETRY, **destination)
    cnss = DestinationConfig("cnss", "cnss", peers.url("cnss") + "/", response_timeout=5,
                             retry=FAST_RETRY)
    return dataclasses.replace(
        config, destinations=(record, cnss),
        routes=(RouteConfig("clinical", ("shared-record",),
                            RouteMatch(resources=("Patient", "Observation"))),
                RouteConfig("billing", ("cnss",), RouteMatch(resources=("ChargeItem",)))),
        delivery=DeliveryConfig(lease=5, poll_interval=0.1))


DELIVERIES = ("SELECT m.control_id, d.destination, d.status, d.attempts, d.last_code, d.last_reason "
              "FROM deliveries d JOIN messages m ON m.id = d.message_id ORDER BY d.id")


def all_delivered(count: int):
    return lambda found: len(found) == count and all(r.status == "delivered" for r in found)


@pytest_twisted.inlineCallbacks
def test_adt_and_oru_reach_the_shared_record(db_url, make_config, running_gateway, peers):
    """After an ADT and an ORU over MLLP, the Patient and the Observations are searchable in
    the shared record; nothing billable went to CNSS."""
    ports = yield running_gateway(gateway_config(make_config, db_url, peers))
    acks = yield threads.deferToThread(send, ports["mllp-test"], adt(1), oru(2))
    assert [describe(a)["msa1"] for a in acks] == ["CA", "CA"]  # enhanced mode (MSH-15 AL)
    found = yield until(DELIVERIES, all_delivered(2), db_url)
    assert [(r.control_id, r.destination, r.attempts, r.last_code) for r in found] == [
        ("B00000000001", "shared-record", 1, 200), ("B00000000002", "shared-record", 1, 200)]
    patients = yield peers.search("/Patient?identifier=" + quote("4500123456"))
    assert patients["total"] == 1
    (patient,) = [e["resource"] for e in patients["entry"]]
    assert patient["birthDate"] == "1985-07-14"
    oru_patient = yield peers.search("/Patient?identifier=" + quote("4500987654"))
    (oru_patient,) = [e["resource"] for e in oru_patient["entry"]]
    observations = yield peers.search(f"/Observation?subject=Patient/{oru_patient['id']}")
    assert observations["total"] == len(hl7msgs.LAB)


@pytest_twisted.inlineCallbacks
def test_peer_down_then_back_delivers_everything_in_patient_order_once(
        db_url, make_config, running_gateway, peers):
    """The record is down: deliveries queue and retry; once it is back, all are delivered, the
    same patient's messages in their order (in the same request as an earlier one, or after it
    was done), none twice."""
    yield peers.faults("record", "down")
    ports = yield running_gateway(gateway_config(make_config, db_url, peers))
    yield threads.deferToThread(send, ports["mllp-test"], adt(1), adt(2), oru(3), adt(4))
    yield until("SELECT attempts FROM deliveries ORDER BY id",
                lambda f: len(f) == 4 and f[0].attempts >= 1, db_url)
    waiting = yield threads.deferToThread(rows, db_url, "SELECT status, attempts FROM deliveries ORDER BY id")
    assert all(r.status == "pending" for r in waiting)
    yield peers.faults("record", "none")
    yield until(DELIVERIES, all_delivered(4), db_url)
    attempts = yield threads.deferToThread(rows, db_url, """
        SELECT m.control_id, d.finished_at, a.attempted_at, a.outcome
        FROM deliveries d JOIN messages m ON m.id = d.message_id
        JOIN delivery_attempts a ON a.delivery_id = d.id
        WHERE m.control_id IN ('B00000000001', 'B00000000002', 'B00000000004') ORDER BY d.id, a.id""")
    by_message: dict[str, list] = {}
    for row in attempts:
        by_message.setdefault(row.control_id, []).append(row)
    assert all([a.outcome for a in tries].count("delivered") == 1 for tries in by_message.values())
    ordered = [by_message[c] for c in ("B00000000001", "B00000000002", "B00000000004")]
    for earlier, later in zip(ordered, ordered[1:]):
        together = {a.attempted_at for a in earlier}
        for attempt in later:  # never sent before the previous one was done, unless with it
            assert attempt.attempted_at in together or attempt.attempted_at >= earlier[0].finished_at
    history = yield peers.search("/Patient?identifier=" + quote("4500123456"))
    assert history["total"] == 1


@pytest_twisted.inlineCallbacks
def test_a_lost_answer_is_retried_with_the_same_key_and_the_peer_keeps_one_copy(
        db_url, make_config, running_gateway, peers):
    """The record stores the transaction but the answer is lost: the gateway retries with the
    same idempotency key and the record answers from its memory; one Patient, one version."""
    yield peers.faults("record", "drop_answer", count=1)
    ports = yield running_gateway(gateway_config(make_config, db_url, peers))
    yield threads.deferToThread(send, ports["mllp-test"], adt(1))
    (delivery,) = yield until(DELIVERIES, all_delivered(1), db_url)
    assert delivery.attempts == 2
    attempts = yield threads.deferToThread(rows, db_url, "SELECT outcome FROM delivery_attempts ORDER BY id")
    assert [a.outcome for a in attempts] == ["transient", "delivered"]
    patients = yield peers.search("/Patient?identifier=" + quote("4500123456"))
    assert patients["total"] == 1
    assert patients["entry"][0]["resource"]["meta"]["versionId"] == "1"


@pytest_twisted.inlineCallbacks
def test_a_permanent_refusal_is_a_dead_letter_with_the_answer_and_replay_revives_it(
        db_url, make_config, running_gateway, peers):
    """A 400 from the record: the deliveries of the refused request (the patient's two
    messages, batched) are dead letters with the peer's answer kept, and a later message goes
    on; reopened (as `messages replay` does), they are delivered."""
    from gateway.store import outbox
    from gateway.store.database import create_gateway_engine

    yield peers.faults("record", "down")  # both wait, then travel in one request
    ports = yield running_gateway(gateway_config(make_config, db_url, peers))
    yield threads.deferToThread(send, ports["mllp-test"], adt(1), adt(2))
    # Once the second has been tried with the first, they are retried together.
    yield until("SELECT attempts FROM deliveries ORDER BY id", lambda f: len(f) == 2 and f[1].attempts, db_url)
    yield peers.faults("record", "http_400", count=1)
    found = yield until(DELIVERIES, lambda f: len(f) == 2 and all(r.status == "dead" for r in f), db_url)
    assert [r.last_code for r in found] == [400, 400]
    attempts = yield threads.deferToThread(
        rows, db_url, "SELECT delivery_id, outcome, code FROM delivery_attempts WHERE outcome = 'permanent'")
    assert len(attempts) == 2 and {a.code for a in attempts} == {400}
    dead = yield threads.deferToThread(
        rows, db_url, "SELECT last_response, message_id FROM deliveries WHERE status = 'dead' ORDER BY id")
    assert all(b"OperationOutcome" in bytes(r.last_response) for r in dead)
    yield threads.deferToThread(send, ports["mllp-test"], adt(3))
    yield until(DELIVERIES, lambda f: len(f) == 3 and f[2].status == "delivered", db_url)

    def reopen():
        from datetime import datetime, timezone

        engine = create_gateway_engine(db_url)
        try:
            with engine.begin() as conn:
                return outbox.reopen_dead(conn, [r.message_id for r in dead], datetime.now(timezone.utc))
        finally:
            engine.dispose()

    assert (yield threads.deferToThread(reopen)) == 2
    yield until(DELIVERIES, all_delivered(3), db_url)


@pytest_twisted.inlineCallbacks
def test_a_server_certificate_from_another_ca_is_refused(db_url, make_config, running_gateway,
                                                         peers, tmp_path):
    """A record peer presenting a certificate the gateway's CA did not sign gets nothing: the
    attempts fail on the certificate and the delivery stays pending."""
    from gateway.pki import init_dev_pki
    from gateway.sandbox.record import RecordPeer, listen_record_peer
    from gateway.tls import server_tls_options

    foreign = tmp_path / "foreign-pki"
    init_dev_pki(str(foreign), [])
    impostor = RecordPeer(str(tmp_path / "impostor.sqlite"), reactor=reactor)
    port = listen_record_peer(reactor, impostor, 0, "127.0.0.1", server_tls_options(
        str(foreign / "sandbox-record.crt"), str(foreign / "sandbox-record.key"), str(foreign / "ca.crt"),
        require_client_cert=False))
    try:
        config = gateway_config(make_config, db_url, peers)
        config = dataclasses.replace(config, destinations=(dataclasses.replace(
            config.destinations[0], url=f"https://127.0.0.1:{port.getHost().port}/fhir"),
            config.destinations[1]))
        ports = yield running_gateway(config)
        yield threads.deferToThread(send, ports["mllp-test"], adt(1))
        (delivery,) = yield until(DELIVERIES, lambda f: len(f) == 1 and f[0].attempts >= 1, db_url)
        assert delivery.status == "pending" and delivery.last_code is None
        assert "certificate" in delivery.last_reason
    finally:
        yield port.stopListening()
        yield impostor.close()


@pytest_twisted.inlineCallbacks
def test_a_billable_act_becomes_a_care_sheet_at_cnss(db_url, make_config, running_gateway, peers):
    """A DFT^P03 from a registered hospital goes to CNSS as an electronic care sheet (and its
    patient to the shared record); CNSS answers with a care-sheet number."""
    from gateway.config import SenderConfig

    with open(os.path.join(ROOT, "mappings", "tests", "orders", "dft-p03-ngap.hl7"), "rb") as f:
        dft = f.read()
    config = gateway_config(make_config, db_url, peers)
    config = dataclasses.replace(config, senders=(SenderConfig(
        "INPE-100001", "CHU Ibn Rochd", "hospital", ("SIH_CHUIR",), ("CHUIR",)),))
    ports = yield running_gateway(config)
    yield threads.deferToThread(send, ports["mllp-test"], dft)
    found = yield until(DELIVERIES, all_delivered(2), db_url)
    by_destination = {r.destination: r for r in found}
    assert set(by_destination) == {"shared-record", "cnss"}
    assert by_destination["cnss"].attempts == 1 and by_destination["cnss"].last_code == 200

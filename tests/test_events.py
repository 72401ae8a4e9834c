"""The events a running gateway emits (gateway.events), heard on its one bus (`gateway.events`)
while real messages go through real sockets: receipt, ACK and refusal on MLLP, translation,
delivery attempts and dead letters, TLS handshake failures, refused certificates, reloads;
and the client certificates it records. No event ever carries patient data."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import pytest_twisted
from sqlalchemy import select
from twisted.internet import defer, reactor

from adapters.mllp.client import describe
from gateway.config import RetryConfig
from gateway.events import KINDS
from gateway.store.database import create_gateway_engine
from gateway.store.schema import facility_certificates
from observability_support import (HOST, PATIENT_GIVEN, PATIENT_ID, PATIENT_NAME, facility_tls, hl7,
                                   in_thread, observed_config, send_mllp, try_tls, until)




def no_patient_data(events) -> None:
    for event in events:
        text = repr(event)
        for secret in (PATIENT_NAME, PATIENT_GIVEN, PATIENT_ID):
            assert secret not in text, f"{secret} in {text}"


@pytest_twisted.inlineCallbacks
def test_ingest_translation_and_delivery_events(db_url, make_config, tmp_path, observe):
    """An ADT that translates, an ORU that does not, bytes that are not HL7: each is received
    and acknowledged (AA, AA, AR) with its latency, the third refused; the ADT is translated
    and its delivery to a peer that is down attempted; the ORU's translation fails."""
    observed = yield observe(observed_config(make_config, db_url, tmp_path, tls=False))
    acks = yield in_thread(send_mllp, observed.ports["mllp-test"], hl7("EV-ADT-1"),
                           hl7("EV-ORU-1", "ORU^R01^ORU_R01"), b"not hl7 at all\r")
    assert [describe(a)["msa1"] for a in acks] == ["AA", "AA", "AR"], [describe(a) for a in acks]

    yield until(lambda: observed.kinds("delivery.attempted") and observed.kinds("message.translation_failed"))
    received = observed.kinds("message.received")
    assert [(e.detail["control_id"], e.facility, e.actor, e.listener, e.message_type) for e in received] == [
        ("EV-ADT-1", "INPE-100001", "INPE-100001", "mllp-test", "ADT^A01"),
        ("EV-ORU-1", "INPE-100001", "INPE-100001", "mllp-test", "ORU^R01"),
        (None, None, "unknown", "mllp-test", None)]
    assert all(e.source.startswith("127.0.0.1:") and len(e.detail["sha256"]) == 64 for e in received)
    assert received[0].detail["size"] == len(hl7("EV-ADT-1"))

    acknowledged = observed.kinds("message.acknowledged")
    assert [(e.detail["control_id"], e.detail["ack_code"], e.outcome) for e in acknowledged] == [
        ("EV-ADT-1", "AA", "success"), ("EV-ORU-1", "AA", "success"), (None, "AR", "refused")]
    assert all(0 <= e.duration < 5 for e in acknowledged)

    [refused] = observed.kinds("message.refused")
    assert (refused.detail["reason"], refused.outcome, refused.actor) == ("not_hl7", "refused", "unknown")

    [translated] = observed.kinds("message.translated")
    assert translated.subject.startswith("message/") and translated.facility == "INPE-100001"
    # Receipt, ACK and translation of one message name the same subject (the audit joins them).
    assert received[0].subject == acknowledged[0].subject == translated.subject
    assert all(e.subject and e.subject.startswith("message/") for e in received + acknowledged)
    assert translated.message_type == "ADT^A01" and translated.detail["resources"] >= 1
    assert translated.detail["destinations"] == ["record-down"]
    [failed] = observed.kinds("message.translation_failed")
    assert failed.message_type == "ORU^R01" and failed.outcome == "failure" and failed.detail["error_code"]

    attempt = observed.kinds("delivery.attempted")[0]
    assert (attempt.destination, attempt.outcome, attempt.detail["attempt"]) == ("record-down", "failure", 1)
    assert attempt.subject.startswith("delivery/") and attempt.duration >= 0
    assert not observed.kinds("delivery.dead")  # retried later, not given up
    assert {e.kind for e in observed.events} <= KINDS
    no_patient_data(observed.events)


@pytest_twisted.inlineCallbacks
def test_a_delivery_out_of_attempts_is_a_dead_letter(make_config, tmp_path, observe):
    config = observed_config(make_config, f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path, tls=False)
    [down] = config.destinations
    config = dataclasses.replace(config, destinations=(dataclasses.replace(
        down, retry=RetryConfig(base=600, cap=600, max_attempts=1)),))
    observed = yield observe(config)
    yield in_thread(send_mllp, observed.ports["mllp-test"], hl7("EV-DEAD-1"))
    [dead] = yield until(lambda: observed.kinds("delivery.dead"))
    [attempt] = observed.kinds("delivery.attempted")
    assert dead.subject == attempt.subject and dead.destination == "record-down"
    assert dead.outcome == "failure" and dead.detail["reason"]
    no_patient_data(observed.events)


@pytest_twisted.inlineCallbacks
def test_tls_failures_refusals_and_certificates_seen(make_config, tmp_path, dev_pki, foreign_pki, observe):
    """A certificate from another CA fails the handshake (tls.handshake_failed, with OpenSSL's
    reason); one from our CA that names no facility is refused at the door (door.refused,
    mllp, 401); a facility's certificate is recorded once per ten minutes however often it
    connects."""
    db_url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    observed = yield observe(observed_config(make_config, db_url, tmp_path, translate=False))
    port = observed.ports["mllp-tls"]

    outcome = yield in_thread(try_tls, port, facility_tls(foreign_pki, "ROGUE-1", ca_dir=dev_pki),
                              hl7("EV-ROGUE-1"))
    assert not isinstance(outcome, list) or outcome == [None], outcome
    [failed] = yield until(lambda: observed.kinds("tls.handshake_failed"))
    assert failed.listener == "mllp-tls" and failed.source.startswith("127.0.0.1:")
    assert failed.detail["reason"] == "certificate_verify_failed"

    outcome = yield in_thread(try_tls, port, facility_tls(dev_pki, "INPE-100002"), hl7("EV-UNKNOWN-1"))
    assert not isinstance(outcome, list) or outcome == [None], outcome
    [refused] = yield until(lambda: observed.kinds("door.refused"))
    assert (refused.listener, refused.detail["door"], refused.detail["status"]) == ("mllp-tls", "mllp", 401)
    assert "INPE-100002" in refused.detail["certificate"]

    for control_id in ("EV-TLS-1", "EV-TLS-2"):  # two connections
        [ack] = yield in_thread(lambda: send_mllp(port, hl7(control_id),
                                                  tls=facility_tls(dev_pki, "INPE-100001")))
        assert b"MSA|AA|" + control_id.encode() in ack
    assert len(observed.kinds("tls.handshake_failed")) == 1  # good handshakes are not counted
    rows = yield until(lambda: _certificates(db_url))
    [row] = rows
    assert row.facility_id == "INPE-100001" and row.door == "mllp-tls" and len(row.sha256) == 64
    assert "INPE-100001" in row.subject and row.issuer and row.not_after is not None
    assert row.first_seen_at == row.last_seen_at  # the second connection wrote nothing


def _certificates(db_url: str) -> list:
    engine = create_gateway_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(facility_certificates)))
    finally:
        engine.dispose()


@pytest_twisted.inlineCallbacks
def test_reloads_are_told(make_config, tmp_path, observe):
    from gateway.service import reload_service

    observed = yield observe(observed_config(make_config, f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path,
                                             tls=False))
    yield reload_service(observed.service)
    [config] = observed.kinds("config.reloaded")
    [mappings] = observed.kinds("mappings.reloaded")
    assert config.outcome == "success" and config.detail["facilities"] >= 1
    assert mappings.outcome == "success" and mappings.detail["version"]


@pytest_twisted.inlineCallbacks
def test_https_door_reads_refusals_handshakes_and_certificates(make_config, tmp_path, dev_pki, foreign_pki,
                                                               observe):
    """On the HTTPS door: a facility reading its message's status is a message.read (who,
    which message, from where); a certificate that names no facility is a door.refused (rest,
    401); one from another CA fails the handshake; the facility's certificate is recorded."""
    from twisted.web.client import Agent

    from doors_support import Client, Door
    from gateway.config import HttpsListenerConfig
    from gateway.store.schema import messages

    db_url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    config = dataclasses.replace(observed_config(make_config, db_url, tmp_path, tls=False, translate=False),
                                 https=(HttpsListenerConfig(name="https-test", port=0),))
    observed = yield observe(config)
    yield in_thread(send_mllp, observed.ports["mllp-test"], hl7("EV-READ-1"))
    engine = create_gateway_engine(db_url)
    with engine.connect() as conn:
        message_id = conn.execute(select(messages.c.id).where(messages.c.control_id == "EV-READ-1")).scalar_one()
    engine.dispose()
    door = Door(config, observed.ports["https-test"], dev_pki, None, None)

    answer = yield Client(door, "INPE-100001").get(f"/v1/messages/{message_id}")
    assert answer.code == 200 and answer.json()["control_id"] == "EV-READ-1"
    [read] = observed.kinds("message.read")
    assert (read.actor, read.subject, read.listener) == ("INPE-100001", f"message/{message_id}", "https-test")
    assert read.source.startswith("127.0.0.1:") and read.detail["via"] == "rest"

    answer = yield Client(door, "INPE-100002").get(f"/v1/messages/{message_id}")
    assert answer.code == 401
    [refused] = observed.kinds("door.refused")
    assert (refused.listener, refused.detail["door"], refused.detail["status"]) == ("https-test", "rest", 401)

    client = Client(door, "INPE-100001")  # trusting our CA, presenting the rogue certificate
    client.agent = Agent(reactor, contextFactory=_policy(door, foreign_pki), pool=client.pool)
    with pytest.raises(Exception):
        yield client.get("/v1/messages/1")
    [failed] = yield until(lambda: observed.kinds("tls.handshake_failed"))
    assert failed.listener == "https-test" and failed.detail["reason"] == "certificate_verify_failed"

    [row] = yield until(lambda: _certificates(db_url))
    assert (row.facility_id, row.door) == ("INPE-100001", "https-test")
    no_patient_data(observed.events)


def _policy(door, foreign_pki):
    from doors_support import _Policy
    from gateway.tls import client_tls_options

    return _Policy(client_tls_options(door.path("ca.crt"), "127.0.0.1",
                                      os.path.join(foreign_pki, "ROGUE-1.crt"),
                                      os.path.join(foreign_pki, "ROGUE-1.key")))


@pytest_twisted.inlineCallbacks
def test_prescription_reads_are_told(tmp_path, repo_mappings):
    """A pharmacy looking a prescription up (by id, by its QR payload) is a prescription.read
    naming the prescription, never the patient."""
    from adapters.hl7v2.ack import AckBuilder
    from gateway.doors.api import ApiRequest
    from gateway.events import EventBus
    from gateway.prescriptions.api import prescription_routes
    from gateway.store.database import Database
    from prescription_support import FakeEligibility, Harness, config_for, rde
    from test_prescription_api import FACILITIES

    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    harness = Harness(url, repo_mappings, config_for(url, tmp_path), FakeEligibility(), AckBuilder())
    [record] = harness.translate(rde("RDE-EV-1"))
    ack = record.ack.decode()
    prescription_id = [s for s in ack.split("\r") if s.startswith("ORC|")][0].split("|")[3].split("^")[0]
    qr_payload = [s for s in ack.split("\r") if s.startswith("NTE|")][0].split("|")[3]

    class Service:
        database = Database(harness.engine, reactor, 2, name="rx-events")
        key = harness.key

    Service.database.start()
    heard = []
    bus = EventBus()
    bus.subscribe(heard.append)
    routes = {(r.method, r.template): r for r in prescription_routes(Service, bus)}
    pharmacy = FACILITIES["INPE-100004"]
    try:
        yield defer.maybeDeferred(routes[("GET", "/v1/prescriptions/{id}")].handler, ApiRequest(
            "GET", "/", {"id": prescription_id}, {}, {}, b"", pharmacy, "127.0.0.1:1", "req-1"))
        yield defer.maybeDeferred(routes[("POST", "/v1/prescriptions/lookup")].handler, ApiRequest(
            "POST", "/", {}, {}, {"content-type": "application/json"},
            json.dumps({"qr": qr_payload}).encode(), pharmacy, "127.0.0.1:2", "req-2"))
    finally:
        Service.database.stop()
    assert [(e.kind, e.actor, e.subject, e.source, e.detail["via"]) for e in heard] == [
        ("prescription.read", "INPE-100004", f"prescription/{prescription_id}", "127.0.0.1:1", "rest"),
        ("prescription.read", "INPE-100004", f"prescription/{prescription_id}", "127.0.0.1:2", "qr-lookup")]
    assert all("BE123456" not in repr(e) for e in heard)


@pytest_twisted.inlineCallbacks
def test_astm_messages_are_received_events(tmp_path):
    """Each message of an analyzer's transfer is a message.received of the listener's
    laboratory, type ASTM, named by its hash (ASTM has no control id of its own)."""
    from gateway.config import AstmListenerConfig
    from gateway.events import EventBus
    from gateway.ingest.astm import astm_listener_factory
    from gateway.store.database import migrate
    from gateway.store.ingest_writer import IngestWriter
    from test_astm_listener import MESSAGE, _send_transfer

    engine = create_gateway_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    migrate(engine)
    writer = IngestWriter(engine, reactor.callFromThread, lambda item: None)
    writer.start()
    heard, bus = [], EventBus()
    bus.subscribe(heard.append)
    factory = astm_listener_factory(AstmListenerConfig("astm-lab", 0, "100234"), writer, reactor, events=bus)
    port = reactor.listenTCP(0, factory, interface=HOST)
    try:
        second = MESSAGE.replace(b"PAT-1", b"PAT-2")
        yield in_thread(_send_transfer, port.getHost().port, MESSAGE + second)
        yield until(lambda: len(heard) == 2)
    finally:
        yield port.stopListening()
        writer.stop()
        engine.dispose()
    assert [(e.kind, e.actor, e.facility, e.message_type, e.listener) for e in heard] == [
        ("message.received", "100234", "100234", "ASTM", "astm-lab")] * 2
    assert [e.detail["control_id"][:7] for e in heard] == ["sha256:"] * 2
    assert all("EL ALAOUI" not in repr(e) and "BK123456" not in repr(e) for e in heard)


@pytest_twisted.inlineCallbacks
def test_a_source_outside_the_allowed_networks_is_a_door_refusal(make_config, tmp_path, observe):
    config = make_config(f"sqlite:///{tmp_path / 'g.sqlite'}",
                         mllp=[dict(name="mllp-test", accept_unknown_senders=True,
                                    allow_sources=("10.0.0.0/8",))])
    observed = yield observe(config)
    outcome = yield in_thread(try_tls, observed.ports["mllp-test"], None, hl7("EV-SRC-1"))
    assert not isinstance(outcome, list) or outcome == [None], outcome
    [refused] = yield until(lambda: observed.kinds("door.refused"))
    assert (refused.listener, refused.detail["door"], refused.detail["status"]) == ("mllp-test", "mllp", 403)
    assert refused.source == "127.0.0.1" and not observed.kinds("message.received")

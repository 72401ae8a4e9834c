"""The audit recorder on a real database: events heard on the bus (from the reactor and from
other threads) are appended in order, in batches, and what is left at stop is flushed; a full
queue is counted and said in the trail; a real gateway's message leaves its records."""
from __future__ import annotations

import dataclasses
import os
import time

import hl7msgs
import pytest
import pytest_twisted
from sqlalchemy import text
from twisted.internet import defer, reactor, task, threads

from gateway.audit.recorder import LOST, AuditRecorder, audit_event
from gateway.audit.trail import AuditTrail
from gateway.events import Event, EventBus
from gateway.store.database import Database, create_gateway_engine, migrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def started(db_url, **options):
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, reactor)
    database.start()
    bus = EventBus()
    recorder = AuditRecorder(AuditTrail(engine, "node-1"), bus, database, **options)
    recorder.startService()
    return recorder, bus, database


def read(database, recorder):
    with database.engine.connect() as conn:
        return list(recorder.trail.records(conn))


def test_an_event_becomes_an_audit_event_with_its_labels():
    event = Event("delivery.attempted", "system", subject="delivery/7", outcome="failure",
                  source="10.0.0.9:443", facility="INPE-100001", message_type="ORU^R01",
                  destination="shared-record", listener=None, duration=0.1234567,
                  detail={"code": 503, "attempt": 2, "raw": b"\x01\x02", "codes": ("A", "B"),
                          "ratio": float("nan")})
    audit = audit_event(event)
    assert (audit.action, audit.actor, audit.outcome, audit.subject, audit.source) == (
        "delivery.attempted", "system", "failure", "delivery/7", "10.0.0.9:443")
    assert audit.detail == {"code": 503, "attempt": 2, "raw": "0102", "codes": ["A", "B"],
                            "ratio": "nan", "facility": "INPE-100001", "message_type": "ORU^R01",
                            "destination": "shared-record", "duration": 0.123457}


@pytest_twisted.inlineCallbacks
def test_events_from_the_reactor_and_threads_are_appended_and_flushed_at_stop(db_url):
    recorder, bus, database = started(db_url, flush_interval=0.05)
    try:
        for n in range(50):
            bus.emit(Event("message.received", "INPE-100001", subject=f"message/{n}",
                           detail={"control_id": f"C{n}"}))

        def from_a_thread(first):
            for n in range(first, first + 100):
                bus.emit(Event("message.read", "console:amina", subject=f"message/{n}"))

        yield defer.gatherResults([threads.deferToThread(from_a_thread, k * 100) for k in (1, 2)])
        deadline = time.monotonic() + 20  # appended on the way, not only at stop
        while recorder.appended < 50:
            assert time.monotonic() < deadline, recorder.appended
            yield task.deferLater(reactor, 0.05, lambda: None)
        for n in range(7):  # heard just before stopping: flushed by the stop
            bus.emit(Event("config.reloaded", "system", subject="config"))
        yield recorder.stopService()
        records = read(database, recorder)
        assert len(records) == 257 and recorder.appended == 257
        assert [r.subject for r in records[:50]] == [f"message/{n}" for n in range(50)]
        for k in (1, 2):  # each thread's events in the order it emitted them
            own = [r.subject for r in records if r.subject and r.action == "message.read"
                   and k * 100 <= int(r.subject.split("/")[1]) < k * 100 + 100]
            assert own == [f"message/{n}" for n in range(k * 100, k * 100 + 100)]
        assert [r.action for r in records[-7:]] == ["config.reloaded"] * 7
        bus.emit(Event("message.read", "late"))  # no longer listening
        assert len(recorder._queue) == 0
        verification = yield threads.deferToThread(recorder.trail.verify)
        assert verification.intact and verification.count == 257
    finally:
        database.stop()


@pytest_twisted.inlineCallbacks
def test_a_full_queue_is_counted_and_recorded(db_url):
    recorder, bus, database = started(db_url, flush_interval=3600, limit=10)
    try:
        for n in range(25):
            bus.emit(Event("message.received", "INPE-100001", subject=f"message/{n}"))
        assert recorder.lost == 15
        yield recorder.flush()
        records = read(database, recorder)
        assert [r.subject for r in records[:10]] == [f"message/{n}" for n in range(10)]
        assert records[-1].action == LOST and records[-1].outcome == "failure"
        assert records[-1].detail == {"events": 15, "limit": 10}
        yield recorder.stopService()
        assert len(read(database, recorder)) == 11  # the loss is said once
    finally:
        database.stop()


@pytest.mark.pg
@pytest_twisted.inlineCallbacks
def test_an_event_the_database_refuses_is_counted_lost_and_the_trail_goes_on(pg_url):
    """An event with a value PostgreSQL refuses (here an action longer than its column: the
    stand-in for any) is recorded as lost, alone; the events around it are appended, and so
    are the later ones: the batch is not retried forever in front of them."""
    recorder, bus, database = started(pg_url, flush_interval=3600)
    try:
        bus.emit(Event("message.received", "INPE-100001", subject="message/1"))
        bus.emit(Event("x" * 100, "INPE-100001", subject="message/2"))
        bus.emit(Event("message.received", "INPE-100001", subject="message/3"))
        assert (yield recorder.flush()) == 3
        bus.emit(Event("message.received", "INPE-100001", subject="message/4"))
        assert (yield recorder.flush()) == 1
        records = read(database, recorder)
        assert [(r.action, r.subject) for r in records] == [
            ("message.received", "message/1"), (LOST, "audit"), ("message.received", "message/3"),
            ("message.received", "message/4")]
        assert records[1].detail == {"events": 1, "action": "x" * 100, "reason": "StringDataRightTruncation"}
        assert recorder.trail.verify().intact
        yield recorder.stopService()
    finally:
        database.stop()


@pytest_twisted.inlineCallbacks
def test_a_failed_append_keeps_the_events_for_the_next(db_url):
    recorder, bus, database = started(db_url, flush_interval=3600)
    try:
        for n in range(5):
            bus.emit(Event("message.received", "INPE-100001", subject=f"message/{n}"))
        with database.engine.begin() as conn:  # the table is away: the append fails
            conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))
        assert (yield recorder.flush()) == 0
        assert len(recorder._queue) == 5 and recorder.appended == 0
        bus.emit(Event("message.received", "INPE-100001", subject="message/5"))
        with database.engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_log_away RENAME TO audit_log"))
        assert (yield recorder.flush()) == 6
        assert [r.subject for r in read(database, recorder)] == [f"message/{n}" for n in range(6)]
        yield recorder.stopService()
    finally:
        database.stop()


@pytest_twisted.inlineCallbacks
def test_a_real_gateway_records_receipt_with_its_ack_then_translation(db_url, make_config,
                                                                      running_gateway):
    from adapters.mllp.client import MllpClient, describe
    from gateway.config import AuditConfig, MappingsConfig

    config = dataclasses.replace(make_config(db_url), audit=AuditConfig(flush_interval=0.05),
                                 mappings=MappingsConfig(os.path.join(ROOT, "mappings")))
    ports = yield running_gateway(config)
    message = hl7msgs.message("oru", 11).encode("utf-8")

    def exchange():
        with MllpClient("127.0.0.1", ports["mllp-test"], timeout=10) as client:
            return client.send(message).response

    answer = yield threads.deferToThread(exchange)
    assert describe(answer)["msa1"] == "CA"
    engine = create_gateway_engine(db_url)
    trail = AuditTrail(engine, "reader")
    # The receipt was committed with the message, before the ACK left: no flush to wait for.
    with engine.connect() as conn:
        assert [r.action for r in trail.records(conn)][:1] == ["message.received"]
    wanted = {"message.received", "message.translated"}
    deadline = time.monotonic() + 15
    while True:
        with engine.connect() as conn:
            records = list(trail.records(conn))
        if wanted <= {r.action for r in records} or time.monotonic() > deadline:
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    engine.dispose()
    by_action = {r.action: r for r in records}
    assert wanted <= set(by_action), [r.action for r in records]
    received, translated = by_action["message.received"], by_action["message.translated"]
    assert received.node == config.node_name and translated.subject.startswith("message/")
    assert received.source and received.source.startswith("127.0.0.1")
    for record in records:  # one message: the control id ties them, never patient data
        assert record.detail["control_id"] == "B00000000011", record
        assert record.subject in (None, translated.subject)
        assert record.detail["message_type"] == "ORU^R01"
    assert received.detail["ack_code"] == "CA" and received.detail["listener"] == "mllp-test"
    assert [r.action for r in records].count("message.received") == 1  # once, not again by the recorder
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    engine = create_gateway_engine(db_url)
    verification = yield threads.deferToThread(AuditTrail(engine, "reader").verify)
    engine.dispose()
    assert verification.intact and verification.count == len(records)

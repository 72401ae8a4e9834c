"""Translation after ingest, over real MLLP sockets on SQLite and PostgreSQL: bundle and mapping
version stored, ack_after: translation (AA, AE with ERR), the start sweep, reload, replay."""
from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import pytest
import pytest_twisted
from sqlalchemy import text
from twisted.internet import threads

from adapters.mllp.client import MllpClient, describe
from gateway.config import SenderConfig
from gateway.mapping.mapping_set import MappingSet
from gateway.store.database import create_gateway_engine, migrate
from gateway.store.ingest_writer import IngestJob, IngestWriter
from gateway.store.translations import (get_translation, message_ids, messages_by_id,
                                        save_translations)
from gateway.translation.translator import Translator, location_of
from translation_support import ORU_FIX, hl7, rows, wait_for, with_mappings, write_mappings

STATUS = "SELECT control_id, status FROM messages ORDER BY id"


def send(port: int, *messages: bytes) -> list[bytes]:
    with MllpClient("127.0.0.1", port, timeout=15) as client:
        return [client.send(message).response for message in messages]


def err_fields(ack: bytes) -> list[str]:
    [err] = [segment for segment in ack.split(b"\r") if segment.startswith(b"ERR|")]
    return err.decode().split("|")


@pytest_twisted.inlineCallbacks
def test_message_over_mllp_is_translated_with_bundle_and_version(db_url, make_config,
                                                                 running_gateway, tmp_path):
    """A message acknowledged at commit ends up translated: bundle and mapping version stored."""
    directory = write_mappings(tmp_path / "mappings")
    version = MappingSet.load(directory).version
    ports = yield running_gateway(with_mappings(make_config(db_url), directory))
    [ack] = yield threads.deferToThread(send, ports["mllp-test"], hl7("T-1"))
    assert describe(ack)["msa1"] == "AA"
    wait_for(db_url, STATUS, [("T-1", "translated")])
    [row] = rows(db_url, "SELECT t.status, t.mapping_version, c.bundle, m.format FROM translations t "
                         "JOIN messages m ON m.id = t.message_id "
                         "JOIN canonical_bundles c ON c.message_id = m.id AND c.received_at = m.received_at")
    assert (row.status, row.mapping_version, row.format) == ("translated", version, "hl7v2")
    bundle = json.loads(row.bundle)
    patient = bundle["entry"][0]["resource"]
    assert (patient["resourceType"], patient["birthDate"], patient["gender"]) == ("Patient", "1985-07-14", "male")


@pytest_twisted.inlineCallbacks
def test_ack_after_translation_gives_aa_then_ae_with_err_and_keeps_the_message(
        db_url, make_config, running_gateway, tmp_path):
    """ack_after: translation: AA for a good message; AE with ERR-2/ERR-3 for an invalid date and
    for an unmapped type, both stored as failed; a re-sent failure gets the same AE back."""
    directory = write_mappings(tmp_path / "mappings")
    config = make_config(db_url, mllp=[dict(name="mllp-test", accept_unknown_senders=True,
                                            ack_after="translation")])
    ports = yield running_gateway(with_mappings(config, directory))
    good, bad_date, unmapped = hl7("A-1"), hl7("A-2", birth="19851399"), hl7("A-3", kind="ORU^R01^ORU_R01")
    answers = yield threads.deferToThread(send, ports["mllp-test"], good, bad_date, unmapped, bad_date)
    assert [describe(a)["msa1"] for a in answers] == ["AA", "AE", "AE", "AE"]
    date_err, type_err = err_fields(answers[1]), err_fields(answers[2])
    assert date_err[2] == "PID^1" and date_err[3].startswith("102^")
    assert "not a valid date" in date_err[7]
    assert type_err[2] == "MSH^1^9" and type_err[3].startswith("207^")
    assert "no mapping for message type 'ORU\\S\\R01'" in type_err[7]  # ^ escaped as \S\
    assert answers[3] == answers[1]  # the duplicate gets the stored AE, byte for byte
    assert [tuple(r) for r in rows(db_url, STATUS)] == [("A-1", "translated"), ("A-2", "failed"),
                                                         ("A-3", "failed")]
    stored = rows(db_url, "SELECT m.ack_code, m.ack, t.error_code, t.error_location FROM messages m "
                          "JOIN translations t ON t.message_id = m.id ORDER BY m.id")
    assert [(r.ack_code, r.error_code, r.error_location) for r in stored] == [
        ("AA", None, None), ("AE", 102, "PID[1]"), ("AE", 207, "MSH[1]-9")]
    assert bytes(stored[1].ack) == answers[1]


@pytest_twisted.inlineCallbacks
def test_a_query_is_acknowledged_and_kept_but_not_translated(make_config, running_gateway, tmp_path):
    """A message the mapping set does not translate by design (a query) is answered AA even
    with ack_after: translation, kept as 'ignored' with the reason, and routed nowhere."""
    from conftest import ROOT

    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    config = make_config(db_url, mllp=[dict(name="mllp-test", accept_unknown_senders=True,
                                            ack_after="translation")])
    ports = yield running_gateway(with_mappings(config, Path(ROOT) / "mappings"))
    [answer] = yield threads.deferToThread(send, ports["mllp-test"], hl7("Q-1", kind="QBP^Q22^QBP_Q21"))
    assert describe(answer)["msa1"] == "AA"
    [stored] = rows(db_url, "SELECT m.status, t.status AS translation, c.bundle, t.error_reason "
                            "FROM messages m JOIN translations t ON t.message_id = m.id "
                            "LEFT JOIN canonical_bundles c ON c.message_id = m.id")
    assert (stored.status, stored.translation, stored.bundle) == ("ignored", "ignored", None)
    assert stored.error_reason.startswith("not translated: ")
    assert rows(db_url, "SELECT * FROM deliveries") == []


@pytest_twisted.inlineCallbacks
def test_start_sweep_translates_messages_left_received(db_url, make_config, running_gateway, tmp_path):
    """Messages stored but never translated (a crash after the commit) are translated at start."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    from adapters.hl7v2.ack import AckBuilder
    from gateway.ingest.inspect import IngestPolicy, Inspector

    inspector = Inspector(AckBuilder(), IngestPolicy("t"))
    writer = IngestWriter(engine, lambda f, *a: f(*a), lambda item: None)
    writer.start()
    done = []
    writer.submit(IngestJob([inspector.message(hl7("S-1")), inspector.message(hl7("S-2", birth="1985XX"))],
                            "t", "peer", 1_700_000_000.0, lambda job, error: done.append(error)))
    writer.stop()
    engine.dispose()
    assert done == [None]
    assert [tuple(r) for r in rows(db_url, STATUS)] == [("S-1", "received"), ("S-2", "received")]

    directory = write_mappings(tmp_path / "mappings")
    yield running_gateway(with_mappings(make_config(db_url), directory))
    wait_for(db_url, STATUS, [("S-1", "translated"), ("S-2", "failed")])


def test_a_batch_nobody_waits_for_waits_a_little_for_company(db_url, tmp_path):
    """Live jobs arriving one by one are stored together once LINGER_BATCH of them are there;
    a lone job waits up to LINGER for company; a job an ACK waits for is stored at once."""
    import time

    from adapters.hl7v2.ack import AckBuilder
    from gateway.ingest.inspect import IngestPolicy, Inspector
    from gateway.translation.service import TranslationJob, TranslationWorker

    engine = create_gateway_engine(db_url)
    migrate(engine)
    inspector = Inspector(AckBuilder(), IngestPolicy("t"))
    writer = IngestWriter(engine, lambda f, *a: f(*a), lambda item: None)
    writer.start()
    for n in range(6):
        writer.submit(IngestJob([inspector.message(hl7(f"L-{n}"))], "t", "peer", 1_700_000_000.0,
                                lambda job, error: None))
    writer.stop()
    with engine.connect() as conn:
        ids = message_ids(conn, "received")
        pending = messages_by_id(conn, ids)
    assert len(pending) == 6
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), linger=3.0, linger_batch=3)
    worker.start(sweep=False)
    try:
        for item in pending[:3]:  # one at a time: stored together, once three are there
            worker.submit(TranslationJob([item]))
            time.sleep(0.05)
        # (translated counts before the commit: wait for both)
        assert _until(lambda: worker.translated == 3 and worker.commits >= 1) and worker.commits == 1
        worker.submit(TranslationJob([pending[3]]))  # alone: waits for company
        time.sleep(0.5)
        assert worker.commits == 1
        assert _until(lambda: worker.commits == 2, 10.0)
        answered = []
        started = time.monotonic()
        worker.submit(TranslationJob([pending[4]], lambda job: answered.append(time.monotonic() - started)))
        # (well before the linger: a commit under load may take a second)
        assert _until(lambda: answered, 5.0) and answered[0] < 2.0 and worker.commits == 3
    finally:
        worker.stop()
        engine.dispose()


def test_messages_a_stopped_node_left_untranslated_are_swept_by_another(db_url, tmp_path):
    """A message still 'received' STALE_AFTER after its receipt (its node died between its
    commit and its translation) is translated by a running worker without a restart or a
    start sweep; a younger one is left to whoever holds it. The oldest untranslated message
    is read from the partial index."""
    import time

    from adapters.hl7v2.ack import AckBuilder
    from gateway.ingest.inspect import IngestPolicy, Inspector
    from gateway.store.translations import oldest_untranslated
    from gateway.translation.service import TranslationWorker

    engine = create_gateway_engine(db_url)
    migrate(engine)
    inspector = Inspector(AckBuilder(), IngestPolicy("t"))
    writer = IngestWriter(engine, lambda f, *a: f(*a), lambda item: None)
    writer.start()
    now = time.time()
    writer.submit(IngestJob([inspector.message(hl7("OLD-1"))], "t", "peer", now - 3600, lambda j, e: None))
    writer.submit(IngestJob([inspector.message(hl7("NEW-1"))], "t", "peer", now + 3600, lambda j, e: None))
    writer.stop()
    with engine.connect() as conn:
        assert oldest_untranslated(conn) == datetime.fromtimestamp(now - 3600, timezone.utc)
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), stale_after=0.3)
    worker.start(sweep=False)  # as a node that is already running: no start sweep
    try:
        assert _until(lambda: worker.translated == 1, 10.0)
        time.sleep(0.8)  # more checks: the younger one is still not taken
        assert [tuple(r) for r in rows(db_url, STATUS)] == [("OLD-1", "translated"), ("NEW-1", "received")]
        assert worker.translated == 1
    finally:
        worker.stop()
        engine.dispose()


def test_translations_are_recorded_in_the_audit_trail_with_them(db_url, tmp_path):
    """Each stored translation's record (message.translated, or message.translation_failed
    with its error) is in the audit trail as soon as the translation is: same transaction.
    The events then say so (`recorded`), and the recorder leaves them out."""
    from gateway.audit.trail import AuditTrail
    from gateway.events import EventBus
    from gateway.translation.service import TranslationJob, TranslationWorker

    engine = create_gateway_engine(db_url)
    migrate(engine)
    pending = _stored(engine, [hl7("AU-1"), hl7("AU-2", birth="1985XX")])
    trail, events, heard = AuditTrail(engine, "node-t"), EventBus(), []
    events.subscribe(heard.append)
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), events=events, audit=trail, linger=0)
    worker.start(sweep=False)
    try:
        done = []
        worker.submit(TranslationJob(pending, done.append))
        assert _until(lambda: done)
        with engine.connect() as conn:
            records = list(trail.records(conn))
        assert [(r.action, r.subject, r.detail["control_id"]) for r in records] == [
            ("message.translated", f"message/{pending[0].message_id}", "AU-1"),
            ("message.translation_failed", f"message/{pending[1].message_id}", "AU-2")]
        assert records[1].outcome == "failure" and records[1].detail["error_location"]
        assert [(e.kind, e.recorded) for e in heard] == [("message.translated", True),
                                                          ("message.translation_failed", True)]
        assert trail.verify().intact
    finally:
        worker.stop()
        engine.dispose()


def test_a_swept_translation_is_recorded_with_its_control_id(db_url, tmp_path):
    """What the sweep translates (left 'received' by a crash, a full queue, an outage) is
    recorded as the live path's translations are: with its control id (it was None), read
    back with the message, as a replay's is."""
    from gateway.audit.trail import AuditTrail
    from gateway.store.translations import messages_by_id, pending_messages
    from gateway.translation.service import TranslationWorker

    engine = create_gateway_engine(db_url)
    migrate(engine)
    live = _stored(engine, [hl7("SW-1"), hl7("SW-2", birth="1985XX")])
    with engine.connect() as conn:
        assert [p.key for p in pending_messages(conn)] == [p.key for p in live]
        assert [p.key for p in messages_by_id(conn, [p.message_id for p in live])] == [p.key for p in live]
    trail = AuditTrail(engine, "node-t")
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), audit=trail, linger=0)
    worker.start(sweep=True)
    try:
        def recorded() -> list:
            with engine.connect() as conn:
                return list(trail.records(conn))

        assert _until(lambda: len(recorded()) == 2)
        records = recorded()
        assert [(r.action, r.detail["control_id"]) for r in records] == [
            ("message.translated", "SW-1"), ("message.translation_failed", "SW-2")]
    finally:
        worker.stop()
        engine.dispose()


def test_bundles_nobody_reads_are_sealed_and_stored_the_same(db_url, tmp_path):
    """A job whose caller reads no bundle has them encoded right after translation and the
    dicts let go (sealed); a job that asks to keep them (a door answering with one) keeps them. Either way the stored bundle is the
    same JSON, and the audit record counts the same resources."""
    from gateway.audit.trail import AuditTrail
    from gateway.store.translations import TranslationRecord, bundle_bytes
    from gateway.translation.service import TranslationJob, TranslationWorker

    engine = create_gateway_engine(db_url)
    migrate(engine)
    items = _stored(engine, [hl7("SE-1"), hl7("SE-2")])
    trail = AuditTrail(engine, "node-t")
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), audit=trail, linger=0)
    try:
        sealed, kept = TranslationJob(items[:1], lambda job: None), TranslationJob(items[1:], keep_bundles=True)
        worker._process([sealed, kept])
        [quiet], [awaited] = sealed.results, kept.results
        assert quiet.bundle is None and quiet.encoded is not None
        assert awaited.bundle is not None and awaited.encoded is None
        assert quiet.bundle_dict()["entry"][0]["resource"]["resourceType"] == "Patient"
        assert quiet.resources == awaited.resources == len(awaited.bundle["entry"]) > 1
        with engine.connect() as conn:
            stored = dict(conn.execute(text("SELECT message_id, bundle FROM canonical_bundles")).all())
            counts = [r.detail["resources"] for r in trail.records(conn)]
        assert stored[items[0].message_id].encode() == quiet.encoded
        assert stored[items[1].message_id].encode() == bundle_bytes(awaited.bundle)
        assert counts == [quiet.resources, awaited.resources]
    finally:
        engine.dispose()
    record = TranslationRecord("translated", "v", bundle={"entry": [{"resource": {"id": "é"}}]})
    record.seal()
    assert (record.bundle, record.resources, record.bundle_dict()) == (None, 1, {"entry": [{"resource": {"id": "é"}}]})


@pytest.mark.pg
def test_a_translation_the_database_refuses_is_stored_failed_alone(pg_url, tmp_path):
    """A value PostgreSQL refuses in one translation of a batch (here a destination longer than
    its column: the stand-in for any) fails neither the batch nor each sweep after it: the
    others are stored translated, that one as failed, with the reason."""
    from gateway.translation.service import TranslationJob, TranslationWorker

    engine = create_gateway_engine(pg_url)
    migrate(engine)
    items = _stored(engine, [hl7("DE-1"), hl7("DE-2"), hl7("DE-3")])
    translator = Translator(MappingSet.load(write_mappings(tmp_path / "mappings")))
    worker = TranslationWorker(engine, translator, lambda f, *a: f(*a), linger=0)
    original = translator.translate

    def translate(item):
        record = original(item)
        if item.key[2] == "DE-2":
            record.destinations = ("d" * 100,)
        return record

    translator.translate = translate
    try:
        worker._process([TranslationJob(items)])
        found = rows(pg_url, "SELECT m.control_id, t.status, t.error_reason FROM messages m "
                             "JOIN translations t ON t.message_id = m.id ORDER BY m.id")
        assert [(r.control_id, r.status) for r in found] == [
            ("DE-1", "translated"), ("DE-2", "failed"), ("DE-3", "translated")]
        assert "could not be stored (DataError" in found[1].error_reason
    finally:
        engine.dispose()


class _FaultyStep:
    """A translation step (the prescription flow's place) with a fault of ours on one message,
    or, with `outage`, a database that goes away."""

    def __init__(self, faulty: str, outage: Exception | None = None):
        self.faulty = faulty
        self.outage = outage

    def involves(self, pending, record) -> bool:
        return False

    def prepare(self, results):
        if self.outage is not None:
            raise self.outage
        if any(item.key[2] == self.faulty and not record.failed for item, record in results):
            raise OverflowError("date value out of range")  # as the flow, it skips failed ones

    def apply(self, connection, results, prepared, now) -> None:
        pass


def test_a_fault_of_the_step_on_one_message_fails_that_message_not_its_batch(engine, tmp_path):
    """An exception the step did not expect on one message (a handover date at year 9999 once
    raised OverflowError in the prescription flow) fails that message, kept for replay: it
    used to fail the batch as if the database were away, then every sweep after it, holding
    back every message received since. A database outage still fails the batch, retried."""
    import sqlalchemy.exc

    from gateway.translation.service import TranslationJob, TranslationWorker

    items = _stored(engine, [hl7("SF-1"), hl7("SF-2"), hl7("SF-3")])
    translator = Translator(MappingSet.load(write_mappings(tmp_path / "mappings")))
    worker = TranslationWorker(engine, translator, lambda f, *a: f(*a), linger=0, step=_FaultyStep("SF-2"))
    worker._process([TranslationJob(items)])
    with engine.connect() as conn:
        found = conn.execute(text("SELECT m.control_id, t.status, t.error_code, t.error_reason FROM messages m "
                                  "JOIN translations t ON t.message_id = m.id ORDER BY m.id")).all()
    assert [(r.control_id, r.status) for r in found] == [
        ("SF-1", "translated"), ("SF-2", "failed"), ("SF-3", "translated")]
    assert found[1].error_code == 207
    assert found[1].error_reason == ("the translation could not be stored: internal error in the gateway "
                                     "(OverflowError); report it, then replay once the gateway is fixed")

    more = _stored(engine, [hl7("SF-4")])
    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    worker = TranslationWorker(engine, translator, lambda f, *a: f(*a), linger=0, step=_FaultyStep("", lost))
    with pytest.raises(sqlalchemy.exc.OperationalError):
        worker._store([(more[0], translator.translate(more[0]))])
    assert message_ids(engine.connect(), "received") == [more[0].message_id]


def _stored(engine, raws: list[bytes]):
    """Store messages as the ingest writer does; their Pending items, as the live path hands
    them over."""
    from adapters.hl7v2.ack import AckBuilder
    from gateway.ingest.inspect import IngestPolicy, Inspector
    from gateway.ingest.pipeline import pending_translations

    inspector = Inspector(AckBuilder(), IngestPolicy("t"))
    writer = IngestWriter(engine, lambda f, *a: f(*a), lambda item: None)
    writer.start()
    job = IngestJob([inspector.message(raw) for raw in raws], "t", "peer", 1_700_000_000.0,
                    lambda job, error: None)
    writer.submit(job)
    writer.stop()
    return pending_translations(job)


def test_the_sweep_reads_waiting_messages_through_the_partial_index(db_url):
    """The sweep's queries name the index's predicate, so that the planner can use it rather
    than walk every message (tens of millions on a national node) when none is waiting."""
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql, sqlite

    from gateway.store.schema import messages
    from gateway.store.translations import _status_is

    engine = create_gateway_engine(db_url)
    migrate(engine)
    query = select(messages.c.id).where(_status_is("received"), messages.c.id > 0).order_by(messages.c.id).limit(5)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                sql = str(query.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
                plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
            else:
                sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = " ".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql))
        assert "ix_messages_untranslated" in plan, plan
    finally:
        engine.dispose()


def _until(condition, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_replay_after_a_mapping_fix_turns_failed_into_translated(db_url, tmp_path):
    """A message failed for want of a map; after the map is added, replaying it translates it."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    from adapters.hl7v2.ack import AckBuilder
    from gateway.ingest.inspect import IngestPolicy, Inspector

    inspector = Inspector(AckBuilder(), IngestPolicy("t"))
    writer = IngestWriter(engine, lambda f, *a: f(*a), lambda item: None)
    writer.start()
    writer.submit(IngestJob([inspector.message(hl7("R-1", kind="ORU^R01^ORU_R01"))], "t", "peer",
                            1_700_000_000.0, lambda job, error: None))
    writer.stop()
    directory = write_mappings(tmp_path / "mappings")
    with engine.begin() as conn:
        ids = message_ids(conn, "received")
        pending = messages_by_id(conn, ids)
        translator = Translator(MappingSet.load(directory))
        save_translations(conn, [(item, translator.translate(item)) for item in pending])
        assert message_ids(conn, "failed") == ids
        assert get_translation(conn, ids[0]).error_location == "MSH[1]-9"

    write_mappings(directory, ORU_FIX)
    fixed = MappingSet.load(directory)
    with engine.begin() as conn:
        translator = Translator(fixed)
        save_translations(conn, [(item, translator.translate(item)) for item in messages_by_id(conn, ids)])
    with engine.begin() as conn:
        assert message_ids(conn, "translated") == ids
        stored = get_translation(conn, ids[0])
        assert (stored.status, stored.mapping_version, stored.error_reason) == ("translated", fixed.version, None)
        assert stored.bundle["entry"][0]["resource"]["resourceType"] == "Patient"
        # Translating again (a second node, a second replay) leaves one row.
        save_translations(conn, [(item, translator.translate(item)) for item in messages_by_id(conn, ids)])
        assert conn.exec_driver_sql("SELECT count(*) FROM translations").scalar() == 1
    engine.dispose()


@pytest_twisted.inlineCallbacks
def test_of_two_reloads_the_later_decides_even_when_the_earlier_finishes_last(
        make_config, running_gateway, tmp_path, monkeypatch):
    """Two SIGHUPs a second apart: the first read is slow (its thread is held here), the
    second reads the newer files and is used; the first, finishing last, must not put its
    older set back."""
    import threading

    from twisted.internet import reactor, threads

    directory = write_mappings(tmp_path / "mappings")
    config = with_mappings(make_config(f"sqlite:///{tmp_path / 'gw.sqlite'}"), directory)
    yield running_gateway(config)
    translation = running_gateway_service(reactor).getServiceNamed("translation")
    load, read, held = MappingSet.load, threading.Event(), threading.Event()
    calls = []

    def slow_first_load(cls, path):
        calls.append(path)
        found = load(path)  # the files as they are now
        if len(calls) == 1:
            read.set()
            held.wait(10)
        return found

    monkeypatch.setattr(MappingSet, "load", classmethod(slow_first_load))
    first = translation.reload()
    yield threads.deferToThread(read.wait, 10)  # the first has read the files as they were
    write_mappings(directory, ORU_FIX)
    second = yield translation.reload()
    newer = translation.mappings.version
    held.set()
    assert second is True and (yield first) is False
    assert translation.mappings.version == newer and "ORU^R01" in translation.mappings.message_types()


@pytest_twisted.inlineCallbacks
def test_reload_refuses_a_broken_set_and_keeps_the_old_one(make_config, running_gateway, tmp_path, caplog):
    """reload() with a broken file logs every problem and keeps translating with the old set;
    after the fix, reload() takes the new set (ORU^R01 now translates)."""
    from twisted.internet import reactor

    directory = write_mappings(tmp_path / "mappings")
    db_url = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    config = with_mappings(make_config(db_url), directory)
    yield running_gateway(config)
    service = running_gateway_service(reactor)
    translation = service.getServiceNamed("translation")
    old = translation.mappings.version
    (directory / "segments" / "PID.Patient.yaml").write_text(
        "resource: Patient\nmap:\n  birthDat: {from: PID-7}\n  gender: {from: PID-8, transform: dat}\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="gateway.translation.service"):
        replaced = yield translation.reload()
    assert replaced is False and translation.mappings.version == old
    text = caplog.text
    assert "refused" in text and "birthDat" in text and "no transform 'dat'" in text

    write_mappings(directory, ORU_FIX)
    replaced = yield translation.reload()
    assert replaced is True and translation.mappings.version != old
    assert "ORU^R01" in translation.mappings.message_types()


def running_gateway_service(reactor):
    """The service tree the running_gateway fixture started (it keeps it to itself)."""
    import gc

    from twisted.application.service import MultiService

    trees = [o for o in gc.get_objects() if isinstance(o, MultiService) and o.running
             and "translation" in getattr(o, "namedServices", {})]
    assert trees, "no running gateway service tree"
    return trees[-1]


def test_conformance_validation_per_sender(tmp_path):
    """validation off: hl7apy never runs; warn: its finding is a warning; reject: a failure."""
    from gateway.store.translations import Pending
    from gateway.translation import conformance

    directory = write_mappings(tmp_path / "mappings")
    mappings = MappingSet.load(directory)
    # PID-7 as a date of the wrong type for strict validation: 'X' in a TS/DTM field.
    raw = hl7("V-1", birth="1985071X", facility="FAC_V")
    calls = []
    original = conformance.check

    def spy(message):
        calls.append(1)
        return original(message)

    conformance.check = spy
    try:
        results = {}
        for level in ("off", "warn", "reject"):
            sender = SenderConfig(id="V", name="v", type="hospital", facilities=("FAC_V",), validation=level)
            translator = Translator(mappings, [sender])
            results[level] = translator.translate(Pending(1, None, raw, "utf-8", "hl7v2", "V",
                                                          datetime.now(timezone.utc)))
            if level == "off":
                assert calls == []
    finally:
        conformance.check = original
    assert len(calls) == 2
    assert results["off"].warnings == [] and results["off"].failed  # the date transform refuses it
    assert results["warn"].warnings and "HL7 conformance" in results["warn"].warnings[0]
    assert results["reject"].failed and "HL7 conformance" in results["reject"].error_reason
    # ADT^A01 in 2.5 requires EVN and PV1, which the short test message leaves out.
    msh, pid, _ = hl7("V-2", facility="FAC_V").split(b"\r")
    conformant = b"\r".join([msh, b"EVN|A01|20250114083512", pid, b"PV1|1|I", b""])
    good = Translator(mappings, [dataclasses.replace(sender, validation="reject")]).translate(
        Pending(1, None, conformant, "utf-8", "hl7v2", "V", datetime.now(timezone.utc)))
    assert not good.failed and good.warnings == []


def test_error_locations_for_err2():
    """Engine locations and ERL text become ERR-2 locations; anything else points at the MSH."""
    assert location_of("PID[1]-7").components() == ["PID", "1", "7"]
    assert location_of("OBX[2]-5.1").components() == ["OBX", "2", "5", "1", "1"]
    assert location_of("PID[1]").components() == ["PID", "1"]
    assert location_of("MSH^1^18").components() == ["MSH", "1", "18"]
    assert location_of("map.birthDate").components() == ["MSH", "1"]
    assert location_of(None).components() == ["MSH", "1"]


@pytest_twisted.inlineCallbacks
def test_ack_after_translation_a_copy_sent_while_translating_gets_the_originals_answer(
        db_url, make_config, running_gateway, tmp_path, monkeypatch):
    """ack_after: translation: a sender that gave up waiting and re-sent the message while its
    translation is still under way (alone, then inside a batch) gets the original's AE, not the
    AA stored at commit, which was never the answer."""
    import threading
    import time

    directory = write_mappings(tmp_path / "mappings")
    config = make_config(db_url, mllp=[dict(name="mllp-test", accept_unknown_senders=True,
                                            ack_after="translation")])
    ports = yield running_gateway(with_mappings(config, directory))
    held, entered = threading.Event(), threading.Event()
    translate = Translator.translate

    def held_translate(self, item):
        entered.set()
        held.wait(10)
        return translate(self, item)

    monkeypatch.setattr(Translator, "translate", held_translate)
    bad = hl7("W-1", birth="19851399")
    batch = (b"BHS|^~\\&|HIS_TEST|FAC_TEST|||20250114083512||||B-1\r" + bad + hl7("W-2")
             + b"BTS|2\r")
    first = threads.deferToThread(send, ports["mllp-test"], bad)
    yield threads.deferToThread(entered.wait, 10)
    copy = threads.deferToThread(send, ports["mllp-test"], bad)
    in_batch = threads.deferToThread(send, ports["mllp-test"], batch)
    yield threads.deferToThread(time.sleep, 0.5)  # both copies stored as duplicates meanwhile
    held.set()
    [original] = yield first
    [again] = yield copy
    [answers] = yield in_batch
    assert describe(original)["msa1"] == "AE" and err_fields(original)[2] == "PID^1"
    assert again == original
    acks = answers.split(b"MSH|")[1:]
    assert b"MSH|" + acks[0] == original and b"|MSA|AA|W-2" in b"|" + acks[1].replace(b"\r", b"|")
    [row] = rows(db_url, "SELECT ack FROM messages WHERE control_id = 'W-1'")
    assert bytes(row.ack) == original


@pytest.mark.parametrize("sample, format", [("astm-cbc-chu-rabat.astm", "astm"),
                                            ("pharmacy-dispense-rabat.csv", "csv")])
def test_conformance_validation_leaves_astm_and_csv_alone(repo_mappings, sample, format):
    """HL7 conformance is for HL7 v2: a sender validating at 'reject' still has its ASTM
    records and CSV exports translated (hl7apy cannot read them: it refused every one)."""
    from gateway.store.translations import Pending

    raw = (Path(__file__).resolve().parent.parent / "mappings" / "tests" / "legacy" / sample).read_bytes()
    for level in ("warn", "reject"):
        sender = SenderConfig(id="L", name="l", type="laboratory", facilities=("FAC_L",), validation=level)
        record = Translator(repo_mappings, [sender]).translate(
            Pending(1, None, raw, None, format, "L", datetime.now(timezone.utc)))
        assert not record.failed, record.error_reason
        assert not any("HL7 conformance" in warning for warning in record.warnings)


class _ReadingStep:
    """A step that reads the bytes of every message it is given, as the prescription flow does
    (its ORC segments)."""

    def __init__(self):
        self.seen: list[int] = []

    def involves(self, pending, record) -> bool:
        return b"ORC|" in pending.raw

    def prepare(self, results):
        return [pending.raw.count(b"ORC|") for pending, _ in results]

    def apply(self, connection, results, prepared, now) -> None:
        self.seen.extend(pending.message_id for pending, _ in results if b"PID|" in pending.raw)


def test_a_message_whose_payload_expired_before_its_translation_is_stored_failed(engine, tmp_path):
    """Retention removed the payload of a message still 'received' (translation was off, or
    down, for longer than raw_payloads' days): the sweep stores it as failed, saying why. It
    used to be left 'received' for good, and the stale check warned about it, and swept
    for nothing, every minute."""
    from gateway.store.translations import oldest_untranslated
    from gateway.translation.service import TranslationWorker
    from gateway.translation.translator import PAYLOAD_EXPIRED

    expired, kept = _stored(engine, [hl7("EX-1"), hl7("EX-2")])
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM message_payloads WHERE message_id = :id"),
                           {"id": expired.message_id})
    step = _ReadingStep()
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), linger=0, step=step)
    worker.start(sweep=True)
    try:
        assert _until(lambda: worker.translated + worker.failed == 2, 10.0)
    finally:
        worker.stop()
    with engine.connect() as connection:
        stored = connection.execute(text(
            "SELECT m.control_id, m.status, t.error_code, t.error_reason FROM messages m "
            "JOIN translations t ON t.message_id = m.id ORDER BY m.id")).all()
        assert oldest_untranslated(connection) is None
    assert [tuple(row) for row in stored] == [("EX-1", "failed", 207, PAYLOAD_EXPIRED),
                                              ("EX-2", "translated", None, None)]
    assert step.seen == [kept.message_id]


def test_ack_after_translation_answers_ae_when_a_sweep_stored_the_failure_first(engine, tmp_path):
    """A sweep (the start sweep between live jobs, another node's stale sweep) stored a failed
    translation first, with the AA of the commit; the live path, answering under ack_after:
    translation, answers with its AE and stores it, for re-sent copies: it used to answer AA
    for a message whose translation failed. A stored success or a stored AE stands."""
    from gateway.store.translations import Pending
    from gateway.translation.service import TranslationJob, TranslationWorker

    failing, good = _stored(engine, [hl7("SW-1", birth="1985XX"), hl7("SW-2")])
    worker = TranslationWorker(engine, Translator(MappingSet.load(write_mappings(tmp_path / "mappings"))),
                               lambda f, *a: f(*a), linger=0)
    swept = [Pending(item.message_id, None, item.raw, item.codec, item.format, item.sender_id,
                     item.received_at, item.message_type) for item in (failing, good)]
    worker._store([(item, worker._translate(item)) for item in swept])

    def ae(pending, record) -> bytes:
        return b"MSH|^~\\&|GW|HIE|||20250114083512||ACK|A-" + pending.key[2].encode() + \
            b"|P|2.5\rMSA|AE|" + pending.key[2].encode() + b"\r"

    job = TranslationJob([failing, good], lambda job: None, on_failure=ae)
    worker._process([job])
    assert job.error is None
    assert [record.status for record in job.results] == ["failed", "translated"]
    assert job.results[0].ack == ae(failing, None)
    assert job.results[1].ack == good.context.ack  # the stored AA of its success
    stored = rows_of(engine, "SELECT ack_code, ack FROM messages ORDER BY id")
    assert [(code, bytes(ack)) for code, ack in stored] == [("AE", ae(failing, None)),
                                                            ("AA", good.context.ack)]
    again = TranslationJob([failing], lambda job: None,
                           on_failure=lambda pending, record: ae(pending, record).replace(b"A-", b"B-"))
    worker._process([again])
    assert again.results[0].ack == ae(failing, None)  # an AE stored stands


def rows_of(engine, sql: str) -> list[tuple]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql))]

"""Retention runs on real SQLite and PostgreSQL: messages stored over half a year, each kind
expired after its days, the message index kept, the readers seeing what expired, the audit
trail still verifiable; on PostgreSQL whole monthly partitions dropped and one node at a time;
on SQLite the file given back its pages."""
from __future__ import annotations

import hashlib
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text

from gateway.audit.chain import AuditEvent
from gateway.audit.trail import EXPIRED, AuditTrail
from gateway.config import RetentionConfig
from gateway.retention.partitions import ensure_partitions, partitions_of
from gateway.retention.run import RUN_LOCK, run_retention
from gateway.store.database import create_gateway_engine, migrate
from gateway.store.queries import get_message
from gateway.store.schema import (audit_log, canonical_bundles, deliveries, message_payloads,
                                  messages, patient_identifiers, translations)
from gateway.store.translations import get_translation


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


NOW = utc(2026, 6, 15, 3, 0)
# One message (and one audit record) at each instant; on PostgreSQL January, March, April and
# May have partitions, February's rows sit in the DEFAULT partition, and June's are moved out
# of it when the run creates the month.
TIMES = [utc(2026, 1, 5), utc(2026, 1, 20), utc(2026, 2, 10), utc(2026, 3, 3), utc(2026, 3, 25),
         utc(2026, 4, 10), utc(2026, 4, 20), utc(2026, 5, 5), utc(2026, 5, 20), utc(2026, 6, 10)]
MONTHS_WITH_PARTITIONS = [utc(2026, 1, 1), utc(2026, 3, 1), utc(2026, 4, 1), utc(2026, 5, 1)]
CONFIG = RetentionConfig(raw_payloads=60, canonical=30, audit=90, batch_size=2)


def store_messages(engine, times, raw: bytes = b"MSH|^~\\&|HIS|FAC|GW|MA|x||ADT^A01|C|P|2.5\r",
                   start_id: int = 1) -> list[int]:
    """A message with its payload, translation, bundle and delivery at each of `times`."""
    ids = list(range(start_id, start_id + len(times)))
    with engine.begin() as conn:
        conn.execute(messages.insert(), [dict(
            id=i, received_at=at, listener="mllp-test", sha256=hashlib.sha256(raw).digest(),
            size=len(raw), truncated=False, status="translated", accepted=True,
            control_id=f"RET-{i}", sending_application="HIS", sending_facility="FAC",
            message_type="ADT^A01") for i, at in zip(ids, times)])
        conn.execute(message_payloads.insert(), [dict(message_id=i, received_at=at, raw=raw)
                                                 for i, at in zip(ids, times)])
        conn.execute(translations.insert(), [dict(message_id=i, status="translated",
                                                  mapping_version="v1", translated_at=at)
                                             for i, at in zip(ids, times)])
        conn.execute(canonical_bundles.insert(), [dict(
            message_id=i, received_at=at, bundle='{"resourceType":"Bundle","type":"collection"}')
            for i, at in zip(ids, times)])
        conn.execute(patient_identifiers.insert(), [dict(
            message_id=i, received_at=at, system="urn:ma:cnie", value=f"RET{i}")
            for i, at in zip(ids, times)])
        conn.execute(deliveries.insert(), [dict(
            message_id=i, destination="record", patient_key=f"m{i}", status="delivered",
            idempotency_key=f"k{i}", bundle_sha256="0" * 64, created_at=at, next_attempt_at=at,
            attempts=1, finished_at=at) for i, at in zip(ids, times)])
    return ids


def audit_records(trail, times):
    return trail.append([AuditEvent("message.received", "INPE-100001", subject=f"message/{n}",
                                    detail={"control_id": f"RET-{n}"}, at=at)
                         for n, at in enumerate(times, 1)])


def count(engine, table, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar()


def times_of(engine, column) -> list[datetime]:
    with engine.connect() as conn:
        rows = conn.execute(select(column).order_by(column)).scalars()
        return [t.replace(tzinfo=timezone.utc) if t.tzinfo is None else t.astimezone(timezone.utc)
                for t in rows]


def prepare_partitions(engine):
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            for month in MONTHS_WITH_PARTITIONS:
                ensure_partitions(conn, month, months_ahead=0)


def test_each_kind_expires_after_its_days_and_the_index_stays(engine):
    prepare_partitions(engine)
    ids = store_messages(engine, TIMES)
    trail = AuditTrail(engine, "node-1")
    records = audit_records(trail, TIMES)
    postgresql = engine.dialect.name == "postgresql"

    report = run_retention(engine, CONFIG, NOW, trail)

    kinds = {k.kind: k for k in report.kinds}
    assert report.skipped is None
    if postgresql:
        # Whole months: before the first day of the month of now - days.
        payload_before, bundle_before, audit_before = utc(2026, 4, 1), utc(2026, 5, 1), utc(2026, 3, 1)
        assert kinds["raw_payloads"].partitions == ("message_payloads_2026_01", "message_payloads_2026_03")
        assert kinds["raw_payloads"].rows == 1  # February's, from the DEFAULT partition
        # The bundles' patient identifiers go with them.
        assert kinds["canonical"].partitions == (
            "canonical_bundles_2026_01", "canonical_bundles_2026_03", "canonical_bundles_2026_04",
            "patient_identifiers_2026_01", "patient_identifiers_2026_03", "patient_identifiers_2026_04")
        assert kinds["canonical"].rows == 2  # February's bundle and identifier, from DEFAULT
        assert kinds["audit"].partitions == ("audit_log_2026_01",)
        assert set(report.created) >= {"message_payloads_2026_06", "audit_log_2026_08"}
        with engine.connect() as conn:
            names = set(conn.execute(text("SELECT relname FROM pg_class WHERE relkind IN ('r', 'p')"))
                        .scalars())
            assert not {"message_payloads_2026_01", "message_payloads_2026_03",
                        "canonical_bundles_2026_04", "audit_log_2026_01"} & names
            assert {"message_payloads_2026_04", "message_payloads_2026_05", "message_payloads_2026_06",
                    "canonical_bundles_2026_05", "audit_log_2026_03"} <= names
            assert set(partitions_of(conn, "message_payloads")) == {
                "message_payloads_default", "message_payloads_2026_04", "message_payloads_2026_05",
                "message_payloads_2026_06", "message_payloads_2026_07", "message_payloads_2026_08"}
            # June's row was moved out of the DEFAULT partition when the month was created.
            assert conn.execute(text("SELECT count(*) FROM message_payloads_2026_06")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM message_payloads_default")).scalar() == 0
    else:
        payload_before, bundle_before, audit_before = utc(2026, 4, 16, 3), utc(2026, 5, 16, 3), utc(2026, 3, 17, 3)
        assert kinds["raw_payloads"].partitions == () and report.vacuum is not None
    expected_payloads = [t for t in TIMES if t >= payload_before]
    assert times_of(engine, message_payloads.c.received_at) == expected_payloads
    assert times_of(engine, canonical_bundles.c.received_at) == [t for t in TIMES if t >= bundle_before]
    assert times_of(engine, patient_identifiers.c.received_at) == [t for t in TIMES if t >= bundle_before]
    assert kinds["raw_payloads"].before == payload_before
    assert kinds["raw_payloads"].cutoff == NOW - timedelta(days=60)

    # The message index stays whole.
    assert count(engine, messages) == count(engine, translations) == count(engine, deliveries) == len(TIMES)

    # The readers see what expired.
    with engine.connect() as conn:
        old, recent = get_message(conn, ids[0]), get_message(conn, ids[-1])
        assert old is not None and old.raw is None and old.as_dict()["payload_expired"] is True
        assert recent.raw is not None and recent.as_dict()["payload_expired"] is False
        assert get_translation(conn, ids[0]).bundle is None
        assert get_translation(conn, ids[-1]).bundle == {"resourceType": "Bundle", "type": "collection"}

    # The audit trail: the records before the cutoff are gone, an anchor vouches for them, and
    # each kind's expiry is recorded.
    expired = [r for r in records if r.at < audit_before]
    assert kinds["audit"].through_seq == expired[-1].seq
    assert kinds["audit"].rows == len(expired)
    remaining = count(engine, audit_log, audit_log.c.action == "message.received")
    assert remaining == len(records) - len(expired)
    verification = trail.verify(batch=3)
    assert verification.intact, [str(f) for f in verification.findings]
    assert verification.first_seq == expired[-1].seq + 1
    assert verification.expired_through == expired[-1].seq
    with engine.connect() as conn:
        told = {r.detail["kind"]: r.detail for r in trail.records(conn) if r.action == EXPIRED}
    assert told["audit"]["through_seq"] == expired[-1].seq
    assert told["audit"]["last_hash"] == expired[-1].hash
    assert told["raw_payloads"]["rows"] == kinds["raw_payloads"].rows
    assert told["canonical"]["partitions"] == list(kinds["canonical"].partitions)
    assert "recorded before" in "\n".join(report.lines())

    # A second run at the same instant finds nothing more to do, and records nothing.
    again = run_retention(engine, CONFIG, NOW, trail)
    assert all(k.rows == 0 and not k.partitions for k in again.kinds)
    assert count(engine, audit_log, audit_log.c.action == EXPIRED) == 3
    assert trail.verify().intact


def test_a_kind_without_days_is_kept_forever(engine):
    prepare_partitions(engine)
    store_messages(engine, TIMES)
    trail = AuditTrail(engine, "node-1")
    audit_records(trail, TIMES)
    report = run_retention(engine, RetentionConfig(raw_payloads=60), NOW, trail)
    kinds = {k.kind: k for k in report.kinds}
    assert kinds["canonical"].days is None and kinds["audit"].days is None
    assert "canonical     kept forever" in "\n".join(report.lines())
    assert count(engine, canonical_bundles) == len(TIMES)
    assert count(engine, audit_log, audit_log.c.action == "message.received") == len(TIMES)
    assert count(engine, message_payloads) < len(TIMES)
    assert trail.verify().intact


def test_another_run_later_expires_more_and_the_trail_stays_verifiable(engine):
    prepare_partitions(engine)
    store_messages(engine, TIMES)
    trail = AuditTrail(engine, "node-1")
    audit_records(trail, TIMES)
    run_retention(engine, CONFIG, NOW, trail)
    later = run_retention(engine, CONFIG, NOW + timedelta(days=60), trail)
    assert {k.kind: k for k in later.kinds}["audit"].through_seq is not None
    verification = trail.verify()
    assert verification.intact, [str(f) for f in verification.findings]
    # Two anchors; the second one vouches for the new start.
    with engine.connect() as conn:
        anchors = [r for r in trail.records(conn) if r.action == EXPIRED and r.detail["kind"] == "audit"]
    assert len(anchors) == 2 and verification.first_seq == anchors[1].detail["through_seq"] + 1


def test_audit_records_the_atna_export_has_not_sent_are_kept(engine):
    """With an ATNA export configured, expiry never goes past what its collector was sent:
    nothing while it has been sent nothing, up to its last_seq while it lags (the months are
    then not dropped), everything due once it caught up; the trail verifies throughout."""
    from gateway.store.schema import audit_exports

    prepare_partitions(engine)
    trail = AuditTrail(engine, "node-1")
    audit_records(trail, TIMES)
    collector = "atna.sante.gov.ma:6514"

    def audit_report(now=NOW):
        report = run_retention(engine, CONFIG, now, trail, exports=(collector,))
        return {k.kind: k for k in report.kinds}["audit"]

    def sent(seq):
        with engine.begin() as conn:
            conn.execute(audit_exports.delete())
            conn.execute(audit_exports.insert().values(collector=collector, last_seq=seq, updated_at=NOW))

    nothing_sent = audit_report()
    assert (nothing_sent.through_seq, nothing_sent.held_after, nothing_sent.rows) == (None, 0, 0)
    assert count(engine, audit_log, audit_log.c.action != EXPIRED) == len(TIMES)
    assert "kept until the ATNA export has sent them" in nothing_sent.line()

    sent(2)
    lagging = audit_report()
    assert (lagging.through_seq, lagging.held_after, lagging.partitions) == (2, 2, ())
    with engine.connect() as conn:
        assert min(r.seq for r in trail.records(conn)) == 3
    assert trail.verify().intact

    sent(100)
    caught_up = audit_report()
    expected = 3 if engine.dialect.name == "postgresql" else 4  # a whole month / the day
    assert (caught_up.through_seq, caught_up.held_after) == (expected, None)
    assert trail.verify().intact


# -- PostgreSQL: one node at a time ----------------------------------------------------------


@pytest.fixture
def pg_engine(pg_url):
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    yield engine
    engine.dispose()


def test_a_run_skips_while_another_node_holds_the_lock(pg_engine):
    store_messages(pg_engine, TIMES)
    with pg_engine.connect() as other:  # another node's run, in progress
        assert other.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": RUN_LOCK}).scalar()
        report = run_retention(pg_engine, CONFIG, NOW)
        assert report.skipped == "another node is running retention" and report.kinds == ()
        assert "skipped: another node is running retention" in report.lines()[0]
        assert count(pg_engine, message_payloads) == len(TIMES)
        other.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RUN_LOCK})
    assert run_retention(pg_engine, CONFIG, NOW).skipped is None
    assert count(pg_engine, message_payloads) < len(TIMES)


def test_two_concurrent_runs_one_skips(pg_engine):
    prepare_partitions(pg_engine)
    store_messages(pg_engine, TIMES)
    reports = {}
    # Hold the first run up inside its work (creating June's partition waits for this lock),
    # start the second meanwhile, then let the first go on.
    with pg_engine.connect() as blocker:
        blocker.execute(text("LOCK TABLE message_payloads IN SHARE UPDATE EXCLUSIVE MODE"))
        first = threading.Thread(target=lambda: reports.setdefault(
            "first", run_retention(pg_engine, CONFIG, NOW, AuditTrail(pg_engine, "node-1"))))
        first.start()
        deadline = time.monotonic() + 30
        while not _advisory_lock_held(pg_engine):
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.02)
        reports["second"] = run_retention(pg_engine, CONFIG, NOW, AuditTrail(pg_engine, "node-2"))
        blocker.rollback()
    first.join(30)
    assert reports["second"].skipped == "another node is running retention"
    assert reports["first"].skipped is None
    assert {k.kind: k for k in reports["first"].kinds}["raw_payloads"].partitions == (
        "message_payloads_2026_01", "message_payloads_2026_03")


def _advisory_lock_held(engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = :k"), {"k": RUN_LOCK}).scalar())


# -- SQLite: the file shrinks ----------------------------------------------------------------


def test_sqlite_file_shrinks_after_expiring_many_payloads(tmp_path):
    path = tmp_path / "gateway.sqlite"
    engine = create_gateway_engine(f"sqlite:///{path}")
    migrate(engine)
    old = [utc(2026, 1, 1) + timedelta(minutes=n) for n in range(600)]
    store_messages(engine, old + [utc(2026, 6, 1)], raw=os.urandom(8000))
    engine.dispose()  # checkpoint: the file holds it all
    full = path.stat().st_size

    engine = create_gateway_engine(f"sqlite:///{path}")
    report = run_retention(engine, RetentionConfig(raw_payloads=30, batch_size=100), NOW,
                           AuditTrail(engine, "node-1"))
    engine.dispose()
    assert {k.kind: k for k in report.kinds}["raw_payloads"].rows == 600
    assert report.vacuum is not None and not report.vacuum.converted
    assert report.vacuum.bytes > 600 * 8000
    assert path.stat().st_size < full - 600 * 8000, (full, path.stat().st_size)


def test_sqlite_made_before_auto_vacuum_is_converted_once(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as old:  # a database from before: auto_vacuum none, fixed by a table
        old.execute("CREATE TABLE early (x)")
    engine = create_gateway_engine(f"sqlite:///{path}")
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA auto_vacuum")).scalar() == 0
    store_messages(engine, [utc(2026, 1, 1) + timedelta(minutes=n) for n in range(50)], raw=os.urandom(8000))
    first = run_retention(engine, RetentionConfig(raw_payloads=30), NOW)
    second = run_retention(engine, RetentionConfig(raw_payloads=30), NOW)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA auto_vacuum")).scalar() == 2
    engine.dispose()
    assert first.vacuum.converted and not second.vacuum.converted
    assert "converted the database to auto_vacuum=INCREMENTAL" in "\n".join(first.lines())


def test_a_new_sqlite_database_is_incremental(tmp_path):
    engine = create_gateway_engine(f"sqlite:///{tmp_path / 'new.sqlite'}")
    migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA auto_vacuum")).scalar() == 2
    engine.dispose()


def test_a_stop_ends_the_batches_early_and_the_next_run_goes_on(tmp_path):
    engine = create_gateway_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    migrate(engine)
    store_messages(engine, [utc(2026, 1, 1) + timedelta(minutes=n) for n in range(20)])
    stop = threading.Event()
    stop.set()
    config = RetentionConfig(raw_payloads=30, batch_size=5)
    stopped = run_retention(engine, config, NOW, stop=stop)
    assert {k.kind: k for k in stopped.kinds}["raw_payloads"].rows == 5
    assert count(engine, message_payloads) == 15
    run_retention(engine, config, NOW)
    assert count(engine, message_payloads) == 0
    engine.dispose()


def test_a_stopped_audit_expiry_on_postgresql_leaves_a_verifiable_trail(pg_engine):
    # Many records of February in the DEFAULT partition, January's in its partition: a run
    # stopped after its first batch leaves the trail starting inside the announced range.
    prepare_partitions(pg_engine)
    trail = AuditTrail(pg_engine, "node-1")
    february = [utc(2026, 1, 20)] + [utc(2026, 2, 1) + timedelta(minutes=i) for i in range(9)]
    audit_records(trail, february + TIMES[3:])
    stop = threading.Event()
    stop.set()
    first = {k.kind: k for k in run_retention(pg_engine, CONFIG, NOW, trail, stop).kinds}["audit"]
    assert first.partitions == ("audit_log_2026_01",) and first.through_seq == 10
    assert 0 < count(pg_engine, audit_log, audit_log.c.seq <= 10) < 9  # a batch of two went
    assert trail.verify().intact
    run_retention(pg_engine, CONFIG, NOW, trail)
    assert count(pg_engine, audit_log, audit_log.c.seq <= 10) == 0
    assert trail.verify().intact

"""Monthly partitions: their names and bounds (pure), and ensure_partitions on a real
PostgreSQL: idempotent, correct when the DEFAULT partition already holds rows of the month,
not blocking writes to the other months, leaving a month whose lock is not granted for later."""
from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from gateway.retention import partitions
from gateway.retention.partitions import (Month, ensure_partitions, month_of_partition,
                                          months_from, partition_name, partitions_of)
from gateway.store.database import create_gateway_engine, migrate
from gateway.store.schema import message_payloads, messages


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


def test_names_and_bounds_of_months():
    november = Month.of(utc(2026, 11, 30, 23, 59, 59))
    assert partition_name("message_payloads", november) == "message_payloads_2026_11"
    assert (november.start, november.end) == (utc(2026, 11, 1), utc(2026, 12, 1))
    december = november.next()
    assert (december.start, december.end) == (utc(2026, 12, 1), utc(2027, 1, 1))
    assert str(december) == "2026-12"
    # An instant is placed by its UTC month, whatever its zone.
    from zoneinfo import ZoneInfo
    assert Month.of(datetime(2026, 12, 1, 0, 30, tzinfo=ZoneInfo("Africa/Casablanca"))) == november
    assert Month.of(datetime(2026, 12, 1, 0, 30)) == december  # naive: UTC
    assert months_from(utc(2026, 11, 22), 3) == [Month(2026, 11), Month(2026, 12), Month(2027, 1)]


def test_month_of_a_partition_name():
    assert month_of_partition("audit_log", "audit_log_2027_01") == Month(2027, 1)
    assert month_of_partition("audit_log", "audit_log_default") is None
    assert month_of_partition("audit_log", "audit_log_2027_13") is None
    assert month_of_partition("audit_log", "message_payloads_2027_01") is None
    assert month_of_partition("audit_log", "audit_log_2027_01_old") is None


def test_nothing_to_do_on_sqlite(tmp_path):
    engine = create_gateway_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    migrate(engine)
    with engine.connect() as conn:
        assert ensure_partitions(conn, utc(2026, 11, 22)) == []
    engine.dispose()


@pytest.fixture
def engine(pg_url):
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    yield engine
    engine.dispose()


def add_payloads(conn, *times):
    first = conn.execute(text("SELECT coalesce(max(id), 0) FROM messages")).scalar() + 1
    for n, at in enumerate(times, first):
        conn.execute(messages.insert().values(
            id=n, received_at=at, listener="t", sha256=hashlib.sha256(b"%d" % n).digest(), size=1,
            truncated=False, status="received", accepted=True, control_id=f"P{n}"))
        conn.execute(message_payloads.insert().values(message_id=n, received_at=at, raw=b"x"))


# The partitioned tables, in the order ensure_partitions goes through them.
TABLES = ("message_payloads", "canonical_bundles", "patient_identifiers", "audit_log")


def where_rows_are(conn) -> dict[str, int]:
    return dict(conn.execute(text(
        "SELECT tableoid::regclass::text, count(*) FROM message_payloads GROUP BY 1")).all())


def test_ensure_creates_the_months_ahead_once(engine):
    with engine.connect() as conn:
        created = ensure_partitions(conn, utc(2026, 11, 22))
        assert created == [f"{table}_{month}" for table in TABLES for month in ("2026_11", "2026_12", "2027_01")]
        assert ensure_partitions(conn, utc(2026, 11, 22)) == []
        assert ensure_partitions(conn, utc(2026, 12, 2), months_ahead=2) == [
            f"{table}_2027_02" for table in TABLES]
        conn.execute(text("SET TIME ZONE 'UTC'"))
        bounds = conn.execute(text(
            "SELECT pg_get_expr(relpartbound, oid) FROM pg_class WHERE relname = 'audit_log_2026_12'"
        )).scalar()
        assert bounds == "FOR VALUES FROM ('2026-12-01 00:00:00+00') TO ('2027-01-01 00:00:00+00')"
        # The new months have the parent's primary key and indexes.
        indexes = set(conn.execute(text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'audit_log_2026_12'")).scalars())
        assert {"audit_log_2026_12_pkey", "audit_log_2026_12_subject_idx"} <= indexes


def test_rows_already_in_default_move_to_their_new_month(engine):
    with engine.begin() as conn:  # stored while no month existed: all in DEFAULT
        add_payloads(conn, utc(2026, 10, 3), utc(2026, 11, 1), utc(2026, 11, 21), utc(2026, 12, 31, 23, 59))
        assert where_rows_are(conn) == {"message_payloads_default": 4}
    with engine.connect() as conn:
        created = ensure_partitions(conn, utc(2026, 11, 22), months_ahead=1)
        assert "message_payloads_2026_11" in created and "message_payloads_2026_12" in created
        assert where_rows_are(conn) == {"message_payloads_default": 1, "message_payloads_2026_11": 2,
                                        "message_payloads_2026_12": 1}
        conn.rollback()
        # Rows written now go to their month.
        with conn.begin():
            add_payloads(conn, utc(2026, 11, 22, 12))
        assert where_rows_are(conn)["message_payloads_2026_11"] == 3
        assert ensure_partitions(conn, utc(2026, 11, 22), months_ahead=1) == []


def test_ensure_joins_the_callers_transaction(engine):
    with engine.connect() as conn:
        with conn.begin() as transaction:
            ensure_partitions(conn, utc(2026, 11, 22), months_ahead=0)
            transaction.rollback()
        assert "message_payloads_2026_11" not in partitions_of(conn, "message_payloads")


def test_creating_a_month_does_not_block_the_other_months(engine):
    """While a month is being attached, payloads of the other months are written and messages
    read without waiting (new messages wait for its commit: the foreign key's lock)."""
    with engine.connect() as conn:
        ensure_partitions(conn, utc(2026, 11, 22), months_ahead=0)
    with engine.begin() as conn:
        conn.execute(messages.insert().values(
            id=1, received_at=utc(2026, 11, 22, 13), listener="t", sha256=b"0" * 32, size=1,
            truncated=False, status="received", accepted=True, control_id="P1"))
    with engine.connect() as creator, engine.connect() as writer:
        creator.begin()
        ensure_partitions(creator, utc(2026, 12, 1), months_ahead=0)  # not committed: locks held
        with writer.begin():
            writer.execute(text("SET LOCAL lock_timeout = '1s'"))
            writer.execute(message_payloads.insert().values(
                message_id=1, received_at=utc(2026, 11, 22, 13), raw=b"x"))
            assert writer.execute(text("SELECT count(*) FROM messages")).scalar() == 1
        creator.commit()
        assert where_rows_are(writer) == {"message_payloads_2026_11": 1}


def test_a_month_whose_lock_is_not_granted_is_left_for_the_next_run(engine, monkeypatch, caplog):
    monkeypatch.setattr(partitions, "LOCK_TIMEOUT", "200ms")
    with engine.connect() as reader:
        reader.begin()
        reader.execute(text("SELECT count(*) FROM audit_log_default"))  # holds ACCESS SHARE
        with engine.connect() as conn, caplog.at_level(logging.WARNING):
            created = ensure_partitions(conn, utc(2026, 11, 22), months_ahead=0)
        reader.rollback()
    assert created == ["message_payloads_2026_11", "canonical_bundles_2026_11", "patient_identifiers_2026_11"]
    assert "audit_log_2026_11 not created" in caplog.text
    with engine.connect() as conn:
        assert ensure_partitions(conn, utc(2026, 11, 22), months_ahead=0) == ["audit_log_2026_11"]


def test_two_nodes_ensuring_at_once_create_each_month_once(engine):
    import threading

    results, errors = [], []
    barrier = threading.Barrier(2)

    def node():
        try:
            barrier.wait(5)
            with engine.connect() as conn:
                results.append(ensure_partitions(conn, utc(2026, 11, 22)))
        except Exception as error:  # the test fails below with it
            errors.append(error)

    threads = [threading.Thread(target=node) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    created = results[0] + results[1]
    assert len(created) == len(set(created)) == 3 * len(TABLES)

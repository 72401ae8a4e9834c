"""A database outage is told once in the log, not once per unit of work: the first failure
that says the database cannot be reached is logged at error level with what the gateway does
meanwhile, the others at debug level, and the first success after it says how long it lasted.
Against a real PostgreSQL address where nothing listens (every connection refused)."""
from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

import hl7msgs
from adapters.hl7v2.ack import AckBuilder, Sender
from adapters.mllp.protocol import ConnectionInfo
from gateway.ingest.inspect import IngestPolicy, Inspector
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.store.ingest_writer import IngestJob, IngestWriter
from process_support import free_port


@pytest.fixture
def dead_pg():
    """An engine for a PostgreSQL address where nothing listens."""
    engine = create_gateway_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing")
    yield engine
    engine.dispose()


def lines(caplog, level):
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("gateway")]


def test_units_of_work_in_an_outage_log_one_error_line(dead_pg, caplog):
    """Fifty failed units of work through the database pool: one error line, at its first."""
    database = Database(dead_pg, reactor=None)
    caplog.set_level(logging.DEBUG)
    for _ in range(50):
        with pytest.raises(OperationalError):
            database.run_now(lambda conn: conn.exec_driver_sql("SELECT 1"))
    errors = lines(caplog, logging.ERROR)
    assert len(errors) == 1 and errors[0].startswith("database unavailable: connection failed")
    assert "STORE_UNAVAILABLE" in errors[0]
    assert len(lines(caplog, logging.DEBUG)) == 49


def test_an_ingest_writer_in_an_outage_logs_it_once_and_answers_every_frame(dead_pg, caplog):
    """Frames submitted one after the other to the writer while the database is away are
    each answered with the error (the sender gets AE), and the log holds one error line."""
    caplog.set_level(logging.DEBUG)
    builder = AckBuilder(Sender(b"GW", b"MA-HIE"))
    inspector = Inspector(builder, IngestPolicy("mllp-test"))
    writer = IngestWriter(dead_pg, lambda f, *a: f(*a), lambda item: None)
    answered = []
    done = threading.Semaphore(0)

    def finished(job, error):
        answered.append(error)
        done.release()

    writer.start()
    try:
        for i in range(20):  # one after the other, as a sender waits for each ACK
            raw = hl7msgs.message("adt", i).encode()
            items = inspector.frame(raw, ConnectionInfo("mllp-test", "127.0.0.1:5000")).items
            writer.submit(IngestJob(items, "mllp-test", "127.0.0.1:5000", 0.0, finished))
            assert done.acquire(timeout=30)
    finally:
        writer.stop()
    assert len(answered) == 20
    assert all(isinstance(error, OperationalError) or isinstance(error, psycopg.OperationalError)
               for error in answered)
    assert len(lines(caplog, logging.ERROR)) == 1


def test_the_end_of_an_outage_is_told_with_its_length():
    """The first success after an outage logs how long it lasted and how much failed."""
    from gateway.store.database import Availability

    clock = FakeClock()
    availability = Availability(clock)
    with CapturedLog() as captured:
        for _ in range(3):
            assert availability.failed(refused())
            clock.now += 2.5
        availability.answered()
        availability.answered()  # nothing more: all is well
    assert [(r.levelno, r.getMessage()[:30]) for r in captured.records if r.levelno > logging.DEBUG] == [
        (logging.ERROR, "database unavailable: connecti"),
        (logging.WARNING, "database available again after")]
    assert "7.5 s (3 unit(s)" in captured.records[-1].getMessage()


def test_connections_lost_one_after_another_are_summed_up_not_told_each():
    """Outages over at once, one after the other (connections killed again and again), are
    told by the first and then counted; one that lasts is told when it has lasted 2 s."""
    from gateway.store.database import Availability

    clock = FakeClock()
    availability = Availability(clock, quiet=30.0, announce_after=2.0)
    with CapturedLog() as captured:
        for _ in range(20):
            availability.failed(refused())
            clock.now += 0.1
            availability.answered()
            clock.now += 0.4
        assert len([r for r in captured.records if r.levelno > logging.DEBUG]) == 2
        availability.failed(refused())
        clock.now += 2.0
        availability.failed(refused())  # lasted 2 s: told
        clock.now += 1.0
        availability.answered()
    told = [r.getMessage() for r in captured.records if r.levelno > logging.DEBUG]
    assert len(told) == 4, told
    assert told[2].startswith("database unavailable") and "19 brief outage(s)" in told[2]
    assert told[3].startswith("database available again after 3.0 s")


def test_what_a_unit_of_work_refused_is_not_an_outage():
    """A key taken or a deadlock is the unit of work's own failure, for its caller to log."""
    from gateway.store.database import Availability, unreachable

    availability = Availability(FakeClock())
    assert not availability.failed(IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation()))
    assert not unreachable(OperationalError("UPDATE", {}, psycopg.errors.DeadlockDetected()))
    assert not availability.down


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def refused() -> OperationalError:
    return OperationalError("SELECT 1", {}, psycopg.OperationalError(
        "connection failed: connection to server at \"127.0.0.1\", port 1 failed: Connection refused"))


class CapturedLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []
        self._logger = logging.getLogger("gateway.store.database")

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self._level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def test_a_missing_table_on_sqlite_is_not_an_outage():
    """SQLite's OperationalError also says "no such table": that is the caller's to log; a
    locked or read-only database is an outage."""
    import sqlite3

    from gateway.store.database import unreachable

    assert not unreachable(OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x")))
    assert unreachable(OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked")))
    assert unreachable(sqlite3.OperationalError("attempt to write a readonly database"))


@pytest.mark.pg
def test_a_read_only_postgresql_is_an_outage(pg_url):
    """A standby that a failover left the gateway connected to refuses every write (25006): an
    outage, told once and answered STORE_UNAVAILABLE, as SQLite's read-only file is; it was
    one error line per frame."""
    from sqlalchemy import text

    from gateway.store.database import create_gateway_engine, unreachable

    engine = create_gateway_engine(pg_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SET default_transaction_read_only = on"))
            conn.commit()
            with pytest.raises(Exception) as caught:
                conn.execute(text("CREATE TABLE read_only_probe (x int)"))
        assert unreachable(caught.value)
    finally:
        engine.dispose()


def test_a_lock_held_on_the_messages_table_is_answered_as_an_outage_not_waited_for(pg_url, caplog):
    """A migration, a LOCK TABLE or a VACUUM FULL holding the messages table: the writer waited
    for it without end, senders got no answer and readiness said all was well. Past the lock
    timeout the frame is answered with the error (AE STORE_UNAVAILABLE), an outage is told once,
    and the next frame after the lock is stored."""
    caplog.set_level(logging.DEBUG)
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    builder = AckBuilder(Sender(b"GW", b"MA-HIE"))
    inspector = Inspector(builder, IngestPolicy("mllp-test"))
    writer = IngestWriter(engine, lambda f, *a: f(*a), lambda item: None, lock_timeout=0.5)
    answered = []
    done = threading.Semaphore(0)

    def send(i):
        raw = hl7msgs.message("adt", i).encode()
        items = inspector.frame(raw, ConnectionInfo("mllp-test", "127.0.0.1:5000")).items
        writer.submit(IngestJob(items, "mllp-test", "127.0.0.1:5000", 0.0,
                                lambda job, error: (answered.append(error), done.release())))
        assert done.acquire(timeout=30), "no answer"

    writer.start()
    try:
        send(0)
        holder = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"))
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        try:
            started = time.monotonic()
            send(1)
            assert time.monotonic() - started < 10
        finally:
            holder.rollback()
            holder.close()
        send(2)
    finally:
        writer.stop()
        engine.dispose()
    assert answered[0] is None and answered[2] is None
    assert isinstance(answered[1], psycopg.errors.LockNotAvailable)
    assert writer.availability.down is False
    [error] = lines(caplog, logging.ERROR)
    assert error.startswith("database unavailable: canceling statement due to lock timeout")

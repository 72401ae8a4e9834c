"""Group commit for the ingest path: one writer thread, one connection, one transaction per
round. Everything that arrived while the previous commit ran goes into the next one, so the
cost of a commit (an fsync) is shared by every message waiting for it, and a lone message is
committed at once, without waiting for company.

Duplicates are left to the unique index on (MSH-3, MSH-4, MSH-10): the fast path inserts the
whole round, and only the messages whose key is taken are settled one by one: a re-sent
message (same bytes) gets the stored ACK back and is not stored again; a reused control id
with other bytes is refused (and kept, as every refusal is). Several nodes may share one
PostgreSQL: its ON CONFLICT waits for the other node's transaction on the same key.

Each message's bytes go to `message_payloads` in the same transaction (retention expires them
apart from the index): on PostgreSQL one statement inserts the whole round's messages and
payloads (arrays unnested, data-modifying WITHs), on SQLite the round's ids are read back
from the rowids it was given. Either way each stored item learns its id (`Inbound.message_id`), so that translation needs no look-up by key.

The writer never touches the reactor: `deliver(function, *args)` is given (callFromThread).
"""
from __future__ import annotations

import logging
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from psycopg.pq import TransactionStatus
from sqlalchemy import Engine

from adapters.hl7v2.ack import ack_code_of
from gateway.ingest.model import Inbound
from gateway.ingest.telemetry import receipt
from gateway.store.database import availability, sqlite_write_lock, value_refused
from gateway.store.pg_arrays import columns_of, unnest
from gateway.store.schema import messages
from gateway.store.texts import storable

if TYPE_CHECKING:
    from gateway.audit.trail import AuditTrail, PendingAppend

log = logging.getLogger(__name__)


class _QuietPipelineExit(logging.Filter):
    """psycopg logs a warning when a pipeline cannot be closed while an error is on its way
    out ("error ignored terminating <psycopg.Pipeline>: the connection is lost"): a round on a
    connection the database dropped. The error itself reaches the writer, which reports it
    (once per outage, gateway.store.database.Availability): the warning is only repetition."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("error ignored terminating")
                    and "Pipeline" in record.getMessage())


logging.getLogger("psycopg").addFilter(_QuietPipelineExit())

_STOP = object()

# Column order of the hot INSERT; `id` and `duplicate_count` come from the database.
_COLUMNS = [c for c in messages.columns if c.name not in ("id", "duplicate_count")]


@dataclass(slots=True)
class IngestJob:
    """The messages of one frame: committed together, answered together."""

    items: list[Inbound]
    listener: str
    peer: str
    received_at: float  # epoch seconds, when the frame was complete
    done: Callable[["IngestJob", Exception | None], None]  # called on the reactor thread
    audited: bool = False  # set by the writer: the receipts are in the audit trail


class IngestWriter:
    def __init__(self, engine: Engine, deliver: Callable, on_reused: Callable[[Inbound], None],
                 max_batch: int = 512, audit: "AuditTrail | None" = None, lock_timeout: float = 10.0):
        self.engine = engine
        self.lock_timeout = lock_timeout  # seconds (PostgreSQL): see _commit
        self.audit = audit
        self.deliver = deliver
        self.on_reused = on_reused
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        dialect = engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        names = ", ".join(c.name for c in _COLUMNS)
        self._sql = f"INSERT INTO messages ({names}) VALUES ({', '.join([mark] * len(_COLUMNS))})"
        skip = " ON CONFLICT (sending_application, sending_facility, control_id) WHERE accepted DO NOTHING"
        # PostgreSQL: message and payload in one statement; a skipped message inserts neither,
        # so the row count still says whether a key was taken. The raw bytes are the last value.
        with_payload = (" RETURNING id, received_at) INSERT INTO message_payloads "
                        "(message_id, received_at, raw) SELECT id, received_at, %s FROM m "
                        "RETURNING message_id")
        self._sql_pg = "WITH m AS (" + self._sql + with_payload
        self._sql_pg_round = _round_statement(skip)
        self._sql_payload = "INSERT INTO message_payloads (message_id, received_at, raw) VALUES (?, ?, ?)"
        # `accepted` written as the partial index's own predicate, so that SQLite uses the index.
        self._sql_stored = ("SELECT id, sha256, ack FROM messages WHERE accepted AND "
                            f"sending_application = {mark} AND sending_facility = {mark} AND control_id = {mark}")
        self._sql_duplicate = f"UPDATE messages SET duplicate_count = duplicate_count + 1 WHERE id = {mark}"
        self._sqlite = dialect.name == "sqlite"
        self._write_lock = sqlite_write_lock(engine)
        self._integrity_error = dialect.loaded_dbapi.IntegrityError
        self._refused = value_refused(engine)
        # SQLAlchemy's own conversion of the timestamp for this dialect (text on SQLite).
        self._timestamp = messages.c.received_at.type._cached_bind_processor(dialect) or (lambda v: v)
        self.availability = availability(engine)
        self.commits = 0
        self.rows = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Commit what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: IngestJob) -> None:
        """Queue a frame's messages for the next commit (any thread)."""
        self._queue.put(job)

    def _run(self) -> None:
        connection = None
        get, get_nowait = self._queue.get, self._queue.get_nowait
        stopping = False
        while not stopping:
            job = get()
            if job is _STOP:
                break
            jobs = [job]
            count = len(job.items)
            while count < self.max_batch:
                try:
                    more = get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                jobs.append(more)
                count += len(more.items)
            connection, error = self._round(connection, jobs, count)
            if error is not None and len(jobs) > 1 and isinstance(error, self._refused):
                # The database refused a value of one frame (PostgreSQL: a text it cannot
                # keep): the others must not pay for it. Each frame again in a round of its
                # own; only the refused one is answered with the error.
                for job in jobs:
                    connection, error = self._round(connection, [job], len(job.items))
                    self.deliver(_finish, [job], error)
                continue
            self.deliver(_finish, jobs, error)
        if connection is not None:
            _discard(connection)

    def _round(self, connection, jobs: list[IngestJob], count: int):
        """Commit `jobs` in one transaction: (the connection to go on with, None) or, when
        nothing was stored, (None, the error)."""
        try:
            if connection is None:
                connection = self.engine.connect()
            self._commit(connection, jobs)
            self.commits += 1
            self.rows += count
            self.availability.answered()
            return connection, None
        except Exception as failure:  # the database is down or refused: nothing was stored
            if self.availability.failed(failure):  # an outage: told once, there
                log.debug("ingest commit of %d messages failed: %s", count, failure)
            else:
                log.error("ingest commit of %d messages failed: %s", count, failure)
            if connection is not None:
                try:
                    _discard(connection)
                except Exception:  # already broken
                    pass
            return None, failure

    def _commit(self, connection, jobs: list[IngestJob]) -> None:
        """The round in one transaction, on the driver's own connection (SQLAlchemy's
        per-statement machinery costs more than the insert here): one executemany. If a key is
        taken, the round is rolled back and redone message by message, settling each conflict;
        another node may take a key meanwhile, hence a few attempts."""
        driver = connection.connection.driver_connection
        if not self._sqlite and not driver.autocommit:
            # Transactions are explicit (driver.transaction()); leave any implicit one the
            # pool's ping opened, or transaction() would only make a savepoint inside it.
            driver.rollback()
            driver.autocommit = True
            # A lock on the tables held longer than this (a migration, a LOCK TABLE, a VACUUM
            # FULL) fails the round as an outage: senders are answered STORE_UNAVAILABLE and
            # /health/ready says not ready, instead of waiting for an answer that never comes
            # (SQLite's busy timeout does the same there).
            driver.execute(f"SET lock_timeout = '{round(self.lock_timeout * 1000)}ms'")
        if self._insert_round(driver, jobs, [row for job in jobs for row in self._rows(job)]):
            return
        for attempt in range(3):
            try:
                with self._transaction(driver):
                    cursor = driver.cursor()
                    for job in jobs:
                        for item in job.items:
                            item.message_id = None  # an earlier attempt's id was rolled back
                            if item.deduplicated and self._settle_conflict(cursor, item):
                                continue  # a duplicate: answered with the stored ACK, not stored again
                            item.message_id = self._insert_one(cursor, self._rows(job, [item])[0])
                    self._record(driver, jobs)
                return
            except self._integrity_error:
                if attempt == 2:
                    raise

    def _insert_round(self, driver, jobs: list[IngestJob], rows: list[tuple]) -> bool:
        """Insert every row (the jobs' items, in order) in one transaction and give each item
        its id; False (and nothing stored) if a key is taken."""
        if self._sqlite:
            try:
                with self._transaction(driver):
                    driver.executemany(self._sql, [row[:-1] for row in rows])
                    # Under BEGIN IMMEDIATE nobody else inserts: SQLite gave the round's rows
                    # consecutive rowids (one more than the largest), ending at the last one.
                    last = driver.execute("SELECT last_insert_rowid()").fetchone()[0]
                    first = last - len(rows) + 1
                    driver.executemany(self._sql_payload, [
                        (first + i, row[0], row[-1]) for i, row in enumerate(rows)])
                    self._identify(jobs, range(first, last + 1))
                    self._record(driver, jobs)
            except self._integrity_error:
                return False
        else:
            # PostgreSQL: ON CONFLICT DO NOTHING keeps psycopg's pipeline from aborting; a
            # skipped row returns no id, which says a key was taken: the round is rolled back.
            # One pipeline: BEGIN, the round's statement (its ids fetched at once) and the
            # audit chain's lock and head, asked for after the inserts so that the lock is
            # held only from there to the commit; then the receipts and COMMIT.
            # BEGIN and COMMIT go as statements: transaction()'s nested pipelines would sync
            # at BEGIN, after the receipts and at COMMIT (five round trips).
            try:
                with driver.pipeline():
                    driver.execute("BEGIN")
                    with driver.cursor() as cursor:
                        cursor.execute(self._sql_pg_round, columns_of(rows))
                        pending = self.audit.start_append(driver) if self.audit else None
                        ids = [row[0] for row in cursor.fetchall()]
                        if len(ids) != len(rows):
                            raise _KeyTaken
                    self._identify(jobs, ids)
                    self._record(driver, jobs, pending)
                    driver.execute("COMMIT")
            except BaseException as failure:
                _abandon(driver)
                if isinstance(failure, _KeyTaken):
                    return False
                raise
        return True

    @staticmethod
    def _identify(jobs: list[IngestJob], ids) -> None:
        for item, message_id in zip((item for job in jobs for item in job.items), ids, strict=True):
            item.message_id = message_id

    def _record(self, driver, jobs: list[IngestJob], pending: "PendingAppend | None" = None) -> None:
        """The receipts of the round, appended to the audit trail in its transaction (after
        `pending`, the append already started): a message is never stored without its
        record, and the chain's lock is held only until the commit."""
        if self.audit is None:
            return
        receipts = []
        for job in jobs:
            at = datetime.fromtimestamp(job.received_at, timezone.utc)
            receipts += [receipt(item, job.listener, job.peer, at) for item in job.items]
        (pending or self.audit.start_append(driver)).finish(receipts)
        for job in jobs:
            job.audited = True

    def _insert_one(self, cursor, row: tuple) -> int:
        """Insert one message and its payload; its id."""
        if self._sqlite:
            cursor.execute(self._sql, row[:-1])
            message_id = cursor.lastrowid
            cursor.execute(self._sql_payload, (message_id, row[0], row[-1]))
            return message_id
        cursor.execute(self._sql_pg, row)
        return cursor.fetchone()[0]

    def _transaction(self, driver):
        return _sqlite_transaction(driver, self._write_lock) if self._sqlite else driver.transaction()

    def _settle_conflict(self, cursor, item: Inbound) -> bool:
        """An accepted message against what is stored under its key. True for a duplicate (same
        bytes): it gets the stored ACK and is not stored again. A reused control id (other
        bytes) turns the item into a refusal, to be stored. False when the key is free."""
        cursor.execute(self._sql_stored, (item.sending_application, item.sending_facility, item.control_id))
        stored = cursor.fetchone()
        if stored is None:
            return False
        stored_id, sha256, ack = stored
        if bytes(sha256) == item.sha256:
            item.duplicate = True
            item.ack = bytes(ack) if ack is not None else None
            cursor.execute(self._sql_duplicate, (stored_id,))
            return True
        self.on_reused(item)
        return False

    def _rows(self, job: IngestJob, items: list[Inbound] | None = None) -> list[tuple]:
        received = self._timestamp(datetime.fromtimestamp(job.received_at, timezone.utc))
        rows = []
        for it in job.items if items is None else items:
            _scrub(it)
            error = it.error
            rows.append((
                received, job.listener, job.peer, it.sender_id, it.sending_application,
                it.sending_facility, it.receiving_application, it.receiving_facility, it.control_id,
                it.message_type, it.version, it.processing_id, it.charset, it.codec, it.sha256,
                it.size, it.truncated, it.status.value, it.deduplicated,
                _ack_code(it.ack), it.ack,
                error.condition.value if error else None,
                "^".join(error.location.components()) if error else None,
                error.reason if error else None, it.format,
                it.raw,  # last: it goes to message_payloads
            ))
        return rows


# The texts of a message record that come from its content (the rest are the gateway's own),
# and the longest each column keeps.
_CONTENT_TEXTS = tuple((name, messages.c[name].type.length) for name in (
    "sending_application", "sending_facility", "receiving_application", "receiving_facility",
    "control_id", "message_type", "version", "processing_id", "charset"))


def _scrub(item: Inbound) -> None:
    """The item's texts made storable (gateway.store.texts): no NUL or lone surrogate, none
    longer than its column. One such message must not fail the round of every other sender.
    The HL7 inspector refuses an accepted message with a NUL or an over-long header text
    (decoded HL7 holds no surrogate); this keeps its refusal, and what other doors read from
    their input, storable."""
    for name, limit in _CONTENT_TEXTS:
        value = getattr(item, name)
        if value and (len(value) > limit or "\x00" in value or not value.isascii()):
            setattr(item, name, storable(value, limit))


def _round_statement(skip: str) -> str:
    """PostgreSQL: a whole round in one statement over arrays (gateway.store.pg_arrays): the
    messages get ids drawn in the round's order, those inserted get their payload, and their
    ids come back in that order; fewer ids than rows means a key was taken (`skip`, the ON
    CONFLICT clause, left its message out)."""
    names = ", ".join(c.name for c in _COLUMNS)
    return (f"WITH d AS MATERIALIZED (SELECT *, nextval('messages_id_seq') AS id "
            f"FROM {unnest(_COLUMNS, 'bytea')} WITH ORDINALITY AS d({names}, raw, o)), "
            f"m AS (INSERT INTO messages (id, {names}) SELECT id, {names} FROM d ORDER BY o"
            f"{skip} RETURNING id, received_at), "
            "p AS (INSERT INTO message_payloads (message_id, received_at, raw) "
            "SELECT m.id, m.received_at, d.raw FROM m JOIN d USING (id) RETURNING message_id) "
            "SELECT d.id FROM d JOIN p ON p.message_id = d.id ORDER BY d.o")


def _abandon(driver) -> None:
    """Roll back what a failed round left open (nothing when the connection is broken)."""
    try:
        if driver.info.transaction_status != TransactionStatus.IDLE:
            driver.execute("ROLLBACK")
    except Exception:
        pass


class _KeyTaken(Exception):
    """A round's insert skipped a row: redo the round message by message."""


@contextmanager
def _sqlite_transaction(driver, lock):
    with lock:
        driver.execute("BEGIN IMMEDIATE")  # it reads, then writes: take the write lock first
        try:
            yield
            driver.execute("COMMIT")
        except BaseException:
            if driver.in_transaction:
                driver.execute("ROLLBACK")
            raise


def _discard(connection) -> None:
    """Close the writer's connection for good: never back in the pool, where it would lend
    its driver settings (autocommit on PostgreSQL) to other units of work."""
    connection.invalidate()
    connection.close()


def _finish(jobs: list[IngestJob], error: Exception | None) -> None:
    for job in jobs:
        job.done(job, error)


def _ack_code(ack: bytes | None) -> str | None:
    code = ack_code_of(ack) if ack else None
    return code.value if code else None



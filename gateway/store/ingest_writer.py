"""Group commit for the ingest path: one writer thread, one connection, one transaction per
round. Everything that arrived while the previous commit ran goes into the next one, so the
cost of a commit (an fsync) is shared by every message waiting for it, and a lone message is
committed at once, without waiting for company.

Duplicates are left to the unique index on (MSH-3, MSH-4, MSH-10): the fast path inserts the
whole round, and only the messages whose key is taken are settled one by one: a re-sent
message (same bytes) gets the stored ACK back and is not stored again; a reused control id
with other bytes is refused (and kept, as every refusal is). Several nodes may share one
PostgreSQL: its ON CONFLICT waits for the other node's transaction on the same key.

The writer never touches the reactor: `deliver(function, *args)` is given (callFromThread).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import Engine

from gateway.ingest.model import Inbound
from gateway.store.schema import messages

log = logging.getLogger(__name__)

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


class IngestWriter:
    def __init__(self, engine: Engine, deliver: Callable, on_reused: Callable[[Inbound], None],
                 max_batch: int = 512):
        self.engine = engine
        self.deliver = deliver
        self.on_reused = on_reused
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        dialect = engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._names = ", ".join(c.name for c in _COLUMNS)
        self._sql = f"INSERT INTO messages ({self._names}) VALUES ({', '.join([mark] * len(_COLUMNS))})"
        self._pg_row_marks = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
        self._pg_insert_cache: dict[int, str] = {}
        # `accepted` written as the partial index's own predicate, so that SQLite uses the index.
        self._sql_stored = ("SELECT id, sha256, ack FROM messages WHERE accepted AND "
                            f"sending_application = {mark} AND sending_facility = {mark} AND control_id = {mark}")
        self._sql_duplicate = f"UPDATE messages SET duplicate_count = duplicate_count + 1 WHERE id = {mark}"
        self._sqlite = dialect.name == "sqlite"
        self._integrity_error = dialect.loaded_dbapi.IntegrityError
        # SQLAlchemy's own conversion of the timestamp for this dialect (text on SQLite).
        self._timestamp = messages.c.received_at.type._cached_bind_processor(dialect) or (lambda v: v)
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
            error = None
            try:
                if connection is None:
                    connection = self.engine.connect()
                self._commit(connection, jobs)
                self.commits += 1
                self.rows += count
            except Exception as failure:  # the database is down or refused: nothing was stored
                log.error("ingest commit of %d messages failed: %s", count, failure)
                error = failure
                if connection is not None:
                    try:
                        _discard(connection)
                    except Exception:  # already broken
                        pass
                    connection = None
            self.deliver(_finish, jobs, error)
        if connection is not None:
            _discard(connection)

    def _commit(self, connection, jobs: list[IngestJob]) -> None:
        driver = connection.connection.driver_connection
        if self._sqlite:
            self._commit_sqlite(driver, jobs)
        else:
            self._commit_postgresql(driver, jobs)

    def _commit_sqlite(self, driver, jobs: list[IngestJob]) -> None:
        """One executemany in one transaction, on the driver's own connection (SQLAlchemy's
        per-statement machinery costs more than the insert here). If the unique index objects,
        the round is redone message by message, settling each conflict."""
        try:
            with _sqlite_transaction(driver):
                driver.executemany(self._sql, [row for job in jobs for row in self._rows(job)])
            return
        except self._integrity_error:
            pass
        with _sqlite_transaction(driver):
            cursor = driver.cursor()
            for job in jobs:
                for item in job.items:
                    if item.deduplicated and self._settle_conflict(cursor, item):
                        continue  # a duplicate: answered with the stored ACK, not stored again
                    cursor.execute(self._sql, self._rows(job, [item])[0])

    def _commit_postgresql(self, driver, jobs: list[IngestJob]) -> None:
        """One multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING, in autocommit: a single
        statement is atomic, so the round costs one round trip. Rows skipped because their key
        is taken (ON CONFLICT waits for any other node's transaction on it) are then settled
        in a second transaction. If that fails, the whole round is answered as not stored;
        the rows already committed answer the sender's re-send with their stored ACK."""
        pairs = [(job, item) for job in jobs for item in job.items]
        rows = [row for job in jobs for row in self._rows(job)]
        if not driver.autocommit:
            driver.autocommit = True
        with driver.cursor() as cursor:
            cursor.execute(self._pg_insert_sql(len(rows)), [value for row in rows for value in row])
            inserted = cursor.fetchall()
            if len(inserted) == len(rows):
                return
            # Which rows were skipped: match returned (key, sha256) to the items, in order.
            remaining = Counter((a, f, c, bytes(h)) for a, f, c, h in inserted)
            skipped = []
            for job, item in pairs:
                key = (item.sending_application, item.sending_facility, item.control_id, item.sha256)
                if remaining[key] > 0:
                    remaining[key] -= 1
                else:
                    skipped.append((job, item))
            with driver.transaction():
                for job, item in skipped:
                    if not self._settle_conflict(cursor, item):
                        cursor.execute(self._sql, self._rows(job, [item])[0])  # a refusal: kept

    def _pg_insert_sql(self, count: int) -> str:
        sql = self._pg_insert_cache.get(count)
        if sql is None:
            values = ", ".join([self._pg_row_marks] * count)
            sql = (f"INSERT INTO messages ({self._names}) VALUES {values} ON CONFLICT "
                   "(sending_application, sending_facility, control_id) WHERE accepted DO NOTHING "
                   "RETURNING sending_application, sending_facility, control_id, sha256")
            if len(self._pg_insert_cache) < 1024:
                self._pg_insert_cache[count] = sql
        return sql

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
            error = it.error
            rows.append((
                received, job.listener, job.peer, it.sender_id, it.sending_application,
                it.sending_facility, it.receiving_application, it.receiving_facility, it.control_id,
                it.message_type, it.version, it.processing_id, it.charset, it.codec, it.sha256,
                it.size, it.truncated, it.raw, it.status.value, it.deduplicated,
                _ack_code(it.ack), it.ack,
                error.condition.value if error else None,
                _location_text(error.location) if error else None,
                error.reason if error else None,
            ))
        return rows


@contextmanager
def _sqlite_transaction(driver):
    driver.execute("BEGIN")
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
    if not ack:
        return None
    start = ack.find(b"\rMSA")
    return ack[start + 5:start + 7].decode("ascii", "replace") if start >= 0 else None


def _location_text(location) -> str:
    """An ERR-2 style location: MSH^1^10, PID^1^5^1."""
    parts = [location.segment, str(location.sequence)]
    if location.field:
        parts.append(str(location.field))
        if location.component:
            parts.append(str(location.component))
    return "^".join(parts)



"""Group commit for the ingest path: one writer thread, one connection, one transaction per
round. Everything that arrived while the previous commit ran goes into the next one, so the
cost of a commit (an fsync) is shared by every message waiting for it, and a lone message is
committed at once, without waiting for company.

Duplicates are left to the unique index on (MSH-3, MSH-4, MSH-10): the fast path inserts the
whole round; only when the index objects is the round redone message by message, where a
re-sent message (same bytes) gets the stored ACK back and is not stored again, and a reused
control id with other bytes is refused.

The writer never touches the reactor: `deliver(function, *args)` is given (callFromThread).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import Engine, and_, select, text, update
from sqlalchemy.exc import IntegrityError

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
        self._sql = self._insert_sql(dialect)
        self._sqlite = dialect.name == "sqlite"
        self._integrity_error = dialect.loaded_dbapi.IntegrityError
        # SQLAlchemy's own conversion of the timestamp for this dialect (text on SQLite).
        self._timestamp = messages.c.received_at.type._cached_bind_processor(dialect) or (lambda v: v)
        self.commits = 0
        self.rows = 0

    @staticmethod
    def _insert_sql(dialect) -> str:
        marker = "?" if dialect.paramstyle == "qmark" else "%s"
        names = ", ".join(c.name for c in _COLUMNS)
        return f"INSERT INTO messages ({names}) VALUES ({', '.join([marker] * len(_COLUMNS))})"

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
                        connection.close()
                    except Exception:  # already broken
                        pass
                    connection = None
            self.deliver(_finish, jobs, error)
        if connection is not None:
            connection.close()

    def _commit(self, connection, jobs: list[IngestJob]) -> None:
        try:
            self._insert_round(connection.connection.driver_connection,
                               [row for job in jobs for row in self._rows(job)])
        except self._integrity_error:
            # Another node may commit the same control id between our check and our insert:
            # check again, a few times, before giving up on the round.
            for attempt in range(3):
                try:
                    with connection.begin():
                        self._commit_checking(connection, jobs)
                    return
                except IntegrityError:
                    if attempt == 2:
                        raise

    def _insert_round(self, driver, rows: list[tuple]) -> None:
        """The hot path: one executemany in one transaction, on the driver's own connection
        (SQLAlchemy's per-statement machinery costs more than the insert itself here)."""
        if self._sqlite:
            driver.execute("BEGIN")
            try:
                driver.executemany(self._sql, rows)
                driver.execute("COMMIT")
            except BaseException:
                if driver.in_transaction:
                    driver.execute("ROLLBACK")
                raise
            return
        try:
            with driver.cursor() as cursor:
                cursor.executemany(self._sql, rows)
            driver.commit()
        except BaseException:
            driver.rollback()
            raise

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

    def _commit_checking(self, connection, jobs: list[IngestJob]) -> None:
        """The slow path: decide each accepted message against what is stored."""
        seen: dict[tuple, Inbound] = {}
        for job in jobs:
            keep = []
            for item in job.items:
                if item.deduplicated:
                    key = (item.sending_application, item.sending_facility, item.control_id)
                    prior = seen.get(key)
                    stored = None if prior else _stored(connection, key)
                    if prior is None and stored is None:
                        seen[key] = item
                    elif (prior.sha256 if prior else stored.sha256) == item.sha256:
                        item.duplicate = True
                        item.ack = prior.ack if prior else stored.ack
                        if stored is not None:
                            connection.execute(update(messages).where(messages.c.id == stored.id)
                                               .values(duplicate_count=messages.c.duplicate_count + 1))
                        continue
                    else:
                        self.on_reused(item)
                keep.append(item)
            if keep:
                connection.exec_driver_sql(self._sql, self._rows(job, keep))


def _stored(connection, key: tuple):
    application, facility, control_id = key
    # `accepted` written as the partial index's own predicate, so that SQLite uses the index.
    return connection.execute(
        select(messages.c.id, messages.c.sha256, messages.c.ack).where(and_(
            text("accepted"), messages.c.sending_application == application,
            messages.c.sending_facility == facility, messages.c.control_id == control_id))
    ).first()


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



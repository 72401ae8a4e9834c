"""The audit trail in the database (table audit_log): appends chained records, verifies them.

Blocking code: run it in a database thread (the recorder does), or from the command line.

One chain for the whole platform: every node appends to the same `audit_log`, one append at
a time under a lock (PostgreSQL: a transaction-scoped advisory lock; SQLite: the write lock
that BEGIN IMMEDIATE takes), reading the last record and chaining after it.

Records are kept in time order along `seq`: an appended record's `recorded_at` is never
earlier than the one before it (an event's own time is moved up to the last record's when a
node's clock or queue lags), so removing everything recorded before an instant removes the
records 1..N and nothing after N. That is what retention does; it accounts for the removal
with a `retention.expired` record appended to the chain (see `expiry_anchor`), and `verify`
accepts a trail that starts after 1 only when such a record vouches for its start.

Retention's part: the anchor in a short write transaction (`gateway.store.database.write_transaction`;
it holds the chain's lock, which every append waits for, so nothing slow goes in it):

    bound = trail.expiry_bound(conn, before)       # (N, hash of record N), or None
    if bound:
        trail.append_in(conn, [expiry_anchor(*bound, kind="audit", rows=...)])

then the records with seq <= N removed in seq order from the lowest (batched deletes, and on
PostgreSQL the months before `before` dropped in turn), so that an interrupted run leaves a
trail that still starts inside the announced range (verify accepts it, checking that record
N, while it remains, still has the announced hash).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, select, tuple_
from sqlalchemy.engine import Connection

from gateway.audit.chain import GENESIS, AuditEvent, AuditRecord, Finding, chain, verify as verify_chain
from gateway.store.database import write_transaction
from gateway.store.pg_arrays import columns_of, unnest
from gateway.store.schema import audit_log
from gateway.store.timestamps import utc as _utc

EXPIRED = "retention.expired"  # the action of the record that vouches for expired records
# The advisory lock every node takes to append (an arbitrary constant: "audit" in ASCII).
CHAIN_LOCK = 0x61756469_74
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def expiry_anchor(through_seq: int, last_hash: str, **detail: Any) -> AuditEvent:
    """The record retention appends when it removes the audit records 1..`through_seq`:
    detail {"through_seq": N, "last_hash": hash of record N} (and whatever else it says:
    kind, before, rows, partitions). `verify` accepts a trail whose first record is N+1 with
    prev_hash H only when such a later record states N and H."""
    return AuditEvent(EXPIRED, "system", subject="audit",
                      detail={**detail, "through_seq": int(through_seq), "last_hash": last_hash})


@dataclass(frozen=True)
class Located:
    """A finding and the time of the record where it shows."""

    finding: Finding
    recorded_at: datetime | None

    def __str__(self) -> str:
        at = self.recorded_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if self.recorded_at else "-"
        return f"record {self.finding.seq} ({at}): {self.finding.problem}: {self.finding.reason}"


@dataclass(frozen=True)
class Verification:
    count: int
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None  # the hash of the last record: compare it with an outside copy
    findings: list[Located] = field(default_factory=list)
    expired_through: int | None = None  # records 1..N expired, vouched for by an anchor

    @property
    def intact(self) -> bool:
        return not self.findings


class AuditTrail:
    """The audit_log table of `engine`, appended to as `node`."""

    def __init__(self, engine: Engine, node: str):
        self.engine = engine
        self.node = node
        self.postgresql = engine.dialect.name == "postgresql"
        # Appends go through the driver's own cursor (SQLAlchemy's per-row machinery cost
        # more than the chain's hashing), with SQLAlchemy's own conversions of the timestamp
        # for this dialect (text on SQLite).
        dialect = engine.dialect
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        self._sql_insert = (f"INSERT INTO audit_log ({', '.join(_COLUMNS)}) "
                            f"VALUES ({', '.join([mark] * len(_COLUMNS))})")
        # PostgreSQL: the records in one statement over arrays (gateway.store.pg_arrays).
        self._sql_insert_pg = (f"INSERT INTO audit_log ({', '.join(_COLUMNS)}) SELECT * FROM "
                               + unnest([audit_log.c[name] for name in _COLUMNS]))
        self._sql_lock = f"SELECT pg_advisory_xact_lock({CHAIN_LOCK})"
        self._sql_head = ("SELECT seq, hash, recorded_at FROM audit_log "
                          "ORDER BY seq DESC, recorded_at DESC LIMIT 1")
        recorded_at = audit_log.c.recorded_at.type
        self._bind_at = recorded_at._cached_bind_processor(dialect) or _same
        self._read_at = recorded_at._cached_result_processor(dialect, None) or _same

    def append(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Chain `events` after the last record and store them, in one transaction."""
        if not events:
            return []
        with write_transaction(self.engine) as conn:
            return self.append_in(conn, events)

    def append_in(self, conn: Connection, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """`append` inside the caller's write transaction (on SQLite it must have begun with
        BEGIN IMMEDIATE: `write_transaction`); the chain lock is held until it commits."""
        return self.append_on(conn.connection.driver_connection, events)

    def append_on(self, driver, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """`append_in` on a driver connection (sqlite3, psycopg) inside its write transaction."""
        if not events:
            return []
        return self.start_append(driver).finish(events)

    def start_append(self, driver) -> "PendingAppend":
        """The first half of an append on a driver connection inside its write transaction:
        take the chain's lock and ask for the last record. In a psycopg pipeline both are only
        queued, to go with the caller's other statements in one round trip; the ingest writer
        so records each message's receipt in the transaction that stores it."""
        cursors = [driver.cursor() for _ in range(2 if self.postgresql else 1)]
        if self.postgresql:
            cursors[0].execute(self._sql_lock)
        cursors[-1].execute(self._sql_head)  # after the lock: it reads what the last holder committed
        return PendingAppend(self, cursors)

    def _finish(self, cursors: list, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        cursor = cursors[-1]
        try:
            last = cursor.fetchone()
            if last:
                prev_seq, prev_hash, floor = last[0], last[1], _utc(self._read_at(last[2]))
            else:
                prev_seq, prev_hash, floor = 0, GENESIS, None
            if not events:
                return []
            now = datetime.now(timezone.utc)
            records = chain(prev_seq, prev_hash, self.node, _in_time_order(events, now, floor), now)
            if self.postgresql:
                cursor.execute(self._sql_insert_pg, columns_of(self._rows(records)))
            else:
                cursor.executemany(self._sql_insert, self._rows(records))
            return records
        finally:
            for each in cursors:
                each.close()

    def _rows(self, records: list[AuditRecord]) -> list[tuple]:
        rows, at, stored_at = [], None, None
        for r in records:
            if r.at is not at:  # records often share an instant: convert it once
                at, stored_at = r.at, self._bind_at(r.at)
            rows.append((r.seq, stored_at, r.node, r.action, r.actor, r.outcome, r.subject,
                         r.source, r.detail_json or _JSON.encode(r.detail), r.prev_hash, r.hash))
        return rows

    def expiry_bound(self, conn: Connection, before: datetime) -> tuple[int, str] | None:
        """The last record recorded before `before`: (its seq, its hash), or None when there
        is none. Removing every record recorded before `before` removes exactly 1..seq."""
        row = conn.execute(select(audit_log.c.seq, audit_log.c.hash)
                           .where(audit_log.c.recorded_at < _utc(before))
                           .order_by(audit_log.c.seq.desc(), audit_log.c.recorded_at.desc())
                           .limit(1)).first()
        return (row.seq, row.hash) if row else None

    def records(self, conn: Connection, after_seq: int = 0, limit: int | None = None,
                batch: int = 10_000) -> Iterator[AuditRecord]:
        """The records after `after_seq` in seq order, read `batch` at a time."""
        yield from _walk(conn, batch, after=(after_seq, None), limit=limit)

    def head(self, conn: Connection) -> AuditRecord | None:
        row = conn.execute(select(audit_log).order_by(audit_log.c.seq.desc(),
                                                      audit_log.c.recorded_at.desc()).limit(1)).first()
        return record_from_row(row) if row else None

    def verify(self, batch: int = 10_000) -> Verification:
        """Walk the whole trail in seq order, `batch` records at a time, in one snapshot."""
        with self.engine.connect() as conn:
            if self.postgresql:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                return self.verify_in(conn, batch)

    def verify_in(self, conn: Connection, batch: int = 10_000) -> Verification:
        walk = _Tracked(_walk(conn, batch, after=(None, None)))
        # Records are numbered from 1: one numbered below (inserted there, or moved) is found,
        # not passed over (a walk from seq 1 on never saw it; `show` did).
        strays = []
        while (first := walk.peek()) is not None and first.seq < 1:
            stray = next(walk)
            strays.append(Located(Finding(stray.seq, "inserted", "records are numbered from 1"),
                                  _utc(stray.at)))
        if first is None:
            last = walk.last
            return Verification(walk.count, last and strays[0].finding.seq, last and last.seq,
                                last and last.hash, strays)
        anchors: list[tuple[int, int, str]] = []  # (anchor seq, through_seq, last_hash)

        def watched() -> Iterator[AuditRecord]:
            for record in walk:
                if record.action == EXPIRED and isinstance(record.detail, dict):
                    through, last = record.detail.get("through_seq"), record.detail.get("last_hash")
                    if isinstance(through, int) and isinstance(last, str):
                        anchors.append((record.seq, through, last))
                yield record

        start_seq, start_hash = first.seq, first.prev_hash  # checked against the anchors at the end
        findings = [Located(f, walk.at) for f in verify_chain(watched(), start_seq, start_hash)]
        expired_through = None
        if (first.seq, first.prev_hash) != (1, GENESIS):
            # The anchor may be the first record itself: retention removed everything before
            # it and nothing was appended since (its own hash covers what it states).
            vouched = [a for a in anchors if a[0] >= first.seq and (
                (a[1] == first.seq - 1 and a[2] == first.prev_hash)
                or (a[1] >= first.seq and _hash_of(conn, a[1]) == a[2]))]
            if vouched:
                expired_through = first.seq - 1
            else:
                reason = (f"record(s) 1 to {first.seq - 1} before it are missing and no "
                          f"{EXPIRED} record accounts for them") if first.seq > 1 else \
                    "the first record does not start from the genesis hash"
                problem = "removed" if first.seq > 1 else "broken-link"
                findings.insert(0, Located(Finding(first.seq, problem, reason), _utc(first.at)))
        lowest = strays[0].finding.seq if strays else first.seq
        return Verification(walk.count, lowest, walk.last.seq, walk.last.hash, strays + findings,
                            expired_through)


class PendingAppend:
    """An append whose lock and head were asked for (`AuditTrail.start_append`)."""

    def __init__(self, trail: AuditTrail, cursors: list):
        self._trail = trail
        self._cursors = cursors  # [the lock's (PostgreSQL),] the head's

    def finish(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Chain `events` after the head and insert them (in the same transaction)."""
        return self._trail._finish(self._cursors, events)


class _Tracked:
    """An iterator of records that remembers the last one handed out (where a finding is)."""

    def __init__(self, records: Iterator[AuditRecord]):
        self._records = records
        self._peeked: list[AuditRecord] = []
        self.last: AuditRecord | None = None
        self.count = 0

    def peek(self) -> AuditRecord | None:
        if not self._peeked:
            self._peeked = [r for r in [next(self._records, None)] if r is not None]
        return self._peeked[0] if self._peeked else None

    @property
    def at(self) -> datetime | None:
        return self.last.at if self.last else None

    def __iter__(self):
        return self

    def __next__(self) -> AuditRecord:
        record = self._peeked.pop() if self._peeked else next(self._records)
        self.last = record
        self.count += 1
        return record


def _hash_of(conn: Connection, seq: int) -> str | None:
    # An interrupted expiry leaves part of the announced range: its last record must remain
    # as announced.
    return conn.execute(select(audit_log.c.hash).where(audit_log.c.seq == seq)
                        .order_by(audit_log.c.recorded_at).limit(1)).scalar()


def _walk(conn: Connection, batch: int, after: tuple[int | None, datetime | None] = (0, None),
          limit: int | None = None) -> Iterator[AuditRecord]:
    # Keyset pagination on the primary key (seq, recorded_at): a forged record that repeats a
    # seq is read too, next to the real one.
    seq, at = after  # (None, None): from the very first row
    given = 0
    while limit is None or given < limit:
        query = select(audit_log).order_by(audit_log.c.seq, audit_log.c.recorded_at)
        if at is not None:
            query = query.where(tuple_(audit_log.c.seq, audit_log.c.recorded_at) > tuple_(seq, at))
        elif seq is not None:
            query = query.where(audit_log.c.seq > seq)
        size = batch if limit is None else min(batch, limit - given)
        rows = conn.execute(query.limit(size)).all()
        for row in rows:
            yield record_from_row(row)
        given += len(rows)
        if len(rows) < size:
            return
        seq, at = rows[-1].seq, rows[-1].recorded_at


def _in_time_order(events: Iterable[AuditEvent], now: datetime,
                   floor: datetime | None) -> list[AuditEvent]:
    """The events with their instants never earlier than the one before (nor than `floor`,
    the last record's); an event whose instant stands is passed on as it is."""
    ordered = []
    for event in events:
        at = event.at or now
        if at is not floor:
            at = _utc(at)
            if floor is not None and at < floor:
                at = floor
        if at is not event.at:
            event = replace(event, at=at)
        floor = at
        ordered.append(event)
    return ordered


_COLUMNS = ("seq", "recorded_at", "node", "action", "actor", "outcome", "subject", "source",
            "detail", "prev_hash", "hash")


def _same(value):
    return value


def record_from_row(row) -> AuditRecord:
    try:
        detail = json.loads(row.detail)
    except (ValueError, RecursionError):  # tampered text (nested too deep to read, too)
        detail = None
    if not isinstance(detail, dict):  # every record's detail is an object: keep the text, so
        detail = {"unreadable": row.detail}  # that the hash check names the record
    return AuditRecord(row.seq, _utc(row.recorded_at), row.node, row.action, row.actor,
                       row.outcome, row.subject, row.source, detail, row.prev_hash, row.hash,
                       row.detail)


__all__ = ["AuditTrail", "EXPIRED", "Located", "Verification", "expiry_anchor", "record_from_row"]

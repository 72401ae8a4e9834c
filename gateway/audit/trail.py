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

Retention's part, in one write transaction (`gateway.store.database.write_transaction`):

    bound = trail.expiry_bound(conn, before)       # (N, hash of record N), or None
    if bound:
        trail.append_in(conn, [expiry_anchor(*bound, kind="audit", rows=...)])
        ... remove the records with seq <= N (drop the months before `before`, or delete) ...

On SQLite, batched deletes may span transactions: delete in seq order from the lowest, so
that an interrupted run leaves a trail that still starts inside the announced range (verify
accepts it, checking that record N, while it remains, still has the announced hash).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, select, text, tuple_
from sqlalchemy.engine import Connection

from gateway.audit.chain import GENESIS, AuditEvent, AuditRecord, Finding, chain, verify as verify_chain
from gateway.store.database import write_transaction
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

    def append(self, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """Chain `events` after the last record and store them, in one transaction."""
        if not events:
            return []
        with write_transaction(self.engine) as conn:
            return self.append_in(conn, events)

    def append_in(self, conn: Connection, events: Sequence[AuditEvent]) -> list[AuditRecord]:
        """`append` inside the caller's write transaction (on SQLite it must have begun with
        BEGIN IMMEDIATE: `write_transaction`); the chain lock is held until it commits."""
        if not events:
            return []
        if self.postgresql:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CHAIN_LOCK})
        last = conn.execute(select(audit_log.c.seq, audit_log.c.hash, audit_log.c.recorded_at)
                            .order_by(audit_log.c.seq.desc(), audit_log.c.recorded_at.desc())
                            .limit(1)).first()
        prev_seq, prev_hash, floor = (last.seq, last.hash, _utc(last.recorded_at)) if last \
            else (0, GENESIS, None)
        now = datetime.now(timezone.utc)
        records = chain(prev_seq, prev_hash, self.node, _in_time_order(events, now, floor), now)
        conn.execute(audit_log.insert(), [_row(record) for record in records])
        return records

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
        walk = _Tracked(_walk(conn, batch))
        first = walk.peek()
        if first is None:
            return Verification(0, None, None, None)
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
            vouched = [a for a in anchors if a[0] > first.seq and (
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
        return Verification(walk.count, first.seq, walk.last.seq, walk.last.hash, findings,
                            expired_through)


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


def _walk(conn: Connection, batch: int, after: tuple[int, datetime | None] = (0, None),
          limit: int | None = None) -> Iterator[AuditRecord]:
    # Keyset pagination on the primary key (seq, recorded_at): a forged record that repeats a
    # seq is read too, next to the real one.
    seq, at = after
    given = 0
    while limit is None or given < limit:
        query = select(audit_log).order_by(audit_log.c.seq, audit_log.c.recorded_at)
        if at is None:
            query = query.where(audit_log.c.seq > seq)
        else:
            query = query.where(tuple_(audit_log.c.seq, audit_log.c.recorded_at) > tuple_(seq, at))
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
    ordered = []
    for event in events:
        at = _utc(event.at or now)
        if floor is not None and at < floor:
            at = floor
        floor = at
        ordered.append(replace(event, at=at))
    return ordered


def _row(record: AuditRecord) -> dict:
    return {"seq": record.seq, "recorded_at": record.at, "node": record.node,
            "action": record.action, "actor": record.actor, "outcome": record.outcome,
            "subject": record.subject, "source": record.source,
            "detail": _JSON.encode(record.detail),
            "prev_hash": record.prev_hash, "hash": record.hash}


def record_from_row(row) -> AuditRecord:
    try:
        detail = json.loads(row.detail)
    except ValueError:  # tampered text: keep it, so that the hash check names the record
        detail = {"unreadable": row.detail}
    return AuditRecord(row.seq, _utc(row.recorded_at), row.node, row.action, row.actor,
                       row.outcome, row.subject, row.source, detail, row.prev_hash, row.hash)


__all__ = ["AuditTrail", "EXPIRED", "Located", "Verification", "expiry_anchor", "record_from_row"]

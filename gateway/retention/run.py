"""One retention run: each kind's data older than its days is removed; the message index
(messages, translations, deliveries) stays. Blocking: run it in a database thread or from the
command line.

PostgreSQL: expiry is by whole months. Everything recorded before the first day (UTC) of the
month of `now - days` goes: the monthly partitions that end by then are dropped, and rows of
those months that sit in the DEFAULT partition are deleted in batches. One node runs at a time
(a session advisory lock; another node skips and says so). A DROP waits at most LOCK_TIMEOUT
(300 ms) for its lock (it needs ACCESS EXCLUSIVE on the parent, and a waiting request holds up
every writer behind it), then retries a few seconds later, for about half a minute, then
leaves the month for the next run. (DETACH ... CONCURRENTLY, which would not need that lock,
is refused by PostgreSQL on a table with a DEFAULT partition.)

SQLite: rows older than `now - days` are deleted `batch_size` at a time, each batch its own
short write transaction so that ingest keeps going, then the freed pages are given back to the
file by `PRAGMA incremental_vacuum`, a few at a time. A database made before auto_vacuum was
set (gateway.store.database) is converted once, with a VACUUM, and the report says so.

The audit trail stays verifiable: before its records 1..N are removed, a `retention.expired`
record naming N and the hash of record N is appended (gateway.audit.trail.expiry_anchor), and
`verify` accepts a trail that starts at N+1 because of it. The other kinds' expiry is recorded
in the trail too (kind, cutoff, count).
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from sqlalchemy import DateTime, Engine, bindparam, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from gateway.audit.chain import AuditEvent
from gateway.audit.trail import EXPIRED, AuditTrail, expiry_anchor
from gateway.config import RetentionConfig
from gateway.retention.partitions import (LOCK_TIMEOUT, TIME_COLUMNS, Month, default_partition,
                                          ensure_partitions, lock_not_granted, partitions_of, utc)
from gateway.store.database import write_transaction
from gateway.store.schema import audit_exports, audit_log

log = logging.getLogger(__name__)

KINDS = {"raw_payloads": "message_payloads", "canonical": "canonical_bundles", "audit": "audit_log"}
# Tables that expire with a kind's table, by the same time column and cutoff: the patient
# identifiers of the bundles (the console's patient search) go with the bundles.
COMPANIONS = {"canonical": ("patient_identifiers",)}
RUN_LOCK = 0x72_65_74_65_6E_74  # the advisory lock of a run ("retent" in ASCII)
# Attempts at a DROP whose lock is not granted, DROP_PAUSE seconds apart: each waits only
# LOCK_TIMEOUT (ingest queues behind it meanwhile), so it is tried often, for about half a
# minute, before its month is left for the next run.
DROP_TRIES = 10
DROP_PAUSE = 3.0
VACUUM_STEP = 1024  # pages given back to the file per incremental_vacuum (4 MiB of 4 KiB pages)


@dataclass(frozen=True)
class KindReport:
    kind: str  # raw_payloads | canonical | audit
    table: str
    days: int | None  # None: kept forever, nothing done
    cutoff: datetime | None = None  # now - days
    before: datetime | None = None  # what was recorded before this went (PG: a month start)
    rows: int = 0  # rows deleted
    partitions: tuple[str, ...] = ()  # monthly partitions dropped (PostgreSQL)
    seconds: float = 0.0
    through_seq: int | None = None  # audit: the records 1..through_seq expired
    left: tuple[str, ...] = ()  # partitions whose lock was not granted: the next run drops them
    # audit: the records past this seq were due but kept, as the ATNA export has not sent them
    held_after: int | None = None

    def as_dict(self) -> dict:
        return {"kind": self.kind, "table": self.table, "days": self.days,
                "cutoff": _iso(self.cutoff), "before": _iso(self.before), "rows": self.rows,
                "partitions": list(self.partitions), "seconds": round(self.seconds, 3),
                "through_seq": self.through_seq, "left": list(self.left),
                "held_after": self.held_after}

    def line(self) -> str:
        if self.days is None:
            return f"{self.kind:<13} kept forever"
        removed = [f"{len(self.partitions)} partition(s) dropped"] if self.partitions else []
        removed.append(f"{self.rows} row(s) deleted")
        if self.through_seq is not None:
            removed.append(f"records up to #{self.through_seq}")
        text_ = (f"{self.kind:<13} {self.days} days: recorded before {_iso(self.before)} expired: "
                 f"{', '.join(removed)} in {self.seconds:.2f} s")
        if self.partitions:
            text_ += f" ({', '.join(self.partitions)})"
        if self.left:
            text_ += f"; not dropped, lock not granted in time: {', '.join(self.left)}"
        if self.held_after is not None:
            text_ += (f"; records after #{self.held_after} kept until the ATNA export has sent "
                      f"them")
        return text_


@dataclass(frozen=True)
class VacuumReport:
    converted: bool  # the database was VACUUMed into auto_vacuum=INCREMENTAL by this run
    pages: int  # pages given back to the file
    bytes: int
    seconds: float

    def as_dict(self) -> dict:
        return {"converted": self.converted, "pages": self.pages, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}

    def line(self) -> str:
        text_ = (f"incremental vacuum: {self.pages} page(s), {self.bytes / 1048576:.1f} MiB "
                 f"given back to the file in {self.seconds:.2f} s")
        if self.converted:
            text_ = ("converted the database to auto_vacuum=INCREMENTAL (one VACUUM, needed once "
                     "for a database made before it was set); ") + text_
        return text_


@dataclass(frozen=True)
class RetentionReport:
    now: datetime
    backend: str  # sqlite | postgresql
    kinds: tuple[KindReport, ...] = ()
    created: tuple[str, ...] = ()  # monthly partitions created ahead (PostgreSQL)
    vacuum: VacuumReport | None = None  # SQLite
    skipped: str | None = None  # why nothing was done (another node is running it)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"now": _iso(self.now), "backend": self.backend, "skipped": self.skipped,
                "kinds": [k.as_dict() for k in self.kinds], "created": list(self.created),
                "vacuum": self.vacuum.as_dict() if self.vacuum else None,
                "seconds": round(self.seconds, 3)}

    def lines(self) -> list[str]:
        head = f"retention run at {_iso(self.now)} on {self.backend}"
        if self.skipped:
            return [f"{head}: skipped: {self.skipped}"]
        lines = [f"{head}: {self.seconds:.2f} s"] + ["  " + k.line() for k in self.kinds]
        if self.created:
            lines.append(f"  partitions created: {', '.join(self.created)}")
        if self.vacuum is not None:
            lines.append("  " + self.vacuum.line())
        return lines


def run_retention(engine: Engine, config: RetentionConfig, now: datetime,
                  trail: AuditTrail | None = None, stop: threading.Event | None = None,
                  exports: Sequence[str] = ()) -> RetentionReport:
    """Expire each kind's data older than its days at `now`; see the module docstring. When
    `stop` is set (the gateway is stopping), the batches in progress end early: the next run
    goes on from there. Audit records the ATNA export to one of `exports` (collector names,
    gateway.audit.export.collector_name) has not sent yet are kept, however old."""
    started = time.monotonic()
    now = utc(now)
    trail = trail or AuditTrail(engine, socket.gethostname())
    pace = _Pace(max(1, config.batch_size), stop)
    exports = tuple(exports)
    backend = engine.dialect.name
    if backend != "postgresql":
        kinds = tuple(_expire(_expire_sqlite, engine, kind, getattr(config, kind), now, pace,
                              trail, exports) for kind in KINDS)
        vacuum = _vacuum_sqlite(engine, pace)
        report = RetentionReport(now, backend, kinds, vacuum=vacuum,
                                 seconds=time.monotonic() - started)
    else:
        with engine.connect() as holder:
            if not holder.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": RUN_LOCK}).scalar():
                holder.commit()
                report = RetentionReport(now, backend, skipped="another node is running retention")
                log.info("retention: %s", report.skipped)
                return report
            holder.commit()
            try:
                with engine.connect() as connection:
                    created = tuple(ensure_partitions(connection, now))
                kinds = tuple(_expire(_expire_pg, engine, kind, getattr(config, kind), now,
                                      pace, trail, exports) for kind in KINDS)
            finally:
                holder.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": RUN_LOCK})
                holder.commit()
        report = RetentionReport(now, backend, kinds, created, seconds=time.monotonic() - started)
    for line in report.lines():
        log.info("%s", line)
    return report


@dataclass(frozen=True)
class _Pace:
    size: int  # rows per batch
    stop: threading.Event | None  # set when the gateway stops: end the batches early

    def stopped(self) -> bool:
        return self.stop is not None and self.stop.is_set()


# -- PostgreSQL -------------------------------------------------------------------------------


def _expire(expire, engine: Engine, kind: str, days: int | None, now: datetime, pace: _Pace,
            trail: AuditTrail, exports: tuple[str, ...]) -> KindReport:
    """One kind: nothing when it is kept forever, else `expire` (the backend's) of what was
    recorded `days` before `now`."""
    if days is None:
        return KindReport(kind, KINDS[kind], None)
    return expire(engine, kind, days, now - timedelta(days=days), pace, trail, exports,
                  time.monotonic())


def _expire_pg(engine: Engine, kind: str, days: int, cutoff: datetime, pace: _Pace,
               trail: AuditTrail, exports: tuple[str, ...], started: float) -> KindReport:
    table = KINDS[kind]
    before = Month.of(cutoff).start
    if kind == "audit":
        return _expire_audit_pg(engine, trail, days, cutoff, before, _expiring(engine, table, before),
                                started, exports, pace)
    dropped, left, rows = (), (), 0
    for name in (table,) + COMPANIONS.get(kind, ()):
        gone, kept = _drop_partitions(engine, name, _expiring(engine, name, before))
        dropped, left = dropped + gone, left + kept
        rows += _delete_default_pg(engine, name, before, pace)
    report = KindReport(kind, table, days, cutoff, before, rows, dropped,
                        time.monotonic() - started, left=left)
    _record_expiry(trail, report)
    return report


def _expiring(engine: Engine, table: str, before: datetime) -> tuple[str, ...]:
    """The monthly partitions of `table` that end by `before`, oldest first."""
    with engine.connect() as connection:
        months = sorted((month, name) for name, month in partitions_of(connection, table).items()
                        if month is not None and month.end <= before)
    return tuple(name for _, name in months)


def _drop_partitions(engine: Engine, table: str, names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    dropped, left = [], []
    for name in names:
        for attempt in range(DROP_TRIES):
            try:
                with engine.begin() as connection:
                    _drop(connection, name)
                dropped.append(name)
                break
            except OperationalError as error:
                if not lock_not_granted(error):
                    raise
                if attempt + 1 < DROP_TRIES:
                    time.sleep(DROP_PAUSE)
        else:
            log.warning("retention: %s not dropped, its lock was not granted in time", name)
            left.append(name)
    return tuple(dropped), tuple(left)


def _drop(connection: Connection, name: str) -> None:
    # DROP of an attached month locks the parent and the DEFAULT partition ACCESS EXCLUSIVE
    # for milliseconds, and not `messages`: its foreign key is the parent's. (DETACH, then
    # DROP, would lock `messages` too, to remove the month's own copy of the key.)
    connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    # The name is one of the table's partitions, read from pg_inherits (partitions_of).
    connection.execute(text(f"DROP TABLE {name}"))


def _delete_default_pg(engine: Engine, table: str, before: datetime, pace: _Pace) -> int:
    """Rows recorded before `before` in the DEFAULT partition, deleted `batch` at a time."""
    default, column = default_partition(table), TIME_COLUMNS[table]
    statement = text(f"DELETE FROM {default} WHERE ctid = ANY(ARRAY("
                     f"SELECT ctid FROM {default} WHERE {column} < :before LIMIT :batch))")
    total = 0
    while True:
        with engine.begin() as connection:
            count = connection.execute(statement, {"before": before, "batch": pace.size}).rowcount
        total += count
        if count < pace.size or pace.stopped():
            return total


def _expire_audit_pg(engine: Engine, trail: AuditTrail, days: int, cutoff: datetime,
                     before: datetime, expiring: tuple[str, ...], started: float,
                     exports: tuple[str, ...], pace: _Pace) -> KindReport:
    """The anchor first, in a transaction of its own: it holds the chain's lock, which every
    ingest transaction takes to append its receipt, so nothing else happens in it (the deletes
    of a month in the DEFAULT partition held ingest up for as long as they took: 3.9 s for a
    million records in test_retention_load, minutes for a month of the national platform).
    Then the records 1..N go oldest first: a month's partition dropped, the rows of the DEFAULT
    partition deleted in seq order a batch per transaction, so that a run that stops (a lock
    not granted in time, the gateway stopping) leaves a trail that starts inside the announced
    range, which verify accepts; the next run goes on from there. Records an ATNA export has
    not sent stay (their months are not dropped: their older rows are deleted)."""
    table = KINDS["audit"]
    for attempt in range(DROP_TRIES):
        try:
            with write_transaction(engine) as connection:
                # Bounds the wait for the chain's lock: appenders queue behind a waiting request.
                connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
                bound, held = _audit_bound(connection, trail, before, exports)
                if bound is None:
                    return KindReport("audit", table, days, cutoff, before,
                                      seconds=time.monotonic() - started, held_after=held)
                through, last_hash = bound
                dropping = () if held is not None else expiring
                rows = connection.execute(select(func.count()).select_from(audit_log)
                                          .where(audit_log.c.seq <= through)).scalar()
                trail.append_in(connection, [expiry_anchor(
                    through, last_hash, kind="audit", cutoff=_iso(cutoff), before=_iso(before),
                    rows=rows, partitions=list(dropping))])
            break
        except OperationalError as error:
            if not lock_not_granted(error):
                raise
            if attempt + 1 < DROP_TRIES:
                time.sleep(DROP_PAUSE)
    else:
        log.warning("retention: audit records not expired, the chain's lock was not granted in time")
        return KindReport("audit", table, days, cutoff, before, seconds=time.monotonic() - started,
                          left=expiring)
    dropped, left = _remove_audit_pg(engine, through, before, dropping, pace)
    return KindReport("audit", table, days, cutoff, before, rows, dropped,
                      time.monotonic() - started, through, left=left, held_after=held)


def _remove_audit_pg(engine: Engine, through: int, before: datetime, dropping: tuple[str, ...],
                     pace: _Pace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Remove the records 1..`through` from the lowest seq up: the rows below each partition of
    `dropping` (the DEFAULT partition's), then the partition, then the rest. Records are in
    time order along seq (gateway.audit.trail), so a month's records are one range of seqs.
    Stops at a partition whose lock is not granted, or when the gateway stops: the next run
    goes on. The partitions dropped, and those left."""
    with engine.connect() as connection:
        lowest = [(connection.execute(text(f"SELECT min(seq) FROM {name}")).scalar(), name)
                  for name in dropping]
    # An empty month first: nothing of the trail is in it.
    lowest.sort(key=lambda found: -1 if found[0] is None else found[0])
    # Each batch: the seq of its last record, then the records up to it. `recorded_at` bounds
    # both to the months that expire (the others are pruned), `seq` is their index's first
    # column, and each batch starts after the last (not over the index entries it left dead).
    last = text("SELECT seq FROM audit_log WHERE seq > :after AND seq < :below "
                "AND recorded_at < :before ORDER BY seq OFFSET :skip LIMIT 1")
    delete = text("DELETE FROM audit_log WHERE seq > :after AND seq <= :upto AND seq < :below "
                  "AND recorded_at < :before")
    dropped, after = [], -2**63
    for seq, name in lowest + [(through + 1, None)]:
        while seq is not None:
            with engine.begin() as connection:
                bounds = {"after": after, "below": seq, "before": before}
                upto = connection.execute(last, {**bounds, "skip": pace.size - 1}).scalar()
                connection.execute(delete, {**bounds, "upto": seq if upto is None else upto})
            if upto is None:
                break
            after = upto
            if pace.stopped():
                return tuple(dropped), tuple(n for _, n in lowest if n not in dropped)
        if name is None:
            break
        gone, _ = _drop_partitions(engine, "audit_log", (name,))
        if not gone:
            return tuple(dropped), tuple(n for _, n in lowest if n not in dropped)
        dropped.append(name)
    return tuple(dropped), ()


# -- SQLite -----------------------------------------------------------------------------------


def _expire_sqlite(engine: Engine, kind: str, days: int, cutoff: datetime, pace: _Pace,
                   trail: AuditTrail, exports: tuple[str, ...], started: float) -> KindReport:
    table = KINDS[kind]
    if kind == "audit":
        return _expire_audit_sqlite(engine, trail, days, cutoff, pace, started, exports)
    rows = sum(_delete_batches(engine, name, TIME_COLUMNS[name], cutoff, pace)
               for name in (table,) + COMPANIONS.get(kind, ()))
    report = KindReport(kind, table, days, cutoff, cutoff, rows, seconds=time.monotonic() - started)
    _record_expiry(trail, report)
    return report


def _delete_batches(engine: Engine, table: str, column: str, before: datetime, pace: _Pace) -> int:
    """Delete rows recorded before `before`, `batch` per write transaction, walking the table
    in rowid order (arrival order) from where the last batch stopped, so that no batch scans
    again what an earlier one kept."""
    find = text(f"SELECT max(rowid), count(*) FROM (SELECT rowid FROM {table} WHERE rowid > :last "
                f"AND {column} < :before ORDER BY rowid LIMIT :batch)"
                ).bindparams(bindparam("before", type_=DateTime(timezone=True)))
    delete = text(f"DELETE FROM {table} WHERE rowid > :last AND rowid <= :upto AND {column} < :before"
                  ).bindparams(bindparam("before", type_=DateTime(timezone=True)))
    total, last = 0, 0
    while True:
        with write_transaction(engine) as connection:
            upto, found = connection.execute(find, {"last": last, "before": before,
                                                    "batch": pace.size}).one()
            if found:
                total += connection.execute(delete, {"last": last, "upto": upto, "before": before}).rowcount
        if found < pace.size or pace.stopped():
            return total
        last = upto


def _expire_audit_sqlite(engine: Engine, trail: AuditTrail, days: int, cutoff: datetime,
                         pace: _Pace, started: float, exports: tuple[str, ...] = ()) -> KindReport:
    """The anchor first (committed), then the records 1..N in seq order, a batch at a time: an
    interrupted run leaves a trail that starts inside the announced range, which verify
    accepts."""
    table = KINDS["audit"]
    with write_transaction(engine) as connection:
        bound, held = _audit_bound(connection, trail, cutoff, exports)
        if bound is None:
            return KindReport("audit", table, days, cutoff, cutoff, seconds=time.monotonic() - started,
                              held_after=held)
        through, last_hash = bound
        rows = connection.execute(select(func.count()).select_from(audit_log)
                                  .where(audit_log.c.seq <= through)).scalar()
        trail.append_in(connection, [expiry_anchor(through, last_hash, kind="audit",
                                                   cutoff=_iso(cutoff), before=_iso(cutoff),
                                                   rows=rows)])
    delete = text("DELETE FROM audit_log WHERE seq IN (SELECT seq FROM audit_log "
                  "WHERE seq <= :through ORDER BY seq LIMIT :batch)")
    removed = 0
    while True:
        with write_transaction(engine) as connection:
            count = connection.execute(delete, {"through": through, "batch": pace.size}).rowcount
        removed += count
        if count < pace.size or pace.stopped():
            break
    return KindReport("audit", table, days, cutoff, cutoff, removed,
                      seconds=time.monotonic() - started, through_seq=through, held_after=held)


def _audit_bound(connection: Connection, trail: AuditTrail, before: datetime,
                 exports: tuple[str, ...]) -> tuple[tuple[int, str] | None, int | None]:
    """The last audit record that may go ((its seq, its hash), or None) and, when the ATNA
    export holds the expiry back, the seq after which records are kept (else None): those
    recorded before `before`, but not past what every collector of `exports` has been sent."""
    bound = trail.expiry_bound(connection, before)
    if bound is None or not exports:
        return bound, None
    sent = dict(connection.execute(select(audit_exports.c.collector, audit_exports.c.last_seq)
                                   .where(audit_exports.c.collector.in_(exports))).all())
    exported = min(sent.get(collector, 0) for collector in exports)
    if exported >= bound[0]:
        return bound, None
    if exported == 0:
        return None, 0
    last_hash = connection.execute(select(audit_log.c.hash).where(audit_log.c.seq == exported)
                                   .order_by(audit_log.c.recorded_at).limit(1)).scalar()
    # A collector's last_seq names a record of the trail; gone already (an earlier expiry):
    # nothing more may go.
    return ((exported, last_hash) if last_hash is not None else None), exported


def _vacuum_sqlite(engine: Engine, pace: _Pace) -> VacuumReport:
    """Give the free pages back to the file, VACUUM_STEP pages per statement (each its own
    short write), converting the database to incremental auto-vacuum first if it is not."""
    started = time.monotonic()
    raw = engine.raw_connection()  # autocommit at the driver (database._sqlite_pragmas)
    try:
        cursor = raw.cursor()
        converted = False
        page_size = cursor.execute("PRAGMA page_size").fetchone()[0]
        before = cursor.execute("PRAGMA page_count").fetchone()[0]
        if cursor.execute("PRAGMA auto_vacuum").fetchone()[0] != 2 and _is_file(cursor):
            log.warning("retention: converting the database to auto_vacuum=INCREMENTAL "
                        "(a VACUUM, once: it was made before the setting)")
            cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cursor.execute("VACUUM")
            converted = True
        while True:
            free = cursor.execute("PRAGMA freelist_count").fetchone()[0]
            if not free or pace.stopped():
                break
            cursor.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP})").fetchall()
            if cursor.execute("PRAGMA freelist_count").fetchone()[0] >= free:
                break  # nothing given back (not incremental): do not loop
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        after = cursor.execute("PRAGMA page_count").fetchone()[0]
        cursor.close()
    finally:
        raw.close()
    pages = max(before - after, 0)
    return VacuumReport(converted, pages, pages * page_size, time.monotonic() - started)


def _is_file(cursor) -> bool:
    return any(row[1] == "main" and row[2] for row in cursor.execute("PRAGMA database_list").fetchall())


# -- Shared -----------------------------------------------------------------------------------


def _record_expiry(trail: AuditTrail, report: KindReport) -> None:
    """A `retention.expired` record for a kind other than the audit trail, when it removed
    anything."""
    if not (report.rows or report.partitions):
        return
    trail.append([AuditEvent(EXPIRED, "system", subject=report.kind, detail={
        "kind": report.kind, "cutoff": _iso(report.cutoff), "before": _iso(report.before),
        "rows": report.rows, "partitions": list(report.partitions)})])


def _iso(instant: datetime | None) -> str | None:
    return utc(instant).strftime("%Y-%m-%dT%H:%M:%SZ") if instant is not None else None


__all__ = ["KINDS", "KindReport", "RetentionReport", "VacuumReport", "run_retention"]

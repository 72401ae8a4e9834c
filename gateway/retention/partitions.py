"""Monthly partitions of the tables that expire (PostgreSQL only; schema.PARTITIONED).

Each table is PARTITION BY RANGE of its time column, with a DEFAULT partition (migration 0008)
that catches rows of any month that has no partition of its own. The month of `message_payloads`
that starts on 1 November 2026 UTC is `message_payloads_2026_11`, for [2026-11-01, 2026-12-01).

`ensure_partitions` adds the current month and the next ones, each in one transaction:

- the month is created as a plain table and then ATTACHed, never with CREATE TABLE ...
  PARTITION OF: ATTACH takes SHARE UPDATE EXCLUSIVE on the parent (ingest keeps writing to the
  other months), where PARTITION OF takes ACCESS EXCLUSIVE;
- rows of that month already in the DEFAULT partition (written before the month existed, or
  copied there by migration 0008) would make the ATTACH fail, so they are moved into the new
  table first, while the DEFAULT partition is locked ACCESS EXCLUSIVE (ATTACH locks it so
  anyway): nobody adds one meanwhile;
- the foreign key to `messages` that ATTACH clones takes SHARE ROW EXCLUSIVE on `messages`
  (new messages wait) until commit, so everything that scans comes before it.

A transaction waits at most LOCK_TIMEOUT for each lock, so that it never queues for long in
front of ingest; a month not created is retried by the next run, its rows meanwhile kept in the
DEFAULT partition. The functions above `ensure_partitions` are pure.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.engine import Connection

from gateway.store.timestamps import utc

log = logging.getLogger(__name__)

# Each partitioned table and the time column it is partitioned on.
TIME_COLUMNS = {"message_payloads": "received_at", "canonical_bundles": "received_at",
                "patient_identifiers": "received_at", "audit_log": "recorded_at"}
# How long DDL waits for a lock before giving up (retention tries a DROP again a little later,
# partitions ahead are tried again by the next run). Short: while it waits, every writer of
# the table queues behind it, so a reader holding the table for minutes (an audit verify, an
# export) would stall ingest for as long as this (measured in test_retention_load: 5 s with
# "5s").
LOCK_TIMEOUT = "300ms"


@dataclass(frozen=True, order=True)
class Month:
    year: int
    month: int

    @classmethod
    def of(cls, instant: datetime) -> "Month":
        """The UTC month `instant` falls in (a naive instant is taken as UTC)."""
        instant = utc(instant)
        return cls(instant.year, instant.month)

    @property
    def start(self) -> datetime:
        return datetime(self.year, self.month, 1, tzinfo=timezone.utc)

    @property
    def end(self) -> datetime:
        return self.next().start

    def next(self) -> "Month":
        return Month(self.year + self.month // 12, self.month % 12 + 1)

    def __str__(self) -> str:
        return f"{self.year:04d}-{self.month:02d}"


def partition_name(table: str, month: Month) -> str:
    return f"{table}_{month.year:04d}_{month.month:02d}"


def default_partition(table: str) -> str:
    return f"{table}_default"


def month_of_partition(table: str, name: str) -> Month | None:
    """The month a partition's name stands for, or None (the DEFAULT one, or not ours)."""
    match = re.fullmatch(re.escape(table) + r"_(\d{4})_(\d{2})", name)
    if not match or not 1 <= int(match.group(2)) <= 12:
        return None
    return Month(int(match.group(1)), int(match.group(2)))


def months_from(now: datetime, count: int) -> list[Month]:
    """The month of `now` and the `count - 1` after it."""
    months = [Month.of(now)]
    while len(months) < count:
        months.append(months[-1].next())
    return months


def _literal(instant: datetime) -> str:
    return "'" + instant.strftime("%Y-%m-%d %H:%M:%S+00:00") + "'"


# -- On the database --------------------------------------------------------------------------


def partitions_of(connection: Connection, table: str) -> dict[str, Month | None]:
    """The partitions attached to `table`: name -> month (None for DEFAULT or a foreign name)."""
    names = connection.execute(text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = CAST(:parent AS regclass)"), {"parent": table}).scalars()
    return {name: month_of_partition(table, name) for name in names}


def ensure_partitions(connection: Connection, now: datetime, months_ahead: int = 2,
                      tables: tuple[str, ...] = tuple(TIME_COLUMNS)) -> list[str]:
    """Create the partition of the month of `now` and of the `months_ahead` after it, for each
    table, where missing; the names created. Nothing on SQLite.

    Given a connection outside a transaction, each month is created in a transaction of its
    own (locks held for milliseconds); inside one, everything joins the caller's. A month whose
    locks are not granted within LOCK_TIMEOUT is left for the next run (its rows go to the
    DEFAULT partition meanwhile, so nothing is lost); the others are still created."""
    if connection.dialect.name != "postgresql":
        return []
    created = []
    for table in tables:
        for month in months_from(now, months_ahead + 1):
            if connection.in_transaction():
                made = _create_month(connection, table, month)
            else:
                try:
                    with connection.begin():
                        made = _create_month(connection, table, month)
                except OperationalError as error:  # a lock not granted in time: the next run retries
                    if not lock_not_granted(error):
                        raise
                    log.warning("partition %s not created: %s", partition_name(table, month),
                                "lock not granted in time")
                    continue
            if made:
                created.append(partition_name(table, month))
    return created


def lock_not_granted(error: Exception) -> bool:
    """Whether a statement failed because a lock was not granted within lock_timeout."""
    return getattr(getattr(error, "orig", None), "sqlstate", None) == "55P03"


def _create_month(connection: Connection, table: str, month: Month) -> bool:
    name, default, column = partition_name(table, month), default_partition(table), TIME_COLUMNS[table]
    connection.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    # One creator at a time (SHARE UPDATE EXCLUSIVE conflicts with itself, not with writes);
    # another node that created the month meanwhile is seen once the lock is granted.
    connection.execute(text(f"LOCK TABLE {table} IN SHARE UPDATE EXCLUSIVE MODE"))
    if connection.execute(text("SELECT to_regclass(:name)"), {"name": name}).scalar() is not None:
        return False
    start, end = _literal(month.start), _literal(month.end)
    connection.execute(text(f"LOCK TABLE {default} IN ACCESS EXCLUSIVE MODE"))
    connection.execute(text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)"))
    moved = connection.execute(text(
        f"WITH moved AS (DELETE FROM {default} WHERE {column} >= {start} AND {column} < {end} "
        f"RETURNING *) INSERT INTO {name} SELECT * FROM moved")).rowcount
    # ATTACH must prove the DEFAULT partition holds no row of the month: a CHECK constraint
    # saying so lets it skip its own scan. The scan happens here instead, before the ATTACH
    # takes SHARE ROW EXCLUSIVE on `messages` (cloning the foreign key), which holds up the
    # insertion of messages until commit: that stays a matter of milliseconds.
    elsewhere = f"{name}_elsewhere"
    connection.execute(text(f"ALTER TABLE {default} ADD CONSTRAINT {elsewhere} "
                            f"CHECK ({column} < {start} OR {column} >= {end})"))
    connection.execute(text(f"ALTER TABLE {table} ATTACH PARTITION {name} "
                            f"FOR VALUES FROM ({start}) TO ({end})"))
    connection.execute(text(f"ALTER TABLE {default} DROP CONSTRAINT {elsewhere}"))
    log.info("partition %s created%s", name,
             f" ({moved} rows moved from {default})" if moved else "")
    return True


__all__ = ["LOCK_TIMEOUT", "Month", "TIME_COLUMNS", "default_partition", "ensure_partitions",
           "lock_not_granted", "month_of_partition", "months_from", "partition_name", "partitions_of", "utc"]

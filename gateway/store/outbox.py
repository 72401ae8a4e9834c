"""The outbox: deliveries to enqueue, claim, and settle. Functions take a connection (one
transaction, the caller's) and plain data, like the rest of the store.

- `enqueue` runs inside the transaction that stores a translation, so a translated message and
  its deliveries commit together. Translating a message again (a replay) reopens a delivery
  that is dead, or one whose content changed (with a new idempotency key: a new request);
  an unchanged delivered one is left alone.
- `claim` hands due deliveries to one node for `lease` seconds. On PostgreSQL several nodes
  claim concurrently with `FOR UPDATE SKIP LOCKED`; on SQLite (one node) the same query runs
  in a write transaction. A delivery is due when its time has come, nobody holds a live lease
  on it, and no earlier delivery of the same patient to the same destination is pending:
  per-patient order, across nodes.
- `settle` records attempts: delivered, retry at a given time, or dead. A node whose lease was
  taken over meanwhile (it was too slow) records its attempt but does not change the row.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable

from sqlalchemy import Connection, DateTime, bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.schema import deliveries, delivery_attempts, translations

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
STATUSES = (PENDING, DELIVERED, DEAD)
# A dead letter keeps the peer's answer, up to this many bytes.
MAX_KEPT_RESPONSE = 64 * 1024
_KEY_NAMESPACE = uuid.UUID("7d0c3f1e-2b7a-5b8e-9a43-4d1f6a2c8e10")


@dataclass(frozen=True)
class Enqueue:
    message_id: int
    destination: str
    patient_key: str
    bundle_sha256: str


@dataclass(frozen=True)
class Claim:
    """A delivery this node now holds: what to send, and how often it was tried."""

    id: int
    message_id: int
    destination: str
    idempotency_key: str
    attempts: int
    first_attempt_at: datetime | None
    bundle: str  # the canonical bundle, as stored JSON text


@dataclass(frozen=True)
class Settlement:
    """The result of one attempt. `next_attempt_at` None with kind transient: give up (dead)."""

    delivery_id: int
    kind: str  # delivered | transient | permanent
    reason: str
    attempted_at: datetime
    duration_ms: int
    code: int | None = None
    response: bytes | None = None
    next_attempt_at: datetime | None = None


def bundle_digest(bundle_json: str) -> str:
    return hashlib.sha256(bundle_json.encode("utf-8")).hexdigest()


def idempotency_key(destination: str, message_id: int, bundle_sha256: str) -> str:
    """Stable for the same content to the same destination: retries, restarts, other nodes
    and replays of unchanged content all send the same key; changed content gets a new one."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{destination}\n{message_id}\n{bundle_sha256}"))


def enqueue(connection: Connection, entries: Iterable[Enqueue], now: datetime) -> int:
    """Create (or reopen) the deliveries of freshly stored translations; how many changed."""
    entries = list(entries)
    if not entries:
        return 0
    existing = {
        (row.message_id, row.destination): row
        for row in connection.execute(
            select(deliveries.c.id, deliveries.c.message_id, deliveries.c.destination,
                   deliveries.c.status, deliveries.c.bundle_sha256)
            .where(deliveries.c.message_id.in_({e.message_id for e in entries})))
    }
    new, reopened = [], []
    for entry in entries:
        key = idempotency_key(entry.destination, entry.message_id, entry.bundle_sha256)
        row = existing.get((entry.message_id, entry.destination))
        if row is None:
            new.append({"message_id": entry.message_id, "destination": entry.destination,
                        "patient_key": entry.patient_key, "status": PENDING,
                        "idempotency_key": key, "bundle_sha256": entry.bundle_sha256,
                        "created_at": now, "next_attempt_at": now, "attempts": 0})
        elif row.status == DEAD or (row.status == DELIVERED and row.bundle_sha256 != entry.bundle_sha256):
            reopened.append({"b_id": row.id, "b_key": key, "b_sha": entry.bundle_sha256,
                             "b_patient": entry.patient_key, "b_now": now})
        elif row.status == PENDING and row.bundle_sha256 != entry.bundle_sha256:
            # Still waiting: the next attempt carries the new content, under a new key.
            reopened.append({"b_id": row.id, "b_key": key, "b_sha": entry.bundle_sha256,
                             "b_patient": entry.patient_key, "b_now": None})
    if new:
        insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(deliveries)
        # Two nodes translating the same message: the first insert wins, the content is the same.
        connection.execute(insert.on_conflict_do_nothing(
            index_elements=[deliveries.c.message_id, deliveries.c.destination]), new)
    for item in reopened:
        values = {"idempotency_key": item["b_key"], "bundle_sha256": item["b_sha"],
                  "patient_key": item["b_patient"]}
        if item["b_now"] is not None:
            values.update(status=PENDING, next_attempt_at=item["b_now"], attempts=0,
                          first_attempt_at=None, finished_at=None, lease_owner=None,
                          lease_until=None)
        connection.execute(update(deliveries).where(deliveries.c.id == item["b_id"]).values(**values))
    return len(new) + len(reopened)


_DUE = """
    SELECT d.id FROM deliveries d
    WHERE d.status = 'pending' AND d.destination = :destination AND d.next_attempt_at <= :now
      AND (d.lease_until IS NULL OR d.lease_until < :now)
      AND NOT EXISTS (
        SELECT 1 FROM deliveries e
        WHERE e.status = 'pending' AND e.destination = d.destination
          AND e.patient_key = d.patient_key AND e.message_id < d.message_id)
    ORDER BY d.message_id
    LIMIT :limit
"""


def claim(connection: Connection, node: str, destination: str, now: datetime, lease: float,
          limit: int) -> list[Claim]:
    """Take up to `limit` due deliveries to `destination` for `node`, oldest message first."""
    params = {"destination": destination, "now": now, "limit": limit}
    locking = " FOR UPDATE OF d SKIP LOCKED" if connection.dialect.name == "postgresql" else ""
    # Typed, so that SQLite compares the timestamp in the form it stores them.
    query = text(_DUE + locking).bindparams(bindparam("now", type_=DateTime(timezone=True)))
    ids = list(connection.execute(query, params).scalars())
    if not ids:
        return []
    connection.execute(update(deliveries).where(deliveries.c.id.in_(ids))
                       .values(lease_owner=node, lease_until=now + timedelta(seconds=lease)))
    rows = connection.execute(
        select(deliveries.c.id, deliveries.c.message_id, deliveries.c.destination,
               deliveries.c.idempotency_key, deliveries.c.attempts, deliveries.c.first_attempt_at,
               translations.c.bundle)
        .join(translations, translations.c.message_id == deliveries.c.message_id)
        .where(deliveries.c.id.in_(ids)).order_by(deliveries.c.message_id))
    return [Claim(row.id, row.message_id, row.destination, row.idempotency_key, row.attempts,
                  _aware(row.first_attempt_at), row.bundle) for row in rows]


def settle(connection: Connection, node: str, node_results: Iterable[Settlement]) -> None:
    """Record attempts and move their deliveries on (only where this node still holds them)."""
    results = list(node_results)
    if not results:
        return
    connection.execute(delivery_attempts.insert(), [
        {"delivery_id": r.delivery_id, "attempted_at": r.attempted_at, "node": node,
         "outcome": r.kind, "reason": r.reason, "code": r.code, "duration_ms": r.duration_ms}
        for r in results])
    finished, retried = [], []
    for r in results:
        common = {"b_id": r.delivery_id, "b_node": node, "b_at": r.attempted_at,
                  "b_reason": r.reason, "b_code": r.code}
        if r.kind == "transient" and r.next_attempt_at is not None:
            retried.append({**common, "b_next": r.next_attempt_at})
        else:
            status = DELIVERED if r.kind == "delivered" else DEAD
            response = r.response[:MAX_KEPT_RESPONSE] if (status == DEAD and r.response) else None
            finished.append({**common, "b_status": status, "b_response": response})
    mine = (deliveries.c.id == bindparam("b_id")) & (deliveries.c.lease_owner == bindparam("b_node"))
    attempted = {"attempts": deliveries.c.attempts + 1,
                 "first_attempt_at": _coalesce(deliveries.c.first_attempt_at, bindparam("b_at")),
                 "lease_owner": None, "lease_until": None,
                 "last_reason": bindparam("b_reason"), "last_code": bindparam("b_code")}
    if retried:
        connection.execute(update(deliveries).where(mine).values(
            next_attempt_at=bindparam("b_next"), **attempted), retried)
    if finished:
        connection.execute(update(deliveries).where(mine).values(
            status=bindparam("b_status"), finished_at=bindparam("b_at"),
            last_response=bindparam("b_response"), **attempted), finished)


def release(connection: Connection, node: str, ids: Iterable[int]) -> None:
    """Give back deliveries this node claimed but will not send (it is stopping)."""
    ids = list(ids)
    if ids:
        connection.execute(update(deliveries).where(deliveries.c.id.in_(ids),
                                                    deliveries.c.lease_owner == node)
                           .values(lease_owner=None, lease_until=None))


def reopen_dead(connection: Connection, message_ids: Iterable[int], now: datetime) -> int:
    """Dead deliveries of these messages back to pending, same key (a replay); how many."""
    ids = list(message_ids)
    if not ids:
        return 0
    return connection.execute(
        update(deliveries).where(deliveries.c.message_id.in_(ids), deliveries.c.status == DEAD)
        .values(status=PENDING, next_attempt_at=now, attempts=0, first_attempt_at=None,
                finished_at=None, lease_owner=None, lease_until=None)).rowcount


def dead_message_ids(connection: Connection) -> list[int]:
    """Messages with at least one dead delivery, oldest first."""
    return list(connection.execute(
        select(deliveries.c.message_id).where(deliveries.c.status == DEAD).distinct()
        .order_by(deliveries.c.message_id)).scalars())


def _coalesce(column, value):
    from sqlalchemy import func

    return func.coalesce(column, value)


def _aware(value: datetime | None) -> datetime | None:
    from gateway.store.translations import utc

    return utc(value) if value is not None else None

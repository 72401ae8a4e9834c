"""What an operator does to one delivery from the console. Functions take a connection (one
write transaction, the caller's) and answer with an outcome word the page turns into its
notice, and the delivery's destination (None when not found).

- `replay_delivery`: a new attempt, now, under the same idempotency key (so a peer that
  already has it answers from its memory instead of storing it twice). A dead or delivered
  delivery is reopened as `gateway.store.outbox.reopen_dead` reopens dead letters (pending,
  due now, its attempt count and first attempt reset); a pending one is made due now. One
  held by a node (in flight) is left alone, and so is one whose canonical bundle expired.
- `dead_letter`: a pending delivery that nobody holds becomes dead, with who did it as its
  last reason; it can be replayed later.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Connection, exists, or_, select, update

from gateway.store.outbox import DEAD, DELIVERED, PENDING, shared_clock
from gateway.store.schema import canonical_bundles, deliveries

REPLAYED, DEAD_LETTERED = "replayed", "dead-lettered"
NOT_FOUND, IN_FLIGHT, NOT_PENDING, EXPIRED = "not-found", "in-flight", "not-pending", "expired"


def replay_delivery(connection: Connection, message_id: int, delivery_id: int,
                    now: datetime) -> tuple[str, str | None]:
    row = _delivery(connection, message_id, delivery_id)
    if row is None:
        return NOT_FOUND, None
    now = shared_clock(connection) or now  # the leases' clock
    if _held(row, now):
        return IN_FLIGHT, row.destination
    has_bundle = connection.execute(select(exists().where(
        canonical_bundles.c.message_id == message_id))).scalar()
    if not has_bundle:
        return EXPIRED, row.destination
    free = or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now)
    if row.status == PENDING:
        changed = connection.execute(update(deliveries).where(
            deliveries.c.id == delivery_id, deliveries.c.status == PENDING, free)
            .values(next_attempt_at=now)).rowcount
    else:
        changed = connection.execute(update(deliveries).where(
            deliveries.c.id == delivery_id, deliveries.c.status.in_((DEAD, DELIVERED)))
            .values(status=PENDING, next_attempt_at=now, attempts=0, first_attempt_at=None,
                    finished_at=None, lease_owner=None, lease_until=None)).rowcount
    return (REPLAYED if changed else IN_FLIGHT), row.destination


def dead_letter(connection: Connection, message_id: int, delivery_id: int, now: datetime,
                account: str) -> tuple[str, str | None]:
    row = _delivery(connection, message_id, delivery_id)
    if row is None:
        return NOT_FOUND, None
    if row.status != PENDING:
        return NOT_PENDING, row.destination
    now = shared_clock(connection) or now  # the leases' clock
    if _held(row, now):
        return IN_FLIGHT, row.destination
    changed = connection.execute(update(deliveries).where(
        deliveries.c.id == delivery_id, deliveries.c.status == PENDING,
        or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now))
        .values(status=DEAD, finished_at=now, lease_owner=None, lease_until=None,
                last_reason=f"dead-lettered from the console by {account}"[:200])).rowcount
    return (DEAD_LETTERED if changed else IN_FLIGHT), row.destination


def _delivery(connection: Connection, message_id: int, delivery_id: int):
    return connection.execute(select(deliveries.c.id, deliveries.c.destination, deliveries.c.status,
                                     deliveries.c.lease_until)
                              .where(deliveries.c.id == delivery_id,
                                     deliveries.c.message_id == message_id)).first()


def _held(row, now: datetime) -> bool:
    if row.status != PENDING or row.lease_until is None:
        return False
    lease = row.lease_until
    if lease.tzinfo is None:
        lease = lease.replace(tzinfo=timezone.utc)  # SQLite keeps UTC without its offset
    return lease > now

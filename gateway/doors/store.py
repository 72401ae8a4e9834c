"""The HTTPS door's tables and their queries: idempotency records and refusals.

`api_requests`: one row per (facility, Idempotency-Key) of a POST. It is claimed (state
`processing`, with a lease) before the request is processed, and holds the answer once done
(state `done`), so that the same request sent again gets the same answer without being
processed again, on this node or another sharing the database. A processing row whose lease
has passed (its node died mid-request) may be taken over; so may, at once, one claimed by an
earlier process of the same node (node names are one process each: that process is gone,
killed or crashed mid-request, and its successor need not wait out the lease).

`api_refusals`: every request the door refused for who the caller is or what it asked
(unknown certificate, operation not allowed, oversize body, ...): time, listener, peer,
facility, certificate subject, operation, status and reason; never patient data. Kept for
the audit.

Both tables live on the shared `metadata` of gateway.store.schema; migration 0004 creates
them. Functions take a connection (one transaction, the caller's) and return plain data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (Column, Connection, DateTime, Index, Integer, LargeBinary, String, Table,
                        Text, delete, select, update)
from sqlalchemy.dialects import postgresql, sqlite

from gateway.store.database import shared_clock
from gateway.store.schema import Id, metadata
from gateway.store.texts import storable
from gateway.store.timestamps import utc as _aware

api_requests = Table(
    "api_requests", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("facility_id", String(64), nullable=False),
    Column("idempotency_key", String(128), nullable=False),
    Column("operation", String(64), nullable=False),
    Column("request_sha256", String(64), nullable=False),  # of method, path and body
    Column("state", String(16), nullable=False),  # processing | done
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("lease_until", DateTime(timezone=True), nullable=False),  # while processing
    Column("finished_at", DateTime(timezone=True)),
    Column("status", Integer),  # the HTTP status answered (done)
    Column("content_type", String(128)),
    Column("headers", Text),  # JSON object of the answer's own headers (Location, ...)
    Column("response", LargeBinary),  # the answer's body, byte for byte
    # The process that claimed it: "<node name>/<process instance>" (see `claimant`).
    Column("claimed_by", String(160)),
)
Index("ux_api_requests_key", api_requests.c.facility_id, api_requests.c.idempotency_key, unique=True)
Index("ix_api_requests_created_at", api_requests.c.created_at)

api_refusals = Table(
    "api_refusals", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("refused_at", DateTime(timezone=True), nullable=False),
    Column("listener", String(64), nullable=False),
    Column("peer", String(128)),
    Column("facility_id", String(64)),  # None: the certificate names no facility
    Column("certificate", String(512)),  # the client certificate's subject (RFC 4514)
    Column("door", String(8), nullable=False),  # rest | soap | mllp (a TLS client refused)
    Column("operation", String(64)),  # the API operation, or the route when it has none
    Column("status", Integer, nullable=False),  # the HTTP status answered (mllp: the one it would be)
    Column("reason", Text, nullable=False),
)
Index("ix_api_refusals_refused_at", api_refusals.c.refused_at)

PROCESSING = "processing"
DONE = "done"


@dataclass(frozen=True)
class StoredAnswer:
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Claim:
    """What a claim found: `new` (go ahead: the row is ours), `replay` (answer `answer`),
    `mismatch` (the key was used for another request), `in_progress` (another is at it)."""

    outcome: str
    answer: StoredAnswer | None = None


@dataclass(frozen=True)
class Refusal:
    refused_at: datetime
    listener: str
    peer: str | None
    facility_id: str | None
    certificate: str | None
    door: str
    operation: str | None
    status: int
    reason: str

    def as_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["refused_at"] = _aware(self.refused_at).isoformat()
        return data


def claimant(node: str, instance: str) -> str:
    """Who claims: this node's name and this process's own instance id."""
    return f"{node[:120]}/{instance}"


def _predecessor(claimed_by: str | None, me: str | None) -> bool:
    """Whether `claimed_by` is an earlier process of the node that `me` is."""
    if not claimed_by or not me or claimed_by == me:
        return False
    return claimed_by.rpartition("/")[0] == me.rpartition("/")[0]


def claim_request(connection: Connection, facility_id: str, key: str, operation: str,
                  digest: str, now: datetime, lease: float, claimed_by: str | None = None) -> Claim:
    """Claim (facility, key) for a request whose digest is `digest` (a write transaction:
    BEGIN IMMEDIATE on SQLite; on PostgreSQL the unique index settles two nodes racing).
    `claimed_by`: this process (`claimant`)."""
    until = now + timedelta(seconds=lease)
    insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(api_requests)
    inserted = connection.execute(insert.values(
        facility_id=facility_id, idempotency_key=key, operation=operation, request_sha256=digest,
        state=PROCESSING, created_at=now, lease_until=until, claimed_by=claimed_by).on_conflict_do_nothing(
        index_elements=[api_requests.c.facility_id, api_requests.c.idempotency_key])
        .returning(api_requests.c.id))  # (rowcount is not reliable here on psycopg)
    if inserted.first() is not None:
        return Claim("new")
    query = select(api_requests).where(api_requests.c.facility_id == facility_id,
                                       api_requests.c.idempotency_key == key)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).first()
    if row is None:  # deleted (released) between the two statements: the caller may retry
        return Claim("in_progress")
    if row.request_sha256 != digest:
        return Claim("mismatch")
    if row.state == DONE:
        return Claim("replay", StoredAnswer(row.status, row.content_type or "application/json",
                                            json.loads(row.headers) if row.headers else {},
                                            bytes(row.response or b"")))
    if _aware(row.lease_until) > now and not _predecessor(row.claimed_by, claimed_by):
        return Claim("in_progress")
    # Its node died mid-request: take it over (the ingest below is itself idempotent).
    connection.execute(update(api_requests).where(api_requests.c.id == row.id)
                       .values(created_at=now, lease_until=until, claimed_by=claimed_by))
    return Claim("new")


def claim_request_on_shared_clock(connection: Connection, facility_id: str, key: str, operation: str,
                                  digest: str, now: datetime, lease: float,
                                  claimed_by: str | None = None) -> Claim:
    """`claim_request` with its lease set and compared on the clock the nodes share
    (PostgreSQL's; `now` on SQLite): a node whose clock ran ahead would otherwise take over a
    request another node is still processing, and process it a second time."""
    return claim_request(connection, facility_id, key, operation, digest, shared_clock(connection) or now,
                         lease, claimed_by)


def finish_request(connection: Connection, facility_id: str, key: str, answer: StoredAnswer,
                   now: datetime) -> None:
    """Keep the answer of a claimed request, to replay it."""
    connection.execute(update(api_requests).where(
        api_requests.c.facility_id == facility_id, api_requests.c.idempotency_key == key).values(
        state=DONE, finished_at=now, status=answer.status, content_type=answer.content_type,
        headers=json.dumps(answer.headers) if answer.headers else None, response=answer.body))


def release_request(connection: Connection, facility_id: str, key: str) -> None:
    """Forget a claim whose request could not be processed (the store was down): the same
    request may then be sent again with the same key."""
    connection.execute(delete(api_requests).where(
        api_requests.c.facility_id == facility_id, api_requests.c.idempotency_key == key,
        api_requests.c.state == PROCESSING))


def record_refusal(connection: Connection, refusal: Refusal) -> None:
    values = {name: getattr(refusal, name) for name in refusal.__dataclass_fields__}
    # What came from the request made storable (gateway.store.texts): a long or NUL-bearing
    # path must not keep its refusal out of the record.
    values["operation"] = storable(refusal.operation, api_refusals.c.operation.type.length)
    values["reason"] = storable(refusal.reason, 1000)
    values["certificate"] = storable(refusal.certificate or None, api_refusals.c.certificate.type.length)
    connection.execute(api_refusals.insert().values(**values))


def list_refusals(connection: Connection, since: datetime | None = None,
                  limit: int = 100) -> list[Refusal]:
    """Refusals, newest first (for the console and the audit)."""
    query = select(api_refusals).order_by(api_refusals.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(api_refusals.c.refused_at >= since)
    return [Refusal(_aware(row.refused_at), row.listener, row.peer, row.facility_id,
                    row.certificate, row.door, row.operation, row.status, row.reason)
            for row in connection.execute(query)]

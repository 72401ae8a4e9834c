"""The outbox: deliveries to enqueue, claim, and settle. Functions take a connection (one
transaction, the caller's) and plain data, like the rest of the store.

- `enqueue` runs inside the transaction that stores a translation, so a translated message and
  its deliveries commit together. Translating a message again (a replay) reopens a delivery
  that is dead, or one whose content changed (with a new idempotency key: a new request);
  an unchanged delivered one is left alone. A message that retires a patient (a merge) takes
  that patient's pending deliveries to the same destinations into its own patient's order,
  ahead of it, so that none of them reaches the peer after the merge and undoes it.
- `claim_batches` hands due deliveries to one node for `lease` seconds, grouped into batches
  (one request each). On PostgreSQL several nodes claim concurrently with `FOR UPDATE SKIP
  LOCKED`; on SQLite (one node) the same queries run in a write transaction. A delivery is due
  when its time has come, nobody holds a live lease on it, and no earlier delivery of the same
  patient to the same destination is pending: per-patient order, across nodes. A patient's
  first due delivery (its head) may bring the deliveries that follow it (its run: consecutive,
  due, free, up to `batch_size` and `batch_bytes`); runs of several patients share a batch,
  and a run is never split between batches, so two requests in flight never carry the same
  patient. A caller may take only batches of at least `min_size` deliveries (the rest stay
  due, unleased), or batches that the byte cap has filled. `claim` is the
  one-delivery-per-request form.
- `settle` records attempts: delivered, retry at a given time, or dead. A node whose lease was
  taken over meanwhile (it was too slow) records its attempt but does not change the row; nor
  does one whose delivery got new content (a replay) while it sent the old: the new content
  goes when the lease ends.
- `release_node`, at a node's start, gives back what an earlier process of the same node held
  when it died (node names are one process each), rather than waiting out those leases.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Iterable, Sequence

from sqlalchemy import BigInteger, Connection, DateTime, String, any_, bindparam, or_, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY

from gateway.store.database import shared_clock
from gateway.store.schema import canonical_bundles, deliveries, delivery_attempts
from gateway.store.texts import storable
from gateway.store.timestamps import utc

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
STATUSES = (PENDING, DELIVERED, DEAD)
# A dead letter keeps the peer's answer, up to this many bytes.
MAX_ATTEMPT_RESPONSE = 2048  # bytes of a successful answer kept with its attempt
MAX_KEPT_RESPONSE = 64 * 1024
_KEY_NAMESPACE = uuid.UUID("7d0c3f1e-2b7a-5b8e-9a43-4d1f6a2c8e10")
_BATCH_NAMESPACE = uuid.UUID("0b5e4c2a-6f1d-5a3b-8c7e-2d9f4a6b1c30")


@dataclass(frozen=True)
class Enqueue:
    message_id: int
    destination: str
    patient_key: str
    bundle_sha256: str
    # The keys of the patients this message retires (a merge's merged patient): their pending
    # deliveries to this destination join its patient's order, ahead of it.
    retired: tuple[str, ...] = ()


@dataclass(frozen=True)
class Claim:
    """A delivery this node now holds: what to send, and how often it was tried."""

    id: int
    message_id: int
    destination: str
    idempotency_key: str
    attempts: int
    first_attempt_at: datetime | None
    bundle: str | None  # the canonical bundle, as stored JSON text; None: retention expired it
    patient_key: str = ""


@dataclass(frozen=True)
class Batch:
    """Deliveries that travel in one request, in message order (so each patient's are in
    order), all or nothing at the peer."""

    claims: tuple[Claim, ...]

    @property
    def idempotency_key(self) -> str:
        return batch_idempotency_key([claim.idempotency_key for claim in self.claims])

    @property
    def ids(self) -> list[int]:
        return [claim.id for claim in self.claims]


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
    # The key the attempt was sent under (None: not checked). A replay that changes a pending
    # delivery's content gives it a new key: the old content's answer must not settle it.
    idempotency_key: str | None = None


def bundle_digest(bundle_json: str) -> str:
    return hashlib.sha256(bundle_json.encode("utf-8")).hexdigest()


def idempotency_key(destination: str, message_id: int, bundle_sha256: str) -> str:
    """Stable for the same content to the same destination: retries, restarts, other nodes
    and replays of unchanged content all send the same key; changed content gets a new one."""
    return str(uuid.uuid5(_KEY_NAMESPACE, f"{destination}\n{message_id}\n{bundle_sha256}"))


def batch_idempotency_key(keys: Sequence[str]) -> str:
    """The key of a request carrying these deliveries: a lone delivery's own key; for several,
    a name derived from the set (not its order), so that a retry of the same set repeats the
    key and a different set never gets the answer stored for another one."""
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise ValueError("a batch needs at least one delivery")
    return str(uuid.uuid5(_BATCH_NAMESPACE, "\n".join(sorted(keys))))


_PG_ENQUEUE = text("""
    INSERT INTO deliveries (message_id, destination, patient_key, status, idempotency_key,
                            bundle_sha256, created_at, next_attempt_at, attempts)
    SELECT u.message_id, u.destination, u.patient_key, 'pending', u.idempotency_key,
           u.bundle_sha256, :now, :due, 0
    FROM unnest(CAST(:ids AS bigint[]), CAST(:destinations AS text[]), CAST(:patients AS text[]),
                CAST(:keys AS text[]), CAST(:digests AS text[]))
         AS u(message_id, destination, patient_key, idempotency_key, bundle_sha256)
    ON CONFLICT (message_id, destination) DO NOTHING""").bindparams(
    bindparam("now", type_=DateTime(timezone=True)), bindparam("due", type_=DateTime(timezone=True)))


def enqueue(connection: Connection, entries: Iterable[Enqueue], now: datetime,
            due: datetime | None = None) -> int:
    """Create (or reopen) the deliveries of freshly stored translations, due at `due` (the
    clock claims compare with: `shared_clock`; default `now`); how many changed."""
    entries = list(entries)
    if not entries:
        return 0
    due = due or now
    # Locked (PostgreSQL) until the commit: what is decided below holds only for the status
    # read here, and a node settling one of them meanwhile (a refusal: dead) would otherwise
    # leave a replay's new content on a dead letter, never sent.
    existing = {
        (row.message_id, row.destination): row
        for row in connection.execute(
            select(deliveries.c.id, deliveries.c.message_id, deliveries.c.destination,
                   deliveries.c.status, deliveries.c.bundle_sha256, deliveries.c.patient_key)
            .where(_among(connection, deliveries.c.message_id, {e.message_id for e in entries}))
            .order_by(deliveries.c.id).with_for_update())
    }
    new, reopened, sent = [], [], []  # sent: the entries that will (again) go
    for entry in entries:
        key = idempotency_key(entry.destination, entry.message_id, entry.bundle_sha256)
        row = existing.get((entry.message_id, entry.destination))
        if row is None:
            new.append({"message_id": entry.message_id, "destination": entry.destination,
                        "patient_key": entry.patient_key, "status": PENDING,
                        "idempotency_key": key, "bundle_sha256": entry.bundle_sha256,
                        "created_at": now, "next_attempt_at": due, "attempts": 0})
            sent.append(entry)
        elif row.status == DEAD or (row.status == DELIVERED and row.bundle_sha256 != entry.bundle_sha256):
            reopened.append({"b_id": row.id, "b_key": key, "b_sha": entry.bundle_sha256,
                             "b_patient": entry.patient_key, "b_now": due})
            sent.append(entry)
        elif row.status == PENDING and row.bundle_sha256 != entry.bundle_sha256:
            # Still waiting: the next attempt carries the new content, under a new key, in the
            # order it waits in (a merge may have taken it into its survivor's).
            reopened.append({"b_id": row.id, "b_key": key, "b_sha": entry.bundle_sha256,
                             "b_patient": row.patient_key, "b_now": None})
            sent.append(entry)
    if new and connection.dialect.name == "postgresql":
        # One statement for the batch, its rows as arrays; two nodes translating the same
        # message: the first insert wins, the content is the same.
        connection.execute(_PG_ENQUEUE, {
            "ids": [row["message_id"] for row in new], "destinations": [row["destination"] for row in new],
            "patients": [row["patient_key"] for row in new], "keys": [row["idempotency_key"] for row in new],
            "digests": [row["bundle_sha256"] for row in new], "now": now, "due": due})
    elif new:
        connection.execute(sqlite.insert(deliveries).on_conflict_do_nothing(
            index_elements=[deliveries.c.message_id, deliveries.c.destination]), new)
    for item in reopened:
        values = {"idempotency_key": item["b_key"], "bundle_sha256": item["b_sha"],
                  "patient_key": item["b_patient"]}
        if item["b_now"] is not None:
            values.update(status=PENDING, next_attempt_at=item["b_now"], attempts=0,
                          first_attempt_at=None, finished_at=None, lease_owner=None,
                          lease_until=None)
        connection.execute(update(deliveries).where(deliveries.c.id == item["b_id"]).values(**values))
    _rekey_retired(connection, sent)
    return len(new) + len(reopened)


def _rekey_retired(connection: Connection, entries: list[Enqueue]) -> None:
    """A merge goes after the merged patient's deliveries still pending to its destination,
    in flight or not: they take the survivor's key, keeping their message ids (hence their
    place in its order), so the claim holds the merge back until they are settled. Otherwise
    the merged patient's older update could reach the peer after the merge and undo it there.
    A dead letter keeps its key: it may never go again, and must not hold the survivor up."""
    moves = [{"b_destination": e.destination, "b_old": old, "b_new": e.patient_key}
             for e in entries for old in e.retired if old != e.patient_key]
    if moves:
        connection.execute(update(deliveries).where(
            deliveries.c.destination == bindparam("b_destination"),
            deliveries.c.patient_key == bindparam("b_old"), deliveries.c.status == PENDING)
            .values(patient_key=bindparam("b_new")), moves)


# Heads (each patient's first pending delivery, when it is free to take) are found two ways.
# Usually from the oldest pending deliveries (a window read in message order: a patient's first
# row there is its first pending delivery, since every older pending one is in the window too),
# which costs the window whatever the mix. When the window holds fewer heads than wanted and
# more deliveries wait beyond it (one patient's long backlog fills it), from each patient with
# pending deliveries in turn (a skip scan of the patient index): that costs the number of such
# patients, not of deliveries.
_WINDOW_HEADS = """
    WITH w AS (
        SELECT d.id, d.patient_key, d.message_id, d.next_attempt_at, d.lease_until FROM deliveries d
        WHERE d.status = 'pending' AND d.destination = :destination
        ORDER BY d.message_id
        LIMIT :window),
    firsts AS (
        SELECT w.*, ROW_NUMBER() OVER (PARTITION BY w.patient_key ORDER BY w.message_id) AS n FROM w)
    SELECT id FROM firsts
    WHERE n = 1 AND next_attempt_at <= :now AND (lease_until IS NULL OR lease_until < :now)
    ORDER BY message_id
"""
_WINDOW_FULL = """
    SELECT 1 FROM deliveries WHERE status = 'pending' AND destination = :destination
    ORDER BY message_id LIMIT 1 OFFSET :last
"""
_WINDOW_PER_HEAD = 8  # window rows read per head wanted
_PATIENT_HEADS = """
    WITH RECURSIVE patients(patient_key) AS (
        SELECT min(patient_key) FROM deliveries WHERE status = 'pending' AND destination = :destination
      UNION ALL
        SELECT (SELECT min(e.patient_key) FROM deliveries e
                WHERE e.status = 'pending' AND e.destination = :destination AND e.patient_key > p.patient_key)
        FROM patients p WHERE p.patient_key IS NOT NULL
    )
    SELECT d.id, d.patient_key, d.message_id FROM patients p
    JOIN deliveries d ON d.id = (SELECT h.id FROM deliveries h
                                 WHERE h.status = 'pending' AND h.destination = :destination
                                   AND h.patient_key = p.patient_key
                                 ORDER BY h.message_id LIMIT 1)
    WHERE d.next_attempt_at <= :now AND (d.lease_until IS NULL OR d.lease_until < :now)
    ORDER BY d.message_id
    LIMIT :window
"""
# The oldest of the heads found, taken: still pending and free, and no later delivery of its
# patient in flight (one enqueued after it went: a dead letter replayed, a message translated
# late), which would make two requests of one patient in flight at once. Several nodes may
# have found the same heads: each takes those the others are not taking (more are found than
# wanted).
_TAKE_HEADS = """
    SELECT d.id, d.patient_key, d.message_id FROM deliveries d
    WHERE d.id IN :ids AND d.status = 'pending' AND d.next_attempt_at <= :now
      AND (d.lease_until IS NULL OR d.lease_until < :now)
      AND NOT EXISTS (SELECT 1 FROM deliveries o
                      WHERE o.status = 'pending' AND o.destination = d.destination
                        AND o.patient_key = d.patient_key AND o.lease_until >= :now)
    ORDER BY d.message_id
    LIMIT :limit
"""
# A patient's pending deliveries in order, from its head: whether each is free to take now,
# and its bundle's size. `{patient}` is a parameter, or a column of the PostgreSQL LATERAL join.
# The size comes from a subquery by message id (an index probe per delivery): as a join,
# PostgreSQL hashed a whole month of bundles for each patient (60 ms instead of 4 for the
# runs of 200 patients among 2,000 bundles, and growing with the month).
_RUN = """
    SELECT f.id, f.patient_key, f.message_id,
           CASE WHEN f.next_attempt_at <= :now AND (f.lease_until IS NULL OR f.lease_until < :now)
                THEN 1 ELSE 0 END AS free,
           (SELECT {size} FROM canonical_bundles t WHERE t.message_id = f.message_id LIMIT 1) AS size
    FROM deliveries f
    WHERE f.status = 'pending' AND f.destination = :destination AND f.patient_key = {patient}
    ORDER BY f.message_id
    LIMIT :run
"""
_RUNS_PG = ("SELECT r.* FROM unnest(CAST(:patients AS text[])) AS h(patient_key) CROSS JOIN LATERAL ("
            + _RUN.format(size="octet_length(t.bundle)", patient="h.patient_key") + ") r")
_RUN_SQLITE = _RUN.format(size="length(CAST(t.bundle AS BLOB))", patient=":patient")


def claim(connection: Connection, node: str, destination: str, now: datetime, lease: float,
          limit: int) -> list[Claim]:
    """Take up to `limit` due deliveries to `destination` for `node`, oldest message first,
    one per request."""
    batches = claim_batches(connection, node, destination, now, lease, requests=limit)
    return sorted((batch.claims[0] for batch in batches), key=lambda c: c.message_id)


def claim_batches(connection: Connection, node: str, destination: str, now: datetime, lease: float,
                  *, requests: int, batch_size: int = 1, batch_bytes: int | None = None,
                  min_size: int = 1) -> list[Batch]:
    """Take due deliveries to `destination` for `node`, as up to `requests` batches of at most
    `batch_size` deliveries and `batch_bytes` bytes of bundles (a lone delivery may be larger),
    each of at least `min_size` deliveries (smaller ones are left, untouched, for a later
    claim). Patients whose head is oldest come first."""
    if requests < 1 or batch_size < 1:
        raise ValueError("requests and batch_size must be at least 1")
    is_pg = connection.dialect.name == "postgresql"
    heads = _heads(connection, is_pg, destination, now, requests * batch_size)
    if not heads:
        return []
    if batch_size == 1:
        runs, cut = [[(head.id, 0)] for head in heads], set()
    else:
        runs, cut = _runs(connection, is_pg, heads, destination, now, batch_size, batch_bytes)
    # Whole batches only (a run is never split), so a batch left out leaves whole runs.
    packed = [batch for batch, full in _pack(runs, requests, batch_size, batch_bytes, cut)
              if full or len(batch) >= min_size]
    if not packed:
        return []
    wanted = [delivery_id for batch in packed for delivery_id in batch]
    # Only rows still pending and free: a node whose lease expired may have settled one of the
    # run meanwhile (the heads themselves are locked by this transaction).
    leased = set(connection.execute(
        update(deliveries).where(_among(connection, deliveries.c.id, wanted), deliveries.c.status == PENDING,
                                 (deliveries.c.lease_until.is_(None)) | (deliveries.c.lease_until < now))
        .values(lease_owner=node, lease_until=now + timedelta(seconds=lease))
        .returning(deliveries.c.id)).scalars())
    if len(leased) < len(wanted):
        packed, dropped = _cut_at_gaps(packed, runs, leased)
        release(connection, node, dropped)
    rows = {row.id: row for row in connection.execute(
        select(deliveries.c.id, deliveries.c.message_id, deliveries.c.destination,
               deliveries.c.patient_key, deliveries.c.idempotency_key, deliveries.c.attempts,
               deliveries.c.first_attempt_at, canonical_bundles.c.bundle)
        .outerjoin(canonical_bundles, canonical_bundles.c.message_id == deliveries.c.message_id)
        .where(_among(connection, deliveries.c.id, [i for batch in packed for i in batch])))}
    return [Batch(tuple(sorted((_claim(rows[i]) for i in batch), key=lambda c: c.message_id)))
            for batch in packed if batch]


def _heads(connection: Connection, is_pg: bool, destination: str, now: datetime, limit: int) -> list:
    """Up to `limit` heads, oldest first, locked for this transaction (PostgreSQL: skipping
    those another node is locking)."""
    # Typed, so that SQLite compares the timestamps in the form it stores them.
    now_type = bindparam("now", type_=DateTime(timezone=True))
    params = {"destination": destination, "now": now, "limit": limit, "window": limit * _WINDOW_PER_HEAD}
    found = list(connection.execute(text(_WINDOW_HEADS).bindparams(now_type), params).scalars())
    if len(found) < limit and connection.execute(text(_WINDOW_FULL),
                                                 {"destination": destination, "last": params["window"] - 1}).first():
        found = list(connection.execute(text(_PATIENT_HEADS).bindparams(now_type), params).scalars())
    if not found:
        return []
    # Twice as many as wanted: room for the ones another node is taking at the same time.
    found = found[:2 * limit]
    if is_pg:
        take = text(_TAKE_HEADS.replace("IN :ids", "= ANY(CAST(:ids AS bigint[]))")
                    + " FOR UPDATE OF d SKIP LOCKED").bindparams(now_type)
    else:
        take = text(_TAKE_HEADS).bindparams(now_type, bindparam("ids", expanding=True))
    return connection.execute(take, {"now": now, "ids": found, "limit": limit}).all()


def _claim(row) -> Claim:
    return Claim(row.id, row.message_id, row.destination, row.idempotency_key, row.attempts,
                 _aware(row.first_attempt_at), row.bundle, row.patient_key)


def _runs(connection: Connection, is_pg: bool, heads, destination: str, now: datetime,
          batch_size: int, batch_bytes: int | None) -> tuple[list[list[tuple[int, int]]], set[int]]:
    """Each head's run as (id, bundle bytes): the head, then the patient's next deliveries
    while they are free, within the limits; and the heads whose run the byte cap cut. A head
    that is no longer its patient's first pending delivery (an earlier one was enqueued
    meanwhile) is left for the next claim."""
    params = {"destination": destination, "now": now, "run": batch_size}
    now_type = bindparam("now", type_=DateTime(timezone=True))
    by_patient: dict[str, list] = {}
    if is_pg:
        params["patients"] = [head.patient_key for head in heads]
        for row in connection.execute(text(_RUNS_PG).bindparams(now_type), params):
            by_patient.setdefault(row.patient_key, []).append(row)
    else:
        query = text(_RUN_SQLITE).bindparams(now_type)
        for head in heads:
            by_patient[head.patient_key] = connection.execute(query, {**params, "patient": head.patient_key}).all()
    runs, cut = [], set()
    for head in heads:
        rows = sorted(by_patient.get(head.patient_key, ()), key=lambda r: r.message_id)
        if not rows or rows[0].id != head.id:
            continue
        run, size = [], 0
        for row in rows:
            if run and not row.free:
                break
            if run and batch_bytes is not None and size + (row.size or 0) > batch_bytes:
                cut.add(head.id)
                break
            run.append((row.id, row.size or 0))
            size += row.size or 0
        runs.append(run)
    return runs, cut


def pack_runs(runs: Sequence[Sequence[tuple[int, int]]], requests: int, batch_size: int,
              batch_bytes: int | None) -> list[list[int]]:
    """Runs (each a patient's deliveries as (id, bytes), in order; oldest head first) packed
    into at most `requests` batches of ids: each run whole in the first batch it fits, a
    run that fits nowhere left for later; a run longer than a batch keeps its first
    `batch_size`. A run is never spread over two batches: they may be in flight at once,
    and a patient's deliveries must reach the peer in order."""
    return [batch for batch, _ in _pack(runs, requests, batch_size, batch_bytes)]


def _pack(runs: Sequence[Sequence[tuple[int, int]]], requests: int, batch_size: int,
          batch_bytes: int | None, cut: set[int] = frozenset()) -> list[tuple[list[int], bool]]:
    """pack_runs, each batch with whether its bytes make it full: a run with room for its
    count in it was turned away for its bytes, it holds a run that the cap cut (`cut`: their
    first ids), or it is at the cap already (a lone large delivery). Waiting would not make
    such a batch larger, so `min_size` does not hold it back: large documents would otherwise
    go one request at a time."""
    batches: list[list[int]] = []
    sizes: list[int] = []
    full: list[bool] = []
    for run in runs:
        run = run[:batch_size]
        count, size = len(run), sum(b for _, b in run)
        for number, batch in enumerate(batches):
            if len(batch) + count <= batch_size:
                if batch_bytes is None or sizes[number] + size <= batch_bytes:
                    batch.extend(i for i, _ in run)
                    sizes[number] += size
                    full[number] = full[number] or run[0][0] in cut
                    break
                full[number] = True
        else:
            if len(batches) < requests:
                batches.append([i for i, _ in run])
                sizes.append(size)
                full.append(run[0][0] in cut or (batch_bytes is not None and size >= batch_bytes))
    return list(zip(batches, full))


def _cut_at_gaps(packed: list[list[int]], runs, leased: set[int]) -> tuple[list[list[int]], list[int]]:
    """Batches without any delivery that follows, in its run, one that could not be leased;
    and the leased deliveries so dropped."""
    keep: set[int] = set()
    for run in runs:
        for delivery_id, _ in run:
            if delivery_id not in leased:
                break
            keep.add(delivery_id)
    dropped = [i for i in leased if i not in keep]
    return [[i for i in batch if i in keep] for batch in packed], dropped


def settle(connection: Connection, node: str, node_results: Iterable[Settlement],
           confirm: Iterable[int] = (), now: datetime | None = None) -> set[int]:
    """Record attempts and move their deliveries on (only where this node still holds them,
    under the key it sent). Returns those of the `confirm` ids that this moved: a node whose
    lease was taken over (it was too slow) must not say it made a dead letter. `now`: the
    node's clock, on which the retry times were chosen (default: read now)."""
    results = list(node_results)
    if not results:
        return set()
    confirm = set(confirm)
    moved = _still_held(connection, node, [r for r in results if r.delivery_id in confirm])
    # A reason may quote a peer's diagnostics (gateway.store.texts).
    reasons = [storable(r.reason) for r in results]
    connection.execute(delivery_attempts.insert(), [
        {"delivery_id": r.delivery_id, "attempted_at": r.attempted_at, "node": node,
         "outcome": r.kind, "reason": reason, "code": r.code, "duration_ms": r.duration_ms,
         "response": _attempt_response(r)}
        for r, reason in zip(results, reasons)])
    finished, retried = [], []
    for r, reason in zip(results, reasons):
        common = {"b_id": r.delivery_id, "b_node": node, "b_key": r.idempotency_key,
                  "b_at": r.attempted_at, "b_reason": reason, "b_code": r.code}
        if r.kind == "transient" and r.next_attempt_at is not None:
            retried.append({**common, "b_next": r.next_attempt_at})
        else:
            status = DELIVERED if r.kind == "delivered" else DEAD
            response = r.response[:MAX_KEPT_RESPONSE] if (status == DEAD and r.response) else None
            # Finished when the answer came (or the attempt gave up), not when it was sent.
            finished.append({**common, "b_status": status, "b_response": response,
                             "b_end": r.attempted_at + timedelta(milliseconds=r.duration_ms)})
    mine = ((deliveries.c.id == bindparam("b_id")) & (deliveries.c.lease_owner == bindparam("b_node"))
            & (deliveries.c.idempotency_key
               == _coalesce(bindparam("b_key", type_=String), deliveries.c.idempotency_key)))
    attempted = {"attempts": deliveries.c.attempts + 1,
                 "first_attempt_at": _coalesce(deliveries.c.first_attempt_at, bindparam("b_at")),
                 "lease_owner": None, "lease_until": None,
                 "last_reason": bindparam("b_reason"), "last_code": bindparam("b_code")}
    if retried:
        # Retry times move to the clock claims compare with (`shared_clock`): on its own, a
        # node whose clock runs ahead would retry late, one behind early.
        shared = shared_clock(connection)
        if shared is not None:
            shift = shared - (now or datetime.now(timezone.utc))
            retried = [{**item, "b_next": item["b_next"] + shift} for item in retried]
        connection.execute(update(deliveries).where(mine).values(
            next_attempt_at=bindparam("b_next"), **attempted), retried)
    if finished:
        connection.execute(update(deliveries).where(mine).values(
            status=bindparam("b_status"), finished_at=bindparam("b_end"),
            last_response=bindparam("b_response"), **attempted), finished)
    return moved


def _still_held(connection: Connection, node: str, results: list[Settlement]) -> set[int]:
    """The deliveries of `results` this node holds under the key each was sent with (locked
    until the commit on PostgreSQL; SQLite's write transaction runs alone)."""
    if not results:
        return set()
    query = select(deliveries.c.id, deliveries.c.idempotency_key).where(
        _among(connection, deliveries.c.id, [r.delivery_id for r in results]),
        deliveries.c.lease_owner == node)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    held = dict(connection.execute(query).all())
    return {r.delivery_id for r in results if r.delivery_id in held
            and r.idempotency_key in (None, held[r.delivery_id])}


def _attempt_response(result: Settlement) -> bytes | None:
    """The peer's answer kept with an attempt, for the console: whole up to the cap when it
    failed, the start of it when it was delivered (a batch's answer is kept with each)."""
    if not result.response:
        return None
    return result.response[:MAX_KEPT_RESPONSE if result.kind != "delivered" else MAX_ATTEMPT_RESPONSE]


def release(connection: Connection, node: str, ids: Iterable[int]) -> None:
    """Give back deliveries this node claimed but will not send (it is stopping)."""
    ids = list(ids)
    if ids:
        connection.execute(update(deliveries).where(_among(connection, deliveries.c.id, ids),
                                                    deliveries.c.lease_owner == node)
                           .values(lease_owner=None, lease_until=None))


def release_node(connection: Connection, node: str) -> int:
    """Give back every pending delivery leased to `node` (at its start: what an earlier process
    of it held when it died); how many."""
    return connection.execute(update(deliveries).where(
        deliveries.c.lease_owner == node, deliveries.c.status == PENDING)
        .values(lease_owner=None, lease_until=None)).rowcount


def withdraw(connection: Connection, routed: dict[int, tuple[frozenset[str], str]], now: datetime) -> int:
    """After messages were translated again (a replay): their pending deliveries to a
    destination the new translation does not route to (none when it failed), each with the
    reason given, become dead letters, instead of a next attempt carrying the new content under
    the key of the old one (or finding no content, and blaming retention). One in flight is
    left to its attempt. `routed`: message id -> (destinations, reason). How many."""
    if not routed:
        return 0
    now = shared_clock(connection) or now  # the leases' clock
    stale = [
        {"b_id": row.id, "b_reason": routed[row.message_id][1], "b_now": now}
        for row in connection.execute(
            select(deliveries.c.id, deliveries.c.message_id, deliveries.c.destination)
            .where(_among(connection, deliveries.c.message_id, routed), deliveries.c.status == PENDING,
                   or_(deliveries.c.lease_until.is_(None), deliveries.c.lease_until < now))
            .with_for_update())
        if row.destination not in routed[row.message_id][0]]
    if stale:
        connection.execute(
            update(deliveries).where(deliveries.c.id == bindparam("b_id"), deliveries.c.status == PENDING)
            .values(status=DEAD, finished_at=bindparam("b_now"), last_reason=bindparam("b_reason"),
                    last_code=None, lease_owner=None, lease_until=None), stale)
    return len(stale)


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


def _among(connection: Connection, column, values: Iterable[int]):
    """`column IN values`; on PostgreSQL `column = ANY(array)`, one statement whatever the
    count: each length of an IN list is another statement, which psycopg parses again and
    PostgreSQL plans again (claims and settlements vary in size all the time)."""
    values = list(values)
    if connection.dialect.name == "postgresql":
        return column == any_(bindparam(None, values, type_=ARRAY(BigInteger)))
    return column.in_(values)


def _coalesce(column, value):
    from sqlalchemy import func

    return func.coalesce(column, value)


def _aware(value: datetime | None) -> datetime | None:
    return utc(value) if value is not None else None

"""Batched delivery: the outbox claims a patient's consecutive due deliveries with its first one
and packs several patients' runs into one request (never splitting a run), the request's
idempotency key follows the set of deliveries it carries, and end to end (MLLP in, the
reference shared record out) batches keep each patient's order through an outage, deliver
every message once, and a refused batch makes every member a dead letter with the answer."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest
import pytest_twisted
from sqlalchemy import text, update
from twisted.internet import defer, reactor, threads

import hl7msgs
from delivery_support import store_translated, until
from gateway.config import DeliveryConfig, DestinationConfig, RetryConfig, RouteConfig, RouteMatch
from gateway.delivery.outcome import HttpRequest, HttpResponse
from gateway.delivery.routes import patient_key
from gateway.delivery.service import DeliveryService
from gateway.store import outbox
from gateway.store.database import Database, create_gateway_engine, migrate, write_transaction
from gateway.store.schema import deliveries
from test_delivery_e2e import send
from translation_support import rows, with_mappings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
_CONTROL_IDS = itertools.count(1)


# -- pure: packing and keys -------------------------------------------------------------------

def test_runs_are_packed_whole_within_the_limits():
    """Runs go whole into the first batch with room (count and bytes); a run with no room
    anywhere waits for a later claim; a lone delivery larger than the byte cap goes alone."""
    runs = [[(1, 10), (2, 10)], [(3, 10)], [(4, 10), (5, 10), (6, 10)], [(7, 500)], [(8, 10)]]
    assert outbox.pack_runs(runs, requests=3, batch_size=4, batch_bytes=100) == [[1, 2, 3, 8], [4, 5, 6], [7]]
    assert outbox.pack_runs(runs, requests=1, batch_size=4, batch_bytes=100) == [[1, 2, 3, 8]]
    assert outbox.pack_runs(runs, requests=9, batch_size=4, batch_bytes=None) == [[1, 2, 3, 7], [4, 5, 6, 8]]


def test_a_run_longer_than_a_batch_keeps_its_head_and_leaves_its_tail():
    """A run is cut to the batch size from its start (the rest waits), never spread over two
    batches that could travel at once."""
    assert outbox.pack_runs([[(1, 1), (2, 1), (3, 1)], [(4, 1)]], requests=5, batch_size=2,
                            batch_bytes=None) == [[1, 2], [4]]
    assert outbox.pack_runs([[(1, 1), (2, 1)], [(3, 1)]], requests=5, batch_size=1,
                            batch_bytes=None) == [[1], [3]]


def test_batch_key_is_the_lone_key_or_a_name_of_the_set():
    """One delivery keeps its own key; several get a key of the set, whatever their order,
    and another set (one more or one less) gets another key."""
    a, b, c = (outbox.idempotency_key("record", n, "sha") for n in (1, 2, 3))
    assert outbox.batch_idempotency_key([a]) == a
    assert outbox.batch_idempotency_key([a, b]) == outbox.batch_idempotency_key([b, a])
    assert len({outbox.batch_idempotency_key([a, b]), outbox.batch_idempotency_key([a, b, c]),
                outbox.batch_idempotency_key([b, c]), a, b}) == 5
    with pytest.raises(ValueError, match="at least one"):
        outbox.batch_idempotency_key([])


# -- the outbox (SQLite and PostgreSQL) -------------------------------------------------------

def add(engine, *patients: str, bundle: str = '{"resourceType":"Bundle","entry":[]}',
        destination: str = "record") -> list[int]:
    """One translated message per patient key given (in order), each with its delivery."""
    ids = []
    with engine.begin() as conn:
        for patient in patients:
            row = store_translated(conn, T0, f"C{next(_CONTROL_IDS)}", bundle)
            outbox.enqueue(conn, [outbox.Enqueue(row, destination, patient, f"sha-{row}")], T0)
            ids.append(row)
    return ids


def claim(engine, node="n1", now=T0, requests=4, batch_size=64, batch_bytes=None, destination="record"):
    with engine.begin() as conn:
        return outbox.claim_batches(conn, node, destination, now, 60.0, requests=requests,
                                    batch_size=batch_size, batch_bytes=batch_bytes)


def settle(engine, batch, kind="delivered", node="n1", at=T0, next_at=None):
    with engine.begin() as conn:
        outbox.settle(conn, node, [outbox.Settlement(c.id, kind, kind, at, 5, 200, None, next_at)
                                   for c in batch.claims])


def message_ids(batches) -> list[list[int]]:
    return [[c.message_id for c in batch.claims] for batch in batches]


def test_a_patients_waiting_deliveries_travel_together_in_order(engine):
    """One patient's five deliveries: one batch of the first three (batch size 3); the other
    two wait until those are settled, then go together."""
    m = add(engine, *["Patient/a"] * 5)
    (first,) = claim(engine, batch_size=3)
    assert message_ids([first]) == [m[:3]]
    assert claim(engine, batch_size=3) == []  # behind the batch in flight
    settle(engine, first)
    assert message_ids(claim(engine, batch_size=3)) == [m[3:]]


def test_several_patients_share_a_batch_and_a_run_is_never_split(engine):
    """Interleaved patients: all in one batch (message order, so each patient's in order);
    with a smaller batch, each patient's run stays whole in one batch."""
    m = add(engine, "Patient/a", "Patient/b", "Patient/a", "Patient/c", "Patient/b", "Patient/a")
    (batch,) = claim(engine)
    assert message_ids([batch]) == [m]
    assert [c.patient_key for c in batch.claims] == ["Patient/a", "Patient/b", "Patient/a", "Patient/c",
                                                     "Patient/b", "Patient/a"]
    settle(engine, batch, "transient", next_at=T0)  # all due again at once
    small = claim(engine, batch_size=3)
    by_batch = [{c.patient_key for c in b.claims} for b in small]
    assert message_ids(small) == [[m[0], m[2], m[5]], [m[1], m[3], m[4]]]
    assert by_batch == [{"Patient/a"}, {"Patient/b", "Patient/c"}]


def test_a_run_stops_at_a_delivery_that_is_not_free(engine):
    """A patient's run ends before a delivery waiting for a later time (or leased): the ones
    after it are not taken either."""
    m = add(engine, *["Patient/a"] * 4)
    with engine.begin() as conn:
        conn.execute(update(deliveries).where(deliveries.c.message_id == m[2])
                     .values(next_attempt_at=T0 + timedelta(minutes=5)))
    (batch,) = claim(engine)
    assert message_ids([batch]) == [m[:2]]


def test_the_byte_cap_bounds_a_batch(engine):
    """Bundles of 1,000 bytes and a cap of 2,500: two per batch, a patient's run cut there."""
    bundle = json.dumps({"resourceType": "Bundle", "entry": [], "pad": "x" * 950})
    assert len(bundle) == 1000
    m = add(engine, "Patient/a", "Patient/a", "Patient/a", "Patient/b", bundle=bundle)
    batches = claim(engine, batch_bytes=2500)
    assert message_ids(batches) == [m[:2], [m[3]]]


def test_batches_below_the_minimum_are_left_unclaimed(engine):
    """min_size: a batch with fewer deliveries is not taken (nor leased): a later claim, even
    by another node, gets it whole; full batches are taken meanwhile."""
    m = add(engine, "Patient/a", "Patient/b", "Patient/c", "Patient/a", "Patient/d")
    with engine.begin() as conn:
        taken = outbox.claim_batches(conn, "n1", "record", T0, 60.0, requests=2, batch_size=3, min_size=3)
    assert message_ids(taken) == [[m[0], m[1], m[3]]]  # a's run whole; c and d would be a batch of two
    with engine.begin() as conn:
        assert outbox.claim_batches(conn, "n1", "record", T0, 60.0, requests=2, batch_size=3, min_size=3) == []
    assert message_ids(claim(engine, node="n2", batch_size=3)) == [[m[2], m[4]]]


def test_a_batch_the_byte_cap_filled_is_taken_below_the_minimum(engine):
    """min_size holds back batches that waiting would make larger, not those the byte cap
    has filled: large documents (cap of 2,500 bytes, bundles of 1,000) still go several
    requests at a time while others are in flight, a patient's run cut at the cap, a bundle
    above the cap alone; a small one joins a batch with room. A batch with room left waits."""
    bundle = json.dumps({"resourceType": "Bundle", "entry": [], "pad": "x" * 950})
    large = json.dumps({"resourceType": "Bundle", "entry": [], "pad": "x" * 2950})
    m = add(engine, "Patient/a", "Patient/a", "Patient/a", "Patient/b", "Patient/c", bundle=bundle)
    (big,) = add(engine, "Patient/d", bundle=large)
    (small,) = add(engine, "Patient/e")

    def claim_full():
        with engine.begin() as conn:
            return outbox.claim_batches(conn, "n1", "record", T0, 60.0, requests=5, batch_size=64,
                                        batch_bytes=2500, min_size=64)

    assert message_ids(claim_full()) == [[m[0], m[1], small], [m[3], m[4]], [big]]
    (late,) = add(engine, "Patient/f", bundle=bundle)
    assert claim_full() == []  # f's batch has room; a's third waits behind its batch
    assert message_ids(claim(engine, node="n2", batch_size=64, batch_bytes=2500)) == [[late]]


def test_a_retry_of_the_same_set_has_the_same_key_and_another_set_another(engine):
    """After a transient failure the same deliveries are claimed again under the same key;
    once another message of the patient has joined them, the set and so the key differ."""
    add(engine, "Patient/a", "Patient/a", "Patient/b")
    (first,) = claim(engine)
    assert len(first.claims) == 3 and first.idempotency_key == outbox.batch_idempotency_key(
        [c.idempotency_key for c in first.claims])
    retry_at = T0 + timedelta(seconds=30)
    settle(engine, first, "transient", next_at=retry_at)
    assert claim(engine, now=T0 + timedelta(seconds=10)) == []
    (again,) = claim(engine, now=retry_at)
    assert again.ids == first.ids and again.idempotency_key == first.idempotency_key
    assert [c.attempts for c in again.claims] == [1, 1, 1]
    settle(engine, again, "transient", at=retry_at, next_at=retry_at)
    add(engine, "Patient/a")
    (grown,) = claim(engine, now=retry_at)
    assert len(grown.claims) == 4 and grown.idempotency_key != first.idempotency_key


def test_a_lone_delivery_keeps_its_own_key(engine):
    """A batch of one is sent under the delivery's own key (as before batching)."""
    (m,) = add(engine, "Patient/a")
    (batch,) = claim(engine)
    assert batch.idempotency_key == outbox.idempotency_key("record", m, f"sha-{m}")


def test_two_nodes_claim_batches_without_sharing_a_patient(pg_url):
    """PostgreSQL: two nodes claiming at once never get the same delivery, and a patient's
    deliveries in flight are all with one node."""
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    try:
        add(engine, *[f"Patient/{n % 200}" for n in range(400)])
        got: dict[str, list] = {}
        barrier = threading.Barrier(2)

        def node(name):
            barrier.wait()
            got[name] = claim(engine, node=name, requests=4, batch_size=16)

        workers = [threading.Thread(target=node, args=(n,)) for n in ("n1", "n2")]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        ids = {name: {c.id for b in batches for c in b.claims} for name, batches in got.items()}
        patients = {name: {c.patient_key for b in batches for c in b.claims} for name, batches in got.items()}
        assert ids["n1"] and ids["n2"] and not ids["n1"] & ids["n2"]
        assert not patients["n1"] & patients["n2"]
        for batches in got.values():
            for batch in batches:
                assert len(batch.claims) <= 16
                assert [c.message_id for c in batch.claims] == sorted(c.message_id for c in batch.claims)
    finally:
        engine.dispose()


def test_claim_is_cheap_on_a_large_outbox(pg_url):
    """PostgreSQL, 100,000 deliveries (most delivered, a backlog of one patient and of many):
    every query of the claim reads an index of pending deliveries (the window of the oldest,
    the skip scan by patient, the runs), never the whole outbox; the claim takes its batches."""
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    try:
        with engine.begin() as conn:
            conn.execute(text(_FILL))
            conn.execute(text("ANALYZE"))
            params = {"destination": "record", "now": datetime.now(timezone.utc), "limit": 256, "run": 64,
                      "patients": ["Patient/1", "Patient/one"], "window": 2048}
            plans = {name: "\n".join(r[0] for r in conn.execute(text("EXPLAIN " + sql), params))
                     for name, sql in (("window", outbox._WINDOW_HEADS), ("patients", outbox._PATIENT_HEADS),
                                       ("runs", outbox._RUNS_PG))}
        for name, index in (("window", "ix_deliveries_pending"), ("patients", "ix_deliveries_patient"),
                            ("runs", "ix_deliveries_patient")):
            assert "Seq Scan on deliveries" not in plans[name] and index in plans[name], (name, plans[name])
        # The one patient's backlog fills the window: the others are found by the skip scan.
        batches = claim(engine, now=datetime.now(timezone.utc), requests=4, batch_size=64)
        assert sum(len(b.claims) for b in batches) > 64
        assert "Patient/one" in {c.patient_key for b in batches for c in b.claims}
    finally:
        engine.dispose()


# 100,000 messages and deliveries: 90,000 delivered, 5,000 pending for one patient, 5,000
# pending for 1,000 patients.
_FILL = """
INSERT INTO messages (id, received_at, listener, control_id, sha256, size, truncated, status,
                      accepted, duplicate_count, format)
SELECT n, now(), 'test', 'C' || n, '\\x00', 1, false, 'translated', true, 0, 'hl7v2'
FROM generate_series(1, 100000) n;
INSERT INTO translations (message_id, status, translated_at)
SELECT n, 'translated', now() FROM generate_series(1, 100000) n;
INSERT INTO canonical_bundles (message_id, received_at, bundle)
SELECT n, now(), '{"resourceType":"Bundle","entry":[]}' FROM generate_series(1, 100000) n;
INSERT INTO deliveries (message_id, destination, patient_key, status, idempotency_key, bundle_sha256,
                        created_at, next_attempt_at, attempts, finished_at)
SELECT n, 'record',
       CASE WHEN n <= 90000 THEN 'Patient/' || (n % 5000) WHEN n <= 95000 THEN 'Patient/one'
            ELSE 'Patient/' || (n % 1000) END,
       CASE WHEN n <= 90000 THEN 'delivered' ELSE 'pending' END, 'k' || n, 's', now(), now(),
       CASE WHEN n <= 90000 THEN 1 ELSE 0 END, CASE WHEN n <= 90000 THEN now() END
FROM generate_series(1, 100000) n;
SELECT setval(pg_get_serial_sequence('messages', 'id'), 100000);
"""


# -- end to end: MLLP in, the reference shared record out --------------------------------------

FAST_RETRY = RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600)


def adt(control: int, patient: str, birth: str) -> bytes:
    """The benchmark's ADT^A01 for `patient` (PID-3) born on `birth` (PID-7)."""
    return (hl7msgs.message("adt", control).replace("4500123456", patient)
            .replace("19850714", birth).encode("utf-8"))


def gateway_config(make_config, db_url, peers):
    config = with_mappings(make_config(db_url), os.path.join(ROOT, "mappings"))
    record = DestinationConfig("shared-record", "fhir-record", peers.url("record"),
                               response_timeout=5, retry=FAST_RETRY)
    return dataclasses.replace(
        config, destinations=(record,),
        routes=(RouteConfig("clinical", ("shared-record",), RouteMatch(resources=("Patient",))),),
        delivery=DeliveryConfig(lease=5, poll_interval=0.1))


@defer.inlineCallbacks
def record_stats(peers):
    response = yield peers.client.request(HttpRequest(
        "GET", f"https://127.0.0.1:{peers.service.port('record')}/_sandbox/stats", b"", {}))
    assert response.code == 200
    return json.loads(response.body)


A, B = "8800000001", "8800000002"
SENT = [(1, A, "19850101"), (2, B, "19700101"), (3, A, "19850102"), (4, B, "19700102"), (5, A, "19850103")]
DELIVERIES = ("SELECT m.control_id, d.status, d.attempts, d.last_code, d.last_response "
              "FROM deliveries d JOIN messages m ON m.id = d.message_id ORDER BY d.id")


@pytest_twisted.inlineCallbacks
def test_batches_keep_each_patients_order_through_an_outage_and_deliver_once(
        db_url, make_config, running_gateway, peers):
    """The record is down while two patients' messages arrive; once it is back, every
    message is delivered once: each patient's record ends as their last message has it (the
    last birth date), a request carrying a patient once however many of their messages it
    holds (one version a request, not a message), the record applied no entry twice, and it
    took fewer requests than messages."""
    yield peers.faults("record", "down")
    ports = yield running_gateway(gateway_config(make_config, db_url, peers))
    yield threads.deferToThread(send, ports["mllp-test"], *[adt(*m) for m in SENT])
    yield until("SELECT attempts FROM deliveries ORDER BY id", lambda f: len(f) == 5 and f[0].attempts >= 1, db_url)
    yield peers.faults("record", "none")
    found = yield until(DELIVERIES, lambda f: len(f) == 5 and all(r.status == "delivered" for r in f), db_url)
    assert [r.last_code for r in found] == [200] * 5
    delivered = yield threads.deferToThread(
        rows, db_url, "SELECT count(*) AS n FROM delivery_attempts WHERE outcome = 'delivered' GROUP BY delivery_id")
    assert [r.n for r in delivered] == [1] * 5
    for patient, births in ((A, ["1985-01-01", "1985-01-02", "1985-01-03"]), (B, ["1970-01-01", "1970-01-02"])):
        found = yield peers.search("/Patient?identifier=" + quote(patient))
        (resource,) = [e["resource"] for e in found["entry"]]
        assert resource["birthDate"] == births[-1]
        assert 1 <= int(resource["meta"]["versionId"]) <= len(births)
    bundles = yield threads.deferToThread(rows, db_url, "SELECT bundle FROM canonical_bundles")
    stats = yield record_stats(peers)
    entries = [entry["fullUrl"] for r in bundles for entry in json.loads(r.bundle)["entry"]]
    assert len(set(entries)) <= stats["entries"] <= len(entries)
    assert stats["replayed"] == 0 and stats["applied"] < 5


@pytest_twisted.inlineCallbacks
def test_two_patients_in_one_request_refused_then_replayed(db_url, make_config, peers, repo_mappings):
    """Two patients' deliveries due together go in one request; refused with a 400, each is a
    dead letter with the record's OperationOutcome; reopened (a replay), they go again in one
    request and the record holds both patients."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    for number, patient, birth in SENT[:2]:
        bundle = translate(repo_mappings, adt(number, patient, birth))
        add(engine, patient_key(bundle), bundle=json.dumps(bundle), destination="shared-record")
    yield peers.faults("record", "http_400", count=1)
    config = gateway_config(make_config, db_url, peers)
    database = Database(engine, reactor, 2)
    database.start()
    service = DeliveryService(config, database, reactor)
    service.startService()
    try:
        found = yield until(DELIVERIES, lambda f: len(f) == 2 and all(r.status == "dead" for r in f), db_url)
        assert [(r.attempts, r.last_code) for r in found] == [(1, 400), (1, 400)]
        assert all(b"OperationOutcome" in bytes(r.last_response) for r in found)
        with engine.begin() as conn:
            assert outbox.reopen_dead(conn, outbox.dead_message_ids(conn), datetime.now(timezone.utc)) == 2
        service.wake()
        yield until(DELIVERIES, lambda f: all(r.status == "delivered" for r in f), db_url)
        stats = yield record_stats(peers)
        assert stats["applied"] == 1  # both patients in one request (the 400 was injected before the API)
        for patient in (A, B):
            found = yield peers.search("/Patient?identifier=" + quote(patient))
            assert found["total"] == 1
    finally:
        yield service.stopService()
        database.stop()


class HeldTransport:
    """A destination that answers only when the test says so: each request's entry count is
    kept, and `answer()` fires the oldest request's response (a transaction-response with a
    201 for each entry: delivered)."""

    def __init__(self):
        self.requests: list[tuple[int, defer.Deferred]] = []

    def request(self, request):
        d = defer.Deferred()
        self.requests.append((request.body.count(b'"fullUrl"'), d))
        return d

    def answer(self):
        entries, d = next((r for r in self.requests if not r[1].called))
        d.callback(HttpResponse(200, {}, json.dumps({
            "resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": {"status": "201 Created"}}] * entries}).encode()))

    def close(self):
        return defer.succeed(None)


def held_delivery(db_url, make_config, peers, batch_size: int, lease: float = 30):
    """(engine, database, transport, config) for a DeliveryService test: the database migrated
    and its pool started, a HeldTransport, and the peers' configuration with the shared record
    batching `batch_size` deliveries under leases of `lease` seconds."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    config = gateway_config(make_config, db_url, peers)
    config = dataclasses.replace(config, destinations=(dataclasses.replace(config.destinations[0],
                                                                           batch_size=batch_size),),
                                 delivery=DeliveryConfig(lease=lease, poll_interval=0.05))
    database = Database(engine, reactor, 2)
    database.start()
    return engine, database, HeldTransport(), config


@defer.inlineCallbacks
def stop_held_delivery(service, transport, database, engine):
    """Answer what is still held (503), stop the service, then the database."""
    for _, d in transport.requests:
        if not d.called:
            d.callback(HttpResponse(503, {}, b""))
    yield service.stopService()
    database.stop()
    engine.dispose()


@pytest_twisted.inlineCallbacks
def test_a_node_whose_lease_was_taken_over_does_not_record_a_dead_letter(db_url, make_config, peers):
    """Two deliveries out, one request each; meanwhile another node takes over the first one's
    lease (this node was too slow). Both are refused (422): the attempts are recorded, but only
    the second becomes a dead letter, and only it is told and recorded as delivery.dead (the
    trail had said the first was dead while the other node still held it)."""
    from gateway.audit.trail import AuditTrail
    from gateway.events import EventBus

    engine, database, transport, config = held_delivery(db_url, make_config, peers, batch_size=1)
    trail, events = AuditTrail(engine, "node-t"), EventBus()
    told = []
    events.subscribe(told.append)
    service = DeliveryService(config, database, reactor, transport_factory=lambda destination: transport,
                              audit=trail, events=events)
    add(engine, "Patient/0", "Patient/1", destination="shared-record")
    service.startService()
    try:
        yield until_true(lambda: len(transport.requests) == 2)
        # Reads, then writes, while the service writes too: BEGIN IMMEDIATE (a read transaction
        # that upgrades fails at once on SQLite when the service committed meanwhile).
        with write_transaction(engine) as conn:
            first, second = conn.exec_driver_sql("SELECT id FROM deliveries ORDER BY id").scalars().all()
            conn.execute(update(deliveries).where(deliveries.c.id == first).values(lease_owner="node-other"))
        refusal = json.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "invalid"}]}).encode()
        for _, d in transport.requests:
            d.callback(HttpResponse(422, {}, refusal))
        found = yield until("SELECT id, status, lease_owner, attempts FROM deliveries ORDER BY id",
                            lambda f: f[1].status == "dead", db_url)
        assert [tuple(r) for r in found] == [(first, "pending", "node-other", 0), (second, "dead", None, 1)]
        with engine.connect() as conn:
            records = [(r.action, r.subject) for r in trail.records(conn)]
        assert sorted(records) == [("delivery.attempted", f"delivery/{first}"),
                                   ("delivery.attempted", f"delivery/{second}"),
                                   ("delivery.dead", f"delivery/{second}")]
        assert [e.subject for e in told if e.kind == "delivery.dead"] == [f"delivery/{second}"]
        assert service.dead == 1
        assert trail.verify().intact
    finally:
        yield stop_held_delivery(service, transport, database, engine)


@pytest_twisted.inlineCallbacks
def test_a_restarted_node_takes_back_its_earlier_processs_leases_at_once(db_url, make_config, peers):
    """A node killed with deliveries claimed (a lease of ten minutes) starts again: what its
    name still holds is sent at once, not when the leases expire; another node's lease stays."""
    engine, database, transport, config = held_delivery(db_url, make_config, peers, batch_size=1, lease=600)
    mine, theirs = add(engine, "Patient/0", "Patient/1", destination="shared-record")
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        for node in (config.node_name, "node-other"):
            assert len(outbox.claim_batches(conn, node, "shared-record", now, 600.0, requests=1)) == 1
    service = DeliveryService(config, database, reactor, transport_factory=lambda destination: transport)
    service.startService()
    try:
        yield until_true(lambda: len(transport.requests) == 1)
        transport.answer()
        found = yield until("SELECT message_id, status, lease_owner FROM deliveries ORDER BY id",
                            lambda f: f[0].status == "delivered", db_url)
        assert [tuple(r) for r in found] == [(mine, "delivered", None), (theirs, "pending", "node-other")]
        assert len(transport.requests) == 1
    finally:
        yield stop_held_delivery(service, transport, database, engine)


@pytest_twisted.inlineCallbacks
def test_while_a_request_is_in_flight_only_full_batches_go(db_url, make_config, peers):
    """A lone delivery goes at once. While it is out, deliveries of six patients arrive: a full
    batch (batch_size 4) goes too, the other two wait, and go together once nothing is in
    flight any more: two fuller requests instead of several small ones. Each attempt's audit
    record is committed with its settlement."""
    engine, database, transport, config = held_delivery(db_url, make_config, peers, batch_size=4)

    def bundle(n: int) -> str:  # one resource of its own a message (a request sends each once)
        return json.dumps({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": f"urn:uuid:0f0f0f0f-0000-5000-8000-{n:012d}",
             "resource": {"resourceType": "Basic", "id": f"0f0f0f0f-0000-5000-8000-{n:012d}"}}]})
    from gateway.audit.trail import AuditTrail

    trail = AuditTrail(engine, "node-t")
    service = DeliveryService(config, database, reactor, transport_factory=lambda destination: transport,
                              audit=trail)
    add(engine, "Patient/0", bundle=bundle(0), destination="shared-record")
    service.startService()
    try:
        yield until_true(lambda: len(transport.requests) == 1)
        assert transport.requests[0][0] == 1
        for n in range(1, 7):
            add(engine, f"Patient/{n}", bundle=bundle(n), destination="shared-record")
        service.wake()
        yield until_true(lambda: len(transport.requests) == 2)
        assert transport.requests[1][0] == 4
        yield _later(0.3)  # several polls: the two left are not sent while requests are out
        assert len(transport.requests) == 2
        transport.answer()
        yield _later(0.3)
        assert len(transport.requests) == 2  # one still out
        transport.answer()
        yield until_true(lambda: len(transport.requests) == 3)
        assert transport.requests[2][0] == 2
        transport.answer()
        found = yield until(DELIVERIES, lambda f: len(f) == 7 and all(r.status == "delivered" for r in f), db_url)
        assert [r.attempts for r in found] == [1] * 7
        with engine.connect() as conn:  # in the settling transactions: no flush to wait for
            records = list(trail.records(conn))
            ids = conn.exec_driver_sql("SELECT id FROM deliveries").scalars().all()
        assert sorted(r.subject for r in records) == sorted(f"delivery/{i}" for i in ids)
        assert {(r.action, r.outcome, r.detail["destination"]) for r in records} == {
            ("delivery.attempted", "success", "shared-record")}
        assert trail.verify().intact
    finally:
        yield stop_held_delivery(service, transport, database, engine)


def _later(seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def until_true(condition, timeout: float = 10.0):
    waited = 0.0
    while not condition():
        if waited > timeout:
            raise AssertionError("condition not met in time")
        yield _later(0.02)
        waited += 0.02


def translate(mapping_set, message: bytes) -> dict:
    from zoneinfo import ZoneInfo

    from gateway.mapping.runtime import TranslationContext
    from gateway.translation.inputs import read_input

    parsed = read_input(message)
    context = TranslationContext(sender_id="", timezone=ZoneInfo("Africa/Casablanca"), received_at=T0,
                                 message_key=f"{parsed.sending_facility}|{parsed.control_id}",
                                 control_id=parsed.control_id)
    return mapping_set.translate(parsed.message, context, parsed.message_type).bundle

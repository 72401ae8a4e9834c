"""The door's tables: migration 0004 creates exactly what gateway.doors.store declares (SQLite
and PostgreSQL), and idempotency claims hold between two connections racing on PostgreSQL."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from sqlalchemy import inspect

from gateway.doors.store import (Refusal, StoredAnswer, api_refusals, api_requests, claim_request,
                                 claimant, finish_request, list_refusals, record_refusal,
                                 release_request)
from gateway.store.database import Database, create_gateway_engine, migrate

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=timezone.utc)


def test_migration_creates_the_tables_as_declared(db_url):
    """Columns (name, nullability), primary key and indexes of both tables match their declaration."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    found = inspect(engine)
    for table in (api_requests, api_refusals):
        columns = [(c["name"], bool(c["nullable"])) for c in found.get_columns(table.name)]
        assert columns == [(c.name, bool(c.nullable)) for c in table.columns]
        assert found.get_pk_constraint(table.name)["constrained_columns"] == ["id"]
        indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                         for i in found.get_indexes(table.name))
        assert indexes == sorted((i.name, tuple(c.name for c in i.columns), bool(i.unique))
                                 for i in table.indexes)
    engine.dispose()


def test_claims_replay_mismatch_release_and_takeover(db_url):
    """A claim is new once, then in progress, replayed once done, refused for another digest;
    a released claim is new again; a claim whose lease passed may be taken over."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, None)
    claim = lambda key, digest, at=NOW: database.run_write_now(claim_request, "F1", key, "hl7v2.submit", digest, at, 60)
    assert claim("k", "d1").outcome == "new"
    assert claim("k", "d1").outcome == "in_progress"
    assert claim("k", "d2").outcome == "mismatch"
    assert database.run_write_now(claim_request, "F2", "k", "x", "d9", NOW, 60).outcome == "new"  # per facility
    database.run_write_now(finish_request, "F1", "k", StoredAnswer(200, "application/json", {"Location": "/x"}, b'{"a":1}'), NOW)
    replay = claim("k", "d1")
    assert replay.outcome == "replay" and replay.answer == StoredAnswer(200, "application/json", {"Location": "/x"}, b'{"a":1}')
    assert claim("r", "d1").outcome == "new"
    database.run_write_now(release_request, "F1", "r")
    assert claim("r", "d1").outcome == "new"
    assert claim("r", "d1", NOW + timedelta(seconds=61)).outcome == "new"  # its node died: taken over
    record_refusal_now = lambda **kw: database.run_write_now(record_refusal, Refusal(**{
        "refused_at": NOW, "listener": "https", "peer": "127.0.0.1:1", "facility_id": None,
        "certificate": "CN=x", "door": "rest", "operation": "/v1/x", "status": 401, "reason": "r", **kw}))
    record_refusal_now()
    record_refusal_now(status=403, facility_id="F1")
    assert [(r.status, r.facility_id) for r in database.run_now(list_refusals)] == [(403, "F1"), (401, None)]
    engine.dispose()


def test_a_restarted_node_takes_over_its_predecessors_claims_at_once(db_url):
    """A key left processing by a killed process of node-a is taken over by node-a's next
    process without waiting for the lease; another node, the same process, or a claim that
    names no process still wait for it."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, None)
    first, restarted, other = claimant("node-a", "p1"), claimant("node-a", "p2"), claimant("node-b", "p3")
    claim = lambda key, who, at=NOW: database.run_write_now(claim_request, "F1", key, "hl7v2.submit", "d1",
                                                            at, 60, who).outcome
    assert claim("k", first) == "new"  # then node-a's process p1 is killed mid-request
    assert claim("k", other) == "in_progress"
    assert claim("k", first) == "in_progress"  # p1 itself: still at it
    later = NOW + timedelta(seconds=2)
    assert claim("k", restarted, later) == "new"  # p2 knows p1 is gone
    assert claim("k", other, later) == "in_progress"  # and now p2 holds it
    database.run_write_now(finish_request, "F1", "k", StoredAnswer(200, "application/json", {}, b"{}"), later)
    assert claim("k", restarted, later) == "replay"
    assert claim("old", None) == "new"  # a claim of a gateway that did not say who it was
    assert claim("old", restarted) == "in_progress"
    engine.dispose()


def test_two_nodes_racing_for_one_key_on_postgresql(pg_url):
    """Twenty connections claim the same key at once: exactly one may process it."""
    engine = create_gateway_engine(pg_url, pool_size=20)
    migrate(engine)
    database = Database(engine, None)
    outcomes, barrier = [], threading.Barrier(20)

    def race():
        barrier.wait()
        outcomes.append(database.run_write_now(claim_request, "F1", "race", "op", "d", NOW, 60).outcome)

    threads = [threading.Thread(target=race) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["in_progress"] * 19 + ["new"]
    engine.dispose()


def test_a_refusal_of_a_long_or_nul_bearing_path_is_kept(db_url):
    """What a refusal took from the request (its path as the operation, a reason quoting it)
    is stored cut to its column and with U+FFFD for NUL: a request cannot keep its refusal
    out of the record (PostgreSQL refuses both as they came)."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, None)
    path = "/v1/" + "x" * 300 + "\x00"
    database.run_write_now(record_refusal, Refusal(NOW, "https", "10.0.0.1:4000", None, "CN=x\x00",
                                                   "rest", path, 413, f"too large: {path}"))
    [kept] = database.run_now(list_refusals)
    assert kept.operation == path[:64] and kept.certificate == "CN=x\ufffd"
    assert kept.reason == f"too large: {path}".replace("\x00", "\ufffd")
    engine.dispose()


def test_a_node_whose_clock_runs_ahead_does_not_take_over_a_request_in_progress(pg_url):
    """On PostgreSQL the door's claims are leased on the database's clock: a node whose clock
    runs ten minutes ahead finds another node's 60 s claim still held, instead of taking the
    request over and processing it a second time."""
    from gateway.doors.store import claim_request_on_shared_clock

    engine = create_gateway_engine(pg_url)
    migrate(engine)
    database = Database(engine, None)
    now = datetime.now(timezone.utc)
    claim = lambda who, at: database.run_write_now(claim_request_on_shared_clock, "F9", f"ahead-{now.timestamp()}",
                                                   "hl7v2.submit", "d1", at, 60, who).outcome
    try:
        assert claim(claimant("node-a", "p1"), now) == "new"
        assert claim(claimant("node-b", "p2"), now + timedelta(minutes=10)) == "in_progress"
    finally:
        engine.dispose()

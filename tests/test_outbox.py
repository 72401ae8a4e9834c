"""The outbox in a real database (SQLite and PostgreSQL): enqueueing with the translation,
claiming due deliveries in per-patient order with leases, settling attempts, reopening on
replay, and (PostgreSQL) two nodes claiming at once without overlap."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from sqlalchemy import select

from delivery_support import store_translated
from gateway.store import outbox
from gateway.store.database import create_gateway_engine, migrate
from gateway.store.schema import deliveries, delivery_attempts

T0 = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)


def add_messages(engine, count: int, bundle: str = '{"resourceType":"Bundle"}') -> list[int]:
    ids = []
    with engine.begin() as conn:
        for n in range(count):
            ids.append(store_translated(conn, T0, f"C{n}-{len(ids)}-{id(conn)}", bundle))
    return ids


def enqueue(engine, *entries, now=T0):
    with engine.begin() as conn:
        return outbox.enqueue(conn, [outbox.Enqueue(*e) for e in entries], now)


def claim(engine, node="n1", destination="record", now=T0, lease=60.0, limit=100):
    with engine.begin() as conn:
        return outbox.claim(conn, node, destination, now, lease, limit)


def settle(engine, node, *results):
    with engine.begin() as conn:
        outbox.settle(conn, node, results)


def status(engine) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(
            deliveries.c.message_id, deliveries.c.destination, deliveries.c.status,
            deliveries.c.attempts).order_by(deliveries.c.id))]


def done(claim_, kind="delivered", at=T0, next_at=None, response=None, code=200):
    return outbox.Settlement(claim_.id, kind, kind, at, 5, code, response, next_at)


def test_enqueue_claim_and_deliver(engine):
    """A delivery is claimed once with its bundle and key, then settled delivered with an attempt row."""
    (m,) = add_messages(engine, 1, '{"resourceType":"Bundle","id":"b1"}')
    assert enqueue(engine, (m, "record", "Patient/p1", "sha-1"), (m, "cnss", "Patient/p1", "sha-1")) == 2
    (c,) = claim(engine)
    assert (c.message_id, c.destination, c.attempts, c.first_attempt_at) == (m, "record", 0, None)
    assert c.bundle == '{"resourceType":"Bundle","id":"b1"}'
    assert c.idempotency_key == outbox.idempotency_key("record", m, "sha-1")
    assert claim(engine, now=T0 + timedelta(seconds=1)) == []  # held by the lease
    settle(engine, "n1", done(c))
    assert status(engine) == [(m, "record", "delivered", 1), (m, "cnss", "pending", 0)]
    with engine.connect() as conn:
        (attempt,) = conn.execute(select(delivery_attempts)).all()
    assert (attempt.delivery_id, attempt.node, attempt.outcome, attempt.code) == (c.id, "n1", "delivered", 200)
    with engine.connect() as conn:  # finished when the answer came: sent at T0, answered in 5 ms
        finished = conn.execute(select(deliveries.c.finished_at).where(deliveries.c.id == c.id)).scalar_one()
    assert (finished if finished.tzinfo else finished.replace(tzinfo=timezone.utc)) == T0 + timedelta(milliseconds=5)


def test_a_peer_reason_holding_a_nul_is_settled(engine):
    """A reason quoting a peer's diagnostics with a NUL in them (PostgreSQL's text has none) is
    recorded with U+FFFD: the settlement goes through instead of failing, and being redone,
    at every attempt."""
    (m,) = add_messages(engine, 1)
    enqueue(engine, (m, "record", "Patient/p1", "sha-1"))
    (c,) = claim(engine)
    settle(engine, "n1", outbox.Settlement(c.id, "permanent", "refused: bad\x00value", T0, 5, 422, b"{}", None))
    assert status(engine) == [(m, "record", "dead", 1)]
    with engine.connect() as conn:
        assert conn.execute(select(delivery_attempts.c.reason)).scalar_one() == "refused: bad\ufffdvalue"
        assert conn.execute(select(deliveries.c.last_reason)).scalar_one() == "refused: bad\ufffdvalue"


def test_per_patient_order_and_independent_patients(engine):
    """A patient's second message waits for the first; another patient's goes ahead; a dead
    letter does not block the patient for ever."""
    a1, b1, a2, a3 = add_messages(engine, 4)
    enqueue(engine, (a1, "record", "Patient/a", "s"), (b1, "record", "Patient/b", "s"),
            (a2, "record", "Patient/a", "s"), (a3, "record", "Patient/a", "s"))
    first = claim(engine)
    assert [c.message_id for c in first] == [a1, b1]
    retry_at = T0 + timedelta(seconds=30)
    settle(engine, "n1", done(first[0], "transient", next_at=retry_at), done(first[1]))
    assert claim(engine, now=T0 + timedelta(seconds=10)) == []  # a1 waits to retry, a2 waits for a1
    (again,) = claim(engine, now=retry_at)
    assert again.message_id == a1 and again.attempts == 1 and again.first_attempt_at == T0
    settle(engine, "n1", done(again, "permanent", at=retry_at, response=b"<fault/>", code=400))
    (next_,) = claim(engine, now=retry_at)
    assert next_.message_id == a2
    with engine.connect() as conn:
        dead = conn.execute(select(deliveries).where(deliveries.c.message_id == a1)).one()
    assert (dead.status, dead.attempts, dead.last_code, bytes(dead.last_response)) == ("dead", 2, 400, b"<fault/>")


def test_an_expired_lease_is_claimed_again_and_the_old_holder_cannot_settle(engine):
    """A node that died (or is too slow) loses its lease; its late result is recorded as an
    attempt but does not change the delivery the new holder owns."""
    (m,) = add_messages(engine, 1)
    enqueue(engine, (m, "record", "Patient/p", "s"))
    (lost,) = claim(engine, node="n1", lease=5)
    (taken,) = claim(engine, node="n2", now=T0 + timedelta(seconds=6))
    assert taken.id == lost.id and taken.idempotency_key == lost.idempotency_key
    settle(engine, "n1", done(lost, "permanent"))
    assert status(engine) == [(m, "record", "pending", 0)]
    settle(engine, "n2", done(taken))
    assert status(engine) == [(m, "record", "delivered", 1)]


def test_replay_reopens_dead_and_changed_content_only(engine):
    """Re-enqueueing (a replay): a dead letter is reopened with the same key; a delivered one
    with the same content is left; changed content is reopened under a new key."""
    m1, m2 = add_messages(engine, 2)
    enqueue(engine, (m1, "record", "Patient/p", "s1"), (m2, "record", "Patient/q", "s2"))
    c1, c2 = claim(engine)
    settle(engine, "n1", done(c1, "permanent"), done(c2))
    assert enqueue(engine, (m1, "record", "Patient/p", "s1"), (m2, "record", "Patient/q", "s2")) == 1
    assert status(engine) == [(m1, "record", "pending", 0), (m2, "record", "delivered", 1)]
    (reopened,) = claim(engine)
    assert reopened.idempotency_key == c1.idempotency_key
    assert enqueue(engine, (m2, "record", "Patient/q", "s2-fixed")) == 1
    changed = [c for c in claim(engine) if c.message_id == m2][0]
    assert changed.idempotency_key == outbox.idempotency_key("record", m2, "s2-fixed") != c2.idempotency_key


def test_an_earlier_delivery_enqueued_late_waits_for_its_patients_request_in_flight(engine):
    """A patient's earlier delivery that became pending while a later one is in flight (a dead
    letter replayed, a message translated late) waits for that request: never two requests of
    one patient in flight at once, on any node."""
    a1, a2, a3 = add_messages(engine, 3)
    enqueue(engine, (a2, "record", "Patient/a", "s2"))
    (in_flight,) = claim(engine, node="n1")
    enqueue(engine, (a1, "record", "Patient/a", "s1"))
    later = T0 + timedelta(seconds=1)
    assert claim(engine, node="n1", now=later) == []
    with engine.begin() as conn:
        assert outbox.claim_batches(conn, "n2", "record", later, 60, requests=4, batch_size=8) == []
    settle(engine, "n1", done(in_flight, at=later))
    (first,) = claim(engine, node="n2", now=later)
    assert first.message_id == a1
    settle(engine, "n2", done(first, "permanent", at=later))
    enqueue(engine, (a3, "record", "Patient/a", "s3"), now=later)
    (third,) = claim(engine, node="n1", now=later)
    with engine.begin() as conn:  # the dead letter replayed while a3 is in flight
        assert outbox.reopen_dead(conn, [a1], later) == 1
    assert claim(engine, node="n2", now=later) == []
    settle(engine, "n1", done(third, at=later))
    assert [c.message_id for c in claim(engine, node="n2", now=later)] == [a1]


def test_a_replay_that_no_longer_routes_a_pending_delivery_withdraws_it(engine):
    """Translated again (a replay), a message may no longer route to a destination still
    waiting for it, or no longer translate: that pending delivery used to go out with the new
    content under the old content's key (or find none and blame retention). It is a dead letter
    with the reason; one in flight is left to its attempt; one still routed is untouched."""
    from gateway.store.translations import Pending, TranslationRecord, save_translations

    m1, m2 = add_messages(engine, 2)
    enqueue(engine, (m1, "record", "Patient/p", "s1"), (m1, "cnss", "Patient/p", "s1"),
            (m2, "cnss", "Patient/q", "s2"))
    # m1's CNSS care sheet, in flight (leased now: PostgreSQL compares leases on its own clock)
    (flying,) = claim(engine, destination="cnss", limit=1, now=datetime.now(timezone.utc))
    later = T0 + timedelta(seconds=5)
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": []}
    only_record = TranslationRecord("translated", "v2", bundle, destinations=("record",))
    failed = TranslationRecord("failed", "v2", error_code=207, error_reason="no map")
    with engine.begin() as conn:
        save_translations(conn, [(Pending(m1, None, b"", "utf-8", "hl7v2", None, T0), only_record),
                                 (Pending(m2, None, b"", "utf-8", "hl7v2", None, T0), failed)],
                          later, again=True)
        rows = {(r.message_id, r.destination): r for r in conn.execute(select(deliveries))}
    assert flying.message_id == m1 and rows[(m1, "cnss")].status == "pending"  # its attempt decides
    assert rows[(m1, "record")].status == "pending"
    withdrawn = rows[(m2, "cnss")]
    assert (withdrawn.status, withdrawn.last_reason) == (
        "dead", "withdrawn: translated again, its translation is now failed (nothing to send); "
                "replay it once fixed")
    with engine.begin() as conn:  # once its attempt failed, the next replay withdraws it too
        outbox.settle(conn, "n1", [done(flying, "transient", at=later, next_at=later)])
        save_translations(conn, [(Pending(m1, None, b"", "utf-8", "hl7v2", None, T0), only_record)],
                          later, again=True)
        gone = conn.execute(select(deliveries).where(deliveries.c.message_id == m1,
                                                     deliveries.c.destination == "cnss")).one()
    assert (gone.status, gone.last_reason) == (
        "dead", "withdrawn: translated again, the message no longer routes to this destination")


def test_reopen_dead_for_messages_replay(engine):
    (m,) = add_messages(engine, 1)
    enqueue(engine, (m, "cnss", "message/1", "s"))
    (c,) = claim(engine, destination="cnss")
    settle(engine, "n1", done(c, "permanent"))
    with engine.begin() as conn:
        assert outbox.reopen_dead(conn, [m], T0) == 1
    assert status(engine) == [(m, "cnss", "pending", 0)]


def test_two_nodes_claim_disjoint_sets_at_once(pg_url):
    """PostgreSQL: two transactions claiming concurrently never get the same delivery."""
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    try:
        ids = add_messages(engine, 200)
        enqueue(engine, *[(m, "record", f"Patient/{m}", "s") for m in ids])
        got: dict[str, list[int]] = {}
        barrier = threading.Barrier(2)

        def node(name):
            barrier.wait()
            got[name] = [c.id for c in claim(engine, node=name, limit=150)]

        threads = [threading.Thread(target=node, args=(n,)) for n in ("n1", "n2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not set(got["n1"]) & set(got["n2"])
        assert len(got["n1"]) + len(got["n2"]) == 200
    finally:
        engine.dispose()


@contextmanager
def one_delivery_leased_by_n1(pg_url):
    """A PostgreSQL outbox with one delivery, leased by node n1 for 60 s through the delivery
    service's claim: (engine, message id, the batch n1 holds, n1's now)."""
    from gateway.delivery.service import _ClaimPlan, _claim_all

    engine = create_gateway_engine(pg_url)
    try:
        migrate(engine)
        now = datetime.now(timezone.utc)
        (m,) = add_messages(engine, 1)
        enqueue(engine, (m, "record", "Patient/p1", "sha-1"), now=now)
        with engine.begin() as conn:
            (held,) = _claim_all(conn, "n1", {"record": _ClaimPlan(10, 1, None)}, now, 60.0)
        yield engine, m, held, now
    finally:
        engine.dispose()


def test_nodes_take_leases_on_the_database_clock_not_their_own(pg_url):
    """On PostgreSQL, where nodes share the outbox, a node whose clock runs ten minutes ahead
    does not take what another node holds under a 60 s lease: leases are taken and compared on
    the database's clock. (On SQLite one node runs: its clock is the only one.)"""
    from gateway.delivery.service import _ClaimPlan, _claim_all

    with one_delivery_leased_by_n1(pg_url) as (engine, m, held, now):
        with engine.begin() as conn:
            assert _claim_all(conn, "n2", {"record": _ClaimPlan(10, 1, None)}, now + timedelta(minutes=10),
                              60.0) == []
        with engine.begin() as conn:  # n1 holds it for 60 s of the database clock
            lease_until = conn.execute(select(deliveries.c.lease_until)).scalar_one()
        assert lease_until > datetime.now(timezone.utc) + timedelta(seconds=50)


def test_deliveries_fall_due_on_the_database_clock_not_the_nodes(pg_url):
    """On PostgreSQL a node whose clock runs ten minutes ahead neither holds back what it
    translates (due at once, not ten minutes late) nor the retries it settles (due after the
    policy's wait on the database's clock)."""
    from gateway.delivery.service import _ClaimPlan, _claim_all

    engine = create_gateway_engine(pg_url)
    try:
        migrate(engine)
        with engine.begin() as conn:
            conn.execute(deliveries.delete())
        ahead = datetime.now(timezone.utc) + timedelta(minutes=10)
        (m,) = add_messages(engine, 1)
        with engine.begin() as conn:  # what the translation worker does on a node ahead
            save_translation(conn, m, ahead, due=outbox.shared_clock(conn))

        def claimed(node):
            with engine.begin() as conn:  # another node, on time
                return _claim_all(conn, node, {"record": _ClaimPlan(10, 1, None)},
                                  datetime.now(timezone.utc), 60.0)

        (batch,) = claimed("n2")
        with engine.begin() as conn:  # n2 fails it; the policy says: again in 2 s, on n1's clock
            outbox.settle(conn, "n2", [done(batch.claims[0], "transient", ahead, ahead + timedelta(seconds=2),
                                            code=503)], now=ahead)
            due = conn.execute(select(deliveries.c.next_attempt_at)).scalar_one()
        assert abs((due - datetime.now(timezone.utc)).total_seconds() - 2) < 1
        (batch,) = retry_when_due(claimed)
        settle(engine, "n2", done(batch.claims[0], "permanent", code=422))
    finally:
        engine.dispose()


def save_translation(conn, message_id: int, now: datetime, due: datetime | None = None) -> None:
    """The translation of a stored message, routed to the record, saved at `now`."""
    from gateway.store.translations import Pending, TranslationRecord, save_translations

    bundle = {"resourceType": "Bundle", "type": "collection", "entry": []}
    save_translations(conn, [(Pending(message_id, None, b"", "utf-8", "hl7v2", None, T0),
                              TranslationRecord("translated", "v2", bundle, destinations=("record",)))],
                      now, due=due)


def retry_when_due(claim_due, seconds: float = 10.0):
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batches = claim_due("n2")
        if batches:
            return batches
        time.sleep(0.2)
    raise AssertionError("the retry never fell due")


def test_withdrawing_and_the_console_respect_a_lease_on_the_database_clock(pg_url):
    """A replay on a node whose clock runs ten minutes ahead does not withdraw, and the console
    does not dead-letter or replay, a delivery another node holds under its lease (its answer
    then found the row dead: a delivery the peer has, marked never sent)."""
    from gateway.console import actions

    with one_delivery_leased_by_n1(pg_url) as (engine, m, held, now):
        ahead = now + timedelta(minutes=10)
        with engine.begin() as conn:
            assert outbox.withdraw(conn, {m: (frozenset(), "no longer routed")}, ahead) == 0
            assert actions.dead_letter(conn, m, held.ids[0], ahead, "ops")[0] == actions.IN_FLIGHT
            assert actions.replay_delivery(conn, m, held.ids[0], ahead)[0] == actions.IN_FLIGHT
        settle(engine, "n1", done(held.claims[0], at=now))
        assert status(engine) == [(m, "record", "delivered", 1)]

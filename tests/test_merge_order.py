"""A merge (ADT^A40) and the merged patient's earlier deliveries (SQLite and PostgreSQL): they
reach each destination before the merge, whatever patient each was keyed by when enqueued,
or the merged patient's older update would overwrite the merge at the record."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from delivery_support import store_translated
from gateway.config import RouteConfig, RouteMatch
from gateway.delivery.routes import Router
from gateway.store import outbox
from gateway.store.schema import deliveries
from gateway.store.translations import Pending, save_translations
from gateway.translation.translator import Translator

T0 = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
A40 = (Path(__file__).resolve().parent.parent / "mappings" / "tests" / "adt" / "a40-merge.hl7").read_bytes()
SURVIVOR = "Patient/6055c733-a896-544a-ac5d-b8ffa0e0c147"  # PID: 123456 at CHUIR
MERGED = "Patient/adaf1156-67da-512d-957c-fbc0f259a44e"  # MRG: 987654 at CHUIR
# The merged patient's own update, sent before the merge (synthetic, from the A40 case).
A08 = (b"\r".join(s for s in A40.split(b"\r") if not s.startswith(b"MRG"))
       .replace(b"ADT^A40^ADT_A39|ADT0011", b"ADT^A08^ADT_A01|ADT0010").replace(b"EVN|A40", b"EVN|A08")
       .replace(b"PID|1||123456^^^CHUIR^MR~be123456^^^CNIE^NI~112233445^^^CNSS^SB||BENALI",
                b"PID|1||987654^^^CHUIR^MR||BENALLI"))
ROUTES = (RouteConfig("updates", ("record", "cnss"), RouteMatch(message_types=("ADT^A08",))),
          RouteConfig("merges", ("record",), RouteMatch(message_types=("ADT^A40",))))


@pytest.fixture
def translator(repo_mappings) -> Translator:
    return Translator(repo_mappings, (), Router(ROUTES))


def store(engine, translator: Translator, *raws: bytes) -> list[int]:
    """Translate `raws` and store them with their deliveries in one batch, as the translation
    worker does; their ids."""
    with engine.begin() as conn:
        pendings = [Pending(store_translated(conn, T0, raw.split(b"|")[9].decode(), "{}", raw),
                            None, raw, None, "hl7v2", None, T0) for raw in raws]
        save_translations(conn, [(p, translator.translate(p)) for p in pendings], now=T0)
    return [p.message_id for p in pendings]


def claim(engine, now=T0) -> list[outbox.Claim]:
    with engine.begin() as conn:
        return outbox.claim(conn, "n1", "record", now, 60.0, 100)


def delivered(engine, claim_: outbox.Claim, now=T0) -> None:
    with engine.begin() as conn:
        outbox.settle(conn, "n1", [outbox.Settlement(claim_.id, "delivered", "ok", now, 5, 200)])


def keys(engine) -> dict[tuple[int, str], tuple[str, str]]:
    """(message id, destination) -> (patient key, status) of every delivery."""
    with engine.connect() as conn:
        return {(r.message_id, r.destination): (r.patient_key, r.status) for r in conn.execute(
            select(deliveries.c.message_id, deliveries.c.destination, deliveries.c.patient_key,
                   deliveries.c.status))}


def test_a_merge_waits_for_the_merged_patients_pending_delivery(engine, translator):
    """The record was down: the merged patient's update still waits when the merge comes. The
    update goes first, the merge once it was delivered."""
    (update,) = store(engine, translator, A08)
    (merge,) = store(engine, translator, A40)
    assert keys(engine)[(merge, "record")] == (SURVIVOR, "pending")
    (first,) = claim(engine)
    assert first.message_id == update
    assert claim(engine) == []
    delivered(engine, first)
    assert [c.message_id for c in claim(engine)] == [merge]


def test_a_merge_translated_in_the_same_batch_as_the_merged_patients_update_waits_for_it(
        engine, translator):
    """Both in one translation batch: the update, inserted with the merge, is re-keyed too."""
    update, merge = store(engine, translator, A08, A40)
    assert keys(engine)[(update, "record")] == (SURVIVOR, "pending")
    (first,) = claim(engine)
    assert first.message_id == update
    delivered(engine, first)
    assert [c.message_id for c in claim(engine)] == [merge]


def test_a_merge_waits_for_the_merged_patients_delivery_in_flight(engine, translator):
    """The merged patient's update is being sent when the merge is stored: the merge waits for
    its answer, and for its retry when it failed."""
    (update,) = store(engine, translator, A08)
    (sending,) = claim(engine)
    (merge,) = store(engine, translator, A40)
    assert claim(engine) == []
    retry_at = T0 + timedelta(seconds=30)
    with engine.begin() as conn:
        outbox.settle(conn, "n1", [outbox.Settlement(sending.id, "transient", "down", T0, 5, 503,
                                                     next_attempt_at=retry_at)])
    assert claim(engine, T0 + timedelta(seconds=1)) == []
    (again,) = claim(engine, retry_at)
    assert again.message_id == update
    delivered(engine, again, retry_at)
    assert [c.message_id for c in claim(engine, retry_at)] == [merge]


def test_a_dead_letter_and_other_destinations_of_the_merged_patient_keep_their_key(engine, translator):
    """A dead letter under the merged patient's key does not hold the merge back (it may never
    be sent again), and a destination the merge does not go to keeps its order as it was."""
    (update,) = store(engine, translator, A08)
    (refused,) = claim(engine)
    with engine.begin() as conn:
        outbox.settle(conn, "n1", [outbox.Settlement(refused.id, "permanent", "refused", T0, 5, 422)])
    (merge,) = store(engine, translator, A40)
    assert [c.message_id for c in claim(engine)] == [merge]
    found = keys(engine)
    assert found[(update, "record")] == (MERGED, "dead")
    assert found[(update, "cnss")] == (MERGED, "pending")


def test_a_replay_of_the_merged_patients_pending_update_keeps_its_place_before_the_merge(
        engine, translator):
    """The merged patient's update, still pending, translated again with other content (a
    mapping fix, a replay): its next attempt carries the new content and keeps the place the
    merge gave it, ahead of the merge (it went back to its own patient's key: both were then
    claimed at once, the merge free to reach the record first)."""
    update, merge = store(engine, translator, A08, A40)
    changed = A08.replace(b"BENALLI", b"BENALLY")
    with engine.begin() as conn:
        again = Pending(update, None, changed, None, "hl7v2", None, T0)
        save_translations(conn, [(again, translator.translate(again))], now=T0, again=True)
    assert keys(engine)[(update, "record")] == (SURVIVOR, "pending")
    assert [c.message_id for c in claim(engine)] == [update]

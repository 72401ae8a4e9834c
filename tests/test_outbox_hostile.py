"""The outbox and the translation worker under crashes, overload and retention: what must hold
is that nothing is lost, and each patient's messages reach a destination in order."""
from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pytest_twisted
from sqlalchemy import text
from twisted.internet import reactor

from delivery_support import until
from gateway.config import RouteConfig, RouteMatch
from gateway.delivery.routes import Router, patient_key
from gateway.delivery.service import DeliveryService
from gateway.mapping.mapping_set import MappingSet
from gateway.store import outbox
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.translation.service import TranslationJob, TranslationWorker
from gateway.translation.translator import Translator
from test_delivery_batching import A, B, DELIVERIES, SENT, add, adt, gateway_config, translate
from test_translation_service import _stored, _until
from translation_support import hl7, write_mappings


# -- delivery: a bundle retention expired ------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_an_expired_bundle_does_not_take_the_rest_of_its_request_down(db_url, make_config, peers,
                                                                     repo_mappings):
    """Two patients' deliveries due together make one request; retention expired the first's
    bundle. That one becomes a dead letter (nothing can be sent for it); the other patient's
    is still delivered, instead of dying with it."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    ids = []
    for number, patient, birth in SENT[:2]:
        bundle = translate(repo_mappings, adt(number, patient, birth))
        ids += add(engine, patient_key(bundle), bundle=json.dumps(bundle), destination="shared-record")
    with engine.begin() as conn:  # as retention does
        conn.execute(text("DELETE FROM canonical_bundles WHERE message_id = :id"), {"id": ids[0]})
    with engine.begin() as conn:  # they would travel together
        (batch,) = outbox.claim_batches(conn, "probe", "shared-record", datetime.now(timezone.utc), 60.0,
                                        requests=4, batch_size=64)
        assert len(batch.claims) == 2
        outbox.release(conn, "probe", batch.ids)
    database = Database(engine, reactor, 2)
    database.start()
    service = DeliveryService(gateway_config(make_config, db_url, peers), database, reactor)
    service.startService()
    try:
        found = yield until(DELIVERIES, lambda f: all(r.status != "pending" for r in f), db_url)
        assert [r.status for r in found] == ["dead", "delivered"]
        reason = yield until("SELECT last_reason FROM deliveries ORDER BY id", lambda f: True, db_url)
        assert "expired" in reason[0].last_reason
        record = yield peers.search("/Patient?identifier=" + quote(B))
        assert record["total"] == 1
        record = yield peers.search("/Patient?identifier=" + quote(A))
        assert record["total"] == 0
        assert (service.delivered, service.dead) == (1, 1)
    finally:
        yield service.stopService()
        database.stop()
        engine.dispose()


# -- translation: a message left to the sweep is not overtaken by a later one of its patient ----

ROUTES = (RouteConfig("clinical", ("record",), RouteMatch(resources=("Patient",))),)


def same_patient(control_id: str) -> bytes:
    """A message about the one patient P-SAME (its deliveries are ordered together)."""
    return hl7(control_id).replace(f"P-{control_id}".encode(), b"P-SAME")


class Gates:
    """A translator that holds the translation of chosen messages until the test lets it go,
    and says when one is being held."""

    def __init__(self, translator: Translator, held):
        self.held = {message_id: threading.Event() for message_id in held}
        self.entered = {message_id: threading.Event() for message_id in held}
        self.original = translator.translate
        translator.translate = self.translate

    def translate(self, item):
        if item.message_id in self.held:
            self.entered[item.message_id].set()
            assert self.held[item.message_id].wait(20)
        return self.original(item)

    def wait(self, message_id) -> None:
        assert self.entered[message_id].wait(20), f"message {message_id} never translated"

    def release(self, message_id) -> None:
        self.held[message_id].set()


def worker_for(engine, tmp_path, held, **options):
    translator = Translator(MappingSet.load(write_mappings(tmp_path / "mappings")), (), Router(ROUTES))
    gates = Gates(translator, held)
    return TranslationWorker(engine, translator, lambda f, *a: f(*a), linger=0, **options), gates


def claimed(engine, among) -> list[int]:
    """Which of the messages `among` (ids) have a delivery that may go now (claimed, then
    given back)."""
    with engine.begin() as conn:
        claims = outbox.claim(conn, "n1", "record", datetime.now(timezone.utc), 60.0, 100)
        outbox.release(conn, "n1", [c.id for c in claims])
    return [c.message_id for c in claims if c.message_id in among]


def settle_delivered(engine, message_id: int) -> None:
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        claims = outbox.claim(conn, "n1", "record", now, 60.0, 100)
        (claim,) = [c for c in claims if c.message_id == message_id]
        outbox.settle(conn, "n1", [outbox.Settlement(claim.id, "delivered", "ok", now, 1, 200)])
        outbox.release(conn, "n1", [c.id for c in claims if c is not claim])


def statuses(engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT status FROM messages ORDER BY id")).scalars())


def test_a_message_dropped_from_a_full_queue_is_not_overtaken_by_a_later_one(db_url, tmp_path):
    """The queue is full when message 1 of a patient is committed: its job is dropped, left to
    the sweep. Message 2 of the same patient comes a moment later, when there is room. Until
    message 1 is translated, no delivery of that patient may go: message 2's, translated
    first from memory, would reach the record before message 1's (older data over newer)."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    blocker, filler, first, second = _stored(engine, [hl7("BL-1"), hl7("FI-1"), same_patient("P-1"),
                                                      same_patient("P-2")])
    worker, gates = worker_for(engine, tmp_path, [blocker.message_id, filler.message_id, first.message_id],
                               max_queued=1)
    worker.start(sweep=False)
    try:
        worker.submit(TranslationJob([blocker]))
        gates.wait(blocker.message_id)  # the worker is busy
        worker.submit(TranslationJob([filler], lambda job: None))  # an ACK waits for it: queued
        worker.submit(TranslationJob([first]))  # the queue is full: left to the sweep
        gates.release(blocker.message_id)
        gates.wait(filler.message_id)
        worker.submit(TranslationJob([second]))  # room again
        gates.release(filler.message_id)
        gates.wait(first.message_id)  # the sweep has it in hand
        patient = {first.message_id, second.message_id}
        assert claimed(engine, patient) == []  # nothing of the patient may go before message 1
        gates.release(first.message_id)
        assert _until(lambda: statuses(engine) == ["translated"] * 4, 20.0)
        assert claimed(engine, patient) == [first.message_id]
        settle_delivered(engine, first.message_id)
        assert claimed(engine, patient) == [second.message_id]
        assert worker.translated == 4  # each once
    finally:
        for message_id in gates.held:
            gates.release(message_id)
        worker.stop()
        engine.dispose()


def test_after_a_restart_new_messages_wait_for_the_backlog_of_their_patient(db_url, tmp_path):
    """A node restarts with messages of a patient left untranslated (it died under load); a new
    message of that patient arrives while the start sweep works through them. Its delivery
    must not go before theirs: the sweep takes it, in order."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    first, second = _stored(engine, [same_patient("R-1"), same_patient("R-2")])
    worker, gates = worker_for(engine, tmp_path, [first.message_id, second.message_id], max_batch=1)
    worker.start(sweep=True)
    try:
        gates.wait(first.message_id)  # the start sweep, one message a batch
        (late,) = _stored(engine, [same_patient("R-3")])  # the listeners are open again
        worker.submit(TranslationJob([late]))
        gates.release(first.message_id)
        gates.wait(second.message_id)
        settle_delivered(engine, first.message_id)  # message 1 went
        patient = {first.message_id, second.message_id, late.message_id}
        assert claimed(engine, patient) == []  # message 2 is not stored yet: nothing may go
        gates.release(second.message_id)
        assert _until(lambda: statuses(engine) == ["translated"] * 3, 20.0)
        assert claimed(engine, patient) == [second.message_id]
        settle_delivered(engine, second.message_id)
        assert claimed(engine, patient) == [late.message_id]
        assert worker.translated == 3
    finally:
        for message_id in gates.held:
            gates.release(message_id)
        worker.stop()
        engine.dispose()


# -- a replay racing the settlement of the delivery in flight ---------------------------------

def _wait_for_lock(engine, timeout: float = 10.0) -> None:
    """Until some other session waits for a row lock."""
    def waiting():
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND pid <> pg_backend_pid()")).scalar()
    assert _until(waiting, timeout), "nobody waits for a lock"


def test_a_node_whose_clock_runs_ahead_makes_its_deliveries_due_at_once(pg_url, tmp_path, monkeypatch):
    """On PostgreSQL, a translation worker whose clock runs ten minutes ahead stores the
    message's delivery due on the database's clock, which claims compare with: it may go at
    once, not ten minutes late."""
    from gateway.translation import service

    class Ahead(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(minutes=10)

    engine = create_gateway_engine(pg_url)
    migrate(engine)
    try:
        (item,) = _stored(engine, [same_patient("AHEAD-1")])
        worker, _ = worker_for(engine, tmp_path, [])
        monkeypatch.setattr(service, "datetime", Ahead)
        job = worker.translate_now([item])
        assert job.error is None
        assert claimed(engine, [item.message_id]) == [item.message_id]
    finally:
        engine.dispose()


def test_a_replay_with_new_content_reopens_a_delivery_refused_meanwhile(pg_url):
    """A node is settling a delivery as refused (a dead letter) while an operator replays its
    message with a fixed mapping (new content). Whichever commits first, the new content must
    go: the replay may not leave a dead letter carrying its new key, never to be sent."""
    from delivery_support import store_translated

    engine = create_gateway_engine(pg_url)
    migrate(engine)
    try:
        now = datetime.now(timezone.utc)
        with engine.begin() as conn:
            message = store_translated(conn, now, "RP-1", '{"resourceType":"Bundle"}')
            outbox.enqueue(conn, [outbox.Enqueue(message, "record", "Patient/p", "old")], now)
        with engine.begin() as conn:
            (claim,) = outbox.claim(conn, "node-a", "record", now, 60.0, 1)
        settling = engine.connect()
        transaction = settling.begin()
        outbox.settle(settling, "node-a", [outbox.Settlement(claim.id, "permanent", "HTTP 422", now, 5, 422,
                                                             b"{}", None, claim.idempotency_key)])
        errors = []

        def replay():
            try:
                with engine.begin() as conn:
                    outbox.enqueue(conn, [outbox.Enqueue(message, "record", "Patient/p", "fixed")], now)
            except Exception as error:  # pragma: no cover - reported below
                errors.append(error)

        replaying = threading.Thread(target=replay)
        replaying.start()
        _wait_for_lock(engine)
        transaction.commit()  # the refusal lands while the replay is under way
        settling.close()
        replaying.join(10)
        assert not replaying.is_alive() and errors == []
        with engine.connect() as conn:
            row = conn.execute(text("SELECT status, idempotency_key FROM deliveries")).one()
        assert row.idempotency_key == outbox.idempotency_key("record", message, "fixed")
        assert row.status == "pending"
    finally:
        engine.dispose()


# -- translation through a database outage ----------------------------------------------------

class Outage:
    """The test database refusing every connection (as when PostgreSQL is down or failing
    over), then back."""

    def __init__(self, url: str):
        from sqlalchemy.engine import make_url

        self.name = make_url(url).database
        self.admin = create_gateway_engine(str(make_url(url).set(database="postgres")))

    def begin(self) -> None:
        with self.admin.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                         {"name": self.name})

    def end(self) -> None:
        with self.admin.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))
        self.admin.dispose()


def test_messages_whose_translation_failed_to_store_are_swept_once_the_database_is_back(
        pg_url, tmp_path, monkeypatch):
    """The database goes away while a live batch is being stored: storing fails, and the sweep
    that should take its messages fails too (the database is still away). Once the database
    is back, the sweep retries and translates them, rather than giving up at its first
    failure and leaving them for a stale check a minute or more later (live messages of the
    same patients going ahead of them meanwhile)."""
    from gateway.translation import service

    monkeypatch.setattr(service, "IDLE_CHECK", 0.2)  # how long the sweep waits to retry
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    (item,) = _stored(engine, [same_patient("DB-1")])
    worker, gates = worker_for(engine, tmp_path, [], stale_after=3600)
    worker.start(sweep=False)
    outage = Outage(pg_url)
    failed = []
    try:
        outage.begin()
        worker.submit(TranslationJob([item], lambda job: failed.append(job.error)))
        assert _until(lambda: failed, 20.0) and failed[0] is not None
        import time

        time.sleep(0.5)  # the sweep's attempts fail too
        outage.end()
        assert _until(lambda: statuses(engine) == ["translated"], 30.0)
    finally:
        try:
            outage.end()
        except Exception:
            pass
        worker.stop()
        engine.dispose()


# -- `gateway messages replay` and the e-prescription flow ------------------------------------

def _replay_config(tmp_path, dev_pki: str, key: str) -> str:
    """The shipped configuration for a `gateway` process: the test PKI and signing key, the
    repository's registry, routes and mappings (the database comes from GATEWAY_DB_URL)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "conf", "gateway.yaml"), encoding="utf-8") as handle:
        shipped = handle.read()
    config = (shipped.replace("certs/dev/ca.crt", f"{dev_pki}/ca.crt")
              .replace("certs/dev/gateway.crt", f"{dev_pki}/gateway.crt")
              .replace("certs/dev/gateway.key", f"{dev_pki}/gateway.key")
              .replace("dev_dir: certs/dev", f"dev_dir: {dev_pki}\n  prescription_key: {key}")
              .replace("conf/facilities.yaml", f"{root}/conf/facilities.yaml")
              .replace("conf/routes.yaml", f"{root}/conf/routes.yaml")
              .replace("directory: mappings", f"directory: {root}/mappings"))
    path = tmp_path / "replay.yaml"
    path.write_text(config, encoding="utf-8")
    return str(path)


def test_replaying_prescription_messages_goes_through_the_prescription_flow(tmp_path, dev_pki,
                                                                           repo_mappings):
    """`gateway messages replay` (what an operator runs after a mapping fix) translates again
    through the e-prescription flow, as the gateway does: a dispensation the flow refused (more
    than prescribed) stays refused, nothing routed; the prescription and the accepted
    dispensation keep their bundles (the issued id written in), so nothing is sent again.
    Without the flow, the refused one became `translated` with a care sheet enqueued for CNSS
    to pay, and the prescription's bundle lost its id."""
    import os
    import subprocess
    import sys

    from process_support import child_environment
    from prescription_support import DOLIPRANE, rde, rds, segments, standard_harness

    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    harness = standard_harness(url, tmp_path, repo_mappings)
    bundles = "SELECT message_id, bundle FROM canonical_bundles ORDER BY message_id"
    routed = ("SELECT m.control_id, d.destination, d.bundle_sha256 FROM deliveries d "
              "JOIN messages m ON m.id = d.message_id ORDER BY d.id")
    try:
        [issued] = harness.translate(rde("RDE-1"))
        prescription = segments(issued.ack)["ORC"][0][3].split("^")[0]
        [accepted] = harness.translate(rds("RDS-1", prescription, ((DOLIPRANE, 2),)))
        [refused] = harness.translate(rds("RDS-2", prescription, ((DOLIPRANE, 2),)))
        assert (issued.status, accepted.status, refused.status) == ("translated", "translated", "failed")
        with harness.engine.connect() as conn:
            before = (conn.execute(text(bundles)).all(), conn.execute(text(routed)).all())
        config = _replay_config(tmp_path, dev_pki, harness.config.pki.prescription_key)
        done = subprocess.run([os.path.join(sys.prefix, "bin", "gateway"), "messages", "replay", "1", "2", "3",
                               "-c", config], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120, env={**child_environment(), "GATEWAY_DB_URL": url})
        assert done.returncode == 1, done.stderr  # the refused one failed again
        assert done.stdout.splitlines()[:2] == ["1: translated", "2: translated"]
        assert done.stdout.splitlines()[2].startswith("3: failed")
        with harness.engine.connect() as conn:
            assert list(conn.execute(text("SELECT status FROM messages ORDER BY id")).scalars()) == [
                "translated", "translated", "failed"]
            assert (conn.execute(text(bundles)).all(), conn.execute(text(routed)).all()) == before
            assert conn.execute(text("SELECT count(*) FROM dispensations")).scalar() == 1
    finally:
        harness.close()

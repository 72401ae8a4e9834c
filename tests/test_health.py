"""/health/live and /health/ready over HTTP on a real port: ready when the database answers,
every listener listens and the mapping set is loaded; 503 naming what fails otherwise (a
listener stopped, a database that cannot be reached, a gateway not started yet)."""
from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.server import Site

from gateway.health import HealthResource, ReadinessChecks
from gateway.store.database import Database, create_gateway_engine
from observability_support import HOST, closed_port, http_get, in_thread, observed_config



def get_json(url: str):
    status, headers, body = http_get(url)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


@pytest_twisted.inlineCallbacks
def test_ready_then_a_listener_stops(db_url, make_config, tmp_path, observe):
    observed = yield observe(observed_config(make_config, db_url, tmp_path))
    status, body = yield in_thread(get_json, observed.base + "/health/live")
    assert (status, body) == (200, {"status": "up"})
    status, body = yield in_thread(get_json, observed.base + "/health/ready")
    assert (status, body) == (200, {"status": "ready", "checks": {
        "database": {"ok": True}, "listeners": {"ok": True}, "mappings": {"ok": True}}})
    for other in ("/health/", "/health/x", "/health/x/y"):  # JSON too, not Twisted's HTML page
        status, body = yield in_thread(get_json, observed.base + other)
        assert (status, body) == (404, {"error": "see /health/live and /health/ready"})

    yield observed.service.getServiceNamed("mllp-tls").stopService()
    status, body = yield in_thread(get_json, observed.base + "/health/ready")
    assert status == 503 and body["status"] == "not ready"
    assert body["checks"]["listeners"] == {"ok": False, "detail": "not listening: mllp-tls"}
    assert body["checks"]["database"] == {"ok": True}


@pytest_twisted.inlineCallbacks
def test_a_gateway_not_started_is_not_ready(make_config, tmp_path):
    """Built but not started: the database pool does not answer (within its 2 s), nothing
    listens, no mapping set is loaded; live still answers (the reactor does)."""
    from gateway.observability import observability_resources
    from gateway.service import build_service

    config = observed_config(make_config, f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path, tls=False)
    service = build_service(config, reactor)
    port = reactor.listenTCP(0, Site(observability_resources(service, config, reactor)["health"]),
                             interface=HOST)
    base = f"http://{HOST}:{port.getHost().port}"
    try:
        status, body = yield in_thread(get_json, base + "/live")
        assert status == 200
        status, body = yield in_thread(get_json, base + "/ready")
        assert status == 503
        assert body["checks"] == {
            "database": {"ok": False, "detail": "no answer within 2 s"},
            "listeners": {"ok": False, "detail": "not listening: mllp-test"},
            "mappings": {"ok": False, "detail": "no mapping set loaded"}}
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_an_unreachable_database_is_not_ready():
    """A PostgreSQL nobody listens for: the check fails with the driver's reason, at once."""
    engine = create_gateway_engine(f"postgresql+psycopg://postgres@{HOST}:{closed_port()}/gateway")
    database = Database(engine, reactor, 1)
    database.start()
    port = reactor.listenTCP(0, Site(HealthResource(ReadinessChecks(reactor, database))), interface=HOST)
    try:
        status, body = yield in_thread(get_json, f"http://{HOST}:{port.getHost().port}/ready")
        assert status == 503
        check = body["checks"]["database"]
        assert check["ok"] is False and "connection" in check["detail"].lower(), check
        assert body["checks"]["listeners"] == {"ok": True}  # none configured
    finally:
        yield port.stopListening()
        yield defer.succeed(database.stop())


@pytest_twisted.inlineCallbacks
def test_a_lock_held_on_the_messages_table_is_not_ready(pg_url):
    """SELECT 1 answered while a migration or a VACUUM FULL held the messages table, when
    nothing could be stored: ready. The check reads that table, waiting at most its 2 s."""
    import psycopg

    from gateway.store.database import migrate

    engine = create_gateway_engine(pg_url)
    migrate(engine)
    database = Database(engine, reactor, 1)
    database.start()
    port = reactor.listenTCP(0, Site(HealthResource(ReadinessChecks(reactor, database))), interface=HOST)
    url = f"http://{HOST}:{port.getHost().port}/ready"
    holder = psycopg.connect(pg_url.replace("postgresql+psycopg", "postgresql"), autocommit=False)
    try:
        status, body = yield in_thread(get_json, url)
        assert status == 200
        holder.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        status, body = yield in_thread(get_json, url)
        assert status == 503 and body["checks"]["database"]["ok"] is False, body
        holder.rollback()
        # The pool's one thread was not left waiting for the lock: the next check answers.
        status, body = yield in_thread(get_json, url)
        assert status == 200, body
    finally:
        holder.close()
        yield port.stopListening()
        yield defer.succeed(database.stop())
        engine.dispose()


@pytest_twisted.inlineCallbacks
def test_a_hung_database_is_asked_once_however_often_the_balancer_probes(tmp_path):
    """A database that does not answer (its pool thread stuck on it): each probe answers 503
    within its 2 s, and the probes arriving meanwhile wait for the read already out rather than
    each leaving one more in the pool's queue; once it answers, the next probe is ready."""
    import threading

    from gateway.store.database import migrate

    engine = create_gateway_engine(f"sqlite:///{tmp_path / 'g.sqlite'}")
    migrate(engine)
    database = Database(engine, reactor, 1)
    database.start()
    hung = threading.Event()
    database.pool.callInThread(hung.wait, 30)  # the one thread, waiting on a database that hangs
    port = reactor.listenTCP(0, Site(HealthResource(ReadinessChecks(reactor, database))), interface=HOST)
    url = f"http://{HOST}:{port.getHost().port}/ready"
    try:
        answers = yield defer.gatherResults([in_thread(get_json, url) for _ in range(5)])
        for status, body in answers:
            assert status == 503 and body["checks"]["database"] == {
                "ok": False, "detail": "no answer within 2 s"}, body
        status, body = yield in_thread(get_json, url)
        assert status == 503
        assert database.pool.q.qsize() == 1  # one read waiting, not one per probe
        hung.set()
        status, body = yield in_thread(get_json, url)
        assert status == 200, body
    finally:
        hung.set()
        yield port.stopListening()
        yield defer.succeed(database.stop())
        engine.dispose()

"""/health/live and /health/ready, for a load balancer or an orchestrator.

- live: 200 {"status": "up"} whenever the reactor answers at all (the request is served by it).
- ready: each check, and 200 when all pass, else 503:
  database (the messages table read in a database thread, answered within 2 s), listeners (every configured
  listener is listening), mappings (the translation service holds a mapping set, when the
  gateway translates).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

DATABASE_TIMEOUT = 2.0  # seconds


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict:
        return {"ok": self.ok, **({"detail": self.detail} if self.detail else {})}


def listening(service) -> bool:
    """Whether a StreamServerEndpointService is listening now: its factory counts the ports
    it was started on (Factory.doStart/doStop; a TLS port's wrapping factory passes both on)."""
    if service is None or not service.running:
        return False
    return getattr(getattr(service, "factory", None), "numPorts", 0) > 0


class ReadinessChecks:
    """The checks of /health/ready; `run()` is a Deferred firing with a list of Checks."""

    def __init__(self, reactor, database=None, listeners: Callable[[], Iterable[tuple[str, object]]] = lambda: (),
                 mappings: Callable[[], bool] | None = None, timeout: float = DATABASE_TIMEOUT):
        self._reactor = reactor
        self._database = database
        self._listeners = listeners
        self._mappings = mappings
        self._timeout = timeout
        self._reading: defer.Deferred | None = None

    @classmethod
    def for_gateway(cls, gateway, config, reactor) -> "ReadinessChecks":
        store = gateway.getServiceNamed("store")
        names = [l.name for l in (*config.mllp, *config.astm, *config.https, *config.admin)]

        def listeners():
            for name in names:
                try:
                    yield name, gateway.getServiceNamed(name)
                except KeyError:
                    yield name, None

        mappings = None
        if config.mappings is not None:
            def mappings() -> bool:
                try:
                    translation = gateway.getServiceNamed("translation")
                except KeyError:
                    return False
                return getattr(translation, "mappings", None) is not None

        return cls(reactor, store.database, listeners, mappings)

    @defer.inlineCallbacks
    def run(self):
        checks = []
        if self._database is not None:
            checks.append((yield self._database_check()))
        down = [name for name, service in self._listeners() if not listening(service)]
        checks.append(Check("listeners", not down, f"not listening: {', '.join(down)}" if down else ""))
        if self._mappings is not None:
            loaded = self._mappings()
            checks.append(Check("mappings", loaded, "" if loaded else "no mapping set loaded"))
        return checks

    def _database_check(self) -> defer.Deferred:
        """A Check firing within the timeout. One read at a time: a probe arriving while the
        last one's read is still out (a database that hangs) waits for that read instead of
        queuing another in the pool, where each probe would leave one more behind."""
        answer = defer.Deferred()

        def settle(check: Check) -> None:
            if not answer.called:
                answer.callback(check)

        timer = self._reactor.callLater(
            self._timeout, settle, Check("database", False, f"no answer within {self._timeout:g} s"))

        def answered(check: Check) -> Check:
            if timer.active():
                timer.cancel()
            settle(check)
            return check

        self._database_read().addBoth(answered)
        return answer

    def _database_read(self) -> defer.Deferred:
        """The read under way (a Deferred firing with a Check, never failing), or a new one."""
        if self._reading is None:
            try:
                reading = self._database.run(_messages_readable)
            except Exception as error:  # the pool is not running
                reading = defer.fail(error)
            reading.addCallbacks(lambda _: Check("database", True),
                                 lambda failure: Check("database", False, _short(failure.getErrorMessage())))
            if not reading.called:
                self._reading = reading
                reading.addBoth(self._read)
        else:
            reading = self._reading
        waiter = defer.Deferred()
        reading.addBoth(lambda check: (waiter.callback(check), check)[1])
        return waiter

    def _read(self, check: Check) -> Check:
        self._reading = None
        return check


def _messages_readable(conn) -> None:
    """Whether the messages table can be read: a database that answers while a lock holds
    that table (a migration, a VACUUM FULL) stores nothing, and the ingest writer answers
    STORE_UNAVAILABLE meanwhile. The lock is waited for less than the check is: the read has
    ended (its reason told) when the probe is answered, and the next probe reads again rather
    than joining a read about to fail."""
    from sqlalchemy import text

    if conn.dialect.name == "postgresql":
        conn.execute(text(f"SET LOCAL lock_timeout = '{round(DATABASE_TIMEOUT * 750)}ms'"))
    conn.execute(text("SELECT 1 FROM messages LIMIT 1")).all()


def _short(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else "error"
    return first[:200]


class LiveResource(Resource):
    isLeaf = True

    def render_GET(self, request):
        return _json(request, 200, {"status": "up"})


class ReadyResource(Resource):
    isLeaf = True

    def __init__(self, checks: ReadinessChecks):
        super().__init__()
        self._checks = checks

    def render_GET(self, request):
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)

        def answer(checks):
            if finished.called:
                return
            ready = all(check.ok for check in checks)
            body = {"status": "ready" if ready else "not ready",
                    "checks": {check.name: check.as_dict() for check in checks}}
            request.write(_json(request, 200 if ready else 503, body))
            request.finish()

        def broken(failure):
            if not finished.called:
                request.write(_json(request, 503, {"status": "not ready",
                                                   "error": _short(failure.getErrorMessage())}))
                request.finish()

        self._checks.run().addCallbacks(answer, broken)
        return NOT_DONE_YET


class HealthResource(Resource):
    """/health/: `live` and `ready` below it."""

    def __init__(self, checks: ReadinessChecks):
        super().__init__()
        self.putChild(b"live", LiveResource())
        self.putChild(b"ready", ReadyResource(checks))

    @classmethod
    def for_gateway(cls, gateway, config, reactor) -> "HealthResource":
        return cls(ReadinessChecks.for_gateway(gateway, config, reactor))

    def render_GET(self, request):
        return _json(request, 404, {"error": "see /health/live and /health/ready"})

    def getChild(self, path, request):
        return self  # /health/anything: the same JSON 404, not Twisted's HTML page


def _json(request, status: int, body: dict) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")

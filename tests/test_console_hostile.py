"""The console against hostile use, over real HTTP on a real store (SQLite and PostgreSQL):
logins sent at once, to guess a password faster than the throttle allows or to stall the
reactor's thread pool that other doors share."""
from __future__ import annotations

import socket
import time

import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool

from console_support import PASSWORDS
from gateway.console.web import LOGIN_CHECKS, LOGIN_WAITING
from test_console_web import console  # noqa: F401  (the fixture)


def at_once(calls) -> defer.Deferred:
    """Blocking client calls made at once, each in its own thread (not the reactor's pool,
    which the console needs for its own work); a Deferred of their answers."""
    pool = ThreadPool(len(calls), len(calls), "hostile-clients")
    pool.start()
    done = defer.gatherResults([threads.deferToThreadPool(reactor, pool, call) for call in calls])
    return done.addBoth(lambda result: (pool.stop(), result)[1])


def login(client, username: str, password: str):
    return lambda: client.request_now("POST", "/login", {"username": username, "password": password})


@pytest_twisted.ensureDeferred
async def test_guesses_sent_at_once_get_no_more_checks_than_the_throttle_allows(console):
    client = console.client()
    pages = await at_once([login(client, "operator", f"guess-{i}") for i in range(12)])
    statuses = sorted(page.status for page in pages)
    # login_attempts is 3: three guesses checked, the others refused without a check.
    assert statuses == [401] * 3 + [429] * 9, statuses
    reasons = [e.detail.get("reason") for e in console.kinds("console.login")]
    assert reasons.count("bad credentials") == 3 and reasons.count("throttled") == 9
    paused = await client.post("/login", {"username": "operator", "password": PASSWORDS["operator"]})
    assert paused.status == 429 and not client.cookies
    # Another account from that address, and the account after its pause, still log in.
    await console.client().login("viewer")
    console.clock.advance(301)
    await client.login("operator")


@pytest_twisted.ensureDeferred
async def test_a_flood_of_logins_leaves_the_reactors_thread_pool_to_the_other_doors(console):
    flooded = LOGIN_CHECKS + LOGIN_WAITING + 8
    client = console.client()
    started = time.monotonic()
    flood = at_once([login(client, f"nobody-{i}", "guess") for i in range(flooded)])
    while not console.kinds("console.login"):  # the logins have arrived; the first are answered
        await deferLater(reactor, 0.01, lambda: None)
    asked = time.monotonic()
    await threads.deferToThread(lambda: None)  # what the REST door does with each FHIR bundle
    waited = time.monotonic() - asked
    pages = await flood
    lasted = time.monotonic() - started
    statuses = [page.status for page in pages]
    # The pool is not queued behind the passwords to check: a job runs at once.
    assert waited < lasted / 4, (waited, lasted)
    # Logins beyond those checked or waiting are refused at once rather than queued.
    assert set(statuses) == {401, 503} and statuses.count(503) >= flooded - LOGIN_CHECKS - LOGIN_WAITING - 2
    busy = [page for page in pages if page.status == 503][0]
    assert busy.one("p.error").text.startswith("Trop de connexions") and not client.cookies
    assert (await console.client().login("viewer")).status == 303  # and after the flood, all is well


def trickle(port: int, pieces: list[tuple[float, bytes]], wait: float = 6.0) -> tuple[bytes, float]:
    """Over one plain connection: each piece after its delay; what came back and when the
    server closed (seconds from the start; `wait` if it never did)."""
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        for delay, data in pieces:
            time.sleep(delay)
            try:
                sock.sendall(data)
            except OSError:
                break
        sock.settimeout(0.1)
        while time.monotonic() - started < wait:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                return received, time.monotonic() - started
            received += chunk
    return received, wait


REQUEST = b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_a_request_trickled_byte_by_byte_is_answered_408_at_its_deadline(console):
    """A client that sends its request head a byte at a time (each byte resets the idle
    timeout) is answered 408 and closed once the request is not whole `read_timeout` after
    its first byte; requests that arrive whole, however far apart on one connection, are not."""
    console.port.factory.read_timeout = 1.0
    slow = [(0.0, REQUEST[:4])] + [(0.25, bytes([byte])) for byte in REQUEST[4:30]]
    answer, closed = await threads.deferToThread(trickle, console.port.getHost().port, slow)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:80]
    assert 0.9 < closed < 3.0, closed
    spaced = [(0.0, REQUEST), (1.5, REQUEST), (0.0, b"")]
    answer, _ = await threads.deferToThread(trickle, console.port.getHost().port, spaced, 3.0)
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b" 408 " not in answer

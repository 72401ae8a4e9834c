"""The HTTPS door against hostile HTTP over real mutual TLS sockets: refused requests whose
connection must still be closed, malformed or oversize request heads, charsets only Python
knows, JSON numbers too long to read. Each refusal is a precise problem+json."""
from __future__ import annotations

import json
import socket
import ssl
import time
from http import HTTPStatus

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from doors_support import (HOSPITAL, Client, door_config, echo_json_route, hl7, rows, start_door, stop_door,
                           with_listener)
from gateway.doors.https import LINGER
from gateway.mapping.mapping_set import MappingSet
from gateway.store.schema import messages

HL7 = "application/hl7-v2"


@pytest.fixture
def door(pki, tmp_path, repo_mappings, monkeypatch):
    """A door with a 64 KiB body limit and the default idle timeout (60 s), which must not be
    what closes a refused connection."""
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    config = with_listener(door_config(pki, f"sqlite:///{tmp_path / 'gateway.sqlite'}"),
                           max_request_size=64 * 1024)
    running = pytest_twisted.blockon(start_door(config, pki, extra_routes=[echo_json_route()]))
    yield running
    pytest_twisted.blockon(stop_door(running))


def until_closed(door, data: bytes, wait: float = 8.0) -> tuple[bytes, float, bool]:
    """Send `data` over a fresh mutual TLS connection as the hospital, then read without ever
    closing: what came back, how long it took, and whether the server closed the connection
    (False: still open after `wait` seconds)."""
    context = ssl.create_default_context(cafile=door.path("ca.crt"))
    context.load_cert_chain(door.path(f"{HOSPITAL.id}.crt"), door.path(f"{HOSPITAL.id}.key"))
    started = time.monotonic()
    chunks, closed = [], False
    with socket.create_connection(("127.0.0.1", door.port), timeout=wait) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            try:
                tls.sendall(data)
            except (OSError, ssl.SSLError):
                pass  # the server may answer and stop reading before all is sent
            try:
                while True:
                    chunk = tls.recv(65536)
                    if not chunk:
                        closed = True
                        break
                    chunks.append(chunk)
            except socket.timeout:
                pass
            except (OSError, ssl.SSLError):
                closed = True
    return b"".join(chunks), time.monotonic() - started, closed


def problem_of(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert b"content-type: application/problem+json" in [line.lower() for line in lines[1:]], head
    return int(lines[0].split()[1]), json.loads(body)


HEAD = b"POST /v1/fhir HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n"
CHUNKS = b"".join(b"2000\r\n" + b"x" * 8192 + b"\r\n" for _ in range(10))


@pytest.mark.parametrize("request_bytes", [
    HEAD + b"Content-Length: 10000000\r\n\r\n",  # the body is never sent
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKS + b"0\r\n\r\n",  # over the limit, then ended
], ids=["content-length", "chunked"])
@pytest_twisted.inlineCallbacks
def test_a_refused_oversize_request_is_closed_though_the_client_waits(door, request_bytes):
    """After the 413 the door closes the connection itself, a little after LINGER: a client
    that waits (or holds the connection on purpose) must not keep it open for ever."""
    answer, elapsed, closed = yield threads.deferToThread(until_closed, door, request_bytes)
    status, problem = problem_of(answer)
    assert status == 413 and problem["limit"] == 64 * 1024
    assert closed and elapsed < LINGER + 3, f"still open after {elapsed:.1f} s"


@pytest.mark.parametrize("request_bytes, status, words", [
    (b"GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
     431, "line exceeds 16384 bytes"),
    (b"GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     + b"".join(b"X-%d: a\r\n" % n for n in range(600)) + b"\r\n", 431, "exceed 500 lines"),
    (b"GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n", 400, "malformed"),
    (HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, "malformed"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400, "chunked encoding"),
    (b"GET /v1/openapi.json HTTP/1.1\r\n\r\n", 400, "exactly one Host header"),
    (b"GET /soap/?wsdl HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: elsewhere.example\r\n\r\n", 400,
     "exactly one Host header"),
], ids=["long-header-line", "many-headers", "header-without-colon", "content-length-and-chunked",
        "bad-chunk-size", "no-host", "two-hosts"])
@pytest_twisted.inlineCallbacks
def test_malformed_or_oversize_heads_get_a_problem_at_once(door, request_bytes, status, words):
    """Twisted answered these with a bare 400 without a body, and a header line over its
    limit with nothing at all until the idle timeout: now a problem+json saying why, and
    the connection closed at once."""
    answer, elapsed, closed = yield threads.deferToThread(until_closed, door, request_bytes)
    got, problem = problem_of(answer)
    assert got == status == problem["status"] and words in problem["detail"]
    assert closed and elapsed < 3.0



@pytest_twisted.inlineCallbacks
def test_the_asterisk_target_is_answered_by_the_door(door):
    """Twisted answers the request-target `*` without the door: `GET *` a bare 405, and both
    it and `OPTIONS *` with Server: TwistedWeb and its version. Now GET * is a 404 problem,
    OPTIONS * an empty 200, both from ma-hie-gateway."""
    answer, _, _ = yield threads.deferToThread(
        until_closed, door, b"GET * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    status, problem = problem_of(answer)
    assert status == 404 == problem["status"] and b"\r\nServer: ma-hie-gateway\r\n" in answer
    answer, _, _ = yield threads.deferToThread(
        until_closed, door, b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nServer: ma-hie-gateway\r\n" in answer


@pytest_twisted.inlineCallbacks
def test_an_absolute_form_request_target_is_served(door):
    """RFC 9112 3.2.2: a server accepts `GET https://host/path`, the URI's authority standing
    for the Host. Twisted took the whole URI for the path: a 404 "the REST API is under /v1/"."""
    answer, _, _ = yield threads.deferToThread(until_closed, door, (
        b"GET https://127.0.0.1/v1/openapi.json?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Connection: close\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b'"openapi":"3.1.0"' in answer, answer[:300]
    answer, _, _ = yield threads.deferToThread(until_closed, door, (
        b"GET HTTPS://gw.example:8443/soap/?wsdl HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"))
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    assert b'location="https://gw.example:8443/soap/"' in answer


@pytest_twisted.inlineCallbacks
def test_every_status_has_its_reason_phrase(door):
    """Twisted knows no reason phrase for 422 (most refusals of the door): it sent
    "HTTP/1.1 422 Unknown Status"."""
    body = b"{}"
    answer, _, _ = yield threads.deferToThread(until_closed, door, HEAD + b"Content-Length: 2\r\n"
                                               b"Connection: close\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 422 %s\r\n" % HTTPStatus(422).phrase.encode()), answer[:40]

@pytest_twisted.inlineCallbacks
def test_content_type_charsets_only_python_knows_are_refused_with_the_reason(door):
    """MSH-18 empty, so the Content-Type charset is read: Python's 'undefined' and
    'punycode' codecs raised UnicodeError (answered 500 internal error); codecs that are no
    text encodings (rot13) were called invalid bodies. Now 415 for what is no charset, 400
    for a body the charset cannot read; nothing stored either way."""
    client = Client(door, HOSPITAL.id)
    for charset, status, slug in (("undefined", 415, "unsupported-charset"),
                                  ("rot13", 415, "unsupported-charset"),
                                  ("punycode", 400, "bad-encoding")):
        answer = yield client.post("/v1/hl7v2", hl7(f"CS-{charset}", charset=""), f"{HL7}; charset={charset}")
        assert (answer.code, answer.json()["type"].rsplit("/", 1)[1]) == (status, slug), answer.body
    assert not rows(door, messages)


@pytest_twisted.inlineCallbacks
def test_a_json_number_too_long_to_read_is_a_400(door):
    """Python refuses to read an integer of more than 4,300 digits (ValueError): read_json
    answered 500 internal error; now 400 bad-json saying why. (JSON is read strictly: no
    integer of more than 18 digits, see tests/test_json_hostile.py.)"""
    answer = yield Client(door, HOSPITAL.id).post("/v1/test/echo", b'{"n": 1' + b"0" * 5000 + b"}",
                                                  "application/json")
    assert answer.code == 400, answer.body
    assert answer.json()["type"].endswith("/bad-json")
    assert "$.n: a number has more than 18 digits" in answer.json()["detail"]
    fine = yield Client(door, HOSPITAL.id).post("/v1/test/echo", b'{"n": 1' + b"0" * 17 + b"}",
                                                "application/json")
    assert fine.code == 200 and fine.json() == {"n": 10 ** 17}


@pytest.fixture
def slow_door(pki, tmp_path, repo_mappings, monkeypatch):
    """A door whose requests must arrive whole within 1.5 s; its idle timeout stays 60 s."""
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    config = with_listener(door_config(pki, f"sqlite:///{tmp_path / 'gateway.sqlite'}"), read_timeout=1.5)
    running = pytest_twisted.blockon(start_door(config, pki))
    yield running
    pytest_twisted.blockon(stop_door(running))


def conversation(door, steps: list[tuple[float, bytes]], wait: float = 8.0) -> tuple[bytes, float, bool]:
    """Over one mutual TLS connection as the hospital: each step waits its delay, then sends
    its bytes (the server's answers read as they come). What came back, when the connection
    closed (seconds from the start) and whether it did."""
    context = ssl.create_default_context(cafile=door.path("ca.crt"))
    context.load_cert_chain(door.path(f"{HOSPITAL.id}.crt"), door.path(f"{HOSPITAL.id}.key"))
    started = time.monotonic()
    received = []
    with socket.create_connection(("127.0.0.1", door.port), timeout=wait) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.settimeout(0.05)

            def read_until(deadline: float) -> bool:  # True once the server closed
                while time.monotonic() < deadline:
                    try:
                        chunk = tls.recv(65536)
                    except (socket.timeout, ssl.SSLWantReadError):
                        continue
                    except (OSError, ssl.SSLError):
                        return True
                    if not chunk:
                        return True
                    received.append(chunk)
                return False

            for delay, data in steps:
                if read_until(time.monotonic() + delay):
                    return b"".join(received), time.monotonic() - started, True
                try:
                    tls.sendall(data)
                except (OSError, ssl.SSLError):
                    return b"".join(received), time.monotonic() - started, True
            closed = read_until(started + wait)
            return b"".join(received), time.monotonic() - started, closed


@pytest_twisted.inlineCallbacks
def test_a_request_that_trickles_in_is_refused_at_its_deadline(slow_door):
    """A byte of body every 0.25 s keeps resetting the idle timeout: only the read deadline,
    from the request's first byte, ends it, with a 408 problem, and the connection closes."""
    steps = [(0.0, HEAD + b"Content-Length: 100\r\n\r\n")] + [(0.25, b"x")] * 24
    answer, elapsed, closed = yield threads.deferToThread(conversation, slow_door, steps)
    status, problem = problem_of(answer)
    assert status == 408 == problem["status"] and "within 1.5 s" in problem["detail"]
    assert closed and 1.4 < elapsed < 4.0, elapsed


@pytest_twisted.inlineCallbacks
def test_the_read_deadline_runs_per_request_not_per_connection(slow_door):
    """A kept-alive connection whose requests come 2 s apart (past the 1.5 s deadline, under
    the idle timeout) has each answered: the deadline starts with a request's first byte."""
    get = b"GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    answer, _, _ = yield threads.deferToThread(conversation, slow_door, [(0.0, get), (2.0, get)], 4.0)
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b" 408 " not in answer


def _read_response(tls) -> bytes:
    """One whole HTTP/1.1 response (a Content-Length body) from a blocking TLS socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += tls.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest_twisted.inlineCallbacks
def test_a_kept_alive_connection_answers_to_the_registry_and_crl_a_reload_puts_in_force(door):
    """The door kept the caller's identity for the life of the connection: a facility removed
    by a reload, or its certificate revoked, went on being served on it. Now its next request
    on the same connection is refused (401), saying which."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from gateway.facilities import FacilityRegistry
    from gateway.tls import load_crl

    identity = door.identity
    kept = identity.registry.current
    ca_cert = x509.load_pem_x509_certificate(open(door.path("ca.crt"), "rb").read())
    ca_key = serialization.load_pem_private_key(open(door.path("ca.key"), "rb").read(), None)
    hospital = x509.load_pem_x509_certificate(open(door.path(f"{HOSPITAL.id}.crt"), "rb").read())
    now = datetime.datetime.now(datetime.timezone.utc)
    crl_path = door.path("door-test.crl")
    open(crl_path, "wb").write(
        x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now)
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(hospital.serial_number)
                                 .revocation_date(now).build())
        .sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    changes = [
        lambda: setattr(identity.registry, "current",
                        FacilityRegistry([f for f in kept.facilities if f.id != HOSPITAL.id])),
        lambda: (setattr(identity.registry, "current", kept),
                 identity.revocations.use(load_crl(crl_path, door.path("ca.crt")))),
    ]

    def run() -> list[bytes]:
        context = ssl.create_default_context(cafile=door.path("ca.crt"))
        context.load_cert_chain(door.path(f"{HOSPITAL.id}.crt"), door.path(f"{HOSPITAL.id}.key"))
        get = b"GET /v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        answers = []
        with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
            with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                for change in [None] + changes:
                    if change is not None:
                        threads.blockingCallFromThread(reactor, change)
                    tls.sendall(get)
                    answers.append(_read_response(tls))
        return answers

    served, removed, revoked = yield threads.deferToThread(run)
    assert served.startswith(b"HTTP/1.1 200 ")
    assert problem_of(removed)[0] == 401 and "names no facility" in problem_of(removed)[1]["detail"]
    assert problem_of(revoked)[0] == 401 and "revoked" in problem_of(revoked)[1]["detail"]

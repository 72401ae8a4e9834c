"""Odd and hostile answers from the peers, and replays racing a request in flight: the
response head is bounded while it is read, a status code outside HTTP's range is a protocol
error, a transaction-response must answer every entry sent, a malformed or deeply nested
answer is judged rather than crashing the classification, a peer's text that cannot be stored
does not block the settlement, and a replay's new content is not settled by the old content's
answer."""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import pytest_twisted
from sqlalchemy import event, select, text
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.task import deferLater

from delivery_support import until
from gateway.config import DeliveryConfig, DestinationConfig, RetryConfig
from gateway.delivery.fhir_record import (
    classify_response,
    transaction_request_for_bundles,
    transaction_request_for_texts,
)
from gateway.delivery.outcome import DeliveryOutcome, HttpResponse
from gateway.delivery.service import DeliveryService
from gateway.delivery.transport import MAX_RESPONSE_HEAD
from gateway.store import outbox
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.store.schema import deliveries
from gateway.tls import server_tls_options
from test_delivery_batching import add
from test_delivery_transport import ScriptedFactory, _failure, _post, certs, net  # noqa: F401 (fixtures)
from test_outbox import T0, add_messages, claim, enqueue, settle, status

BASIC = {"fullUrl": "urn:uuid:0f0f0f0f-0000-5000-8000-00000000000{n}",
         "resource": {"resourceType": "Basic", "id": "0f0f0f0f-0000-5000-8000-00000000000{n}"}}


def bundle(*numbers: int) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [json.loads(json.dumps(BASIC).replace("{n}", str(n))) for n in numbers]}


def transaction_response(*statuses) -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": "transaction-response",
                       "entry": [{"response": {"status": s}} for s in statuses]}).encode()


# -- the transport: the response head is bounded, the status code checked ----------------------


def _stream_header_lines(line: bytes):
    """A script: a status line and a header, then `line` again and again, never the blank
    line."""
    def script(transport):
        transport.write(b"HTTP/1.1 200 OK\r\nX-First: 1\r\n")
        chunk = line * (4096 // len(line))

        def more():
            if transport.connected:
                transport.write(chunk)
            else:
                transport.streaming.stop()

        transport.streaming = task.LoopingCall(more)
        transport.streaming.start(0.001)
    return script


@pytest.mark.parametrize("line", [b"X-More: 0123456789abcdef\r\n", b" folded-continuation\r\n"],
                         ids=["header-lines", "continuation-lines"])
@pytest_twisted.inlineCallbacks
def test_a_response_head_that_never_ends_is_cut_at_the_limit(net, line):
    """A peer streaming header lines (or one header folded over endless lines) used to be read
    into memory until the response timeout (hundreds of MB in seconds on loopback): it is
    dropped once the head passes MAX_RESPONSE_HEAD, at once, as a protocol error."""
    factory = ScriptedFactory(_stream_header_lines(line))
    port = yield net.listen(factory, net.tls_options())
    started = time.monotonic()
    try:
        e = yield _failure(net.transport(response_timeout=10.0).request(_post(port)))
    finally:
        for protocol in factory.protocols:
            if protocol.transport.streaming.running:
                protocol.transport.streaming.stop()
    assert e.kind == "protocol"
    assert e.reason == f"response head from 127.0.0.1:{port} exceeds the {MAX_RESPONSE_HEAD}-byte limit"
    assert time.monotonic() - started < 2.0


@pytest_twisted.inlineCallbacks
def test_a_large_head_within_the_limit_and_a_large_body_are_read(net):
    """The limit is on the head alone: a head near it (after a 1xx) with a body of the full
    response size is read whole."""
    headers = b"".join(b"X-%04d: %s\r\n" % (n, b"v" * 990) for n in range(MAX_RESPONSE_HEAD // 1000 - 4))
    body = b"b" * (1 << 20)

    def script(transport):
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n" + headers
                        + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    factory = ScriptedFactory(script)
    port = yield net.listen(factory, net.tls_options())
    transport = net.transport(max_response_size=len(body))
    response = yield transport.request(_post(port))
    assert (response.code, len(response.headers), response.body) == (200, len(headers) // 1000, body)


@pytest.mark.parametrize("status", [b"99999999999", b"-1", b"600", b"1000"])
@pytest_twisted.inlineCallbacks
def test_a_status_code_outside_100_to_599_is_a_protocol_error(net, status):
    """Twisted takes any integer for a status: 99999999999 used to reach the settlement, where
    PostgreSQL's integer column refused it (the whole batch of settlements failed, at every
    attempt); -1 was a permanent refusal. Neither is HTTP: a protocol error, retried."""
    port = yield net.listen(ScriptedFactory(lambda t: t.write(
        b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\n{}")), net.tls_options())
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "protocol"
    assert e.reason == f"malformed HTTP response from 127.0.0.1:{port} (status code outside 100-599)"


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
], ids=["negative length", "two lengths", "header without colon", "unknown transfer coding", "bad chunk size"])
@pytest_twisted.inlineCallbacks
def test_a_response_twisted_cannot_parse_is_named_malformed(net, answer):
    """Twisted's parser raises ValueError or KeyError on these: the reason used to be "request
    to ... failed (KeyError)" (or "lost mid-response"), which reads as a gateway bug and hides
    that the peer broke HTTP."""
    port = yield net.listen(ScriptedFactory(lambda t: t.write(answer)), net.tls_options())
    e = yield _failure(net.transport().request(_post(port)))
    assert (e.kind, e.reason) == ("protocol", f"malformed HTTP response from 127.0.0.1:{port}")


# -- the shared record's answers ---------------------------------------------------------------


@pytest.mark.parametrize("build", ["texts", "bundles"])
def test_a_transaction_response_must_answer_every_entry_sent(build):
    """Three entries sent: an answer with two (or four) 2xx entries used to mark every
    delivery delivered, though the record may not have stored one of them: a dead letter, with
    the counts in the reason. Three 2xx entries: delivered."""
    bundles = [bundle(1, 2), bundle(3)]
    if build == "texts":
        request = transaction_request_for_texts([json.dumps(b) for b in bundles], base_url="https://r/fhir",
                                                idempotency_key="k")
    else:
        request = transaction_request_for_bundles(bundles, base_url="https://r/fhir", idempotency_key="k")
    assert request.entries == 3
    for statuses, kind, reason in (
            (["201 Created"] * 2, "permanent", "unexpected answer: 2 entries in the transaction-response for 3 sent"),
            (["200 OK"] * 4, "permanent", "unexpected answer: 4 entries in the transaction-response for 3 sent"),
            ([], "permanent", "unexpected answer: 0 entries in the transaction-response for 3 sent"),
            (["201 Created", "200 OK", "201"], "delivered", "delivered (3 entries)")):
        outcome = classify_response(HttpResponse(200, {}, transaction_response(*statuses)), request)
        assert (outcome.kind, outcome.reason) == (kind, reason), statuses


@pytest.mark.parametrize("answer", [{"response": "201 Created"}, {"response": ["201"]}, {"response": 7},
                                    {"response": {"status": 201}}, 42, {"response": {"status": "2"}},
                                    {"response": {"status": "2xx"}}, {"response": {"status": "2000 OK"}},
                                    {"response": {"status": "20 OK"}}])
def test_a_malformed_entry_is_a_refusal_not_an_internal_error(answer):
    """An entry whose `response` is not an object used to raise AttributeError in the
    classification: an "internal error", retried for ever with the same answer. It is an
    entry not stored; so is a status that is not a 3-digit 2xx code (anything starting with
    "2" used to count as stored)."""
    body = json.dumps({"resourceType": "Bundle", "type": "transaction-response", "entry": [answer]}).encode()
    outcome = classify_response(HttpResponse(200, {}, body))
    assert outcome.kind == "permanent"
    assert outcome.reason.startswith("entry 0 not stored: ")


def test_an_answer_with_a_utf8_byte_order_mark_is_read():
    """RFC 8259 lets a reader ignore a BOM before JSON, and some servers write one: a record
    that had stored every entry used to make a dead letter ("body is not JSON"), and an
    OperationOutcome's codes were left out of the reason."""
    request = transaction_request_for_bundles([bundle(1)], base_url="https://r/fhir", idempotency_key="k")
    response = HttpResponse(200, {}, b"\xef\xbb\xbf" + transaction_response("201 Created"))
    assert classify_response(response, request) == DeliveryOutcome.delivered("delivered (1 entries)", response)
    refusal = HttpResponse(422, {}, b'\xef\xbb\xbf{"resourceType":"OperationOutcome","issue":'
                                    b'[{"severity":"error","code":"invalid","expression":["Patient.birthDate"]}]}')
    outcome = classify_response(refusal, request)
    assert (outcome.kind, outcome.reason) == ("permanent", "HTTP 422: invalid at Patient.birthDate")


@pytest.mark.parametrize("code, kind", [(422, "permanent"), (503, "transient")])
def test_a_deeply_nested_error_body_is_judged_by_its_status(code, kind):
    """json.loads raised RecursionError on a deeply nested body: a 422 became an "internal
    error", retried for ever. The body is no OperationOutcome: the status alone decides."""
    outcome = classify_response(HttpResponse(code, {}, b"[" * 100_000 + b"]" * 100_000))
    assert (outcome.kind, outcome.reason) == (kind, f"HTTP {code}")


NESTED = "[" * 1000 + "]" * 1000  # readable JSON (below orjson's depth limit), too deep to print


@pytest.mark.parametrize("code, body, reason", [
    (422, '{"resourceType":"OperationOutcome","issue":[{"code":%s,"expression":[%s]}]}' % (NESTED, NESTED),
     "HTTP 422: list at list"),
    (200, '{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":{"status":%s}}]}' % NESTED,
     "entry 0 not stored: list"),
    (200, '{"resourceType":%s}' % NESTED, "unexpected answer: HTTP 200 list, not a transaction-response")])
def test_deeply_nested_values_in_an_answer_are_named_not_printed(code, body, reason):
    """Printing a value nested a thousand deep into the reason raised RecursionError (an
    "internal error", retried for ever): such a value is named by its type."""
    outcome = classify_response(HttpResponse(code, {}, body.encode()))
    assert (outcome.kind, outcome.reason) == ("permanent", reason)


def test_a_lone_surrogate_in_the_diagnostics_is_not_kept_in_the_reason(engine):
    """json.loads turns the escape \\ud800 into a lone surrogate, which neither SQLite nor
    PostgreSQL can store (UnicodeEncodeError): the settlement of that attempt, and of every
    other one in its batch, failed at every attempt. The answer is not read as an
    OperationOutcome; the attempt settles as a dead letter with the answer kept."""
    body = (b'{"resourceType":"OperationOutcome","issue":[{"severity":"fatal","code":"invalid",'
            b'"diagnostics":"bad \\ud800 value"}]}')
    outcome = classify_response(HttpResponse(422, {}, body))
    assert (outcome.kind, outcome.reason) == ("permanent", "HTTP 422")
    (m,) = add_messages(engine, 1)
    enqueue(engine, (m, "record", "Patient/p1", "sha-1"))
    (c,) = claim(engine)
    settle(engine, "n1", outbox.Settlement(c.id, outcome.kind, outcome.reason, T0, 5, 422, body, None))
    assert status(engine) == [(m, "record", "dead", 1)]
    with engine.connect() as conn:
        assert bytes(conn.execute(select(deliveries.c.last_response)).scalar_one()) == body


def test_odd_severities_and_codes_in_an_operation_outcome_stay_short_and_textual():
    """Issues that are not objects, codes that are numbers or objects, a huge diagnostics: the
    reason is made of what can be read, and short."""
    body = json.dumps({"resourceType": "OperationOutcome", "issue": [
        "nonsense", {"severity": "catastrophic", "code": {"x": 1}}, {"severity": None, "code": 12},
        {"code": "invalid", "expression": [{"not": "text"}], "diagnostics": "x" * 100_000}]}).encode()
    outcome = classify_response(HttpResponse(400, {}, body))
    assert outcome.kind == "permanent"
    assert outcome.reason.startswith("HTTP 400: dict; 12; invalid at dict: xxx")
    assert len(outcome.reason) <= 200


# -- the outbox: a replay racing a request in flight ---------------------------------------------


def test_new_content_enqueued_while_the_old_is_in_flight_is_not_settled_by_its_answer(engine):
    """A replay changes a pending delivery's content while a node is sending the old content.
    The old answer ("delivered") used to finish the delivery, now carrying the new content's
    digest: the new content was never sent. The attempt is recorded, the delivery stays pending
    under the new key, and goes with the new content when the lease ends."""
    (m,) = add_messages(engine, 1)
    enqueue(engine, (m, "record", "Patient/p", "old"))
    (sending,) = claim(engine, node="n1", lease=60)
    assert enqueue(engine, (m, "record", "Patient/p", "new")) == 1  # the replay, mid-request
    settle(engine, "n1", outbox.Settlement(sending.id, "delivered", "delivered", T0, 5, 200, b"{}", None,
                                           sending.idempotency_key))
    assert status(engine) == [(m, "record", "pending", 0)]
    assert claim(engine, node="n2", now=T0 + timedelta(seconds=30)) == []  # the old request may still be out
    (again,) = claim(engine, node="n2", now=T0 + timedelta(seconds=61))
    assert again.idempotency_key == outbox.idempotency_key("record", m, "new") != sending.idempotency_key
    settle(engine, "n2", outbox.Settlement(again.id, "delivered", "delivered", T0, 5, 200, b"{}", None,
                                           again.idempotency_key))
    assert status(engine) == [(m, "record", "delivered", 1)]


def test_an_unchanged_delivery_is_settled_under_its_key(engine):
    """The key check does not get in the way: same key, settled; a retry keeps its schedule."""
    m1, m2 = add_messages(engine, 2)
    enqueue(engine, (m1, "record", "Patient/a", "s"), (m2, "record", "Patient/b", "s"))
    c1, c2 = claim(engine)
    settle(engine, "n1", outbox.Settlement(c1.id, "delivered", "ok", T0, 5, 200, None, None, c1.idempotency_key),
           outbox.Settlement(c2.id, "transient", "HTTP 503", T0, 5, 503, None, T0 + timedelta(seconds=9),
                             c2.idempotency_key))
    assert status(engine) == [(m1, "record", "delivered", 1), (m2, "record", "pending", 1)]
    assert claim(engine, now=T0 + timedelta(seconds=8)) == []
    assert [c.id for c in claim(engine, now=T0 + timedelta(seconds=9))] == [c2.id]


# -- end to end: the delivery service against a scripted record over mutual TLS -----------------


DELIVERIES = "SELECT status, attempts, last_code, last_reason FROM deliveries ORDER BY id"


@defer.inlineCallbacks
def start_scripted_delivery(db_url, make_config, dev_pki, script, retry: RetryConfig, patients,
                            concurrency: int = 1, prepare=None):
    """A delivery service sending each of `patients`' deliveries in a request of its own to a
    record peer (real mutual TLS) whose answers `script(transport)` writes; `prepare(engine)`
    runs once the deliveries are stored, before the service starts."""
    factory = ScriptedFactory(script)
    options = server_tls_options(os.path.join(dev_pki, "sandbox-record.crt"),
                                 os.path.join(dev_pki, "sandbox-record.key"),
                                 os.path.join(dev_pki, "ca.crt"), require_client_cert=True)
    port = yield endpoints.SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(factory)
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, reactor, 2)
    record = DestinationConfig("record", "fhir-record", f"https://127.0.0.1:{port.getHost().port}/fhir",
                               response_timeout=5, concurrency=concurrency, batch_size=1, retry=retry)
    config = dataclasses.replace(make_config(db_url), destinations=(record,),
                                 delivery=DeliveryConfig(lease=30, poll_interval=0.05))
    add(engine, *patients, bundle=json.dumps(bundle(1)))
    if prepare is not None:
        prepare(engine)
    database.start()
    service = DeliveryService(config, database, reactor)
    service.startService()
    return SimpleNamespace(service=service, database=database, engine=engine, factory=factory, port=port)


@defer.inlineCallbacks
def stop_scripted_delivery(run):
    yield run.service.stopService()
    run.database.stop()
    for protocol in run.factory.protocols:
        if protocol.transport.connected:
            protocol.transport.abortConnection()
    yield run.port.stopListening()
    run.engine.dispose()


@pytest_twisted.inlineCallbacks
def test_the_service_dead_letters_short_answers_and_settles_unstorable_ones(db_url, make_config, dev_pki):
    """Two patients' deliveries, one request each, to a record that answers the first with a
    200 transaction-response of no entries and the second with a 422 whose diagnostics hold a
    lone surrogate escape. Both become dead letters with their reasons (before: the first was
    "delivered", and the second's settlement failed at every attempt, with the first's)."""
    head = b"Content-Type: application/fhir+json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    answers = [b"HTTP/1.1 200 OK\r\n" + head, b"HTTP/1.1 422 Unprocessable\r\n" + head]
    bodies = [b'{"resourceType":"Bundle","type":"transaction-response","entry":[]}',
              b'{"resourceType":"OperationOutcome","issue":[{"code":"invalid","diagnostics":"\\ud800"}]}']
    served = []

    def script(transport):
        n = len(served) % 2  # one connection per request: the n-th connection, the n-th answer
        served.append(transport)
        transport.write(answers[n] % (len(bodies[n]), bodies[n]))
        transport.loseConnection()

    run = yield start_scripted_delivery(db_url, make_config, dev_pki, script,
                                        RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600),
                                        ["Patient/1", "Patient/2"])
    try:
        found = yield until(DELIVERIES, lambda f: len(f) == 2 and all(r.status == "dead" for r in f), db_url)
        assert [tuple(r) for r in found] == [
            ("dead", 1, 200, "unexpected answer: 0 entries in the transaction-response for 1 sent"),
            ("dead", 1, 422, "HTTP 422")]
    finally:
        yield stop_scripted_delivery(run)


@pytest_twisted.inlineCallbacks
def test_a_pause_the_record_asks_for_is_honoured(db_url, make_config, dev_pki):
    """A 503 with Retry-After: 120 against a backoff of 0.2 s: the delivery waits the two
    minutes the record asked for, instead of coming back five times a second."""
    body = b'{"resourceType":"OperationOutcome","issue":[{"code":"transient"}]}'
    answer = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 120\r\nContent-Type: application/fhir+json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def script(transport):
        transport.write(answer)
        transport.loseConnection()

    run = yield start_scripted_delivery(db_url, make_config, dev_pki, script,
                                        RetryConfig(base=0.2, factor=1.0, cap=300), ["Patient/1"])
    try:
        query = "SELECT status, attempts, last_code, next_attempt_at, first_attempt_at FROM deliveries"
        [row] = yield until(query, lambda f: len(f) == 1 and f[0].attempts == 1, db_url)
        yield deferLater(reactor, 1.0, lambda: None)  # five backoffs of 0.2 s
        [row] = yield until(query, lambda f: True, db_url)
        assert (row.status, row.attempts, row.last_code) == ("pending", 1, 503)
        wait = (_moment(row.next_attempt_at) - _moment(row.first_attempt_at)).total_seconds()
        assert 119 <= wait <= 121, wait
    finally:
        yield stop_scripted_delivery(run)


def _moment(value) -> datetime:
    """A timestamp as read by raw SQL: a datetime (PostgreSQL) or ISO text (SQLite)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _refuse_long_values(engine) -> None:
    """Make the database refuse an over-long value the way each one does: SQLite a string or
    blob beyond its length limit (here 20,000 bytes), PostgreSQL a text beyond its varchar."""
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def limit(dbapi_connection, _record):
            dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 20_000)
        engine.dispose()  # the connections already open get it too
    else:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE delivery_attempts ALTER COLUMN reason TYPE varchar(60)"))
            conn.execute(text("ALTER TABLE deliveries ALTER COLUMN last_reason TYPE varchar(60)"))


@pytest_twisted.inlineCallbacks
def test_an_answer_the_database_refuses_does_not_hold_the_other_settlements(db_url, make_config,
                                                                         dev_pki, caplog):
    """Four requests in flight, answered at once: three delivered, one refused with a 422 whose
    answer (kept for the dead letter) the database refuses. Its settlement failed, and with it
    every settlement of its batch: the others were sent again once their lease ended, and the
    refused one was retried for ever. Each is settled once; the refused one is a dead letter
    whose reason says what was not kept."""
    ok = transaction_response("201 Created")
    refused = json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "invalid", "diagnostics": "d" * 200}],
        "text": {"div": "x" * 30_000}}).encode()
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/fhir+json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n")
    waiting = []

    def script(transport):
        waiting.append(transport)
        if len(waiting) == 4:  # all four in flight: answered together
            for n, each in enumerate(waiting):
                body = refused if n == 2 else ok
                status = (422, b"Unprocessable") if n == 2 else (200, b"OK")
                each.write(head % (*status, len(body)) + body)
                each.loseConnection()

    caplog.set_level("INFO", logger="gateway.delivery.service")
    run = yield start_scripted_delivery(db_url, make_config, dev_pki, script,
                                        RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600),
                                        [f"Patient/{n}" for n in range(1, 5)], concurrency=4,
                                        prepare=_refuse_long_values)
    try:
        found = yield until(DELIVERIES, lambda f: all(r.status != "pending" for r in f), db_url,
                            timeout=30)
        assert sorted((r.status, r.attempts) for r in found) == [("dead", 1)] + [("delivered", 1)] * 3
        (dead,) = [r for r in found if r.status == "dead"]
        assert (dead.last_code, dead.last_reason) == (422, "HTTP 422 (answer not stored: DataError)")
        attempts = yield until("SELECT outcome, response FROM delivery_attempts", lambda f: True, db_url)
        assert sorted(a.outcome for a in attempts) == ["delivered"] * 3 + ["permanent"]
        assert [a.response for a in attempts if a.outcome == "permanent"] == [None]
        yield deferLater(reactor, 0.5, lambda: None)
        assert len(waiting) == 4  # nothing sent twice
        assert "the database refused a value (DataError)" in caplog.text
        assert "d" * 50 not in caplog.text and "x" * 50 not in caplog.text  # the peer's words stay out
    finally:
        yield stop_scripted_delivery(run)


@pytest_twisted.inlineCallbacks
def test_settlements_the_database_could_not_take_are_kept_and_recorded_once(db_url, make_config,
                                                                          dev_pki, caplog):
    """The attempts' table is away (renamed: the database failing, not refusing a value) when
    four answers come back. Their settlements were dropped: the deliveries stayed leased, and
    were sent again once the lease ended. They are kept and tried again: once the table is
    back, each delivery is settled once, and nothing is sent twice."""
    ok = transaction_response("201 Created")
    answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(ok), ok))
    probe = create_gateway_engine(db_url)
    waiting = []

    def rename(old, new):
        with probe.begin() as conn:
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))

    def script(transport):
        waiting.append(transport)
        if len(waiting) == 4:
            rename("delivery_attempts", "delivery_attempts_away")
            for each in waiting:
                each.write(answer)
                each.loseConnection()

    caplog.set_level("INFO", logger="gateway.delivery.service")
    run = yield start_scripted_delivery(db_url, make_config, dev_pki, script,
                                        RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600),
                                        [f"Patient/{n}" for n in range(1, 5)], concurrency=4)
    try:
        yield until(DELIVERIES, lambda f: "recording" in caplog.text, db_url, timeout=30)
        yield deferLater(reactor, 0.3, lambda: None)  # a few more tries while it is away
        rename("delivery_attempts_away", "delivery_attempts")
        found = yield until(DELIVERIES, lambda f: all(r.status != "pending" for r in f), db_url,
                            timeout=30)
        assert [(r.status, r.attempts) for r in found] == [("delivered", 1)] * 4
        attempts = yield until("SELECT delivery_id FROM delivery_attempts", lambda f: True, db_url)
        assert sorted(a.delivery_id for a in attempts) == sorted(
            a.delivery_id for a in (yield until("SELECT id AS delivery_id FROM deliveries",
                                                lambda f: True, db_url)))
        yield deferLater(reactor, 0.5, lambda: None)
        assert len(waiting) == 4  # nothing sent twice
    finally:
        yield stop_scripted_delivery(run)
        probe.dispose()

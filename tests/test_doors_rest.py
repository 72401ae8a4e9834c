"""The REST door over real mutual TLS on loopback, with a real SQLite store and the
repository's mappings: identity by certificate, each operation, problem answers, limits,
idempotency."""
from __future__ import annotations

import json
import socket
import ssl
import time

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task, threads

from doors_support import (HOSPITAL, LAB, PHARMACY, STRANGER, Client,
                           door_config, fhir_bundle, hl7, rows, start_door, stop_door, with_listener)
from gateway.doors.api import ApiResponse, Route, json_response
from gateway.doors.store import api_refusals, api_requests
from gateway.mapping.mapping_set import MappingSet
from gateway.sandbox.record.validation import resource_issues
from gateway.store.schema import message_payloads, messages, translations

HL7 = "application/hl7-v2"
FHIR = "application/fhir+json"


@pytest.fixture
def preloaded(repo_mappings, monkeypatch):
    """Translation services get the run's mapping set instead of compiling it again, and the
    fhir.resources models that check a submitted Bundle are built (a process builds them at its
    first submission, which would not fit the door's 0.3 s request timeout)."""
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    for entry in fhir_bundle()["entry"]:
        resource_issues(entry["resource"], "Bundle.entry")


def _slow_route():
    @defer.inlineCallbacks
    def slow(request):
        yield task.deferLater(reactor, 0.6, lambda: None)
        return json_response(200, {"slow": True})

    return Route("POST", "/v1/test/slow", "hl7v2.submit", slow,
                 {"operationId": "slow", "responses": {"200": {"description": "ok"}}})


def _dispense_route():
    return Route("POST", "/v1/prescriptions/{id}/dispense", "prescriptions.dispense",
                 lambda request: ApiResponse(204),
                 {"operationId": "dispense", "responses": {"204": {"description": "recorded"}}})


@pytest.fixture
def door(pki, tmp_path, preloaded):
    config = with_listener(door_config(pki, f"sqlite:///{tmp_path / 'gateway.sqlite'}"),
                           max_request_size=64 * 1024, request_timeout=10.0)  # slack on a busy machine
    running = pytest_twisted.blockon(start_door(config, pki, extra_routes=[_slow_route(), _dispense_route()]))
    yield running
    pytest_twisted.blockon(stop_door(running))


# -- POST /v1/hl7v2 -------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_hl7v2_accepted_is_answered_with_the_ack_and_the_stored_message_id(door):
    """An ADT^A01 from the hospital's certificate is stored, acknowledged AA, and its id is the stored row's."""
    answer = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", hl7("REST-1"), HL7)
    assert answer.code == 200, answer.body
    data = answer.json()
    assert data["ack_code"] == "AA" and data["ack"].startswith("MSH|") and "\rMSA|AA|REST-1" in data["ack"]
    [row] = rows(door, messages, messages.c.control_id == "REST-1")
    assert data["message_id"] == row.id and row.listener == "https-test" and row.sender_id == HOSPITAL.id
    assert answer.header("content-location") == f"/v1/messages/{row.id}"
    assert answer.header("cache-control") == "no-store"
    assert answer.header("server") == "ma-hie-gateway"  # not Twisted's name and version


@pytest_twisted.inlineCallbacks
def test_hl7v2_from_a_pharmacy_sending_adt_is_refused_in_the_ack(door):
    """A pharmacy may not send ADT: the answer is a 422 problem carrying the AR ACK (ERR 207), and the refusal is stored as the pharmacy's."""
    message = hl7("REST-PH1", application="PHARMA_AGDAL", facility="PHARM_AGDAL")
    answer = yield Client(door, PHARMACY.id).post("/v1/hl7v2", message, HL7)
    assert answer.code == 422 and answer.header("content-type") == "application/problem+json"
    problem = answer.json()
    assert problem["ack_code"] == "AR" and "\rMSA|AR|REST-PH1" in problem["ack"] and "ERR|" in problem["ack"]
    assert "pharmacy" in problem["detail"] and problem["status"] == 422
    [row] = rows(door, messages, messages.c.control_id == "REST-PH1")
    assert row.id == problem["message_id"] and row.status == "rejected" and row.sender_id == PHARMACY.id


@pytest_twisted.inlineCallbacks
def test_hl7v2_in_another_facilitys_name_is_refused(door):
    """The hospital's certificate with the laboratory's MSH-4: AR, nothing accepted."""
    message = hl7("REST-IMP", kind="ORU^R01^ORU_R01", application="LIS_ALAMAL", facility="LAB_ALAMAL_RABAT")
    answer = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", message, HL7)
    assert answer.code == 422 and answer.json()["ack_code"] == "AR"
    assert "MSH-4" in answer.json()["detail"]
    assert [r.status for r in rows(door, messages, messages.c.control_id == "REST-IMP")] == ["rejected"]


@pytest_twisted.inlineCallbacks
def test_bad_er7_is_refused_with_the_reason_and_kept(door):
    """Bytes that are not HL7 get an AR naming the problem; the raw bytes are stored for inspection."""
    answer = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", b"hello, this is not HL7\r", HL7)
    assert answer.code == 422 and answer.json()["ack_code"] == "AR"
    stored = rows(door, message_payloads, message_payloads.c.raw == b"hello, this is not HL7\r")
    assert len(stored) == 1 and stored[0].message_id == answer.json()["message_id"]
    assert rows(door, messages, messages.c.id == stored[0].message_id)[0].status == "rejected"
    empty = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", b"  \r\n", HL7)
    assert empty.code == 400 and empty.json()["type"].endswith("/empty-body")
    wrong = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", hl7("REST-CT"), "application/json")
    assert wrong.code == 415 and not rows(door, messages, messages.c.control_id == "REST-CT")
    batch = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", b"BHS|^~\\&|A|B\r" + hl7("REST-B") + b"BTS|1\r", HL7)
    assert batch.code == 400 and batch.json()["type"].endswith("/batch-not-supported")


@pytest_twisted.inlineCallbacks
def test_content_type_charset_reads_a_message_without_msh18(door):
    """Arabic in ISO 8859-6 without MSH-18, declared by the Content-Type charset: stored as UTF-8, the name intact."""
    message = hl7("REST-AR", charset="", body="PID|1||P-9^^^CHU^PI||بناني^كريم").decode("utf-8").encode("iso8859-6")
    answer = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", message, "application/hl7-v2; charset=ISO-8859-6")
    assert answer.code == 200, answer.body
    [row] = rows(door, messages, messages.c.control_id == "REST-AR")
    assert "بناني^كريم" in bytes(row.raw).decode("utf-8")


# -- identity and rights ---------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_unknown_certificate_gets_401_and_the_refusal_is_kept(door):
    """A certificate from the CA that names no facility: 401 problem+json on every path, logged and stored."""
    client = Client(door, STRANGER)
    answer = yield client.post("/v1/hl7v2", hl7("REST-X"), HL7)
    assert answer.code == 401 and answer.json()["type"].endswith("/unknown-certificate")
    other = yield client.get("/v1/openapi.json")
    assert other.code == 401
    assert not rows(door, messages, messages.c.control_id == "REST-X")
    refusals = rows(door, api_refusals)
    assert [(r.status, r.facility_id, r.door) for r in refusals] == [(401, None, "rest")] * 2
    assert "CN=INPE-999999" in refusals[0].certificate and refusals[0].peer.startswith("127.0.0.1:")


@pytest_twisted.inlineCallbacks
def test_operation_outside_the_facility_type_gets_403(door):
    """A laboratory may not dispense: 403 problem, refusal stored with the operation; a pharmacy may."""
    answer = yield Client(door, LAB.id).post("/v1/prescriptions/RX1/dispense", b"{}", "application/json")
    assert answer.code == 403 and answer.json()["type"].endswith("/operation-not-allowed")
    [refusal] = rows(door, api_refusals)
    assert (refusal.status, refusal.facility_id, refusal.operation) == (403, LAB.id, "prescriptions.dispense")
    allowed = yield Client(door, PHARMACY.id).post("/v1/prescriptions/RX1/dispense", b"{}", "application/json")
    assert allowed.code == 204


@pytest_twisted.inlineCallbacks
def test_unknown_paths_and_methods_are_problems(door):
    """404 outside the API, 405 with Allow for a known path and another method."""
    client = Client(door, HOSPITAL.id)
    missing = yield client.get("/v1/nothing-here")
    assert missing.code == 404 and missing.header("content-type") == "application/problem+json"
    root = yield client.get("/")
    assert root.code == 404
    method = yield client.get("/v1/hl7v2")
    assert method.code == 405 and method.header("allow") == "POST"
    assert method.json()["status"] == 405
    document = yield client.get("/v1/openapi.json")
    head = yield client.request("HEAD", "/v1/openapi.json")  # a GET without the body
    assert head.code == 200 and head.body == b"" and document.body
    assert head.header("content-length") == str(len(document.body))


# -- POST /v1/fhir --------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_fhir_bundle_is_stored_translated_and_answered_with_a_transaction_response(door):
    """A transaction Bundle: 200 transaction-response with one entry per input entry, locations
    the canonical (identifier-derived) ids, the bytes kept, the canonical bundle stored."""
    body = json.dumps(fhir_bundle()).encode("utf-8")
    answer = yield Client(door, LAB.id).post("/v1/fhir", body, FHIR, Idempotency_Key="fhir-1")
    assert answer.code == 200, answer.body
    assert answer.header("content-type") == "application/fhir+json"
    data = answer.json()
    assert data["resourceType"] == "Bundle" and data["type"] == "transaction-response"
    assert [e["response"]["status"] for e in data["entry"]] == ["201 Created"] * 2
    patient, observation = (e["response"]["location"] for e in data["entry"])
    [row] = rows(door, messages, messages.c.format == "fhir")
    assert bytes(row.raw) == body and row.control_id == "fhir-1" and row.sender_id == LAB.id
    assert row.status == "translated" and data["identifier"]["value"] == str(row.id)
    [translation] = rows(door, translations)
    canonical = json.loads(translation.bundle)
    ids = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in canonical["entry"]}
    assert ("Patient", patient.split("/")[1]) in ids and ("Observation", observation.split("/")[1]) in ids
    [obs] = [e["resource"] for e in canonical["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert obs["subject"]["reference"] == "urn:uuid:" + patient.split("/")[1]
    assert any(e["resource"]["resourceType"] == "Provenance" for e in canonical["entry"])


@pytest_twisted.inlineCallbacks
def test_a_bundle_under_the_key_of_another_stored_bundle_is_refused_not_a_503_forever(door):
    """The Idempotency-Key is the Bundle's control id. When the key's claim is gone (let go
    after a failure once its Bundle was stored), another Bundle under it reached the store's
    reused-control-id check, whose ACK builder wanted an HL7 header: 503 "send it again", each
    time. It is the 422 of a reused key, and the refusal is kept."""
    client = Client(door, LAB.id)
    first = yield client.post("/v1/fhir", json.dumps(fhir_bundle()).encode(), FHIR, Idempotency_Key="fhir-k")
    assert first.code == 200, first.body
    with door.store.engine.begin() as connection:
        connection.execute(api_requests.delete())
    other = yield client.post("/v1/fhir", json.dumps(fhir_bundle(cnie="CD654321")).encode(), FHIR,
                              Idempotency_Key="fhir-k")
    assert other.code == 422 and other.json()["type"].endswith("/idempotency-key-reused"), other.body
    stored = rows(door, messages, messages.c.format == "fhir")
    assert [(r.control_id, r.status) for r in stored] == [("fhir-k", "translated"), ("fhir-k", "rejected")]


@pytest_twisted.inlineCallbacks
def test_fhir_bad_json_and_invalid_resources_are_problems(door):
    """Not JSON: 400; a birthDate that is not a date and a missing status: 422 naming each element."""
    client = Client(door, HOSPITAL.id)
    broken = yield client.post("/v1/fhir", b'{"resourceType": "Bundle",', FHIR)
    assert broken.code == 400 and broken.json()["type"].endswith("/bad-json")
    # Arrays nested 20,000 deep (40 KB, under the size limit): a precise 400, not a crash.
    deep = yield client.post("/v1/fhir", b'{"resourceType":"Bundle","x":' + b"[" * 20000 + b"]" * 20000 + b"}", FHIR)
    assert deep.code == 400 and "nests arrays or objects too deeply" in deep.json()["detail"]
    # A number of 5,000 digits, which Python refuses to read: a 400 saying so, not a crash.
    huge = yield client.post("/v1/fhir", b'{"resourceType":"Bundle","n":1' + b"0" * 5000 + b"}", FHIR)
    assert huge.code == 400 and "Bundle.n: a number has more than 18 digits" in huge.json()["detail"]
    bundle = fhir_bundle()
    bundle["entry"][0]["resource"]["birthDate"] = "09/03/1984"
    del bundle["entry"][1]["resource"]["status"]
    invalid = yield client.post("/v1/fhir", json.dumps(bundle).encode(), FHIR)
    assert invalid.code == 422
    problem = invalid.json()
    where = [issue["expression"][0] for issue in problem["issues"]]
    assert "Bundle.entry[0].resource.birthDate" in where and "Bundle.entry[1].resource.status" in where
    assert "09/03/1984" not in invalid.body.decode()  # values are never echoed
    delete = fhir_bundle()
    delete["entry"][0]["request"] = {"method": "DELETE", "url": "Patient/1"}
    refused = yield client.post("/v1/fhir", json.dumps(delete).encode(), FHIR)
    assert refused.code == 422 and refused.json()["issues"][0]["expression"] == ["Bundle.entry[0].request.method"]
    assert not rows(door, messages, messages.c.format == "fhir")


# -- GET /v1/messages/{id} ------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_message_status_is_for_the_sender_only(door):
    """The sender reads its message's status and translation; another facility gets 404, as for a missing id."""
    posted = yield Client(door, LAB.id).post("/v1/fhir", json.dumps(fhir_bundle()).encode(), FHIR)
    message_id = int(posted.json()["identifier"]["value"])
    mine = yield Client(door, LAB.id).get(f"/v1/messages/{message_id}")
    assert mine.code == 200
    status = mine.json()
    assert (status["id"], status["status"], status["format"]) == (message_id, "translated", "fhir")
    assert status["translation"]["status"] == "translated" and status["deliveries"] == []
    theirs = yield Client(door, HOSPITAL.id).get(f"/v1/messages/{message_id}")
    missing = yield Client(door, HOSPITAL.id).get(f"/v1/messages/{message_id + 1000}")
    junk = yield Client(door, HOSPITAL.id).get("/v1/messages/abc")
    assert theirs.code == missing.code == junk.code == 404
    assert theirs.json()["detail"] == missing.json()["detail"]


# -- Idempotency-Key ------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_idempotency_key_replays_the_answer_and_refuses_another_body(door):
    """Same key, same body: the first answer again, marked replayed, one message stored;
    same key, other body: 422; the key is per facility."""
    client = Client(door, HOSPITAL.id)
    first = yield client.post("/v1/hl7v2", hl7("IDEM-1"), HL7, Idempotency_Key="k-1")
    again = yield client.post("/v1/hl7v2", hl7("IDEM-1"), HL7, Idempotency_Key="k-1")
    assert first.code == again.code == 200 and first.body == again.body
    assert again.header("idempotency-replayed") == "true" and first.header("idempotency-replayed") is None
    assert again.header("content-location") == first.header("content-location")
    [row] = rows(door, messages, messages.c.control_id == "IDEM-1")
    assert row.duplicate_count == 0  # not even seen again by ingest
    other = yield client.post("/v1/hl7v2", hl7("IDEM-2"), HL7, Idempotency_Key="k-1")
    assert other.code == 422 and other.json()["type"].endswith("/idempotency-key-reused")
    assert not rows(door, messages, messages.c.control_id == "IDEM-2")
    bad = yield client.post("/v1/hl7v2", hl7("IDEM-3"), HL7, Idempotency_Key="has space")
    assert bad.code == 400
    [claim] = rows(door, api_requests)
    assert (claim.facility_id, claim.idempotency_key, claim.state, claim.status) == (HOSPITAL.id, "k-1", "done", 200)


# -- limits ---------------------------------------------------------------------------------

def raw_exchange(door, who: str, data: bytes, wait: float = 5.0) -> tuple[bytes, float]:
    """Send `data` over a fresh mutual TLS connection; what came back until the server closed
    (or `wait` passed), and how long that took."""
    import time

    context = ssl.create_default_context(cafile=door.path("ca.crt"))
    context.load_cert_chain(door.path(f"{who}.crt"), door.path(f"{who}.key"))
    started = time.monotonic()
    chunks = []
    with socket.create_connection(("127.0.0.1", door.port), timeout=wait) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            if data:
                tls.sendall(data)
            try:
                while not _complete(b"".join(chunks)):
                    chunk = tls.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            except (OSError, ssl.SSLError):
                pass
    return b"".join(chunks), time.monotonic() - started


def _complete(data: bytes) -> bool:
    """A whole HTTP answer with a Content-Length."""
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


@defer.inlineCallbacks
def eventually(check, timeout: float = 20.0):
    """Wait (without blocking the reactor) until `check()` is true."""
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        yield task.deferLater(reactor, 0.02, lambda: None)
    assert check()


@pytest_twisted.inlineCallbacks
def test_oversize_body_is_refused_413_before_it_is_read(door):
    """A Content-Length over the limit is answered 413 at once, without the body being sent;
    a chunked body is refused once it passes the limit; both refusals are kept."""
    head = (f"POST /v1/hl7v2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/hl7-v2\r\n"
            f"Content-Length: {10 * 1024 * 1024}\r\n\r\n").encode() + b"MSH|^~\\&|"
    answer, _ = yield threads.deferToThread(raw_exchange, door, HOSPITAL.id, head)
    assert answer.startswith(b"HTTP/1.1 413 ")
    problem = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert problem["status"] == 413 and problem["limit"] == 64 * 1024
    chunk = b"x" * 8192
    chunked = (b"POST /v1/fhir HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" + (b"2000\r\n" + chunk + b"\r\n") * 10)
    answer, _ = yield threads.deferToThread(raw_exchange, door, HOSPITAL.id, chunked)
    assert answer.startswith(b"HTTP/1.1 413 ")
    yield eventually(lambda: len(rows(door, api_refusals)) == 2)
    assert [(r.status, r.facility_id) for r in rows(door, api_refusals)] == [(413, HOSPITAL.id)] * 2
    assert not rows(door, messages)


@pytest.fixture
def quick_door(pki, tmp_path, preloaded):
    """A door with short timeouts (0.3 s to answer, 0.5 s idle) and no translation."""
    config = with_listener(door_config(pki, f"sqlite:///{tmp_path / 'quick.sqlite'}"),
                           request_timeout=0.3, idle_timeout=0.5)
    running = pytest_twisted.blockon(start_door(config, pki, extra_routes=[_slow_route()], translate=False))
    yield running
    pytest_twisted.blockon(stop_door(running))


@pytest_twisted.inlineCallbacks
def test_request_timeout_answers_503_and_the_kept_answer_is_replayed(quick_door):
    """A request slower than request_timeout gets 503; the same key meanwhile gets 409; once
    done, the same key gets the real answer without running it again."""
    client = Client(quick_door, HOSPITAL.id)
    first = client.post("/v1/test/slow", b"{}", "application/json", Idempotency_Key="slow-1")
    # The first holds the key (its 0.6 s have begun) before the second is sent.
    yield eventually(lambda: [r.idempotency_key for r in rows(quick_door, api_requests)] == ["slow-1"])
    second = yield client.post("/v1/test/slow", b"{}", "application/json", Idempotency_Key="slow-1")
    assert second.code == 409 and second.header("retry-after") == "1"
    first = yield first
    assert first.code == 503 and first.json()["type"].endswith("/request-timeout")
    deadline = time.monotonic() + 20
    while True:  # sent again, as the 409 says, until the first's work is done
        third = yield client.post("/v1/test/slow", b"{}", "application/json", Idempotency_Key="slow-1")
        if third.code != 409 or time.monotonic() > deadline:
            break
        yield task.deferLater(reactor, 0.1, lambda: None)
    assert third.code == 200 and third.json() == {"slow": True}
    assert third.header("idempotency-replayed") == "true"


@pytest_twisted.inlineCallbacks
def test_idle_connection_is_closed(quick_door):
    """A client that connects and sends nothing is disconnected after idle_timeout."""
    answer, elapsed = yield threads.deferToThread(raw_exchange, quick_door, HOSPITAL.id, b"", 5.0)
    assert answer == b"" and 0.4 < elapsed < 3.0


@pytest_twisted.inlineCallbacks
def test_without_translation_fhir_is_stored_and_answered_202(quick_door):
    """With no mapping set, a Bundle is still validated and stored: entries answered 202 Accepted."""
    answer = yield Client(quick_door, LAB.id).post("/v1/fhir", json.dumps(fhir_bundle("batch")).encode(), FHIR)
    assert answer.code == 200 and answer.json()["type"] == "batch-response"
    assert [e["response"]["status"] for e in answer.json()["entry"]] == ["202 Accepted"] * 2
    [row] = rows(quick_door, messages)
    assert row.status == "received" and answer.json()["identifier"]["value"] == str(row.id)


@pytest.mark.pg
@pytest_twisted.inlineCallbacks
def test_idempotency_over_the_door_on_postgresql(pki, pg_url, preloaded):
    """On PostgreSQL: a FHIR Bundle sent twice with one key is stored and translated once, the second answer replayed."""
    door = yield start_door(door_config(pki, pg_url), pki)
    try:
        client = Client(door, LAB.id)
        body = json.dumps(fhir_bundle()).encode()
        first = yield client.post("/v1/fhir", body, FHIR, Idempotency_Key="pg-1")
        again = yield client.post("/v1/fhir", body, FHIR, Idempotency_Key="pg-1")
        assert first.code == again.code == 200 and first.body == again.body
        assert again.header("idempotency-replayed") == "true"
        assert len(rows(door, messages)) == 1 and len(rows(door, translations)) == 1
        [claim] = rows(door, api_requests)
        assert (claim.state, claim.status, bytes(claim.response)) == ("done", 200, first.body)
    finally:
        yield stop_door(door)



@pytest.mark.pg
@pytest_twisted.inlineCallbacks
def test_hl7v2_with_a_nul_in_its_header_is_refused_not_a_500_on_postgresql(pki, pg_url, preloaded):
    """A NUL in MSH-10: the message was stored and refused (AE CHARSET_INVALID, as over MLLP),
    then the door looked its row up by (MSH-3, MSH-4, MSH-10), which PostgreSQL refuses with a
    NUL in it: 500 internal error. Now the 422 with the ACK and the stored refusal's id."""
    door = yield start_door(door_config(pki, pg_url), pki)
    try:
        answer = yield Client(door, HOSPITAL.id).post("/v1/hl7v2", hl7("REST-\x00NUL"), HL7)
        assert answer.code == 422, answer.body
        assert answer.json()["ack_code"] == "AE" and "NUL byte" in answer.json()["detail"]
        [row] = rows(door, messages)
        assert answer.json()["message_id"] == row.id and row.status == "rejected"
    finally:
        yield stop_door(door)

PROVISIONAL_AE = ("MSH|^~\\&|MA_HIE_GATEWAY|MA_HIE|HIS_CHU|CHU_IBN_ROCHD|20250114083513||ACK^A01^ACK|P1|P|2.5\r"
                  "MSA|AE|REST-NP1\rERR||MSH^1|207^Application internal error^HL70357|E|"
                  "PRESCRIPTION_NOT_PROCESSED^Not processed yet; send the message again later^MA-HIE-ERR||"
                  "received but not processed yet: send the message again later\r").encode()


@pytest_twisted.inlineCallbacks
def test_hl7v2_stored_but_not_processed_yet_is_not_kept_under_the_idempotency_key(door):
    """A message whose answer waits for the prescription step, stored but not processed yet (a
    crash came between: its stored ACK is still the provisional AE PRESCRIPTION_NOT_PROCESSED),
    sent again: 409 with Retry-After, not kept under its Idempotency-Key. Sent again with the
    same key once processed, it gets its real answer (before: the provisional 422, forever)."""
    import hashlib
    from datetime import datetime, timezone

    from sqlalchemy import insert, update

    message = hl7("REST-NP1")
    now = datetime.now(timezone.utc)
    with door.store.engine.begin() as connection:  # as a gateway killed before the step left it
        message_id = connection.execute(insert(messages).values(
            received_at=now, listener="https-test", peer="127.0.0.1:1", sender_id=HOSPITAL.id,
            sending_application="HIS_CHU", sending_facility="CHU_IBN_ROCHD", control_id="REST-NP1",
            message_type="ADT^A01", version="2.5", processing_id="P", codec="utf-8",
            sha256=hashlib.sha256(message).digest(), size=len(message), truncated=False,
            status="received", accepted=True, ack_code="AE", ack=PROVISIONAL_AE, format="hl7v2",
            duplicate_count=0)).inserted_primary_key[0]
        connection.execute(insert(message_payloads).values(message_id=message_id, received_at=now, raw=message))
    client = Client(door, HOSPITAL.id)
    answer = yield client.post("/v1/hl7v2", message, HL7, Idempotency_Key="np-1")
    assert answer.code == 409, answer.body
    assert answer.header("retry-after") and answer.json()["ack_code"] == "AE"
    assert "still being processed" in answer.json()["detail"]
    # The step runs (the start sweep): its answer replaces the provisional one.
    final = PROVISIONAL_AE.split(b"\r")[0] + b"\rMSA|AA|REST-NP1\r"
    with door.store.engine.begin() as connection:
        connection.execute(update(messages).where(messages.c.id == message_id)
                           .values(status="translated", ack_code="AA", ack=final))
    answer = yield client.post("/v1/hl7v2", message, HL7, Idempotency_Key="np-1")
    assert answer.code == 200, answer.body
    assert answer.json()["ack"] == final.decode() and answer.header("idempotency-replayed") is None
    answer = yield client.post("/v1/hl7v2", message, HL7, Idempotency_Key="np-1")
    assert answer.code == 200 and answer.header("idempotency-replayed") == "true"

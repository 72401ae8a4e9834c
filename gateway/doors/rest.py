"""The REST door's own operations under /v1/: POST /v1/hl7v2, POST /v1/fhir and
GET /v1/messages/{id}, each a Route with its OpenAPI description.

POST /v1/hl7v2 answers with HTTP status by the HL7 answer: 200 for AA/CA (the ACK and the
message id as JSON), 202 when no answer is due (an ACK posted to us, MSH-15 NE), 422 problem
for AE/AR/CE/CR (the ACK is in the problem body: the refusal is an HL7 answer, but the
exchange did not do what was asked), 503 problem when the store failed (nothing kept), 409
problem (Retry-After) for a message the gateway is still processing (an e-prescription
message answered once its step has run, sent again while its first copy is processed by
another node, or left unprocessed by a crash: the copy's ACK is the provisional AE "not
processed yet", which refuses nothing; sent again later, it gets the real answer). A copy
whose first is being processed by this node waits for the first's answer (gateway.ingest.awaited).
"""
from __future__ import annotations

import hashlib
import uuid

from sqlalchemy import select
from twisted.internet import threads

from adapters.hl7v2.batch import is_batch
from adapters.hl7v2.charsets import CharsetError, codec_for
from adapters.hl7v2.codes import Outcome
from adapters.hl7v2.header import HeaderError, parse_header
from adapters.mllp.protocol import ConnectionInfo
from gateway.doors.api import ApiRequest, ApiResponse, Problem, Route, json_response, refuse_foreign_charset
from gateway.doors.ingest_bridge import IngestBridge, KeyReused, StoreUnavailable
from gateway.doors.schemas import (FHIR_SCHEMAS, HL7V2_SCHEMAS, MESSAGE_SCHEMAS, fhir_spec,
                                   hl7v2_spec, message_spec)
from gateway.events import Event, EventBus
from gateway.ingest.model import Inbound, MessageStatus
from gateway.ingest.pipeline import is_provisional
from gateway.prescriptions.ids import SYSTEM as PRESCRIPTION_SYSTEM
from gateway.store.queries import deliveries_of
from gateway.store.schema import messages, translations
from gateway.store.timestamps import utc
from gateway.translation.fhir_input import BundleError, bundle_issues, canonical_entries, read_bundle
from gateway.translation.translator import document_context

HL7_MEDIA_TYPES = ("application/hl7-v2", "x-application/hl7-v2+er7", "application/hl7-v2+er7")
FHIR_MEDIA_TYPES = ("application/fhir+json", "application/json")
# Content-Type charsets that need no transcoding: what an empty MSH-18 is read as.
_ASCII_COMPATIBLE = ("utf-8", "ascii")


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """A Content-Type's media type (lower case) and its parameters (names in lower case)."""
    parts = (content_type or "").split(";")
    params = {}
    for part in parts[1:]:
        name, _, value = part.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return parts[0].strip().lower(), params


def _require(request: ApiRequest, accepted: tuple[str, ...]) -> dict[str, str]:
    kind, params = media_type(request.headers.get("content-type"))
    if kind not in accepted:
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      f"send the body as {accepted[0]} (Content-Type {kind or 'missing'})")
    return params


def er7_bytes(body: bytes, charset: str | None) -> bytes:
    """The message's bytes as ingest reads them. MSH-18 governs when valued; when it is empty
    and the Content-Type names another character set than UTF-8/ASCII, the text is re-encoded
    as UTF-8 (what an empty MSH-18 is read as), so that it is not garbled."""
    if not charset:
        return body
    try:
        declared = parse_header(body).charset
    except HeaderError:
        return body  # ingest refuses it with the reason
    if declared.strip():
        return body
    try:
        codec = codec_for(charset)
    except CharsetError:
        try:
            codec = "".join(charset.split()).lower()
            # Encoding checks that it is a text encoding (b"".decode checks nothing): rot13 or
            # base64 fail with LookupError, Python's 'undefined' with UnicodeError (a ValueError).
            "".encode(codec)
        except (LookupError, ValueError):
            raise Problem(415, "unsupported-charset", "Unsupported charset",
                          f"charset {charset!r} of the Content-Type is unknown") from None
    if codec.replace("-", "").replace("_", "") in ("utf8", "ascii", "usascii"):
        return body
    try:
        return body.decode(codec).encode("utf-8")
    except UnicodeError as error:  # not only UnicodeDecodeError: punycode or idna fail with UnicodeError
        raise Problem(400, "bad-encoding", "Body not in its charset",
                      f"the body is not valid {charset}: {error}") from None


def ack_text(answer: bytes, codec: str) -> str:
    return answer.decode(codec, "replace")


def refusal_detail(ack: str) -> str:
    """Why an HL7 answer refused: ERR-7 or ERR-8 (v2.5+), else MSA-3 (older versions)."""
    separator = ack[3:4] if ack.startswith("MSH") else "|"
    escape = ack[6:7] if ack.startswith("MSH") else "\\"
    found = None
    for segment in ack.replace("\n", "\r").split("\r"):
        fields = segment.split(separator)
        if fields[0] == "ERR":
            found = next((f for f in fields[7:9] if f), None) or found
        elif fields[0] == "MSA" and len(fields) > 3 and fields[3]:
            found = found or fields[3]
    if not found:
        return "the message was not accepted; see the acknowledgement"
    for code, text in (("F", separator), ("S", "^"), ("T", "&"), ("R", "~"), ("E", escape)):
        found = found.replace(f"{escape}{code}{escape}", text)
    return found


class RestOperations:
    """The core operations of /v1/ over one ingest bridge."""

    def __init__(self, bridge: IngestBridge, database, listener: str, events: EventBus | None = None):
        self.events = events if events is not None else EventBus()
        self.bridge = bridge
        self.database = database
        self.listener = listener

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/v1/hl7v2", "hl7v2.submit", self.submit_hl7v2, hl7v2_spec(), HL7V2_SCHEMAS),
            Route("POST", "/v1/fhir", "fhir.submit", self.submit_fhir, fhir_spec(), FHIR_SCHEMAS),
            Route("GET", "/v1/messages/{id}", "messages.read", self.message_status, message_spec(),
                  MESSAGE_SCHEMAS),
        ]

    # -- POST /v1/hl7v2 --------------------------------------------------------------------

    async def submit_hl7v2(self, request: ApiRequest) -> ApiResponse:
        params = _require(request, HL7_MEDIA_TYPES)
        if not request.body.strip():
            raise Problem(400, "empty-body", "Empty body", "the body must hold one HL7 v2 message (ER7)")
        if is_batch(request.body):
            raise Problem(400, "batch-not-supported", "Batches are not accepted here",
                          "send one message per request (batches go over MLLP)")
        payload = er7_bytes(request.body, params.get("charset"))
        connection = ConnectionInfo(self.listener, request.peer, request.facility.id, True)
        outcome = await self.bridge.submit_er7(payload, connection)
        text = ack_text(outcome.answer, outcome.codec) if outcome.answer else None
        data = {"message_id": outcome.message_id, "ack": text, "ack_code": outcome.ack_code}
        if not outcome.stored:
            raise Problem(503, "store-unavailable", "Message not stored",
                          "the message could not be stored; nothing was kept, send it again",
                          retry_after=5, **data)
        if text is None:
            return json_response(202, data, _location(outcome.message_id))
        if outcome.ack_code in ("AA", "CA"):
            kind = _order_response(text) if outcome.message_id is not None and outcome.answer[:3] == b"MSH" else None
            if kind is not None:
                issued = await self.database.run(issued_prescriptions, outcome.message_id)
                # ORR^O02 / ORL^O22 also answer ordinary orders: the list only when acts were prescribed
                if issued or kind in ("RRE", "ORP"):
                    data["prescriptions"] = issued
            return json_response(200, data, _location(outcome.message_id))
        if is_provisional(outcome.answer):
            raise Problem(409, "message-in-progress", "Message still being processed",
                          "the same message is still being processed; send it again later to get its "
                          "answer", retry_after=1, **data)
        raise Problem(422, "hl7-refused", "HL7 message refused", refusal_detail(text), **data)

    # -- POST /v1/fhir ---------------------------------------------------------------------

    async def submit_fhir(self, request: ApiRequest) -> ApiResponse:
        _require(request, FHIR_MEDIA_TYPES)
        refuse_foreign_charset(request)
        try:
            # Off the reactor thread: validating a large Bundle takes long enough to stall
            # every MLLP connection if it ran there.
            document, issues = await threads.deferToThread(_read_and_check, request.body)
        except BundleError as error:
            issue = error.issues[0]
            raise Problem(400, "bad-json", "Body is not a JSON object",
                          f"{issue.expression}: {issue.diagnostics}" if issue.expression
                          else issue.diagnostics) from None
        if issues:
            first = issues[0]
            raise Problem(422, "invalid-fhir", "Invalid FHIR Bundle",
                          f"{first.expression or 'Bundle'}: {first.diagnostics}"
                          + (f" (and {len(issues) - 1} more issues)" if len(issues) > 1 else ""),
                          issues=[issue.to_json() for issue in issues[:100]])
        facility = request.facility
        control_id = request.headers.get("idempotency-key") or str(uuid.uuid4())
        item = Inbound(raw=request.body, sha256=hashlib.sha256(request.body).digest(),
                       outcome=Outcome.ACCEPT, status=MessageStatus.RECEIVED, ack=None,
                       sending_application="FHIR", sending_facility=facility.id,
                       control_id=control_id, message_type=f"FHIR^{document['type']}",
                       codec="utf-8", size=len(request.body), sender_id=facility.id, format="fhir")
        try:
            outcome = await self.bridge.submit_document(item, request.peer)
        except StoreUnavailable:
            raise Problem(503, "store-unavailable", "Bundle not stored",
                          "the Bundle could not be stored; nothing was kept, send it again",
                          retry_after=5) from None
        except KeyReused:  # the key's claim was let go (a failure), its Bundle stored: not this one
            raise Problem(422, "idempotency-key-reused", "Idempotency-Key reused",
                          "this Idempotency-Key was used for a different Bundle; use a new key "
                          "for a new request") from None
        record = outcome.translation
        if record is not None and record.status == MessageStatus.FAILED.value:
            raise Problem(422, "translation-failed", "Bundle not translated",
                          f"{record.error_location or 'Bundle'}: {record.error_reason}",
                          message_id=outcome.message_id)
        translated = record is not None
        entries = canonical_entries(document, document_context(facility.id, control_id, None))
        status = "201 Created" if translated else "202 Accepted"
        issued = _prescribed(record.bundle if translated else None)
        answer = {
            "resourceType": "Bundle",
            "type": "batch-response" if document["type"] == "batch" else "transaction-response",
            "identifier": {"system": "urn:ma:hie:message", "value": str(outcome.message_id)},
            "entry": [_response_entry(status, entry, issued) for entry in entries],
        }
        return ApiResponse(200, json_response(200, answer).body, "application/fhir+json",
                           _location(outcome.message_id))

    # -- GET /v1/messages/{id} -------------------------------------------------------------

    async def message_status(self, request: ApiRequest) -> ApiResponse:
        text = request.path_params.get("id", "")
        found = None
        if text.isascii() and text.isdigit() and len(text) < 19:
            found = await self.database.run(message_status, int(text), request.facility.id)
        if found is None:  # someone else's message is as absent as a missing one
            raise Problem(404, "not-found", "No such message", "no message of yours has this id")
        self.events.emit(Event("message.read", request.facility.id, subject=f"message/{found['id']}",
                               source=request.peer, facility=request.facility.id,
                               listener=self.listener, message_type=found["message_type"],
                               detail={"request_id": request.request_id, "via": "rest"}))
        return json_response(200, found)


def _prescribed(bundle: dict | None) -> dict[str, dict]:
    """The canonical requests of a translated bundle that carry a prescription id the gateway
    issued, by id: the prescriber gets them back with the id (and the QR at .../qr)."""
    found = {}
    for entry in (bundle or {}).get("entry", ()):
        resource = entry.get("resource") or {}
        group = resource.get("groupIdentifier") or {}
        if resource.get("resourceType") in ("MedicationRequest", "ServiceRequest") \
                and group.get("system") == PRESCRIPTION_SYSTEM:
            found[resource.get("id")] = resource
    return found


def _response_entry(status: str, entry, issued: dict[str, dict]) -> dict:
    answer = {"response": {"status": status, "location": entry.location}}
    if entry.id in issued:  # as stored, with groupIdentifier = the prescription id
        answer["resource"] = issued[entry.id]
    return answer


def _read_and_check(body: bytes):
    """The Bundle of a request body and its validation issues (BundleError if not JSON)."""
    document = read_bundle(body)
    return document, bundle_issues(document)


def _order_response(ack: str) -> str | None:
    """The answer's type when it is an order response that may carry prescriptions: RRE^O12,
    ORP^O10 (drugs), ORR^O02, ORL^O22 (acts); else None."""
    separator = ack[3:4]
    fields = ack.split("\r", 1)[0].split(separator)
    kind = fields[8].split(ack[4:5] or "^")[0] if len(fields) > 8 else None
    return kind if kind in ("RRE", "ORP", "ORR", "ORL") else None


def issued_prescriptions(connection, message_id: int) -> list[dict]:
    """The prescriptions the gateway issued for a message: id, signed QR payload, validity."""
    from gateway.prescriptions.store import prescriptions_for_message

    return [{"id": issued.id, "qr_payload": issued.qr_payload,
             "issued_at": issued.issued_at.isoformat(), "expires_at": issued.expires_at.isoformat()}
            for issued in prescriptions_for_message(connection, message_id)]


def _location(message_id: int | None) -> dict[str, str]:
    return {"Content-Location": f"/v1/messages/{message_id}"} if message_id is not None else {}


def message_status(connection, message_id: int, facility_id: str) -> dict | None:
    """The status of message `message_id` if `facility_id` sent it, else None."""
    row = connection.execute(select(
        messages.c.id, messages.c.sender_id, messages.c.status, messages.c.message_type,
        messages.c.control_id, messages.c.received_at, messages.c.ack_code, messages.c.format,
        messages.c.error_code, messages.c.error_location, messages.c.error_reason,
        messages.c.duplicate_count).where(messages.c.id == message_id)).first()
    if row is None or row.sender_id != facility_id:
        return None
    translation = connection.execute(select(
        translations.c.status, translations.c.translated_at, translations.c.error_code,
        translations.c.error_location, translations.c.error_reason).where(
        translations.c.message_id == message_id)).first()
    return {
        "id": row.id,
        "status": row.status,
        "format": row.format,
        "message_type": row.message_type,
        "control_id": row.control_id,
        "received_at": _iso(row.received_at),
        "ack_code": row.ack_code,
        "duplicates": row.duplicate_count,
        "error": {"code": row.error_code, "location": row.error_location, "reason": row.error_reason}
        if row.error_code is not None or row.error_reason else None,
        "translation": None if translation is None else {
            "status": translation.status, "translated_at": _iso(translation.translated_at),
            "error": {"code": translation.error_code, "location": translation.error_location,
                      "reason": translation.error_reason} if translation.status == "failed" else None},
        "deliveries": [{"destination": d.destination, "status": d.status, "attempts": d.attempts,
                        "next_attempt_at": d.next_attempt_at, "finished_at": d.finished_at,
                        "last_code": d.last_code, "last_reason": d.last_reason}
                       for d in deliveries_of(connection, message_id)],
    }


def _iso(value) -> str:
    return utc(value).isoformat()

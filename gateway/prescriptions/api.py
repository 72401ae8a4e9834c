"""The prescription operations of the REST door (`prescription_routes(service)`).

    GET  /v1/prescriptions/signing-key        the QR signing key (JWK set; ?format=pem: PEM)
    GET  /v1/prescriptions/{id}               a valid prescription and what remains per line
                                              (drugs to dispense, acts to perform)
    POST /v1/prescriptions/lookup             the same, from a scanned QR payload {"qr": "..."}
    GET  /v1/prescriptions/{id}/qr            the QR code (?format=png|svg), the prescriber's own

Look-ups are for the facility types allowed `prescriptions.lookup` (pharmacies, laboratories,
imaging centres); the door checks the operation before the handler runs. The signing key is
public: any facility its certificate names may read it (ANY_FACILITY), to verify QR codes
offline. A prescription that
is cancelled, fully dispensed or expired is 410 Gone; an unknown one 404; a malformed id or a
QR payload whose signature fails is 400. The QR image is served to the facility that issued
the prescription only (another facility gets 404, as if it did not exist, so that ids cannot
be probed). Database work runs on the store's thread pool, never on the reactor.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from gateway.doors.api import ANY_FACILITY, ApiRequest, ApiResponse, Problem, Route, json_response, read_json
from gateway.events import Event, EventBus
from gateway.prescriptions import ids, qr, store

if TYPE_CHECKING:
    from gateway.prescriptions.service import PrescriptionService

PROBLEM = {"$ref": "#/components/schemas/Problem"}
ID_PARAMETER = {"name": "id", "in": "path", "required": True,
                "description": "The prescription id, RX-XXXX-XXXX-C (case and dashes are free)",
                "schema": {"type": "string", "maxLength": 64}}


def _problem_response(description: str) -> dict:
    return {"description": description, "content": {"application/problem+json": {"schema": PROBLEM}}}


SCHEMAS = {
    "Problem": {
        "type": "object", "description": "RFC 9457 problem details",
        "properties": {"type": {"type": "string", "format": "uri"}, "title": {"type": "string"},
                       "status": {"type": "integer"}, "detail": {"type": "string"},
                       "instance": {"type": "string"}},
        "required": ["type", "title", "status"]},
    "PrescriptionLine": {
        "type": "object",
        "description": "A drug to dispense (kind drug, its medication) or an act to perform (kind act: "
                       "a lab test or an imaging examination, quantity 1)",
        "properties": {
            "line": {"type": "integer", "minimum": 1},
            "kind": {"type": "string", "enum": list(store.KINDS)},
            "medication": {"type": "object", "properties": {
                "system": {"type": ["string", "null"], "description": "https://www.gs1.org/gtin for EAN-13"},
                "code": {"type": "string"}, "display": {"type": ["string", "null"]}},
                "required": ["code"]},
            "act": {"type": "object", "properties": {
                "system": {"type": ["string", "null"],
                           "description": "urn:ma:cnss:nabm or urn:ma:cnss:ngap when it has a CNSS code, "
                                          "else http://loinc.org or a local system"},
                "code": {"type": "string"}, "display": {"type": ["string", "null"]}},
                "required": ["code"]},
            "quantity": {"type": "number", "description": "prescribed (an act: 1)"},
            "unit": {"type": ["string", "null"]},
            "dispensed": {"type": "number", "description": "dispensed, or performed (an act: 0 or 1)"},
            "remaining": {"type": "number"}},
        "required": ["line", "kind", "quantity", "dispensed", "remaining"],
        "oneOf": [{"required": ["medication"]}, {"required": ["act"]}]},
    "Prescription": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^RX-[0-9A-HJKMNP-TV-Y]{4}-[0-9A-HJKMNP-TV-Y]{4}-[0-9A-HJKMNP-TV-Y]$"},
            "system": {"type": "string", "const": ids.SYSTEM},
            "status": {"type": "string", "enum": list(store.STATUSES)},
            "issued_at": {"type": "string", "format": "date-time"},
            "expires_at": {"type": "string", "format": "date-time"},
            "prescriber": {"type": "object", "properties": {
                "inpe": {"type": "string"}, "facility": {"type": "string"}}},
            "patient": {"type": "object", "properties": {"identifiers": {"type": "array", "items": {
                "type": "object", "properties": {"system": {"type": "string"}, "value": {"type": "string"}}}}}},
            "lines": {"type": "array", "items": {"$ref": "#/components/schemas/PrescriptionLine"}}},
        "required": ["id", "status", "issued_at", "expires_at", "prescriber", "patient", "lines"]},
    "PrescriptionLookup": {
        "type": "object", "properties": {"qr": {"type": "string", "maxLength": qr.MAX_PAYLOAD,
                                                "description": "the scanned QR payload, HIE1.<fields>.<signature>"}},
        "required": ["qr"], "additionalProperties": False},
    "SigningKeys": {
        "type": "object", "description": "JWK set (RFC 7517) of the Ed25519 keys that sign QR payloads",
        "properties": {"keys": {"type": "array", "items": {"type": "object", "properties": {
            "kty": {"const": "OKP"}, "crv": {"const": "Ed25519"}, "x": {"type": "string"},
            "kid": {"type": "string"}, "use": {"const": "sig"}, "alg": {"const": "EdDSA"}}}}},
        "required": ["keys"]},
}

_FOUND = {"200": {"description": "The prescription, with what remains to dispense or perform per line",
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Prescription"}}}},
          "400": _problem_response("Malformed id or QR payload, or a QR signature that is not valid"),
          "404": _problem_response("No such prescription"),
          "410": _problem_response("The prescription is cancelled, fully dispensed and performed, or expired")}


def prescription_view(prescription: store.Prescription) -> dict:
    return {
        "id": prescription.id, "system": ids.SYSTEM, "status": prescription.status,
        "issued_at": prescription.issued_at.isoformat(), "expires_at": prescription.expires_at.isoformat(),
        "prescriber": {"inpe": prescription.prescriber_inpe, "facility": prescription.prescriber_facility},
        "patient": {"identifiers": [dict(zip(("system", "value"), text.split("|", 1)))
                                    for text in prescription.patient_identifiers]},
        "lines": [line.as_dict() for line in prescription.lines]}


def _parse_id(text: str) -> str:
    try:
        return ids.parse(text)
    except ids.PrescriptionIdError as error:
        raise Problem(400, "bad-prescription-id", "Not a prescription id", error.reason) from None


def _valid(prescription: store.Prescription | None, prescription_id: str,
           now: datetime) -> store.Prescription:
    if prescription is None:
        raise Problem(404, "prescription-not-found", "Prescription not found",
                      f"no prescription {prescription_id}")
    if prescription.status == store.CANCELLED:
        raise Problem(410, "prescription-cancelled", "Prescription cancelled",
                      f"prescription {prescription_id} was cancelled")
    if prescription.status == store.COMPLETED:
        raise Problem(410, "prescription-completed", "Prescription fully dispensed and performed",
                      f"prescription {prescription_id} was fully dispensed and performed: nothing remains")
    if now >= prescription.expires_at:
        raise Problem(410, "prescription-expired", "Prescription expired",
                      f"prescription {prescription_id} expired at {prescription.expires_at.isoformat()}")
    return prescription


class PrescriptionApi:
    def __init__(self, service: "PrescriptionService", now=lambda: datetime.now(timezone.utc),
                 events: EventBus | None = None):
        self.service = service
        self.now = now
        self.events = events if events is not None else EventBus()

    def _read(self, request: ApiRequest, prescription_id: str, via: str) -> None:
        """Tell who was shown a prescription (the audit keeps every read of patient data)."""
        self.events.emit(Event("prescription.read", request.facility.id,
                               subject=f"prescription/{prescription_id}", source=request.peer,
                               facility=request.facility.id,
                               detail={"request_id": request.request_id, "via": via}))

    def _fetch(self, prescription_id: str):
        return self.service.database.run(store.get_prescription, prescription_id)

    def get(self, request: ApiRequest):
        prescription_id = _parse_id(request.path_params.get("id", ""))
        d = self._fetch(prescription_id)

        def found(prescription):
            view = prescription_view(_valid(prescription, prescription_id, self.now()))
            self._read(request, prescription_id, "rest")
            return json_response(200, view, {"Cache-Control": "no-store"})

        d.addCallback(found)
        return d

    def lookup(self, request: ApiRequest):
        body = read_json(request)
        if not isinstance(body, dict) or set(body) != {"qr"} or not isinstance(body["qr"], str):
            raise Problem(400, "bad-lookup", "Bad look-up request",
                          'the body must be a JSON object {"qr": "<scanned QR payload>"}')
        key = self.service.key
        try:
            claims = qr.verify(body["qr"], {key.key_id: key.public})
        except qr.QrPayloadError as error:
            raise Problem(400, "invalid-qr", "QR payload not valid", error.reason) from None
        d = self._fetch(claims.prescription_id)

        def found(prescription):
            prescription = _valid(prescription, claims.prescription_id, self.now())
            lines = [(line.line, line.medication_code, line.quantity, line.unit) for line in prescription.lines]
            if claims.digest != qr.lines_digest(lines) or claims.prescriber_inpe != prescription.prescriber_inpe:
                raise Problem(400, "invalid-qr", "QR payload not valid",
                              "the QR payload does not match the stored prescription")
            self._read(request, prescription.id, "qr-lookup")
            return json_response(200, prescription_view(prescription), {"Cache-Control": "no-store"})

        d.addCallback(found)
        return d

    def image(self, request: ApiRequest):
        prescription_id = _parse_id(request.path_params.get("id", ""))
        kind = (request.query.get("format") or ("png",))[0].lower()
        if kind not in qr.IMAGE_TYPES:
            raise Problem(400, "bad-format", "Unknown image format", "format must be png or svg")
        d = self._fetch(prescription_id)

        def found(prescription):
            if prescription is None or prescription.prescriber_facility != request.facility.id:
                raise Problem(404, "prescription-not-found", "Prescription not found",
                              f"no prescription {prescription_id} issued by {request.facility.id}")
            self._read(request, prescription_id, "qr-image")
            return ApiResponse(200, qr.qr_image(prescription.qr_payload, kind), qr.IMAGE_TYPES[kind],
                               {"Cache-Control": "private, max-age=86400"})

        d.addCallback(found)
        return d

    def signing_key(self, request: ApiRequest):
        kind = (request.query.get("format") or ("jwk",))[0].lower()
        public = self.service.key.public
        if kind == "pem":
            return ApiResponse(200, qr.public_pem(public).encode("ascii"), "application/x-pem-file",
                               {"Cache-Control": "public, max-age=3600"})
        if kind != "jwk":
            raise Problem(400, "bad-format", "Unknown key format", "format must be jwk or pem")
        return json_response(200, {"keys": [qr.public_jwk(public)]}, {"Cache-Control": "public, max-age=3600"})


def prescription_routes(service: "PrescriptionService", events: EventBus | None = None) -> list[Route]:
    """The REST routes of the prescription operations, with their OpenAPI operations; each
    prescription shown is told to `events` (prescription.read)."""
    api = PrescriptionApi(service, events=events)
    return [
        Route("GET", "/v1/prescriptions/signing-key", ANY_FACILITY, api.signing_key, {
            "operationId": "getPrescriptionSigningKey", "tags": ["prescriptions"],
            "summary": "The public key that signs prescription QR payloads (verify them offline)",
            "parameters": [{"name": "format", "in": "query", "required": False,
                            "schema": {"type": "string", "enum": ["jwk", "pem"], "default": "jwk"}}],
            "responses": {
                "200": {"description": "A JWK set, or the key as PEM (SubjectPublicKeyInfo)",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SigningKeys"}},
                                    "application/x-pem-file": {"schema": {"type": "string"}}}},
                "400": _problem_response("Unknown format")}}, SCHEMAS),
        Route("POST", "/v1/prescriptions/lookup", "prescriptions.lookup", api.lookup, {
            "operationId": "lookupPrescriptionByQr", "tags": ["prescriptions"],
            "summary": "Look a prescription up from its scanned QR payload (signature checked)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/PrescriptionLookup"}}}},
            "responses": _FOUND}, SCHEMAS),
        Route("GET", "/v1/prescriptions/{id}", "prescriptions.lookup", api.get, {
            "operationId": "getPrescription", "tags": ["prescriptions"],
            "summary": "A valid prescription and what remains to dispense or perform per line",
            "parameters": [ID_PARAMETER], "responses": _FOUND}, SCHEMAS),
        Route("GET", "/v1/prescriptions/{id}/qr", "prescriptions.qr", api.image, {
            "operationId": "getPrescriptionQr", "tags": ["prescriptions"],
            "summary": "The prescription's QR code, for the facility that issued it",
            "parameters": [ID_PARAMETER, {"name": "format", "in": "query", "required": False,
                                          "schema": {"type": "string", "enum": ["png", "svg"], "default": "png"}}],
            "responses": {
                "200": {"description": "The QR code of the signed payload",
                        "content": {"image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}},
                                    "image/svg+xml": {"schema": {"type": "string"}}}},
                "400": _problem_response("Malformed id or unknown format"),
                "404": _problem_response("No such prescription issued by the caller")}}, SCHEMAS),
    ]

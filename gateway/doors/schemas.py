"""OpenAPI descriptions (Operation Objects and JSON Schemas) of the REST door's own
operations. Data only: the handlers are in rest.py, the document is built by openapi.py, and
a test checks real answers against these schemas."""
from __future__ import annotations

from gateway.doors.api import PROBLEM_CONTENT_TYPE

ACK_CODES = ["AA", "AE", "AR", "CA", "CE", "CR"]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str, media: str = "application/json") -> dict:
    return {"description": description, "content": {media: {"schema": _ref(name)}}}


def _problem(name: str, description: str) -> dict:
    return {"description": description, "content": {PROBLEM_CONTENT_TYPE: {"schema": _ref(name)}}}


_HL7_FIELDS = {
    "message_id": {"type": ["integer", "null"], "description": "The stored message's id (GET /v1/messages/{id})"},
    "ack": {"type": ["string", "null"], "description": "The HL7 answer (ACK, or RRE^O12 for a prescription) as ER7 text"},
    "ack_code": {"enum": ACK_CODES + [None], "description": "MSA-1 of the answer"},
}

HL7V2_SCHEMAS = {
    "Hl7v2Answer": {
        "type": "object",
        "required": ["message_id", "ack", "ack_code"],
        "properties": {**_HL7_FIELDS,
                       "prescriptions": {"type": "array", "items": _ref("IssuedPrescription"),
                                         "description": "Prescriptions the gateway issued for "
                                                        "this message (RDE^O11, OMP^O09; a prescriber's "
                                                        "ORM^O01, OML^O21 of acts)"}},
    },
    "IssuedPrescription": {
        "type": "object",
        "required": ["id", "qr_payload", "issued_at", "expires_at"],
        "properties": {"id": {"type": "string", "description": "urn:ma:hie:prescription identifier"},
                       "qr_payload": {"type": "string", "description": "The signed QR payload"},
                       "issued_at": {"type": "string", "format": "date-time"},
                       "expires_at": {"type": "string", "format": "date-time"}},
    },
    "Hl7v2Refusal": {
        "allOf": [_ref("Problem"), {
            "type": "object", "required": ["message_id", "ack", "ack_code"], "properties": _HL7_FIELDS}],
    },
}


def hl7v2_spec() -> dict:
    return {
        "operationId": "submitHl7v2",
        "summary": "Submit one HL7 v2 message (ER7)",
        "description": (
            "The message goes through the same checks, store and translation as over MLLP: "
            "MSH-4 must be the facility of the client certificate and the message type allowed "
            "for its type. The character set is MSH-18's; when MSH-18 is empty, the "
            "Content-Type charset (else UTF-8). One message per request (no batches). A "
            "positive answer (AA/CA) is given only once the message is stored."),
        "tags": ["messages"],
        "requestBody": {"required": True, "content": {
            media: {"schema": {"type": "string", "description": "ER7 text, segments ended by CR"}}
            for media in ("application/hl7-v2", "x-application/hl7-v2+er7")}},
        "responses": {
            "200": _json("Hl7v2Answer", "Accepted (AA/CA): the answer and the message id"),
            "202": _json("Hl7v2Answer", "Stored; no answer is due (an acknowledgement, MSH-15 NE)"),
            "409": _problem("Hl7v2Refusal", "The same message (or a request with this Idempotency-Key) "
                            "is still being processed: send it again later for its answer"),
            "415": _problem("Problem", "Not application/hl7-v2, or an unknown charset"),
            "422": _problem("Hl7v2Refusal", "Refused or in error (AE/AR/CE/CR): the answer is in the problem"),
            "503": _problem("Hl7v2Refusal", "Not stored (the store failed): send it again"),
        },
    }


FHIR_SCHEMAS = {
    "TransactionResponse": {
        "type": "object",
        "description": "A FHIR R4 Bundle of type transaction-response (batch-response for a batch)",
        "required": ["resourceType", "type", "entry"],
        "properties": {
            "resourceType": {"const": "Bundle"},
            "type": {"enum": ["transaction-response", "batch-response"]},
            "identifier": {"type": "object", "description": "The stored message (urn:ma:hie:message)",
                           "properties": {"system": {"const": "urn:ma:hie:message"},
                                          "value": {"type": "string"}}},
            "entry": {"type": "array", "items": {
                "type": "object", "required": ["response"],
                "properties": {"response": {
                    "type": "object", "required": ["status", "location"],
                    "properties": {"status": {"type": "string", "pattern": "^[0-9]{3}( .*)?$"},
                                   "location": {"type": "string", "pattern": "^[A-Z][A-Za-z]+/[A-Za-z0-9.-]{1,64}$"}}},
                    "resource": {
                        "type": "object", "required": ["resourceType", "id", "groupIdentifier"],
                        "description": "A MedicationRequest or ServiceRequest the gateway issued a "
                                       "prescription id for, as stored: groupIdentifier is the id "
                                       "(urn:ma:hie:prescription); its QR image is at "
                                       "/v1/prescriptions/{id}/qr",
                        "properties": {"resourceType": {"enum": ["MedicationRequest", "ServiceRequest"]},
                                       "groupIdentifier": {"type": "object", "required": ["system", "value"],
                                                           "properties": {"system": {"const": "urn:ma:hie:prescription"},
                                                                          "value": {"type": "string"}}}}}}}},
        },
    },
    "FhirProblem": {
        "allOf": [_ref("Problem"), {
            "type": "object",
            "properties": {"issues": {"type": "array", "items": {
                "type": "object", "required": ["severity", "code", "diagnostics"],
                "description": "An OperationOutcome.issue",
                "properties": {"severity": {"type": "string"}, "code": {"type": "string"},
                               "diagnostics": {"type": "string"},
                               "expression": {"type": "array", "items": {"type": "string"}}}}},
                "message_id": {"type": "integer"}}}],
    },
}


def fhir_spec() -> dict:
    return {
        "operationId": "submitFhirBundle",
        "summary": "Submit a FHIR R4 Bundle (transaction, batch or collection)",
        "description": (
            "The Bundle is validated (FHIR R4 structure, types, cardinalities), stored as a "
            "message (the bytes kept), made canonical (deterministic ids from identifiers, "
            "references between entries kept, a Provenance added) and routed like any "
            "message. The answer waits for that translation. Entries may only create or "
            "update (POST, PUT). With an Idempotency-Key, the key is also the stored "
            "message's control id."),
        "tags": ["messages"],
        "requestBody": {"required": True, "content": {
            media: {"schema": {"type": "object", "description": "A FHIR R4 Bundle"}}
            for media in ("application/fhir+json", "application/json")}},
        "responses": {
            "200": _json("TransactionResponse", "Stored and translated: one entry per input entry, "
                         "with the canonical resource's location", "application/fhir+json"),
            "415": _problem("Problem", "Not application/fhir+json"),
            "422": _problem("FhirProblem", "Not a valid FHIR Bundle (issues name the elements), or its "
                            "translation failed"),
        },
    }


MESSAGE_SCHEMAS = {
    "MessageStatus": {
        "type": "object",
        "required": ["id", "status", "format", "message_type", "control_id", "received_at",
                     "ack_code", "error", "translation", "deliveries"],
        "properties": {
            "id": {"type": "integer"},
            "status": {"enum": ["received", "rejected", "ignored", "translated", "failed"]},
            "format": {"type": "string"},
            "message_type": {"type": ["string", "null"]},
            "control_id": {"type": ["string", "null"]},
            "received_at": {"type": "string", "format": "date-time"},
            "ack_code": {"enum": ACK_CODES + [None]},
            "duplicates": {"type": "integer", "description": "Times it was sent again"},
            "error": {"oneOf": [{"type": "null"}, _ref("StoredError")]},
            "translation": {"oneOf": [{"type": "null"}, {
                "type": "object", "required": ["status", "translated_at"],
                "properties": {"status": {"enum": ["translated", "failed"]},
                               "translated_at": {"type": "string", "format": "date-time"},
                               "error": {"oneOf": [{"type": "null"}, _ref("StoredError")]}}}]},
            "deliveries": {"type": "array", "items": {
                "type": "object", "required": ["destination", "status", "attempts"],
                "properties": {"destination": {"type": "string"},
                               "status": {"enum": ["pending", "delivered", "dead"]},
                               "attempts": {"type": "integer"},
                               "next_attempt_at": {"type": ["string", "null"]},
                               "finished_at": {"type": ["string", "null"]},
                               "last_code": {"type": ["integer", "null"]},
                               "last_reason": {"type": ["string", "null"]}}}},
        },
    },
    "StoredError": {
        "type": "object",
        "properties": {"code": {"type": ["integer", "null"], "description": "HL7 table 0357"},
                       "location": {"type": ["string", "null"]},
                       "reason": {"type": ["string", "null"]}},
    },
}


def message_spec() -> dict:
    return {
        "operationId": "getMessageStatus",
        "summary": "Status of one of the caller's messages",
        "description": ("Any message the caller's facility sent, by any door. Another "
                        "facility's message is answered 404, as a missing one."),
        "tags": ["messages"],
        "parameters": [{"name": "id", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9]+$"}}],
        "responses": {"200": _json("MessageStatus", "The message, its translation and deliveries")},
    }


def openapi_spec() -> dict:
    return {
        "operationId": "getOpenApiDocument",
        "summary": "This document",
        "tags": ["meta"],
        "responses": {"200": {"description": "The OpenAPI 3.1 document of this API",
                              "content": {"application/json": {"schema": {"type": "object"}}}}},
    }

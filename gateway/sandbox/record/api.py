"""The record's FHIR interactions as plain blocking functions: request parts in, `Answer` out.

The Twisted resource (peer.py) runs them in the record's database thread; tests may call them
directly. Every refusal is an `Answer` whose body is an OperationOutcome.

Idempotency: a transaction with an `Idempotency-Key` stores its response under the key and
the SHA-256 of the request body's bytes (the fingerprint of the payload that the IETF
httpapi Idempotency-Key draft describes). The same key with the same body gets that response
again and changes nothing; with another body, even the same JSON spaced or ordered otherwise,
it is a 422. (The gateway sends the same bytes on every retry of a delivery. Digesting the
canonical form of the parsed JSON instead took a twentieth of the record's time; keys stored
so by an older version are still compared that way.)

`RecordApi.counts` tells how many transaction requests reached the API and what became of them
(served at `/_sandbox/stats`: benchmarks show how many requests a batched delivery took);
answers replaced by an injected fault are not counted.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from gateway.mapping.fhir_schema import is_resource_type
from gateway.sandbox.record import json_codec
from gateway.sandbox.record.operation_outcome import FhirError
from gateway.sandbox.record.search import parse_query_string, parse_search
from gateway.sandbox.record.store import RecordStore, key_reused
from gateway.sandbox.record.transaction import parse_json, read_transaction
from gateway.sandbox.record.validation import is_valid_id

FHIR_JSON = "application/fhir+json; charset=utf-8"
SEARCH_PARAMETERS = ("identifier", "patient", "subject", "code", "_id")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    replayed: bool = False  # a transaction's stored answer, given again
    entries: int = 0  # entries a transaction stored

    @property
    def document(self) -> dict:
        return json.loads(self.body)


def json_answer(status: int, document: dict, **headers: str) -> Answer:
    return Answer(status, json_codec.dumps_bytes(document), headers)


def error_answer(error: FhirError) -> Answer:
    return json_answer(error.status, error.outcome())


RAW_DIGEST = "raw:"  # the prefix of a digest of the body's bytes (older ones: canonical JSON)


def request_sha256(body: bytes) -> str:
    return RAW_DIGEST + hashlib.sha256(body).hexdigest()


def canonical_sha256(document: object) -> str:
    """The digest an older version stored: of the JSON with sorted keys, compact."""
    return hashlib.sha256(json_codec.dumps_bytes(document, sort_keys=True)).hexdigest()


@dataclass
class TransactionCounts:
    """Transaction requests received since the peer started, by what became of them."""

    applied: int = 0  # stored (all their entries)
    replayed: int = 0  # answered from the idempotency store, nothing changed
    refused: int = 0  # an error answer, nothing changed
    entries: int = 0  # entries of the applied ones

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.applied + self.replayed + self.refused, "applied": self.applied,
                "replayed": self.replayed, "refused": self.refused, "entries": self.entries}


class RecordApi:
    def __init__(self, store: RecordStore, *, validate: bool = True):
        self.store = store
        self.validate = validate
        self.counts = TransactionCounts()

    def transaction(self, body: bytes, idempotency_key: str | None = None) -> Answer:
        answer = self._transaction(body, idempotency_key)
        counts = self.counts
        if answer.status != 200:
            counts.refused += 1
        elif answer.replayed:
            counts.replayed += 1
        else:
            counts.applied += 1
            counts.entries += answer.entries
        return answer

    def _transaction(self, body: bytes, idempotency_key: str | None) -> Answer:
        try:
            digest, stored = "", None
            if idempotency_key is not None:
                digest = request_sha256(body)
                stored = self.store.stored_response(idempotency_key)
                if stored is not None and stored.body_sha256 == digest:  # the same bytes: not read again
                    return Answer(stored.status, stored.response, replayed=True)
            document = parse_json(body, strict=self.validate)  # not JSON: a 400, whatever the key
            if stored is not None:
                # digested as an older version read it: decimals as floats (5.10 as 5.1)
                if (stored.body_sha256.startswith(RAW_DIGEST)
                        or stored.body_sha256 != canonical_sha256(json_codec.loads(body))):
                    raise key_reused()
                return Answer(stored.status, stored.response, replayed=True)
            entries = read_transaction(document, validate=self.validate)
            response = self.store.apply_transaction(entries, idempotency_key=idempotency_key,
                                                    body_sha256=digest)
        except FhirError as error:
            return error_answer(error)
        return Answer(200, response, entries=len(entries))

    def read(self, resource_type: str, resource_id: str) -> Answer:
        if not is_resource_type(resource_type):
            return error_answer(FhirError.single(404, "not-supported", "unknown resource type"))
        if not is_valid_id(resource_id):
            return error_answer(FhirError.single(400, "value", "not a valid resource id"))
        resource = self.store.read(resource_type, resource_id)
        if resource is None:
            return error_answer(FhirError.single(404, "not-found", f"no {resource_type} with this id"))
        return json_answer(200, resource, etag=f'W/"{resource["meta"]["versionId"]}"')

    def search(self, resource_type: str, query_string: str, base_url: str) -> Answer:
        """`base_url` (`https://host:port/fhir`) makes the entries' fullUrl."""
        if not is_resource_type(resource_type):
            return error_answer(FhirError.single(404, "not-supported", "unknown resource type"))
        try:
            query = parse_search(resource_type, parse_query_string(query_string))
        except FhirError as error:
            return error_answer(error)
        total, resources = self.store.search(query)
        return json_answer(200, {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "entry": [{"fullUrl": f"{base_url}/{resource_type}/{resource['id']}", "resource": resource,
                       "search": {"mode": "match"}} for resource in resources],
        })

    @staticmethod
    def capability_statement() -> Answer:
        return json_answer(200, {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": "2026-01-01",
            "kind": "instance",
            "software": {"name": "ma-hie-gateway sandbox shared record"},
            "fhirVersion": "4.0.1",
            "format": ["application/fhir+json", "json"],
            "rest": [{
                "mode": "server",
                "interaction": [{"code": "transaction"}],
                "resource": [{
                    "type": resource_type,
                    "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "conditionalCreate": True,
                    "updateCreate": True,  # PUT with an id that matches nothing creates it
                    "conditionalUpdate": True,
                    "searchParam": [{"name": name, "type": "reference" if name in ("patient", "subject")
                                     else "token"} for name in SEARCH_PARAMETERS],
                } for resource_type in ("Patient", "Encounter", "Observation", "DiagnosticReport",
                                        "DocumentReference", "ServiceRequest", "Specimen",
                                        "MedicationRequest", "MedicationDispense", "Immunization",
                                        "Practitioner", "Organization", "Coverage", "Provenance")],
            }],
        })

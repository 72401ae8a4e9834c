"""/v1/openapi.json: a valid OpenAPI 3.1 document built from the routes (the door's and the
prescription flow's), and real answers of every operation match the schemas it declares."""
from __future__ import annotations

import json

import jsonschema
import pytest
import pytest_twisted
from openapi_spec_validator import validate as validate_spec

from doors_support import HOSPITAL, LAB, PHARMACY, STRANGER, Client, door_config, fhir_bundle, hl7, start_door, stop_door
from gateway.doors.api import Route
from gateway.doors.openapi import SpecConflict, openapi_document
from gateway.mapping.mapping_set import MappingSet
from gateway.prescriptions.api import prescription_routes


@pytest.fixture
def door(pki, tmp_path, repo_mappings, monkeypatch):
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    config = door_config(pki, f"sqlite:///{tmp_path / 'gateway.sqlite'}")
    running = pytest_twisted.blockon(start_door(config, pki, extra_routes=prescription_routes(None)))
    yield running
    pytest_twisted.blockon(stop_door(running))


def check(document: dict, template: str, method: str, answer) -> None:
    """`answer` is declared for this operation, and its body matches the declared schema."""
    responses = document["paths"][template][method]["responses"]
    assert str(answer.code) in responses, f"{method.upper()} {template} answered {answer.code}, not declared"
    media = answer.header("content-type").split(";")[0]
    content = responses[str(answer.code)]["content"]
    assert media in content, f"{media} not declared for {answer.code} of {method.upper()} {template}"
    schema = {"components": document["components"], **content[media]["schema"]}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(answer.json())


@pytest_twisted.inlineCallbacks
def test_document_is_valid_openapi_31_and_lists_every_route(door):
    """The served document passes the OpenAPI 3.1 validator and describes each route, with the door's shared parts."""
    answer = yield Client(door, HOSPITAL.id).get("/v1/openapi.json")
    assert answer.code == 200
    document = answer.json()
    validate_spec(document)
    assert document["openapi"] == "3.1.0"
    assert document["components"]["securitySchemes"]["mutualTLS"]["type"] == "mutualTLS"
    assert {"/v1/hl7v2", "/v1/fhir", "/v1/messages/{id}", "/v1/openapi.json", "/v1/prescriptions/{id}",
            "/v1/prescriptions/lookup", "/v1/prescriptions/{id}/qr"} <= set(document["paths"])
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            names = {(p["in"], p["name"]) for p in operation.get("parameters", ())}
            assert (method == "post") == (("header", "Idempotency-Key") in names), (method, template)
            assert "401" in operation["responses"]
            assert ("403" in operation["responses"]) == ("x-any-facility" not in operation)
    assert document["paths"]["/v1/fhir"]["post"]["x-operation"] == "fhir.submit"


@pytest_twisted.inlineCallbacks
def test_real_answers_match_the_declared_schemas(door):
    """Answers of each operation, success and failure, validate against the document's schemas."""
    hospital, lab = Client(door, HOSPITAL.id), Client(door, LAB.id)
    document = (yield hospital.get("/v1/openapi.json")).json()
    accepted = yield hospital.post("/v1/hl7v2", hl7("OAS-1"), "application/hl7-v2")
    check(document, "/v1/hl7v2", "post", accepted)
    refused = yield Client(door, PHARMACY.id).post(
        "/v1/hl7v2", hl7("OAS-2", application="PHARMA_AGDAL", facility="PHARM_AGDAL"), "application/hl7-v2")
    check(document, "/v1/hl7v2", "post", refused)
    unsupported = yield hospital.post("/v1/hl7v2", hl7("OAS-3"), "text/csv")
    check(document, "/v1/hl7v2", "post", unsupported)
    stranger = yield Client(door, STRANGER).post("/v1/hl7v2", hl7("OAS-4"), "application/hl7-v2")
    check(document, "/v1/hl7v2", "post", stranger)
    bundle = yield lab.post("/v1/fhir", json.dumps(fhir_bundle()).encode(), "application/fhir+json")
    check(document, "/v1/fhir", "post", bundle)
    invalid = fhir_bundle()
    invalid["entry"][0]["resource"]["gender"] = 7
    invalid = yield lab.post("/v1/fhir", json.dumps(invalid).encode(), "application/fhir+json")
    check(document, "/v1/fhir", "post", invalid)
    not_json = yield lab.post("/v1/fhir", b"[", "application/fhir+json")
    check(document, "/v1/fhir", "post", not_json)
    reused = yield lab.post("/v1/fhir", b"{}", "application/fhir+json", Idempotency_Key="oas")
    other = yield lab.post("/v1/fhir", b"[]", "application/fhir+json", Idempotency_Key="oas")
    check(document, "/v1/fhir", "post", reused)
    check(document, "/v1/fhir", "post", other)
    status = yield lab.get(f"/v1/messages/{bundle.json()['identifier']['value']}")
    check(document, "/v1/messages/{id}", "get", status)
    hl7_status = yield hospital.get(f"/v1/messages/{accepted.json()['message_id']}")
    check(document, "/v1/messages/{id}", "get", hl7_status)
    missing = yield lab.get("/v1/messages/999999")
    check(document, "/v1/messages/{id}", "get", missing)
    forbidden = yield lab.get("/v1/prescriptions/RX1/qr")
    check(document, "/v1/prescriptions/{id}/qr", "get", forbidden)
    assert {a.code for a in (accepted, refused, unsupported, stranger, bundle, invalid, not_json, other,
                             status, missing, forbidden)} == {200, 422, 415, 401, 400, 404, 403}


def test_two_routes_may_not_declare_one_schema_differently():
    """Building the document refuses a schema name declared twice with different content."""
    spec = {"responses": {"200": {"description": "ok"}}}
    first = Route("GET", "/v1/a", "messages.read", lambda r: None, spec, {"Thing": {"type": "string"}})
    second = Route("GET", "/v1/b", "messages.read", lambda r: None, spec, {"Thing": {"type": "integer"}})
    with pytest.raises(SpecConflict):
        openapi_document([first, second])
    assert "Thing" in openapi_document([first, first.__class__(**{**first.__dict__, "template": "/v1/c"})])["components"]["schemas"]

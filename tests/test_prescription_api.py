"""The prescription REST operations, called as the HTTPS door calls them (ApiRequest in,
ApiResponse or Problem out), on a real database through the store's thread pool: look-up by id
and by QR payload with what remains per line, validity (404, 410), the prescriber's QR image,
the published signing key, and OpenAPI operations that validate."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import text
from twisted.internet import defer, reactor

from adapters.hl7v2.ack import AckBuilder
from gateway.config import load_config
from gateway.doors.api import ApiRequest, Problem
from gateway.prescriptions import ids, qr
from gateway.prescriptions.api import SCHEMAS, prescription_routes
from gateway.store.database import Database
from prescription_support import ROOT, DOLIPRANE, FakeEligibility, Harness, config_for, rde, rds


class Service:
    def __init__(self, harness):
        self.database = Database(harness.engine, reactor, 2, name="rx-test")
        self.key = harness.key


@pytest.fixture
def setup(tmp_path, repo_mappings):
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    harness = Harness(url, repo_mappings, config_for(url, tmp_path), FakeEligibility(), AckBuilder())
    [record] = harness.translate(rde("RDE-1"))
    orc = [s for s in record.ack.decode().split("\r") if s.startswith("ORC|")][0]
    nte = [s for s in record.ack.decode().split("\r") if s.startswith("NTE|")][0]
    service = Service(harness)
    service.database.start()
    routes = {(r.method, r.template): r for r in prescription_routes(service)}
    yield harness, routes, orc.split("|")[3].split("^")[0], nte.split("|")[3]
    service.database.stop()


FACILITIES = {s.id: s for s in load_config(os.path.join(ROOT, "conf", "gateway.yaml"), environ={}).senders}


def call(routes, method, template, facility_id="INPE-100004", path_params=None, query=None, body=b""):
    """The route's handler on a request from `facility_id` (default: the pharmacy)."""
    route = routes[(method, template)]
    request = ApiRequest(method, template, path_params or {}, query or {}, {}, body, FACILITIES[facility_id],
                         "127.0.0.1:1", "req-1")
    return defer.maybeDeferred(route.handler, request)


@pytest_twisted.inlineCallbacks
def _problem(d):
    try:
        yield d
    except Problem as problem:
        return problem
    raise AssertionError("no problem raised")


@pytest_twisted.inlineCallbacks
def test_lookup_by_id_returns_the_lines_and_what_remains(setup):
    harness, routes, prescription_id, _ = setup
    harness.translate(rds("RDS-1", prescription_id, ((DOLIPRANE, 1),)))
    response = yield call(routes, "GET", "/v1/prescriptions/{id}",
                          path_params={"id": prescription_id.lower().replace("-", "")})
    assert response.status == 200 and response.content_type == "application/json"
    body = json.loads(response.body)
    assert (body["id"], body["status"], body["prescriber"]) == (
        prescription_id, "active", {"inpe": "200001", "facility": "INPE-200001"})
    assert [(l["line"], l["medication"]["code"], l["quantity"], l["dispensed"], l["remaining"])
            for l in body["lines"]] == [(1, "6118001230068", 2, 1, 1), (2, "6118012345676", 1, 0, 1)]
    assert {"system": "urn:ma:cnie", "value": "BE123456"} in body["patient"]["identifiers"]
    assert response.headers["Cache-Control"] == "no-store"


@pytest_twisted.inlineCallbacks
def test_lookup_by_qr_checks_the_signature(setup):
    harness, routes, prescription_id, payload = setup
    response = yield call(routes, "POST", "/v1/prescriptions/lookup", body=json.dumps({"qr": payload}).encode())
    assert response.status == 200 and json.loads(response.body)["id"] == prescription_id
    tampered = payload[:-3] + ("AAA" if payload[-3:] != "AAA" else "BBB")
    problem = yield _problem(call(routes, "POST", "/v1/prescriptions/lookup",
                                  body=json.dumps({"qr": tampered}).encode()))
    assert (problem.status, problem.slug) == (400, "invalid-qr") and "signature" in problem.detail
    for body in (b"[]", b'{"qr": 3}', b'{"qr": "x", "more": 1}', b"not json", b"[" * 20000 + b"]" * 20000):
        problem = yield _problem(call(routes, "POST", "/v1/prescriptions/lookup", body=body))
        assert problem.status == 400
    assert "too deeply" in problem.detail  # the last: arrays nested 20,000 deep


@pytest_twisted.inlineCallbacks
def test_invalid_prescriptions_are_gone_unknown_and_malformed_ones_not_found_or_bad(setup):
    harness, routes, prescription_id, payload = setup
    problem = yield _problem(call(routes, "GET", "/v1/prescriptions/{id}", path_params={"id": "RX-ABCD"}))
    assert (problem.status, problem.slug) == (400, "bad-prescription-id")
    problem = yield _problem(call(routes, "GET", "/v1/prescriptions/{id}",
                                  path_params={"id": ids.format_id("99999999")}))
    assert problem.status == 404
    for status, slug in (("cancelled", "prescription-cancelled"), ("completed", "prescription-completed")):
        with harness.engine.begin() as connection:
            connection.execute(text("UPDATE prescriptions SET status = :s"), {"s": status})
        problem = yield _problem(call(routes, "GET", "/v1/prescriptions/{id}", path_params={"id": prescription_id}))
        assert (problem.status, problem.slug) == (410, slug)
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE prescriptions SET status = 'active', expires_at = :at"),
                           {"at": datetime.now(timezone.utc) - timedelta(seconds=1)})
    problem = yield _problem(call(routes, "POST", "/v1/prescriptions/lookup",
                                  body=json.dumps({"qr": payload}).encode()))
    assert (problem.status, problem.slug) == (410, "prescription-expired")


@pytest_twisted.inlineCallbacks
def test_qr_image_only_for_the_prescriber(setup):
    _, routes, prescription_id, _ = setup
    png = yield call(routes, "GET", "/v1/prescriptions/{id}/qr", "INPE-200001", {"id": prescription_id})
    assert png.content_type == "image/png" and png.body.startswith(b"\x89PNG")
    svg = yield call(routes, "GET", "/v1/prescriptions/{id}/qr", "INPE-200001", {"id": prescription_id},
                     {"format": ("svg",)})
    assert svg.content_type == "image/svg+xml" and b"<svg" in svg.body
    problem = yield _problem(call(routes, "GET", "/v1/prescriptions/{id}/qr", "INPE-100001", {"id": prescription_id}))
    assert problem.status == 404
    problem = yield _problem(call(routes, "GET", "/v1/prescriptions/{id}/qr", "INPE-200001", {"id": prescription_id},
                                  {"format": ("gif",)}))
    assert problem.status == 400


@pytest_twisted.inlineCallbacks
def test_signing_key_is_published_as_jwk_and_pem(setup):
    harness, routes, _, payload = setup
    response = yield call(routes, "GET", "/v1/prescriptions/signing-key")
    [jwk] = json.loads(response.body)["keys"]
    public = Ed25519PublicKey.from_public_bytes(qr.b64decode(jwk["x"]))
    assert qr.verify(payload, {jwk["kid"]: public}).prescription_id  # offline verification works
    pem = yield call(routes, "GET", "/v1/prescriptions/signing-key", query={"format": ("pem",)})
    assert pem.body.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_routes_and_their_openapi_operations(setup):
    """Four routes with allowed operations; every operation validates inside an OpenAPI 3.1
    document with the schemas they bring."""
    from openapi_spec_validator import validate

    from gateway.config import API_OPERATIONS

    _, routes, _, _ = setup
    assert sorted(routes) == [("GET", "/v1/prescriptions/signing-key"), ("GET", "/v1/prescriptions/{id}"),
                              ("GET", "/v1/prescriptions/{id}/qr"), ("POST", "/v1/prescriptions/lookup")]
    assert {r.operation for r in routes.values()} - {None} <= set(API_OPERATIONS)
    assert routes[("GET", "/v1/prescriptions/signing-key")].operation is None  # any known facility
    assert routes[("GET", "/v1/prescriptions/{id}/qr")].operation == "prescriptions.qr"
    paths: dict = {}
    for (method, template), route in routes.items():
        paths.setdefault(template, {})[method.lower()] = dict(route.spec)
    document = {"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "paths": paths,
                "components": {"schemas": SCHEMAS}}
    validate(document)
    text_form = json.dumps(document)
    for name in SCHEMAS:
        assert f"#/components/schemas/{name}" in text_form or name == "Problem"


@pytest.fixture(scope="module")
def door_pki(tmp_path_factory):
    from doors_support import PKI_NAMES
    from gateway.pki import init_dev_pki

    directory = str(tmp_path_factory.mktemp("signing-key-pki"))
    init_dev_pki(directory, PKI_NAMES)
    return directory


@pytest_twisted.inlineCallbacks
def test_signing_key_is_open_to_every_known_facility_through_the_door(door_pki, tmp_path, repo_mappings,
                                                                       monkeypatch):
    """Over mutual TLS: a hospital (no prescriptions.lookup) reads the signing key, the OpenAPI
    document says so (x-any-facility, no x-operation), the look-up itself stays 403 for it,
    and a certificate that names no facility still gets 401."""
    from doors_support import HOSPITAL, STRANGER, Client, door_config, start_door, stop_door
    from gateway.doors.api import Route
    from gateway.mapping.mapping_set import MappingSet

    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    key_path = str(tmp_path / "signing.key")
    qr.ensure_signing_key(key_path)

    class KeyOnly:
        key = qr.load_signing_key(key_path)
        database = None

    door = yield start_door(door_config(door_pki, f"sqlite:///{tmp_path / 'door.sqlite'}"), door_pki,
                            extra_routes=prescription_routes(KeyOnly()))
    try:
        hospital = Client(door, HOSPITAL.id)
        jwk = yield hospital.get("/v1/prescriptions/signing-key")
        assert jwk.code == 200 and jwk.json()["keys"][0]["kid"] == KeyOnly.key.key_id
        lookup = yield hospital.get("/v1/prescriptions/RX-0000-0000-0")
        assert lookup.code == 403
        stranger = yield Client(door, STRANGER).get("/v1/prescriptions/signing-key")
        assert stranger.code == 401
        document = (yield hospital.get("/v1/openapi.json")).json()
        operation = document["paths"]["/v1/prescriptions/signing-key"]["get"]
        assert operation["x-any-facility"] is True and "x-operation" not in operation
        assert document["paths"]["/v1/prescriptions/{id}"]["get"]["x-operation"] == "prescriptions.lookup"
    finally:
        yield stop_door(door)
    with pytest.raises(ValueError, match="ANY_FACILITY"):
        Route("GET", "/v1/x", "", lambda request: None, {})

"""The REST door over real mutual TLS on loopback, with a real SQLite store and the
repository's mappings: identity by certificate, each operation, problem answers, limits,
idempotency."""
from __future__ import annotations

import json
import socket
import ssl

import pytest
import pytest_twisted
from sqlalchemy import select
from twisted.internet import defer, reactor, task, threads

from doors_support import (HOSPITAL, IMAGING, LAB, PHARMACY, PKI_NAMES, STRANGER, Client,
                           door_config, fhir_bundle, hl7, start_door, stop_door, with_listener)
from gateway.doors.api import ApiResponse, Route, json_response
from gateway.doors.store import api_refusals, api_requests
from gateway.mapping.mapping_set import MappingSet
from gateway.store.schema import messages, translations

HL7 = "application/hl7-v2"
FHIR = "application/fhir+json"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from gateway.pki import init_dev_pki

    directory = str(tmp_path_factory.mktemp("doors-pki"))
    init_dev_pki(directory, PKI_NAMES)
    return directory


@pytest.fixture
def preloaded(repo_mappings, monkeypatch):
    """Translation services get the run's mapping set instead of compiling it again."""
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))


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
                           max_request_size=64 * 1024, request_timeout=0.3)
    running = pytest_twisted.blockon(start_door(config, pki, extra_routes=[_slow_route(), _dispense_route()]))
    yield running
    pytest_twisted.blockon(stop_door(running))


def rows(door, table, *where):
    with door.store.engine.connect() as connection:
        return connection.execute(select(table).where(*where).order_by(table.c.id)).all()


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

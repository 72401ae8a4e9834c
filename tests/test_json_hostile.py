"""Hostile JSON at every door that takes JSON, over real mutual TLS sockets: the REST door's
POST /v1/fhir and its JSON operations (read_json, as the prescription look-up reads its
body), the shared-record sandbox, and `gateway translate` of a file. Whatever two JSON
readers could read differently (a key twice, a BOM, a lone surrogate escape, NaN, numbers a
double or a 64-bit integer cannot hold, another charset) is refused with a precise 4xx that
says what and where; nothing is stored."""
from __future__ import annotations

import json

import pytest
import pytest_twisted

from cli_support import cli, project, write_file  # noqa: F401 (fixtures)
from doors_support import HOSPITAL, LAB, Client, fhir_bundle, rows
from gateway.store.schema import messages, translations
from test_doors_hostile import door  # noqa: F401 (fixture: a door with a 64 KiB limit)
from test_sandbox_record import conditional_patient, entry, observation, start_peer, transaction

FHIR = "application/fhir+json"
BUNDLE = json.dumps(fhir_bundle())  # "resourceType": "Patient" is the first entry's resource
PATIENT = '{"resourceType": "Patient",'


def _bundle(old: str, new: str) -> bytes:
    assert old in BUNDLE
    return BUNDLE.replace(old, new, 1).encode("utf-8")


# (body, words of the detail: the reason and where)
HOSTILE_BUNDLES = {
    "resourceType twice": (_bundle(PATIENT, PATIENT + ' "resourceType": "Observation",'),
                           ['key "resourceType" appears twice', "Bundle.entry[0].resource"]),
    "identifier twice": (_bundle('"identifier": [', '"identifier": [], "identifier": ['),
                         ['key "identifier" appears twice', "Bundle.entry[0].resource"]),
    "type twice at the top": (_bundle('"type": "transaction"', '"type": "collection", "type": "transaction"'),
                              ['Bundle: the key "type" appears twice']),
    "byte order mark": (b"\xef\xbb\xbf" + BUNDLE.encode(), ["byte order mark"]),
    "lone surrogate": (_bundle('"El Amrani"', '"El Amrani\\ud800"'),
                       ["lone UTF-16 surrogate", "Bundle.entry[0].resource.name[0].family"]),
    "NaN": (_bundle("5.4", "NaN"), ["NaN is not a JSON number", "Bundle.entry[1].resource.valueQuantity.value"]),
    "Infinity": (_bundle("5.4", "-Infinity"), ["-Infinity is not a JSON number", "valueQuantity.value"]),
    "overflows a double": (_bundle("5.4", "5.4e400"), ["too large for a double", "valueQuantity.value"]),
    "underflows a double": (_bundle("5.4", "5.4e-400"), ["too small for a double", "valueQuantity.value"]),
    "integer of 30 digits": (_bundle("5.4", "123456789012345678901234567890"),
                             ["more than 18 digits before its decimal point", "valueQuantity.value"]),
    "decimal of 25 places": (_bundle("5.4", "5.4000000000000000000000001"),
                             ["more than 17 digits after its decimal point", "valueQuantity.value"]),
    "trailing garbage": (BUNDLE.encode() + b' {"resourceType": "Bundle"}', ["Extra data", "line 1"]),
}


@pytest.mark.parametrize("name", list(HOSTILE_BUNDLES))
@pytest_twisted.inlineCallbacks
def test_fhir_door_refuses_what_json_readers_read_differently(door, name):
    """Each was taken (a key twice: the last one won; a BOM skipped; NaN, 1e400, 30-digit
    integers read as Python reads them) or refused late as an invalid resource: now a 400
    bad-json naming the reason and where, and nothing stored."""
    body, words = HOSTILE_BUNDLES[name]
    answer = yield Client(door, LAB.id).post("/v1/fhir", body, FHIR)
    assert answer.code == 400, answer.body
    problem = answer.json()
    assert problem["type"].endswith("/bad-json")
    for word in words:
        assert word in problem["detail"], problem["detail"]
    assert "El Amrani" not in problem["detail"]  # values are never echoed
    assert not rows(door, messages)
    fine = yield Client(door, LAB.id).post("/v1/fhir", BUNDLE.encode(), FHIR)
    assert fine.code == 200, fine.body


@pytest_twisted.inlineCallbacks
def test_fhir_door_takes_json_only_as_utf_8(door):
    """A charset other than UTF-8 in the Content-Type was ignored (the body read as UTF-8
    all the same, what a reader that honours the header would not do): now 415; charset=utf-8
    (any case, quoted or not) is accepted."""
    client = Client(door, LAB.id)
    for charset in ("iso-8859-1", "utf-16", "windows-1256"):
        refused = yield client.post("/v1/fhir", BUNDLE.encode(), f"{FHIR}; charset={charset}")
        assert refused.code == 415, (charset, refused.body)
        assert refused.json()["type"].endswith("/unsupported-charset") and charset in refused.json()["detail"]
    assert not rows(door, messages)
    accepted = yield client.post("/v1/fhir", BUNDLE.encode(), f'{FHIR}; charset="UTF-8"')
    assert accepted.code == 200, accepted.body


@pytest.mark.parametrize("body, words", [
    (b'{"qr": "HIE1.a", "qr": "HIE1.b"}', ['$: the key "qr" appears twice']),
    (b'{"qr": "\\udc00"}', ["lone UTF-16 surrogate", "$.qr"]),
    (b'{"qr": NaN}', ["NaN is not a JSON number", "$.qr"]),
    (b'{"n": 1e400}', ["too large for a double", "$.n"]),
    (b'{"n": 12345678901234567890}', ["more than 18 digits", "$.n"]),
    (b'\xef\xbb\xbf{"qr": "x"}', ["byte order mark"]),
], ids=["key twice", "lone surrogate", "NaN", "1e400", "20 digits", "BOM"])
@pytest_twisted.inlineCallbacks
def test_json_operations_refuse_what_json_readers_read_differently(door, body, words):
    """read_json (the prescription look-up's reader) kept the last of two keys, read NaN and
    1e400 as floats and a lone surrogate as a str that fails later: now 400 bad-json saying
    what and where."""
    answer = yield Client(door, HOSPITAL.id).post("/v1/test/echo", body, "application/json")
    assert answer.code == 400, answer.body
    assert answer.json()["type"].endswith("/bad-json")
    for word in words:
        assert word in answer.json()["detail"], answer.json()["detail"]


@pytest_twisted.inlineCallbacks
def test_json_operations_take_json_only_as_utf_8(door):
    """read_json ignored the Content-Type's charset: now 415 for any other than UTF-8."""
    client = Client(door, HOSPITAL.id)
    refused = yield client.post("/v1/test/echo", b'{"qr": "x"}', "application/json; charset=iso-8859-1")
    assert refused.code == 415 and refused.json()["type"].endswith("/unsupported-charset"), refused.body
    fine = yield client.post("/v1/test/echo", b'{"qr": "x"}', "application/json; charset=utf-8")
    assert fine.code == 200 and fine.json() == {"qr": "x"}


# -- the shared-record sandbox ---------------------------------------------------------------

@pytest.fixture
def record(dev_pki, tmp_path):
    peer = start_peer(dev_pki, str(tmp_path / "record.sqlite"))
    yield peer
    pytest_twisted.blockon(peer.stop())


def _transaction_text() -> str:
    return json.dumps(transaction(conditional_patient(), entry(observation("urn:uuid:p-1"), "POST", "Observation")))


@pytest.mark.parametrize("old, new, words", [
    ('"resourceType": "Patient"', '"resourceType": "Patient", "resourceType": "Observation"',
     ['key "resourceType" appears twice', "Bundle.entry[0].resource"]),
    ('"valueQuantity": {"value": 5.2', '"valueQuantity": {"value": 5.2, "value": 7.9',
     ['key "value" appears twice', "Bundle.entry[1].resource.valueQuantity"]),
    ("5.2", "123456789012345678901234567890", ["more than 18 digits", "valueQuantity.value"]),
    ("5.2", "5.2000000000000000000000001", ["more than 17 digits", "valueQuantity.value"]),
], ids=["resourceType twice", "value twice", "integer of 30 digits", "decimal of 25 places"])
@pytest_twisted.inlineCallbacks
def test_record_refuses_what_json_readers_read_differently(record, old, new, words):
    """orjson kept the last of two keys and read a 30-digit integer as a float (both stored):
    now a 400 OperationOutcome naming the key or number and where; nothing stored."""
    text = _transaction_text()
    assert old in text
    reply = yield record.client().post(text.replace(old, new, 1).encode())
    assert reply.code == 400, reply.body
    [issue] = reply.json["issue"]
    for word in words:
        assert word in issue["diagnostics"] + " " + " ".join(issue.get("expression", [])), issue
    assert record.count() == 0


@pytest_twisted.inlineCallbacks
def test_record_takes_json_only_as_utf_8(record):
    """The record read any body as UTF-8 whatever the charset said: now 415."""
    client = record.client()
    refused = yield client.post(_transaction_text().encode(),
                                headers={"Content-Type": "application/fhir+json; charset=iso-8859-1"})
    assert refused.code == 415 and "iso-8859-1" in refused.json["issue"][0]["diagnostics"], refused.body
    fine = yield client.post(_transaction_text().encode(),
                             headers={"Content-Type": "application/fhir+json; charset=utf-8"})
    assert fine.code == 200, fine.body


# -- gateway translate -----------------------------------------------------------------------

def test_translate_refuses_a_bundle_with_a_key_twice(project):
    """`gateway translate` of a FHIR file with a key twice translated the last one: now the
    file is named on stderr with the key and its place, exit 1."""
    path = write_file(project, "twice.json", _bundle('"identifier": [', '"identifier": [], "identifier": ['))
    done = cli(project, "translate", path, "-c", project.config)
    assert done.returncode == 1 and not done.stdout, done.stdout
    assert f"{path}: Bundle.entry[0].resource: the key \"identifier\" appears twice" in done.stderr, done.stderr


@pytest_twisted.inlineCallbacks
def test_fhir_door_keeps_the_precision_of_decimals(door):
    """FHIR R4: 5.40 is not 5.4. The door read a submitted Bundle's decimals as floats, so the
    canonical bundle (and what the shared record receives) said 5.4; now as sent."""
    answer = yield Client(door, LAB.id).post("/v1/fhir", _bundle("5.4", "5.40"), FHIR)
    assert answer.code == 200, answer.body
    [translation] = rows(door, translations)
    bundle = translation.bundle
    assert '"valueQuantity":{"value":5.40,' in (bundle if isinstance(bundle, str) else bytes(bundle).decode())


@pytest_twisted.inlineCallbacks
def test_fhir_door_refuses_a_resource_nested_deeper_than_validation_walks(door):
    """Extensions within extensions 200 deep are JSON the reader takes; validating them ran out
    of Python's stack (RecursionError out of the door). Now a 422 naming the resource, nothing
    stored, and the door goes on."""
    extension = {"url": "urn:x", "valueString": "x"}
    for _ in range(200):
        extension = {"url": "urn:x", "extension": [extension]}
    bundle = fhir_bundle()
    bundle["entry"][0]["resource"]["extension"] = [extension]
    answer = yield Client(door, LAB.id).post("/v1/fhir", json.dumps(bundle).encode(), FHIR)
    assert answer.code == 422, answer.body
    problem = answer.json()
    assert problem["type"].endswith("/invalid-fhir")
    assert problem["detail"] == "Bundle.entry[0].resource: the resource nests too deeply to be validated"
    assert not rows(door, messages)
    fine = yield Client(door, LAB.id).post("/v1/fhir", BUNDLE.encode(), FHIR)
    assert fine.code == 200, fine.body

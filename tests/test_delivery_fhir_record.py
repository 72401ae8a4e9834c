"""Tests for gateway/delivery/fhir_record.py: canonical bundles as FHIR transactions for the
shared record, checked end to end against the real sandbox peer over mutual TLS, and the
classification of every kind of answer."""
from __future__ import annotations

import copy
import json
from io import BytesIO
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from gateway.delivery import fhir_record
from gateway.delivery.fhir_record import (
    classify_response,
    escape_search_value,
    transaction_request,
    transaction_request_for_bundles,
    transaction_request_for_texts,
)
from gateway.delivery.outcome import HttpRequest, HttpResponse
from gateway.mapping.golden import GOLDEN_RECEIVED_AT
from test_sandbox_record import TIMEOUT, RunningPeer, start_peer

pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent
BASE = "https://127.0.0.1:9444/fhir"


@pytest.fixture(scope="module")
def canonical() -> dict[str, dict]:
    """Every golden canonical bundle, with what the golden files leave out restored (the
    Provenance recorded time and mapping policy), so that each is a complete bundle."""
    bundles = {}
    for path in sorted((ROOT / "mappings" / "tests").rglob("*.json")):
        bundle = json.loads(path.read_text(encoding="utf-8"))
        bundle["timestamp"] = GOLDEN_RECEIVED_AT.isoformat()
        for item in bundle["entry"]:
            if item["resource"]["resourceType"] == "Provenance":
                item["resource"].update(recorded=GOLDEN_RECEIVED_AT.isoformat(),
                                        policy=["urn:ma:hie:mappings:golden"])
        bundles[path.stem] = bundle
    return bundles


@pytest.fixture
def running(dev_pki, tmp_path):
    peer = start_peer(dev_pki, str(tmp_path / "record.sqlite"))
    yield peer
    pytest_twisted.blockon(peer.stop())


@defer.inlineCallbacks
def send(running: RunningPeer, request: HttpRequest):
    """Send an adapter-built request to the peer as the gateway; the answer as an HttpResponse."""
    client = running.clients[0] if running.clients else running.client()
    url = request.url.replace(BASE, client.base + "/fhir")
    response = yield client.agent.request(
        request.method.encode(), url.encode(),
        Headers({name: [value] for name, value in request.headers.items()}),
        FileBodyProducer(BytesIO(request.body)),
    ).addTimeout(TIMEOUT, reactor)
    body = yield readBody(response)
    headers = {name.decode().lower(): values[0].decode() for name, values in response.headers.getAllRawHeaders()}
    return HttpResponse(response.code, headers, body)


def business_identifier(resource: dict) -> tuple[str, str] | None:
    """The first identifier with a system and a value, one minted for a sender's own number
    (urn:ma:hie:local:...) only if there is no other."""
    found = [(identifier["system"], identifier["value"]) for identifier in resource.get("identifier") or ()
             if identifier.get("system") and identifier.get("value")]
    national = [pair for pair in found if not pair[0].startswith("urn:ma:hie:local:")]
    return (national or found or [None])[0]


# -- the request -----------------------------------------------------------------------------

def test_request_shape_for_a_lab_result(canonical):
    """Identified resources become conditional updates on their first system identifier,
    without their id (R4 refuses one that is not the match's); others PUT by id; references
    stay urn:uuid."""
    bundle = canonical["lab-value-types"]
    original = copy.deepcopy(bundle)
    request = transaction_request(bundle, base_url=BASE + "/", idempotency_key="msg-42|record")
    assert bundle == original  # the canonical bundle is left as it was
    assert (request.method, request.url) == ("POST", BASE)
    assert request.headers == {"Content-Type": "application/fhir+json; charset=utf-8",
                               "Accept": "application/fhir+json", "Idempotency-Key": "msg-42|record"}
    sent = json.loads(request.body)
    assert sent["resourceType"] == "Bundle" and sent["type"] == "transaction"
    assert [item["fullUrl"] for item in sent["entry"]] == [item["fullUrl"] for item in bundle["entry"]]
    urls = {item["fullUrl"]: item["request"]["url"] for item in sent["entry"]}
    patient_id = bundle["entry"][0]["resource"]["id"]
    assert urls[f"urn:uuid:{patient_id}"] == "Patient?identifier=urn:ma:cnie|AB123456"
    for item, canonical_entry in zip(sent["entry"], bundle["entry"]):
        resource = item["resource"]
        assert item["request"]["method"] == "PUT"
        if business_identifier(resource) is None:
            assert item["request"]["url"] == f"{resource['resourceType']}/{resource['id']}"
            assert resource == canonical_entry["resource"]
        else:
            assert item["request"]["url"].startswith(resource["resourceType"] + "?identifier=")
            assert resource == {key: value for key, value in canonical_entry["resource"].items() if key != "id"}
    assert any("id" not in item["resource"] for item in sent["entry"])
    observation = next(item["resource"] for item in sent["entry"] if item["resource"]["resourceType"] == "Observation")
    assert observation["subject"] == {"reference": f"urn:uuid:{patient_id}"}


def test_a_patient_goes_by_its_cnie_and_by_its_hospital_number_only_without_one(canonical):
    """The CNIE, not the hospital's medical record number (a system the gateway minted), is
    the condition of a Patient that has both; one known by its number alone goes by it; a
    merge's retired Patient goes by its number, never as the survivor (`identifier:not` the
    survivor's CNIE), by the bundles' path and by the stored texts' path alike."""
    from gateway.store.translations import bundle_text

    mr = "urn:ma:hie:local:unknown:CHUIR:MR"
    cases = {"a01-admission": {"Patient?identifier=urn:ma:cnie|BE123456"},
             "a28-add-person-newborn": {f"Patient?identifier={mr}|123999"},
             "a40-merge": {"Patient?identifier=urn:ma:cnie|BE123456",
                           f"Patient?identifier={mr}|987654&identifier:not=urn:ma:cnie|BE123456"},
             "a47-change-identifier": {"Patient?identifier=urn:ma:cnie|BE123456",
                                       f"Patient?identifier={mr}|123456&identifier:not=urn:ma:cnie|BE123456"}}
    for name, expected in cases.items():
        request = transaction_request(canonical[name], base_url=BASE, idempotency_key="k")
        urls = {item["request"]["url"] for item in json.loads(request.body)["entry"]
                if item["resource"]["resourceType"] == "Patient"}
        assert urls == expected, name
        assert transaction_request_for_texts([bundle_text(canonical[name])], base_url=BASE,
                                             idempotency_key="k").body == request.body
    # In a batch, the survivor named by another message's bundle is looked for there too.
    merge = canonical["a40-merge"]
    retired = [item for item in merge["entry"] if item["resource"].get("active") is False]
    alone = {**merge, "entry": retired}
    urls = [item["request"]["url"] for item in json.loads(transaction_request_for_bundles(
        [canonical["a01-admission"], alone], base_url=BASE, idempotency_key="k").body)["entry"]
        if item["resource"]["resourceType"] == "Patient"]
    assert urls == ["Patient?identifier=urn:ma:cnie|BE123456",
                    f"Patient?identifier={mr}|987654&identifier:not=urn:ma:cnie|BE123456"]


def test_a_retired_patient_goes_by_what_is_its_own_and_is_left_out_when_it_has_nothing(canonical):
    """A merge's retired Patient that also carries its survivor's CNIE goes by its own number
    (`:not` the survivor); one that carries the survivor's identifiers alone is the survivor's
    Patient at the record: left out, the survivor's link to it dropped, every other reference
    to it (the Provenance's) made to the survivor."""
    merge = copy.deepcopy(canonical["a40-merge"])
    survivor, retired = (item for item in merge["entry"] if item["resource"]["resourceType"] == "Patient")
    cnie = next(i for i in survivor["resource"]["identifier"] if i.get("system") == "urn:ma:cnie")
    mr = retired["resource"]["identifier"][0]["system"]
    retired["resource"]["identifier"].append(copy.deepcopy(cnie))
    sent = json.loads(transaction_request(merge, base_url=BASE, idempotency_key="k").body)
    assert [item["request"]["url"] for item in sent["entry"] if item["resource"]["resourceType"] == "Patient"] == [
        "Patient?identifier=urn:ma:cnie|BE123456",
        f"Patient?identifier={mr}|987654&identifier:not=urn:ma:cnie|BE123456"]

    retired["resource"]["identifier"] = [copy.deepcopy(cnie)]
    body = transaction_request(merge, base_url=BASE, idempotency_key="k").body
    sent = json.loads(body)
    patients = [item for item in sent["entry"] if item["resource"]["resourceType"] == "Patient"]
    assert [item["request"]["url"] for item in patients] == ["Patient?identifier=urn:ma:cnie|BE123456"]
    assert "link" not in patients[0]["resource"]
    assert retired["fullUrl"].encode() not in body
    provenance = next(item["resource"] for item in sent["entry"] if item["resource"]["resourceType"] == "Provenance")
    assert {target["reference"] for target in provenance["target"]} == {survivor["fullUrl"]}
    assert transaction_request_for_texts([json.dumps(merge)], base_url=BASE, idempotency_key="k").body == body


def test_request_body_is_utf8_with_text_intact(canonical):
    """French and Arabic text travel as UTF-8, not as escapes."""
    bundle = copy.deepcopy(canonical["a01-admission"])
    bundle["entry"][0]["resource"]["name"] = [{"family": "Benhaddou", "given": ["Hélène"], "text": "هيلين"}]
    body = transaction_request(bundle, base_url=BASE, idempotency_key="k").body
    assert "Hélène".encode() in body and "هيلين".encode() in body


def test_identifier_values_are_escaped_for_the_search_url():
    """|, comma, $, backslash, & and spaces in a system or value cannot break the conditional URL."""
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{
        "fullUrl": "urn:uuid:x", "resource": {"resourceType": "Patient", "id": "x",
                                              "identifier": [{"system": "urn:ma:cnie", "value": "A|B,C$D&E F\\G"}]}}]}
    sent = json.loads(transaction_request(bundle, base_url=BASE, idempotency_key="k").body)
    assert sent["entry"][0]["request"]["url"] == \
        "Patient?identifier=urn:ma:cnie|" + quote("A\\|B\\,C\\$D&E F\\\\G", safe="")
    assert escape_search_value("urn:ma:cnie") == "urn:ma:cnie"


def test_identifier_without_system_or_value_is_not_a_condition():
    """A resource whose identifiers lack a system (or a value) is addressed by its id."""
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{
        "fullUrl": "urn:uuid:e", "resource": {"resourceType": "Encounter", "id": "e", "identifier": [
            {"value": "V1"}, {"system": "urn:x"}, {"system": "", "value": "V2"}]}}]}
    sent = json.loads(transaction_request(bundle, base_url=BASE, idempotency_key="k").body)
    assert sent["entry"][0]["request"]["url"] == "Encounter/e"


def test_stored_texts_give_the_same_request_as_the_bundles(canonical):
    """The outbox's form (each bundle as its stored JSON text, resources copied unread) gives
    byte for byte the request built from the bundles themselves: for every golden bundle at
    once, with text that is not ASCII, with single and odd identifiers, a null fullUrl, a
    number as id; and what cannot be built (a resource without an id, an entry without a
    resource) fails the same way."""
    from gateway.store.translations import bundle_text

    odd = {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p", "name": [{"text": "هيلين Hélène"}],
                                                "identifier": {"system": "urn:ma:cnie", "value": "A|B"}}},
        {"resource": {"resourceType": "Encounter", "id": "e", "identifier": [{"value": "V1"}, 7]}},
        {"fullUrl": None, "resource": {"resourceType": "Basic", "id": 12, "identifier": []}},
        {"fullUrl": "urn:uuid:q", "resource": {"resourceType": "Basic", "id": "q", "n": 1.5e-07, "big": 2 ** 40}}]}
    odd["entry"] += [  # conditional updates with an id that is not plain text
        {"fullUrl": "urn:uuid:s", "resource": {"resourceType": "Patient", "id": 'sé\\"', "identifier": [
            {"system": "urn:x", "value": "S"}]}},
        {"fullUrl": "urn:uuid:n", "resource": {"resourceType": "Basic", "id": 13, "identifier": [
            {"system": "urn:x", "value": "N"}]}}]
    # an id after the identifiers: the copying path does not find it, the parsing path drops it
    reordered = {"resourceType": "Bundle", "entry": [{"fullUrl": "urn:uuid:r", "resource": {
        "resourceType": "Patient", "identifier": [{"system": "urn:ma:cnie", "value": "R1"}], "id": "r"}}]}
    no_id = {"resourceType": "Bundle", "entry": [{"fullUrl": "urn:uuid:z", "resource": {"resourceType": "Basic"}}]}
    empty = {"resourceType": "Bundle", "type": "collection"}
    for bundles in (list(canonical.values()), [odd], [empty, odd, empty], [], [reordered], [odd, reordered]):
        texts = [bundle_text(bundle) for bundle in bundles]
        expected = transaction_request_for_bundles(bundles, base_url=BASE, idempotency_key="k")
        assert transaction_request_for_texts(texts, base_url=BASE, idempotency_key="k") == expected
        assert transaction_request_for_texts([t.encode() for t in texts], base_url=BASE,
                                             idempotency_key="k") == expected
        for item in json.loads(expected.body)["entry"]:  # a conditional update names no id
            assert ("id" in item["resource"]) == ("?" not in item["request"]["url"]), item
    # The golden bundles and the odd ones are copied, not parsed (what the copying path is for),
    # but for a merge's (a Patient with links), which takes the parsing path.
    merges = {name for name, bundle in canonical.items() if any(
        item["resource"]["resourceType"] == "Patient" and "link" in item["resource"] for item in bundle["entry"])}
    assert {"a40-merge", "a47-change-identifier"} <= merges
    for bundles in ([bundle for name, bundle in canonical.items() if name not in merges], [odd]):
        expected = transaction_request_for_bundles(bundles, base_url=BASE, idempotency_key="k")
        assert fhir_record._copied_entries([bundle_text(b) for b in bundles]) == (expected.body, expected.entries)
    with pytest.raises(fhir_record._Unusual):
        fhir_record._copied_entries([bundle_text(canonical["a40-merge"])])
    # What the bundles' path refuses, the texts' path refuses the same way.
    for bundle in (no_id, {"entry": [{"fullUrl": "x"}]}):
        with pytest.raises(KeyError):
            transaction_request_for_bundles([bundle], base_url=BASE, idempotency_key="k")
        with pytest.raises(KeyError):
            transaction_request_for_texts([bundle_text(odd), bundle_text(bundle)], base_url=BASE,
                                          idempotency_key="k")


# -- end to end with the real peer -------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_every_golden_case_is_accepted_and_searchable(canonical, running):
    """Each golden canonical bundle, as built by the adapter, is delivered over mTLS; its Patient is found by identifier and its Observations by subject."""
    searched_observations = 0
    for name, bundle in canonical.items():
        request = transaction_request(bundle, base_url=BASE, idempotency_key=f"{name}|record")
        response = yield send(running, request)
        outcome = classify_response(response)
        assert outcome.kind == "delivered", (name, outcome.reason, response.body[:500])
        stored_ids = [item["response"]["location"].split("/")[1] for item in json.loads(response.body)["entry"]]
        patients = [(resource, stored) for resource, stored in
                    zip((item["resource"] for item in bundle["entry"]), stored_ids)
                    if resource["resourceType"] == "Patient"]
        if not patients:
            continue
        patient, patient_id = patients[0]
        identifier = business_identifier(patient)
        client = running.clients[0]
        if identifier is not None:
            query = f"{escape_search_value(identifier[0])}|{escape_search_value(identifier[1])}"
            found = yield client.get(f"/fhir/Patient?identifier={query}")
            assert found.json["total"] == 1 and found.json["entry"][0]["resource"]["id"] == patient_id, name
        else:
            value = patient["identifier"][0]["value"]
            found = yield client.get(f"/fhir/Patient?identifier={escape_search_value(value)}")
            assert patient_id in {item["resource"]["id"] for item in found.json["entry"]}, name
        observation_ids = {item["resource"]["id"] for item in bundle["entry"]
                           if item["resource"]["resourceType"] == "Observation"}
        if observation_ids:
            found = yield client.get(f"/fhir/Observation?subject=Patient/{patient_id}")
            assert observation_ids <= {item["resource"]["id"] for item in found.json["entry"]}, name
            searched_observations += len(observation_ids)
    assert searched_observations >= 30


@pytest_twisted.inlineCallbacks
def test_redelivery_keeps_one_copy(canonical, running):
    """The same request sent twice (a retry with its key) and again under a new key leaves the same rows."""
    bundle = canonical["bench-oru-20-obx"]
    request = transaction_request(bundle, base_url=BASE, idempotency_key="oru|record")
    first = yield send(running, request)
    rows = running.count()
    retried = yield send(running, request)
    assert retried.body == first.body and running.count() == rows == len(bundle["entry"])
    replayed = yield send(running, transaction_request(bundle, base_url=BASE, idempotency_key="oru|replay"))
    assert classify_response(replayed).kind == "delivered"
    assert {item["response"]["status"] for item in json.loads(replayed.body)["entry"]} == {"200 OK"}
    assert running.count() == rows


@pytest_twisted.inlineCallbacks
def test_several_bundles_in_one_transaction(canonical, running):
    """Batched bundles (two for one patient, one for another) are delivered together and leave
    one Patient each."""
    bundles = [canonical["a01-admission"], canonical["a08-update"], canonical["lab-value-types"]]
    request = transaction_request_for_bundles(bundles, base_url=BASE, idempotency_key="batch-1")
    response = yield send(running, request)
    outcome = classify_response(response, request)
    assert outcome.kind == "delivered"
    # The Patient the three carry (and the admission's encounter the update carries again) goes once.
    distinct = {entry["fullUrl"] for bundle in bundles for entry in bundle["entry"]}
    assert request.entries == len(distinct) < sum(len(b["entry"]) for b in bundles)
    assert outcome.reason == f"delivered ({len(distinct)} entries)"
    found = yield running.client().get("/fhir/Patient")
    assert found.json["total"] == 2


def test_a_resource_several_batched_bundles_carry_goes_once_as_the_last_has_it(canonical):
    """Two messages of one patient in one request each carry its Patient under one fullUrl
    (ids are deterministic): FHIR allows a fullUrl once in a bundle, and a transaction whose
    entries resolve to one resource fails. The Patient goes once, in the place of its first
    entry, as the later message has it; both paths build the same bytes."""
    from gateway.store.translations import bundle_text

    def message(family: str, observation: str) -> dict:
        return {"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:p", "resource": {"resourceType": "Patient", "id": "p", "name": [{"family": family}],
                                                   "identifier": [{"system": "urn:ma:cnie", "value": "BE1"}]}},
            {"fullUrl": f"urn:uuid:{observation}", "resource": {
                "resourceType": "Observation", "id": observation, "subject": {"reference": "urn:uuid:p"}}}]}

    bundles = [message("BENALI", "o1"), message("BENALI-ALAOUI", "o2")]
    request = transaction_request_for_bundles(bundles, base_url=BASE, idempotency_key="k")
    sent = json.loads(request.body)["entry"]
    assert [e["fullUrl"] for e in sent] == ["urn:uuid:p", "urn:uuid:o1", "urn:uuid:o2"] and request.entries == 3
    assert sent[0]["resource"]["name"] == [{"family": "BENALI-ALAOUI"}]
    texts = [bundle_text(bundle) for bundle in bundles]
    assert transaction_request_for_texts(texts, base_url=BASE, idempotency_key="k") == request
    # The parsing path (a bundle the copying path does not read) gives the same.
    odd = {"resourceType": "Bundle", "entry": [{"fullUrl": "urn:uuid:x", "resource": {"resourceType": "Basic", "id": "x"}},
                                               {"fullUrl": 7, "resource": {"resourceType": "Basic", "id": "y"}}]}
    mixed = transaction_request_for_texts(texts + [bundle_text(odd)], base_url=BASE, idempotency_key="k")
    assert mixed == transaction_request_for_bundles(bundles + [odd], base_url=BASE, idempotency_key="k")
    assert mixed.entries == 5 and json.loads(mixed.body)["entry"][0]["resource"]["name"] == [{"family": "BENALI-ALAOUI"}]


def hospital_message(hospital: str, observation: str, performer: bool = False) -> dict:
    """A hospital's message about the person of CNIE BE1: its own Patient id (from its own
    number), and an Observation of them (`performer`: naming them a second time)."""
    patient = f"p-{hospital}"
    result = {"resourceType": "Observation", "id": observation, "status": "final",
              "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
              "subject": {"reference": f"urn:uuid:{patient}"}}
    if performer:
        result["performer"] = [{"reference": f"urn:uuid:{patient}"}]
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": f"urn:uuid:{patient}", "resource": {
            "resourceType": "Patient", "id": patient, "name": [{"family": hospital}],
            "identifier": [{"value": f"MR-{hospital}"}, {"system": "urn:ma:cnie", "value": "BE1"}]}},
        {"fullUrl": f"urn:uuid:{observation}", "resource": result}]}


def test_one_person_from_two_hospitals_in_one_request_goes_once_references_following(canonical):
    """Each hospital's Patient has its own id (from its own number) but both update
    `Patient?identifier=urn:ma:cnie|BE1`: two entries resolving to one resource fail a
    conformant record's transaction (R4 http 3.1.0.11.2), every message of the request a dead
    letter, again at each replay. The later goes once, in the earlier's place, and what named
    the earlier's fullUrl names it; both paths build the same bytes."""
    from gateway.store.translations import bundle_text

    bundles = [hospital_message("chu", "o1", performer=True), hospital_message("lab", "o2", performer=True),
               hospital_message("chu", "o3", performer=True)]
    request = transaction_request_for_bundles(bundles, base_url=BASE, idempotency_key="k")
    sent = json.loads(request.body)["entry"]
    assert [e["fullUrl"] for e in sent] == ["urn:uuid:p-chu", "urn:uuid:o1", "urn:uuid:o2", "urn:uuid:o3"]
    assert request.entries == 4 and sent[0]["resource"]["name"] == [{"family": "chu"}]  # the last one's
    assert [e["request"]["url"] for e in sent][0] == "Patient?identifier=urn:ma:cnie|BE1"
    assert "id" not in sent[0]["resource"]  # neither hospital's: the record's
    assert {e["resource"]["subject"]["reference"] for e in sent[1:]} == {"urn:uuid:p-chu"}
    assert {e["resource"]["performer"][0]["reference"] for e in sent[1:]} == {"urn:uuid:p-chu"}
    texts = [bundle_text(bundle) for bundle in bundles]
    assert transaction_request_for_texts(texts, base_url=BASE, idempotency_key="k") == request
    two = transaction_request_for_bundles(bundles[:2], base_url=BASE, idempotency_key="k")
    assert [e["fullUrl"] for e in json.loads(two.body)["entry"]] == ["urn:uuid:p-lab", "urn:uuid:o1", "urn:uuid:o2"]
    assert {e["resource"]["subject"]["reference"] for e in json.loads(two.body)["entry"][1:]} == {"urn:uuid:p-lab"}
    assert transaction_request_for_texts(texts[:2], base_url=BASE, idempotency_key="k") == two


@pytest_twisted.inlineCallbacks
def test_one_person_from_two_hospitals_is_one_patient_at_the_record(running):
    """The second hospital's Patient (another id, the same CNIE) is accepted and updates the
    one Patient the first created: a conformant record refuses a conditional update whose id
    is not its match's (R4 http.html#cond-update). The record names the Patient; both
    hospitals' Observations are of it, in separate requests and batched."""
    from gateway.store.translations import bundle_text

    chu, lab = hospital_message("chu", "o1"), hospital_message("lab", "o2")
    for number, bundle in enumerate((chu, lab)):
        request = transaction_request(bundle, base_url=BASE, idempotency_key=f"k{number}")
        response = yield send(running, request)
        assert classify_response(response, request).kind == "delivered", response.body
    client = running.clients[0]
    found = yield client.get("/fhir/Patient?identifier=urn:ma:cnie|BE1")
    assert found.json["total"] == 1
    stored = found.json["entry"][0]["resource"]
    assert stored["name"] == [{"family": "lab"}] and stored["meta"]["versionId"] == "2"
    assert stored["id"] not in ("p-chu", "p-lab")  # the record's, not a hospital's
    batched = transaction_request_for_texts([bundle_text(hospital_message("chu", "o3")), bundle_text(lab)],
                                            base_url=BASE, idempotency_key="k2")
    response = yield send(running, batched)
    assert classify_response(response, batched).kind == "delivered", response.body
    found = yield client.get("/fhir/Patient?identifier=urn:ma:cnie|BE1")
    assert [item["resource"]["id"] for item in found.json["entry"]] == [stored["id"]]
    observations = yield client.get(f"/fhir/Observation?subject=Patient/{stored['id']}")
    assert {item["resource"]["id"] for item in observations.json["entry"]} == {"o1", "o2", "o3"}


@pytest_twisted.inlineCallbacks
def test_invalid_bundle_is_a_permanent_failure_with_a_located_reason(canonical, running):
    """A resource the peer rejects makes a permanent outcome whose reason names the element, not the value."""
    bundle = copy.deepcopy(canonical["a01-admission"])
    bundle["entry"][0]["resource"]["birthDate"] = "1985-13-45"
    response = yield send(running, transaction_request(bundle, base_url=BASE, idempotency_key="bad"))
    outcome = classify_response(response)
    assert outcome.kind == "permanent" and outcome.response is response
    assert outcome.reason.startswith("HTTP 422: value at Bundle.entry[0].resource.birthDate")
    assert "1985-13-45" not in outcome.reason and running.count() == 0


@pytest_twisted.inlineCallbacks
def test_peer_faults_are_transient(canonical, running):
    """An injected 503 from the peer is a transient outcome; the retry is delivered."""
    client = running.client()
    yield client.request("PUT", "/_sandbox/faults", b'{"mode": "http_503", "count": 1}')
    request = transaction_request(canonical["a28-add-person-newborn"], base_url=BASE, idempotency_key="k")
    first = yield send(running, request)
    assert classify_response(first).kind == "transient"
    assert classify_response(first).reason == "HTTP 503: transient: sandbox fault injected"
    second = yield send(running, request)
    assert classify_response(second).kind == "delivered"


# -- classification ----------------------------------------------------------------------------

def outcome_body(*issues: tuple) -> bytes:
    return json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": code, "diagnostics": text, **({"expression": [where]} if where else {})}
        for code, text, where in issues]}).encode()


def response_bundle(*statuses: str, kind: str = "transaction-response") -> bytes:
    return json.dumps({"resourceType": "Bundle", "type": kind,
                       "entry": [{"response": {"status": status}} for status in statuses]}).encode()


CLASSIFIED = [
    # (code, body, kind, reason)
    (200, response_bundle("201 Created", "200 OK"), "delivered", "delivered (2 entries)"),
    (200, response_bundle(), "delivered", "delivered (0 entries)"),
    (200, b'{"resourceType":"Bundle","type":"transaction-response","entry":null}', "delivered",
     "delivered (0 entries)"),
    (200, b'{"resourceType":"Bundle","type":"transaction-response","entry":[null]}', "permanent",
     "entry 0 not stored: None"),
    (200, b'{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":null}]}', "permanent",
     "entry 0 not stored: None"),
    (200, b'{"resourceType":"Bundle","type":"transaction-response","entry":[{"response":{"status":201}}]}',
     "permanent", "entry 0 not stored: 201"),
    (200, b'{"resourceType":"Bundle","type":"transaction-response","entry":{"response":{"status":"200"}}}',
     "permanent", "unexpected answer: entry is not a list"),
    (200, response_bundle("201 Created", "412 Precondition Failed"), "permanent",
     "entry 1 not stored: '412 Precondition Failed'"),
    (200, response_bundle("201", kind="batch-response"), "permanent",
     "unexpected answer: HTTP 200 Bundle, not a transaction-response"),
    (200, outcome_body(("informational", "all ok", None)), "permanent",
     "unexpected answer: HTTP 200 OperationOutcome, not a transaction-response"),
    (200, b"<html>proxy login</html>", "permanent", "unexpected answer: HTTP 200 body is not JSON"),
    (201, b"[1, 2]", "permanent", "unexpected answer: HTTP 201 list, not a transaction-response"),
    (408, b"", "transient", "HTTP 408"),
    (429, b"slow down", "transient", "HTTP 429"),
    (500, outcome_body(("exception", "internal error", None)), "transient", "HTTP 500: exception: internal error"),
    (502, b"<html>bad gateway</html>", "transient", "HTTP 502"),
    (503, outcome_body(("transient", "sandbox fault injected", None)), "transient",
     "HTTP 503: transient: sandbox fault injected"),
    (400, outcome_body(("structure", "the body is not JSON (line 1, column 2)", None)), "permanent",
     "HTTP 400: structure: the body is not JSON (line 1, column 2)"),
    (403, outcome_body(("forbidden", "client 'X' is not allowed", None)), "permanent",
     "HTTP 403: forbidden: client 'X' is not allowed"),
    (404, b"not found", "permanent", "HTTP 404"),
    (412, outcome_body(("multiple-matches", "the condition matches several resources", "Bundle.entry[0].request.url")),
     "permanent", "HTTP 412: multiple-matches at Bundle.entry[0].request.url: the condition matches several resources"),
    (422, outcome_body(("required", "Field required", "Bundle.entry[1].resource.code"),
                       ("value", "Input should be a valid string", "Bundle.entry[2].resource.id")), "permanent",
     "HTTP 422: required at Bundle.entry[1].resource.code: Field required; "
     "value at Bundle.entry[2].resource.id: Input should be a valid string"),
    (301, b"", "permanent", "HTTP 301"),
]


@pytest.mark.parametrize("code, body, kind, reason", CLASSIFIED)
def test_classify_response(code, body, kind, reason):
    """Every kind of answer gets its outcome kind and a short reason."""
    response = HttpResponse(code, {"content-type": "application/fhir+json"}, body)
    outcome = classify_response(response)
    assert (outcome.kind, outcome.reason) == (kind, reason)
    assert outcome.response is response


def test_reason_is_short():
    """A long OperationOutcome makes a reason of at most 200 characters."""
    body = outcome_body(*[("value", "x" * 100, f"Bundle.entry[{n}].resource") for n in range(50)])
    outcome = classify_response(HttpResponse(422, {}, body))
    assert outcome.kind == "permanent" and len(outcome.reason) <= 200 and outcome.reason.endswith("...")

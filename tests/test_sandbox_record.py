"""Tests for the reference shared-record peer (gateway/sandbox/record): a FHIR R4 REST subset
over mutual TLS with its own SQLite store, exercised over real TLS sockets on free ports."""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from gateway.sandbox.record import RecordPeer, listen_record_peer
from gateway.tls import client_tls_options, server_tls_options

TIMEOUT = 5
# Twisted's HTTP/1.1 client over TLS trips this warning inside readBody; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")
CNIE = "urn:ma:cnie"
LOINC = "http://loinc.org"


# -- helpers shared with tests/test_delivery_fhir_record.py ---------------------------------

@implementer(IPolicyForHTTPS)
class _FixedPolicy:
    def __init__(self, options):
        self.options = options

    def creatorForNetloc(self, hostname, port):
        return self.options


@dataclass
class Reply:
    code: int
    headers: Headers
    body: bytes
    length: object = None  # the length announced (Content-Length), else twisted's UNKNOWN_LENGTH

    @property
    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None


class RecordClient:
    """An HTTPS client with a client certificate (`name` from the dev PKI, or None)."""

    def __init__(self, pki_dir: str, port: int, name: str | None = "gateway"):
        ca = os.path.join(pki_dir, "ca.crt")
        cert = os.path.join(pki_dir, f"{name}.crt") if name else None
        key = os.path.join(pki_dir, f"{name}.key") if name else None
        self.base = f"https://127.0.0.1:{port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent(reactor, contextFactory=_FixedPolicy(client_tls_options(ca, "127.0.0.1", cert, key)),
                           pool=self.pool, connectTimeout=TIMEOUT)

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        from twisted.web.client import FileBodyProducer
        from io import BytesIO
        all_headers = {"Content-Type": "application/fhir+json"} if body is not None else {}
        all_headers.update(headers or {})
        response = yield self.agent.request(
            method.encode(), (self.base + path).encode(),
            Headers({name: [value] for name, value in all_headers.items()}),
            FileBodyProducer(BytesIO(body)) if body is not None else None,
        ).addTimeout(TIMEOUT, reactor)
        content = yield readBody(response)
        return Reply(response.code, response.headers, content, response.length)

    def get(self, path: str):
        return self.request("GET", path)

    def post(self, document, key: str | None = None, headers: dict | None = None):
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        extra = dict(headers or {})
        if key is not None:
            extra["Idempotency-Key"] = key
        return self.request("POST", "/fhir", body, extra)

    def close(self):
        return self.pool.closeCachedConnections()


class RunningPeer:
    """A RecordPeer listening over TLS on a free port, restartable on the same store file."""

    def __init__(self, pki_dir: str, store_path: str, **options):
        self.pki_dir = pki_dir
        self.store_path = store_path
        self.options = options
        self.clients: list[RecordClient] = []
        self.start()

    def start(self):
        self.peer = RecordPeer(self.store_path, reactor=reactor, **self.options)
        pki = self.pki_dir
        tls = server_tls_options(os.path.join(pki, "sandbox-record.crt"), os.path.join(pki, "sandbox-record.key"),
                                 os.path.join(pki, "ca.crt"), require_client_cert=True)
        self.port = listen_record_peer(reactor, self.peer, 0, "127.0.0.1", tls)
        self.port_number = self.port.getHost().port

    @defer.inlineCallbacks
    def stop(self):
        for client in self.clients:
            yield client.close()
        self.clients = []
        yield self.port.stopListening()
        yield self.peer.close()

    def client(self, name: str | None = "gateway") -> RecordClient:
        client = RecordClient(self.pki_dir, self.port_number, name)
        self.clients.append(client)
        return client

    def count(self, table: str = "resources", resource_type: str | None = None) -> int:
        """Rows in the store, read through a separate SQLite connection."""
        with sqlite3.connect(self.store_path) as db:
            if resource_type is None:
                return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            return db.execute(f"SELECT count(*) FROM {table} WHERE type = ?", (resource_type,)).fetchone()[0]


def start_peer(dev_pki: str, store_path: str, **options) -> RunningPeer:
    return RunningPeer(dev_pki, store_path, **options)


# -- fixtures and builders -------------------------------------------------------------------

@pytest.fixture
def running(dev_pki, tmp_path):
    peer = start_peer(dev_pki, str(tmp_path / "record.sqlite"))
    yield peer
    pytest_twisted.blockon(peer.stop())


@pytest.fixture
def client(running) -> RecordClient:
    return running.client()


def patient(cnie: str = "AB123456", family: str = "Benali", **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": CNIE, "value": cnie}],
            "name": [{"family": family, "given": ["Amina"]}], "gender": "female", **extra}


def observation(subject: str, loinc: str = "2093-3", value: float = 5.2, **extra) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": loinc}]},
            "subject": {"reference": subject}, "valueQuantity": {"value": value, "unit": "mmol/L"}, **extra}


def entry(resource: dict, method: str, url: str, full_url: str | None = None, **request) -> dict:
    item = {"resource": resource, "request": {"method": method, "url": url, **request}}
    if full_url:
        item["fullUrl"] = full_url
    return item


def transaction(*entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def conditional_patient(cnie: str = "AB123456", full_url: str = "urn:uuid:p-1", **extra) -> dict:
    return entry(patient(cnie, **extra), "PUT", f"Patient?identifier={CNIE}|{cnie}", full_url)


def statuses(reply: Reply) -> list[str]:
    return [item["response"]["status"] for item in reply.json["entry"]]


def locations(reply: Reply) -> list[str]:
    return [item["response"]["location"] for item in reply.json["entry"]]


def issue(reply: Reply, number: int = 0) -> dict:
    assert reply.json["resourceType"] == "OperationOutcome", reply.body
    return reply.json["issue"][number]


# -- transactions --------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_transaction_creates_and_resolves_urn_uuid_references(client):
    """A transaction creates its resources and rewrites every urn:uuid reference to the stored Type/id."""
    reply = yield client.post(transaction(
        entry(observation("urn:uuid:p-1"), "POST", "Observation", "urn:uuid:o-1"),
        conditional_patient(),
        entry({"resourceType": "Provenance", "recorded": "2026-01-15T09:30:00Z",
               "target": [{"reference": "urn:uuid:p-1"}, {"reference": "urn:uuid:o-1"}],
               "agent": [{"who": {"display": "LABO_CASA"}}]}, "PUT", "Provenance/prov-1"),
    ))
    assert reply.code == 200 and reply.json["type"] == "transaction-response"
    assert reply.length == len(reply.body)  # sent with its length, not in chunks
    assert statuses(reply) == ["201 Created"] * 3
    observation_location, patient_location, provenance_location = locations(reply)
    assert provenance_location == "Provenance/prov-1/_history/1"
    patient_ref = patient_location.rsplit("/_history/", 1)[0]
    observation_ref = observation_location.rsplit("/_history/", 1)[0]
    assert reply.json["entry"][1]["response"]["etag"] == 'W/"1"'

    stored = yield client.get(f"/fhir/{observation_ref}")
    assert stored.code == 200 and stored.json["subject"] == {"reference": patient_ref}
    assert stored.json["meta"]["versionId"] == "1" and stored.header("etag") == 'W/"1"'
    provenance = yield client.get("/fhir/Provenance/prov-1")
    assert provenance.json["target"] == [{"reference": patient_ref}, {"reference": observation_ref}]


@pytest_twisted.inlineCallbacks
def test_references_to_a_fullurl_that_is_a_url_point_to_the_resource_stored(client):
    """FHIR transactions: a reference to an entry's fullUrl, a URL rather than a urn:uuid, is
    rewritten to the id the record gave that entry (POST: a new one; conditional update: the
    match's), so the stored resource and the search index name the same target."""
    existing = yield client.post(transaction(conditional_patient("CD1")))
    matched_ref = locations(existing)[0].rsplit("/_history/", 1)[0]
    reply = yield client.post(transaction(
        entry(patient("AB1"), "POST", "Patient", "http://example.org/fhir/Patient/p1"),
        entry(observation("http://example.org/fhir/Patient/p1"), "POST", "Observation"),
        entry(patient("CD1"), "PUT", f"Patient?identifier={CNIE}|CD1", "http://example.org/fhir/Patient/p2"),
        entry(observation("http://example.org/fhir/Patient/p2", loinc="718-7"), "POST", "Observation"),
    ))
    assert reply.code == 200, reply.body
    assert statuses(reply) == ["201 Created", "201 Created", "200 OK", "201 Created"]
    created_ref, first_ref, again_ref, second_ref = [location.rsplit("/_history/", 1)[0]
                                                     for location in locations(reply)]
    assert again_ref == matched_ref and created_ref != "Patient/p1"
    for observation_ref, patient_ref in ((first_ref, created_ref), (second_ref, matched_ref)):
        stored = yield client.get(f"/fhir/{observation_ref}")
        assert stored.json["subject"] == {"reference": patient_ref}
        found = yield client.get(f"/fhir/Observation?subject={patient_ref}")
        assert [item["resource"]["id"] for item in found.json["entry"]] == [observation_ref.split("/")[1]]


@pytest_twisted.inlineCallbacks
def test_conditional_update_updates_the_match_and_conditional_create_finds_it(client, running):
    """PUT Type?identifier updates the one match (new version), POST ifNoneExist returns the match instead of creating."""
    first = yield client.post(transaction(conditional_patient()))
    assert statuses(first) == ["201 Created"]
    [created] = locations(first)
    patient_id = created.split("/")[1]

    second = yield client.post(transaction(
        conditional_patient(family="Benali-Alaoui"),
        entry(patient(), "POST", "Patient", "urn:uuid:again", ifNoneExist=f"identifier={CNIE}|AB123456"),
        entry(observation("urn:uuid:again"), "POST", "Observation"),
    ))
    assert statuses(second) == ["200 OK", "200 OK", "201 Created"]
    assert locations(second)[:2] == [f"Patient/{patient_id}/_history/2"] * 2
    assert running.count(resource_type="Patient") == 1
    stored = yield client.get(f"/fhir/Patient/{patient_id}")
    assert stored.json["name"][0]["family"] == "Benali-Alaoui" and stored.json["meta"]["versionId"] == "2"
    found = yield client.get(f"/fhir/Observation?subject=Patient/{patient_id}")
    assert found.json["total"] == 1


@pytest_twisted.inlineCallbacks
def test_conditional_update_without_match_creates_with_the_given_id_or_a_new_one(client):
    """A conditional update that matches nothing creates the resource, with its own id when it has one."""
    reply = yield client.post(transaction(
        entry(patient("AA1", id="given-id"), "PUT", f"Patient?identifier={CNIE}|AA1"),
        entry(patient("AA2"), "PUT", f"Patient?identifier={CNIE}|AA2"),
    ))
    assert statuses(reply) == ["201 Created", "201 Created"]
    given, fresh = locations(reply)
    assert given == "Patient/given-id/_history/1"
    assert fresh.startswith("Patient/") and fresh.split("/")[1] != "given-id"


@pytest_twisted.inlineCallbacks
def test_conditional_update_whose_id_is_not_its_match_is_400(client, running):
    """R4 (http.html#cond-update): one match and a resource id that is not the match's is a
    400 naming the entry, nothing stored, whether the match is stored or an earlier entry's;
    the match's own id updates it."""
    created = yield client.post(transaction(conditional_patient()))
    patient_id = locations(created)[0].split("/")[1]
    before = running.count()
    for bundle in (transaction(entry(observation("urn:uuid:p-1"), "POST", "Observation"),
                               conditional_patient(id="other-hospital")),
                   transaction(entry(patient("CC1", id="a"), "PUT", f"Patient?identifier={CNIE}|CC1", "urn:uuid:a"),
                               entry(patient("CC1", id="b"), "PUT", f"Patient?identifier={CNIE}|CC1", "urn:uuid:b"))):
        reply = yield client.post(bundle)
        assert reply.code == 400, reply.body
        assert issue(reply)["code"] == "invalid" and issue(reply)["expression"] == ["Bundle.entry[1].resource.id"]
        assert running.count() == before
    same = yield client.post(transaction(conditional_patient(id=patient_id, family="Alaoui")))
    assert locations(same) == [f"Patient/{patient_id}/_history/2"]


@pytest_twisted.inlineCallbacks
def test_same_identifier_twice_in_one_transaction_is_one_resource(client, running):
    """Two entries for the same business identifier in one bundle (batched messages) end as one resource, the later content winning."""
    reply = yield client.post(transaction(
        entry(patient("BB1", family="First"), "PUT", f"Patient?identifier={CNIE}|BB1", "urn:uuid:a"),
        entry(patient("BB1", family="Second"), "PUT", f"Patient?identifier={CNIE}|BB1", "urn:uuid:b"),
        entry(observation("urn:uuid:a"), "POST", "Observation"),
        entry(observation("urn:uuid:b", "718-7"), "POST", "Observation"),
    ))
    assert statuses(reply) == ["201 Created", "200 OK", "201 Created", "201 Created"]
    assert running.count(resource_type="Patient") == 1
    found = yield client.get(f"/fhir/Patient?identifier={CNIE}|BB1")
    assert found.json["total"] == 1 and found.json["entry"][0]["resource"]["name"][0]["family"] == "Second"
    patient_id = found.json["entry"][0]["resource"]["id"]
    observations = yield client.get(f"/fhir/Observation?patient={patient_id}")
    assert observations.json["total"] == 2


@pytest_twisted.inlineCallbacks
def test_condition_skips_a_resource_another_entry_writes_by_id(client):
    """An identifier change (A47): the old record, written by id in the same transaction, is not the new record's match."""
    yield client.post(transaction(entry(patient("BE1", id="old"), "PUT", "Patient/old")))
    new = patient("BE1", id="new", link=[{"other": {"reference": "urn:uuid:old"}, "type": "replaces"}])
    old = {"resourceType": "Patient", "id": "old", "identifier": [{"value": "MR-1"}],
           "link": [{"other": {"reference": "urn:uuid:new"}, "type": "replaced-by"}]}
    reply = yield client.post(transaction(
        entry(new, "PUT", f"Patient?identifier={CNIE}|BE1", "urn:uuid:new"),
        entry(old, "PUT", "Patient/old", "urn:uuid:old"),
    ))
    assert locations(reply) == ["Patient/new/_history/1", "Patient/old/_history/2"]
    found = yield client.get(f"/fhir/Patient?identifier={CNIE}|BE1")
    assert ids(found) == {"new"}
    assert found.json["entry"][0]["resource"]["link"][0]["other"] == {"reference": "Patient/old"}


@pytest_twisted.inlineCallbacks
def test_a_retirement_by_number_never_lands_on_its_survivor(client, running):
    """A47 after an admission that carried the CNIE: the record's one Patient has the old
    number and the CNIE. The retired registration goes by its old number `:not` the survivor's
    CNIE, and is created apart (inactive), instead of turning the survivor inactive; a
    registration of its own, without that CNIE, is found by the same condition."""
    mr = "urn:ma:hie:local:CHUIR:CHUIR:MR"
    admitted = patient("BE2", identifier=[{"system": mr, "value": "111"}, {"system": CNIE, "value": "BE2"}])
    other = patient("BX9", identifier=[{"system": mr, "value": "222"}, {"system": CNIE, "value": "BX9"}])
    yield client.post(transaction(entry(admitted, "PUT", f"Patient?identifier={CNIE}|BE2", "urn:uuid:a"),
                                  entry(other, "PUT", f"Patient?identifier={CNIE}|BX9", "urn:uuid:b")))
    stored = yield client.get(f"/fhir/Patient?identifier={CNIE}|BE2")
    (survivor_id,) = ids(stored)
    stored = yield client.get(f"/fhir/Patient?identifier={CNIE}|BX9")
    (other_id,) = ids(stored)

    def change(old_number: str, new_number: str) -> dict:
        new = patient("BE2", identifier=[{"system": mr, "value": new_number}, {"system": CNIE, "value": "BE2"}],
                      link=[{"other": {"reference": "urn:uuid:old"}, "type": "replaces"}])
        old = {"resourceType": "Patient", "identifier": [{"system": mr, "value": old_number}], "active": False,
               "link": [{"other": {"reference": "urn:uuid:new"}, "type": "replaced-by"}]}
        return transaction(entry(new, "PUT", f"Patient?identifier={CNIE}|BE2", "urn:uuid:new"),
                           entry(old, "PUT", f"Patient?identifier={mr}|{old_number}"
                                             f"&identifier:not={CNIE}|BE2", "urn:uuid:old"))

    reply = yield client.post(change("111", "112"))
    assert statuses(reply) == ["200 OK", "201 Created"]
    survivor = (yield client.get(f"/fhir/Patient/{survivor_id}")).json
    assert survivor.get("active", True) and {i["value"] for i in survivor["identifier"]} == {"112", "BE2"}
    retired_id = reply.json["entry"][1]["response"]["location"].split("/")[1]
    assert retired_id not in (survivor_id, other_id)
    # The other registration (its own CNIE) is found by its number: it is the one retired.
    reply = yield client.post(change("222", "113"))
    assert reply.json["entry"][1]["response"]["location"].split("/")[1] == other_id
    retired = (yield client.get(f"/fhir/Patient/{other_id}")).json
    assert retired["active"] is False and retired["link"][0]["other"] == {"reference": f"Patient/{survivor_id}"}
    assert running.count(resource_type="Patient") == 3


@pytest_twisted.inlineCallbacks
def test_several_matches_is_412_and_nothing_is_stored(client, running):
    """A conditional update matching two resources fails with 412, and the other entries of the transaction are not stored."""
    yield client.post(transaction(entry(patient("DUP", id="one"), "PUT", "Patient/one"),
                                  entry(patient("DUP", id="two"), "PUT", "Patient/two")))
    before = running.count()
    reply = yield client.post(transaction(
        entry(observation("Patient/one"), "POST", "Observation"),
        entry(patient("DUP", family="Other"), "PUT", f"Patient?identifier={CNIE}|DUP"),
    ))
    assert reply.code == 412
    assert issue(reply)["code"] == "multiple-matches"
    assert issue(reply)["expression"] == ["Bundle.entry[1].request.url"]
    assert running.count() == before


@pytest_twisted.inlineCallbacks
def test_unresolved_urn_uuid_is_422_and_the_transaction_is_rolled_back(client, running):
    """A reference to a urn:uuid that no entry carries refuses the whole transaction."""
    reply = yield client.post(transaction(
        conditional_patient(),
        entry(observation("urn:uuid:nowhere"), "POST", "Observation"),
    ))
    assert reply.code == 422
    assert issue(reply)["code"] == "not-found"
    assert issue(reply)["expression"] == ["Bundle.entry[1].resource.subject.reference"]
    assert running.count() == 0


@pytest_twisted.inlineCallbacks
def test_put_by_id_mismatch_and_unsupported_methods_are_400(client):
    """Entries that contradict their request URL or use an unsupported method are refused with their location."""
    cases = [
        (entry(patient(id="x"), "PUT", "Patient/y"), "Bundle.entry[0].resource.id"),
        (entry(patient(), "PUT", "Observation/y"), "Bundle.entry[0].request.url"),
        (entry(patient(), "DELETE", "Patient/y"), "Bundle.entry[0].request.method"),
        (entry(patient(), "PUT", "Patient"), "Bundle.entry[0].request.url"),
        (entry(patient(), "POST", "Patient?identifier=a|b"), "Bundle.entry[0].request.url"),
        (entry(patient(), "PUT", "Patient?color=blue"), "Bundle.entry[0].request.url"),
        ({"resource": patient()}, "Bundle.entry[0].request"),
        ({"request": {"method": "POST", "url": "Patient"}}, "Bundle.entry[0].resource"),
    ]
    for item, where in cases:
        reply = yield client.post(transaction(item))
        assert reply.code == 400, (item, reply.body)
        assert issue(reply)["expression"] == [where], item


@pytest_twisted.inlineCallbacks
def test_a_fullurl_twice_in_a_transaction_is_400_and_nothing_is_stored(client, running):
    """bdl-7: a fullUrl names one entry of a bundle; a reference to one given twice would
    resolve to either, so the transaction is refused, entry and place named."""
    reply = yield client.post(transaction(
        conditional_patient(),
        entry(observation("urn:uuid:p-1"), "POST", "Observation", "urn:uuid:o-1"),
        conditional_patient(family="Other"),
    ))
    assert reply.code == 400
    assert issue(reply)["expression"] == ["Bundle.entry[2].fullUrl"]
    assert "Bundle.entry[0]" in issue(reply)["diagnostics"]
    assert running.count() == 0


# -- idempotency ---------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_repeated_idempotency_key_gets_the_stored_answer_and_keeps_one_copy(client, running):
    """Re-posting with the same key and body returns the first response and changes no row;
    the same JSON spaced otherwise is another body (the key names the bytes sent)."""
    bundle = transaction(conditional_patient(),
                         entry(observation("urn:uuid:p-1"), "PUT", "Observation/obs-1", "urn:uuid:o"))
    first = yield client.post(bundle, key="msg-1|record")
    rows = running.count(), running.count("identifier_index"), running.count("reference_index")
    again = yield client.post(bundle, key="msg-1|record")
    assert again.code == 200 and again.body == first.body
    assert (running.count(), running.count("identifier_index"), running.count("reference_index")) == rows
    assert running.count("idempotency_keys") == 1
    reformatted = yield client.post(json.dumps(bundle, indent=2).encode(), key="msg-1|record")
    assert reformatted.code == 422 and "Idempotency-Key" in issue(reformatted)["diagnostics"]
    assert (running.count(), running.count("identifier_index"), running.count("reference_index")) == rows


def test_keys_stored_with_a_digest_of_canonical_json_still_compare_so(tmp_path):
    """A key an older version stored (the digest of the request's JSON with sorted keys, no
    prefix) is replayed for the same JSON however spaced, refused for other JSON."""
    import hashlib

    from gateway.sandbox.record.api import RecordApi
    from gateway.sandbox.record.store import RecordStore

    path = str(tmp_path / "record.sqlite")
    bundle = transaction(conditional_patient())
    store = RecordStore(path)
    try:
        first = RecordApi(store).transaction(json.dumps(bundle).encode(), "old-key")
        assert first.status == 200
    finally:
        store.close()
    canonical = hashlib.sha256(json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE idempotency_keys SET body_sha256 = ? WHERE key = 'old-key'", (canonical,))
    store = RecordStore(path)
    try:
        api = RecordApi(store)
        again = api.transaction(json.dumps(bundle, indent=2).encode(), "old-key")
        assert (again.status, again.replayed, again.body) == (200, True, first.body)
        other = api.transaction(json.dumps(transaction(conditional_patient("OTHER"))).encode(), "old-key")
        assert other.status == 422 and store.count() == 1
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_redelivery_under_another_key_leaves_one_copy_and_one_version(client, running):
    """Unchanged content sent again (new key) is answered 200 without a new version."""
    bundle = transaction(conditional_patient(),
                         entry(observation("urn:uuid:p-1"), "PUT", "Observation/obs-1"))
    first = yield client.post(bundle, key="k1")
    second = yield client.post(bundle, key="k2")
    assert statuses(first) == ["201 Created", "201 Created"]
    assert statuses(second) == ["200 OK", "200 OK"]
    assert locations(second) == locations(first)
    assert running.count() == 2


@pytest_twisted.inlineCallbacks
def test_decimals_keep_their_precision_through_store_read_and_search(client, running):
    """5.10 is read back as 5.10, not 5.1 (FHIR decimals keep their precision); the same
    bytes again keep the version, 5.1 or 5.100 is a change."""
    def body(value: str) -> bytes:
        return json.dumps(transaction(entry(observation("Patient/p", value=0.0), "PUT", "Observation/dec"))
                          ).replace('"value": 0.0', f'"value": {value}').encode()

    first = yield client.post(body("5.10"))
    assert statuses(first) == ["201 Created"]
    read = yield client.get("/fhir/Observation/dec")
    assert b'"value":5.10,' in read.body
    found = yield client.get("/fhir/Observation?_id=dec")
    assert b'"value":5.10,' in found.body
    again = yield client.post(body("5.10"))
    assert locations(again) == ["Observation/dec/_history/1"]
    for number, value in enumerate(["5.1", "5.100"], start=2):
        changed = yield client.post(body(value))
        assert locations(changed) == [f"Observation/dec/_history/{number}"]
        read = yield client.get("/fhir/Observation/dec")
        assert f'"value":{value},'.encode() in read.body


def test_key_stored_with_a_canonical_digest_still_replays_a_body_with_decimals(tmp_path):
    """An older version digested the JSON with its decimals as floats (5.10 as 5.1): the
    same body under its key is still a replay, not a 422."""
    import hashlib

    from gateway.sandbox.record.api import RecordApi
    from gateway.sandbox.record.store import RecordStore

    path = str(tmp_path / "record.sqlite")
    text = json.dumps(transaction(entry(observation("Patient/p", value=0.0), "PUT", "Observation/dec")))
    raw = text.replace('"value": 0.0', '"value": 5.10')
    store = RecordStore(path)
    try:
        first = RecordApi(store).transaction(raw.encode(), "old-key")
        assert first.status == 200
    finally:
        store.close()
    canonical = hashlib.sha256(json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE idempotency_keys SET body_sha256 = ? WHERE key = 'old-key'", (canonical,))
    store = RecordStore(path)
    try:
        again = RecordApi(store).transaction(raw.replace(", ", ",  ").encode(), "old-key")
        assert (again.status, again.replayed) == (200, True)
    finally:
        store.close()


@pytest_twisted.inlineCallbacks
def test_same_key_with_another_body_is_422(client, running):
    """An Idempotency-Key reused for a different request is refused and stores nothing."""
    yield client.post(transaction(conditional_patient()), key="reused")
    reply = yield client.post(transaction(conditional_patient("OTHER")), key="reused")
    assert reply.code == 422
    assert issue(reply)["code"] == "business-rule" and "Idempotency-Key" in issue(reply)["diagnostics"]
    assert running.count() == 1


@pytest_twisted.inlineCallbacks
def test_malformed_idempotency_key_is_400(client):
    """An Idempotency-Key that is too long or not printable ASCII is refused."""
    reply = yield client.post(transaction(conditional_patient()), key="k" * 201)
    assert reply.code == 400 and "Idempotency-Key" in issue(reply)["diagnostics"]


# -- validation ----------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_invalid_resource_is_422_with_entry_and_element(client, running):
    """Resources the R4B models reject are listed with their entry index and element path; nothing is stored."""
    bad_observation = observation("urn:uuid:p-1")
    del bad_observation["code"]
    bad_patient = patient(birthDate="1985-13-45")
    reply = yield client.post(transaction(conditional_patient(), entry(bad_observation, "POST", "Observation"),
                                          entry(bad_patient, "POST", "Patient")))
    assert reply.code == 422
    found = {(item["code"], item["expression"][0]) for item in reply.json["issue"]}
    assert found == {("required", "Bundle.entry[1].resource.code"),
                     ("value", "Bundle.entry[2].resource.birthDate")}
    assert "1985-13-45" not in reply.body.decode()  # the peer never echoes values
    assert running.count() == 0


@pytest_twisted.inlineCallbacks
def test_unknown_resource_type_is_422(client):
    """A resource whose type R4 does not define is refused with its location."""
    reply = yield client.post(transaction(entry({"resourceType": "HumanName"}, "POST", "HumanName")))
    assert reply.code == 422 and issue(reply)["expression"] == ["Bundle.entry[0].resource.resourceType"]


@pytest.mark.parametrize("nested, where", [
    ({"contained": [{"resourceType": "Nope"}]}, "contained[0]"),
    ({"contained": [{"resourceType": 7}]}, "contained[0]"),
    ({"contained": [{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Nope"}}]}]},
     "contained[0].entry[0].resource"),
])
@pytest_twisted.inlineCallbacks
def test_unknown_type_of_a_nested_resource_is_422(client, running, nested, where):
    """A contained (or deeper) resource whose type R4 does not define is a 422 naming it, not a
    500 (which the gateway would retry for ever): the models fail on it with a KeyError."""
    reply = yield client.post(transaction(entry(patient(**nested), "POST", "Patient")))
    assert reply.code == 422, reply.body
    assert issue(reply)["expression"] == [f"Bundle.entry[0].resource.{where}.resourceType"]
    assert running.count() == 0


@pytest_twisted.inlineCallbacks
def test_validation_can_be_switched_off(dev_pki, tmp_path):
    """With validate=False (benchmarks) a resource the models would reject is stored."""
    running = start_peer(dev_pki, str(tmp_path / "lax.sqlite"), validate=False)
    try:
        bad = observation("urn:uuid:p-1")
        del bad["code"]
        reply = yield running.client().post(transaction(conditional_patient(), entry(bad, "POST", "Observation")))
        assert reply.code == 200 and statuses(reply) == ["201 Created", "201 Created"]
    finally:
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_malformed_requests_are_400(client):
    """Not JSON, not UTF-8, not a Bundle, not a transaction, entries not a list: 400 with an OperationOutcome."""
    cases = [
        (b"{not json", "structure"),
        (b'{"resourceType": "Bundle", "type": "transaction", "x": NaN}', "structure"),
        ('{"resourceType": "Bundle", "n": "\u00e9"}'.encode("latin-1"), "structure"),
        (b"[" * 100_000, "structure"),
        (json.dumps(patient()).encode(), "invalid"),
        (json.dumps({"resourceType": "Bundle", "type": "batch", "entry": []}).encode(), "not-supported"),
        (json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": {}}).encode(), "structure"),
        (b"[]", "invalid"),
    ]
    for body, code in cases:
        reply = yield client.post(body)
        assert reply.code == 400, body[:60]
        assert issue(reply)["code"] == code, body[:60]
        if body == cases[2][0]:
            assert issue(reply)["diagnostics"] == "the body is not UTF-8 (byte 33)"


@pytest_twisted.inlineCallbacks
def test_wrong_content_type_is_415(client):
    """A transaction sent as something other than FHIR JSON is refused."""
    reply = yield client.post(transaction(), headers={"Content-Type": "application/xml"})
    assert reply.code == 415 and issue(reply)["code"] == "not-supported"


@pytest_twisted.inlineCallbacks
def test_empty_transaction_is_an_empty_response(client):
    """A transaction without entries succeeds with no entries."""
    reply = yield client.post(transaction())
    assert reply.code == 200 and reply.json["entry"] == []


@pytest_twisted.inlineCallbacks
def test_head_is_get_without_a_body_and_a_405_names_the_allowed_methods(client):
    """RFC 9110: HEAD is served wherever GET is, and a 405 carries Allow."""
    head = yield client.request("HEAD", "/fhir/metadata")
    assert head.code == 200 and head.body == b""
    assert head.header("content-type").startswith("application/fhir+json")
    deleted = yield client.request("DELETE", "/fhir/Patient/1")
    assert deleted.code == 405 and deleted.header("allow") == "GET, HEAD"
    put = yield client.request("PUT", "/fhir", b"{}")
    assert put.code == 405 and put.header("allow") == "POST"
    post_search = yield client.request("POST", "/fhir/Patient/_search", b"{}")
    assert post_search.code == 405 and post_search.header("allow") == "GET, HEAD"


# -- read and search -----------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_read_absent_unknown_type_and_bad_id(client):
    """Read answers 404 for an absent resource or unknown type, 400 for a malformed id, each with an OperationOutcome."""
    absent = yield client.get("/fhir/Patient/nobody")
    assert absent.code == 404 and issue(absent)["code"] == "not-found"
    unknown = yield client.get("/fhir/Nonsense/1")
    assert unknown.code == 404 and issue(unknown)["code"] == "not-supported"
    bad = yield client.get("/fhir/Patient/" + "x" * 65)
    assert bad.code == 400
    nowhere = yield client.get("/fhir/Patient/1/extra/path")
    assert nowhere.code == 404 and nowhere.json["resourceType"] == "OperationOutcome"
    outside = yield client.get("/elsewhere")
    assert outside.code == 404 and outside.json["resourceType"] == "OperationOutcome"


@pytest_twisted.inlineCallbacks
def test_metadata_is_a_capability_statement(client):
    """GET /fhir/metadata describes the record."""
    reply = yield client.get("/fhir/metadata")
    assert reply.code == 200 and reply.json["resourceType"] == "CapabilityStatement"
    assert reply.json["fhirVersion"] == "4.0.1"
    assert reply.json["rest"][0]["resource"][0]["updateCreate"] is True  # PUT Type/id of a new id creates it
    assert reply.header("content-type").startswith("application/fhir+json")


@pytest.fixture
def searchable(client):
    """Two patients with observations and an encounter, for the search tests."""
    local = {"value": "774411", "type": {"coding": [{"code": "PI"}]}}
    pytest_twisted.blockon(client.post(transaction(
        entry(patient("AB123456", identifier=[{"system": CNIE, "value": "AB123456"}, local]),
              "PUT", "Patient/amina", "urn:uuid:a"),
        entry(patient("CD789", family="Alaoui"), "PUT", "Patient/karim", "urn:uuid:k"),
        entry(observation("urn:uuid:a", "2093-3", id="chol-a"), "PUT", "Observation/chol-a"),
        entry(observation("urn:uuid:a", "718-7", id="hb-a"), "PUT", "Observation/hb-a"),
        entry(observation("urn:uuid:k", "2093-3", id="chol-k",
                          code={"coding": [{"system": LOINC, "code": "2093-3"},
                                           {"system": "urn:local", "code": "CHOL"}]}),
              "PUT", "Observation/chol-k"),
        entry({"resourceType": "Encounter", "id": "enc-a", "status": "finished",
               "class": {"code": "IMP"}, "subject": {"reference": "urn:uuid:a"}}, "PUT", "Encounter/enc-a"),
    )))
    return client


def ids(reply: Reply) -> set[str]:
    assert reply.code == 200, reply.body
    assert reply.json["type"] == "searchset" and reply.json["total"] == len(reply.json["entry"])
    return {item["resource"]["id"] for item in reply.json["entry"]}


SEARCHES = {
    f"Patient?identifier={CNIE}|AB123456": {"amina"},
    "Patient?identifier=AB123456": {"amina"},
    "Patient?identifier=|774411": {"amina"},
    f"Patient?identifier={CNIE}|": {"amina", "karim"},
    "Patient?identifier=urn:other|AB123456": set(),
    "Patient?_id=karim": {"karim"},
    "Observation?patient=Patient/amina": {"chol-a", "hb-a"},
    "Observation?patient=amina": {"chol-a", "hb-a"},
    "Observation?subject=Patient/karim": {"chol-k"},
    "Observation?subject=karim": {"chol-k"},
    "Encounter?patient=amina": {"enc-a"},
    f"Observation?code={LOINC}|2093-3": {"chol-a", "chol-k"},
    "Observation?code=2093-3": {"chol-a", "chol-k"},
    "Observation?code=urn:local|CHOL": {"chol-k"},
    f"Observation?code={LOINC}|2093-3&patient=amina": {"chol-a"},
    "Observation?code=718-7&subject=Patient/karim": set(),
    "Observation?_id=hb-a&_id=chol-a": set(),
    # :not: those without such an identifier (a Patient without any identifier too)
    f"Patient?identifier:not={CNIE}|AB123456": {"karim"},
    "Patient?identifier:not=|774411": {"karim"},
    f"Patient?identifier:not={CNIE}|": set(),
    f"Patient?identifier={CNIE}|&identifier:not={CNIE}|CD789": {"amina"},
    f"Observation?code:not={LOINC}|718-7": {"chol-a", "chol-k"},
}


@pytest.mark.parametrize("query", list(SEARCHES))
@pytest_twisted.inlineCallbacks
def test_search_parameters(searchable, query):
    """Each search parameter, and their AND combinations, find exactly the expected resources."""
    resource_type, _, params = query.partition("?")
    reply = yield searchable.get(f"/fhir/{resource_type}?" + quote(params, safe="=&"))
    assert ids(reply) == SEARCHES[query]


@pytest_twisted.inlineCallbacks
def test_search_count_pages_and_total_counts_all(searchable):
    """_count limits the entries returned while total counts every match; the entries carry fullUrl and meta."""
    reply = yield searchable.get("/fhir/Observation?_count=1")
    assert reply.json["total"] == 3 and len(reply.json["entry"]) == 1
    item = reply.json["entry"][0]
    assert item["fullUrl"].startswith("https://127.0.0.1:") and item["fullUrl"].endswith("/fhir/Observation/" + item["resource"]["id"])
    assert item["resource"]["meta"]["versionId"] == "1"


@pytest_twisted.inlineCallbacks
def test_bad_searches_are_refused(searchable):
    """Unknown parameters, malformed values and unknown types are refused, not ignored."""
    for path, code in [("/fhir/Patient?name=Benali", 400), ("/fhir/Patient?identifier:exact=x", 400),
                       ("/fhir/Patient?identifier=", 400), ("/fhir/Patient?identifier=a|b|c", 400),
                       ("/fhir/Observation?patient=Group/1", 400), ("/fhir/Patient?_count=many", 400),
                       ("/fhir/Patient?_count=5000", 400), ("/fhir/Patient?_id=bad%20id", 400),
                       ("/fhir/Patient?identifier=%ff", 400), ("/fhir/Nonsense?_id=1", 404)]:
        reply = yield searchable.get(path)
        assert reply.code == code, path
        assert reply.json["resourceType"] == "OperationOutcome", path


@pytest_twisted.inlineCallbacks
def test_a_count_of_thousands_of_digits_is_read_without_int_failing(searchable):
    """int() refuses a string of more than 4300 digits: such a _count is a 400 (too large), or
    read as its value when they are leading zeros, not a 500."""
    too_large = yield searchable.get("/fhir/Observation?_count=" + "9" * 5000)
    assert too_large.code == 400 and issue(too_large)["code"] == "value"
    padded = yield searchable.get("/fhir/Observation?_count=" + "0" * 5000 + "1")
    assert padded.code == 200 and padded.json["total"] == 3 and len(padded.json["entry"]) == 1


@pytest_twisted.inlineCallbacks
def test_a_search_of_a_thousand_parameters_is_400_not_a_500(searchable, running):
    """Each parameter is an AND term, and SQLite refuses a WHERE about a thousand deep: such a
    search, or a conditional URL of a transaction, is refused as too costly."""
    search = yield searchable.get("/fhir/Patient?" + "&".join(["_id=amina"] * 1000))
    assert search.code == 400 and issue(search)["code"] == "too-costly"
    before = running.count()
    condition = "Patient?" + "&".join([f"identifier={CNIE}|AB123456"] * 1000)
    reply = yield searchable.post(transaction(entry(patient(), "PUT", condition)))
    assert reply.code == 400 and issue(reply)["expression"] == ["Bundle.entry[0].request.url"]
    assert running.count() == before


@pytest_twisted.inlineCallbacks
def test_search_value_escapes(client):
    """Identifier values with |, comma, & and spaces are found through FHIR escaping and percent-encoding."""
    value = "A|B,C&D E\\F"
    yield client.post(transaction(entry(patient(value), "PUT", "Patient/odd")))
    escaped = value.replace("\\", "\\\\").replace("|", "\\|").replace(",", "\\,")
    reply = yield client.get("/fhir/Patient?identifier=" + quote(f"{CNIE}|{escaped}", safe=""))
    assert ids(reply) == {"odd"}


@pytest_twisted.inlineCallbacks
def test_search_refuses_value_lists_and_counts_in_other_digits(searchable):
    """An unescaped comma (FHIR's OR) is refused, not searched as part of the value; a _count
    in digits int() refuses ("²") or other scripts' digits is a 400, not a 500; a reference
    with a trailing newline is not read as the id before it."""
    for path in ["/fhir/Patient?identifier=AB123456,CD789", f"/fhir/Patient?identifier={CNIE}|AB123456,CD789",
                 "/fhir/Observation?code=2093-3,718-7", "/fhir/Patient?_count=%C2%B2",
                 "/fhir/Patient?_count=%D9%A3", "/fhir/Observation?subject=Patient/amina%0A"]:
        reply = yield searchable.get(path)
        assert reply.code == 400, path
        assert reply.json["resourceType"] == "OperationOutcome", path
    reply = yield searchable.get("/fhir/Patient?identifier=AB123456%5C,CD789")  # escaped: one value
    assert ids(reply) == set()


# -- mutual TLS ----------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_certificate_not_allowed_is_403(running):
    """A facility certificate from the same CA completes TLS but gets a 403 OperationOutcome, also on the fault control."""
    stranger = running.client("INPE-100001")
    reply = yield stranger.get("/fhir/metadata")
    assert reply.code == 403 and issue(reply)["code"] == "forbidden"
    assert "INPE-100001" in issue(reply)["diagnostics"]
    control = yield stranger.request("PUT", "/_sandbox/faults", b'{"mode": "down"}')
    assert control.code == 403
    assert running.peer.faults.plan.mode == "none"


@pytest_twisted.inlineCallbacks
def test_allowed_clients_is_configurable(dev_pki, tmp_path):
    """A peer told to accept a facility serves it."""
    running = start_peer(dev_pki, str(tmp_path / "r.sqlite"), allowed_clients={"INPE-100001"})
    try:
        reply = yield running.client("INPE-100001").get("/fhir/metadata")
        assert reply.code == 200
        refused = yield running.client("gateway").get("/fhir/metadata")
        assert refused.code == 403
    finally:
        yield running.stop()


@pytest_twisted.inlineCallbacks
def test_client_without_certificate_cannot_connect(running):
    """Without a client certificate the TLS handshake fails and no answer comes back."""
    anonymous = running.client(None)
    with pytest.raises(Exception) as caught:
        yield anonymous.get("/fhir/metadata")
    assert "certificate required" in repr(caught.value) or "ResponseNeverReceived" in repr(caught.value) \
        or "ConnectionLost" in repr(caught.value)


# -- request size --------------------------------------------------------------------------

class _RawExchange(Protocol):
    def __init__(self, payload: bytes):
        self.payload = payload
        self.received = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.done.callback(self.received)


@defer.inlineCallbacks
def raw_exchange(running: RunningPeer, payload: bytes) -> bytes:
    """Send raw bytes over mTLS as the gateway; everything received until the peer closes."""
    pki = running.pki_dir
    options = client_tls_options(os.path.join(pki, "ca.crt"), "127.0.0.1",
                                 os.path.join(pki, "gateway.crt"), os.path.join(pki, "gateway.key"))
    tcp = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", running.port_number, timeout=TIMEOUT)
    protocol = _RawExchange(payload)
    yield endpoints.connectProtocol(endpoints.wrapClientTLS(options, tcp), protocol)
    received = yield protocol.done.addTimeout(TIMEOUT, reactor)
    return received


@pytest_twisted.inlineCallbacks
def test_oversize_declared_body_is_413_before_it_is_sent(running):
    """A Content-Length above the limit (32 MiB) gets 413 with an OperationOutcome at once, and the connection closes."""
    head = (b"POST /fhir HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n"
            b"Content-Length: %d\r\n\r\n" % (32 * 1024 * 1024 + 1))
    received = yield raw_exchange(running, head)
    status, _, rest = received.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Payload Too Large"
    body = json.loads(rest.partition(b"\r\n\r\n")[2])
    assert body["issue"][0]["code"] == "too-costly"


@pytest_twisted.inlineCallbacks
def test_oversize_chunked_body_is_413(dev_pki, tmp_path):
    """A chunked body that grows past the limit is cut off with a 413."""
    running = start_peer(dev_pki, str(tmp_path / "small.sqlite"), max_request_bytes=1024)
    try:
        chunk = b"x" * 2000
        payload = (b"POST /fhir HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/fhir+json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(chunk) + chunk + b"\r\n")
        received = yield raw_exchange(running, payload)
        assert received.startswith(b"HTTP/1.1 413 ")
        under = yield running.client().post(transaction())  # below the limit: served
        assert under.code == 200
    finally:
        yield running.stop()


# -- faults ----------------------------------------------------------------------------------

@defer.inlineCallbacks
def set_fault(client: RecordClient, **plan):
    reply = yield client.request("PUT", "/_sandbox/faults", json.dumps(plan).encode())
    assert reply.code == 200, reply.body


@pytest_twisted.inlineCallbacks
def test_fault_down_drops_the_connection_until_the_count_runs_out(client):
    """`down` for one request: that request gets no answer, the next one is served."""
    yield set_fault(client, mode="down", count=1)
    with pytest.raises(Exception) as caught:
        yield client.post(transaction(conditional_patient()))
    assert "ResponseNeverReceived" in repr(caught.value) or "ConnectionLost" in repr(caught.value)
    reply = yield client.post(transaction(conditional_patient()))
    assert reply.code == 200


@pytest.mark.parametrize("mode, status", [("http_500", 500), ("http_503", 503)])
@pytest_twisted.inlineCallbacks
def test_fault_http_errors_answer_an_operation_outcome(client, running, mode, status):
    """`http_500`/`http_503` answer that status with an OperationOutcome and store nothing, for `count` requests."""
    yield set_fault(client, mode=mode, count=2)
    for _ in range(2):
        reply = yield client.post(transaction(conditional_patient()))
        assert reply.code == status and issue(reply)["code"] == "transient"
    assert running.count() == 0
    reply = yield client.post(transaction(conditional_patient()))
    assert reply.code == 200 and running.count() == 1
    plan = yield client.get("/_sandbox/faults")
    assert json.loads(plan.body)["mode"] == "none"


@pytest.mark.parametrize("mode, status, code", [("http_400", 400, "invalid"), ("soap_fault", 500, "transient")])
@pytest_twisted.inlineCallbacks
def test_fault_other_errors(client, running, mode, status, code):
    """`http_400` answers a refusal, and `soap_fault` (CNSS's) a server error, each once with count 1."""
    yield set_fault(client, mode=mode, count=1)
    reply = yield client.post(transaction(conditional_patient()))
    assert reply.code == status and issue(reply)["code"] == code
    assert running.count() == 0
    reply = yield client.post(transaction(conditional_patient()))
    assert reply.code == 200


@pytest_twisted.inlineCallbacks
def test_fault_drop_answer_stores_and_the_retry_gets_the_stored_answer(client, running):
    """`drop_answer` stores the transaction but never answers; the retry with the same key gets the answer and leaves one copy."""
    bundle = transaction(conditional_patient(), entry(observation("urn:uuid:p-1"), "POST", "Observation"))
    yield set_fault(client, mode="drop_answer", count=1)
    with pytest.raises(Exception) as caught:
        yield client.post(bundle, key="lost-answer")
    assert "ResponseNeverReceived" in repr(caught.value) or "ConnectionLost" in repr(caught.value)
    assert running.count() == 2
    retry = yield client.post(bundle, key="lost-answer")
    assert retry.code == 200 and statuses(retry) == ["201 Created", "201 Created"]
    assert running.count() == 2


@pytest_twisted.inlineCallbacks
def test_fault_slow_delays_the_answer_until_cleared(client):
    """`slow` answers correctly after the delay, until the plan is deleted."""
    yield set_fault(client, mode="slow", delay=0.3)
    started = time.monotonic()
    reply = yield client.get("/fhir/metadata")
    assert reply.code == 200 and time.monotonic() - started >= 0.3
    cleared = yield client.request("DELETE", "/_sandbox/faults")
    assert cleared.code == 200
    started = time.monotonic()
    yield client.get("/fhir/metadata")
    assert time.monotonic() - started < 0.3


# -- persistence -----------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_data_and_idempotency_keys_persist_across_a_restart(running):
    """After a restart on the same file, resources are still there and a repeated key still gets its stored answer."""
    client = running.client()
    bundle = transaction(conditional_patient())
    first = yield client.post(bundle, key="persist-1")
    yield running.stop()
    running.start()
    client = running.client()
    found = yield client.get(f"/fhir/Patient?identifier={CNIE}|AB123456")
    assert ids(found) and found.json["total"] == 1
    again = yield client.post(bundle, key="persist-1")
    assert again.body == first.body and running.count() == 1


def test_older_store_layout_gets_its_indexes_rebuilt(tmp_path):
    """A store file from an older schema version is searchable again once reopened."""
    from gateway.sandbox.record.api import RecordApi
    from gateway.sandbox.record.search import parse_search
    from gateway.sandbox.record.store import RecordStore

    path = str(tmp_path / "old.sqlite")
    store = RecordStore(path)
    RecordApi(store).transaction(json.dumps(transaction(
        conditional_patient(), entry(observation("urn:uuid:p-1"), "POST", "Observation"))).encode())
    store.close()
    with sqlite3.connect(path) as db:  # as a version-2 file would be: other index tables
        db.executescript("DROP TABLE reference_index; CREATE TABLE reference_index (x); PRAGMA user_version=2;")
    store = RecordStore(path)
    try:
        [patient_id] = [row["id"] for row in store.search(parse_search("Patient", [("identifier", "AB123456")]))[1]]
        total, _ = store.search(parse_search("Observation", [("patient", patient_id)]))
        assert total == 1
    finally:
        store.close()


def test_urn_references_are_rewritten_wherever_they_are_and_only_there(tmp_path):
    """Every `urn:uuid:` reference of a resource is rewritten, several in one resource, one
    whose fullUrl needs escaping in JSON, one whose fullUrl carries non-ASCII text; text that
    only looks like a reference (inside a string) is kept as sent. (The store rewrites them
    on the resource's JSON text, not on its tree.)"""
    from gateway.sandbox.record.api import RecordApi
    from gateway.sandbox.record.store import RecordStore

    store = RecordStore(str(tmp_path / "record.sqlite"))
    try:
        api = RecordApi(store, validate=False)
        lookalike = '"reference":"urn:uuid:p-1"'
        report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": lookalike},
                  "subject": {"reference": "urn:uuid:p-1"},
                  "result": [{"reference": 'urn:uuid:o"1\\'}, {"reference": "urn:uuid:ö-2"},
                             {"reference": "Observation/already"}]}
        reply = api.transaction(json.dumps(transaction(
            entry(patient(), "PUT", "Patient/pat-1", "urn:uuid:p-1"),
            entry(observation("urn:uuid:p-1"), "PUT", "Observation/obs-1", 'urn:uuid:o"1\\'),
            entry(observation("urn:uuid:p-1"), "PUT", "Observation/obs-2", "urn:uuid:ö-2"),
            entry(report, "PUT", "DiagnosticReport/dr-1", "urn:uuid:dr-1"))).encode())
        assert reply.status == 200, reply.body
        stored = store.read("DiagnosticReport", "dr-1")
        assert stored["subject"] == {"reference": "Patient/pat-1"}
        assert stored["result"] == [{"reference": "Observation/obs-1"}, {"reference": "Observation/obs-2"},
                                    {"reference": "Observation/already"}]
        assert stored["code"] == {"text": lookalike}
        assert store.read("Observation", "obs-1")["subject"] == {"reference": "Patient/pat-1"}
    finally:
        store.close()

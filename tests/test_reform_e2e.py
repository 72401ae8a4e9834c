"""The reform end to end (issue 5, item 9), through every door and the reference peers, with
each party presenting its own certificate:

a doctor prescribes two drugs over MLLP/TLS and gets the id and the signed QR payload; the
pharmacy looks the prescription up by the scanned QR over REST, dispenses part of it over
MLLP/TLS and the rest over REST, and a third, over-dispensing attempt is refused; CNSS ends
with exactly the care-sheet lines of the two accepted dispensations and the shared record with
the prescription and the two dispensations. A pharmacy cannot send ADT, a laboratory cannot
dispense, and certificates that name no facility, or come from another CA, cannot get in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import ssl
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from adapters.mllp.client import MllpClient, client_tls_context
from gateway.config import (DeliveryConfig, DestinationConfig, HttpsListenerConfig,
                            MappingsConfig, MllpListenerConfig, RetryConfig, load_config)
from gateway.pki import init_dev_pki
from gateway.service import build_service
from delivery_support import until
from doors_support import Client, Door
from prescription_support import AMOXIL, DOLIPRANE, LABORATORY, PATIENT, rde, rds
from process_support import listening_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCTOR_ID, PHARMACY_ID, LAB_ID, STRANGER_ID = "INPE-200001", "INPE-100004", "INPE-100002", "INPE-999999"
FAST_RETRY = RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600)
DELIVERIES = ("SELECT m.control_id, d.destination, d.status FROM deliveries d "
              "JOIN messages m ON m.id = d.message_id ORDER BY d.id")


@pytest.fixture(scope="module")
def dev_pki(tmp_path_factory):
    """Our CA with the doctor, the pharmacy, the laboratory and a certificate of a facility the
    registry does not know; used by the peers, the gateway and the parties alike."""
    directory = str(tmp_path_factory.mktemp("reform-pki"))
    init_dev_pki(directory, [DOCTOR_ID, PHARMACY_ID, LAB_ID, STRANGER_ID])
    return directory


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory):
    """Another CA that issued a certificate in the pharmacy's name."""
    directory = str(tmp_path_factory.mktemp("foreign-pki"))
    init_dev_pki(directory, [PHARMACY_ID])
    return directory


def reform_config(make_config, db_url, peers):
    """The shipped registry, routes and prescription settings; MLLP over TLS and the HTTPS
    door on free ports; the sandbox peers as destinations."""
    shipped = load_config(os.path.join(ROOT, "conf", "gateway.yaml"), environ={})
    base = make_config(db_url)
    record = DestinationConfig("shared-record", "fhir-record", peers.url("record"),
                               response_timeout=5, retry=FAST_RETRY)
    cnss = DestinationConfig("cnss", "cnss", peers.url("cnss") + "/", response_timeout=5, retry=FAST_RETRY)
    return dataclasses.replace(
        base, senders=shipped.senders, facility_types=shipped.facility_types,
        mllp=(MllpListenerConfig("mllp-tls", 0, tls=True),),
        https=(HttpsListenerConfig("https", 0),),
        mappings=MappingsConfig(os.path.join(ROOT, "mappings")), destinations=(record, cnss),
        routes=shipped.routes, delivery=DeliveryConfig(lease=5, poll_interval=0.1),
        prescriptions=dataclasses.replace(shipped.prescriptions, eligibility="cnss",
                                          eligibility_timeout=5))


def over_tls(port: int, pki: str, who: str, *messages: bytes) -> list[bytes | None]:
    """Send `messages` over MLLP/TLS presenting `who`'s certificate from `pki`."""
    context = client_tls_context(os.path.join(pki, "ca.crt"), os.path.join(pki, f"{who}.crt"),
                                 os.path.join(pki, f"{who}.key"))
    with MllpClient("127.0.0.1", port, timeout=20, tls=context) as client:
        return [client.send(message).response for message in messages]


def segments(answer: bytes, name: str) -> list[list[str]]:
    return [s.split("|") for s in answer.decode().strip("\r").split("\r") if s.startswith(name + "|")]


def adt_from_pharmacy() -> bytes:
    return ("MSH|^~\\&|PHARMA_AGDAL|PHARM_AGDAL|MA_HIE_GATEWAY|MA_HIE|20260116090000||ADT^A04^ADT_A01|"
            f"ADT-PH-1|P|2.5|||||MAR|UNICODE UTF-8\rEVN|A04|20260116090000\r{PATIENT}\r"
            "PV1|1|O\r").encode("utf-8")


@pytest_twisted.inlineCallbacks
def test_the_reform_end_to_end(make_config, peers, dev_pki, foreign_pki, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    config = reform_config(make_config, db_url, peers)
    root = build_service(config, reactor)
    root.startService()
    try:
        mllp = (yield listening_port(root.getServiceNamed("mllp-tls"))).getHost().port
        https = (yield listening_port(root.getServiceNamed("https"))).getHost().port
        door = Door(config, https, dev_pki, None, None)
        pharmacy, laboratory = Client(door, PHARMACY_ID), Client(door, LAB_ID)

        # 1. The doctor prescribes two drugs (2 boxes, 1 box): RRE^O12, id in ORC-3, QR in NTE.
        [answer] = yield threads.deferToThread(over_tls, mllp, dev_pki, DOCTOR_ID,
                                               rde("REFORM-RX-1", ((DOLIPRANE, 2), (AMOXIL, 1))))
        assert segments(answer, "MSA")[0][1] == "AA"
        prescription_id = segments(answer, "ORC")[0][3].split("^")[0]
        payload = segments(answer, "NTE")[0][3]

        # 2. The pharmacy scans the QR and looks the prescription up: everything remains.
        found = yield pharmacy.post("/v1/prescriptions/lookup", json.dumps({"qr": payload}).encode(),
                                    "application/json")
        assert found.code == 200, found.body
        view = found.json()
        assert view["id"] == prescription_id and view["status"] == "active"
        assert [(line["quantity"], line["remaining"]) for line in view["lines"]] == [(2, 2), (1, 1)]

        # 3. It dispenses the two boxes of the first drug over MLLP/TLS ...
        [first] = yield threads.deferToThread(over_tls, mllp, dev_pki, PHARMACY_ID,
                                              rds("REFORM-DISP-1", prescription_id, ((DOLIPRANE, 2),)))
        assert segments(first, "MSA")[0][1] == "AA", first
        # ... and the rest over REST, the same HL7 through the other door.
        rest = yield pharmacy.post("/v1/hl7v2", rds("REFORM-DISP-2", prescription_id, ((AMOXIL, 1),)),
                                   "application/hl7-v2", Idempotency_Key="reform-disp-2")
        assert rest.code == 200 and rest.json()["ack_code"] == "AA", rest.body
        # 4. A third dispensation would exceed the prescription: refused with the reason.
        [third] = yield threads.deferToThread(over_tls, mllp, dev_pki, PHARMACY_ID,
                                              rds("REFORM-DISP-3", prescription_id, ((AMOXIL, 1),)))
        assert segments(third, "MSA")[0][1] == "AE"
        assert "over-dispensing" in segments(third, "ERR")[0][7]
        gone = yield pharmacy.post("/v1/prescriptions/lookup", json.dumps({"qr": payload}).encode(),
                                   "application/json")
        assert gone.code == 410  # fully dispensed: nothing left to look up

        # 5. Who may do what: a pharmacy cannot send ADT; a laboratory cannot dispense.
        [adt] = yield threads.deferToThread(over_tls, mllp, dev_pki, PHARMACY_ID, adt_from_pharmacy())
        assert segments(adt, "MSA")[0][1] == "AR" and "MESSAGE_TYPE_NOT_ALLOWED" in segments(adt, "ERR")[0][5]
        [lab] = yield threads.deferToThread(over_tls, mllp, dev_pki, LAB_ID,
                                            rds("REFORM-LAB-1", prescription_id, ((AMOXIL, 1),),
                                                sender=LABORATORY))
        assert segments(lab, "MSA")[0][1] in ("AR", "AE")
        lab_rest = yield laboratory.post("/v1/hl7v2", rds("REFORM-LAB-2", prescription_id, ((AMOXIL, 1),),
                                                          sender=LABORATORY), "application/hl7-v2")
        assert lab_rest.code == 422

        # 6. Certificates that name no facility, or come from another CA, cannot get in.
        stranger = yield Client(door, STRANGER_ID).request("GET", "/v1/openapi.json")
        assert stranger.code == 401
        closed = yield threads.deferToThread(over_tls, mllp, dev_pki, STRANGER_ID,
                                             rds("REFORM-X-1", prescription_id))
        assert closed == [None]  # disconnected without an answer
        kept = yield until("SELECT door, status, certificate FROM api_refusals WHERE facility_id IS NULL",
                           lambda rows: len(rows) == 2, db_url)
        assert sorted((r.door, r.status) for r in kept) == [("mllp", 401), ("rest", 401)]
        assert all(STRANGER_ID in r.certificate for r in kept)  # kept for the audit, by subject
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            yield threads.deferToThread(over_tls, mllp, foreign_pki, PHARMACY_ID,
                                        rds("REFORM-X-2", prescription_id))

        # 7. The peers: CNSS holds exactly the lines of the two accepted dispensations, the
        # shared record the prescription's MedicationRequests and the two MedicationDispenses.
        delivered = yield until(DELIVERIES, lambda rows: len(rows) == 5 and all(
            r.status == "delivered" for r in rows), db_url, timeout=30)
        assert sorted((r.control_id, r.destination) for r in delivered) == [
            ("REFORM-DISP-1", "cnss"), ("REFORM-DISP-1", "shared-record"),
            ("REFORM-DISP-2", "cnss"), ("REFORM-DISP-2", "shared-record"),
            ("REFORM-RX-1", "shared-record")]
        cnss = peers.service.peers["cnss"]
        lines = yield cnss.run(cnss.store.prescription_lines, prescription_id)
        assert sorted((line.prescription, line.line) for line in lines) == [(prescription_id, 1),
                                                                             (prescription_id, 2)]
        assert len({line.care_sheet for line in lines}) == 2
        requests = yield peers.search("/MedicationRequest?_count=50")
        assert requests["total"] == 2  # one per prescribed drug, both with the prescription id
        assert {entry["resource"]["groupIdentifier"]["value"] for entry in requests["entry"]} == {prescription_id}
        dispenses = yield peers.search("/MedicationDispense?_count=50")
        assert dispenses["total"] == 2
        patients = yield peers.search("/Patient?identifier=" + quote("urn:ma:cnie|BE123456"))
        assert patients["total"] == 1
    finally:
        yield root.stopService()


@pytest_twisted.inlineCallbacks
def test_a_fhir_prescription_over_rest_comes_back_with_its_id_and_qr(make_config, peers, dev_pki, tmp_path):
    """Modern software prescribes with a FHIR Bundle: the transaction-response gives back the
    MedicationRequest with the prescription id; its QR image is the prescriber's to fetch, and
    another facility cannot."""
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    config = reform_config(make_config, db_url, peers)
    root = build_service(config, reactor)
    root.startService()
    try:
        https = (yield listening_port(root.getServiceNamed("https"))).getHost().port
        door = Door(config, https, dev_pki, None, None)
        doctor = Client(door, DOCTOR_ID)
        bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:p1", "request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient", "identifier": [
                 {"system": "urn:ma:cnie", "value": "BE123456"},
                 {"system": "urn:ma:cnss:immatriculation", "value": "112233445"}]}},
            {"fullUrl": "urn:uuid:r1", "request": {"method": "POST", "url": "MedicationRequest"},
             "resource": {
                 "resourceType": "MedicationRequest", "status": "active", "intent": "order",
                 "subject": {"reference": "urn:uuid:p1"},
                 "requester": {"identifier": {"system": "urn:ma:inpe", "value": "200001"}},
                 "medicationCodeableConcept": {"coding": [
                     {"system": "https://www.gs1.org/gtin", "code": "6118001230068"}]},
                 "dispenseRequest": {"quantity": {"value": 2, "unit": "boîte"}}}}]}
        answer = yield doctor.post("/v1/fhir", json.dumps(bundle).encode(), "application/fhir+json")
        assert answer.code == 200, answer.body
        response = answer.json()
        assert response["type"] == "transaction-response"
        patient, request = response["entry"]
        assert "resource" not in patient  # only what the gateway added something to comes back
        prescription_id = request["resource"]["groupIdentifier"]["value"]
        assert prescription_id.startswith("RX-")
        assert request["response"]["location"] == "MedicationRequest/" + request["resource"]["id"]

        image = yield doctor.request("GET", f"/v1/prescriptions/{prescription_id}/qr?format=svg")
        assert image.code == 200 and image.header("content-type").startswith("image/svg+xml")
        assert b"<svg" in image.body
        other = yield Client(door, PHARMACY_ID).request("GET", f"/v1/prescriptions/{prescription_id}/qr")
        assert other.code in (403, 404)  # a pharmacy may not fetch the prescriber's QR image
        looked_up = yield Client(door, PHARMACY_ID).request("GET", f"/v1/prescriptions/{prescription_id}")
        assert looked_up.code == 200 and looked_up.json()["lines"][0]["remaining"] == 2
    finally:
        yield root.stopService()

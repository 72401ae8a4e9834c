"""The CNSS care-sheet adapter: canonical bundles -> zeep-built SOAP requests -> outcomes.

The golden canonical outputs (DFT^P03 NGAP acts, RDS^O13 dispenses, the pharmacy CSV) become
care sheets that the real CNSS peer accepts over mutual TLS; non-billable bundles give None;
what cannot make a care sheet gives a precise CareSheetError; every kind of answer is
classified as delivered, transient or permanent.
"""
from __future__ import annotations

import json
from datetime import date
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import pytest_twisted
import zeep
from lxml import etree

from adapters.soap.cnss import NAMESPACE, WSDL_PATH
from gateway.delivery.care_sheet import (
    CareSheetError,
    Eligibility,
    EligibilityUnavailable,
    LocalContractTransport,
    care_sheet_from_bundle,
    care_sheet_request,
    classify_response,
    cnss_client,
    eligibility_request,
    read_eligibility,
)
from gateway.delivery.outcome import HttpResponse
from gateway.mapping.golden import GOLDEN_RECEIVED_AT
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import TranslationContext
from gateway.translation.inputs import read_input
from test_sandbox_cnss import certs, cnss, http, read, rows, set_fault  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "mappings" / "tests"
SENDER = "INPE-100001"  # the registry id the live path records in the Provenance
KEY = "msg-000042:cnss"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


def golden(name: str) -> dict:
    return json.loads((CASES / name).read_text(encoding="utf-8"))


@pytest.fixture
def mapping_set(repo_mappings) -> MappingSet:
    return repo_mappings


def live(mapping_set: MappingSet, name: str, sender: str = SENDER) -> dict:
    """The golden input translated as on the live path, from a sender known to the registry."""
    parsed = read_input((CASES / name).read_bytes())
    context = TranslationContext(sender_id=sender, timezone=ZoneInfo("Africa/Casablanca"),
                                 received_at=GOLDEN_RECEIVED_AT,
                                 message_key=f"{sender}|{parsed.control_id}", control_id=parsed.control_id)
    return mapping_set.translate(parsed.message, context, parsed.message_type).bundle


# -- canonical -> care sheet -----------------------------------------------------------------

def test_rds_dispense_becomes_a_drug_care_sheet():
    """RDS^O13: EAN-13 line without a price, prescriber from the order, pharmacy and pharmacist by INPE, prescription id."""
    assert care_sheet_from_bundle(golden("orders/rds-o13-dispense.json")) == {
        "assure": {"immatriculation": "112233445", "cnie": "BE123456"},
        "beneficiaire": {"lien": "ASSURE"},
        "inpePrescripteur": "100456789",
        "executant": {"inpeEtablissement": "200123456", "inpePraticien": "200987654"},
        "numeroPrescription": "ORD-2026-000123",
        "dateSoins": date(2026, 1, 16),
        "lignes": {"ligne": [{"codeEAN13": "6118001230068", "libelle": "DOLIPRANE 1000 mg comprimé B8",
                              "quantite": Decimal("2")}]},
    }


def test_pharmacy_csv_becomes_a_priced_care_sheet_identified_by_cnie():
    """The CSV export: insured by CNIE only, the pharmacy's INPE, unit prices x quantities and their total."""
    sheet = care_sheet_from_bundle(golden("legacy/pharmacy-dispense-rabat.json"))
    assert sheet["assure"] == {"cnie": "BK123456"} and sheet["executant"] == {"inpeEtablissement": "081234567"}
    assert "inpePrescripteur" not in sheet and sheet["numeroPrescription"] == "ORD-2026-000123"
    assert [(line["codeEAN13"], line["quantite"], line["prixUnitaire"], line["montant"])
            for line in sheet["lignes"]["ligne"]] == [
        ("6118001230068", Decimal("2"), Decimal("16.80"), Decimal("33.60")),
        ("6118000041214", Decimal("1"), Decimal("98.50"), Decimal("98.50"))]
    assert sheet["montantTotal"] == Decimal("132.10") and sheet["dateSoins"] == date(2026, 1, 14)


def test_dft_acts_become_an_ngap_care_sheet_when_the_sender_is_known(mapping_set):
    """DFT^P03 on the live path: NGAP C and K20 with amounts, unit price derived, ordering provider as prescriber, sender as facility."""
    sheet = care_sheet_from_bundle(live(mapping_set, "orders/dft-p03-ngap.hl7"))
    assert sheet["executant"] == {"inpeEtablissement": SENDER, "inpePraticien": "100234567"}
    assert sheet["inpePrescripteur"] == "100345678" and "numeroPrescription" not in sheet
    assert sheet["lignes"]["ligne"] == [
        {"acte": {"nomenclature": "NGAP", "code": "C"}, "libelle": "Consultation de médecin spécialiste",
         "quantite": Decimal("1"), "prixUnitaire": Decimal("250.00"), "montant": Decimal("250.00")},
        {"acte": {"nomenclature": "NGAP", "code": "K"}, "libelle": "Acte de chirurgie (lettre clé K)",
         "quantite": Decimal("20"), "prixUnitaire": Decimal("50.00"), "montant": Decimal("1000.00")},
    ]
    assert sheet["montantTotal"] == Decimal("1250.00") and sheet["dateSoins"] == date(2026, 1, 15)


@pytest.mark.parametrize("name", ["orders/dft-p03-ngap.json", "orders/rds-o13-without-order.json"])
def test_without_a_facility_inpe_the_care_sheet_is_refused(name):
    """Golden outputs translated without a sender name no facility: a precise error, not a guess."""
    with pytest.raises(CareSheetError, match="no performing facility INPE"):
        care_sheet_from_bundle(golden(name))


@pytest.mark.parametrize("name", ["adt/a01-admission.json", "adt/a08-update.json",
                                  "orders/rde-o11-eprescription.json", "orders/orm-o01-radiology.json",
                                  "legacy/astm-cbc-chu-rabat.json"])
def test_non_billable_bundles_give_none(name):
    """Admissions, orders and results carry nothing billable: no care sheet, no request."""
    bundle = golden(name)
    assert care_sheet_from_bundle(bundle) is None
    assert care_sheet_request(bundle, url="https://127.0.0.1:9443/", idempotency_key=KEY) is None


def test_charge_items_not_billable_and_dispenses_not_completed_are_ignored():
    """Only ChargeItem `billable` and MedicationDispense `completed` count."""
    bundle = golden("orders/rds-o13-dispense.json")
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == "MedicationDispense":
            entry["resource"]["status"] = "in-progress"
    assert care_sheet_from_bundle(bundle) is None


def test_a_spouse_is_sent_as_beneficiary_of_the_subscriber():
    """A Coverage naming the patient as spouse makes the subscriber the insured and the patient a CONJOINT beneficiary."""
    bundle = golden("legacy/pharmacy-dispense-rabat.json")
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient.update(name=[{"family": "ALAOUI", "given": ["Leila"]}], birthDate="1980-04-02")
    bundle["entry"].append({"fullUrl": "urn:uuid:cov", "resource": {
        "resourceType": "Coverage", "status": "active", "subscriberId": "223344556",
        "beneficiary": {"reference": f"urn:uuid:{patient['id']}"},
        "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship",
                                     "code": "spouse"}]}}})
    sheet = care_sheet_from_bundle(bundle)
    assert sheet["assure"] == {"immatriculation": "223344556"}
    assert sheet["beneficiaire"] == {"lien": "CONJOINT", "cnie": "BK123456", "nom": "ALAOUI",
                                     "prenom": "Leila", "dateNaissance": date(1980, 4, 2)}




def _dependant(family, given) -> dict:
    """The CSV bundle for a spouse whose name is `family`, `given` (None: left out)."""
    bundle = _coverage(golden("legacy/pharmacy-dispense-rabat.json"), "spouse")
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    name = {k: v for k, v in (("family", family), ("given", given)) if v is not None}
    patient.update(name=[name])
    return bundle


@pytest.mark.parametrize("family, given, nom, prenom", [
    ("EL ALAOUI", ["Fatima", "Zahra"], "EL ALAOUI", "Fatima Zahra"),  # XPN-2 and XPN-3: both given names
    ("العلوي", ["فاطمة الزهراء"], "العلوي", "فاطمة الزهراء"),
    ("   ", [" ", "Leïla"], None, "Leïla"),  # blank parts are missing parts, not names
    (" D'Aubigné & Fils <x> ", [None, "Zoé"], "D'Aubigné & Fils <x>", "Zoé"),
    ("", [], None, None),
])
def test_a_dependants_names_are_sent_whole(family, given, nom, prenom):
    """Every given name (first and further), trimmed; blank parts left out; never 'None'."""
    beneficiary = care_sheet_from_bundle(_dependant(family, given))["beneficiaire"]
    assert (beneficiary.get("nom"), beneficiary.get("prenom")) == (nom, prenom)


@pytest.mark.parametrize("family, given, words", [
    ("B" * 101, ["Leila"], "Patient.name.family is longer than 100 characters"),
    ("ALAOUI", ["L" * 60, "Z" * 40], "Patient.name.given is longer than 100 characters"),
])
def test_a_name_longer_than_the_contract_is_refused_not_cut(family, given, words):
    """fse:Nom holds 100 characters: a longer name is refused, never sent cut short."""
    with pytest.raises(CareSheetError, match=words) as error:
        care_sheet_from_bundle(_dependant(family, given))
    assert "BBBB" not in error.value.reason and "LLLL" not in error.value.reason


@pytest.mark.parametrize("where, make", [
    ("lignes/ligne[1]/libelle", lambda text: _edit(CSV, "MedicationDispense", lambda d: d[
        "medicationCodeableConcept"]["coding"][0].update(display=text))),
    ("beneficiaire/nom", lambda text: _dependant(text, ["Leila"])),
    ("beneficiaire/prenom", lambda text: _dependant("ALAOUI", [text])),
])
@pytest.mark.parametrize("text", ["BENALI\x01", "BENALI\x00", "BENALI\ud800", "BENALI\ufffe", "BENALI\x1b[0m"])
def test_characters_xml_cannot_carry_are_refused_naming_the_field(where, make, text):
    """Control characters, U+FFFE and lone surrogates cannot be in XML: the refusal names the
    element (lxml's and the codec's own messages named none), never the value."""
    with pytest.raises(CareSheetError) as error:
        care_sheet_request(make(text), url="https://127.0.0.1:9443/", idempotency_key=KEY)
    assert f"{where} has a character XML cannot carry" in error.value.reason
    assert "BENALI" not in error.value.reason


@pytest.mark.parametrize("display, text, label", [
    ("   ", "DOLIPRANE 1000", "DOLIPRANE 1000"),
    ("\t", None, "6118001230068"),
    ("", "  ", "6118001230068"),
    ("  DOLIPRANE\n 1000 ", None, "DOLIPRANE 1000"),
])
def test_a_blank_display_falls_back_to_the_text_or_the_code(display, text, label):
    """A blank display is no label (it made an empty libelle, refused by the schema): the
    concept's text, else the code, as when there is no display at all."""
    def change(dispense):
        concept = dispense["medicationCodeableConcept"]
        concept["coding"][0]["display"] = display
        concept.pop("text", None)
        if text is not None:
            concept["text"] = text
    sheet = care_sheet_from_bundle(_edit(RDS, "MedicationDispense", change))
    assert sheet["lignes"]["ligne"][0]["libelle"] == label

@pytest.mark.parametrize("handed_over, day", [
    ("2026-01-15T23:30:00Z", date(2026, 1, 16)),  # 00:30 on the 16th in Casablanca (UTC+1)
    ("2026-01-16T01:30:00+03:00", date(2026, 1, 15)),  # 23:30 on the 15th in Casablanca
    ("2026-01-15T23:30:00+01:00", date(2026, 1, 15)),
    ("2026-01-15T23:30:00", date(2026, 1, 15)),  # no offset: the sender's own day
    ("2026-03-01T23:30:00Z", date(2026, 3, 1)),  # Ramadan: Morocco is on UTC+0
    ("2026-01-15", date(2026, 1, 15)),
    # Past the last (or before the first) day datetime can hold: OverflowError used to escape
    # the adapter ("cannot build the request: date value out of range").
    ("9999-12-31T23:30:00Z", date(9999, 12, 31)),
    ("0001-01-01T00:30:00+01:00", date(1, 1, 1)),
])
def test_the_day_of_care_is_the_day_in_casablanca(handed_over, day):
    """A time with an offset falls on its day in Africa/Casablanca, as AMO rights are checked
    (the prescription flow's eligibility query): not on the day written in another zone."""
    bundle = _edit(RDS, "MedicationDispense", lambda d: d.update(whenHandedOver=handed_over))
    assert care_sheet_from_bundle(bundle)["dateSoins"] == day

def _edit(name: str, resource_type: str, change) -> dict:
    bundle = golden(name)
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == resource_type:
            change(entry["resource"])
    return bundle


def _second_patient(bundle: dict) -> dict:
    dispense = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "MedicationDispense")
    bundle["entry"].append({"fullUrl": "urn:uuid:other", "resource": {
        "resourceType": "Patient", "id": "other", "identifier": [{"system": "urn:ma:cnie", "value": "CD112233"}]}})
    dispense["subject"] = {"reference": "urn:uuid:other"}
    return bundle


CSV = "legacy/pharmacy-dispense-rabat.json"
RDS = "orders/rds-o13-dispense.json"
DFT = "orders/dft-p03-ngap.json"

REFUSALS = {
    # case: (bundle, words of the reason)
    "not a bundle": (lambda: {"resourceType": "Patient"}, "not a FHIR Bundle"),
    "two patients": (lambda: _second_patient(golden(CSV)), "2 patients"),
    "patient without national ids": (lambda: _edit(RDS, "Patient", lambda p: p.update(identifier=[])),
                                     "neither a CNSS immatriculation"),
    "drug without EAN-13": (lambda: _edit(RDS, "MedicationDispense", lambda d: d["medicationCodeableConcept"]
                                          ["coding"][0].update(system="urn:oid:local")), "no EAN-13"),
    "EAN-13 check digit wrong": (lambda: _edit(RDS, "MedicationDispense", lambda d: d["medicationCodeableConcept"]
                                               ["coding"][0].update(code="6118001230069")), "not a valid EAN-13"),
    "dispense without quantity": (lambda: _edit(RDS, "MedicationDispense", lambda d: d.pop("quantity")),
                                  "has no quantity"),
    "price with 3 decimals": (lambda: _edit(CSV, "MedicationDispense", lambda d: d["extension"][0]["valueMoney"]
                                            .update(value=16.805)), "more than 2 decimals"),
    "price in euros": (lambda: _edit(CSV, "MedicationDispense", lambda d: d["extension"][0]["valueMoney"]
                                     .update(currency="EUR")), "MAD only"),
    "act without NGAP code": (lambda: _edit(DFT, "ChargeItem", lambda c: c["code"]["coding"][0]
                                            .update(system="urn:oid:local")), "no NGAP"),
    "act without price": (lambda: _edit(DFT, "ChargeItem", lambda c: c.pop("priceOverride")), "has no price"),
    # Decimal NaN, infinities and numbers past the context's precision used to escape as
    # decimal.InvalidOperation instead of a reason.
    "act price NaN": (lambda: _edit(DFT, "ChargeItem", lambda c: c["priceOverride"].update(value="NaN")),
                      "ChargeItem 1 price is not a finite number"),
    "unit price Infinity": (lambda: _edit(CSV, "MedicationDispense", lambda d: d["extension"][0]["valueMoney"]
                                          .update(value="Infinity")), "unit price is not a finite number"),
    "act price 1E+30": (lambda: _edit(DFT, "ChargeItem", lambda c: c["priceOverride"].update(value="1E+30")),
                        "ChargeItem 1 price has more than 10 digits before the decimal point"),
    "quantity NaN": (lambda: _edit(RDS, "MedicationDispense", lambda d: d["quantity"].update(value="NaN")),
                     "MedicationDispense 1 quantity is not a finite number"),
    "quantity 1E+30": (lambda: _edit(CSV, "MedicationDispense", lambda d: d["quantity"].update(value=1e30)),
                       "MedicationDispense 1 quantity is more than 100000"),
    # A price divided by a tiny quantity escaped as decimal.InvalidOperation (or Overflow).
    "act quantity 1E-20": (lambda: _edit(DFT, "ChargeItem", lambda c: (c["priceOverride"].update(value="9999999999.99"),
                                                                       c.update(quantity={"value": "1E-20"}))),
                           "ChargeItem 1 quantity has more than 3 decimals"),
    "act quantity 1E-999999999": (lambda: _edit(DFT, "ChargeItem", lambda c: c.update(quantity={"value": "1E-999999999"})),
                                  "ChargeItem 1 quantity has more than 3 decimals"),
    "covered as a parent": (lambda: _coverage(golden(CSV), "parent"), "AMO care sheets cover"),
    "dispense without date": (lambda: _edit(RDS, "MedicationDispense", lambda d: d.pop("whenHandedOver")),
                              "no date of care"),
}


def _coverage(bundle: dict, relationship: str) -> dict:
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    bundle["entry"].append({"resource": {
        "resourceType": "Coverage", "status": "active", "subscriberId": "223344556",
        "beneficiary": {"reference": f"urn:uuid:{patient['id']}"},
        "relationship": {"coding": [{"code": relationship}]}}})
    return bundle


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_cannot_make_a_care_sheet_is_a_precise_error(case):
    """Each gap gets its own reason, which names no patient data."""
    make, words = REFUSALS[case]
    with pytest.raises(CareSheetError) as error:
        care_sheet_from_bundle(make())
    assert words in error.value.reason
    for value in ("BENALI", "BK123456", "BE123456", "112233445"):
        assert value not in error.value.reason


def test_several_prescribers_in_one_message_are_refused(mapping_set):
    """Two different ordering providers cannot share one care sheet."""
    bundle = live(mapping_set, "orders/dft-p03-ngap.hl7")
    bundle["entry"].append({"fullUrl": "urn:uuid:another-doctor", "resource": {
        "resourceType": "Practitioner", "id": "another-doctor",
        "identifier": [{"system": "urn:ma:inpe", "value": "100999999"}]}})
    consultation = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ChargeItem")
    consultation["performer"].append({
        "function": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0443", "code": "OP"}]},
        "actor": {"reference": "urn:uuid:another-doctor"}})
    with pytest.raises(CareSheetError, match="2 different prescribers"):
        care_sheet_from_bundle(bundle)


def test_a_key_outside_the_contract_is_refused_before_sending():
    """The envelope is checked against the XSD: a malformed idempotency key never leaves."""
    with pytest.raises(CareSheetError, match="cleIdempotence does not match the CNSS schema"):
        care_sheet_request(golden(CSV), url="https://127.0.0.1:9443/", idempotency_key="a b")


# -- the request -----------------------------------------------------------------------------

def test_the_request_is_a_zeep_envelope_with_the_wsdl_soap_action():
    """POST text/xml with the operation's SOAPAction from the WSDL, the key, and a body valid for the XSD."""
    request = care_sheet_request(golden(CSV), url="https://127.0.0.1:9443/", idempotency_key=KEY)
    assert (request.method, request.url) == ("POST", "https://127.0.0.1:9443/")
    assert request.headers["Content-Type"] == "text/xml; charset=utf-8"
    action = cnss_client().service._binding.get("SoumettreFeuilleDeSoins").soapaction
    assert request.headers["SOAPAction"] == f'"{action}"'
    root = etree.fromstring(request.body)
    operation = root.find(f"{{{SOAP_ENV}}}Body")[0]
    assert operation.tag == f"{{{NAMESPACE}}}SoumettreFeuilleDeSoins"
    assert operation.findtext(f"{{{NAMESPACE}}}cleIdempotence") == KEY
    assert operation.findtext(f"{{{NAMESPACE}}}montantTotal") == "132.10"
    again = care_sheet_request(golden(CSV), url="https://127.0.0.1:9443/", idempotency_key=KEY)
    assert again.body == request.body  # a retry re-sends the same bytes


def test_zeep_reads_only_the_contract_files():
    """The client is built once; its transport refuses URLs and files outside the contract folder."""
    assert cnss_client() is cnss_client()
    transport = LocalContractTransport()
    with pytest.raises(zeep.exceptions.TransportError, match="the CNSS contract is local"):
        transport.load("https://cnss.example/cnss.wsdl")
    with pytest.raises(zeep.exceptions.TransportError, match="outside"):
        transport.load("/etc/passwd")
    with pytest.raises(zeep.exceptions.TransportError):
        transport.post("https://cnss.example/", b"", {})
    assert transport.load(WSDL_PATH).startswith(b"<?xml")


def test_eligibility_request_needs_exactly_one_identifier():
    """VerifierDroits by immatriculation or by CNIE, never both nor neither."""
    for bad in ({}, {"immatriculation": "112233445", "cnie": "BE123456"}):
        with pytest.raises(ValueError):
            eligibility_request(url="https://127.0.0.1:9443/", on=date(2026, 1, 15), **bad)


# -- end to end with the real peer -----------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_golden_billable_bundles_are_accepted_by_the_peer_once(cnss, certs, mapping_set):
    """Every golden billable message becomes a care sheet the peer accepts; a retry gets the same number and no second sheet."""
    bundles = {
        "dft": live(mapping_set, "orders/dft-p03-ngap.hl7"),
        "rds": golden(RDS),
        "rds without order": live(mapping_set, "orders/rds-o13-without-order.hl7"),
        "csv": golden(CSV),
    }
    numbers = {}
    for name, bundle in bundles.items():
        request = care_sheet_request(bundle, url=cnss.url, idempotency_key=f"msg-{len(numbers) + 1:06d}:cnss")
        response = yield http(certs, request.url, request.body, headers=request.headers)
        outcome = classify_response(response, request)
        assert outcome.kind == "delivered", (name, outcome.reason, response.body[:600])
        numbers[name] = outcome.reason
        retry = yield http(certs, request.url, request.body, headers=request.headers)
        assert classify_response(retry, request).reason == outcome.reason
    assert all(reason.startswith("care sheet FSE-") and reason.endswith("RECUE") for reason in numbers.values())
    assert len(set(numbers.values())) == 4 and rows(cnss.store_path) == 4


@pytest_twisted.inlineCallbacks
def test_eligibility_request_is_answered_by_the_peer(cnss, certs):
    """The VerifierDroits envelope is accepted (a lower-case CNIE is sent upper-case) and its answer read."""
    request = eligibility_request(url=cnss.url, on=date(2026, 1, 15), cnie="be123456")
    response = yield http(certs, request.url, request.body, headers=request.headers)
    assert read("VerifierDroits", response).droitsOuverts is True
    eligibility = read_eligibility(response)
    assert (eligibility.rights_open, eligibility.motive, eligibility.on) == (True, "DROITS_OUVERTS", date(2026, 1, 15))
    assert (eligibility.immatriculation, eligibility.cnie) == ("112233445", "BE123456")
    assert [(d.rank, d.relationship, d.cnie) for d in eligibility.dependants] == \
        [(1, "CONJOINT", "BE654321"), (2, "ENFANT", None), (3, "ENFANT", None)]

    unknown = eligibility_request(url=cnss.url, on=date(2026, 1, 15), immatriculation="999999999")
    response = yield http(certs, unknown.url, unknown.body, headers=unknown.headers)
    assert read_eligibility(response) == Eligibility(False, "ASSURE_INCONNU", date(2026, 1, 15))

    yield set_fault(certs, cnss, mode="soap_fault", count=1)
    response = yield http(certs, request.url, request.body, headers=request.headers)
    with pytest.raises(EligibilityUnavailable) as unavailable:
        read_eligibility(response)
    assert unavailable.value.outcome.kind == "transient"


def test_an_answer_that_is_not_an_eligibility_is_refused():
    """A 200 that is not a valid VerifierDroitsReponse is a permanent EligibilityUnavailable."""
    with pytest.raises(EligibilityUnavailable) as unavailable:
        read_eligibility(HttpResponse(200, {}, ANSWER))
    assert unavailable.value.outcome.kind == "permanent"


@pytest.mark.parametrize("zone", ["Z", "+01:00", "-00:00"])
def test_eligibility_dates_with_a_zone_are_read(zone):
    """xs:date may carry a zone (JAXB writes one): such an answer, valid by the contract, used
    to be refused as no VerifierDroitsReponse."""
    body = (f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body><f:VerifierDroitsReponse xmlns:f="{NAMESPACE}">'
            f"<f:droitsOuverts>true</f:droitsOuverts><f:motif>DROITS_OUVERTS</f:motif>"
            f"<f:dateReference>2026-01-15{zone}</f:dateReference>"
            "<f:assure><f:immatriculation>112233445</f:immatriculation><f:nom>TEST</f:nom><f:prenom>A</f:prenom>"
            f"<f:regime>AMO_SALARIES</f:regime><f:debutDroits>2020-01-01{zone}</f:debutDroits></f:assure>"
            "<f:ayantsDroit><f:ayantDroit><f:rang>1</f:rang><f:lien>ENFANT</f:lien><f:nom>TEST</f:nom>"
            f"<f:prenom>B</f:prenom><f:dateNaissance>2015-06-30{zone}</f:dateNaissance></f:ayantDroit>"
            "</f:ayantsDroit></f:VerifierDroitsReponse></s:Body></s:Envelope>").encode()
    eligibility = read_eligibility(HttpResponse(200, {}, body))
    assert (eligibility.rights_open, eligibility.on, eligibility.immatriculation) == (True, date(2026, 1, 15), "112233445")
    assert [(d.rank, d.relationship, d.birth_date) for d in eligibility.dependants] == [(1, "ENFANT", date(2015, 6, 30))]


@pytest_twisted.inlineCallbacks
def test_peer_faults_are_classified(cnss, certs):
    """A Client fault from the peer is permanent with its code; an injected Server fault and a 503 are transient."""
    request = care_sheet_request(golden(CSV), url=cnss.url, idempotency_key=KEY)
    bad = request.body.replace(b"6118001230068", b"6118001230069")
    response = yield http(certs, request.url, bad, headers=request.headers)
    outcome = classify_response(response)
    assert outcome.kind == "permanent" and outcome.response is response
    assert outcome.reason.startswith("CNSS Client fault EAN13_INVALIDE: code EAN-13 invalide")

    yield set_fault(certs, cnss, mode="soap_fault", count=1)
    response = yield http(certs, request.url, request.body, headers=request.headers)
    assert classify_response(response).kind == "transient"
    assert "Server fault SERVICE_INDISPONIBLE" in classify_response(response).reason

    yield set_fault(certs, cnss, mode="http_503", count=1)
    response = yield http(certs, request.url, request.body, headers=request.headers)
    assert (classify_response(response).kind, classify_response(response).reason) == ("transient", "CNSS HTTP 503")

    yield set_fault(certs, cnss, mode="http_500", count=1)
    response = yield http(certs, request.url, request.body, headers=request.headers)
    assert classify_response(response).kind == "transient"

    response = yield http(certs, request.url, request.body, headers=request.headers)
    assert classify_response(response).kind == "delivered" and rows(cnss.store_path) == 1


# -- classification of every kind of answer --------------------------------------------------

def _fault(code: str, string: str = "x", error: str | None = None, status: int = 500) -> HttpResponse:
    detail = (f'<detail><f:Erreur xmlns:f="{NAMESPACE}"><f:code>{error}</f:code><f:message>m</f:message>'
              f"</f:Erreur></detail>") if error else ""
    body = (f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body><s:Fault><faultcode>{code}</faultcode>'
            f"<faultstring>{string}</faultstring>{detail}</s:Fault></s:Body></s:Envelope>").encode()
    return HttpResponse(status, {"content-type": "text/xml; charset=utf-8"}, body)


ANSWER = (f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body><f:SoumettreFeuilleDeSoinsReponse xmlns:f="{NAMESPACE}">'
          "<f:numeroDossier>FSE-2026-00000007</f:numeroDossier><f:cleIdempotence>msg-000042:cnss</f:cleIdempotence>"
          "<f:statut>RECUE</f:statut><f:dateReception>2026-01-15T09:30:00Z</f:dateReception>"
          "</f:SoumettreFeuilleDeSoinsReponse></s:Body></s:Envelope>").encode()

CLASSIFICATION = {
    # case: (response, kind, reason or its start)
    "answer": (HttpResponse(200, {}, ANSWER), "delivered", "care sheet FSE-2026-00000007 RECUE"),
    "client fault": (_fault("soap:Client", "non conforme", "SCHEMA"), "permanent", "CNSS Client fault SCHEMA: non conforme"),
    "client fault, dotted code": (_fault("SOAP-ENV:Client.Validation", "bad"), "permanent", "CNSS Client fault: bad"),
    "server fault": (_fault("soap:Server", "indisponible", "SERVICE_INDISPONIBLE"), "transient",
                     "CNSS Server fault SERVICE_INDISPONIBLE: indisponible"),
    "version mismatch": (_fault("soap:VersionMismatch", "1.2"), "permanent", "CNSS VersionMismatch fault"),
    "fault with status 200": (_fault("soap:Server", "late", status=200), "transient", "CNSS Server fault"),
    "500 without a fault": (HttpResponse(500, {}, b"<html>Internal Server Error</html>"), "transient", "CNSS HTTP 500"),
    "502 from a proxy": (HttpResponse(502, {}, b"Bad Gateway"), "transient", "CNSS HTTP 502"),
    "503": (HttpResponse(503, {}, b"Service Unavailable"), "transient", "CNSS HTTP 503"),
    "408": (HttpResponse(408, {}, b""), "transient", "CNSS HTTP 408"),
    "429": (HttpResponse(429, {}, b""), "transient", "CNSS HTTP 429"),
    "404": (HttpResponse(404, {}, b"not found"), "permanent", "CNSS HTTP 404"),
    "401": (HttpResponse(401, {}, b""), "permanent", "CNSS HTTP 401"),
    "302": (HttpResponse(302, {"location": "https://elsewhere/"}, b""), "permanent", "CNSS HTTP 302"),
    "200 not XML": (HttpResponse(200, {}, b"OK"), "permanent", "CNSS HTTP 200"),
    "200 other element": (HttpResponse(200, {}, ANSWER.replace(b"numeroDossier", b"autre")), "permanent",
                          "CNSS answered 200 without a care-sheet number"),
    "200 with a DOCTYPE": (HttpResponse(200, {}, b'<!DOCTYPE x [<!ENTITY e "e">]>' + ANSWER), "permanent",
                           "CNSS HTTP 200"),
    # A code of the peer's own namespace named Server is not soap:Server (it used to be retried).
    "custom Server fault": (HttpResponse(500, {}, _fault("c:Server", "busy").body.replace(
        b"<s:Envelope ", b'<s:Envelope xmlns:c="urn:example:cnss" ')), "permanent", "CNSS c:Server fault: busy"),
}


@pytest.mark.parametrize("case", list(CLASSIFICATION))
def test_classification(case):
    """Every kind of answer gets its verdict and a short reason; the response is kept."""
    response, kind, reason = CLASSIFICATION[case]
    outcome = classify_response(response)
    assert (outcome.kind, outcome.response) == (kind, response)
    assert outcome.reason.startswith(reason), outcome.reason


_DECLARED = '<?xml version="1.0" encoding="{}"?>'


@pytest.mark.parametrize("body, headers, kind, reason", [
    (b"\xef\xbb\xbf" + ANSWER, {}, "delivered", "care sheet FSE-2026-00000007 RECUE"),
    ((_DECLARED.format("utf-16") + ANSWER.decode()).encode("utf-16"), {}, "delivered", "care sheet"),
    (b"\xef\xbb\xbf" + _fault("soap:Client", "bad", "SCHEMA").body, {}, "permanent", "CNSS Client fault SCHEMA: bad"),
    (_fault("soap:Client", "numéro inconnu", "ASSURE_INCONNU").body.decode().encode("latin-1"),
     {"content-type": "text/xml; charset=ISO-8859-1"}, "permanent", "CNSS Client fault ASSURE_INCONNU: numéro inconnu"),
    (_fault("soap:Client", "numéro", "X").body.decode().encode("latin-1"),
     {"content-type": "text/xml; charset=x-unknown"}, "transient", "CNSS HTTP 500"),
], ids=["receipt with a UTF-8 BOM", "receipt in UTF-16", "fault with a UTF-8 BOM", "fault in the HTTP charset",
        "unknown charset"])
def test_answers_in_another_encoding_are_read(body, headers, kind, reason):
    """XML may start with a byte order mark and be in the charset the Content-Type names:
    a receipt with a BOM (or in UTF-16) used to be dead-lettered though CNSS had the care
    sheet, and a Client fault in ISO-8859-1 retried for ever as a 500 without a fault."""
    response = HttpResponse(200 if kind == "delivered" else 500, headers, body)
    outcome = classify_response(response)
    assert (outcome.kind, outcome.response) == (kind, response)
    assert outcome.reason.startswith(reason), outcome.reason


def _answer(key: str = KEY, number: str = "FSE-2026-00000007", status: str = "RECUE") -> HttpResponse:
    return HttpResponse(200, {}, ANSWER.replace(b"msg-000042:cnss", key.encode())
                        .replace(b"FSE-2026-00000007", number.encode()).replace(b"RECUE", status.encode()))


@pytest.mark.parametrize("answer, reason", [
    (_answer(key="msg-000043:cnss"), "CNSS answered 200 for another idempotency key than the request's"),
    (_answer(number="  "), "CNSS answered 200 with a receipt the CNSS schema refuses"),
    (_answer(status="ACCEPTED-MAYBE"), "CNSS answered 200 with a receipt the CNSS schema refuses"),
], ids=["another key", "blank number", "unknown status"])
def test_a_receipt_that_does_not_confirm_the_request_is_not_a_delivery(answer, reason):
    """A 200 receipt counts only when the contract describes it and it names the key of the
    request it answers: a receipt for another care sheet, a blank number or an unknown status
    used to mark the delivery delivered."""
    request = care_sheet_request(golden(CSV), url="https://127.0.0.1:9443/", idempotency_key=KEY)
    assert classify_response(_answer(), request).kind == "delivered"
    outcome = classify_response(answer, request)
    assert (outcome.kind, outcome.reason, outcome.response) == ("permanent", reason, answer)


@pytest.mark.parametrize("code, error, reason", [
    ("soap:Client\nFORGED LOG LINE", "SCHEMA", "CNSS unknown fault SCHEMA: x"),
    ("soap:Client", "SCHEMA\nFORGED LOG LINE", "CNSS Client fault: x"),
    ("soap:Client", "E" * 500, "CNSS Client fault: x"),
])
def test_fault_codes_that_are_not_short_tokens_stay_out_of_the_reason_head(code, error, reason):
    """The codes before the peer's words are logged above debug (reason_head): a faultcode or
    an error code with a line break or of any length used to go there as written."""
    outcome = classify_response(_fault(code, "x", error))
    assert (outcome.kind, outcome.reason) == ("permanent", reason)


def test_a_long_fault_string_is_cut_short():
    """The reason stays short (it is logged and shown), whatever the peer writes."""
    outcome = classify_response(_fault("soap:Client", "x " * 5000))
    assert outcome.kind == "permanent" and len(outcome.reason) < 260

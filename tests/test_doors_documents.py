"""Pure parts of the HTTPS door: FHIR Bundles and SOAP reports made canonical by the
translator (ids as every translation makes them, references kept, validation located), and
the route table."""
from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

import pytest
from lxml import etree

from adapters.soap.gateway import NAMESPACE
from doors_support import fhir_bundle
from gateway.doors.api import Problem, Route
from gateway.doors.router import RouteConflict, RouteTable
from gateway.mapping.engine import name_id
from gateway.store.translations import Pending
from gateway.translation.fhir_input import bundle_issues, canonical_entries
from gateway.translation.inputs import InputError, detect_format, read_document
from gateway.translation.translator import Translator, document_context

AT = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)


def translate(repo_mappings, raw: bytes, format: str, control_id: str = "C1", sender: str = "INPE-100002"):
    from doors_support import FACILITIES

    return Translator(repo_mappings, FACILITIES).translate(
        Pending(None, ("X", sender, control_id), raw, "utf-8", format, sender, AT, format.upper()))


def test_fhir_bundle_becomes_the_canonical_collection(repo_mappings):
    """Ids come from identifiers (the rule of every translation), references between entries
    follow them, resources keep their content, a Provenance names the message."""
    record = translate(repo_mappings, json.dumps(fhir_bundle()).encode(), "fhir")
    assert record.status == "translated", record.error_reason
    bundle = record.bundle
    assert bundle["type"] == "collection"
    resources = [e["resource"] for e in bundle["entry"]]
    patient, observation, provenance = resources
    assert patient["id"] == name_id("Patient|urn:ma:cnie|AB123456")
    assert observation["subject"] == {"reference": f"urn:uuid:{patient['id']}"}
    assert observation["valueQuantity"]["value"] == 5.4 and patient["name"][0]["given"] == ["Fatima-Zahra"]
    assert provenance["entity"][0]["what"]["identifier"]["value"] == "C1"
    assert {t["reference"] for t in provenance["target"]} == {f"urn:uuid:{patient['id']}", f"urn:uuid:{observation['id']}"}
    entries = canonical_entries(fhir_bundle(), document_context("INPE-100002", "C1", AT))
    assert [e.id for e in entries] == [patient["id"], observation["id"]]


@pytest.mark.parametrize("typed", ["ab 123456", "AB١٢٣٤٥٦", "ab۱۲۳۴۵۶"])
def test_a_cnie_typed_otherwise_is_the_same_card_and_the_same_patient(repo_mappings, typed):
    """A CNIE sent over FHIR in lower case, with a blank, or in Arabic-Indic digits (an Arabic
    keyboard) is written as the HL7 mappings write it (upper case, no blank, ASCII digits):
    one identifier and one Patient id, as the door's answer says (they were other patients)."""
    record = translate(repo_mappings, json.dumps(fhir_bundle(cnie=typed)).encode(), "fhir")
    assert record.status == "translated", record.error_reason
    patient = record.bundle["entry"][0]["resource"]
    assert patient["identifier"][0] == {"system": "urn:ma:cnie", "value": "AB123456"}
    assert patient["id"] == name_id("Patient|urn:ma:cnie|AB123456")
    entries = canonical_entries(fhir_bundle(cnie=typed), document_context("INPE-100002", "C1", AT))
    assert entries[0].id == patient["id"]


def test_relative_references_and_repeated_resources(repo_mappings):
    """`Patient/123` references follow the entry with that id; the same patient twice is one resource."""
    document = fhir_bundle("collection")
    document["entry"][0]["resource"]["id"] = "123"
    del document["entry"][0]["fullUrl"]
    document["entry"][1]["resource"]["subject"] = {"reference": "Patient/123"}
    document["entry"].append(json.loads(json.dumps(document["entry"][0])))
    record = translate(repo_mappings, json.dumps(document).encode(), "fhir")
    resources = [e["resource"] for e in record.bundle["entry"]]
    assert [r["resourceType"] for r in resources] == ["Patient", "Observation", "Provenance"]
    assert resources[1]["subject"]["reference"] == f"urn:uuid:{resources[0]['id']}"


@pytest.mark.parametrize("change, where", [
    (lambda b: b.update(type="searchset"), "Bundle.type"),
    (lambda b: b.update(entry=[]), "Bundle.entry"),
    (lambda b: b["entry"][0].pop("resource"), "Bundle.entry[0].resource"),
    (lambda b: b["entry"][1]["resource"].update(resourceType="Nonsense"), "Bundle.entry[1].resource.resourceType"),
    (lambda b: b["entry"][0]["resource"].update(birthDate="1984-13-40"), "Bundle.entry[0].resource.birthDate"),
    (lambda b: b["entry"][1].update(fullUrl=b["entry"][0]["fullUrl"]), "Bundle.entry[1].fullUrl"),
])
def test_bundle_issues_name_the_element(change, where):
    """Each kind of fault in a submitted Bundle is reported at its element."""
    document = fhir_bundle()
    change(document)
    assert where in [issue.expression for issue in bundle_issues(document)]


def test_invalid_stored_bundle_fails_translation_with_its_location(repo_mappings):
    """A stored Bundle that is not valid (replayed by an operator) fails with the element named."""
    document = fhir_bundle()
    document["entry"][0]["resource"]["birthDate"] = "1984-13-40"
    record = translate(repo_mappings, json.dumps(document).encode(), "fhir")
    assert record.failed and record.error_location == "Bundle.entry[0].resource.birthDate"
    assert detect_format(b'  {"resourceType": "Bundle"}') == "fhir"
    with pytest.raises(InputError):
        read_document(b"{not json", "fhir")


def _report(pdf: bytes | None) -> bytes:
    gw = f"{{{NAMESPACE}}}"
    root = etree.Element(gw + "SubmitReport", nsmap={"gw": NAMESPACE})
    etree.SubElement(root, gw + "reportId").text = "R-1"
    patient = etree.SubElement(root, gw + "patient")
    identifier = etree.SubElement(patient, gw + "identifier")
    etree.SubElement(identifier, gw + "system").text = "urn:ma:cnie"
    etree.SubElement(identifier, gw + "value").text = "AB123456"
    etree.SubElement(root, gw + "orderNumber").text = "ORD-9"
    etree.SubElement(etree.SubElement(root, gw + "examination"), gw + "display").text = "Radio thorax"
    etree.SubElement(root, gw + "text").text = "Normal."
    if pdf is not None:
        etree.SubElement(root, gw + "pdf").text = base64.b64encode(pdf).decode()
    return etree.tostring(root)


def test_soap_report_becomes_patient_and_diagnostic_report(repo_mappings):
    """The same patient identifier gives the same Patient id as a FHIR submission; the PDF is kept exactly."""
    pdf = b"%PDF-1.7\n\x00\xff binary"
    record = translate(repo_mappings, _report(pdf), "soap-report", sender="INPE-100003")
    patient, report, _ = (e["resource"] for e in record.bundle["entry"])
    assert patient["id"] == name_id("Patient|urn:ma:cnie|AB123456")
    assert report["basedOn"][0]["identifier"] == {"system": "urn:ma:hie:order:INPE-100003", "value": "ORD-9"}
    assert base64.b64decode(report["presentedForm"][1]["data"]) == pdf and report["status"] == "final"
    from gateway.sandbox.record.validation import resource_issues

    assert resource_issues(report, "DiagnosticReport") == [] and resource_issues(patient, "Patient") == []
    bad = translate(repo_mappings, _report(b"not a pdf"), "soap-report")
    assert bad.failed and bad.error_location == "SubmitReport.pdf"


def _route(method: str, template: str) -> Route:
    return Route(method, template, "messages.read", lambda request: None, {})


def test_route_table_literals_first_params_and_405():
    """Literal segments win over parameters; parameters are unquoted; a known path with another method is 405."""
    table = RouteTable([_route("GET", "/v1/prescriptions/{id}"), _route("POST", "/v1/prescriptions/lookup"),
                        _route("GET", "/v1/prescriptions/{id}/qr")])
    assert table.match("POST", "/v1/prescriptions/lookup").route.template == "/v1/prescriptions/lookup"
    match = table.match("GET", "/v1/prescriptions/RX%2D1/qr")
    assert match.route.template.endswith("/qr") and match.params == {"id": "RX-1"}
    with pytest.raises(Problem) as wrong:
        table.match("DELETE", "/v1/prescriptions/RX1")
    assert wrong.value.status == 405 and wrong.value.extensions["allow"] == ["GET", "HEAD"]
    assert table.match("HEAD", "/v1/prescriptions/RX1").route.method == "GET"  # GET without the body
    with pytest.raises(Problem) as missing:
        table.match("GET", "/v1/prescriptions/")
    assert missing.value.status == 404
    with pytest.raises(RouteConflict):
        RouteTable([_route("GET", "/v1/a/{x}"), _route("GET", "/v1/a/{y}")])


def test_references_resolve_as_r4_resolves_them_in_a_bundle(repo_mappings):
    """A relative `Patient/1` in an entry whose fullUrl is a RESTful URL names the Patient on
    that entry's server, not another server's with the same id; a version-specific reference
    names the entry (of that version) without its version (R4 bundle.html#references)."""
    document = fhir_bundle("collection")
    patient, observation = document["entry"]
    patient["fullUrl"], patient["resource"]["id"] = "http://a.example/fhir/Patient/1", "1"
    patient["resource"]["meta"] = {"versionId": "2"}
    observation["fullUrl"] = "http://a.example/fhir/Observation/9"
    observation["resource"]["subject"] = {"reference": "Patient/1"}
    observation["resource"]["performer"] = [{"reference": "Patient/1/_history/2"},
                                            {"reference": "http://a.example/fhir/Patient/1/_history/2"},
                                            {"reference": "Patient/1/_history/1"}]
    other = json.loads(json.dumps(patient))
    other["fullUrl"] = "http://b.example/fhir/Patient/1"
    other["resource"]["identifier"][0]["value"] = "CD654321"
    document["entry"].append(other)
    record = translate(repo_mappings, json.dumps(document).encode(), "fhir")
    assert record.status == "translated", record.error_reason
    ours, observed = (e["resource"] for e in record.bundle["entry"][:2])
    assert ours["id"] == name_id("Patient|urn:ma:cnie|AB123456")
    assert observed["subject"] == {"reference": f"urn:uuid:{ours['id']}"}
    # version 1 is not the one the Bundle carries: left as it was sent
    assert [p["reference"] for p in observed["performer"]] == [f"urn:uuid:{ours['id']}"] * 2 + ["Patient/1/_history/1"]


def test_a_urn_uuid_reference_no_entry_has_is_refused_at_the_door(repo_mappings):
    """A `urn:uuid:` names nothing outside its Bundle: the record would refuse the delivery
    after the door had accepted it. Contained, `#` and logical references are not concerned."""
    document = fhir_bundle()
    resource = document["entry"][1]["resource"]
    resource["contained"] = [{"resourceType": "Practitioner", "id": "pr"}]
    resource["performer"] = [{"reference": "#pr"}, {"identifier": {"system": "urn:ma:inpe", "value": "1"}},
                             {"reference": "urn:uuid:0e0b8b5a-54d5-4b8e-9d0b-6f1f6a0e9f33"}]
    issues = bundle_issues(document)
    assert [(i.code, i.expression) for i in issues] == [
        ("not-found", "Bundle.entry[1].resource.performer[2].reference")]
    record = translate(repo_mappings, json.dumps(document).encode(), "fhir")
    assert record.failed and record.error_location == "Bundle.entry[1].resource.performer[2].reference"
    del resource["performer"][2]
    assert bundle_issues(document) == []

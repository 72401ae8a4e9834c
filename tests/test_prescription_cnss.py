"""The electronic care sheet of a dispensation: built from the flow's accepted bundles (the
prescription line reference and its key, the paper flag), checked against the contract's XSD,
and the sandbox CNSS's rules for them (a line billed once across sheets, paper sheets without
a prescription number)."""
from __future__ import annotations

import copy
from datetime import datetime, timezone

import pytest
from lxml import etree

from adapters.hl7v2.ack import AckBuilder
from adapters.soap.cnss import NAMESPACE
from gateway.delivery.care_sheet import CareSheetError, care_sheet_from_bundle, care_sheet_request
from gateway.prescriptions.bundle import PAPER_EXTENSION
from gateway.sandbox.cnss.service import CnssService
from gateway.sandbox.cnss.store import CareSheetStore
from prescription_support import AMOXIL, DOLIPRANE, FakeEligibility, Harness, config_for, rde, rds

NS = {"fse": NAMESPACE}
NOW = datetime(2026, 1, 16, 10, tzinfo=timezone.utc)


@pytest.fixture
def flows(tmp_path, repo_mappings):
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    harness = Harness(url, repo_mappings, config_for(url, tmp_path), FakeEligibility(), AckBuilder())
    [issued] = harness.translate(rde("RDE-1"))
    orc = [s for s in issued.ack.decode().split("\r") if s.startswith("ORC|")][0]
    prescription_id = orc.split("|")[3].split("^")[0]
    [first, second] = harness.translate(rds("RDS-1", prescription_id, ((DOLIPRANE, 1), (AMOXIL, 1))),
                                        rds("RDS-2", None, paper=True))
    yield prescription_id, first.bundle, second.bundle
    harness.close()


@pytest.fixture
def cnss(tmp_path):
    store = CareSheetStore(str(tmp_path / "cnss.sqlite"))
    yield CnssService(store), store
    store.close()


def submit(service, bundle, key):
    request = care_sheet_request(bundle, url="https://cnss.example/", idempotency_key=key)
    return service.handle(request.body, NOW)


def fault_code(body: bytes) -> str:
    return etree.fromstring(body).findtext(".//fse:Erreur/fse:code", namespaces=NS)


def test_care_sheet_lines_carry_the_prescription_line_and_its_key(flows):
    prescription_id, bundle, _ = flows
    sheet = care_sheet_from_bundle(bundle)
    assert sheet["numeroPrescription"] == prescription_id
    references = [line["prescription"] for line in sheet["lignes"]["ligne"]]
    assert [(r["numero"], r["ligne"]) for r in references] == [(prescription_id, 1), (prescription_id, 2)]
    assert len({r["cleLigne"] for r in references}) == 2
    body = care_sheet_request(bundle, url="https://cnss.example/", idempotency_key="key-00000001").body
    reference = etree.fromstring(body).find(".//fse:ligne/fse:prescription", NS)
    assert [child.tag.split("}")[1] for child in reference] == ["numero", "ligne", "cleLigne"]


def test_the_sandbox_bills_a_prescription_line_once(flows, cnss):
    """Stored with its lines; the same sheet again is the same answer; the same line in another
    sheet (another idempotency key) is LIGNE_DEJA_FACTUREE."""
    prescription_id, bundle, _ = flows
    service, store = cnss
    status, answer = submit(service, bundle, "sheet-00000001")
    assert status == 200
    assert [(l.prescription, l.line) for l in store.prescription_lines(prescription_id)] == [
        (prescription_id, 1), (prescription_id, 2)]
    assert submit(service, bundle, "sheet-00000001") == (200, answer)
    status, fault = submit(service, bundle, "sheet-00000002")
    assert (status, fault_code(fault)) == (500, "LIGNE_DEJA_FACTUREE")
    assert store.count() == 1


def test_paper_sheet_is_flagged_and_stored_as_paper(flows, cnss):
    _, _, paper = flows
    service, store = cnss
    sheet = care_sheet_from_bundle(paper)
    assert sheet["ordonnancePapier"] is True and "numeroPrescription" not in sheet
    assert all("prescription" not in line for line in sheet["lignes"]["ligne"])
    status, _ = submit(service, paper, "paper-00000001")
    assert status == 200 and len(store.paper_sheets()) == 1 and store.prescription_lines() == []


def test_paper_and_electronic_cannot_be_mixed(flows, cnss):
    """Building refuses a paper-marked dispense that names a prescription; the sandbox refuses
    a sheet that says both, and a line of another prescription."""
    prescription_id, bundle, _ = flows
    mixed = copy.deepcopy(bundle)
    for entry in mixed["entry"]:
        if entry["resource"]["resourceType"] == "MedicationDispense":
            entry["resource"]["extension"] = [{"url": PAPER_EXTENSION, "valueBoolean": True}]
    with pytest.raises(CareSheetError, match="paper-based names an e-prescription"):
        care_sheet_from_bundle(mixed)
    service, _ = cnss
    body = care_sheet_request(bundle, url="https://cnss.example/", idempotency_key="sheet-00000003").body
    root = etree.fromstring(body)
    request = root.find(".//fse:SoumettreFeuilleDeSoins", NS)
    etree.SubElement(request, f"{{{NAMESPACE}}}ordonnancePapier").text = "true"
    status, fault = service.handle(etree.tostring(root), NOW)
    assert (status, fault_code(fault)) == (500, "ORDONNANCE_INCOHERENTE")
    root = etree.fromstring(body)
    root.find(".//fse:ligne/fse:prescription/fse:numero", NS).text = "RX-0000-0000-0"
    status, fault = service.handle(etree.tostring(root), NOW)
    assert (status, fault_code(fault)) == (500, "ORDONNANCE_INCOHERENTE")

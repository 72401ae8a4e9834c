"""Prescriptions of acts (lab tests, imaging examinations) and the acts performed against them,
through the real translation worker, the repository's mappings and a real database: an
OML^O21 / ORM^O01 from a prescriber gets an id and a QR (ORL^O22 / ORR^O02); a laboratory's
ORU^R01 naming it in ORC-4 is checked and recorded once per act, billed once (a ChargeItem
that the care sheet builder turns into a line with the prescription reference), corrections
accepted without a second line, refusals with a precise reason; ordinary orders and results
are left alone."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import yaml
from sqlalchemy import inspect, text

from adapters.hl7v2.order_response import placer_groups
from gateway.delivery.care_sheet import care_sheet_from_bundle, care_sheet_request
from gateway.prescriptions import ids, qr, store
from gateway.prescriptions.bundle import ACT_SYSTEM, LINE_SYSTEM
from gateway.prescriptions.flow import PRESCRIPTION_NAMESPACES, names_prescription
from gateway.store.database import create_gateway_engine, migrate
from acts_support import (CHOLESTEROL, GLUCOSE, HBA1C, IMAGING, LOINC_ONLY, PHARMACY, THORAX, oml,
                          orm, oru)
from prescription_support import harness_fixture  # noqa: F401 (the fixture 'harness')
from prescription_support import (LABORATORY, OTHER_PATIENT, ROOT, FakeEligibility, race_for_the_lock,
                                  refusal, resources, segments, standard_harness)


def issue(harness, message=None) -> str:
    [record] = harness.translate(message or oml("OML-1"))
    assert record.status == "translated", record.error_reason
    return segments(record.ack)["ORC"][0][3].split("^")[0]


def acts_recorded(harness) -> list[tuple]:
    with harness.engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(
            "SELECT dispensation_id, line, dispensing_facility, medication_code FROM dispensations ORDER BY id"))]


# -- prescribing acts ----------------------------------------------------------------------------

def test_oml_o21_gets_an_id_a_qr_and_an_orl_o22(harness):
    """Two tests: ORL^O22 AA, the patient's PID then one ORC per order with ORC-3 = the id; the
    QR verifies; the lines are acts kept by their NABM code, quantity 1; each ServiceRequest
    carries the id (requisition) and its line id, and goes to the shared record."""
    [record] = harness.translate(oml("OML-1"))
    answer = segments(record.ack)
    assert answer["MSH"][0][8] == "ORL^O22^ORL_O22" and answer["MSA"][0][1:3] == ["AA", "OML-1"]
    prescription_id = answer["ORC"][0][3].split("^")[0]
    assert [o[:5] for o in answer["ORC"]] == [
        ["ORC", "OK", f"BIO-OML-1-{n}^CAB", f"{prescription_id}^HIE", "GRP-OML-1^CAB"] for n in (1, 2)]
    order = [s.split("|")[0] for s in record.ack.decode().strip("\r").split("\r")]
    assert order == ["MSH", "MSA", "NTE", "PID", "ORC", "ORC"]  # ORL_O22: orders in the patient's group
    claims = qr.verify(answer["NTE"][0][3], {harness.key.key_id: harness.key.public})
    assert claims.prescription_id == prescription_id
    with harness.engine.connect() as connection:
        stored = store.get_prescription(connection, prescription_id)
    assert [(l.line, l.kind, l.medication_system, l.medication_code, l.quantity, l.remaining)
            for l in stored.lines] == [(1, "act", "urn:ma:cnss:nabm", "B0412", 1, 1),
                                       (2, "act", "urn:ma:cnss:nabm", "B1104", 1, 1)]
    assert claims.digest == qr.lines_digest([(1, "B0412", 1, None), (2, "B1104", 1, None)])
    requests = resources(record, "ServiceRequest")
    assert [r["requisition"] for r in requests] == [{"system": ids.SYSTEM, "value": prescription_id}] * 2
    assert [r["identifier"][0]["value"] for r in requests] == [f"{prescription_id}/1", f"{prescription_id}/2"]
    assert stored.lines[0].as_dict()["act"]["code"] == "B0412" and "medication" not in stored.lines[0].as_dict()
    assert record.destinations == ("shared-record",)


def test_orm_o01_imaging_order_gets_orr_o02(harness):
    [record] = harness.translate(orm("ORM-1"))
    answer = segments(record.ack)
    assert answer["MSH"][0][8] == "ORR^O02^ORR_O02" and answer["MSA"][0][1] == "AA"
    assert "PID" not in answer and ids.is_prescription_id(answer["ORC"][0][3].split("^")[0])


def test_orders_of_other_senders_and_other_controls_are_ordinary(harness):
    """A laboratory's OML^O21 (not a prescriber), a prescriber's status change (ORC-1 SC) and
    its cancellation of an order numbered by another system (ORC-3 not a prescription id) are
    not part of the flow: translated, routed, no id, no answer of the flow."""
    for message in (oml("OML-LAB", sender=LABORATORY), oml("OML-SC", control="SC"),
                    oml("OML-CA", control="CA", filler="LIS-4711^LAB")):
        [record] = harness.translate(message)
        assert record.status == "translated" and record.ack is None
        application, facility = (part.decode() for part in message.split(b"|")[2:4])
        assert not harness.flow.waits_for("OML^O21", message, harness.registry.by_header(application, facility).id)
    with harness.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM prescriptions")).scalar() == 0


def test_the_prescriber_cancels_an_act_prescription(harness):
    """ORC-1 CA with ORC-3 = the id: ORL^O22 with ORC-1 CR, ServiceRequests revoked; a result is
    then refused."""
    prescription_id = issue(harness)
    [record] = harness.translate(oml("OML-CA", control="CA", filler=f"{prescription_id}^HIE"))
    answer = segments(record.ack)
    assert answer["MSA"][0][1] == "AA" and [o[1] for o in answer["ORC"]] == ["CR", "CR"]
    assert [r["status"] for r in resources(record, "ServiceRequest")] == ["revoked", "revoked"]
    [result] = harness.translate(oru("ORU-1", prescription_id))
    assert refusal(result)[2] == "PRESCRIPTION_CANCELLED"


# -- performing acts ----------------------------------------------------------------------------

def test_result_for_one_test_is_recorded_and_billed_once(harness):
    """The laboratory's ORU for the glucose: AA; the act recorded (its act id, line 1, the
    laboratory); the report points at its line (the ServiceRequest as issued, completed); one
    ChargeItem that makes a care-sheet line: NABM B0412, quantity 1, no amount (CNSS values a
    prescribed act), the prescription reference with line 1 and the act id as line key; routed
    to the shared record and CNSS. The look-up then shows line 1 performed, line 2 remaining."""
    prescription_id = issue(harness)
    [record] = harness.translate(oru("ORU-1", prescription_id))
    assert segments(record.ack)["MSA"][0][1:3] == ["AA", "ORU-1"] and "ERR" not in segments(record.ack)
    assert record.destinations == ("shared-record", "cnss")
    [(act_id, line, facility, code)] = acts_recorded(harness)
    assert act_id.startswith(f"{prescription_id}.1.") and (line, facility, code) == (1, "INPE-100002", "B0412")
    [report] = resources(record, "DiagnosticReport")
    [request] = resources(record, "ServiceRequest")
    assert report["basedOn"] == [{"reference": f"urn:uuid:{request['id']}"}]
    assert request["status"] == "completed" and request["identifier"][0] == {
        "system": LINE_SYSTEM, "value": f"{prescription_id}/1"}
    [charge] = resources(record, "ChargeItem")
    assert charge["identifier"] == [{"system": ACT_SYSTEM, "value": act_id}] and charge["status"] == "billable"
    sheet = care_sheet_from_bundle(record.bundle)
    [sheet_line] = sheet["lignes"]["ligne"]
    assert sheet_line["acte"] == {"nomenclature": "NABM", "code": "B0412"} and sheet_line["quantite"] == 1
    assert "montant" not in sheet_line and "montantTotal" not in sheet
    assert sheet_line["prescription"] == {"numero": prescription_id, "ligne": 1, "cleLigne": act_id}
    assert sheet["numeroPrescription"] == prescription_id and sheet["inpePrescripteur"] == "200001"
    assert sheet["executant"] == {"inpeEtablissement": "INPE-100002"}
    envelope = care_sheet_request(record.bundle, url="https://cnss/", idempotency_key="k-00000001").body
    assert b">B0412<" in envelope and act_id.encode() in envelope  # zeep and the XSD accept it
    with harness.engine.connect() as connection:
        view = store.get_prescription(connection, prescription_id)
    assert [(l.line, l.dispensed, l.remaining) for l in view.lines] == [(1, 1, 0), (2, 0, 1)]
    assert view.status == "active"


def test_replay_of_the_same_message_bills_the_same(harness):
    """Translating the stored ORU again (replay, sweep, another node) finds its record: same act
    id, the same ChargeItem, one row."""
    prescription_id = issue(harness)
    [first] = harness.translate(oru("ORU-1", prescription_id))
    with harness.engine.connect() as connection:
        message_id = connection.execute(text("SELECT id FROM messages WHERE control_id = 'ORU-1'")).scalar()
        from gateway.store.translations import messages_by_id

        [again] = messages_by_id(connection, [message_id])
    second = harness.again(again)
    assert second.status == "translated" and second.destinations == ("shared-record", "cnss")
    assert resources(second, "ChargeItem") == resources(first, "ChargeItem")
    assert len(acts_recorded(harness)) == 1


def test_correction_is_accepted_without_a_second_line(harness):
    """The same report corrected (OBR-25 C, a new control id), then final again: AA, the shared
    record gets the report, nothing is billed (no ChargeItem, not routed to CNSS), one record."""
    prescription_id = issue(harness)
    harness.translate(oru("ORU-1", prescription_id, status="P"))
    for control_id, status in (("ORU-2", "C"), ("ORU-3", "F")):
        [record] = harness.translate(oru(control_id, prescription_id, status=status))
        assert segments(record.ack)["MSA"][0][1] == "AA", record.error_reason
        assert record.destinations == ("shared-record",) and not resources(record, "ChargeItem")
        assert resources(record, "DiagnosticReport")[0]["basedOn"][0]["reference"].startswith("urn:uuid:")
    assert len(acts_recorded(harness)) == 1


def test_both_tests_in_one_result_then_the_prescription_is_completed(harness):
    prescription_id = issue(harness)
    [record] = harness.translate(oru("ORU-1", prescription_id, tests=(HBA1C, GLUCOSE)))
    assert record.status == "translated", record.error_reason
    assert [l["prescription"]["ligne"] for l in care_sheet_from_bundle(record.bundle)["lignes"]["ligne"]] == [2, 1]
    with harness.engine.connect() as connection:
        assert store.get_prescription(connection, prescription_id).status == "completed"
    # A correction of the HbA1c report (the same accession number, ACC-1-1) still stands.
    [late] = harness.translate(oru("ORU-2", prescription_id, tests=(HBA1C,), status="C"))
    assert late.status == "translated" and not resources(late, "ChargeItem")


def test_refusals_name_the_reason(harness):
    """Not prescribed, performed under another report, another patient, an unknown or malformed
    prescription, no CNSS code: AE with the ERR location and our code; nothing recorded, nothing
    routed."""
    prescription_id = issue(harness)
    cholesterol = harness.translate(oru("ORU-C", prescription_id, tests=(CHOLESTEROL,)))[0]
    assert refusal(cholesterol)[:3] == ("AE", "OBR^1^4", "NOT_PRESCRIBED")
    assert cholesterol.error_reason == f"result 1: act 2093-3 is not prescribed on {prescription_id}"
    harness.translate(oru("ORU-1", prescription_id))
    other_report = harness.translate(oru("ORU-2", prescription_id, accession="ACC-9"))[0]
    assert refusal(other_report)[:3] == ("AE", "OBR^1^4", "ACT_ALREADY_PERFORMED")
    assert "line 1 of" in other_report.error_reason and "another report number" in other_report.error_reason
    other_lab = harness.translate(oru("ORU-3", prescription_id, tests=(GLUCOSE,), sender=IMAGING))[0]
    assert refusal(other_lab)[2] == "ACT_ALREADY_PERFORMED"
    mismatch = harness.translate(oru("ORU-4", prescription_id, tests=(HBA1C,), patient=OTHER_PATIENT))[0]
    assert refusal(mismatch)[1:3] == ("PID^1^3", "PATIENT_MISMATCH")
    unknown = harness.translate(oru("ORU-5", "RX-ABCD-EFGH-F", tests=(HBA1C,)))[0]
    assert refusal(unknown)[1:3] == ("ORC^1^4", "PRESCRIPTION_UNKNOWN")
    typo = harness.translate(oru("ORU-6", "RX-ABCD-EFGH-G", tests=(HBA1C,)))[0]
    assert refusal(typo)[2] == "PRESCRIPTION_UNKNOWN" and "check character" in typo.error_reason
    assert len(acts_recorded(harness)) == 1
    with harness.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM deliveries d JOIN messages m ON m.id = d.message_id "
                                       "WHERE m.control_id LIKE 'ORU-%' AND m.control_id != 'ORU-1'")).scalar() == 0


def test_an_act_without_a_cnss_code_cannot_be_billed(harness):
    """LOINC only, on the prescription and on the result: refused (ACT_NOT_BILLABLE) saying what
    to add; the same act with its NABM code on the result alone is accepted."""
    prescription_id = issue(harness, oml("OML-L", tests=(LOINC_ONLY,)))
    [record] = harness.translate(oru("ORU-L", prescription_id, tests=(LOINC_ONLY,)))
    assert refusal(record)[1:3] == ("OBR^1^4", "ACT_NOT_BILLABLE") and "alternate coding of OBR-4" in record.error_reason
    [coded] = harness.translate(oru("ORU-L2", prescription_id, tests=(LOINC_ONLY + "^B0413^Glycemie^NABM",)))
    assert coded.status == "translated", coded.error_reason
    assert care_sheet_from_bundle(coded.bundle)["lignes"]["ligne"][0]["acte"]["code"] == "B0413"


def test_facility_type_expiry_and_coverage(harness):
    """A pharmacy's result is refused (its type may not perform acts); a new act after expiry is
    refused, a correction of an act recorded before is not; closed AMO rights: NOT_COVERED."""
    prescription_id = issue(harness)
    [pharmacy] = harness.translate(oru("ORU-P", prescription_id, sender=PHARMACY))
    assert refusal(pharmacy)[1:] == ("MSH^1^4", "OPERATION_NOT_ALLOWED",
                                     "facility INPE-100004 (pharmacy) may not perform the acts of prescriptions")
    harness.translate(oru("ORU-1", prescription_id))
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE prescriptions SET expires_at = :t"),
                           {"t": datetime.now(timezone.utc) - timedelta(days=1)})
    [expired] = harness.translate(oru("ORU-2", prescription_id, tests=(HBA1C,)))
    assert refusal(expired)[2] == "PRESCRIPTION_EXPIRED"
    [correction] = harness.translate(oru("ORU-3", prescription_id, status="C"))
    assert correction.status == "translated"
    fresh = issue(harness, oml("OML-2"))
    harness.flow.eligibility = FakeEligibility(open_rights=())
    [closed] = harness.translate(oru("ORU-4", fresh))
    assert refusal(closed)[2] == "NOT_COVERED"


def test_reports_that_are_not_results_yet_perform_nothing(harness):
    """OBR-25 I (specimen received) names the prescription but performs nothing: accepted, not
    billed, nothing recorded; the result then bills."""
    prescription_id = issue(harness)
    [received] = harness.translate(oru("ORU-I", prescription_id, status="I"))
    assert received.status == "translated" and not resources(received, "ChargeItem") and not acts_recorded(harness)
    [final] = harness.translate(oru("ORU-F", prescription_id))
    assert resources(final, "ChargeItem") and len(acts_recorded(harness)) == 1


def test_results_naming_no_prescription_are_unchanged(harness):
    """An ORU without ORC-4, or with a placer group of another namespace: no basedOn, not part
    of the flow, no answer from it, routed to the shared record only."""
    for message in (oru("ORU-N1", None), oru("ORU-N2", "GRP-1", namespace="CAB")):
        [record] = harness.translate(message)
        assert record.status == "translated" and record.ack is None and record.destinations == ("shared-record",)
        assert "basedOn" not in resources(record, "DiagnosticReport")[0]
        assert not harness.flow.waits_for("ORU^R01", message, "INPE-100002")
        # Not the flow's: its bundle was sealed by the worker (encoded, the dict let go).
        assert record.bundle is None and record.encoded is not None
    assert not acts_recorded(harness)


# -- which messages wait ------------------------------------------------------------------------

def test_waits_for_reads_orc_4_only():
    """Only an ORC-4 in a prescription namespace makes a result wait; the same text in OBX, NTE
    or ORC-3, truncated or separator-less input, another delimiter set: decided right, no error."""
    named = oru("W-1", "RX-ABCD-EFGH-F")
    assert names_prescription(named) and names_prescription(named.replace(b"\r", b"\n"))
    assert names_prescription(named.replace(b"|", b"#").replace(b"MSH#^~\\&#", b"MSH#^~\\&#"))
    assert not names_prescription(oru("W-2", None))
    assert not names_prescription(oru("W-3", None) + b"NTE|1||RX-ABCD-EFGH-F^HIE\rOBX|1|ST|x||ORC|a|b|c|d^HIE\r")
    assert not names_prescription(named.replace(b"^HIE|CM", b"^CAB|CM"))
    assert not names_prescription(b"ORC|NW|1|2|RX-1^HIE")  # no MSH: not a message
    assert not names_prescription(b"")
    for cut in range(0, len(named), 7):
        names_prescription(named[:cut])  # never raises
    assert placer_groups(b"MSH|^~\\&|A\rORC|RE||X^Y|G1^HIE^x\rORC|RE\r") == [(b"G1", b"HIE"), ]
    with open(f"{ROOT}/mappings/tables/prescription_id_system.yaml", encoding="utf-8") as f:
        assert {k.encode() for k in yaml.safe_load(f)["codes"]} == PRESCRIPTION_NAMESPACES


def test_ordinary_results_are_not_slowed_down():
    """The decision for an ordinary 20-OBX ORU costs a few microseconds (ingest runs thousands
    per second)."""
    import time

    with open(f"{ROOT}/mappings/tests/results/bench-oru-20-obx.hl7", "rb") as f:
        raw = f.read()
    started = time.perf_counter()
    for _ in range(2000):
        names_prescription(raw)
    per_message = (time.perf_counter() - started) / 2000
    assert per_message < 50e-6, per_message


# -- FHIR input ---------------------------------------------------------------------------------

def _fhir(harness, control_id: str, sender: str, bundle: dict):
    """Translate a FHIR bundle stored as the REST door stores it (format 'fhir')."""
    import json

    from gateway.store.translations import Pending

    raw = json.dumps(bundle).encode()
    placeholder = harness.store(oml(control_id))
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE messages SET format = 'fhir', sender_id = :s WHERE id = :id"),
                           {"s": sender, "id": placeholder.message_id})
        connection.execute(text("UPDATE message_payloads SET raw = :r WHERE message_id = :id"),
                           {"r": raw, "id": placeholder.message_id})
    pending = Pending(placeholder.message_id, None, raw, "utf-8", "fhir", sender, placeholder.received_at, "FHIR")
    from gateway.translation.service import TranslationJob

    job = TranslationJob([pending])
    harness.worker._process([job])
    return job.results[0]


PATIENT = {"fullUrl": "urn:uuid:p1", "resource": {
    "resourceType": "Patient", "id": "p1",
    "identifier": [{"system": "urn:ma:cnie", "value": "BE123456"},
                   {"system": "urn:ma:cnss:immatriculation", "value": "112233445"}]}}

# A prescriber's FHIR order of one act (glucose, NABM B0412) for PATIENT.
GLUCOSE_ORDER = {"resourceType": "Bundle", "type": "collection", "entry": [PATIENT, {
    "fullUrl": "urn:uuid:s1", "resource": {
        "resourceType": "ServiceRequest", "id": "s1", "status": "active", "intent": "order",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"},
                            {"system": "urn:ma:cnss:nabm", "code": "B0412"}]},
        "subject": {"reference": "urn:uuid:p1"}}}]}


def glucose_result(prescription_id: str) -> dict:
    """A laboratory's FHIR result of GLUCOSE_ORDER's act, naming its prescription."""
    return {"resourceType": "Bundle", "type": "collection", "entry": [PATIENT, {
        "fullUrl": "urn:uuid:d1", "resource": {
            "resourceType": "DiagnosticReport", "id": "d1", "status": "final",
            "identifier": [{"system": "urn:lab", "value": "ACC-7"}],
            "basedOn": [{"identifier": {"system": ids.SYSTEM, "value": prescription_id}}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
            "subject": {"reference": "urn:uuid:p1"}, "effectiveDateTime": "2026-01-16T09:00:00+01:00"}}]}


def test_fhir_service_requests_then_a_diagnostic_report(harness):
    """A prescriber's ServiceRequest bundle gets an id; a laboratory's DiagnosticReport whose
    basedOn names it by identifier performs the act; a laboratory's own ServiceRequests are
    ordinary."""
    order = GLUCOSE_ORDER
    issued = _fhir(harness, "F-1", "INPE-200001", order)
    assert issued.status == "translated", issued.error_reason
    [request] = resources(issued, "ServiceRequest")
    prescription_id = request["requisition"]["value"]
    assert ids.is_prescription_id(prescription_id)
    ordinary = _fhir(harness, "F-2", "INPE-100002", order)
    assert ordinary.status == "translated" and "requisition" not in resources(ordinary, "ServiceRequest")[0]
    result = glucose_result(prescription_id)
    performed = _fhir(harness, "F-3", "INPE-100002", result)
    assert performed.status == "translated", performed.error_reason
    [line] = care_sheet_from_bundle(performed.bundle)["lignes"]["ligne"]
    assert line["acte"]["code"] == "B0412" and line["prescription"]["ligne"] == 1  # NABM from the prescription
    assert "cnss" in performed.destinations


def test_a_result_bills_only_the_acts_the_flow_records_never_the_senders_charge_items(harness):
    """A laboratory's FHIR result carrying its own billable ChargeItem: the first result bills
    the act line once, with the gateway's key; the same report sent again bills nothing (the
    sender's ChargeItem went to CNSS as a second line). A ChargeItem written with the gateway's
    own act key (urn:ma:hie:act) is refused: with a report that names no prescription (here an
    Observation as its service) it was routed to CNSS as a prescription's act, unchecked."""
    order = GLUCOSE_ORDER
    [request] = resources(_fhir(harness, "F-1", "INPE-200001", order), "ServiceRequest")
    prescription_id = request["requisition"]["value"]

    def charge(key: str | None, service: str) -> dict:
        return {"fullUrl": f"urn:uuid:c-{service}", "resource": {
            "resourceType": "ChargeItem", "id": f"c-{service}", "status": "billable",
            **({"identifier": [{"system": ACT_SYSTEM, "value": key}]} if key else {}),
            "code": {"coding": [{"system": "urn:ma:cnss:nabm", "code": "B0412"}]},
            "subject": {"reference": "urn:uuid:p1"}, "occurrenceDateTime": "2026-01-16",
            "quantity": {"value": 1}, "priceOverride": {"value": 80, "currency": "MAD"},
            "service": [{"reference": f"urn:uuid:{service}"}]}}

    result = glucose_result(prescription_id)
    result["entry"].append(charge(None, "d1"))
    first = _fhir(harness, "F-2", "INPE-100002", result)
    assert first.status == "translated", first.error_reason
    [line] = care_sheet_from_bundle(first.bundle)["lignes"]["ligne"]
    [act_id] = [row[0] for row in acts_recorded(harness)]
    assert line["prescription"]["cleLigne"] == act_id
    again = _fhir(harness, "F-3", "INPE-100002", result)
    assert again.status == "translated", again.error_reason
    assert care_sheet_from_bundle(again.bundle) is None and not resources(again, "ChargeItem")
    assert again.destinations == ("shared-record",) and len(acts_recorded(harness)) == 1

    forged = {"resourceType": "Bundle", "type": "collection", "entry": [PATIENT, {
        "fullUrl": "urn:uuid:o1", "resource": {
            "resourceType": "Observation", "id": "o1", "status": "final",
            "basedOn": [{"reference": "urn:uuid:s1"}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
            "subject": {"reference": "urn:uuid:p1"}}},
        {"fullUrl": "urn:uuid:s1", "resource": {**request, "id": "s1"}},
        charge(f"{prescription_id}.1.bbbbbbbbbbbb", "o1")]}
    refused = _fhir(harness, "F-4", "INPE-100002", forged)
    assert refused.status == "failed" and ACT_SYSTEM in refused.error_reason
    assert refused.destinations == () and len(acts_recorded(harness)) == 1


# -- store --------------------------------------------------------------------------------------

def test_migration_creates_the_prescription_tables_as_declared(db_url):
    """Migrations 0005 and 0007 give the columns (name, nullability, in order) and indexes that
    gateway.prescriptions.store declares, the line kind included."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    found = inspect(engine)
    for table in (store.prescriptions, store.prescription_lines, store.dispensations):
        columns = [(c["name"], bool(c["nullable"])) for c in found.get_columns(table.name)]
        assert columns == [(c.name, bool(c.nullable)) for c in table.columns]
        indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in found.get_indexes(table.name))
        assert indexes == sorted((i.name, tuple(c.name for c in i.columns), bool(i.unique)) for i in table.indexes)
    engine.dispose()


# -- PostgreSQL: two results for one act at once ------------------------------------------------

@pytest.mark.pg
def test_concurrent_results_for_one_act_bill_it_once(pg_url, tmp_path, repo_mappings):
    """Two laboratories report the same prescribed act at the same time on two connections: the
    second waits for the first's lock (FOR UPDATE), then finds the act performed and is refused."""
    harness = standard_harness(pg_url, tmp_path, repo_mappings)
    try:
        prescription_id = issue(harness)
        first, second = race_for_the_lock(harness, oru("ORU-A", prescription_id, sender=LABORATORY),
                                          oru("ORU-B", prescription_id, sender=IMAGING))
        assert first.status == "translated"
        assert second.status == "failed" and "already performed" in second.error_reason
        assert len(acts_recorded(harness)) == 1
    finally:
        harness.close()


# -- an imaging centre's SOAP report ------------------------------------------------------------

def _report(prescription_id: str, code: str = "Z15", system: str = "urn:ma:cnss:ngap") -> bytes:
    """A SubmitReport element as the SOAP door stores it (format 'soap-report')."""
    return f"""<gw:SubmitReport xmlns:gw="urn:ma:hie:gateway:soap:1">
  <gw:reportId>CR-2026-0042</gw:reportId>
  <gw:patient><gw:identifier><gw:system>urn:ma:cnie</gw:system><gw:value>BE123456</gw:value></gw:identifier>
    <gw:familyName>BENALI</gw:familyName></gw:patient>
  <gw:prescriptionId>{prescription_id}</gw:prescriptionId>
  <gw:examination><gw:system>{system}</gw:system><gw:code>{code}</gw:code><gw:display>Radiographie thorax</gw:display></gw:examination>
  <gw:status>final</gw:status><gw:text>Examen normal.</gw:text><gw:performed>2026-01-17T10:00:00+01:00</gw:performed>
</gw:SubmitReport>""".encode()


def test_imaging_report_by_soap_performs_the_prescribed_examination(harness):
    """A doctor's ORM^O01 for a chest X-ray (local code, NGAP Z15 as alternate); the imaging
    centre's SubmitReport naming the prescription performs it: billed as an NGAP act line; the
    same report sent again (another message) bills nothing; a laboratory may send no such report
    for it either (another report of an act already performed)."""
    from gateway.store.translations import Pending
    from gateway.translation.service import TranslationJob

    prescription_id = issue(harness, orm("ORM-1", tests=(THORAX,)))

    def submit(control_id: str, sender: str, raw: bytes):
        placeholder = harness.store(oml(control_id))
        with harness.engine.begin() as connection:
            connection.execute(text("UPDATE messages SET format = 'soap-report', sender_id = :s "
                                    "WHERE id = :id"), {"s": sender, "id": placeholder.message_id})
            connection.execute(text("UPDATE message_payloads SET raw = :r WHERE message_id = :id"),
                               {"r": raw, "id": placeholder.message_id})
        job = TranslationJob([Pending(placeholder.message_id, ("SOAP", sender, control_id), raw, "utf-8",
                                      "soap-report", sender, placeholder.received_at, "SOAP^REPORT")])
        harness.worker._process([job])
        return job.results[0]

    report = submit("SOAP-1", "INPE-100003", _report(prescription_id))
    assert report.status == "translated", report.error_reason
    [line] = care_sheet_from_bundle(report.bundle)["lignes"]["ligne"]
    assert line["acte"] == {"nomenclature": "NGAP", "code": "Z15"} and line["prescription"]["ligne"] == 1
    assert report.destinations == ("shared-record", "cnss")
    again = submit("SOAP-2", "INPE-100003", _report(prescription_id))
    assert again.status == "translated" and not resources(again, "ChargeItem")
    other = submit("SOAP-3", "INPE-100002", _report(prescription_id))
    assert other.status == "failed" and "already performed" in other.error_reason


def test_hostile_and_mixed_references(harness):
    """Two prescriptions named in one result, an ORC-4 of 5,000 characters, and a pharmacy's
    dispensation of a code that is an act of the prescription: refused with a reason, nothing
    recorded."""
    first, second = issue(harness), issue(harness, oml("OML-2"))
    two = oru("ORU-2P", first, tests=(GLUCOSE,)) + \
        f"ORC|RE|BIO-9^CAB|ACC-9^LAB|{second}^HIE|CM\rOBR|2|BIO-9^CAB|ACC-9^LAB|{HBA1C}|||20260116090000\r".encode()
    [mixed] = harness.translate(two)
    assert refusal(mixed)[1:3] == ("ORC^2^4", "PRESCRIPTION_INVALID") and "one prescription" in mixed.error_reason
    [long] = harness.translate(oru("ORU-L", "RX-" + "A" * 5000))
    assert refusal(long)[2] == "PRESCRIPTION_UNKNOWN" and "longer than 64" in long.error_reason
    from prescription_support import rds

    [dispensed] = harness.translate(rds("RDS-A", first, (("B0412^Glycemie^NABM", 1),)))
    assert refusal(dispensed)[2] == "NOT_PRESCRIBED"
    assert not acts_recorded(harness)

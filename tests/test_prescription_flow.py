"""The e-prescription flow through the real translation worker, the repository's mappings and a
real database: prescriptions issued (id, signed QR, RRE^O12/ORP^O10), dispensations checked
and recorded or refused with a precise reason, paper prescriptions, AMO eligibility, the care
sheet built from an accepted dispensation, and concurrency on PostgreSQL."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from gateway.delivery.care_sheet import care_sheet_from_bundle
from gateway.prescriptions import ids, qr, store
from gateway.prescriptions.bundle import DISPENSATION_SYSTEM, LINE_SYSTEM, PAPER_EXTENSION
from gateway.store.database import write_transaction
from gateway.store.translations import get_translation
from prescription_support import harness_fixture  # noqa: F401 (the fixture 'harness')
from prescription_support import (AMOXIL, DOLIPRANE, LABORATORY, OTHER_PATIENT, FakeEligibility, cancel, omp,
                                  race_for_the_lock, rde, rds, refusal, resources, segments,
                                  standard_harness)


def issue(harness, control_id="RDE-1", **kwargs) -> str:
    [record] = harness.translate(rde(control_id, **kwargs))
    assert record.status == "translated", record.error_reason
    return segments(record.ack)["ORC"][0][3].split("^")[0]


def count(harness, sql) -> int:
    with harness.engine.connect() as connection:
        return connection.execute(text(sql)).scalar()


# -- issuing ------------------------------------------------------------------------------------

def test_rde_o11_gets_an_id_a_signed_qr_and_an_rre_o12(harness):
    """RDE^O11: RRE^O12 with MSA AA, ORC-3 = the new id on each order (ORC-2/4 echoed), the QR
    payload in an NTE that verifies with the public key; the stored prescription has both lines;
    every MedicationRequest carries the id (groupIdentifier) and its line id, and goes to the
    shared record."""
    [record] = harness.translate(rde("RDE-1"))
    answer = segments(record.ack)
    assert answer["MSH"][0][8] == "RRE^O12^RRE_O12" and answer["MSA"][0][1:3] == ["AA", "RDE-1"]
    orcs = answer["ORC"]
    prescription_id = orcs[0][3].split("^")[0]
    assert ids.parse(prescription_id) == prescription_id
    assert [o[:5] for o in orcs] == [["ORC", "OK", "CMD-RDE-1-1^CAB", f"{prescription_id}^HIE", "GRP-RDE-1^CAB"],
                                     ["ORC", "OK", "CMD-RDE-1-2^CAB", f"{prescription_id}^HIE", "GRP-RDE-1^CAB"]]
    [nte] = answer["NTE"]
    claims = qr.verify(nte[3], {harness.key.key_id: harness.key.public})
    assert (claims.prescription_id, claims.prescriber_inpe) == (prescription_id, "200001")
    with harness.engine.connect() as connection:
        stored = store.get_prescription(connection, prescription_id)
    assert stored.status == "active" and stored.prescriber_facility == "INPE-200001"
    assert stored.expires_at - stored.issued_at == timedelta(days=90)
    assert [(l.line, l.medication_code, l.quantity, l.unit, l.remaining) for l in stored.lines] == [
        (1, "6118001230068", 2, "boîte", 2), (2, "6118012345676", 1, "boîte", 1)]
    assert claims.digest == qr.lines_digest([(1, "6118001230068", 2, "boîte"), (2, "6118012345676", 1, "boîte")])
    requests = resources(record, "MedicationRequest")
    assert [r["groupIdentifier"] for r in requests] == [{"system": ids.SYSTEM, "value": prescription_id}] * 2
    assert [r["identifier"][0] for r in requests] == [
        {"system": LINE_SYSTEM, "value": f"{prescription_id}/1"}, {"system": LINE_SYSTEM, "value": f"{prescription_id}/2"}]
    pgn = [i for i in requests[0]["identifier"] if (i.get("type") or {}).get("coding", [{}])[0].get("code") == "PGN"]
    assert pgn and pgn[0]["value"] == "GRP-RDE-1" and "system" not in pgn[0]
    assert record.destinations == ("shared-record",)


def test_omp_o09_is_answered_with_orp_o10(harness):
    [record] = harness.translate(omp("OMP-1"))
    answer = segments(record.ack)
    assert answer["MSH"][0][8] == "ORP^O10^ORP_O10" and answer["MSA"][0][1] == "AA"
    assert ids.is_prescription_id(answer["ORC"][0][3].split("^")[0])


def test_translating_the_same_message_again_keeps_its_id(harness):
    """A replay of a prescription message finds its prescription: same id, same QR, one row."""
    [first] = harness.translate(rde("RDE-1"))
    pending = harness.store  # noqa: F841 (the harness stored it as message 1)
    with harness.engine.connect() as connection:
        message_id = connection.execute(text("SELECT id FROM messages")).scalar()
    from gateway.store.translations import messages_by_id

    with harness.engine.connect() as connection:
        [again] = messages_by_id(connection, [message_id])
    second = harness.again(again)
    assert segments(second.ack)["ORC"] == segments(first.ack)["ORC"]
    assert segments(second.ack)["NTE"] == segments(first.ack)["NTE"]
    assert count(harness, "SELECT count(*) FROM prescriptions") == 1
    with harness.engine.connect() as connection:
        [issued] = store.prescriptions_for_message(connection, message_id)
    assert issued.id == segments(first.ack)["ORC"][0][3].split("^")[0]


def test_prescription_without_quantity_is_refused_naming_rxe_10(harness):
    message = rde("RDE-Q").replace(b"|||||2|BT^bo", b"||||||BT^bo")
    [record] = harness.translate(message)
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE", "RXE^1^10", "PRESCRIPTION_INVALID")
    assert "line 1 has no quantity to dispense" in reason
    assert segments(record.ack)["MSH"][0][8] == "RRE^O12^RRE_O12" and "ORC" not in segments(record.ack)
    assert count(harness, "SELECT count(*) FROM prescriptions") == 0


@pytest.mark.parametrize("controls", [(b"NW", b"CA"), (b"XO", b"XO"), (b"RP", b"RP")])
def test_orders_that_are_not_all_new_issue_no_prescription(harness, controls):
    """An RDE^O11 whose ORC-1 are not all NW (a line sent to cancel beside a new one, an order
    changed or replaced): AE naming the ORC-1, no prescription (each became a new, dispensable
    prescription, the cancelled line one of its lines)."""
    head, last = rde("RDE-C").rsplit(b"ORC|NW|", 1)  # the second order's ORC starts `last`
    message = head.replace(b"ORC|NW|", b"ORC|" + controls[0] + b"|") + b"ORC|" + controls[1] + b"|" + last
    [record] = harness.translate(message)
    position = 2 if controls[0] == b"NW" else 1
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE", f"ORC^{position}^1", "PRESCRIPTION_INVALID")
    assert f"order {position}: ORC-1 is '{controls[position - 1].decode()}'" in reason
    assert count(harness, "SELECT count(*) FROM prescriptions") == 0


def test_a_pharmacy_cannot_prescribe_and_an_unknown_facility_cannot_either(harness):
    [pharmacy] = harness.translate(rde("RDE-P", sender=("PHARMA_AGDAL", "PHARM_AGDAL", "INPE-100004")))
    assert refusal(pharmacy)[2:] == ("OPERATION_NOT_ALLOWED",
                                     "facility INPE-100004 (pharmacy) may not issue prescriptions")
    [unknown] = harness.translate(rde("RDE-U", sender=("NOBODY", "NOWHERE", "-")))
    assert "not in the facility registry" in refusal(unknown)[3]


def test_the_prescriber_cancels_before_anything_is_dispensed(harness):
    """ORC-1 CA with ORC-3 = the id: RRE^O12 with ORC-1 CR; the prescription is cancelled, its
    MedicationRequests go to the shared record cancelled; a dispensation is then refused."""
    prescription_id = issue(harness)
    [record] = harness.translate(cancel("CAN-1", prescription_id))
    answer = segments(record.ack)
    assert answer["MSA"][0][1] == "AA" and [o[1] for o in answer["ORC"]] == ["CR", "CR"]
    assert answer["ORC"][0][3] == f"{prescription_id}^HIE" and "NTE" not in answer
    assert [r["status"] for r in resources(record, "MedicationRequest")] == ["cancelled", "cancelled"]
    assert resources(record, "MedicationRequest")[1]["identifier"][0]["value"] == f"{prescription_id}/2"
    assert record.destinations == ("shared-record",)
    with harness.engine.connect() as connection:
        assert store.get_prescription(connection, prescription_id).status == "cancelled"
    [dispensed] = harness.translate(rds("RDS-1", prescription_id))
    assert refusal(dispensed)[2] == "PRESCRIPTION_CANCELLED"


def test_cancellation_refused_after_dispensing_or_from_another_facility(harness):
    prescription_id = issue(harness)
    [other] = harness.translate(cancel("CAN-1", prescription_id, sender=("HIS_CHU", "CHU_IBN_ROCHD", "INPE-100001")))
    assert refusal(other)[2:] == ("OPERATION_NOT_ALLOWED",
                                  f"only the facility that issued prescription {prescription_id} may cancel it")
    harness.translate(rds("RDS-1", prescription_id))
    [late] = harness.translate(cancel("CAN-2", prescription_id))
    assert refusal(late)[2] == "PRESCRIPTION_INVALID" and "can no longer be cancelled" in late.error_reason
    [unknown] = harness.translate(cancel("CAN-3", "RX-1234"))
    assert refusal(unknown)[1:3] == ("ORC^1^3", "PRESCRIPTION_UNKNOWN")


# -- dispensing ---------------------------------------------------------------------------------

def test_partial_then_remaining_dispensation_then_over_dispensing_is_refused(harness):
    """1 then 1 box of line 1 and 1 of line 2: accepted, the prescription completed; a third
    dispensation: AE OVER_DISPENSING-like refusal (completed), nothing routed, nothing recorded."""
    prescription_id = issue(harness)
    [first] = harness.translate(rds("RDS-1", prescription_id, ((DOLIPRANE, 1),)))
    assert segments(first.ack)["MSA"][0][1:3] == ["AA", "RDS-1"] and "ERR" not in segments(first.ack)
    assert first.destinations == ("shared-record", "cnss")
    [second] = harness.translate(rds("RDS-2", prescription_id, ((DOLIPRANE, 1), (AMOXIL, 1))))
    assert segments(second.ack)["MSA"][0][1] == "AA"
    with harness.engine.connect() as connection:
        stored = store.get_prescription(connection, prescription_id)
    assert stored.status == "completed" and [l.remaining for l in stored.lines] == [0, 0]
    [third] = harness.translate(rds("RDS-3", prescription_id, ((DOLIPRANE, 1),)))
    msa, location, code, reason = refusal(third)
    assert (msa, location, code) == ("AE", "ORC^1^4", "PRESCRIPTION_COMPLETED")
    assert reason == f"over-dispensing: prescription {prescription_id} was already fully dispensed"
    assert count(harness, "SELECT count(*) FROM dispensations") == 3
    assert count(harness, "SELECT count(*) FROM deliveries d JOIN messages m ON m.id = d.message_id "
                          "WHERE m.control_id = 'RDS-3'") == 0
    with harness.engine.connect() as connection:
        stored_third = get_translation(connection, 4)
    assert stored_third.status == "failed" and stored_third.error_reason == reason


def test_more_than_remains_on_a_line_is_refused_with_the_quantities(harness):
    prescription_id = issue(harness)
    harness.translate(rds("RDS-1", prescription_id, ((DOLIPRANE, 1),)))
    [record] = harness.translate(rds("RDS-2", prescription_id, ((DOLIPRANE, 2),)))
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE", "RXD^1^4", "OVER_DISPENSING")
    assert reason == (f"over-dispensing: line 1 of {prescription_id} (6118001230068) has 1 boîte left "
                      "of 2 prescribed; 2 dispensed")
    assert "has 1 boite left" in segments(record.ack)["ERR"][0][7]  # ERR-7 in ASCII
    with harness.engine.connect() as connection:
        assert [l.dispensed for l in store.get_prescription(connection, prescription_id).lines] == [1, 0]


def test_a_box_scanned_as_gtin_14_or_prescribed_as_upc_is_the_same_drug(harness):
    """A pharmacy scanning the GS1 DataMatrix on the box sends the GTIN-14 (0 + the EAN-13 of
    its barcode): the drug prescribed, not NOT_PRESCRIBED. A GTIN-14 of another packaging level
    (first digit 1 to 8) is another trade item."""
    prescription_id = issue(harness, lines=(("012345678905^IMPORTED UPC-A^GTIN", 1), (AMOXIL, 2)))
    [record] = harness.translate(rds("RDS-1", prescription_id, (("0" + AMOXIL, 1), ("0012345678905^X^GTIN", 1))))
    assert record.status == "translated", record.error_reason
    lines = care_sheet_from_bundle(record.bundle)["lignes"]["ligne"]  # CNSS's contract: EAN-13
    assert [line["codeEAN13"] for line in lines] == ["6118012345676", "0012345678905"]
    [record] = harness.translate(rds("RDS-2", prescription_id, (("16118012345673^AMOXIL x10^GTIN", 1),)))
    assert refusal(record)[2] == "NOT_PRESCRIBED"
    with harness.engine.connect() as connection:
        lines = store.get_prescription(connection, prescription_id).lines
    assert [(l.medication_code, l.dispensed) for l in lines] == [("0012345678905", 1), ("6118012345676", 1)]


def test_two_lines_of_the_same_drug_in_one_message_add_up(harness):
    prescription_id = issue(harness)
    [record] = harness.translate(rds("RDS-1", prescription_id, ((DOLIPRANE, 1), (DOLIPRANE, 2))))
    assert refusal(record)[2] == "OVER_DISPENSING"
    assert count(harness, "SELECT count(*) FROM dispensations") == 0


@pytest.mark.parametrize("case, expected", [
    ("unknown", ("ORC^1^4", "PRESCRIPTION_UNKNOWN", "unknown prescription RX-")),
    ("malformed", ("ORC^1^4", "PRESCRIPTION_UNKNOWN", "dispensation 1: not a prescription id: it must start with RX-")),
    ("mistyped", ("ORC^1^4", "PRESCRIPTION_UNKNOWN", "dispensation 1: wrong check character")),
    ("patient", ("PID^1^3", "PATIENT_MISMATCH", "the patient does not match prescription")),
    ("drug", ("RXD^1^2", "NOT_PRESCRIBED", "dispensation 1: drug 6118009876541 is not on prescription")),
    ("unit", ("RXD^1^5", "UNIT_MISMATCH", "is prescribed in 'boîte', dispensed in 'comprimé'")),
    ("nothing", ("ORC^1^4", "PRESCRIPTION_MISSING", "dispensation 1 names no prescription id")),
    ("laboratory", ("MSH^1^4", "OPERATION_NOT_ALLOWED", "facility INPE-100002 (laboratory) may not dispense")),
])
def test_dispensations_refused_with_a_precise_reason(harness, case, expected):
    prescription_id = issue(harness)
    unknown = ids.format_id("ABCDEFGH")
    mistyped = prescription_id[:-1] + next(c for c in ids.ALPHABET if c != prescription_id[-1])
    message = {
        "unknown": rds("R", unknown),
        "malformed": rds("R", "ORD-2026-000123"),
        "mistyped": rds("R", mistyped),
        "patient": rds("R", prescription_id, patient=OTHER_PATIENT),
        "drug": rds("R", prescription_id, (("6118009876541^GLUCOPHAGE 850 mg^EAN13", 1),)),
        "unit": rds("R", prescription_id, unit="CP^comprimé^L"),
        "nothing": rds("R", None),
        "laboratory": rds("R", prescription_id, sender=LABORATORY),
    }[case]
    [record] = harness.translate(message)
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE",) + expected[:2]
    assert expected[2] in reason
    assert count(harness, "SELECT count(*) FROM dispensations") == 0


def test_a_patient_with_the_cnie_of_the_prescription_and_another_cnss_number_is_another(tmp_path, repo_mappings):
    """The prescription's CNIE with another CNSS immatriculation (whose AMO rights are open) is
    not the prescription's patient: PATIENT_MISMATCH, nothing recorded nor billed (it was
    accepted, its rights checked and its care sheet sent under the other immatriculation). The
    same numbers written with blanks or in another case are the same patient."""
    harness = standard_harness(f"sqlite:///{tmp_path / 'gateway.sqlite'}", tmp_path, repo_mappings,
                               FakeEligibility(open_rights=("998877665", "112233445")))
    try:
        prescription_id = issue(harness)
        other = "PID|1||BE123456^^^CNIE^NI~998877665^^^CNSS^SB||BENALI^Fatima||19850312|F"
        [record] = harness.translate(rds("RDS-1", prescription_id, patient=other))
        assert refusal(record)[1:3] == ("PID^1^3", "PATIENT_MISMATCH")
        assert "another urn:ma:cnss:immatriculation identifier" in record.error_reason
        assert count(harness, "SELECT count(*) FROM dispensations") == 0
        same = "PID|1||BE123456^^^CNIE^NI~112233445^^^CNSS^SB~ 112 233 445^^^CNSS^SB||BENALI^Fatima||19850312|F"
        [record] = harness.translate(rds("RDS-2", prescription_id, patient=same))
        assert record.status == "translated", record.error_reason
    finally:
        harness.close()


def test_expired_prescription_is_refused(harness):
    prescription_id = issue(harness)
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE prescriptions SET expires_at = :at"),
                           {"at": datetime.now(timezone.utc) - timedelta(days=1)})
    [record] = harness.translate(rds("RDS-1", prescription_id))
    assert refusal(record)[2] == "PRESCRIPTION_EXPIRED"
    assert f"prescription {prescription_id} expired on " in record.error_reason


def test_the_same_dispensation_is_never_recorded_twice(harness):
    """The pharmacy re-sends a dispensation (same ORC-3 number) under a new control id: 205."""
    prescription_id = issue(harness)
    harness.translate(rds("RDS-1", prescription_id, dispensation="DISP-42"))
    [again] = harness.translate(rds("RDS-2", prescription_id, dispensation="DISP-42"))
    msa, location, code, reason = refusal(again)
    assert (code, reason) == ("DISPENSATION_DUPLICATE", "dispensation 1 was already recorded (message #2)")
    assert segments(again.ack)["ERR"][0][3].startswith("205^")
    assert count(harness, "SELECT count(*) FROM dispensations") == 1


def test_replaying_an_accepted_dispensation_counts_it_once(harness):
    """The same message translated again (replay, sweep) is accepted again, not added again."""
    from gateway.store.translations import messages_by_id

    prescription_id = issue(harness)
    [first] = harness.translate(rds("RDS-1", prescription_id, ((DOLIPRANE, 2),)))
    with harness.engine.connect() as connection:
        [pending] = messages_by_id(connection, [2])
    second = harness.again(pending)
    assert segments(second.ack)["MSA"][0][1] == "AA" and second.bundle == first.bundle
    with harness.engine.connect() as connection:
        assert [l.dispensed for l in store.get_prescription(connection, prescription_id).lines] == [2, 0]
    assert count(harness, "SELECT count(*) FROM dispensations") == 1


def test_accepted_dispensation_bundle_and_its_care_sheet(harness):
    """The dispense bundle carries the issued MedicationRequest (line id, prescription id), the
    dispensation id, and its care sheet the prescription and the line reference with its key."""
    prescription_id = issue(harness)
    [record] = harness.translate(rds("RDS-1", prescription_id, ((AMOXIL, 1),)))
    [request] = resources(record, "MedicationRequest")
    assert request["identifier"][0] == {"system": LINE_SYSTEM, "value": f"{prescription_id}/2"}
    [dispense] = resources(record, "MedicationDispense")
    key = dispense["identifier"][0]
    assert key["system"] == DISPENSATION_SYSTEM and key["value"].startswith(f"{prescription_id}.2.")
    sheet = care_sheet_from_bundle(record.bundle)
    assert sheet["numeroPrescription"] == prescription_id and sheet["inpePrescripteur"] == "200001"
    assert sheet["lignes"]["ligne"][0]["prescription"] == {"numero": prescription_id, "ligne": 2,
                                                            "cleLigne": key["value"]}
    assert "ordonnancePapier" not in sheet


def test_paper_prescription_is_accepted_recorded_and_flagged(harness):
    [record] = harness.translate(rds("RDS-P", None, paper=True))
    assert segments(record.ack)["MSA"][0][1] == "AA" and record.destinations == ("shared-record", "cnss")
    [dispense] = resources(record, "MedicationDispense")
    assert {"url": PAPER_EXTENSION, "valueBoolean": True} in dispense["extension"]
    assert "authorizingPrescription" not in dispense
    sheet = care_sheet_from_bundle(record.bundle)
    assert sheet["ordonnancePapier"] is True and "numeroPrescription" not in sheet
    with harness.engine.connect() as connection:
        [row] = connection.execute(text("SELECT prescription_id, paper, quantity_milli FROM dispensations"))
    assert tuple(row) == (None, True, 1000)


def test_amo_rights_are_checked_before_accepting(tmp_path, repo_mappings):
    """Rights closed: NOT_COVERED; CNSS unreachable: ELIGIBILITY_UNAVAILABLE; asked once per batch."""
    url = f"sqlite:///{tmp_path / 'g.sqlite'}"
    closed = FakeEligibility(open_rights=())
    harness = standard_harness(url, tmp_path, repo_mappings, closed)
    try:
        prescription_id = issue(harness)
        [record] = harness.translate(rds("RDS-1", prescription_id))
        assert refusal(record)[2] == "NOT_COVERED" and "(DROITS_FERMES)" in record.error_reason
        assert [(q.kind, q.value, q.on.isoformat()) for q in closed.asked] == [
            ("immatriculation", "112233445", "2026-01-16")]
        harness.flow.eligibility = FakeEligibility(unavailable=True)
        [record] = harness.translate(rds("RDS-2", prescription_id))
        assert refusal(record)[2] == "ELIGIBILITY_UNAVAILABLE" and "timeout" in record.error_reason
        assert count(harness, "SELECT count(*) FROM dispensations") == 0
    finally:
        harness.close()


def test_a_batch_mixing_prescriptions_and_dispensations_commits_together(harness):
    """One worker batch: prescription, a good and an over-dispensing dispensation (of another
    prescription issued before): each gets its own outcome; one transaction."""
    earlier = issue(harness, "RDE-0")
    results = harness.translate(rde("RDE-1"), rds("RDS-1", earlier, ((DOLIPRANE, 2),)),
                                rds("RDS-2", earlier, ((DOLIPRANE, 1),)))
    assert [r.status for r in results] == ["translated", "translated", "failed"]
    assert refusal(results[2])[2] == "OVER_DISPENSING"


# -- PostgreSQL: concurrent dispensations -------------------------------------------------------

@pytest.mark.pg
def test_concurrent_dispensations_never_exceed_what_remains(pg_url, tmp_path, repo_mappings):
    """Two dispensations of 2 boxes against a line of 3, at the same time on two connections:
    the second waits for the first's lock (FOR UPDATE), then sees 1 left and is refused."""
    harness = standard_harness(pg_url, tmp_path, repo_mappings)
    try:
        prescription_id = issue(harness, lines=((DOLIPRANE, 3),))
        first, second = race_for_the_lock(harness, rds("RDS-A", prescription_id, ((DOLIPRANE, 2),)),
                                          rds("RDS-B", prescription_id, ((DOLIPRANE, 2),)))
        assert first.status == "translated"
        assert second.status == "failed" and "has 1 boîte left of 3" in second.error_reason
        with harness.engine.connect() as connection:
            [line] = store.get_prescription(connection, prescription_id).lines
        assert (line.dispensed, line.remaining) == (2, 1)
    finally:
        harness.close()


@pytest.mark.pg
def test_the_same_dispensation_under_two_control_ids_at_once_is_a_duplicate_not_an_error(pg_url, tmp_path,
                                                                                          repo_mappings):
    """Two copies of one dispensation (same ORC-3) under two control ids, on two connections at
    once: nothing to lock on a paper prescription (nor across two prescriptions), so both find
    the key free; the second waits on the unique key, then is refused as a duplicate (it was
    'internal error, send again later')."""
    harness = standard_harness(pg_url, tmp_path, repo_mappings)
    try:
        first, second = race_for_the_lock(harness, rds("PAP-1", None, paper=True, dispensation="P-1"),
                                          rds("PAP-2", None, paper=True, dispensation="P-1"))
        assert first.status == "translated"
        msa, location, code, reason = refusal(second)
        assert (msa, location, code) == ("AE", "ORC^1^3", "DISPENSATION_DUPLICATE")
        assert reason.startswith("dispensation 1 was already recorded (message #"), reason
        assert count(harness, "SELECT count(*) FROM dispensations") == 1
    finally:
        harness.close()


@pytest.mark.pg
def test_a_copy_recorded_between_the_two_looks_is_a_duplicate_not_an_aa(pg_url, tmp_path, repo_mappings):
    """The flow looks for a dispensation's key twice (first to name a duplicate, then before
    writing). A copy of it under another control id that commits between the two looks (two
    nodes at once, no row to lock on a paper prescription) made the second an AA that recorded
    nothing; it is the duplicate refusal, as it would have been a moment later."""
    from sqlalchemy import event

    harness = standard_harness(pg_url, tmp_path, repo_mappings)
    copies = []

    def meanwhile(conn, cursor, statement, parameters, context, executemany):
        if not copies and "WHERE dispensations.dedup_key =" in statement:  # the first look
            copies.append(None)  # once: the copy's own statements come through here too
            [record] = harness.translate(rds("PAP-FIRST", None, paper=True, dispensation="P-9"))
            copies[0] = record.status

    try:
        event.listen(harness.engine, "after_cursor_execute", meanwhile)
        [second] = harness.translate(rds("PAP-SECOND", None, paper=True, dispensation="P-9"))
        assert copies == ["translated"]
        msa, location, code, reason = refusal(second)
        assert (msa, location, code) == ("AE", "ORC^1^3", "DISPENSATION_DUPLICATE")
        assert count(harness, "SELECT count(*) FROM dispensations") == 1
    finally:
        event.remove(harness.engine, "after_cursor_execute", meanwhile)
        harness.close()


@pytest.mark.pg
def test_a_look_up_shows_one_moment_even_when_a_dispensation_commits_during_it(pg_url, tmp_path, repo_mappings):
    """A look-up (GET /v1/prescriptions/{id}) reads the prescription and its lines without a
    lock. A dispensation that completes the prescription and commits between those reads
    must not make it show 'active' with nothing left (it is 410 completed, or the moment
    before: active with what remained then)."""
    from sqlalchemy import event

    from gateway.store.database import create_gateway_engine

    harness = standard_harness(pg_url, tmp_path, repo_mappings)
    looking = create_gateway_engine(pg_url)  # the API's engine: only its statements are watched
    try:
        prescription_id = issue(harness, lines=((DOLIPRANE, 1),))
        dispensed = []

        def meanwhile(conn, cursor, statement, parameters, context, executemany):
            if not dispensed and "FROM prescriptions" in statement:
                [record] = harness.translate(rds("RDS-MEANWHILE", prescription_id))
                dispensed.append(record.status)

        event.listen(looking, "after_cursor_execute", meanwhile)
        with looking.begin() as connection:  # as Database.run does for the API
            seen = store.get_prescription(connection, prescription_id)
        assert dispensed == ["translated"]
        [line] = seen.lines
        assert (seen.status, line.remaining) in (("active", 1), ("completed", 0)), (seen.status, line)
    finally:
        looking.dispose()
        harness.close()


# -- FHIR input (format 'fhir', from the REST door) ---------------------------------------------

def _fhir_pending(harness, control_id: str, sender: str):
    """A stored message of format 'fhir' (the REST door stores the bundle it received)."""
    from gateway.store.translations import Pending

    raw = b'{"resourceType": "Bundle"}'
    pending = harness.store(rde(control_id))  # a messages row to hang the records on
    with harness.engine.begin() as connection:
        connection.execute(text("UPDATE messages SET format = 'fhir', sender_id = :s WHERE id = :id"),
                           {"s": sender, "id": pending.message_id})
    return Pending(pending.message_id, None, raw, "utf-8", "fhir", sender, pending.received_at, "FHIR")


PATIENT = {"fullUrl": "urn:uuid:p1", "resource": {
    "resourceType": "Patient", "id": "p1",
    "identifier": [{"system": "urn:ma:cnie", "value": "BE123456"},
                   {"system": "urn:ma:cnss:immatriculation", "value": "112233445"}]}}
GTIN = "https://www.gs1.org/gtin"


def _apply(harness, pending, bundle):
    from gateway.store.translations import TranslationRecord, save_translations

    record = TranslationRecord("translated", "test", bundle, destinations=("shared-record",))
    results = [(pending, record)]
    prepared = harness.flow.prepare(results)
    with write_transaction(harness.engine) as connection:
        harness.flow.apply(connection, results, prepared, datetime.now(timezone.utc))
        save_translations(connection, results)
    return record


def test_fhir_medication_request_then_dispense_and_paper(harness):
    """A FHIR bundle of MedicationRequests from the doctor gets an id (groupIdentifier and line
    identifiers written in); a FHIR MedicationDispense naming it by identifier is checked and
    recorded; one with the paper extension is accepted as paper; the REST door finds the id
    with prescriptions_for_message."""
    request = {"fullUrl": "urn:uuid:r1", "resource": {
        "resourceType": "MedicationRequest", "id": "r1", "status": "active", "intent": "order",
        "subject": {"reference": "urn:uuid:p1"},
        "requester": {"identifier": {"system": "urn:ma:inpe", "value": "200001"}},
        "medicationCodeableConcept": {"coding": [{"system": GTIN, "code": "6118001230068"}]},
        "dispenseRequest": {"quantity": {"value": 3, "unit": "boîte"}}}}
    pending = _fhir_pending(harness, "FHIR-RX-1", "INPE-200001")
    record = _apply(harness, pending, {"resourceType": "Bundle", "type": "collection",
                                       "entry": [PATIENT, request]})
    assert record.status == "translated" and record.ack is None  # REST answers from the store
    with harness.engine.connect() as connection:
        [issued] = store.prescriptions_for_message(connection, pending.message_id)
    assert resources(record, "MedicationRequest")[0]["groupIdentifier"]["value"] == issued.id
    assert qr.verify(issued.qr_payload, {harness.key.key_id: harness.key.public}).prescriber_inpe == "200001"

    dispense = {"fullUrl": "urn:uuid:d1", "resource": {
        "resourceType": "MedicationDispense", "id": "d1", "status": "completed",
        "identifier": [{"system": "urn:pharmacy:agdal", "value": "V-981"}],
        "subject": {"reference": "urn:uuid:p1"},
        "authorizingPrescription": [{"identifier": {"system": ids.SYSTEM, "value": issued.id.lower()}}],
        "medicationCodeableConcept": {"coding": [{"system": GTIN, "code": "6118001230068"}]},
        "performer": [{"actor": {"identifier": {"system": "urn:ma:inpe", "value": "INPE-100004"}}}],
        "quantity": {"value": 2, "unit": "boîte"}, "whenHandedOver": "2026-01-16T10:00:00+01:00"}}
    pending = _fhir_pending(harness, "FHIR-DS-1", "INPE-100004")
    record = _apply(harness, pending, {"resourceType": "Bundle", "type": "collection",
                                       "entry": [PATIENT, json.loads(json.dumps(dispense))]})
    assert record.status == "translated", record.error_reason
    [written] = resources(record, "MedicationDispense")
    assert written["identifier"][0]["value"].startswith(f"{issued.id}.1.")
    with harness.engine.connect() as connection:
        assert store.get_prescription(connection, issued.id).lines[0].remaining == 1

    again = _fhir_pending(harness, "FHIR-DS-2", "INPE-100004")  # same dispensation id V-981
    record = _apply(harness, again, {"resourceType": "Bundle", "type": "collection",
                                     "entry": [PATIENT, json.loads(json.dumps(dispense))]})
    assert record.status == "failed" and record.error_code == 205 and record.error_location == \
        "MedicationDispense[1].identifier"

    paper = json.loads(json.dumps(dispense))
    paper["resource"].pop("authorizingPrescription")
    paper["resource"]["identifier"] = [{"system": "urn:pharmacy:agdal", "value": "V-982"}]
    paper["resource"]["extension"] = [{"url": PAPER_EXTENSION, "valueBoolean": True}]
    # A ChargeItem of the pharmacy's own is not billed with the dispensation: the flow says what is.
    charge = {"fullUrl": "urn:uuid:c1", "resource": {
        "resourceType": "ChargeItem", "id": "c1", "status": "billable", "subject": {"reference": "urn:uuid:p1"},
        "code": {"coding": [{"system": "urn:ma:cnss:ngap", "code": "C"}]}, "occurrenceDateTime": "2026-01-16",
        "priceOverride": {"value": 150, "currency": "MAD"}}}
    record = _apply(harness, _fhir_pending(harness, "FHIR-DS-3", "INPE-100004"),
                    {"resourceType": "Bundle", "type": "collection", "entry": [PATIENT, paper, charge]})
    assert record.status == "translated" and care_sheet_from_bundle(record.bundle)["ordonnancePapier"] is True
    assert [set(line) & {"acte", "codeEAN13"} for line in care_sheet_from_bundle(record.bundle)["lignes"]["ligne"]] \
        == [{"codeEAN13"}]


@pytest.mark.parametrize("status", ["declined", "entered-in-error", "cancelled", "in-progress", "preparation"])
def test_a_fhir_dispense_not_handed_over_is_refused_not_recorded(harness, status):
    """A MedicationDispense that says the drug was not handed over (declined: out of stock;
    entered-in-error, cancelled; not yet: in-progress, preparation) used to be recorded as
    dispensed: what remained for the patient went down (a whole line: the prescription
    'completed', 410 at the next pharmacy) while the care sheet, which bills completed dispenses
    only, billed nothing. It is refused, naming its status; nothing is recorded."""
    request = {"fullUrl": "urn:uuid:r1", "resource": {
        "resourceType": "MedicationRequest", "id": "r1", "status": "active", "intent": "order",
        "subject": {"reference": "urn:uuid:p1"},
        "medicationCodeableConcept": {"coding": [{"system": GTIN, "code": "6118001230068"}]},
        "dispenseRequest": {"quantity": {"value": 2, "unit": "boîte"}}}}
    pending = _fhir_pending(harness, "FHIR-RX-1", "INPE-200001")
    _apply(harness, pending, {"resourceType": "Bundle", "type": "collection", "entry": [PATIENT, request]})
    with harness.engine.connect() as connection:
        [issued] = store.prescriptions_for_message(connection, pending.message_id)
    dispense = {"fullUrl": "urn:uuid:d1", "resource": {
        "resourceType": "MedicationDispense", "id": "d1", "status": status,
        "identifier": [{"system": "urn:pharmacy:agdal", "value": "V-990"}],
        "subject": {"reference": "urn:uuid:p1"},
        "authorizingPrescription": [{"identifier": {"system": ids.SYSTEM, "value": issued.id}}],
        "medicationCodeableConcept": {"coding": [{"system": GTIN, "code": "6118001230068"}]},
        "quantity": {"value": 2, "unit": "boîte"}}}
    record = _apply(harness, _fhir_pending(harness, "FHIR-DS-1", "INPE-100004"),
                    {"resourceType": "Bundle", "type": "collection", "entry": [PATIENT, dispense]})
    assert (record.status, record.error_location) == ("failed", "MedicationDispense[1].status")
    assert record.error_reason == (f"dispensation 1 is {status}, not completed: only a dispensation "
                                   "handed over is recorded against a prescription")
    assert count(harness, "SELECT count(*) FROM dispensations") == 0
    with harness.engine.connect() as connection:
        prescription = store.get_prescription(connection, issued.id)
    assert (prescription.status, prescription.lines[0].remaining) == ("active", 2)


def test_fhir_bundles_outside_the_flow_are_left_alone(harness):
    """A FHIR bundle with a MedicationRequest that already carries a national id (an update
    from the shared record's side) or with no medication at all is not a prescription."""
    request = {"fullUrl": "urn:uuid:r1", "resource": {
        "resourceType": "MedicationRequest", "id": "r1", "status": "active", "intent": "order",
        "groupIdentifier": {"system": ids.SYSTEM, "value": ids.format_id("ABCDEFGH")},
        "subject": {"reference": "urn:uuid:p1"},
        "medicationCodeableConcept": {"coding": [{"system": GTIN, "code": "6118001230068"}]}}}
    for entries in ([PATIENT, request], [PATIENT]):
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": entries}
        record = _apply(harness, _fhir_pending(harness, f"FHIR-X-{len(entries)}", "INPE-100001"), bundle)
        assert record.status == "translated" and record.destinations == ("shared-record",)
    assert count(harness, "SELECT count(*) FROM prescriptions") == 0

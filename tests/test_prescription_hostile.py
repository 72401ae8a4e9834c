"""Hostile and odd e-prescription inputs, through the real translation worker, the repository's
mappings and a real database (SQLite and PostgreSQL where the store's limits differ): quantities
the store cannot count exactly, codes and an INPE longer than what the store or the QR payload
keeps, a drug prescribed in two units, the day of care at a time-zone boundary, and AMO
eligibility answers from CNSS (over mutual TLS) that contradict themselves or the question."""
from __future__ import annotations

from datetime import date

import pytest
import pytest_twisted
from sqlalchemy import text
from twisted.internet import reactor, threads
from twisted.web.resource import Resource

from adapters.soap.cnss import NAMESPACE
from gateway.prescriptions import qr, store
from gateway.prescriptions.eligibility import EligibilityChecker, EligibilityQuery
from acts_support import GLUCOSE, oml, oru
from prescription_support import harness_fixture  # noqa: F401 (the fixture 'harness')
from prescription_support import (DOLIPRANE, FakeEligibility, rde, rds, refusal, segments,
                                  standard_harness)
from test_delivery_transport import certs, net  # noqa: F401 (fixtures: TLS servers on the dev PKI)


def issue(harness, message) -> str:
    [record] = harness.translate(message)
    assert record.status == "translated", record.error_reason
    return segments(record.ack)["ORC"][0][3].split("^")[0]


def count(harness, sql) -> int:
    with harness.engine.connect() as connection:
        return connection.execute(text(sql)).scalar()


@pytest.fixture
def either(db_url, tmp_path, repo_mappings):
    """A standard harness on SQLite and on PostgreSQL (which refuses what its columns cannot keep)."""
    made = standard_harness(db_url, tmp_path, repo_mappings)
    yield made
    made.close()


# -- quantities ---------------------------------------------------------------------------------

def test_quantities_finer_than_a_thousandth_are_refused(harness):
    """The store counts thousandths. 1.0005 prescribed used to be kept as 1.001, so the genuine
    QR's digest no longer matched the stored lines (every look-up by QR said 400 invalid-qr);
    0.0004 dispensed was kept as 0 and could be dispensed (and billed) again and again. Both are
    refused; three decimals are kept exactly and the QR matches."""
    [record] = harness.translate(rde("RDE-F", lines=((DOLIPRANE, "1.0005"),)))
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE", "RXE^1^10", "PRESCRIPTION_INVALID")
    assert "at most 3 decimals" in reason
    prescription_id = issue(harness, rde("RDE-1", lines=((DOLIPRANE, "2.125"),)))
    with harness.engine.connect() as connection:
        stored = store.get_prescription(connection, prescription_id)
    claims = qr.verify(stored.qr_payload, {harness.key.key_id: harness.key.public})
    assert claims.digest == qr.lines_digest([(l.line, l.medication_code, l.quantity, l.unit) for l in stored.lines])
    for n in range(3):
        [record] = harness.translate(rds(f"RDS-{n}", prescription_id, ((DOLIPRANE, "0.0004"),)))
        msa, location, code, reason = refusal(record)
        assert (location, code) == ("RXD^1^4", "PRESCRIPTION_INVALID") and "at most 3 decimals" in reason
    assert count(harness, "SELECT count(*) FROM dispensations") == 0
    [record] = harness.translate(rds("RDS-OK", prescription_id, ((DOLIPRANE, "0.125"),)))
    assert record.status == "translated", record.error_reason
    with harness.engine.connect() as connection:
        [line] = store.get_prescription(connection, prescription_id).lines
    assert (line.dispensed, line.remaining) == (store.from_milli(125), 2)


def test_a_paper_quantity_beyond_what_the_store_counts_is_refused_clearly(either):
    """A paper dispensation (no prescription to bound it) of 10^20 boxes used to overflow the
    store's integer (SQLite: OverflowError; PostgreSQL: out of range): an 'internal error, send
    again later' that could never succeed. It is refused as sent, naming RXD-4."""
    [record] = either.translate(rds("RDS-P", None, ((DOLIPRANE, "100000000000000000000"),), paper=True))
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE", "RXD^1^4", "PRESCRIPTION_INVALID")
    assert reason == "dispensation 1: the quantity dispensed must be at most 100000, with at most 3 decimals"
    assert count(either, "SELECT count(*) FROM dispensations") == 0


# -- what the store and the QR payload keep --------------------------------------------------------

def test_codes_longer_than_the_store_keeps_are_refused_not_internal(either):
    """An 80-character drug code, act code, or CNSS code on a result: PostgreSQL refused the
    value (an internal error, 'send again later', for ever) while SQLite kept it. Refused as
    sent on both, naming the field."""
    long_drug = "X" * 80 + "^LOCAL DRUG^L"
    [prescription] = either.translate(rde("RDE-L", lines=((long_drug, 2),)))
    assert refusal(prescription)[1:] == ("RXE^1^2", "PRESCRIPTION_INVALID",
                                         "line 1: the code is longer than 64 characters")
    [paper] = either.translate(rds("RDS-L", None, ((long_drug, 1),), paper=True))
    assert refusal(paper)[1:] == ("RXD^1^2", "PRESCRIPTION_INVALID",
                                  "dispensation 1: the code is longer than 64 characters")
    long_act = "2345-7^Glucose^LN^B" + "9" * 80 + "^Glycemie^NABM"
    [acts] = either.translate(oml("OML-L", tests=(long_act,)))
    assert refusal(acts)[1:] == ("OBR^1^4", "PRESCRIPTION_INVALID", "line 1: the code is longer than 64 characters")
    prescription_id = issue(either, oml("OML-1", tests=(GLUCOSE,)))
    [result] = either.translate(oru("ORU-L", prescription_id, tests=(long_act,)))
    assert refusal(result)[1:] == ("OBR^1^4", "PRESCRIPTION_INVALID",
                                   "result 1: the CNSS code of act B0412 is longer than 64 characters")
    assert count(either, "SELECT count(*) FROM dispensations") == 0
    assert count(either, "SELECT count(*) FROM prescriptions") == 1


def test_a_nul_escaped_into_what_the_store_keeps_is_refused_or_left_out(either):
    """HL7's \\X00\\ escape decodes to NUL, which PostgreSQL refuses in text: a drug code, a
    result's CNSS code, a drug's name or unit, a pharmacy's dispensation number holding one
    were answered 'internal error, send again later' for ever (SQLite kept them). A code holding
    one is refused as sent, naming the field; a name, a unit or a dispensation number is kept
    without it, and the QR payload still matches the stored lines."""
    [code] = either.translate(rde("RDE-N", lines=(("ABC\\X00\\D^LOCAL DRUG^L", 2),)))
    assert refusal(code)[1:] == ("RXE^1^2", "PRESCRIPTION_INVALID",
                                 "line 1: the code or its system holds a NUL character (0x00)")
    labelled = rde("RDE-1", lines=(("6118001230068^DOLI\\X00\\PRANE^EAN13", 2),))
    labelled = labelled.replace("BT^boîte^L".encode(), b"BT^bo\\X00\\te^L")
    prescription_id = issue(either, labelled)
    with either.engine.connect() as connection:
        stored = store.get_prescription(connection, prescription_id)
    assert [(line.display, line.unit) for line in stored.lines] == [("DOLI PRANE", "bo te")]
    claims = qr.verify(stored.qr_payload, {either.key.key_id: either.key.public})
    assert claims.digest == qr.lines_digest([(l.line, l.medication_code, l.quantity, l.unit) for l in stored.lines])
    [dispensed] = either.translate(rds("RDS-1", prescription_id, dispensation="V\\X00\\1", unit="BT^bo\\X00\\te^L"))
    assert dispensed.status == "translated", dispensed.error_reason
    acts_id = issue(either, oml("OML-1", tests=(GLUCOSE,)))
    [result] = either.translate(oru("ORU-N", acts_id, tests=("2345-7^Glucose^LN^B04\\X00\\12^Glycemie^NABM",)))
    assert refusal(result)[1:] == ("OBR^1^4", "PRESCRIPTION_INVALID",
                                   "result 1: the CNSS code of act B0412 holds a NUL character (0x00)")
    assert count(either, "SELECT count(*) FROM dispensations") == 1


@pytest.mark.parametrize("inpe", [b"2" * 70, b"20\\F\\0001"], ids=["too-long", "escaped-pipe"])
def test_an_inpe_the_qr_payload_cannot_carry_is_refused_naming_orc_12(harness, inpe):
    """The INPE goes into the signed QR payload (64 characters at most, '|' separates its
    fields): signing used to raise, answered 'internal error, send again later' for ever."""
    [record] = harness.translate(rde("RDE-I").replace(b"200001^BENALI", inpe + b"^BENALI"))
    msa, location, code, reason = refusal(record)
    assert (msa, location, code) == ("AE", "ORC^1^12", "PRESCRIPTION_INVALID")
    assert reason == "the prescriber's INPE is longer than 64 characters or holds '|' or a control character"
    assert count(harness, "SELECT count(*) FROM prescriptions") == 0


# -- units and days -----------------------------------------------------------------------------

def test_a_drug_prescribed_in_two_units_is_dispensed_from_the_line_in_its_unit(harness):
    """2 boxes (line 1) and 10 tablets (line 2) of one drug: 5 tablets used to be refused
    UNIT_MISMATCH against line 1; they are taken from line 2. A third unit is still refused."""
    message = rde("RDE-U", lines=((DOLIPRANE, 2), (DOLIPRANE, 10)))
    message = message.replace("|10|BT^boîte^L|".encode(), "|10|CP^comprimé^L|".encode())
    prescription_id = issue(harness, message)
    [record] = harness.translate(rds("RDS-U", prescription_id, ((DOLIPRANE, 5),), unit="CP^comprimé^L"))
    assert record.status == "translated", record.error_reason
    with harness.engine.connect() as connection:
        lines = store.get_prescription(connection, prescription_id).lines
    assert [(l.unit, l.dispensed) for l in lines] == [("boîte", 0), ("comprimé", 5)]
    [other] = harness.translate(rds("RDS-V", prescription_id, ((DOLIPRANE, 1),), unit="FL^flacon^L"))
    assert refusal(other)[1:3] == ("RXD^1^5", "UNIT_MISMATCH")


def test_the_day_of_care_asked_at_cnss_is_the_day_in_casablanca(tmp_path, repo_mappings):
    """Handed over at 23:30 UTC on 15 January, 00:30 on the 16th in Casablanca: AMO rights are
    asked for the 16th (they used to be asked for the 15th, the UTC date as written)."""
    asked = FakeEligibility()
    made = standard_harness(f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path, repo_mappings, asked)
    try:
        prescription_id = issue(made, rde("RDE-1"))
        message = rds("RDS-1", prescription_id).replace(b"|20260116152000|", b"|20260115233000+0000|")
        [record] = made.translate(message)
        assert record.status == "translated", record.error_reason
        assert [(q.kind, q.on) for q in asked.asked] == [("immatriculation", date(2026, 1, 16))]
    finally:
        made.close()


def test_a_handover_at_the_ends_of_the_calendar_does_not_stop_the_worker(tmp_path, repo_mappings):
    """Handed over on 1 January of year 1 at +05:00, or on 31 December 9999 at -05:00: in
    Casablanca that day is outside the calendar, and converting it raised OverflowError in the
    step's prepare, outside the flow's guard: the whole batch failed as if the database were
    down, and the sweep retried it for ever. The day is taken as written, and the message
    gets its answer."""
    asked = FakeEligibility()
    made = standard_harness(f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path, repo_mappings, asked)
    try:
        prescription_id = issue(made, rde("RDE-1", lines=((DOLIPRANE, 2),)))
        for n, stamp in enumerate((b"00010101003000+0500", b"99991231233000-0500")):
            message = rds(f"RDS-{n}", prescription_id).replace(b"|20260116152000|", b"|" + stamp + b"|")
            [record] = made.translate(message)
            assert record.status == "translated", record.error_reason
        assert [q.on for q in asked.asked] == [date(1, 1, 1), date(9999, 12, 31)]
    finally:
        made.close()


# -- AMO eligibility answers -----------------------------------------------------------------------

DAY = date(2026, 1, 16)


def verifier_droits(opened: str, motive: str, day: str, immatriculation: str = "112233445",
                    cnie: str = "BE123456", dependant_cnie: str = "BE654321") -> bytes:
    """A VerifierDroitsReponse, valid against the contract, saying what the test wants."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>
<fse:VerifierDroitsReponse xmlns:fse="{NAMESPACE}">
<fse:droitsOuverts>{opened}</fse:droitsOuverts><fse:motif>{motive}</fse:motif>
<fse:dateReference>{day}</fse:dateReference>
<fse:assure><fse:immatriculation>{immatriculation}</fse:immatriculation><fse:cnie>{cnie}</fse:cnie>
<fse:nom>BENALI</fse:nom><fse:prenom>Fatima</fse:prenom><fse:regime>AMO_SALARIES</fse:regime>
<fse:debutDroits>2010-01-01</fse:debutDroits></fse:assure>
<fse:ayantsDroit><fse:ayantDroit><fse:rang>1</fse:rang><fse:lien>CONJOINT</fse:lien>
<fse:cnie>{dependant_cnie}</fse:cnie><fse:nom>BENALI</fse:nom><fse:prenom>Youssef</fse:prenom>
<fse:dateNaissance>1982-07-02</fse:dateNaissance></fse:ayantDroit></fse:ayantsDroit>
</fse:VerifierDroitsReponse></soap:Body></soap:Envelope>""".encode()


class Answers(Resource):
    """A CNSS that answers every VerifierDroits with the next scripted body."""

    isLeaf = True

    def __init__(self, bodies):
        super().__init__()
        self.bodies = list(bodies)

    def render_POST(self, request):
        request.setHeader(b"Content-Type", b"text/xml; charset=utf-8")
        return self.bodies.pop(0)


@pytest.mark.parametrize("query, body, problem", [
    (EligibilityQuery("immatriculation", "112233445", DAY), verifier_droits("true", "DROITS_FERMES", "2026-01-16"),
     "CNSS answered droitsOuverts true with motif DROITS_FERMES"),
    (EligibilityQuery("immatriculation", "112233445", DAY), verifier_droits("true", "DROITS_OUVERTS", "2025-01-16"),
     "CNSS answered about another day than the one asked"),
    (EligibilityQuery("immatriculation", "112233445", DAY),
     verifier_droits("true", "DROITS_OUVERTS", "2026-01-16", immatriculation="998877665"),
     "CNSS answered about another insured than the one asked"),
    (EligibilityQuery("cnie", "CD112233", DAY), verifier_droits("true", "DROITS_OUVERTS", "2026-01-16"),
     "CNSS answered about another insured than the one asked"),
    (EligibilityQuery("cnie", "BE654321", DAY), verifier_droits("true", "DROITS_OUVERTS", "2026-01-16"), None),
    (EligibilityQuery("cnie", "BE123456", DAY), verifier_droits("true", "DROITS_OUVERTS", "2026-01-16"), None),
], ids=["open-but-closed-motive", "another-day", "another-insured", "another-cnie", "dependant", "own-cnie"])
@pytest_twisted.inlineCallbacks
def test_an_eligibility_answer_that_contradicts_itself_or_the_question_is_not_coverage(net, query, body, problem):
    """droitsOuverts true with a closed motive, or an answer about another day or another
    person, used to count as open rights (the dispensation accepted and billed). Such an answer
    is 'unavailable' (ELIGIBILITY_UNAVAILABLE), and is not kept; an answer naming the patient
    as the insured or a dependant still covers."""
    _, port = yield net.site(Answers([body, body]))
    made = EligibilityChecker(reactor, f"https://127.0.0.1:{port}/", lambda: net.transport(), 2.0)
    try:
        answers = yield threads.deferToThread(made.check_many, [query])
        answer = answers[query]
        if problem is None:
            assert answer.covered and answer.problem is None
        else:
            assert (answer.eligibility, answer.covered, answer.problem) == (None, False, problem)
            yield threads.deferToThread(made.check_many, [query])
            assert made.requests == 2  # asked again: nothing kept
    finally:
        yield made.close()


@pytest_twisted.inlineCallbacks
def test_a_number_cnss_does_not_take_is_refused_not_unavailable(net, tmp_path, repo_mappings):
    """The patient's CNSS immatriculation written as printed on the card, '112 233 445': the
    VerifierDroits question cannot be built (the contract takes 6 to 15 digits), and the
    dispensation used to be answered ELIGIBILITY_UNAVAILABLE, 'send again later', which no
    resend could ever change. It is refused as sent, naming PID-3; CNSS is not asked."""
    _, port = yield net.site(Answers([]))
    made = EligibilityChecker(reactor, f"https://127.0.0.1:{port}/", lambda: net.transport(), 2.0)
    harness = standard_harness(f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path, repo_mappings, made)
    try:
        prescription_id = yield threads.deferToThread(issue, harness, rde("RDE-1"))
        patient = "PID|1||BE123456^^^CNIE^NI~112 233 445^^^CNSS^SB||BENALI^Fatima||19850312|F"
        for control_id in ("RDS-1", "RDS-2"):
            [record] = yield threads.deferToThread(
                harness.translate, rds(control_id, prescription_id, patient=patient))
            msa, location, code, reason = refusal(record)
            assert (msa, location, code) == ("AE", "PID^1^3", "PRESCRIPTION_INVALID")
            assert reason.startswith("AMO eligibility cannot be asked at CNSS with the patient's "
                                     "immatriculation as sent (cannot ask CNSS: ")
            assert "asking again will not help" in reason and "233" not in reason  # no patient data
        assert made.requests == 0
        assert count(harness, "SELECT count(*) FROM dispensations") == 0
    finally:
        yield made.close()
        harness.close()


def test_a_batch_stored_again_one_by_one_keeps_nothing_of_its_rolled_back_step(pg_url, tmp_path, repo_mappings):
    """When the database refuses a value of one translation (here an error code past
    PostgreSQL's integer, standing for any value it refuses), its batch is rolled back and each
    translation stored on its own. The step had given the other prescription an id, and its
    bundle that id, in the transaction rolled back: it runs again from the translation as it
    was, so its bundle names the id stored and no other (it kept the id that never existed
    beside the new one)."""
    harness = standard_harness(pg_url, tmp_path, repo_mappings)
    try:
        good, bad = harness.store(rde("BATCH-A")), harness.store(rde("BATCH-B"))
        results = [(pending, harness.worker._translate(pending)) for pending in (good, bad)]
        results[1][1].error_code = 2 ** 40
        harness.worker._store(results)
        record = results[0][1]
        assert record.status == "translated" and results[1][1].status == "failed"
        prescription_id = segments(record.ack)["ORC"][0][3].split("^")[0]
        requests = [entry["resource"] for entry in record.bundle_dict()["entry"]
                    if entry["resource"]["resourceType"] == "MedicationRequest"]
        assert {request["groupIdentifier"]["value"] for request in requests} == {prescription_id}
        named = {identifier["value"].split("/")[0] for request in requests
                 for identifier in request["identifier"] if identifier["value"].startswith("RX-")}
        assert named == {prescription_id}  # not also the id of the attempt rolled back
        with harness.engine.connect() as connection:
            assert store.get_prescription(connection, prescription_id) is not None
            assert connection.execute(text("SELECT count(*) FROM prescriptions")).scalar() == 1
    finally:
        harness.close()

"""The conformance harness's own pieces (bench/conformance.py): key facts, date agreement,
scoring, classification of the corpus. Fast: no corpus run."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("conformance", ROOT / "bench" / "conformance.py")
conformance = importlib.util.module_from_spec(_spec)
sys.modules["conformance"] = conformance
_spec.loader.exec_module(conformance)

Fact = conformance.Fact


def bundle(*resources):
    return {"resourceType": "Bundle", "entry": [{"resource": r} for r in resources]}


PATIENT = {"resourceType": "Patient", "identifier": [{"value": "PID123"}, {"system": "x"}],
           "name": [{"family": "Everyman", "given": ["Adam", "A"]}],
           "birthDate": "1988-08-18", "gender": "male"}
OBSERVATION = {"resourceType": "Observation", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}, {"code": "HT"}]},
               "valueQuantity": {"value": 190.0, "unit": "cm", "code": "cm"},
               "effectiveDateTime": "2024-10-15T10:20:00-04:00"}


def kinds(facts):
    return sorted((f.kind, tuple(sorted(f.values))) for f in facts)


def test_facts_of_patient_and_observation():
    facts = kinds(conformance.facts_of(bundle(PATIENT, OBSERVATION, {"resourceType": "Organization"})))
    assert facts == sorted([
        ("patient.identifier", ("pid123",)),  # the identifier without a value gives nothing
        ("patient.family", ("everyman",)), ("patient.given", ("adam",)), ("patient.given", ("a",)),
        ("patient.birthDate", ("date:1988-08-18",)), ("patient.gender", ("male",)),
        ("observation.code", ("8302-2", "ht")), ("observation.value", ("190",)),
        ("observation.unit", ("cm",)), ("observation.status", ("final",)),
        ("observation.effective", ("date:2024-10-15T10:20:00-04:00",)),
    ])


def test_a_data_absent_reason_is_no_fact():
    """An unreadable date the translation left out (data-absent-reason in `_birthDate`,
    `_effectiveDateTime`) matches no expected date: the expected fact stays missing."""
    absent = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                             "valueCode": "error"}]}
    patient = {k: v for k, v in PATIENT.items() if k != "birthDate"} | {"_birthDate": absent}
    observation = {k: v for k, v in OBSERVATION.items() if k != "effectiveDateTime"} | {"_effectiveDateTime": absent}
    facts = conformance.facts_of(bundle(patient, observation))
    assert not [f for f in facts if f.kind in ("patient.birthDate", "observation.effective")]
    matched, total, missing = conformance.score(conformance.facts_of(bundle(PATIENT, OBSERVATION)), facts)
    assert total - matched == 2 and {f.kind for f in missing} == {"patient.birthDate", "observation.effective"}


def test_observation_values_of_each_type():
    def values(**value):
        return kinds(conformance.observation_value_facts(value))
    assert values(valueString="  Positive\n result ") == [("observation.value", ("positive result",))]
    assert values(valueCodeableConcept={"coding": [{"code": "260373001"}]}) == \
        [("observation.value", ("260373001",))]
    assert values(valueQuantity={"value": 7.50}) == [("observation.value", ("7.5",))]
    assert values(valueRange={"low": {"value": 1}, "high": {"value": 2.0}}) == \
        [("observation.value", ("1",)), ("observation.value", ("2",))]


@pytest.mark.parametrize("left, right, same", [
    ("1988-08-18", "1988-08-18", True),
    ("1988-08", "1988-08-18", True),  # the precision both have
    ("1988-08-18", "1988-08-19", False),
    ("2024-10-15T10:20:00-04:00", "2024-10-15T14:20:00Z", True),  # the same instant
    ("2024-10-15T10:20:00-04:00", "2024-10-15T10:20:00+01:00", False),
    ("2024-10-15T10:20:00-04:00", "2024-10-15", True),
    ("2024-10-15T10:20-04:00", "2024-10-15T10:20:59-04:00", True),
    ("2024-10-15T10:20:00", "2024-10-15T10:21:00", False),
])
def test_dates_agree(left, right, same):
    assert conformance.dates_agree(left, right) is same
    assert conformance.dates_agree(right, left) is same


def test_score_counts_each_actual_fact_once():
    expected = [Fact("patient.given", frozenset({"eve"})), Fact("patient.given", frozenset({"eve"})),
                Fact("patient.gender", frozenset({"female"}))]
    actual = [Fact("patient.given", frozenset({"eve"})), Fact("patient.gender", frozenset({"female"}))]
    matched, total, missing = conformance.score(expected, actual)
    assert (matched, total) == (2, 3)
    assert missing == [Fact("patient.given", frozenset({"eve"}))]


def test_score_matches_alternatives_and_dates():
    expected = conformance.facts_of(bundle(OBSERVATION))
    actual = conformance.facts_of(bundle(dict(
        OBSERVATION, code={"coding": [{"code": "8302-2"}]}, valueQuantity={"value": 190, "unit": "cm"},
        effectiveDateTime="2024-10-15T14:20:00Z")))
    matched, total, missing = conformance.score(expected, actual)
    assert (matched, total, missing) == (5, 5, [])
    assert conformance.score(expected, []) == (0, 5, expected)


def test_malformed_files_are_recognised():
    assert conformance.malformed_reason("nhapi/bad-inputs/PipeParser/HL7Exception/so5")
    assert conformance.malformed_reason("python-hl7/sample_bad_file3.hl7")
    assert conformance.malformed_reason("hl7apy/test_parser_L235.hl7")
    assert not conformance.malformed_reason("hl7apy/test_parser_L40.hl7")
    assert not conformance.malformed_reason("ms-fhir-converter/hl7v2/ADT-A01-01.hl7")
    assert conformance.malformed_reason("hapi-hl7v2/xml/get_version.xml")  # external DTD
    assert conformance.malformed_reason("x.hl7", "LF terminators; malformed segment id(s): '8866'")
    assert not conformance.malformed_reason("x.hl7", "LF segment terminators; repeated fields")


def test_stored_bytes_undoes_the_storage_of_captures():
    assert conformance.stored_bytes(b"[[5], [2, 49, 72], [4]]", "byte-array dump of captured frames") == \
        b"\x05\x021H\x04"
    assert conformance.stored_bytes(b'"\\vMSH|^~\\\\&|A\\rPID|1\\r\\u001c\\r"',
                                    "stored as an escaped string literal; MLLP framing bytes present") == \
        b"MSH|^~\\&|A\rPID|1\r\r"
    assert conformance.stored_bytes(b"[SOM]MSH|^~\\&|A\r[EOM]", "[SOM]/[EOM] sender markers") == b"MSH|^~\\&|A\r"


def test_analyzer_captures_are_split_into_their_messages():
    row = conformance.Row("astm/x.txt", "astm/x", "ASTM", "")
    two = b"\x05\x021H|\\^&\rP|1\rL|1|N\r\x0385\r\n\x04\x05\x021H|\\^&\rP|1\rL|1|N\r\x0386\r\n\x04"
    units = conformance.astm_units(row, two)
    assert [unit.number for unit in units] == [1, 2] and units[1].data.startswith(b"H|")
    one = b"# comment\nH|\\^&\nP|1\nL|1\n"
    assert [unit.data for unit in conformance.astm_units(row, one)] == [one]


def test_facts_that_are_not_comparable_are_left_out():
    """Observations the expected converter invents (its placeholder code system), Observation
    facts of MDM (document content for the guide) and report facts of orders and of MDM."""
    invented = {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": conformance.INVENTED_CODE_SYSTEMS[0], "code": "autopsy"}]}}
    assert conformance.facts_of(bundle(invented)) == []
    report = {"resourceType": "DiagnosticReport", "status": "final"}
    facts = conformance.facts_of(bundle(PATIENT, OBSERVATION, report))
    kinds_of = lambda found: {fact.kind.split(".")[0] for fact in found}  # noqa: E731
    assert kinds_of(conformance.comparable_facts(facts, "MDM^T02^MDM_T02")) == {"patient"}
    assert kinds_of(conformance.comparable_facts(facts, "ORM^O01")) == {"patient", "observation"}
    assert kinds_of(conformance.comparable_facts(facts, "ORU^R01")) == {"patient", "observation", "report"}


def test_result_verdicts():
    outcome = conformance.Outcome
    result = conformance.Result
    assert result("a", "s", "ADT^A01", "", outcome("valid")).verdict == "ok"
    assert result("a", "s", "ADT^A01", "", outcome("rejected", "x")).verdict == "rejected"
    assert result("a", "s", "ADT^A01", "fuzzer", outcome("rejected", "x")).verdict == "ok"
    assert result("a", "s", "ADT^A01", "fuzzer", outcome("crash", "x")).verdict == "failure"
    assert result("a", "s", "ADT^A01", "", outcome("invalid", "x")).verdict == "failure"


def test_a_translation_into_nothing_is_a_rejection(repo_mappings):
    """A message none of whose segments gives a resource is refused by the engine; an MSH
    alone is also malformed (nothing after the header)."""
    mapping_set = repo_mappings
    row = conformance.Row("x.hl7", "x", "ORU^R01", "")
    msh_only = conformance.Unit(row, 1, b"MSH|^~\\&|LAB|F|||20250101||ORU^R01^ORU_R01|1|P|2.5.1\r")
    outcome = conformance.translate_unit(mapping_set, msh_only)
    assert outcome.status == "rejected" and outcome.header_only
    assert outcome.reason.startswith("translation: nothing to translate: no segment of the message gives a resource")
    stray = conformance.Unit(row, 1, msh_only.data + b"NTE|1||note\r")
    outcome = conformance.translate_unit(mapping_set, stray)
    assert outcome.status == "rejected" and not outcome.header_only
    with_patient = conformance.Unit(row, 1, msh_only.data + b"PID|1||1^^^F^MR||DOE^JOHN\r")
    assert conformance.translate_unit(mapping_set, with_patient).status == "valid"


QBP = (b"MSH|^~\\&|HIS|F|GW|MA|20250101||QBP^Q22^QBP_Q21|Q1|P|2.5\r"
       b"QPD|IHE PDQ Query|Q1|@PID.5.1^DOE\rRCP|I|10^RD\r")


def test_acknowledgements_and_queries_are_not_clinical(repo_mappings):
    """The harness's own list says an ACK or a query carries no clinical data; the mappings
    say they are not translated; that is a correct outcome, left out of the clinical share."""
    row = conformance.Row("q.hl7", "x", "QBP^Q22", "")
    outcome = conformance.translate_unit(repo_mappings, conformance.Unit(row, 1, QBP))
    assert outcome.status == "not translated" and outcome.not_clinical == "a query"
    assert outcome.reason.startswith("translation: not translated: a query asks for data")
    ack = b"MSH|^~\\&|HIS|F|GW|MA|20250101||ACK^A01|A1|P|2.5\rMSA|AA|M1\r"
    outcome = conformance.translate_unit(repo_mappings, conformance.Unit(row, 1, ack))
    assert (outcome.status, outcome.not_clinical) == ("not translated", "an acknowledgement (ingest stores it as 'ignored')")
    query = b"H|\\^&|||LIS\rQ|1|^SPEC1||ALL||||||||O\rL|1|N\r"
    outcome = conformance.translate_unit(repo_mappings, conformance.Unit(row, 1, query))
    assert outcome.status == "not translated" and outcome.not_clinical.startswith("an analyzer's host query")
    result = conformance.Result("q.hl7", "x", "QBP^Q22", "", outcome)
    assert result.verdict == "ok"
    totals = conformance.tally([result, conformance.Result("o.hl7", "x", "ORU^R01", "", conformance.Outcome("valid"))])
    assert (totals["well_formed"], totals["not_clinical"], totals["clinical"], totals["clinical_valid"]) == (2, 1, 1, 1)
    assert totals["rejected"] == 1 and totals["valid"] == 1


def test_a_clinical_message_the_mappings_do_not_translate_counts_as_rejected():
    """The scope is the harness's: a mapping that declares a clinical type not translated
    does not take it out of the count."""
    skipped = conformance.Outcome("not translated", "translation: not translated: we said so")
    result = conformance.Result("o.hl7", "x", "ORU^R01", "", skipped)
    assert result.verdict == "rejected"
    totals = conformance.tally([result])
    assert (totals["clinical"], totals["clinical_valid"], totals["rejected"]) == (1, 0, 1)

"""Records that are not visits, orders or results: query responses (RSP_K21/K22/K23 -> a
Patient per PID found), problems (PPR_PC1 -> Condition), staff master files (MFN_M02 ->
Practitioner). Golden cases in mappings/tests/records (synthetic Moroccan data).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mapping.golden import check_case, find_cases, translate_case
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.validation import bundle_problems

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "mappings" / "tests" / "records"


@pytest.fixture
def mapping_set(repo_mappings) -> MappingSet:
    return repo_mappings


def resources(mapping_set, name: str, kind: str) -> list[dict]:
    bundle = translate_case(mapping_set, CASES / name).bundle
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.stem)
def test_golden(mapping_set, case):
    result = check_case(mapping_set, case)
    assert result.passed, "\n".join(result.differences)


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.stem)
def test_golden_is_valid_fhir(mapping_set, case):
    assert bundle_problems(translate_case(mapping_set, case).bundle) == []


def test_pdq_response_gives_every_patient_found(mapping_set):
    patients = resources(mapping_set, "rsp-k22-pdq.hl7", "Patient")
    assert [p["name"][0]["given"] for p in patients] == [["Fatima"], ["Said"]]


def test_problem_is_an_active_condition_of_the_patient(mapping_set):
    condition, = resources(mapping_set, "ppr-pc1-problem.hl7", "Condition")
    assert condition["code"]["coding"][0] == {"code": "E11.9", "display": "Diabète de type 2",
                                              "system": "http://hl7.org/fhir/sid/icd-10"}
    assert condition["clinicalStatus"]["coding"][0]["code"] == "active"
    assert condition["onsetDateTime"] == "2018-03-01"


def test_staff_record_is_a_practitioner_with_its_inpe(mapping_set):
    practitioner, = resources(mapping_set, "mfn-m02-practitioner.hl7", "Practitioner")
    assert {"value": "100234567", "system": "urn:ma:inpe"}.items() <= practitioner["identifier"][1].items()
    assert practitioner["active"] is True and practitioner["gender"] == "male"
    assert practitioner["birthDate"] == "1975-06-10"

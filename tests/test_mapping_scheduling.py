"""Scheduling (SIU_S12 events) -> Appointment, with the patient, its visit and its observations.

Golden cases in mappings/tests/scheduling (synthetic Moroccan data): a booked consultation with
its service (AIS), room (AIL) and physician (AIP), and its cancellation (S15, no SCH-25).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mapping.golden import check_case, find_cases, translate_case
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.validation import bundle_problems

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "mappings" / "tests" / "scheduling"


@pytest.fixture
def mapping_set(repo_mappings) -> MappingSet:
    return repo_mappings


def appointment(mapping_set, name: str) -> dict:
    bundle = translate_case(mapping_set, CASES / name).bundle
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Appointment")


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.stem)
def test_golden(mapping_set, case):
    result = check_case(mapping_set, case)
    assert result.passed, "\n".join(result.differences)


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.stem)
def test_golden_is_valid_fhir(mapping_set, case):
    assert bundle_problems(translate_case(mapping_set, case).bundle) == []


def test_every_siu_event_is_mapped(mapping_set):
    for trigger in ("S12", "S13", "S14", "S15", "S16", "S17", "S26"):
        assert mapping_set.message_map(f"SIU^{trigger}") is not None


def test_booked_appointment_has_its_time_and_every_resource(mapping_set):
    """Times from TQ1 in the sender's zone; the patient, the filler contact (SCH-16), every AIP
    and AIL of the message (not only those right after SCH) are participants."""
    found = appointment(mapping_set, "siu-s12-consultation.hl7")
    assert found["status"] == "booked"
    assert (found["start"], found["end"]) == ("2025-01-20T10:00:00+01:00", "2025-01-20T10:30:00+01:00")
    assert found["minutesDuration"] == 30
    actors = [p["actor"] for p in found["participant"]]
    assert len(actors) == 4
    assert actors[2] == {"identifier": {"value": "100234567"}, "display": "EL FASSI"}
    assert actors[3] == {"display": "CARDIO CONS1 (CHUIR)"}
    assert all(p["status"] == "accepted" for p in found["participant"])


def test_cancellation_without_filler_status_takes_the_trigger(mapping_set):
    """S15 with SCH-25 empty: the event says cancelled (SCH-25 would win, FillerStatusCodes)."""
    assert appointment(mapping_set, "siu-s15-cancelled.hl7")["status"] == "cancelled"

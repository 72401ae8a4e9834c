"""Absolute HL7 paths of mapping files checked against hl7apy's HL7 v2.3-v2.8 reference."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.mapping.hl7_reference import check_path, reference
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.path import parse_path
from gateway.mapping.source import MappingErrors

ROOT = Path(__file__).resolve().parent.parent


def reason(text: str):
    return check_path(parse_path(text))


@pytest.mark.parametrize("path", [
    "PID", "PID-3", "PID-3.1", "PID-3.4.2", "PID-5.1.1", "PID-7.1", "PID-40",  # PID-40: v2.7
    "MSH-1", "MSH-2", "MSH-9.3", "OBX-5", "OBX-5.7", "OBR-4.1", "PV1-7.2", "PRT-4.1",
])
def test_good_paths_pass(path):
    assert reason(path) is None


def test_field_beyond_the_segment_fails_with_the_reason():
    assert reason("PID-99") == "PID has no field 99 in HL7 v2.3 to v2.8 (it has 40)"


def test_z_segments_and_astm_records_are_not_checked():
    assert reason("ZPD-4") is None
    assert reason("ZPD-99.3") is None
    assert reason("R-3.4") is None  # an ASTM record


def test_unknown_segment_fails():
    assert reason("XYZ-1") == "XYZ is not a segment of HL7 v2.3 to v2.8"


def test_component_beyond_the_datatype_fails():
    # CX has 10 components up to v2.6 and 12 from v2.7: the largest count is the one used.
    assert reason("PID-3.12") is None
    assert reason("PID-3.13") == "PID-3 (CX) has no component 13 in HL7 v2.3 to v2.8 (it has 12)"
    # A primitive field has one component.
    assert reason("OBX-2.2") == "OBX-2 (ID) has no component 2 in HL7 v2.3 to v2.8 (it has 1)"
    # TS (two components up to v2.5.1) became the primitive DTM in v2.6.
    assert reason("PID-7.2") is None
    assert "has no component 3" in reason("PID-7.3")


def test_subcomponent_beyond_the_component_datatype_fails():
    assert reason("PID-3.4.3") is None  # HD has 3 components
    assert reason("PID-3.4.4") == "PID-3.4 of CX has no subcomponent 4 in HL7 v2.3 to v2.8 (it has 3)"


def test_varies_is_not_checked():
    assert reason("OBX-5.30") is None


def test_reference_is_loaded_once_and_fast():
    reference.cache_clear()
    check_path.cache_clear()
    started = time.perf_counter()
    reference()
    assert time.perf_counter() - started < 2.0
    assert reference() is reference()


def _tiny_set(tmp_path: Path, pid_rule: str) -> Path:
    (tmp_path / "messages").mkdir()
    (tmp_path / "segments").mkdir()
    (tmp_path / "messages" / "ADT_A01.yaml").write_text(
        "messages: [ADT^A01]\nresources:\n  - name: patient\n    from: PID\n    map: PID.Patient\n")
    (tmp_path / "segments" / "PID.Patient.yaml").write_text(
        f"resource: Patient\nmap:\n  birthDate: {pid_rule}\n")
    return tmp_path


def test_mapping_set_reports_a_path_no_version_has(tmp_path):
    with pytest.raises(MappingErrors) as error:
        MappingSet.load(_tiny_set(tmp_path, "{from: PID-99}"))
    assert "PID has no field 99 in HL7 v2.3 to v2.8 (it has 40)" in str(error.value)
    assert "PID.Patient.yaml" in str(error.value)


def test_mapping_set_accepts_z_segments(tmp_path):
    MappingSet.load(_tiny_set(tmp_path, "{from: ZPD-4}"))


def test_the_real_mappings_load_with_the_check():
    MappingSet.load(ROOT / "mappings")

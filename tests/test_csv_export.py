"""CSV exports of pharmacy software (adapters/legacy/csv_export.py) through read_input."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from adapters.legacy.csv_export import csv_profiles
from gateway.mapping.golden import check_case, translate_case
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import InputError, detect_format, read_input

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "mappings" / "tests" / "legacy" / "pharmacy-dispense-rabat.csv"
PROFILES = {"pharmacy_dispense": ("dispense_date", "prescription_id", "patient_cnie", "ean13",
                                  "drug_name", "quantity", "unit_price", "pharmacy_inpe")}
HEADER = "dispense_date,prescription_id,patient_cnie,ean13,drug_name,quantity,unit_price,pharmacy_inpe\n"


def test_profiles_are_read_from_the_mapping_files():
    """The repository's CSV message maps declare the pharmacy_dispense profile."""
    assert csv_profiles(ROOT / "mappings") == PROFILES


def test_rows_become_row_segments_in_profile_order():
    """Columns in another order, with an extra one, are laid out as the profile declares."""
    data = ("Patient CNIE;EAN13;Extra;Dispense Date;Prescription ID;Drug name;Quantity;"
            "Unit price;Pharmacy INPE\r\nAB1;6118001230068;x;20260114;P1;DOLI|PRANE^500;2;1,5;0812\r\n")
    parsed = read_input(data.encode(), csv_profiles=PROFILES)
    assert (parsed.format, parsed.message_type) == ("csv", "CSV^pharmacy_dispense")
    assert parsed.control_id.startswith("sha256:")
    row = parsed.message.segments[0]
    assert row.name == "ROW"
    assert parsed.message.value("ROW", 1) == "20260114"
    assert parsed.message.value("ROW", 3) == "AB1"
    assert parsed.message.value("ROW", 5) == "DOLI|PRANE^500"  # escaped, decoded back
    assert parsed.message.value("ROW", 9) == "x"  # the extra column, after the profile's


def test_unknown_header_gives_plain_csv_in_header_order():
    """No profile matches: message type 'CSV', fields as in the file."""
    parsed = read_input(b"a,b\n1,2\n", csv_profiles=PROFILES)
    assert parsed.message_type == "CSV" and parsed.message.value("ROW", 2) == "2"


def test_detection():
    """A delimited first line that is not HL7, XML or ASTM is CSV."""
    assert detect_format(b"\xef\xbb\xbfa;b\r\n1;2\r\n") == "csv"
    assert detect_format(b"just some words\n") == ""


def test_fallback_codec_for_8bit_exports():
    """cp1256 (Arabic) and cp1252 (French) exports read with the sender's fallback codec."""
    arabic = (HEADER + "20260114,P1,AB1,6118001230068,دواء,1,2,0812\n").encode("cp1256")
    parsed = read_input(arabic, "cp1256", csv_profiles=PROFILES)
    assert parsed.message.value("ROW", 5) == "دواء"
    french = (HEADER + "20260114,P1,AB1,6118001230068,Sérum,1,2,0812\n").encode("cp1252")
    assert read_input(french, "cp1252", csv_profiles=PROFILES).message.value("ROW", 5) == "Sérum"
    with pytest.raises(InputError, match="not UTF-8"):
        read_input(french, csv_profiles=PROFILES)


@pytest.mark.parametrize("data, reason, location", [
    (b"", "unrecognised input", ""),
    (b"a,b\n", "no data row", "header"),
    (b"a,b\n\n\n", "no data row", "header"),
    (b"a,,b\n1,2,3\n", "has no name", "header"),
    (b"a,A\n1,2\n", "repeats the name", "header"),
    (b"a,b\n1,2,3\n", "3 cells for 2 header columns", "ROW[1]-3"),
    (b'a,b\n1,"2\n', "unreadable row", "ROW[1]"),
    (b"\xff\xfea\x00,\x00b\x00", "UTF-16", "header"),
    (b"a,b\n" + b"1,2\n" * 2000 + b"3,4\x00\n", "NUL byte", "ROW[2001]-2"),  # past the first 4 KB
    (b"a,b\n1,2\n" + b" " * 5000 + b"\na,b\x00c\n", "NUL byte", "ROW[2]-2"),
])
def test_empty_and_garbage_csv(data, reason, location):
    """Bad files are InputErrors with the row and column."""
    with pytest.raises(InputError) as caught:
        read_input(data, format="csv" if data else None, csv_profiles=PROFILES)
    assert reason in str(caught.value) and caught.value.location == location


def test_a_wide_header_costs_what_the_rows_hold():
    """A 20,000-column header: checking its names for repeats was quadratic (1.75 s), and each
    one-cell row was padded to 20,000 fields (2,000 rows: some 20 s and 300 MB). A row keeps
    its own cells; an absent field reads as empty, and a repeat is still found."""
    header = ",".join(f"c{number}" for number in range(20_000)).encode() + b"\n"
    started = time.monotonic()
    parsed = read_input(header + b"x\n" * 2_000, csv_profiles=PROFILES)
    assert time.monotonic() - started < 2.0
    assert len(parsed.message.segments) == 2_000
    assert parsed.message.segments[0].fields == ["ROW", "x"]
    assert parsed.message.value("ROW", 19_999) == ""
    with pytest.raises(InputError, match="column 20001 repeats the name 'c0'"):
        read_input(header.rstrip() + b",C0\nx\n", csv_profiles=PROFILES)


def test_a_short_row_keeps_its_cells_in_profile_order():
    """Profile columns come first: a short row's cells land where the profile puts them."""
    data = b"Patient CNIE;Extra;Dispense Date;Prescription ID;EAN13;Drug name;Quantity;Unit price;Pharmacy INPE\nAB1;x\n"
    parsed = read_input(data, csv_profiles=PROFILES)
    assert parsed.message_type == "CSV^pharmacy_dispense"
    assert [parsed.message.value("ROW", number) for number in (1, 3, 9)] == ["", "AB1", "x"]


def test_golden_case(repo_mappings):
    """The pharmacy export translates into its expected, valid bundle (one dispense per row)."""
    mapping_set = repo_mappings
    result = check_case(mapping_set, GOLDEN)
    assert result.passed, result.differences
    bundle = translate_case(mapping_set, GOLDEN).bundle
    assert bundle_problems(bundle) == []
    kinds = [entry["resource"]["resourceType"] for entry in bundle["entry"]]
    assert kinds == ["Patient", "MedicationDispense", "MedicationDispense", "Provenance"]

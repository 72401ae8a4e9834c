"""Hostile and malformed values in the named transforms: dates, times, offsets and numbers that
the HL7 v2 types do not allow, or that FHIR R4 cannot write, refused with a reason that quotes
the text (an optional date left out with a warning), never copied into the bundle, stored as
null, nor left to expand for minutes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import TranslationContext, TranslationError
from gateway.mapping.transforms.astm import numeric
from gateway.mapping.transforms.core import fhir_datetime, to_time
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
CASABLANCA = ZoneInfo("Africa/Casablanca")
HEAD = ("MSH|^~\\&|LAB|LABO|HIE|MA|20260115101500||ORU^R01^ORU_R01|T1|P|2.5.1\n"
        "PID|1||AB1^^^CNIE^NI||Test^Patient||{birth}||||||||||||||||||{order}\n"
        "OBR|1|C1^HOP|L1^LAB|24331-1^Bilan^LN|||20260115073000|||||||||||||||||LAB|F\n")
OBX = "OBX|1|NM|1^x^L||1||||||F\n"
CHARGE = ("MSH|^~\\&|APP|FAC|HIE|MS|20260115103000||DFT^P03^DFT_P03|1|P|2.5\n"
          "EVN|P03|20260115103000\n"
          "PID|1||BE123456^^^CNIE^NI||BENALI^Fatima\n"
          "FT1|1|T1||20260115|20260115|CG|B^Acte^urn:ma:cnss:ngap|||{quantity}|{extended}|{unit}\n")


@pytest.fixture
def mappings(repo_mappings) -> MappingSet:
    return repo_mappings


def translate(mappings, text: str, zone=CASABLANCA):
    parsed = read_input(text.replace("\n", "\r").encode("utf-8"))
    context = TranslationContext(timezone=zone, message_key="t|" + parsed.control_id, control_id=parsed.control_id)
    return mappings.translate(parsed.message, context, parsed.message_type)


def result(mappings, obx: str = OBX, birth: str = "19850312", order: str = "", zone=CASABLANCA):
    return translate(mappings, HEAD.format(birth=birth, order=order) + obx, zone)


def resource(bundle: dict, kind: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind)


# -- dates and times -----------------------------------------------------------------------

@pytest.mark.parametrize("text", ["\u0662\u0660\u0662\u0665\u0660\u0661\u0661\u0664",  # Arabic-Indic
                                  "\uff12\uff10\uff12\uff15",  # full-width
                                  "2025011408\u0663\u0660"])
def test_dates_in_digits_other_than_ascii_are_no_hl7_dates(text):
    """HL7 DTM is ASCII digits; \\d matched any script's digits and copied them into the FHIR
    date ('٢٠٢٥-٠١-١٤'), which the FHIR regex ([0-9]) refuses."""
    with pytest.raises(ValueError, match="is not an HL7 date/time"):
        fhir_datetime(text, CASABLANCA)


def test_birth_date_and_result_time_in_arabic_indic_digits(mappings):
    """An optional birth date so written is left out with a warning; a TM result is refused at
    its OBX: neither reaches the bundle as '٢٠٢٥-...' or '٠٨:٣٠:00'."""
    translation = result(mappings, birth="\u0661\u0669\u0668\u0665\u0660\u0663\u0661\u0662")
    patient = resource(translation.bundle, "Patient")
    assert "birthDate" not in patient and "_birthDate" in patient
    assert any("PID-7" in warning and "is not an HL7 date/time" in warning for warning in translation.warnings)
    assert bundle_problems(translation.bundle) == []
    with pytest.raises(TranslationError) as caught:
        result(mappings, "OBX|1|TM|1^x^L||\u0660\u0668\u0663\u0660||||||F\n")
    assert caught.value.location == "OBX[1]" and "is not an HL7 time" in caught.value.reason


@pytest.mark.parametrize("text", ["20250114083512+0175", "20250114083512-0060", "20250114083512+1500",
                                  "20250114083512+1401", "20250114083512+2400", "20250114+0199"])
def test_offsets_that_are_no_offset_are_refused(text):
    """+/-ZZZZ is hours and minutes: '+0175' was read as +02:15 (a wrong instant); past 14:00
    FHIR's regex ((0[0-9]|1[0-3]):[0-5][0-9]|14:00) refuses the offset; '+2400' raised
    Python's own words about timedelta."""
    with pytest.raises(ValueError, match="has no valid offset"):
        fhir_datetime(text, CASABLANCA)


@pytest.mark.parametrize("text, expected", [
    ("20250114083512+1400", "2025-01-14T08:35:12+14:00"),
    ("20250114083512-1400", "2025-01-14T08:35:12-14:00"),
    ("20250114083512+0545", "2025-01-14T08:35:12+05:45"),
    ("20250114083512.1234-0330", "2025-01-14T08:35:12.1234-03:30"),
])
def test_offsets_at_the_edges_are_kept(text, expected):
    assert fhir_datetime(text, CASABLANCA) == expected


def test_result_time_with_invalid_offset_is_left_out_with_a_warning(mappings):
    translation = result(mappings, "OBX|1|NM|1^x^L||1||||||F|||202601150815+0175\n")
    observation = resource(translation.bundle, "Observation")
    assert "effectiveDateTime" not in observation and "_effectiveDateTime" in observation
    assert any("'202601150815+0175' has no valid offset" in warning for warning in translation.warnings)


@pytest.mark.parametrize("text", ["000012", "00000101", "00001201120000"])
def test_year_0000_is_no_date(text):
    """FHIR's year is [0-9]{3}[1-9] etc.: no 0000 ('0000-12' was written)."""
    with pytest.raises(ValueError, match="is not a valid date"):
        fhir_datetime(text, CASABLANCA)


def test_year_0000_in_a_birth_date_and_a_result_value(mappings):
    translation = result(mappings, birth="000012")
    assert "birthDate" not in resource(translation.bundle, "Patient")
    assert bundle_problems(translation.bundle) == []
    with pytest.raises(TranslationError) as caught:  # was valueDateTime '0000'
        result(mappings, "OBX|1|DTM|1^x^L||0000||||||F\n")
    assert caught.value.location == "OBX[1]" and "'0000' is not a valid date" in caught.value.reason


@pytest.mark.parametrize("text", ["202501140835.5", "20250114.5", "2025.5", "2025011408.25"])
def test_a_fraction_follows_the_seconds_only(text):
    """DTM is YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]]: '202501140835.5' became 08:35:00.5 and
    '20250114.5' lost its fraction without a word."""
    with pytest.raises(ValueError, match="is not an HL7 date/time"):
        fhir_datetime(text, CASABLANCA)


def test_a_time_fraction_follows_the_seconds_only():
    with pytest.raises(ValueError, match="is not an HL7 time"):
        to_time("0830.5", None)
    assert to_time("083005.25", None) == "08:30:05.25"


def test_an_impossible_day_is_reported_with_its_text(mappings):
    """30 February: the warning quotes the value ('day is out of range for month' did not)."""
    translation = result(mappings, birth="20250230")
    assert any("PID-7: '20250230' is not a valid date" in warning for warning in translation.warnings)
    with pytest.raises(ValueError, match="'2025023012' is not a valid date"):
        fhir_datetime("2025023012", CASABLANCA)


@pytest.mark.parametrize("zone, text", [("Asia/Tokyo", "00010101000000"), ("America/New_York", "99991231235959")])
def test_a_time_whose_utc_is_past_year_1_or_9999_is_unreadable(zone, text):
    """Converting through UTC raised OverflowError (no ValueError): not lenient, so the whole
    message failed as an internal error of the engine."""
    with pytest.raises(ValueError, match="out of the range of dates"):
        fhir_datetime(text, ZoneInfo(zone))


def test_birth_time_out_of_a_senders_zone_range_keeps_the_message(mappings):
    translation = result(mappings, birth="00010101000000", zone=ZoneInfo("Asia/Tokyo"))
    patient = resource(translation.bundle, "Patient")
    assert patient["birthDate"] == "0001-01-01" and "_birthDate" not in patient


# -- numbers -------------------------------------------------------------------------------

@pytest.mark.parametrize("obx", ["OBX|1|NM|1^x^L||" + "9" * 400 + ".5||||||F\n",
                                 "OBX|1|SN|1^x^L||<^" + "9" * 400 + ".5||||||F\n",
                                 "OBX|1|NR|1^x^L||1^" + "9" * 400 + ".5||||||F\n",
                                 "OBX|1|NM|1^x^L||0." + "0" * 400 + "1||||||F\n",
                                 "OBX|1|NM|1^x^L||" + "9" * 5000 + "||||||F\n"])
def test_numbers_a_double_cannot_hold_are_refused(mappings, obx):
    """Past 1.8e308 float() gave infinity, which the stored bundle (orjson) writes as null: the
    result was lost without a word; under 5e-324 it read as 0."""
    with pytest.raises(TranslationError) as caught:
        result(mappings, obx)
    assert caught.value.location == "OBX[1]" and "is out of range" in caught.value.reason


def test_numbers_within_range_are_kept(mappings):
    found = resource(result(mappings, "OBX|1|NM|1^x^L||-1,5||||||F\n").bundle, "Observation")
    assert found["valueQuantity"]["value"] == -1.5
    found = resource(result(mappings, "OBX|1|NM|1^x^L||0.000||||||F\n").bundle, "Observation")
    assert found["valueQuantity"]["value"] == 0.0


def test_astm_numbers_a_double_cannot_hold_are_text():
    assert numeric("9" * 400 + ".5") is None
    assert numeric("9" * 5000) is None
    assert numeric("<3,00") == ("<", 3.0)


@pytest.mark.parametrize("order", ["3000000000", "-2147483649", "9" * 5000])
def test_integers_outside_fhir_range_are_refused(mappings, order):
    """FHIR integer is 32 bits: PID-25 3000000000 gave multipleBirthInteger 3000000000."""
    with pytest.raises(TranslationError) as caught:
        result(mappings, order=order)
    assert caught.value.location == "PID[1]" and "out of the range of a FHIR integer" in caught.value.reason


def test_integers_at_the_edge_are_kept(mappings):
    assert resource(result(mappings, order="2147483647").bundle, "Patient")["multipleBirthInteger"] == 2147483647
    assert resource(result(mappings, order="0000000000002").bundle, "Patient")["multipleBirthInteger"] == 2


def charge(mappings, quantity: str = "", extended: str = "", unit: str = ""):
    text = CHARGE.format(quantity=quantity, extended=extended, unit=unit)
    return resource(translate(mappings, text).bundle, "ChargeItem")


@pytest.mark.parametrize("extended", ["NaN", "Infinity", "-inf", "sNaN", "1e5", "1_000",
                                      "9" * 400 + ".5", "9" * 5000])
def test_amounts_that_are_no_plain_number_are_refused(mappings, extended):
    """Decimal() reads NaN (the price was stored as null), Infinity and sNaN (OverflowError and
    InvalidOperation: an internal error), exponents and underscores; and a number past a double
    is no JSON number (a 5,000-digit integer cannot even be written)."""
    with pytest.raises(TranslationError) as caught:
        charge(mappings, extended=extended)
    assert caught.value.location == "FT1[1]" and "priceOverride" in caught.value.reason


def test_an_amount_with_a_huge_exponent_is_refused_at_once():
    """'1e999999999' (11 characters) was expanded by int() to an integer of a billion digits:
    minutes of CPU and gigabytes of memory for one FT1. Run apart, so that a hang fails."""
    script = ("from gateway.mapping.mapping_set import MappingSet\n"
              "from gateway.mapping.runtime import TranslationContext, TranslationError\n"
              "from adapters.hl7v2.message import parse_message\n"
              f"text = {CHARGE.format(quantity='', extended='1e999999999', unit='')!r}\n"
              "mappings = MappingSet.load('mappings')\n"
              "try:\n"
              "    mappings.translate(parse_message(text.replace('\\n', '\\r')), "
              "TranslationContext(message_key='t|1', control_id='1'))\n"
              "except TranslationError as error:\n"
              "    print(error.reason)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "'1e999999999' is not an amount" in done.stdout


def test_amounts_as_written_are_kept(mappings):
    assert charge(mappings, extended="80,50&mad")["priceOverride"] == {"value": 80.5, "currency": "MAD"}
    assert charge(mappings, quantity="3", unit="0.1")["priceOverride"] == {"value": 0.3, "currency": "MAD"}


# -- code tables ---------------------------------------------------------------------------

def test_a_code_of_blanks_is_no_code(mappings):
    """OBX-11 of spaces (fixed-width senders pad) failed the whole ORU with "code '' is not in
    table 'observation_status'"; it now reads as the empty field does. Case and blanks around a
    code are still folded."""
    def observation(status: str) -> dict:
        return resource(result(mappings, f"OBX|1|NM|1^x^L||1||||||{status}\n").bundle, "Observation")
    assert observation("   ")["status"] == observation("")["status"]
    assert observation(" c\t")["status"] == "corrected"
    patient = resource(result(mappings, birth="19850312|   ").bundle, "Patient")
    assert "gender" not in patient


def test_a_blank_code_in_a_table_that_maps_it_is_kept():
    from gateway.mapping.tables import CodeTable
    assert CodeTable("t", {"": "empty", "F": "female"}).translate("  ") == "empty"
    with pytest.raises(KeyError):
        CodeTable("t", {"F": "female"}).translate(" X ")

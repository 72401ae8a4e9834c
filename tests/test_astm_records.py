"""ASTM E1394 records (adapters/astm/records.py) and their detection by read_input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapters.astm.framing import ENQ, EOT, frames
from adapters.astm.records import parse_records, split_messages
from conftest import corpus_path
from gateway.mapping.golden import check_case
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import InputError, detect_format, read_input

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "mappings" / "tests" / "legacy" / "astm-cbc-chu-rabat.astm"
SAMPLE = b"H|\\^&|CTRL-7||XN-550^1\rP|1|PAT-1\rO|1|SID-1||^^^GLU\rR|1|^^^GLU^Glyc&S&emie|1.05|g/L|0.7\\1.1|N||F\rL|1|N\r"


def test_records_are_segments_numbered_as_astm_numbers_fields():
    """R-3 is the universal test id, R-4 the value; the record type is field 1."""
    parsed = read_input(SAMPLE)
    assert (parsed.format, parsed.message_type, parsed.control_id) == ("astm", "ASTM", "CTRL-7")
    message = parsed.message
    assert [s.name for s in message.segments] == ["H", "P", "O", "R", "L"]
    assert message.value("R", 1) == "R"
    assert message.value("R", 3, 4) == "GLU"
    assert message.value("R", 3, 5) == "Glyc^emie"  # &S& is the component delimiter
    assert message.value("R", 4) == "1.05"
    assert message.value("R", 6, repetition=2) == "1.1"
    assert message.value("H", 5) == "XN-550"
    separators = message.separators
    assert (separators.field, separators.repetition, separators.component, separators.escape,
            separators.subcomponent) == ("|", "\\", "^", "&", "")


def test_control_id_falls_back_to_a_hash_of_the_bytes():
    """With H-3 empty, the control id is 'sha256:' and 16 hex digits, stable for the bytes."""
    data = SAMPLE.replace(b"CTRL-7", b"")
    first, second = read_input(data).control_id, read_input(data).control_id
    assert first == second and first.startswith("sha256:") and len(first) == 23


@pytest.mark.parametrize("data", [b"H|\\^&\r1P|1\r", b"1H|\\^&\r2P|1|X\r3L|1\r"])
def test_detection(data):
    """'H|' and '1H|' are ASTM."""
    assert detect_format(data) == "astm"


def test_frame_numbers_at_line_starts_are_stripped():
    """A capture with '1H|', '2P|' at line starts reads as plain records."""
    message = parse_records("1H|\\^&\r2P|1|X\r3O|1|S\r4R|1|^^^A|5\r5L|1\r")
    assert [s.name for s in message.segments] == ["H", "P", "O", "R", "L"]
    assert message.value("P", 3) == "X"


def test_e1381_framing_left_in_the_bytes_is_removed():
    """Whole frames (ENQ, STX FN ... ETX C1C2 CR LF, ETB continuations, EOT) read as records."""
    data = ENQ + b"".join(frames(SAMPLE, size=12)) + EOT
    parsed = read_input(data)
    assert [s.name for s in parsed.message.segments] == ["H", "P", "O", "R", "L"]
    assert parsed.message.value("R", 3, 5) == "Glyc^emie"


def test_two_character_delimiter_definition_has_no_escape():
    """'H|\\^|' (no escape character), as the Immulite sends, is accepted."""
    message = parse_records("H|\\^||PW\rR|1|^^^TT4|10&3\rL|1\r")
    assert message.separators.escape == "" and message.value("R", 4) == "10&3"


@pytest.mark.parametrize("text, reason, location", [
    ("", "no H record", "H[1]"),
    ("P|1\rL|1\r", "does not start with an H record", "H[1]"),
    ("H|\\^&\rP|1\r", "no L terminator", "L[1]"),
    ("H|ab&\rL|1\r", "letters, digits", "H[1]-2"),
    ("H|\\^&^\rL|1\r", "must be 3 characters", "H[1]-2"),
    ("H|\\^&\rP|1\rXYZ|1\rL|1\r", "invalid record type", "X[1]"),
    ("H|\\^&\rL|1\rP|1\r", "after the L terminator", "P[1]"),
    ("H|\\^&\rH|\\^&\rL|1\r", "a second H record", "H[2]"),
])
def test_malformed_messages_are_input_errors_with_a_location(text, reason, location):
    """Each refusal names the record and field."""
    with pytest.raises(InputError) as caught:
        read_input(text.encode(), format="astm")
    assert reason in caught.value.reason and caught.value.location == location
    assert caught.value.format == "astm"


def test_latin1_and_utf8_text():
    """UTF-8 bytes are read as UTF-8, others with the fallback codec (latin-1 by default)."""
    utf8 = "H|\\^&\rP|1||||Müller^Jörg\rL|1\r"
    assert read_input(utf8.encode()).message.value("P", 6) == "Müller"
    assert read_input(utf8.encode("latin-1")).message.value("P", 6) == "Müller"


def test_split_messages_of_one_transfer():
    """Two H ... L messages in one transfer come apart."""
    parts = split_messages("H|\\^&\rP|1\rL|1\rH|\\^&\rQ|1\rL|1\r")
    assert parts == ["H|\\^&\rP|1\rL|1\r", "H|\\^&\rQ|1\rL|1\r"]


@pytest.mark.parametrize("path", [
    ("astm", "levinalex-lis", "immulite_results_upload.astm.txt"),
    ("astm", "ruby-astm", "sysmex_550_sample.txt"),
    ("astm", "tgenaux-astm-lis", "Vision.txt"),
    ("astm", "tgenaux-astm-lis", "PhadiaLIS2SampleMessage.txt"),  # 'Examine' in a test with units
])
def test_corpus_messages_translate_into_valid_bundles(path, repo_mappings):
    """Real analyzer messages read and translate with the shared ASTM map into valid FHIR."""
    full = corpus_path(*path)
    if not os.path.exists(full):
        pytest.skip("corpus not available")
    from zoneinfo import ZoneInfo
    from gateway.mapping.runtime import TranslationContext
    from gateway.mapping.golden import GOLDEN_RECEIVED_AT
    parsed = read_input(open(full, "rb").read())
    context = TranslationContext(sender_id="", timezone=ZoneInfo("Africa/Casablanca"),
                                 received_at=GOLDEN_RECEIVED_AT, message_key=parsed.control_id,
                                 control_id=parsed.control_id)
    bundle = repo_mappings.translate(parsed.message, context, parsed.message_type).bundle
    assert bundle_problems(bundle) == []


def test_golden_case(repo_mappings):
    """The synthetic Moroccan CBC translates into its expected, valid bundle."""
    mapping_set = repo_mappings
    result = check_case(mapping_set, GOLDEN)
    assert result.passed, result.differences
    expected = json.loads(GOLDEN.with_suffix(".json").read_text())
    kinds = [entry["resource"]["resourceType"] for entry in expected["entry"]]
    assert kinds == ["Patient", "DiagnosticReport", "Observation", "Observation", "Observation", "Provenance"]
    from gateway.mapping.golden import translate_case
    assert bundle_problems(translate_case(mapping_set, GOLDEN).bundle) == []


def _translated(mapping_set, text: str) -> dict:
    from zoneinfo import ZoneInfo
    from gateway.mapping.runtime import TranslationContext
    from gateway.mapping.golden import GOLDEN_RECEIVED_AT
    parsed = read_input(text.encode("latin-1"))
    context = TranslationContext(sender_id="", timezone=ZoneInfo("Africa/Casablanca"),
                                 received_at=GOLDEN_RECEIVED_AT, message_key=parsed.control_id,
                                 control_id=parsed.control_id)
    bundle = mapping_set.translate(parsed.message, context, parsed.message_type).bundle
    assert bundle_problems(bundle) == []
    return bundle


def test_result_values_are_numbers_when_they_are_and_text_otherwise(repo_mappings):
    """R-4 with units: a number (comparator kept, decimal comma read) is a Quantity; text in a
    test with units, or a value without units, is a string; never an error."""
    bundle = _translated(repo_mappings, "H|\\^&|||ANALYZER\rP|1||PAT-1\rO|1|SPC-1||^^^CHEM\r"
                         "R|1|^^^GLU|5,4|mmol/L||N||F\rR|2|^^^CRP|<3.00|mg/L||N||F\r"
                         "R|3|^^^IGE|Examine|g/L||N||F\rR|4|^^^ASP|Clair|||||F\rL|1|N\r")
    values = [{k: v for k, v in entry["resource"].items() if k.startswith("value")}
              for entry in bundle["entry"] if entry["resource"]["resourceType"] == "Observation"]
    assert values == [{"valueQuantity": {"value": 5.4, "unit": "mmol/L"}},
                      {"valueQuantity": {"value": 3.0, "unit": "mg/L", "comparator": "<"}},
                      {"valueString": "Examine"}, {"valueString": "Clair"}]


def test_order_without_a_test_id_reports_the_test_of_its_result(repo_mappings):
    """Stago sends the test id in R only: the report's code comes from its first result."""
    bundle = _translated(repo_mappings, "H|\\^&|||STA\rP|1\rO|1|000004782|226||R\rR|1|^^^SPT^F^64|14.02|S||||F\rL|1|N\r")
    report = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    assert report["code"]["coding"][0]["code"] == "SPT"


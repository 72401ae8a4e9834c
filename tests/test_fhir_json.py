"""Decimals keep the precision they were sent with (FHIR R4 decimal: 0.010 is not 0.01), from
the mapping transform through the stored bundle to the request the shared record receives."""
from __future__ import annotations

import copy
import json
import pickle

import orjson
import pytest

from gateway import fhir_json
from gateway.delivery.fhir_record import transaction_request_for_bundles, transaction_request_for_texts
from gateway.fhir_json import ExactDecimal, exact_decimal
from gateway.mapping.transforms.core import to_decimal
from gateway.store.translations import bundle_text


@pytest.mark.parametrize("text, written", [
    ("5.10", "5.10"), ("0.010", "0.010"), ("+007.50", "7.50"), ("-0.50", "-0.50"), (".5", "0.5"),
    ("-.25", "-0.25"), ("5.", "5"), ("-0.0", "-0.0"), ("000", "0"),
])
def test_a_decimal_is_written_as_sent_in_json_number_form(text, written):
    value = exact_decimal(text)
    assert value == float(text) and value.text == written
    assert fhir_json.dumps({"value": value}) == b'{"value":' + written.encode() + b"}"
    assert json.loads(fhir_json.dumps([value])) == [float(text)]


def test_an_exact_decimal_is_a_float_to_everything_else():
    """Arithmetic, comparison, json.dumps (a plain float there), copy and pickle."""
    value = exact_decimal("2.50")
    assert value * 2 == 5.0 and value > 2 and isinstance(value, float)
    assert json.dumps({"v": value}) == '{"v": 2.5}'
    for again in (copy.deepcopy(value), pickle.loads(pickle.dumps(value))):
        assert again == 2.5 and again.text == "2.50"


def test_the_decimal_transform_keeps_the_precision_sent():
    """NM '5.10' was the float 5.1; an integer stays an int; the decimal comma is read."""
    assert fhir_json.dumps([to_decimal(text, None) for text in ("5.10", "1,50", "12", " 0.0100 ")]) \
        == b"[5.10,1.50,12,0.0100]"
    assert type(to_decimal("12", None)) is int
    # Texts already in JSON's form are taken as they are; the others made so, the same way.
    for text in ("13.2", "0.85", "-1.5", "0.0", "-0.0", "10.00", "+13.2", "013.2", "13.", ".5", "-.5"):
        assert to_decimal(text, None).text == exact_decimal(text).text, text
    with pytest.raises(ValueError, match="out of range"):
        to_decimal("1" * 400 + ".5", None)
    with pytest.raises(ValueError):  # Arabic-Indic digits: float() reads them, JSON would not
        to_decimal("\u0661\u0663.\u0662", None)


def test_stored_bundles_and_record_requests_keep_the_decimals():
    """The stored text, the request built from the bundles, and the one copied from the
    stored text carry the same bytes, with 5.10 and 0.010 as sent."""
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{
        "fullUrl": "urn:uuid:obs-1",
        "resource": {"resourceType": "Observation", "id": "obs-1", "status": "final",
                     "valueQuantity": {"value": exact_decimal("5.10"), "unit": "mmol/L"},
                     "referenceRange": [{"low": {"value": exact_decimal("0.010")}}]}}]}
    stored = bundle_text(bundle)
    assert '"value":5.10,' in stored and '"value":0.010}' in stored
    built = transaction_request_for_bundles([bundle], base_url="https://record/fhir", idempotency_key="k")
    copied = transaction_request_for_texts([stored], base_url="https://record/fhir", idempotency_key="k")
    assert built.body == copied.body and b'"value":5.10,' in copied.body
    # A stored bundle read back (the console, the REST door) keeps them too.
    assert fhir_json.dumps(fhir_json.loads(stored)) == stored.encode()


def test_what_orjson_cannot_write_falls_back_to_json():
    """An integer past 64 bits (orjson refuses it): json writes it, the decimals then floats."""
    document = {"big": 2 ** 70, "value": ExactDecimal("1.50")}
    with pytest.raises(TypeError):
        orjson.dumps(document)
    assert json.loads(fhir_json.dumps(document)) == {"big": 2 ** 70, "value": 1.5}


def test_golden_cases_compare_a_decimal_as_written(tmp_path):
    """`mappings test` (and the golden tests) read the expected bundle with its decimals'
    text: 16.80 expected, 16.8 made is a difference (the command read floats, and passed it)."""
    from gateway.mapping.golden import differences, expected_bundle

    path = tmp_path / "case.json"
    path.write_text('{"resourceType": "Bundle", "entry": [], "value": 16.80}\n', encoding="utf-8")
    made = {"resourceType": "Bundle", "entry": [], "value": exact_decimal("16.8")}
    assert list(differences(expected_bundle(path), made)) == ["Bundle.value: 16.8, expected 16.80"]
    made["value"] = exact_decimal("16.80")
    assert list(differences(expected_bundle(path), made)) == []

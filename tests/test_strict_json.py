"""gateway.strict_json, pure: what it refuses and where it says the fault is; what it takes."""
from __future__ import annotations

import pytest

from gateway import fhir_json, strict_json
from gateway.strict_json import JsonInputError, NotUtf8


@pytest.mark.parametrize("text, message", [
    (b'{"a": 1, "a": 2}', '$: the key "a" appears twice in one object'),
    (b'{"a": [{}, {"b": {"c": 1, "c": 1}}]}', '$.a[1].b: the key "c" appears twice'),
    (b'{"a b": {"x": 1, "x": 2}}', '$["a b"]: the key "x" appears twice'),
    (b'{"a": [1, NaN]}', "$.a[1]: NaN is not a JSON number"),
    (b'{"a": 1e0000000001}', "$.a: a number's exponent has more than 9 digits"),
    (b'{"a": 1234567890123456789.5}', "$.a: a number has more than 18 digits before"),
    (b'{"a": "\\udfff x"}', "$.a: a string holds an escaped lone UTF-16 surrogate"),
    (b'{"a": "\\ud83d"}', "$.a: a string holds an escaped lone UTF-16 surrogate"),
    (b"[1] [2]", "the body is not JSON: Extra data at line 1 column 5"),
    (b"\xef\xbb\xbf[]", "the body starts with a byte order mark"),
])
def test_refusals_say_what_and_where(text, message):
    """Each refusal names the fault and the path of the value at fault (the first, in document order)."""
    with pytest.raises(JsonInputError) as raised:
        strict_json.loads(text)
    assert str(raised.value).startswith(message), str(raised.value)


def test_what_is_taken():
    """Escaped surrogate pairs, 18 digits before the point and 17 after, a zero with any
    exponent, duplicates in different objects, and a backslash before 'ud800' are JSON."""
    text = (b'{"e": "\\ud83d\\ude00", "i": -999999999999999999, "f": 0.12345678901234567,'
            b' "z": 0e-999, "x": [{"k": 1}, {"k": 2}], "s": "\\\\ud800", "d": 1.5e300}')
    assert strict_json.loads(text) == {"e": "\U0001F600", "i": -999999999999999999,
                                       "f": 0.12345678901234567, "z": 0.0, "x": [{"k": 1}, {"k": 2}],
                                       "s": "\\ud800", "d": 1.5e300}


def test_bytes_not_utf_8_and_exact_decimals():
    """Bytes that are not UTF-8 are NotUtf8 (the doors answer bad-encoding); parse_float gives
    the decimals, ExactDecimal keeping their text."""
    with pytest.raises(NotUtf8, match=r"byte 6"):
        strict_json.loads(b'{"a":"\xe9"}')
    value = strict_json.loads(b'{"v": 5.10}', parse_float=fhir_json.ExactDecimal)["v"]
    assert isinstance(value, fhir_json.ExactDecimal) and value.text == "5.10"


@pytest.mark.parametrize("content_type, foreign", [
    ("application/json", None), ("application/fhir+json; charset=utf-8", None),
    ('application/json; charset="UTF-8"', None), ("application/json;charset=utf8", None),
    ("application/json; charset=iso-8859-1", "iso-8859-1"), ("application/json; Charset=UTF-16", "UTF-16"),
])
def test_foreign_charset(content_type, foreign):
    """Only UTF-8 (or no charset) is JSON's."""
    assert strict_json.foreign_charset(content_type) == foreign

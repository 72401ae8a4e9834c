"""Canonical FHIR JSON, with each decimal written as the sender wrote it.

FHIR R4 (datatypes, decimal): "the precision of the decimal value has significance: e.g.
0.010 is regarded as different to 0.01, and the original precision should be preserved". A
float keeps no precision (5.10 is 5.1), so the mapping transforms give a decimal read from
text as an `ExactDecimal`: a float to everything that computes, compares or validates with it,
which keeps its text as a JSON number; `dumps` writes that text as it is. Other writers
(json.dumps) see a plain float.
"""
from __future__ import annotations

import json
import re

import orjson

_NUMBER = re.compile(r"([+-]?)0*(\d*)(?:\.(\d*))?", re.ASCII)
# A decimal already written as JSON writes it (most results: 13.2, 0.85, -1.5): its own text.
_JSON_DECIMAL = re.compile(r"-?(?:0|[1-9]\d*)\.\d+", re.ASCII)


class ExactDecimal(float):
    """A decimal that keeps its text (`text`, a JSON number: '5.10', '-0.5', '7')."""

    __slots__ = ("text",)

    def __new__(cls, text: str):
        value = super().__new__(cls, text)
        value.text = text if isinstance(text, str) else repr(float(text))  # copy and pickle pass a float
        return value


def exact_decimal(text: str) -> ExactDecimal:
    """The decimal written in `text` (digits, an optional sign and decimal point: what a
    transform has checked), its text made a JSON number and nothing else changed: '+007.50'
    is 7.50, '.5' is 0.5, '5.' is 5."""
    if _JSON_DECIMAL.fullmatch(text):
        return ExactDecimal(text)
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a plain decimal number")
    sign, whole, fraction = match.groups()
    number = ("-" if sign == "-" else "") + (whole or "0") + ("." + fraction if fraction else "")
    return ExactDecimal(number)


def dumps(document, indent: bool = False) -> bytes:
    """`document` as compact UTF-8 JSON (two-space indented with `indent`), decimals exact.
    orjson writes the text json.dumps would with these settings, at a tenth of the cost; json
    takes what orjson refuses (integers past 64 bits), its decimals then plain floats."""
    try:
        return orjson.dumps(document, default=_exact, option=orjson.OPT_INDENT_2 if indent else 0)
    except TypeError:  # orjson.JSONEncodeError is one
        if indent:
            return json.dumps(document, ensure_ascii=False, indent=2).encode("utf-8")
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def loads(text: str | bytes):
    """The document of `text`, each number with a fraction or an exponent an ExactDecimal:
    written again by `dumps` as it was (json, not orjson: slower, for where that matters)."""
    return json.loads(text, parse_float=ExactDecimal)


def _exact(value):
    if isinstance(value, ExactDecimal):
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def with_references(value, resolve):
    """A deep copy of `value` (a resource, or any part of one) whose `reference`s are what
    `resolve(reference)` gives for them, or left as they are when it gives None."""
    if isinstance(value, dict):
        copy = {key: with_references(item, resolve) for key, item in value.items()}
        reference = copy.get("reference")
        if isinstance(reference, str):
            copy["reference"] = resolve(reference) or reference
        return copy
    if isinstance(value, list):
        return [with_references(item, resolve) for item in value]
    return value

"""ASTM E1394 result values (R-4 with R-5 units): a number when it is one, else text.

Analyzers send numbers with units, but also text in the value field of a test that has units
('Examine', 'Positive') and numbers with a comparator ('<3.00', '>1000'). Called with no
`from:`, these read the R record being mapped.
"""
from __future__ import annotations

import re

from gateway.fhir_json import exact_decimal
from gateway.mapping.transforms import transform
from gateway.mapping.transforms.core import in_range

_COMPARED = re.compile(r"^\s*(<=|>=|<|>)?\s*([+-]?(?:\d+(?:[.,]\d*)?|[.,]\d+))\s*$")


def _field_text(segment, number: int, run) -> str:
    """The first component of field `number` of the record, decoded and stripped."""
    raw = segment.field(number)
    if not raw:
        return ""
    separators = run.separators
    raw = raw.split(separators.repetition, 1)[0] if separators.repetition else raw
    raw = raw.split(separators.component, 1)[0] if separators.component else raw
    return separators.text(raw).strip()


def numeric(text: str):
    """(comparator or '', number) when `text` is a number, with an optional comparator and a
    decimal comma; else None."""
    match = _COMPARED.match(text)
    if match is None:
        return None
    comparator, digits = match.groups()
    digits = digits.replace(",", ".")
    try:
        number = exact_decimal(digits) if "." in digits else int(digits)
    except ValueError:  # an integer of more than 4,300 digits
        return None
    if not in_range(number, digits):  # no number JSON can carry (1e400 reads as infinity): text
        return None
    return comparator or "", number


@transform("astm_quantity", node=True, reads="R-4, R-5")
def astm_quantity(node, run):
    """valueQuantity: R-4 when it is a number (comparator kept) and R-5 names its units."""
    if not hasattr(node, "field"):
        raise ValueError("astm_quantity reads the R record: use it without `from:`")
    unit = _field_text(node, 5, run)
    found = numeric(_field_text(node, 4, run))
    if not unit or found is None:
        return None
    comparator, number = found
    quantity = {"value": number, "unit": unit}
    if comparator:
        quantity["comparator"] = comparator
    return quantity


@transform("astm_text", node=True, reads="R-4, R-5")
def astm_text(node, run):
    """valueString: R-4 when it is not a number with units (text, or a value sent without
    units, as E1394 has it)."""
    if not hasattr(node, "field"):
        raise ValueError("astm_text reads the R record: use it without `from:`")
    value = _field_text(node, 4, run)
    if not value:
        return None
    if _field_text(node, 5, run) and numeric(value) is not None:
        return None
    return value

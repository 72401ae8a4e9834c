"""Orders, pharmacy and billing: what the YAML vocabulary cannot say on its own.

EI universal ids as identifier systems, v2 repeat patterns (table 0335) as FHIR Timing parts,
and the amount charged by an FT1 (extended amount, else unit amount times quantity).
"""
from __future__ import annotations

import re
from decimal import Decimal

from gateway.fhir_json import exact_decimal
from gateway.mapping.runtime import COMPONENT, FIELD, Part
from gateway.mapping.transforms import transform
from gateway.mapping.transforms.core import in_range

GTS = "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation"
# v3-GTSAbbreviation codes a v2 repeat pattern may carry as is.
_GTS_CODES = frozenset(("AM", "BID", "PM", "QD", "QID", "QOD", "TID", "Q1H", "Q2H", "Q3H",
                        "Q4H", "Q6H", "Q8H", "WK", "MO"))
# Table 0335 patterns: (frequency, period, periodUnit).
_NAMED = {"QD": (1, 1, "d"), "QAM": (1, 1, "d"), "QPM": (1, 1, "d"), "QHS": (1, 1, "d"),
          "BID": (2, 1, "d"), "TID": (3, 1, "d"), "QID": (4, 1, "d"), "QOD": (1, 2, "d")}
_EVERY = re.compile(r"^Q(\d+)([SMHDWL])$")
_TIMES_A_DAY = re.compile(r"^(\d+)ID$")
_UNITS = {"S": "s", "M": "min", "H": "h", "D": "d", "W": "wk", "L": "mo"}
DEFAULT_CURRENCY = "MAD"
# An amount as NM writes it: digits, a sign, a decimal point. Decimal() also reads exponents,
# NaN and Infinity: '1e999999999' would then be expanded to an integer of a billion digits.
_AMOUNT = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


def _components(node, run) -> list[str]:
    """The decoded components of a value (subcomponents when it is itself a component)."""
    if node.__class__ is not Part:
        return []
    separators = run.separators
    if node.level == FIELD:
        separator = separators.component
    elif node.level == COMPONENT:
        separator = separators.subcomponent
    else:
        return [separators.text(node.raw)]
    pieces = node.raw.split(separator) if separator else [node.raw]
    return [separators.text(piece) for piece in pieces]


@transform("orders_ei_system", node=True, reads="EI-3, EI-4")
def ei_system(node, run):
    """EI/HD universal id (EI-3, EI-4 type) -> identifier system: urn:oid: for ISO, urn:uuid: for UUID/GUID."""
    parts = _components(node, run) + ["", "", "", ""]
    universal, kind = parts[2].strip(), parts[3].strip().upper()
    if not universal:
        return None
    if kind == "ISO" and re.fullmatch(r"[0-2](\.\d+)+", universal):
        return "urn:oid:" + universal
    if kind in ("UUID", "GUID"):
        return "urn:uuid:" + universal.lower()
    if kind == "URI":
        return universal
    return None


def _pattern(text: str):
    code = text.strip().upper()
    if code in _NAMED:
        return _NAMED[code]
    match = _EVERY.match(code)
    if match:
        return 1, int(match.group(1)), _UNITS[match.group(2)]
    match = _TIMES_A_DAY.match(code)
    if match:
        return int(match.group(1)), 1, "d"
    return None


@transform("repeat_frequency")
def repeat_frequency(value: str, run):
    """v2 repeat pattern (table 0335: BID, Q6H, 3ID...) -> Timing.repeat.frequency."""
    found = _pattern(value)
    return found[0] if found else None


@transform("repeat_period")
def repeat_period(value: str, run):
    """v2 repeat pattern -> Timing.repeat.period."""
    found = _pattern(value)
    return found[1] if found else None


@transform("repeat_period_unit")
def repeat_period_unit(value: str, run):
    """v2 repeat pattern -> Timing.repeat.periodUnit (s, min, h, d, wk, mo)."""
    found = _pattern(value)
    return found[2] if found else None


@transform("timing_abbreviation")
def timing_abbreviation(value: str, run):
    """v2 repeat pattern that is also a v3 GTS abbreviation (BID, TID, Q6H...) -> Coding."""
    code = value.strip().upper()
    return {"system": GTS, "code": code} if code in _GTS_CODES else None


def _money(raw: str, run):
    """CP/MO text (amount&currency inside the first component) -> (Decimal, currency) or None."""
    separators = run.separators
    first = raw.split(separators.component, 1)[0] if separators.component else raw
    pieces = first.split(separators.subcomponent) if separators.subcomponent else [first]
    amount = separators.text(pieces[0]).strip().replace(",", ".")
    if not amount:
        return None
    number = _decimal(amount)
    if number is None:
        raise ValueError(f"{amount!r} is not an amount")
    currency = separators.text(pieces[1]).strip().upper() if len(pieces) > 1 else ""
    return number, currency or DEFAULT_CURRENCY


def _decimal(text: str) -> Decimal | None:
    """`text` as a Decimal when it is a plain number a double holds, else None."""
    if _AMOUNT.match(text) is None:
        return None
    number = Decimal(text)
    return number if in_range(number, text) else None


@transform("charge_price", node=True)
def charge_price(node, run):
    """FT1 -> Money charged: FT1-11 extended amount, else FT1-12 unit amount x FT1-10 quantity (MAD by default)."""
    if node.__class__ is Part:  # called on a field, not on the FT1 segment
        raise ValueError("charge_price reads the FT1 segment: use `from: FT1`")
    separators = run.separators
    extended = _money(node.field(11).split(separators.repetition)[0], run)
    if extended is None:
        unit = _money(node.field(12).split(separators.repetition)[0], run)
        if unit is None:
            return None
        quantity_text = separators.text(node.field(10).split(separators.component)[0]).strip() or "1"
        quantity = _decimal(quantity_text.replace(",", "."))
        if quantity is None:
            raise ValueError(f"FT1-10 {quantity_text!r} is not a quantity")
        extended = unit[0] * quantity, unit[1]
    amount, currency = extended
    text = format(amount, "f")  # as written (12.50), or as the product of two (25.00)
    value = exact_decimal(text) if "." in text else int(text)
    if not in_range(value, text):
        raise ValueError(f"the amount {str(amount)!r} is out of range (a number up to 1.8e308)")
    return {"value": value, "currency": currency}


"""JSON from outside, read strictly: the one reading of every door that takes JSON (the REST
door's FHIR Bundles and JSON operations, the translation of a stored Bundle and `gateway
translate`, the shared-record sandbox). Pure code.

Where two JSON readers read one text differently, a hostile sender can have the gateway check
one document while a downstream system reads another (a parser differential). RFC 8259
leaves these cases to each reader; `loads` refuses each of them, saying why and where:
- an object with the same key twice (RFC 8259 §4: names SHOULD be unique, readers keep the
  first, the last or both; FHIR JSON never repeats a property): the key and the object's path;
- a byte order mark (§8.1: senders MUST NOT add one; readers ignore it or fail), bytes that
  are not UTF-8 (§8.1);
- an escape of a lone UTF-16 surrogate ("\\ud800": no character, no UTF-8 for it);
- NaN, Infinity, -Infinity (not JSON; Python's reader takes them as numbers);
- a number outside FHIR's decimal grammar (at most 18 digits before the point and 17 after),
  or one whose exponent takes it past what a double holds (1e400 is read as infinity, 1e-400
  as 0): readers with 64-bit integers or doubles would read another value;
- anything after the document; nesting deeper than Python's reader goes.

Cost: the checks ride on the standard library's C reader: a hook per object (the duplicate
check), a search of the text for digit runs that a refused number has (a hook per number only
when there is one) and for surrogate escapes (orjson then looks for a lone one). On a 1 MB
Bundle of 2,500 resources: 16 ms where json.loads took 9 ms and orjson 6 ms, against some
200 ms to validate its resources. Saying where a refused key or number is reads the text a
second time, only then.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

import orjson

BOM = b"\xef\xbb\xbf"
MAX_INTEGER_DIGITS = 18  # FHIR decimal: -?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,9})?
MAX_FRACTION_DIGITS = 17
MAX_EXPONENT_DIGITS = 9
_NUMBER = re.compile(r"-?(\d+)(?:\.(\d+))?(?:[eE][+-]?(\d+))?")
# Digit runs that a refused number has: 19 before the point, 18 after it, or an exponent.
_SUSPECT_NUMBER = re.compile(r"\d{19}|\.\d{18}|\d[eE]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # in the text: maybe a lone surrogate
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a read string: one left alone (pairs are joined)
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class JsonInputError(ValueError):
    """Why a text is not accepted as JSON (`reason`, a sentence that quotes no value), and
    where (`where`: the path of the value at fault, such as `Bundle.entry[0].resource`; None
    when the reason says it, as a line and column, or the whole text is at fault)."""

    def __init__(self, reason: str, where: str | None = None):
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason
        self.where = where


class NotUtf8(JsonInputError):
    """Bytes that are not UTF-8."""


class _Refused(Exception):
    """Raised by a hook; the text is read again to say where."""


def loads(data: bytes, root: str = "$", what: str = "the body",
          parse_float: Callable[[str], Any] = float) -> Any:
    """The JSON document of `data` (UTF-8 bytes), or JsonInputError. `root` names the document
    in paths (`Bundle` gives `Bundle.entry[0]`), `what` in reasons; `parse_float` makes the
    numbers with a fraction or an exponent (fhir_json.ExactDecimal keeps their text)."""
    if data.startswith(BOM):
        raise JsonInputError(f"{what} starts with a byte order mark (U+FEFF): send JSON without "
                             "one (RFC 8259 section 8.1)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotUtf8(f"{what} is not UTF-8 (byte {error.start})") from None
    # Numbers are checked one by one only where the text may hold one to refuse: a hook per
    # number costs as much again as the reading (most Bundles have none of these digit runs).
    numbers = {"parse_int": _refuse_long_integer, "parse_float": _checked_float(parse_float)} \
        if _SUSPECT_NUMBER.search(text) else {"parse_float": parse_float}
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_refuse, **numbers)
    except _Refused:
        raise _located(text, root) from None
    except json.JSONDecodeError as error:
        raise JsonInputError(f"{what} is not JSON: {error.msg} at line {error.lineno} "
                             f"column {error.colno}") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise JsonInputError(f"{what} nests arrays or objects too deeply") from None
    if _SURROGATE_ESCAPE.search(text):
        try:  # orjson writes no lone surrogate (a C check); the walk that names its place is slower
            orjson.dumps(document, default=lambda value: None)
        except TypeError:
            found = _first_fault(document, root)
            if found is not None:
                raise found from None
    return document


def _unique_keys(pairs: list) -> dict:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise _Refused
    return document


def _refuse(name: str):
    raise _Refused


def _refuse_long_integer(text: str) -> int:
    if _number_fault(text) is not None:
        raise _Refused
    return int(text)


def _checked_float(parse_float):
    def read(text: str):
        if _number_fault(text) is not None:
            raise _Refused
        return parse_float(text)
    return read


def _number_fault(text: str) -> str | None:
    """Why the JSON number `text` is refused, or None."""
    whole, fraction, exponent = _NUMBER.fullmatch(text).groups()
    if len(whole) > MAX_INTEGER_DIGITS:
        return f"a number has more than {MAX_INTEGER_DIGITS} digits before its decimal point"
    if fraction and len(fraction) > MAX_FRACTION_DIGITS:
        return f"a number has more than {MAX_FRACTION_DIGITS} digits after its decimal point"
    if exponent is not None:
        if len(exponent) > MAX_EXPONENT_DIGITS:
            return f"a number's exponent has more than {MAX_EXPONENT_DIGITS} digits"
        value = float(text)
        if math.isinf(value):
            return "a number is too large for a double (a reader would take it as infinity)"
        if value == 0 and (whole + (fraction or "")).strip("0"):
            return "a number is too small for a double (a reader would take it as 0)"
    return None


# -- where: the text read again, every fault kept, the first in document order named ---------

class _Pairs(list):
    """An object's (key, value) pairs as read, duplicates kept."""


class _Fault:
    def __init__(self, reason: str):
        self.reason = reason


def _located(text: str, root: str) -> JsonInputError:
    def number(parse):
        def read(value: str):
            reason = _number_fault(value)
            return _Fault(reason) if reason else parse(value)
        return read

    document = json.loads(text, object_pairs_hook=_Pairs, parse_int=number(int),
                          parse_float=number(float),
                          parse_constant=lambda name: _Fault(f"{name} is not a JSON number"))
    found = _first_fault(document, root)
    return found if found is not None else JsonInputError("not JSON")  # not reached


def _first_fault(document: Any, root: str) -> JsonInputError | None:
    """The first fault of a document read by `_located` (or a plain one: lone surrogates), in
    document order, walked without recursion (a document may nest as deep as the reader went)."""
    stack = [(document, root)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                return JsonInputError("a string holds an escaped lone UTF-16 surrogate (such as "
                                      "\\ud800), which is no character", path)
        elif isinstance(value, _Fault):
            return JsonInputError(value.reason, path)
        elif isinstance(value, (dict, _Pairs)):
            pairs = list(value.items()) if isinstance(value, dict) else value
            seen = set()
            for key, _ in pairs:
                if _SURROGATE.search(key):
                    return JsonInputError("a key holds an escaped lone UTF-16 surrogate (such as "
                                          "\\ud800), which is no character", path)
                if key in seen:
                    return JsonInputError(f"the key {_quoted(key)} appears twice in one object "
                                          "(RFC 8259: names are unique)", path)
                seen.add(key)
            stack.extend((item, _member(path, key)) for key, item in reversed(pairs))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{index}]") for index, item in reversed(list(enumerate(value))))
    return None


def _member(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENTIFIER.fullmatch(key) else f"{path}[{_quoted(key)}]"


def _quoted(key: str) -> str:
    shown = key if len(key) <= 64 else key[:64] + "..."
    return json.dumps(shown)  # escapes (a lone surrogate too): the message stays storable text


def foreign_charset(content_type: str | None) -> str | None:
    """The charset a Content-Type declares when it is not UTF-8, else None. JSON between
    systems is UTF-8 (RFC 8259 section 8.1; application/json defines no charset parameter):
    a body read as UTF-8 while its header says otherwise is read differently by whoever
    honours the header."""
    for part in (content_type or "").split(";")[1:]:
        name, _, value = part.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').strip()
            if charset.lower().replace("-", "").replace("_", "") != "utf8":
                return charset
    return None

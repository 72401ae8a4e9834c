"""Search requests, parsed: `GET /fhir/Type?params` and the conditional URLs of a transaction
(`Type?identifier=system|value`, `ifNoneExist`).

Parameters (all of them must hold: AND):
- `identifier=[system|]value`: `value` matches any system, `|value` only no system,
  `system|` any value in that system; `identifier:not=...` the resources that have no such
  identifier (R4 search.html#token: those without any identifier too);
- `code=[system|]code`: the same forms, on the indexed codings (see indexes.py);
- `patient=` and `subject=`: `Type/id` or a bare id (`patient` targets Patient only);
- `_id=`;
- `_count=n` (0 to MAX_COUNT, default DEFAULT_COUNT): the page size; `total` counts them all.

At most MAX_PARAMETERS parameters in one search.

Values use FHIR search escaping (`\\|`, `\\,`, `\\$`, `\\\\`); `escape_token_part` produces
it. Unknown parameters and modifiers, and lists of values (an unescaped `,`: OR), are refused
(400) rather than silently ignored, so a caller never believes a filter applied that did not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl

from gateway.sandbox.record.indexes import parse_reference
from gateway.sandbox.record.operation_outcome import FhirError
from gateway.sandbox.record.validation import is_valid_id

DEFAULT_COUNT = 100
MAX_COUNT = 1000
# Each parameter is one more AND term; SQLite refuses a WHERE about 1000 terms deep (a 500)
MAX_PARAMETERS = 100
_ESCAPED = re.compile(r"\\(.)")


@dataclass(frozen=True)
class TokenClause:
    """`identifier` or `code`: `system` None means any system, "" means none; `value` None any."""

    param: str
    system: str | None
    value: str | None
    negated: bool = False  # `:not`: the resources without a matching one


@dataclass(frozen=True)
class ReferenceClause:
    param: str  # "patient" or "subject"
    target_type: str | None
    target_id: str


@dataclass(frozen=True)
class IdClause:
    id: str


Clause = TokenClause | ReferenceClause | IdClause


@dataclass(frozen=True)
class SearchQuery:
    resource_type: str
    clauses: tuple[Clause, ...]
    count: int = DEFAULT_COUNT


def escape_token_part(text: str) -> str:
    """`text` with the FHIR search escapes, ready to join as `system|value`."""
    return re.sub(r"([\\|,$])", r"\\\1", text)


def parse_query_string(query: str) -> list[tuple[str, str]]:
    """`a=1&b=2` as pairs, percent-decoded (UTF-8); a malformed encoding is a 400."""
    try:
        return parse_qsl(query, keep_blank_values=True, encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, ValueError) as error:
        raise FhirError.single(400, "invalid", f"query string is not valid UTF-8: {error.__class__.__name__}")


def parse_search(resource_type: str, pairs: list[tuple[str, str]]) -> SearchQuery:
    clauses: list[Clause] = []
    count = DEFAULT_COUNT
    if len(pairs) > MAX_PARAMETERS:
        raise FhirError.single(400, "too-costly", f"more than {MAX_PARAMETERS} search parameters")
    for name, value in pairs:
        if name in ("identifier", "code"):
            clauses.append(_token(name, value))
        elif name in ("identifier:not", "code:not"):
            clauses.append(replace(_token(name[:-4], value), negated=True))
        elif name in ("patient", "subject"):
            clauses.append(_reference(name, value))
        elif name == "_id":
            if not is_valid_id(value):
                raise FhirError.single(400, "value", "_id is not a valid resource id")
            clauses.append(IdClause(value))
        elif name == "_count":
            # isdigit() alone takes "²" (int() refuses it: a 500) and other scripts' digits;
            # int() refuses more than 4300 digits (a 500 too): the length is compared first
            digits = value.lstrip("0") or "0"
            if (not (value.isascii() and value.isdigit()) or len(digits) > len(str(MAX_COUNT))
                    or int(digits) > MAX_COUNT):
                raise FhirError.single(400, "value", f"_count must be an integer from 0 to {MAX_COUNT}")
            count = int(digits)
        else:
            raise FhirError.single(400, "not-supported", f"unsupported search parameter {name[:64]!r}")
    return SearchQuery(resource_type, tuple(clauses), count)


def _split_unescaped(text: str, separator: str = "|") -> list[str]:
    parts, current, escaped = [], "", False
    for char in text:
        if escaped:
            current += "\\" + char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current + ("\\" if escaped else ""))
    return parts


def _unescape(text: str) -> str:
    return _ESCAPED.sub(r"\1", text)


def _token(name: str, text: str) -> TokenClause:
    parts = _split_unescaped(text)
    if len(parts) > 2 or text == "":
        raise FhirError.single(400, "value", f"{name} must be [system|]value")
    # An unescaped comma means OR in FHIR: refused, rather than searched as part of the value
    if any(len(_split_unescaped(part, ",")) > 1 for part in parts):
        raise FhirError.single(400, "not-supported", f"{name}: a list of values (,) is not supported; "
                                                     "escape a comma in a value as \\,")
    if len(parts) == 1:
        return TokenClause(name, None, _unescape(parts[0]))
    system, value = _unescape(parts[0]), _unescape(parts[1])
    if system == "" and value == "":
        raise FhirError.single(400, "value", f"{name} must be [system|]value")
    return TokenClause(name, system, value if value != "" else None)


def _reference(name: str, text: str) -> ReferenceClause:
    if is_valid_id(text):
        target_type, target_id = None, text
    else:
        parsed = parse_reference(text)
        if parsed is None:
            raise FhirError.single(400, "value", f"{name} must be Type/id or an id")
        target_type, target_id = parsed
    if name == "patient":
        if target_type not in (None, "Patient"):
            raise FhirError.single(400, "value", "patient must refer to a Patient")
        target_type = "Patient"
    return ReferenceClause(name, target_type, target_id)

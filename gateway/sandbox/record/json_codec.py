"""JSON on the record's hot path: orjson when it is installed (several times faster, which
matters at thousands of resources a second), the standard library otherwise.

Both produce the same text: compact, UTF-8 (non-ASCII kept as is), key order preserved;
`sort_keys` gives a canonical form for hashing. Both refuse NaN and Infinity on input.
Numbers that orjson cannot represent (integers beyond 64 bits) fall back to the standard
library, so the output never depends on which one ran.

FHIR decimals keep their precision (5.10 is not 5.1): the request is read with
`fhir_json.ExactDecimal` numbers, which `dumps` writes as sent, and `loads_exact` reads the
stored text so again for what the record answers.
"""
from __future__ import annotations

import json

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None

from gateway import fhir_json
from gateway.fhir_json import ExactDecimal


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(text: str | bytes):
    """The document in `text` (bytes: UTF-8); ValueError (or RecursionError) when it is not
    JSON (or, bytes, not UTF-8)."""
    if orjson is not None:
        return orjson.loads(text)
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(text, parse_constant=_refuse_constant)


def loads_exact(text: str | bytes):
    """`loads`, each number with a fraction or an exponent an ExactDecimal (slower: for
    what is answered, not for the comparisons of the hot path)."""
    return fhir_json.loads(text)


def _exact(value):
    if isinstance(value, ExactDecimal):
        return orjson.Fragment(value.text)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(document, *, sort_keys: bool = False) -> str:
    return dumps_bytes(document, sort_keys=sort_keys).decode("utf-8")


def dumps_bytes(document, *, sort_keys: bool = False) -> bytes:
    if orjson is not None:
        try:
            return orjson.dumps(document, default=_exact, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
        except TypeError:  # e.g. an integer beyond 64 bits
            pass
    return json.dumps(document, ensure_ascii=False, sort_keys=sort_keys, separators=(",", ":")).encode("utf-8")

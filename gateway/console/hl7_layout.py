"""A raw HL7 v2 message laid out by segment and field, each field named from hl7apy's
definitions of the message's version (MSH-12; 2.5 when absent or unknown, then any version
from 2.3 to 2.8 that defines the segment). Pure code.

The layout follows ER7: segments end at CR (LF and CRLF tolerated), fields split on the
separator MSH-1 declares; MSH-1 is the separator itself and MSH-2 the encoding characters.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

_VERSIONS = ("2_5", "2_5_1", "2_4", "2_3_1", "2_3", "2_6", "2_7", "2_8")
MAX_SEGMENTS = 2000  # a page shows this many; the decoded text above has everything
# Fields and repetitions a page shows in all: a message of 16 MiB of "a|a|a|..." (or of CRs)
# was laid out whole, millions of them: gigabytes of memory and a page of hundreds of MB.
MAX_VALUES = 50_000
# Characters of values a page shows in all: one field of 16 MiB (or 50,000 of 300 characters)
# made a page of 128 MB, the decoded text shown twice over. Beyond, a value ends with "…".
MAX_CHARS = 1_000_000
_LINE = re.compile(r"[^\r\n]+")


@dataclass(frozen=True)
class Field:
    position: str  # "PID-5"
    name: str  # "Patient Name" ("" when no definition names it)
    value: str
    # The value's repetitions (split on MSH-2's repetition character): each is shown in its
    # own direction, so that a name repeated in Latin then Arabic script reads right.
    repetitions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Segment:
    name: str  # "PID"
    index: int  # 1-based order in the message
    fields: tuple[Field, ...]


def layout(text: str, version: str | None = None) -> list[Segment]:
    """The segments of `text` with their non-empty fields, named: at most MAX_SEGMENTS
    segments, MAX_VALUES fields and repetitions and MAX_CHARS characters of them."""
    lines = list(islice((m.group() for m in _LINE.finditer(text) if m.group().strip()), MAX_SEGMENTS))
    separator, repetition = "|", "~"
    if lines and lines[0].startswith(("MSH", "FHS", "BHS")) and len(lines[0]) > 3:
        separator = lines[0][3]
        encoding = lines[0][4:].split(separator, 1)[0]
        repetition = encoding[1] if len(encoding) > 1 else "~"
    segments = []
    budget, chars = MAX_VALUES, MAX_CHARS
    for index, line in enumerate(lines, start=1):
        parts = _split(line, separator, budget + 1)
        name = parts[0][:3] if parts[0] else "?"
        header = name in ("MSH", "FHS", "BHS")
        if header:
            # MSH-1 is the separator; MSH-2 onwards are parts[1:].
            values = [(1, separator)] + [(number, value) for number, value in enumerate(parts[1:], start=2)]
        else:
            values = list(enumerate(parts[1:], start=1))
        fields = []
        for number, value in values:
            if value == "" or budget <= 0 or chars <= 0:
                continue
            shown = (value,) if header and number <= 2 else tuple(_split(value, repetition, budget))
            shown = _within(shown, chars)
            budget -= len(shown)
            chars -= sum(len(piece) for piece in shown)
            fields.append(Field(f"{name}-{number}", field_name(name, number, version), value, shown))
        segments.append(Segment(name, index, tuple(fields)))
        if budget <= 0 or chars <= 0:
            break
    return segments


def _within(pieces: tuple[str, ...], most: int) -> tuple[str, ...]:
    """`pieces`, `most` characters of them in all: the one cut ends with "…", the rest dropped."""
    kept = []
    for piece in pieces:
        if len(piece) > most:
            kept.append(piece[:most] + "…")
            break
        kept.append(piece)
        most -= len(piece)
    return tuple(kept)


def _split(text: str, separator: str, most: int) -> list[str]:
    """text.split(separator), its first `most` pieces only (never millions of strings)."""
    return text.split(separator, most)[:most]


def field_name(segment: str, number: int, version: str | None = None) -> str:
    """The field's long name ("Patient Name"), or "" when no version defines it."""
    return _names(segment, _version_key(version)).get(number, "")


def _version_key(version: str | None) -> str:
    key = (version or "").strip().replace(".", "_")
    return key if key in _VERSIONS else "2_5"


@lru_cache(maxsize=512)
def _names(segment: str, version: str) -> dict[int, str]:
    for candidate in (version,) + _VERSIONS:
        names = _segment_names(candidate).get(segment)
        if names:
            return names
    return {}


@lru_cache(maxsize=None)
def _segment_names(version: str) -> dict[str, dict[int, str]]:
    try:
        definitions = importlib.import_module(f"hl7apy.v{version}.segments").SEGMENTS
    except ImportError:  # pragma: no cover - a trimmed hl7apy
        return {}
    found: dict[str, dict[int, str]] = {}
    for name, definition in definitions.items():
        children = definition[1] if len(definition) > 1 else ()
        names = {}
        for child in children or ():
            try:
                number = int(str(child[0]).rsplit("_", 1)[1])
                long_name = child[1][3]
            except (IndexError, ValueError, TypeError):
                continue
            if long_name:
                names[number] = _title(str(long_name))
        found[name] = names
    return found


def _title(long_name: str) -> str:
    """PATIENT_IDENTIFIER_LIST -> Patient Identifier List."""
    title = " ".join(word.capitalize() for word in long_name.split("_") if word)
    return title.replace(" S ", "'s ")  # MOTHER_S_MAIDEN_NAME: Mother's Maiden Name

"""ASTM E1394 (CLSI LIS02) records as an `Hl7Message`, so that one mapping engine reads them.

A message is the records from H to L, one per line (CR, LF or CRLF). Each record becomes a
segment named by its record type ('H', 'P', 'O', 'R', 'C', 'Q', 'M', 'S', 'L'), numbered as
ASTM numbers fields: the record type is field 1, so `R-3` is the universal test id and `R-4`
the value. The delimiters come from the H record (`H|\\^&`: field '|', repeat '\\', component
'^', escape '&'); ASTM has no subcomponents (`Separators.subcomponent` is ''). H-2, the
delimiter definition, is never split.

Tolerated, since analyzers do it: a frame-number digit left at the start of each line by a
capture that stripped only the E1381 control characters (`1H|`, `2P|`), whole E1381 frames
(`<STX>FN ... <ETX>C1C2<CR><LF>`, joined across ETB), a two-character delimiter definition
without escape character (`H|\\^|`), blank lines, and `#` comment lines before the H record.

Refused with a `RecordError` naming the record (`P[2]`) and field: no H record, an invalid
delimiter definition, a record type that is not one letter, no L terminator, records after L.
"""
from __future__ import annotations

import re

from adapters.hl7v2.message import Hl7Message, MessageParseError, Segment, Separators

RECORD_TYPES = frozenset("HPOCRQLMS")
MESSAGE_TYPE = "ASTM"

# E1381 framing left in a capture: a continuation (ETB ... STX FN) joins, the rest goes.
_CONTINUATION = re.compile(rb"\x17[0-9A-Fa-f]{2}\r?\n?\x02[0-7]")
_FRAME_END = re.compile(rb"\x03[0-9A-Fa-f]{2}\r?\n?")
_FRAME_START = re.compile(rb"\x02[0-7]?")
_LINK_CONTROL = re.compile(rb"[\x04\x05\x06\x15]")


class RecordError(MessageParseError):
    """The text is not a usable ASTM message; `location` names the record and field."""

    def __init__(self, reason: str, record: str = "H", sequence: int = 1, field: int = 0):
        super().__init__(reason, record, sequence, field)


def strip_low_level(data: bytes) -> bytes:
    """The record text of bytes that may still carry E1381 frames (unchanged when they do not)."""
    if b"\x02" not in data and b"\x03" not in data and b"\x04" not in data and b"\x05" not in data:
        return data
    data = _CONTINUATION.sub(b"", data)
    data = _FRAME_END.sub(b"", data)
    data = _FRAME_START.sub(b"", data)
    return _LINK_CONTROL.sub(b"", data)


def decode_records(data: bytes, fallback_codec: str | None = None) -> tuple[str, str]:
    """(text, codec): UTF-8 when the bytes are valid UTF-8, else the sender's fallback codec,
    else latin-1 (ASTM's customary 8-bit set, which decodes any byte)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        pass
    for codec in (fallback_codec, "latin-1"):
        if not codec:
            continue
        try:
            return data.decode(codec), codec
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode("latin-1"), "latin-1"


def _lines(text: str) -> list[str]:
    return text.replace("\r\n", "\r").replace("\n", "\r").split("\r")


def _strip_frame_number(line: str, field: str | None) -> str:
    """'1H|...' -> 'H|...': a digit 0-7 before a record type letter and the field delimiter."""
    if len(line) >= 3 and line[0] in "01234567" and line[1] in RECORD_TYPES \
            and (line[2] == field if field else not line[2].isalnum()):
        return line[1:]
    if field and len(line) == 2 and line[0] in "01234567" and line[1] in RECORD_TYPES:
        return line[1:]  # a bare record ('1L')
    return line


def separators_of(header: str, codec: str = "utf-8") -> Separators:
    """The delimiters declared by an H record's first characters (`H|\\^&`)."""
    if len(header) < 2 or header[0] != "H":
        raise RecordError("the message does not start with an H record")
    field = header[1]
    if field.isalnum() or field.isspace():
        raise RecordError(f"field delimiter {field!r} is not a punctuation character", field=1)
    end = header.find(field, 2)
    definition = header[2:end] if end >= 0 else header[2:]
    if len(definition) not in (2, 3):
        raise RecordError(f"delimiter definition {definition!r} must be 3 characters "
                          "(repeat, component, escape), as in H|\\^&", field=2)
    chars = field + definition
    if len(set(chars)) != len(chars) or any(c.isalnum() or c.isspace() for c in definition):
        raise RecordError(f"delimiter definition {definition!r} has letters, digits, spaces or "
                          "repeated delimiters", field=2)
    escape = definition[2] if len(definition) == 3 else ""
    return Separators(field=field, component=definition[1], repetition=definition[0],
                      escape=escape, subcomponent="", codec=codec)


def parse_records(text: str, codec: str = "utf-8", header_only: bool = False) -> Hl7Message:
    """Tokenize one decoded ASTM message (H ... L) into record segments; with `header_only`,
    its H record alone (the rest neither read nor checked: what ingest needs, in time that
    does not grow with the results)."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _head_lines(text) if header_only else _lines(text)
    start = 0
    while start < len(lines):
        line = lines[start].strip(" \t")
        if line and not line.startswith("#"):
            break
        start += 1
    if start == len(lines):
        raise RecordError("empty message: no H record")
    first = _strip_frame_number(lines[start].lstrip(" \t"), None)
    if not first.startswith("H") or len(first) < 2 or first[1].isalnum():
        raise RecordError(f"the message does not start with an H record (found {first[:8]!r})")
    separators = separators_of(first, codec)
    field = separators.field
    segments: list[Segment] = []
    counts: dict[str, int] = {}
    ended = False
    for line in lines[start:]:
        if not line.strip(" \t"):
            continue
        line = _strip_frame_number(line, field)
        name = line[0]
        sequence = counts.get(name, 0) + 1
        if name not in RECORD_TYPES or (len(line) > 1 and line[1] != field):
            raise RecordError(f"record {len(segments) + 1} has an invalid record type "
                              f"{line[:8]!r}", name if name.isalpha() else "?", sequence)
        if ended:
            raise RecordError("record after the L terminator", name, sequence)
        if name == "H" and segments:
            raise RecordError("a second H record: one message per transfer text; split it first",
                              "H", sequence)
        counts[name] = sequence
        parts = line.split(field)
        segments.append(Segment(name, [name, *parts], unsplit=2 if name == "H" else 0))
        if name == "L":
            ended = True
    if not ended and not header_only:
        raise RecordError("no L terminator record: the message is incomplete", "L", 1)
    return Hl7Message(segments, separators)


_LINE = re.compile(r"[^\r\n]+")


def _head_lines(text: str) -> list[str]:
    """The lines of `text` through its first record (blank and '#' comment lines before it)."""
    lines = []
    for match in _LINE.finditer(text):
        lines.append(line := match.group())
        if line.strip(" \t") and not line.lstrip(" \t").startswith("#"):
            break
    return lines


def split_messages(text: str) -> list[str]:
    """The messages (H ... L) of one transfer's text, each as its lines joined by CR; text
    outside H ... L is kept with the message it follows, so that nothing is lost silently."""
    messages: list[list[str]] = []
    for line in _lines(text):
        if not line.strip():
            continue
        record = _strip_frame_number(line, None)
        if record.startswith("H") and len(record) > 1 and not record[1].isalnum() or not messages:
            messages.append([])
        messages[-1].append(line)
    return ["\r".join(lines) + "\r" for lines in messages]


def control_id_of(message: Hl7Message, data: bytes) -> str:
    """H-3 (the message control id), or when empty 'sha256:' and the first 16 hex digits of
    the bytes, so that every message has a stable id."""
    import hashlib
    control = message.value("H", 3)
    return control or "sha256:" + hashlib.sha256(data).hexdigest()[:16]

"""The fast tokenizer: a decoded HL7 v2 message split into segments and fields, the rest on demand.

Only segments and fields are split up front; repetitions, components and subcomponents are split
when a mapping reads them, and escape sequences are decoded at the leaf, after splitting, so that
an escaped delimiter (`\\S\\`) never splits anything. Numbering follows the standard: for MSH,
`fields[1]` is MSH-1 (the field separator) and `fields[2]` MSH-2; for every other segment
`fields[n]` is SEG-n. Line ends may be CR, LF or CRLF.

The same containers carry the other formats that share HL7's structure (ASTM E1394 records,
v2 XML, CSV rows), so that one mapping engine reads them all.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from adapters.hl7v2.escape import unescape


class MessageParseError(ValueError):
    """The text is not an HL7 v2 message; `segment` and `field` locate the problem (1-based)."""

    def __init__(self, reason: str, segment: str = "MSH", sequence: int = 1, field: int = 0):
        super().__init__(reason)
        self.reason = reason
        self.segment = segment
        self.sequence = sequence
        self.field = field

    @property
    def location(self) -> str:
        where = f"{self.segment}[{self.sequence}]"
        return f"{where}-{self.field}" if self.field else where


@dataclass(frozen=True, slots=True)
class Separators:
    """The delimiters of one message (subcomponent '' when the format has none, as ASTM)."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    codec: str = "utf-8"  # for \\Xhh\\ sequences
    truncation: str = ""  # MSH-2's fifth character (v2.7), which \\P\\ stands for

    def text(self, raw: str) -> str:
        """A leaf value with its escape sequences decoded."""
        if not self.escape or self.escape not in raw:
            return raw
        return unescape(raw, self.escape, self.field, self.component, self.repetition,
                        self.subcomponent, self.codec, self.truncation)


class Segment:
    """One segment: `name` and the raw (still escaped) `fields`, fields[n] being SEG-n."""

    __slots__ = ("name", "fields", "_repetitions", "_unsplit")

    def __init__(self, name: str, fields: list[str], unsplit: int = 0):
        self.name = name
        self.fields = fields
        self._repetitions: dict[int, list[str]] = {}
        self._unsplit = unsplit  # fields up to this number are never split (MSH-1, MSH-2)

    def field(self, number: int) -> str:
        """SEG-n as sent ('' when absent)."""
        fields = self.fields
        return fields[number] if 0 < number < len(fields) else ""

    def repetitions(self, number: int, separator: str) -> list[str]:
        """SEG-n split on the repetition separator (cached; [] when the field is empty)."""
        cached = self._repetitions.get(number)
        if cached is None:
            raw = self.fields[number] if 0 < number < len(self.fields) else ""
            if not raw:
                cached = []
            elif number <= self._unsplit or not separator or separator not in raw:
                cached = [raw]
            else:
                cached = raw.split(separator)
            self._repetitions[number] = cached
        return cached

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {len(self.fields) - 1} fields)"


class Hl7Message:
    """Segments in order, with an index by segment name for the mapping engine's lookups."""

    __slots__ = ("segments", "separators", "_positions")

    def __init__(self, segments: list[Segment], separators: Separators):
        self.segments = segments
        self.separators = separators
        self._positions: dict[str, list[int]] | None = None

    def positions(self, name: str) -> list[int]:
        """Indexes in `segments` of the segments named `name`, in order."""
        index = self._positions
        if index is None:
            index = {}
            for position, segment in enumerate(self.segments):
                index.setdefault(segment.name, []).append(position)
            self._positions = index
        return index.get(name, [])

    def first(self, name: str, start: int = 0, end: int | None = None) -> int:
        """Index of the first `name` segment in [start, end), or -1."""
        found = self.positions(name)
        at = bisect_left(found, start)
        if at < len(found) and (end is None or found[at] < end):
            return found[at]
        return -1

    def segment(self, name: str) -> Segment | None:
        at = self.first(name)
        return self.segments[at] if at >= 0 else None

    def value(self, name: str, field: int, component: int = 1, subcomponent: int = 1,
              repetition: int = 1) -> str:
        """One decoded leaf of the first `name` segment ('' when absent): a convenience for
        callers outside the mapping engine, which has its own compiled access."""
        segment = self.segment(name)
        if segment is None:
            return ""
        separators = self.separators
        reps = segment.repetitions(field, separators.repetition)
        if len(reps) < repetition:
            return ""
        value = reps[repetition - 1]
        if name == "MSH" and field <= 2:
            return value
        value = _part(value, separators.component, component)
        value = _part(value, separators.subcomponent, subcomponent)
        return separators.text(value)

    @property
    def message_type(self) -> str:
        """MSH-9 as CODE^TRIGGER ('' parts dropped)."""
        return "^".join(part for part in (self.value("MSH", 9, 1), self.value("MSH", 9, 2)) if part)


def _part(value: str, separator: str, number: int) -> str:
    if not separator or separator not in value:
        return value if number == 1 else ""
    parts = value.split(separator)
    return parts[number - 1] if number <= len(parts) else ""


def parse_message(text: str, codec: str = "utf-8") -> Hl7Message:
    """Tokenize one decoded ER7 message. Raises MessageParseError when it has no usable MSH."""
    if text.startswith("\ufeff"):
        text = text[1:]
    text = text.lstrip("\r\n\t ")
    if not text.startswith("MSH"):
        reason = "empty message" if not text else "message does not start with an MSH segment"
        raise MessageParseError(reason)
    if len(text) < 8:
        raise MessageParseError("MSH segment is truncated", field=2)
    field = text[3]
    if field.isalnum() or field.isspace():
        raise MessageParseError(f"MSH-1 field separator {field!r} is not a punctuation character",
                                field=1)
    stop = text.find(field, 4)
    line_end = min((at for at in (text.find("\r"), text.find("\n")) if at >= 0), default=len(text))
    encoding = text[4:stop if 0 <= stop < line_end else line_end]
    # Component, repetition, escape, then (optional) subcomponent and, from v2.7, truncation:
    # with three characters the message has no subcomponents (HL7 v2 2.5.5.2).
    if not 3 <= len(encoding) <= 5 or len(set(encoding + field)) != len(encoding) + 1 \
            or any(char.isalnum() or char.isspace() for char in encoding):
        raise MessageParseError(f"MSH-2 encoding characters {encoding!r} are not valid", field=2)
    subcomponent = encoding[3] if len(encoding) > 3 else ""
    separators = Separators(field, encoding[0], encoding[1], encoding[2], subcomponent, codec,
                            encoding[4] if len(encoding) > 4 else "")
    if "\n" in text:
        text = text.replace("\r\n", "\r").replace("\n", "\r")
    segments = []
    for line in text.split("\r"):
        if not line:
            continue
        fields = line.split(field)
        name = fields[0]
        if name == "MSH":
            fields.insert(1, field)
            segments.append(Segment(name, fields, unsplit=2))
        else:
            if len(name) != 3 or not _is_segment_name(name):
                raise MessageParseError(f"segment {len(segments) + 1} has an invalid name "
                                        f"{name[:8]!r}", segment=name[:3] if _is_segment_name(name[:3]) else "?",
                                        sequence=len(segments) + 1)
            segments.append(Segment(name, fields))
    return Hl7Message(segments, separators)


def _is_segment_name(name: str) -> bool:
    """Letters and digits of ASCII (str.isalnum() alone also takes 'PÎD' or Arabic digits)."""
    return name.isascii() and name.isalnum()

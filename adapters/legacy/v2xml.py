"""HL7 v2 XML encoding (the urn:hl7-org:v2xml schema, and the namespace-less dialects of HAPI
and Mirth) as an `Hl7Message` with the standard separators, so that the ER7 mapping files
apply unchanged.

    <ORU_R01 xmlns="urn:hl7-org:v2xml">        the root: message structure (ignored)
      <MSH><MSH.1>|</MSH.1><MSH.2>^~\\&amp;</MSH.2>   MSH-1 and MSH-2, taken as written
           <MSH.9><MSG.1>ORU</MSG.1>...             components: any name ending in .n
      <ORU_R01.PATIENT_RESULT> <PID>...             groups: flattened in document order

An element named like a segment (three capitals or digits: PID, ZPD, OBX) is a segment; any
other element with children is a group and is descended into. Inside a segment, `SEG.n` is
field n (repeated elements: repetitions), its children are components by their trailing
number (`XPN.1`, `CM_MSG.2`, Mirth's `PID.5.1`), theirs subcomponents. Text is ER7-escaped
(`|` -> `\\F\\`, `^` -> `\\S\\` ...; CR and LF as `\\X0D\\` `\\X0A\\`) so that a delimiter in a
value never splits it.

The parser is hardened: no DTD is loaded, no entity resolved, no network, no huge trees, a
size limit, and any DOCTYPE is refused outright (XXE and billion-laughs probes never reach
the parser's entity machinery).
"""
from __future__ import annotations

import re

from lxml import etree

from adapters.hl7v2.message import Hl7Message, MessageParseError, Segment, Separators
from adapters.safe_xml import safe_parser

DEFAULT_MAX_SIZE = 16 * 1024 * 1024
# No segment has this many fields, no data type this many components. The number sizes the
# ER7 built (`<PID.999999999>` alone would be a billion empty fields), so it is bounded.
MAX_NUMBER = 1000
SEPARATORS = Separators()
_SEGMENT = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_NUMBERED = re.compile(r"\.(\d+)$")
_DOCTYPE = re.compile(rb"<!\s*DOCTYPE", re.IGNORECASE)
_ENTITY = re.compile(rb"<!\s*ENTITY", re.IGNORECASE)


class XmlInputError(MessageParseError):
    """Not a usable v2 XML message; `location` is the XML line, or the segment and field."""

    def __init__(self, reason: str, segment: str = "XML", sequence: int = 1, field: int = 0,
                 line: int = 0):
        super().__init__(reason, segment, sequence, field)
        self.line = line

    @property
    def location(self) -> str:
        if self.line:
            return f"line {self.line}"
        return super().location


def _parser() -> etree.XMLParser:
    return safe_parser(huge_tree=False, remove_comments=True, remove_pis=True, collect_ids=False)


def _refuse_declarations(data: bytes) -> None:
    # Checked on the bytes (and on their UTF-16 form) before lxml sees anything.
    for encoded in (data, data.replace(b"\x00", b"")):
        match = _DOCTYPE.search(encoded) or _ENTITY.search(encoded)
        if match:
            line = encoded.count(b"\n", 0, match.start()) + 1
            raise XmlInputError("DOCTYPE declarations are refused in v2 XML (no DTD, no entities: "
                                "XXE and entity-expansion protection)", line=line)


def parse_v2xml(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> Hl7Message:
    """Parse v2 XML bytes (encoding from the XML declaration, else UTF-8)."""
    if len(data) > max_size:
        raise XmlInputError(f"XML document of {len(data)} bytes exceeds the {max_size}-byte limit")
    if not data.strip():
        raise XmlInputError("empty XML document")
    _refuse_declarations(data)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as error:
        line = error.lineno or 0
        # libxml2 ends some messages with a newline, which lxml follows with ', line n, column m'
        message = " ".join(error.msg.split()).replace(" ,", ",")
        raise XmlInputError(f"not well-formed XML: {message}", line=line) from None
    except ValueError as error:  # e.g. an unsupported encoding declaration
        raise XmlInputError(f"unreadable XML: {error}") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise XmlInputError("DOCTYPE declarations are refused in v2 XML", line=1)
    segments: list[Segment] = []
    _collect(root, segments, _Budget(len(data)))
    if not segments or segments[0].name != "MSH":
        found = segments[0].name if segments else "no segment"
        raise XmlInputError(f"the message does not start with an MSH segment (found {found})",
                            line=getattr(root, "sourceline", 0) or 0)
    return Hl7Message(segments, SEPARATORS)


def _local(element) -> str:
    tag = element.tag
    if not isinstance(tag, str):
        return ""
    return tag.rsplit("}", 1)[-1]


class _Budget:
    """The fields and components the ER7 built may hold: as many as the document has bytes
    (ER7 spends a delimiter on each), plus room for a few high numbers in a small document.
    MAX_NUMBER alone bounds one element, not their sum: 22-byte `<ZZZ><ZZZ.1000/></ZZZ>`
    segments made 8 KB of fields each (a 16 MB document: gigabytes), and `<Y.1000/>`
    components a thousand joins each (41 KB took 1.5 s)."""

    def __init__(self, size: int):
        self.left = size + 2 * MAX_NUMBER

    def spend(self, count: int, element, segment: str = "XML", sequence: int = 1) -> None:
        self.left -= count
        if self.left < 0:
            raise XmlInputError(f"{_local(element)}: the document numbers more fields and "
                                "components than it has bytes", segment, sequence,
                                line=element.sourceline or 0)


def _collect(element, segments: list[Segment], budget: _Budget) -> None:
    for child in element:
        name = _local(child)
        if not name:
            continue
        if _SEGMENT.match(name):
            segments.append(_segment(child, name, len(segments) + 1, budget))
        elif len(child):
            _collect(child, segments, budget)


def _segment(element, name: str, sequence: int, budget: _Budget) -> Segment:
    repetitions: dict[int, list[str]] = {}
    prefix = name + "."
    for child in element:
        tag = _local(child)
        if not tag.startswith(prefix) or not tag[len(prefix):].isdecimal():
            continue  # not a field of this segment (annotations, foreign elements)
        number = _number(tag[len(prefix):])
        if not 1 <= number <= MAX_NUMBER:
            raise XmlInputError(f"{tag}: fields are numbered from 1 to {MAX_NUMBER}", name,
                                sequence, line=child.sourceline or 0)
        if name == "MSH" and number <= 2:
            repetitions.setdefault(number, []).append(child.text or "")
        else:
            repetitions.setdefault(number, []).append(_value(child, 2, budget))
    size = max(repetitions, default=0)
    budget.spend(size, element, name, sequence)
    fields = [name] + [""] * size
    for number, values in repetitions.items():
        fields[number] = values[0] if number <= 2 and name == "MSH" else "~".join(values)
    if name == "MSH":
        fields += [""] * (3 - len(fields))  # MSH-1 and MSH-2 are always there (`<MSH/>` has none)
        fields[1] = fields[1] or "|"
        fields[2] = fields[2] or "^~\\&"
        return Segment(name, fields, unsplit=2)
    return Segment(name, fields)


def _value(element, depth: int, budget: _Budget) -> str:
    """A field (depth 2: components) or a component (depth 1: subcomponents) as ER7 text."""
    children = [child for child in element if _local(child)]
    if not children:
        return escape(element.text or "")
    if depth == 0:
        return _mixed(element)
    parts: dict[int, str] = {}
    for child in children:
        match = _NUMBERED.search(_local(child))
        if not match:
            continue
        number = _number(match.group(1))
        if number > MAX_NUMBER:
            raise XmlInputError(f"{_local(child)}: components are numbered from 1 to {MAX_NUMBER}",
                                line=child.sourceline or 0)
        if number >= 1 and number not in parts:
            parts[number] = _value(child, depth - 1, budget)
    if not parts:
        return _mixed(element)
    budget.spend(max(parts), element)
    joiner = "^" if depth == 2 else "&"
    return joiner.join(parts.get(number, "") for number in range(1, max(parts) + 1))


def _mixed(element) -> str:
    """A leaf with markup in its text: `<escape V=".br"/>` (the v2 XML form of an escape
    sequence, as in `line 1<escape V=".br"/>line 2`) becomes that ER7 sequence; any other
    element gives its text. Nothing after the first child is dropped."""
    out = [escape(element.text or "")]
    for child in element:
        sequence = child.get("V", "") if _local(child) == "escape" else ""
        if sequence and not _NEEDS_ESCAPE.search(sequence):
            out.append("\\" + sequence + "\\")
            out.append(escape(child.tail or ""))
        elif _local(child):
            out.append(escape("".join(child.itertext()) + (child.tail or "")))
        else:
            out.append(escape(child.tail or ""))  # a comment or PI removed: its tail stays
    return "".join(out)


def _number(digits: str) -> int:
    """A field or component number; any longer than MAX_NUMBER's digits as MAX_NUMBER + 1
    (int() refuses 4,300 digits with a ValueError, which is no input error)."""
    return int(digits) if len(digits) <= len(str(MAX_NUMBER)) else MAX_NUMBER + 1


_ESCAPES = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\",
            "\r": "\\X0D\\", "\n": "\\X0A\\"}
_NEEDS_ESCAPE = re.compile(r"[\\|^&~\r\n]")


def escape(text: str) -> str:
    """Text as an ER7 leaf with the standard separators."""
    if not _NEEDS_ESCAPE.search(text):
        return text
    return _NEEDS_ESCAPE.sub(lambda match: _ESCAPES[match.group()], text)

"""Reading any supported input into the tokenized form the mapping engine reads.

`read_input(data)` recognises the format from the first meaningful bytes (after a BOM and
whitespace) and hands them to its adapter:

    MSH / FHS / BHS         'hl7v2'      ER7 (adapters.hl7v2)
    <                       'hl7v2-xml'  v2 XML (adapters.legacy.v2xml), hardened parser
    H| or 1H| (any delim.)  'astm'       ASTM E1394 records (adapters.astm.records)
    a delimited first line  'csv'        a CSV export (adapters.legacy.csv_export)

Each decodes with the declared character set (or the sender's fallback) and tokenizes into an
Hl7Message that the same mapping engine reads. Errors are InputError with a precise reason, the
format, and where known a location. The raw bytes are never changed: callers keep them.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.hl7v2.charsets import CharsetError, decode
from adapters.hl7v2.header import HeaderError, parse_header
from adapters.hl7v2.message import Hl7Message, MessageParseError, parse_message

from adapters.astm import records as astm_records
from adapters.legacy import csv_export
from adapters.legacy.v2xml import parse_v2xml

FORMATS = ("hl7v2", "hl7v2-xml", "astm", "csv")


class InputError(ValueError):
    def __init__(self, reason: str, location: str = "", format: str = ""):
        super().__init__(f"{location}: {reason}" if location else reason)
        self.reason = reason
        self.location = location
        self.format = format


@dataclass(frozen=True)
class ParsedInput:
    message: Hl7Message
    message_type: str  # the key of the message map: 'ORU^R01', 'ASTM', ...
    format: str  # one of FORMATS
    control_id: str
    sending_application: str = ""
    sending_facility: str = ""


def detect_format(data: bytes) -> str:
    """The format of `data` by its first meaningful bytes ('' when unrecognised)."""
    start = data.lstrip(b"\xef\xbb\xbf\r\n\t \x0b")
    if start.startswith((b"MSH", b"FHS", b"BHS")):
        return "hl7v2"
    if start.startswith(b"<"):
        return "hl7v2-xml"
    if _is_astm(start):
        return "astm"
    if csv_export.looks_like_csv(data):
        return "csv"
    return ""


def _is_astm(start: bytes) -> bool:
    # 'H|\^&', a frame number before it ('1H|'), an E1381 capture (EOT, ENQ, STX '1H|'), after
    # blank and '#' comment lines (as some analyzer documentation samples have).
    for line in start[:8192].splitlines():
        line = line.lstrip(b"\x02\x04\x05\x06\x15 \t")
        if not line or line.startswith(b"#"):
            continue
        if line[:1].isdigit() and line[:1] in b"01234567":
            line = line[1:]
        return len(line) >= 3 and line[:1] == b"H" and 0x21 <= line[1] <= 0x7E \
            and not chr(line[1]).isalnum()
    return False


def read_input(data: bytes, fallback_codec: str | None = None, format: str | None = None,
               *, csv_profiles: dict[str, tuple[str, ...]] | None = None) -> ParsedInput:
    """Decode and tokenize one message of any supported format (detected when `format` is
    not given). `csv_profiles` (profile -> columns) defaults to those of the repository's
    mappings/ (see adapters.legacy.csv_export)."""
    format = format or detect_format(data)
    if format == "hl7v2":
        return read_er7(data, fallback_codec)
    if format == "hl7v2-xml":
        return read_v2xml(data)
    if format == "astm":
        return read_astm(data, fallback_codec)
    if format == "csv":
        return read_csv(data, fallback_codec, csv_profiles)
    if format:
        raise InputError(f"unknown input format {format!r}; known: {', '.join(FORMATS)}")
    raise InputError("unrecognised input: not HL7 v2 (MSH), v2 XML, ASTM or a known CSV export")


def read_er7(data: bytes, fallback_codec: str | None = None) -> ParsedInput:
    try:
        header = parse_header(data)
    except HeaderError as error:
        raise InputError(error.reason, "^".join(error.location.components()), "hl7v2") from None
    try:
        decoded = decode(data, header.charset, fallback_codec)
    except CharsetError as error:
        raise InputError(error.reason, "MSH^1^18", "hl7v2") from None
    try:
        message = parse_message(decoded.text, decoded.codec)
    except MessageParseError as error:
        raise InputError(error.reason, error.location, "hl7v2") from None
    return ParsedInput(message, header.message_type, "hl7v2", message.value("MSH", 10),
                       message.value("MSH", 3), message.value("MSH", 4))


def read_v2xml(data: bytes) -> ParsedInput:
    """HL7 v2 XML: the encoding comes from the XML declaration (UTF-8 by default)."""
    try:
        message = parse_v2xml(data)
    except MessageParseError as error:
        raise InputError(error.reason, error.location, "hl7v2-xml") from None
    return ParsedInput(message, message.message_type, "hl7v2-xml", message.value("MSH", 10),
                       message.value("MSH", 3), message.value("MSH", 4))


def read_astm(data: bytes, fallback_codec: str | None = None) -> ParsedInput:
    """One ASTM E1394 message (H ... L); E1381 framing left in the bytes is removed."""
    text, codec = astm_records.decode_records(astm_records.strip_low_level(data), fallback_codec)
    try:
        message = astm_records.parse_records(text, codec)
    except MessageParseError as error:
        raise InputError(error.reason, error.location, "astm") from None
    return ParsedInput(message, astm_records.MESSAGE_TYPE, "astm",
                       astm_records.control_id_of(message, data), message.value("H", 5), "")


def read_csv(data: bytes, fallback_codec: str | None = None,
             profiles: dict[str, tuple[str, ...]] | None = None) -> ParsedInput:
    """A CSV export: message type 'CSV^<profile>' chosen by its header, else 'CSV'."""
    if profiles is None:
        profiles = csv_export.csv_profiles()
    try:
        text, _codec = csv_export.decode_csv(data, fallback_codec)
        message, profile = csv_export.parse_csv(text, profiles)
    except MessageParseError as error:
        raise InputError(error.reason, error.location, "csv") from None
    message_type = f"CSV^{profile}" if profile else "CSV"
    return ParsedInput(message, message_type, "csv", csv_export.control_id_of(data))

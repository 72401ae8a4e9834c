"""Reading any supported input into the tokenized form the mapping engine reads.

`read_input(data)` recognises the format from the first meaningful bytes (after a BOM and
whitespace) and hands them to its adapter:

    MSH / FHS / BHS         'hl7v2'      ER7 (adapters.hl7v2)
    < (or UTF-16 BOM, <)    'hl7v2-xml'  v2 XML (adapters.legacy.v2xml), hardened parser
    H| or 1H| (any delim.)  'astm'       ASTM E1394 records (adapters.astm.records)
    a delimited first line  'csv'        a CSV export (adapters.legacy.csv_export)
    {                       'fhir'       a FHIR Bundle (gateway.translation.fhir_input)

Two formats are documents rather than messages: 'fhir' (a Bundle received by POST /v1/fhir)
and 'soap-report' (a SubmitReport received by SOAP, never detected: the door names it). They
do not go through the mapping engine: `read_document` parses them and the translator makes
them canonical directly (DOCUMENT_FORMATS).

Each decodes with the declared character set (or the sender's fallback) and tokenizes into an
Hl7Message that the same mapping engine reads. Errors are InputError with a precise reason, the
format, and where known a location. The raw bytes are never changed: callers keep them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from adapters.hl7v2.charsets import CharsetError, decode
from adapters.hl7v2.message import Hl7Message, MessageParseError, parse_message

from adapters.astm import records as astm_records
from adapters.legacy import csv_export
from adapters.legacy.v2xml import parse_v2xml

FORMATS = ("hl7v2", "hl7v2-xml", "astm", "csv", "fhir", "soap-report")
DOCUMENT_FORMATS = ("fhir", "soap-report")


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
    if start.startswith(b"<") or _is_utf16_markup(data):
        return "hl7v2-xml"
    if start.startswith(b"{"):
        return "fhir"
    if _is_astm(start):
        return "astm"
    if csv_export.looks_like_csv(data):
        return "csv"
    return ""


def _is_utf16_markup(data: bytes) -> bool:
    # XML in UTF-16 begins with its byte order mark (XML 1.0, 4.3.3): its '<' is two bytes.
    for mark, codec in ((b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be")):
        if data.startswith(mark):
            return data[2:258].decode(codec, "ignore").lstrip().startswith("<")
    return False


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
    if format in DOCUMENT_FORMATS:
        raise InputError(f"{format} input is a document, not a message: read it with read_document",
                         format=format)
    if format:
        raise InputError(f"unknown input format {format!r}; known: {', '.join(FORMATS)}")
    raise InputError("unrecognised input: not HL7 v2 (MSH), v2 XML, ASTM or a known CSV export")


def read_document(data: bytes, format: str):
    """A document input ('fhir': the Bundle as a dict, checked; 'soap-report': the
    SubmitReport element), or InputError naming the element at fault."""
    if format == "fhir":
        from gateway.translation.fhir_input import BundleError, bundle_issues, read_bundle

        try:
            document = read_bundle(data)
        except BundleError as error:
            raise InputError(error.issues[0].diagnostics, error.issues[0].expression or "", "fhir") from None
        issues = bundle_issues(document)
        if issues:
            first = issues[0]
            more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
            raise InputError(first.diagnostics + more, first.expression or "Bundle", "fhir")
        return document
    if format == "soap-report":
        from gateway.translation.report_input import ReportError, pdf_bytes, read_report

        try:
            report = read_report(data)
            pdf_bytes(report)  # a PDF that is not one fails here, not half-way
        except ReportError as error:
            raise InputError(error.reason, error.location, "soap-report") from None
        return report
    raise InputError(f"{format!r} is not a document format ({', '.join(DOCUMENT_FORMATS)})")


def read_er7(data: bytes, fallback_codec: str | None = None) -> ParsedInput:
    """An ER7 message, read as leniently as the mapping allows: ingest has already applied its
    own header rules (control id, processing id, version) to what it accepted, and what the
    mapping does not read is not refused here. What it needs: delimiters (MSH-1, MSH-2), a
    character set it can decode (MSH-18), segments, and a message type (MSH-9). A file that
    is an MLLP capture (VT, the message, FS CR), as detect_format takes it, is read unframed."""
    data = _unframed(data)
    charset = _declared_charset(data)
    if fallback_codec is None and charset.strip().upper() in ("ASCII", "ISO IR6"):
        # ASCII is a subset of UTF-8: bytes beyond it that are valid UTF-8 are read as UTF-8
        # (as with MSH-18 empty) rather than refused; other bytes still are.
        fallback_codec = "utf-8"
    try:
        decoded = decode(data, charset, fallback_codec)
    except CharsetError as error:
        raise InputError(error.reason, "MSH^1^18", "hl7v2") from None
    try:
        message = parse_message(decoded.text, decoded.codec)
    except MessageParseError as error:
        raise InputError(error.reason, error.location, "hl7v2") from None
    message_type = er7_message_type(message)
    if not message_type:
        raise InputError("MSH-9 message type is empty", "MSH^1^9", "hl7v2")
    return ParsedInput(message, message_type, "hl7v2", message.value("MSH", 10) or stand_in_control_id(data),
                       message.value("MSH", 3), message.value("MSH", 4))


def _unframed(data: bytes) -> bytes:
    """`data` without MLLP's start block before it and end block (and CR) after it."""
    start = data.lstrip(b"\r\n\t ")
    if not start.startswith(b"\x0b"):
        return data
    body = start[1:].rstrip(b"\r\n\t ")
    return body[:-1] if body.endswith(b"\x1c") else body


def stand_in_control_id(data: bytes) -> str:
    """For a message without MSH-10 (ingest refuses those; a file given to `gateway translate`
    may have none): a digest of its bytes, so that its Provenance names it and the ids of its
    resources without identifiers (seeded by the control id) differ from another message's."""
    return "sha1-" + hashlib.sha1(data).hexdigest()[:20]


def _declared_charset(data: bytes) -> str:
    """MSH-18 (first repetition) read from the raw bytes, before decoding; '' when absent or
    when the MSH cannot be read (parse_message then says what is wrong with it)."""
    start = data.find(b"MSH")
    if start < 0 or len(data) < start + 8:
        return ""
    end = min((at for at in (data.find(b"\r", start), data.find(b"\n", start)) if at >= 0),
              default=len(data))
    line = data[start:end]
    if len(line) < 4:  # 'MSH' alone on its line: no separator to split on
        return ""
    fields = line.split(line[3:4])
    if len(fields) < 18:
        return ""
    repetition = fields[1][1:2] or b"~"
    charset = fields[17].split(repetition, 1)[0].strip()
    return charset.decode("ascii", "replace")


def er7_message_type(message: Hl7Message) -> str:
    """MSH-9 as the key of a message map, CODE^TRIGGER; when the trigger is missing, from the
    message structure (MSH-9.3 'ORU_R01'), which names the same map."""
    code = message.value("MSH", 9, 1).strip()
    trigger = message.value("MSH", 9, 2).strip()
    if code and not trigger:
        structure = message.value("MSH", 9, 3).strip()
        head, _, tail = structure.partition("_")
        if head == code and tail:
            trigger = tail
    return f"{code}^{trigger}" if code and trigger else code


def read_v2xml(data: bytes) -> ParsedInput:
    """HL7 v2 XML: the encoding comes from the XML declaration (UTF-8 by default)."""
    try:
        message = parse_v2xml(data)
    except MessageParseError as error:
        raise InputError(error.reason, error.location, "hl7v2-xml") from None
    return ParsedInput(message, message.message_type, "hl7v2-xml", message.value("MSH", 10) or stand_in_control_id(data),
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

"""Reading any supported input into the tokenized form the mapping engine reads.

`read_input(data)` recognises the format from the bytes (ER7 HL7 v2 today; v2 XML, ASTM and
CSV are added by their adapters), decodes them with the declared character set (or the
sender's fallback) and tokenizes them. Errors are InputError with a precise reason and, where
known, a location.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.hl7v2.charsets import CharsetError, decode
from adapters.hl7v2.header import HeaderError, parse_header
from adapters.hl7v2.message import Hl7Message, MessageParseError, parse_message

FORMATS = ("hl7v2",)


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
    return ""


def read_input(data: bytes, fallback_codec: str | None = None, format: str | None = None) -> ParsedInput:
    """Decode and tokenize one message of any supported format."""
    format = format or detect_format(data)
    if format == "hl7v2":
        return read_er7(data, fallback_codec)
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

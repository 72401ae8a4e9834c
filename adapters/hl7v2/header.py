"""The message header (MSH), read from raw bytes without parsing the rest of the message.

This is all the gateway reads before it stores and acknowledges a message: delimiters from
MSH-1/MSH-2, the sender (MSH-3/4), type (MSH-9), control id (MSH-10), processing id (MSH-11),
version (MSH-12), acknowledgement conditions (MSH-15/16) and character set (MSH-18).

Field values stay bytes (as sent, undecoded) so that an ACK can echo them exactly; the
structure bytes (MSH, separators) are ASCII in every character set that MLLP can carry.
Numbering follows the standard: `field(n)` is MSH-n.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.hl7v2.codes import ErrorCondition, Outcome

UTF8_BOM = b"\xef\xbb\xbf"
_LEADING_NOISE = b"\r\n\t "
# Field and encoding characters must be printable, non-alphanumeric ASCII.
_SEPARATOR_BYTES = frozenset(b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


@dataclass(frozen=True, slots=True)
class Location:
    """An ERR-2 / ERR-1 location: segment id, its sequence, field, component (1-based, 0 = none)."""

    segment: str = "MSH"
    sequence: int = 1
    field: int = 0
    component: int = 0

    def components(self) -> list[str]:
        """The ERL components (ERR-2): segment, sequence, then field, repetition 1, component
        as far as known; joined with '^' this is also how the store records a location."""
        parts = [self.segment, str(self.sequence)]
        if self.field:
            parts.append(str(self.field))
            if self.component:
                parts += ["1", str(self.component)]
        return parts


@dataclass(frozen=True, slots=True)
class Delimiters:
    field: bytes = b"|"
    component: bytes = b"^"
    repetition: bytes = b"~"
    escape: bytes = b"\\"
    subcomponent: bytes = b"&"
    encoding_characters: bytes = b"^~\\&"  # MSH-2 exactly as sent


DEFAULT_DELIMITERS = Delimiters()


class HeaderError(ValueError):
    """The MSH cannot be accepted. Carries what could be read, to answer from it."""

    def __init__(self, condition: ErrorCondition, location: Location, reason: str,
                 outcome: Outcome = Outcome.REJECT, header: "MessageHeader | None" = None,
                 delimiters: Delimiters = DEFAULT_DELIMITERS, fields: list[bytes] | None = None):
        super().__init__(reason)
        self.condition = condition
        self.location = location
        self.reason = reason
        self.outcome = outcome
        self.header = header
        self.delimiters = delimiters
        self.fields = fields or []  # the raw MSH fields read so far (index = MSH number - 1)

    def field(self, number: int) -> bytes:
        return self.fields[number - 1] if 1 < number <= len(self.fields) else b""


@dataclass(slots=True)
class MessageHeader:
    delimiters: Delimiters
    fields: list[bytes]  # raw: fields[n - 1] is MSH-n for n >= 2 (at least 18); fields[0] is b"MSH"
    start: int  # offset of "MSH" in the raw bytes (after a BOM or stray line breaks)
    message_code: bytes  # MSH-9.1
    trigger_event: bytes  # MSH-9.2
    message_structure: bytes  # MSH-9.3
    control_id: bytes  # MSH-10
    processing_id: bytes  # MSH-11.1
    version: bytes  # MSH-12.1
    charset: str  # MSH-18, first repetition, as declared ('' when absent)

    def field(self, number: int) -> bytes:
        """MSH-n as sent (b'' when absent); MSH-1 is the field separator."""
        if number == 1:
            return self.delimiters.field
        return self.fields[number - 1] if number <= len(self.fields) else b""

    @property
    def sending_application(self) -> bytes:
        return self.field(3)

    @property
    def sending_facility(self) -> bytes:
        return self.field(4)

    @property
    def message_type(self) -> str:
        """MSH-9 as 'ORU^R01' (code and trigger), decoded for display and routing."""
        if self.trigger_event:
            return (self.message_code + b"^" + self.trigger_event).decode("ascii", "replace")
        return self.message_code.decode("ascii", "replace")

    @property
    def enhanced_mode(self) -> bool:
        return enhanced_mode(self)

    @property
    def is_acknowledgement(self) -> bool:
        return self.message_code == b"ACK" or self.field(9).startswith(b"ACK")


def enhanced_mode(header) -> bool:
    """Enhanced acknowledgement mode: MSH-15 or MSH-16 valued (else original mode). Works on
    anything with `field(n)`: a MessageHeader, a HeaderError's partial read, a FieldView."""
    return bool(header.field(15) or header.field(16))


_SEGMENT_ID_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def segment_id(name: bytes) -> str:
    """A segment id read from the bytes received (its first 3), as an ERR-2 location and a
    reason may show it: any byte but an ASCII letter or digit (NUL, a separator, a line end,
    a byte above 0x7F) is '?', since the id goes into the ACK, which is ASCII, and the
    store, where PostgreSQL refuses NUL."""
    return "".join(chr(byte) if byte in _SEGMENT_ID_BYTES else "?" for byte in name[:3])


def segment_end(raw: bytes, start: int = 0) -> int:
    """Index of the CR or LF that ends the segment starting at `start` (len(raw) if none)."""
    cr = raw.find(b"\r", start)
    lf = raw.find(b"\n", start)
    if cr < 0:
        return lf if lf >= 0 else len(raw)
    return cr if lf < 0 or cr < lf else lf


def message_start(raw: bytes) -> int:
    """Offset of the first segment: after a UTF-8 BOM and any stray line breaks or blanks."""
    start = 3 if raw.startswith(UTF8_BOM) else 0
    while start < len(raw) and raw[start] in _LEADING_NOISE:
        start += 1
    return start


def read_delimiters(segment: bytes, where: str = "MSH") -> Delimiters:
    """Delimiters from MSH-1/MSH-2 (or BHS-1/2, FHS-1/2) at the start of `segment`."""
    if len(segment) < 4:
        raise HeaderError(ErrorCondition.REQUIRED_FIELD_MISSING, Location(where, 1, 1),
                          f"{where} segment is truncated: no field separator")
    separator = segment[3]
    if separator not in _SEPARATOR_BYTES:
        raise HeaderError(ErrorCondition.DATA_TYPE_ERROR, Location(where, 1, 1),
                          f"{where}-1 field separator 0x{separator:02x} is not a punctuation character")
    field_separator = segment[3:4]
    stop = segment.find(field_separator, 4)
    encoding = segment[4:stop if stop >= 0 else len(segment)]
    problem = None
    if not 4 <= len(encoding) <= 5:
        problem = f"has {len(encoding)} characters, 4 (or 5 from v2.7) expected"
    elif any(byte not in _SEPARATOR_BYTES for byte in encoding):
        problem = "contains a character that is not punctuation"
    elif len(set(encoding)) != len(encoding) or segment[3] in encoding:
        problem = "repeats a separator"
    if problem:
        # The answer keeps the sender's field separator with the standard encoding characters,
        # unless it is one of them ('MSH^...', 'MSH&...'): that ACK would not parse.
        delimiters = (DEFAULT_DELIMITERS if field_separator in DEFAULT_DELIMITERS.encoding_characters
                      else Delimiters(field=field_separator))
        raise HeaderError(ErrorCondition.DATA_TYPE_ERROR, Location(where, 1, 2),
                          f"{where}-2 encoding characters {problem}", delimiters=delimiters)
    return Delimiters(field_separator, encoding[0:1], encoding[1:2], encoding[2:3], encoding[3:4], encoding)


_delimiters_seen: dict[bytes, Delimiters] = {}  # MSH-1 + MSH-2 as sent -> checked delimiters


def parse_header(raw: bytes) -> MessageHeader:
    """Read the MSH of one message. Raises HeaderError with the ERR location and reason."""
    start = 0 if raw[:3] == b"MSH" else message_start(raw)
    if raw[start:start + 3] != b"MSH":
        if start >= len(raw):
            reason = "empty message"
        else:
            reason = "message does not start with an MSH segment"
        raise HeaderError(ErrorCondition.SEGMENT_SEQUENCE_ERROR, Location("MSH", 1), reason)
    end = raw.find(b"\r", start)
    if end < 0:
        end = len(raw)
    line_feed = raw.find(b"\n", start, end)
    segment = raw[start:line_feed if line_feed >= 0 else end]
    # This hot path reads the delimiters once per distinct MSH-1/MSH-2, not once per message.
    stop = segment.find(segment[3:4], 4)
    key = segment[3:stop if stop > 0 else len(segment)]
    delimiters = _delimiters_seen.get(key)
    if delimiters is None:
        delimiters = read_delimiters(segment)
        if len(_delimiters_seen) < 64:
            _delimiters_seen[key] = delimiters
    fields = segment.split(delimiters.field)
    fields[0] = b"MSH"

    def missing(number: int, name: str) -> HeaderError:
        return HeaderError(ErrorCondition.REQUIRED_FIELD_MISSING, Location("MSH", 1, number),
                           f"MSH-{number} {name} is empty", delimiters=delimiters, fields=fields)

    count = len(fields)
    if count < 18:
        fields += [b""] * (18 - count)  # absent trailing fields read as empty
    component = delimiters.component
    message_type = fields[8].split(component)
    code = message_type[0]
    if not code:
        raise missing(9, "message type")
    control_id = fields[9]
    if not control_id:
        raise missing(10, "message control id")
    processing_id = fields[10].split(component, 1)[0]
    if not processing_id:
        raise missing(11, "processing id")
    version = fields[11].split(component, 1)[0]
    if not version:
        raise missing(12, "version id")
    charset = fields[17]
    if delimiters.repetition in charset:
        charset = charset.split(delimiters.repetition, 1)[0]
    types = len(message_type)
    return MessageHeader(delimiters, fields, start, code,
                         message_type[1] if types > 1 else b"",
                         message_type[2] if types > 2 else b"",
                         control_id, processing_id, version,
                         charset.decode("ascii", "replace") if charset else "")

"""Ingest, first stage: one MLLP frame in, the records to store and their answers out.

Pure code (no reactor, no database). It reads only what acknowledging needs: the MSH, the
character set (the whole message must decode), the batch envelope, and whether the sender may
send it (gateway.facilities: over TLS, the certificate's facility must be MSH-4 and its type
must allow MSH-9; on plain MLLP, MSH-3/MSH-4 find the sender in the registry); translation
comes after the commit. Every frame yields at least one `Inbound` to store, whatever its state: a frame
of binary garbage is kept, with the reason, like a good message. The one exception is a valid
empty batch (the periodic "nothing to send"): it holds no message, and is answered, not stored.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Iterable

from adapters.hl7v2 import reference
from adapters.hl7v2.ack import AckBuilder, ErrorDetail
from adapters.hl7v2.batch import Batch, BatchError, is_batch, split_batch
from adapters.hl7v2.charsets import CharsetError, codec_for, decode, decode_declared
from adapters.hl7v2.codes import AckCondition, AppErrorCode, ErrorCondition, Outcome
from adapters.hl7v2.header import (DEFAULT_DELIMITERS, Delimiters, HeaderError, Location,
                                   MessageHeader, enhanced_mode, message_start, parse_header,
                                   read_delimiters, segment_end, segment_id)
from gateway.config import SenderConfig
from gateway.facilities import (FacilityRegistry, RegistryRef, Refusal, authorize_certified,
                                authorize_sender)
from gateway.ingest.model import Inbound, MessageStatus

log = logging.getLogger(__name__)


_VERSIONS = frozenset(v.encode("ascii") for v in reference.SUPPORTED_VERSIONS)
_ACK_WANTED = {condition.value.encode("ascii"): {True: condition.wants(True), False: condition.wants(False)}
               for condition in AckCondition}
_ALWAYS = {True: True, False: True}


def SenderDirectory(senders: Iterable[SenderConfig] = ()) -> FacilityRegistry:
    """Former name of the registry's MSH-3/MSH-4 look-up, kept for callers not yet moved to
    `gateway.facilities.FacilityRegistry` (tests/test_corpus.py)."""
    return FacilityRegistry(senders)


# Bytes no HL7 message text holds, each refused with the place of its first occurrence: a NUL
# (no database text column keeps one), and MLLP's end block, which the framer leaves inside a
# frame when content follows it (raw binary data).
_NOT_TEXT = ((b"\x00", "NUL byte (0x00)"), (b"\x1c", "MLLP end block byte (0x1C)"))


@dataclass(frozen=True)
class IngestPolicy:
    """What one listener accepts. `registry`: the facility registry shared by every door (a
    `RegistryRef`, whose registry a reload replaces; a bare FacilityRegistry is wrapped)."""

    listener: str
    processing_ids: frozenset[bytes] = frozenset({b"P", b"T", b"D"})
    accept_unknown_senders: bool = True
    registry: RegistryRef = field(default_factory=RegistryRef)

    def __post_init__(self):
        if isinstance(self.registry, FacilityRegistry):
            object.__setattr__(self, "registry", RegistryRef(self.registry))


@dataclass
class FrameResult:
    """The records of one frame, and how to answer once they are stored."""

    items: list[Inbound]
    batch: Batch | None = None

    def response(self, builder: AckBuilder) -> bytes | None:
        """The bytes to send back (without MLLP framing); None when no answer is due."""
        if self.batch is None:
            return self.items[0].ack
        return _batch_response(self.batch, [item.ack for item in self.items], builder)


class Inspector:
    def __init__(self, builder: AckBuilder, policy: IngestPolicy):
        self.builder = builder
        self.policy = policy
        self._types = frozenset(t.encode("ascii") for t in reference.message_types())
        self._events = frozenset(e.encode("ascii") for e in reference.trigger_events())

    def frame(self, payload: bytes, connection=None) -> FrameResult:
        """Inspect one frame's payload: a message or a batch of them. `connection` (an
        adapters.mllp.protocol.ConnectionInfo) says who sent it, where a door knows."""
        start = message_start(payload)
        if payload[start:start + 3] == b"MSH":
            if _second_msh(payload, start):
                return FrameResult([self._refused_frame(payload, ErrorDetail(
                    ErrorCondition.SEGMENT_SEQUENCE_ERROR, Location("MSH", 2),
                    "frame holds several messages without a BHS/BTS batch envelope"))])
            return FrameResult([self.message(payload, connection)])
        if is_batch(payload):
            try:
                batch = split_batch(payload)
            except (BatchError, HeaderError) as error:
                detail = ErrorDetail(error.condition, error.location, error.reason,
                                     getattr(error, "app_code", None))
                return FrameResult([self._refused_frame(payload, detail)])
            return FrameResult([self.message(raw, connection) for raw in batch.messages], batch)
        return FrameResult([self.message(payload, connection)])

    def message(self, raw: bytes, connection=None) -> Inbound:
        """Inspect one message: accepted, refused with its reason, or an ACK to keep quietly.
        `connection` (ConnectionInfo) says who sent it; None: no door (every sender is plain,
        without a source address)."""
        digest = hashlib.sha256(raw).digest()
        for byte, reason in _NOT_TEXT:
            if byte in raw:
                return self._refused_byte(raw, digest, byte, reason)
        try:
            header = parse_header(raw)
        except HeaderError as error:
            return self._refused(raw, digest, error, error.outcome,
                                 ErrorDetail(error.condition, error.location, error.reason,
                                             None if error.fields else AppErrorCode.NOT_HL7))
        try:
            codec = codec_for(header.charset)
        except CharsetError as error:
            return self._refused(raw, digest, header, Outcome.REJECT, ErrorDetail(
                ErrorCondition.TABLE_VALUE_NOT_FOUND, Location("MSH", 1, 18), error.reason))
        fields = header.fields
        application = fields[2].decode(codec, "replace")
        facility = fields[3].decode(codec, "replace")
        registry = self.policy.registry.current
        certified = connection is not None and connection.tls
        if certified:  # the facility its certificate names, as the registry now has it
            sender = registry.get(connection.facility_id)
        else:
            sender = registry.by_header(_first(application, header), _first(facility, header))
        try:
            decode_declared(raw, codec)  # the whole message must be text in its declared set
        except UnicodeDecodeError:
            try:
                codec = decode(raw, header.charset, sender.charset_fallback if sender else None).codec
                application = facility = None  # decode them again with the codec that worked
            except CharsetError as error:
                return self._refused(raw, digest, header, Outcome.ERROR, ErrorDetail(
                    ErrorCondition.DATA_TYPE_ERROR, locate(raw, error.offset or 0, header.delimiters),
                    error.reason, AppErrorCode.CHARSET_INVALID), codec, sender)
        item = self._record(raw, digest, header, codec, sender, application, facility)
        if header.is_acknowledgement:
            item.status = MessageStatus.IGNORED  # never acknowledge an acknowledgement
            return item
        problem = self._check(header) or _too_long(item)
        if problem is not None:
            return self._refused(raw, digest, header, Outcome.REJECT, problem, codec, sender)
        if certified:
            refusal = authorize_certified(registry, sender, _first(item.sending_facility, header),
                                          item.message_type, connection.facility_id)
        elif sender is None and self.policy.accept_unknown_senders:
            refusal = None  # development: anyone, anything
        else:
            refusal = authorize_sender(registry, sender, _first(item.sending_facility, header),
                                       item.message_type, _address(connection),
                                       self.policy.accept_unknown_senders)
        if refusal is not None:
            return self._unauthorized(raw, digest, header, codec, sender, refusal, connection)
        if self._wants_ack(header, True):
            item.ack = self.builder.build(header, Outcome.ACCEPT, header.enhanced_mode)
        return item

    def _refused_byte(self, raw: bytes, digest: bytes, byte: bytes, reason: str) -> Inbound:
        """A message holding a byte no HL7 text holds (`_NOT_TEXT`: binary data travels as
        base64 ED or \\Xhh\\ escapes). Refused with the place of the first one (an
        acknowledgement is kept, unanswered); what is stored and answered of it is read from a
        copy with each such byte as '?' (no database text column can keep a NUL), and the
        bytes are kept as they came."""
        offset = raw.index(byte)
        readable = raw.replace(byte, b"?")
        try:
            header = parse_header(readable)
        except HeaderError as error:
            item = self._refused(readable, digest, error, Outcome.REJECT, ErrorDetail(
                error.condition, error.location, error.reason,
                None if error.fields else AppErrorCode.NOT_HL7))
        else:
            try:
                codec = codec_for(header.charset)
            except CharsetError:
                codec = None
            if header.is_acknowledgement:  # kept, never answered, as any acknowledgement
                item = self._record(readable, digest, header, codec, None)
                item.status = MessageStatus.IGNORED
                item.raw = raw
                return item
            item = self._refused(readable, digest, header, Outcome.ERROR, ErrorDetail(
                ErrorCondition.DATA_TYPE_ERROR, locate(readable, offset, header.delimiters),
                f"{reason} at byte {offset}: not text (binary data goes as base64 ED "
                "or \\Xhh\\ escapes)", AppErrorCode.CHARSET_INVALID), codec)
        item.raw = raw
        return item

    def oversize(self, prefix: bytes, size: int, limit: int) -> FrameResult:
        """A frame past the size limit: keep its start, refuse it from what its MSH says."""
        detail = ErrorDetail(ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1),
                             f"frame of more than {size} bytes exceeds the limit of {limit} bytes",
                             AppErrorCode.FRAME_TOO_LARGE)
        item = self._refused_frame(prefix, detail)
        item.truncated = True
        item.size = size
        return FrameResult([item])

    def _check(self, header: MessageHeader) -> ErrorDetail | None:
        """What the message is: a type, event, version and processing id we take."""
        code, event = header.message_code, header.trigger_event
        if code in self._types and (not event or event in self._events) \
                and header.version in _VERSIONS and header.processing_id in self.policy.processing_ids:
            return None  # the usual case, in one test
        code_text, event_text = code.decode("ascii", "replace"), event.decode("ascii", "replace")
        if code not in self._types and not code.startswith(b"Z"):
            return ErrorDetail(ErrorCondition.UNSUPPORTED_MESSAGE_TYPE, Location("MSH", 1, 9, 1),
                               f"message type {code_text!r} is not in HL7 table 0076")
        if event and event not in self._events and not event.startswith(b"Z"):
            return ErrorDetail(ErrorCondition.UNSUPPORTED_EVENT_CODE, Location("MSH", 1, 9, 2),
                               f"trigger event {event_text!r} is not in HL7 table 0003")
        version = header.version.decode("ascii", "replace")
        if header.version not in _VERSIONS:
            return ErrorDetail(ErrorCondition.UNSUPPORTED_VERSION_ID, Location("MSH", 1, 12),
                               f"version {version!r} is not supported (2.1 to 2.9)")
        if header.processing_id not in self.policy.processing_ids:
            allowed = ", ".join(sorted(p.decode() for p in self.policy.processing_ids))
            return ErrorDetail(ErrorCondition.UNSUPPORTED_PROCESSING_ID, Location("MSH", 1, 11),
                               f"processing id {header.processing_id.decode('ascii', 'replace')!r} "
                               f"is not accepted here ({allowed})")
        return None

    def _unauthorized(self, raw: bytes, digest: bytes, header: MessageHeader, codec: str | None,
                      sender: SenderConfig | None, refusal: Refusal, connection) -> Inbound:
        """A sender refused at the door: AR/CR with ERR 207 and our code, stored and logged
        (facility, type, control id and reason: no patient data)."""
        item = self._refused(raw, digest, header, Outcome.REJECT, ErrorDetail(
            ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1, refusal.field),
            refusal.reason, refusal.code), codec, sender)
        log.info("%s %s: refused %s %s from MSH-4 %r (facility %s): %s: %s",
                 connection.listener if connection else "-", connection.peer if connection else "-",
                 item.message_type, item.control_id, item.sending_facility,
                 sender.id if sender else "unknown", refusal.code.value, refusal.reason)
        return item

    @staticmethod
    def _wants_ack(header: MessageHeader, positive: bool) -> bool:
        if not header.enhanced_mode:
            return True
        # Empty or unknown MSH-15 in enhanced mode: always.
        return _ACK_WANTED.get(header.field(15), _ALWAYS)[positive]

    @staticmethod
    def _record(raw: bytes, digest: bytes, header: MessageHeader, codec: str | None,
                sender: SenderConfig | None, application: str | None = None,
                facility: str | None = None) -> Inbound:
        """The record of a message whose MSH was read, as accepted (callers may refuse it)."""
        text = codec or "iso8859-1"
        fields = header.fields
        return Inbound(raw, digest, Outcome.ACCEPT, MessageStatus.RECEIVED, None, None,
                       fields[2].decode(text, "replace") if application is None else application,
                       fields[3].decode(text, "replace") if facility is None else facility,
                       fields[4].decode(text, "replace"), fields[5].decode(text, "replace"),
                       fields[9].decode(text, "replace"), header.message_type,
                       header.version.decode("ascii", "replace"),
                       header.processing_id.decode("ascii", "replace"), header.charset, codec,
                       False, len(raw), sender.id if sender else None, header)

    def _refused(self, raw: bytes, digest: bytes, source, outcome: Outcome, detail: ErrorDetail,
                 codec: str | None = None, sender: SenderConfig | None = None) -> Inbound:
        """A refusal, answered from a parsed header or from what a HeaderError could read."""
        if isinstance(source, MessageHeader):
            item = self._record(raw, digest, source, codec, sender)
            enhanced = source.enhanced_mode
            wanted = self._wants_ack(source, False)
        else:
            item = Inbound(raw=raw, sha256=digest, outcome=outcome, status=MessageStatus.REJECTED,
                           ack=None, size=len(raw))
            if source.fields:
                item.sending_application = source.field(3).decode("iso8859-1")
                item.sending_facility = source.field(4).decode("iso8859-1")
                item.control_id = source.field(10).decode("iso8859-1") or None
            enhanced = enhanced_mode(source)
            wanted = True
        item.outcome = outcome
        item.status = MessageStatus.REJECTED
        item.error = detail
        if wanted:
            item.ack = self.builder.build(source, outcome, enhanced, detail)
        return item

    def _refused_frame(self, payload: bytes, detail: ErrorDetail) -> Inbound:
        """Refuse a whole frame, answering from its first header (MSH, BHS or FHS) if readable."""
        view = FieldView.of(payload.replace(b"\x00", b"?"))  # no NUL in what is stored as text
        item = Inbound(raw=payload, sha256=hashlib.sha256(payload).digest(), outcome=Outcome.REJECT,
                       status=MessageStatus.REJECTED, ack=None, error=detail, size=len(payload))
        item.sending_application = view.field(3).decode("iso8859-1") or None
        item.sending_facility = view.field(4).decode("iso8859-1") or None
        item.control_id = view.field(10).decode("iso8859-1") or None
        item.ack = self.builder.build(view, Outcome.REJECT, enhanced_mode(view), detail)
        return item


# The longest MSH texts an accepted message may carry: what the store keeps of them
# (gateway.store.schema.messages; a test holds the two equal): MSH-3 to MSH-6 as HD (227
# characters), MSH-10 as of v2.7 (199), the type as CODE^EVENT.
MSH_TEXT_LIMITS = (("sending_application", 3, 227), ("sending_facility", 4, 227),
                   ("receiving_application", 5, 227), ("receiving_facility", 6, 227),
                   ("message_type", 9, 32), ("control_id", 10, 199))


def _too_long(item: Inbound) -> ErrorDetail | None:
    """A header text longer than the store keeps (its key must be kept whole, or two messages
    would share one): 104, value too long."""
    for name, field_number, limit in MSH_TEXT_LIMITS:
        value = getattr(item, name)
        if value is not None and len(value) > limit:
            return ErrorDetail(ErrorCondition.VALUE_TOO_LONG, Location("MSH", 1, field_number),
                               f"MSH-{field_number} is {len(value)} characters long; "
                               f"at most {limit} are accepted")
    return None


def _first(name: str, header: MessageHeader) -> str:
    """The first component of MSH-3 or MSH-4 (an HD: NAME^OID^ISO), split on the message's own
    component separator: the registry knows facilities by that first component."""
    component = header.delimiters.component
    if component == b"^":
        return name  # the registry splits on '^' itself
    return name.split(component.decode("ascii"), 1)[0]


def _address(connection) -> str | None:
    """The peer's IP address ('10.1.2.3:50123' -> '10.1.2.3'), None without a connection."""
    if connection is None:
        return None
    return connection.peer.rpartition(":")[0] or None


def _second_msh(payload: bytes, start: int) -> bool:
    """Whether another MSH segment follows the first (one scan; MSH inside text is skipped)."""
    found = payload.find(b"MSH", start + 3)
    while found >= 0:
        if payload[found - 1] in b"\r\n":
            return True
        found = payload.find(b"MSH", found + 3)
    return False


def refuse_reused(builder: AckBuilder, item: Inbound) -> None:
    """Turn an accepted message into the refusal of a reused control id (the store's finding)."""
    detail = ErrorDetail(ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1, 10),
                         "control id already used by this sender for a different message",
                         AppErrorCode.CONTROL_ID_REUSED)
    item.outcome = Outcome.REJECT
    item.status = MessageStatus.REJECTED
    item.error = detail
    header = item.header  # None for a document (a FHIR Bundle under its Idempotency-Key): no ACK
    item.ack = (builder.build(header, Outcome.REJECT, header.enhanced_mode, detail)
                if header is not None and Inspector._wants_ack(header, False) else None)


class FieldView:
    """MSH-like fields read leniently from the first segment of a frame (MSH, BHS or FHS).

    For BHS/FHS, the batch control id (BHS-11 / FHS-11) stands in for MSH-10, so a refusal
    names the batch the sender will look for.
    """

    def __init__(self, delimiters: Delimiters, fields: list[bytes], control_field: int = 10):
        self.delimiters = delimiters
        self._fields = fields
        self._control_field = control_field

    @classmethod
    def of(cls, payload: bytes) -> "FieldView":
        start = message_start(payload)
        kind = payload[start:start + 3]
        segment = payload[start:segment_end(payload, start)]
        if kind not in (b"MSH", b"BHS", b"FHS"):
            return cls(DEFAULT_DELIMITERS, [])
        try:
            delimiters = read_delimiters(segment, kind.decode())
        except HeaderError:
            return cls(DEFAULT_DELIMITERS, [])
        fields = segment.split(delimiters.field)
        return cls(delimiters, fields, 10 if kind == b"MSH" else 11)

    def field(self, number: int) -> bytes:
        if number == 10:
            number = self._control_field
        elif number in (9, 12, 15, 16) and self._control_field != 10:
            return b""  # batch headers have no type, version or acknowledgement fields
        return self._fields[number - 1] if 1 < number <= len(self._fields) else b""


def locate(raw: bytes, offset: int, delimiters: Delimiters) -> Location:
    """The segment and field holding byte `offset`, for an ERR-2 location."""
    segment_start = max(raw.rfind(b"\r", 0, offset), raw.rfind(b"\n", 0, offset)) + 1
    name = raw[segment_start:segment_end(raw, segment_start)][:3]
    sequence = 1
    for line in raw[:segment_start].replace(b"\n", b"\r").split(b"\r"):
        if line[:3] == name:
            sequence += 1
    field_number = raw.count(delimiters.field, segment_start, offset)
    if name == b"MSH":
        field_number += 1  # MSH-1 is the separator itself
    return Location(segment_id(name), sequence, field_number)


def _batch_response(batch: Batch, acks: list[bytes | None], builder: AckBuilder) -> bytes | None:
    """The batch of ACKs answering a batch: FHS/BHS echoing the sender's ids, then the ACKs."""
    d = batch.delimiters
    fs = d.field
    application, facility, timestamp = builder.own_fields(d)
    out: list[bytes] = []
    if batch.file_header is not None:
        fhs = batch.file_header
        out.append(fs.join([b"FHS", d.encoding_characters, application, facility, _get(fhs, 3),
                            _get(fhs, 4), timestamp, b"", b"", b"", builder.control_ids.next(),
                            _get(fhs, 11)]))
    position = 0
    for part in batch.batches:
        bhs = part.header
        out.append(fs.join([b"BHS", d.encoding_characters, application, facility, _get(bhs, 3),
                            _get(bhs, 4), timestamp, b"", b"", b"", builder.control_ids.next(),
                            _get(bhs, 11)]))
        answered = [ack for ack in acks[position:position + len(part.messages)] if ack]
        position += len(part.messages)
        out.extend(ack.rstrip(b"\r") for ack in answered)
        out.append(fs.join([b"BTS", str(len(answered)).encode("ascii")]))
    if batch.file_header is not None:
        out.append(fs.join([b"FTS", str(len(batch.batches)).encode("ascii")]))
    return b"\r".join(out) + b"\r"


def _get(fields: list[bytes], number: int) -> bytes:
    return fields[number - 1] if number <= len(fields) else b""



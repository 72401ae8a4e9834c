"""HL7 batches (FHS/BHS ... MSH ... BTS/FTS) in one frame, split into messages.

A batch is all or nothing: a segment out of place or a trailer count (BTS-1, FTS-1) that
does not match the content rejects the whole frame, and nothing of it is accepted. As in the
HL7 grammar `[FHS] {[BHS] {MSH ...} [BTS]} [FTS]`, the trailers are optional (a count is
checked when there is one) and a file may hold its messages without a BHS. A batch with no
messages is valid (the periodic "nothing to send" batch) unless its trailer says otherwise.
The messages are returned as slices of the original bytes, segment terminators included.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from adapters.hl7v2.codes import AppErrorCode, ErrorCondition
from adapters.hl7v2.header import Delimiters, Location, message_start, read_delimiters, segment_id

_SEGMENT = re.compile(rb"[^\r\n]+")


class BatchError(ValueError):
    def __init__(self, reason: str, location: Location, app_code: AppErrorCode | None = None,
                 condition: ErrorCondition = ErrorCondition.SEGMENT_SEQUENCE_ERROR):
        super().__init__(reason)
        self.reason = reason
        self.location = location
        self.app_code = app_code
        self.condition = condition


@dataclass
class BatchPart:
    header: list[bytes]  # BHS fields (index = BHS number - 1)
    messages: list[bytes] = field(default_factory=list)
    trailer: list[bytes] | None = None  # BTS fields


@dataclass
class Batch:
    delimiters: Delimiters
    file_header: list[bytes] | None  # FHS fields, when the frame is a file
    batches: list[BatchPart]
    file_trailer: list[bytes] | None = None

    @property
    def messages(self) -> list[bytes]:
        return [message for part in self.batches for message in part.messages]


def is_batch(raw: bytes) -> bool:
    start = message_start(raw)
    return raw[start:start + 3] in (b"FHS", b"BHS")


def split_batch(raw: bytes) -> Batch:
    """Split a batch frame into its messages, checking structure and trailer counts."""
    start = message_start(raw)
    segments = [(m.start(), m.end(), m.group()) for m in _SEGMENT.finditer(raw, start)]
    delimiters = read_delimiters(segments[0][2], segments[0][2][:3].decode("ascii"))
    fs = delimiters.field
    batch = Batch(delimiters, None, [])
    part: BatchPart | None = None
    message_from: int | None = None
    counts = {"FHS": 0, "BHS": 0, "MSH": 0}

    def close_message(at: int) -> None:
        nonlocal message_from
        if message_from is not None:
            part.messages.append(raw[message_from:at])
            message_from = None

    for index, (begin, _end, segment) in enumerate(segments):
        kind = segment_id(segment)
        if kind in counts:
            counts[kind] += 1
        where = Location(kind, counts.get(kind, 1))
        if batch.file_trailer is not None:  # else a message after it would pass uncounted
            raise BatchError(f"{kind} after FTS, which ends the file", where)
        if kind == "FHS":
            if index != 0:
                raise BatchError("FHS is only allowed as the first segment", where)
            batch.file_header = segment.split(fs)
        elif kind == "BHS":
            if part is not None and part.trailer is None:
                raise BatchError("BHS before the previous batch's BTS", where)
            part = BatchPart(segment.split(fs))
            batch.batches.append(part)
        elif kind == "MSH":
            if part is None and batch.file_header is not None and not batch.batches:
                part = BatchPart([])  # a file of messages without BHS: one implicit batch
                batch.batches.append(part)
            elif part is None or part.trailer is not None:
                raise BatchError("MSH outside a BHS ... BTS batch", where)
            close_message(begin)
            message_from = begin
        elif kind == "BTS":
            if part is None or part.trailer is not None:
                raise BatchError("BTS without an open batch", where)
            close_message(begin)
            part.trailer = segment.split(fs)
            _check_count(part.trailer, len(part.messages), "BTS", "messages in the batch", where)
        elif kind == "FTS":
            if batch.file_header is None:
                raise BatchError("FTS without FHS", where)
            close_message(begin)  # the batch's BTS is optional
            batch.file_trailer = segment.split(fs)
            _check_count(batch.file_trailer, len(batch.batches), "FTS", "batches in the file", where)
        elif message_from is None:
            raise BatchError(f"{kind} segment outside a message (expected MSH, BTS or FTS)", where)
    if part is not None:
        close_message(len(raw))  # trailers are optional: the last message runs to the end
    return batch


def _check_count(fields: list[bytes], actual: int, segment: str, what: str, where: Location) -> None:
    declared = fields[1] if len(fields) > 1 else b""
    if not declared:
        return  # the count is optional; the structure was still checked
    if not declared.strip().isdigit():  # digits only: int() also reads '1_0' and '+1'
        raise BatchError(f"{segment}-1 count is not a number", Location(segment, where.sequence, 1),
                         condition=ErrorCondition.DATA_TYPE_ERROR)
    number = int(declared)
    if number != actual:
        raise BatchError(f"{segment}-1 says {number}, found {actual} {what}",
                         Location(segment, where.sequence, 1), AppErrorCode.BATCH_COUNT_MISMATCH)

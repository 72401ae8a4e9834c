"""ASTM E1381 (CLSI LIS01) low-level protocol, receiver side, sans-IO: bytes in, events and
bytes to send out. No sockets, no reactor, no clock: the caller passes `now` and asks for
`deadline`.

    neutral --ENQ--> (ACK) receiving --frames--> ... --EOT--> neutral, MessageReceived
            --ENQ while busy--> (NAK) neutral

A frame is `<STX> FN text <ETB|ETX> C1 C2 <CR><LF>`: FN is the frame number '1'..'7','0'
(the first frame of a transfer is '1'), C1C2 the checksum, the sum of the bytes from FN
through ETB/ETX modulo 256 as two hex digits. Each frame is answered:

- ACK: a good frame with the expected number; its text is kept (an ETB frame continues in
  the next one, an ETX frame ends a record);
- ACK without keeping it: the previous frame again (our ACK was lost and the sender repeats);
- NAK: bad checksum, wrong frame number, malformed trailer, or a frame longer than
  `max_frame_size`; the sender retransmits, and after `max_attempts` (6) failures in a row
  gives up: the transfer is aborted (`TransferAborted`) and the message discarded;
- EOT ends the transfer: the records received are delivered as one `MessageReceived`
  (records separated by CR, as in the frames; an ETX frame ends a record, so a CR the sender
  left out before ETX is added). An EOT inside a frame or after an ETB frame means the sender
  gave up mid-record, an ENQ inside a frame that it started over: `TransferAborted`.

A transfer given up (`TransferAborted`: timeout, EOT mid-record, ENQ restart, six failures,
oversize, connection lost) loses only its incomplete message, as E1381 says: the messages
already whole (through an E1394 L record) were acknowledged frame by frame, and are delivered
first as a `MessageReceived`.

Timeouts are deadlines, never timers: after an ACK the next frame (or EOT) must begin within
`receive_timeout` (30 s, E1381's receiver timer), and a begun frame must end within
`frame_timeout` (15 s). The caller calls `check_timeout(now)` once `deadline` has passed;
the transfer is then aborted and the receiver returns to neutral.

A message larger than `max_message_size` is aborted with a receiver interrupt (EOT in place
of the ACK); the receiver then ignores everything until the sender's EOT, or for
`receive_timeout` at most (a sender that never sends it must not leave the link deaf).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

STX, ETX, EOT, ENQ, ACK, NAK, ETB = b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x15", b"\x17"
CR, LF = b"\r", b"\n"
_FRAME_STOP = re.compile(b"[\x03\x17\x04\x05]")  # ETX, ETB end a frame; EOT, ENQ give it up

DEFAULT_MAX_FRAME_SIZE = 64 * 1024  # E1381 says 247 bytes; analyzers exceed it, so be lenient
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
MAX_ATTEMPTS = 6
RECEIVE_TIMEOUT = 30.0
FRAME_TIMEOUT = 15.0


def checksum(body: bytes) -> bytes:
    """The two hex digits of a frame whose `body` runs from FN through ETB/ETX."""
    return b"%02X" % (sum(body) & 0xFF)


def frame(number: int, text: bytes, final: bool = True) -> bytes:
    """One frame (for tests and for a future sender side)."""
    body = str(number % 8).encode() + text + (ETX if final else ETB)
    return STX + body + checksum(body) + CR + LF


def frames(message: bytes, size: int = 240) -> list[bytes]:
    """A message's records as frames: one record per frame, split at `size` with ETB."""
    out, number = [], 1
    for record in message.replace(b"\r\n", b"\r").split(b"\r"):
        if not record:
            continue
        record += CR
        for start in range(0, len(record), size):
            out.append(frame(number, record[start:start + size], start + size >= len(record)))
            number += 1
    return out


class State(Enum):
    NEUTRAL = "neutral"  # waiting for ENQ
    RECEIVING = "receiving"  # ENQ accepted: frames until EOT
    DRAINING = "draining"  # transfer given up by us: ignore everything until EOT (or timeout)


@dataclass(frozen=True, slots=True)
class TransferStarted:
    """An ENQ was accepted (answered ACK)."""


@dataclass(frozen=True, slots=True)
class EnquiryRefused:
    """An ENQ arrived while the receiver was busy (answered NAK: the sender retries later)."""


@dataclass(frozen=True, slots=True)
class FrameAccepted:
    number: int
    final: bool  # ETX (a record ends) rather than ETB
    size: int


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A frame answered NAK; `attempts` failures in a row for the expected frame."""

    reason: str
    number: int | None  # the frame number read, if any
    attempts: int


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A complete transfer: the records' text, each record ending with CR."""

    data: bytes
    frames: int


@dataclass(frozen=True, slots=True)
class TransferAborted:
    """The transfer ended without a message: `reason` says why; `size` bytes were dropped."""

    reason: str
    size: int


@dataclass(frozen=True, slots=True)
class JunkDiscarded:
    """Bytes that belong to no frame and are not link control, dropped."""

    data: bytes


class AstmReceiver:
    """The receiver's side of one connection."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 receive_timeout: float = RECEIVE_TIMEOUT, frame_timeout: float = FRAME_TIMEOUT,
                 max_attempts: int = MAX_ATTEMPTS):
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.receive_timeout = receive_timeout
        self.frame_timeout = frame_timeout
        self.max_attempts = max_attempts
        self.state = State.NEUTRAL
        self.busy = False  # set by the caller while it cannot take a message (NAK to ENQ)
        self.deadline: float | None = None
        self._out = bytearray()
        self._frame = bytearray()  # bytes of the frame in progress, from STX
        self._in_frame = False
        self._end = -1  # index in _frame of the ETX/ETB, once read
        self._oversize = False  # the frame in progress passed max_frame_size: drop until ETX/ETB
        self._text = bytearray()  # the frames' text (one buffer: tiny frames cost no more)
        self._whole = 0  # bytes of _text that are whole messages (through an L record)
        self._whole_frames = 0
        self._record = 0  # index in _text where the record in progress begins
        self._expected = 1
        self._previous: bytes | None = None  # the last accepted frame, to recognise a repeat
        self._partial = False  # the last accepted frame ended in ETB
        self._failures = 0
        self._accepted = 0

    # -- input ---------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer (ACK, NAK, EOT), emptied by the call."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def receive_data(self, data: bytes, now: float) -> list:
        events: list = []
        junk = bytearray()
        index, size = 0, len(data)
        while index < size:
            if self._in_frame:
                index = self._frame_bytes(data, index, now, events)
                continue
            byte = data[index:index + 1]
            index += 1
            if self.state is State.DRAINING:
                if byte == EOT:
                    self._neutral()
                continue
            if byte == ENQ:
                self._flush_junk(junk, events)
                self._enquiry(now, events)
            elif byte == EOT:
                self._flush_junk(junk, events)
                if self.state is State.RECEIVING:
                    self._end_of_transfer(events)
            elif byte == STX and self.state is State.RECEIVING:
                self._flush_junk(junk, events)
                self._in_frame = True
                self._frame = bytearray(STX)
                self._end = -1
                self._oversize = False
                self.deadline = now + self.frame_timeout
            elif byte in (CR, LF) and not junk:
                continue  # stray line ends between frames: harmless
            else:
                junk += byte
        self._flush_junk(junk, events)
        return events

    def check_timeout(self, now: float) -> list:
        """Events when the deadline has passed (the transfer is abandoned), else []."""
        if self.deadline is None or now < self.deadline:
            return []
        reason = ("frame not completed within %gs" % self.frame_timeout if self._in_frame
                  else "no frame or EOT within %gs" % self.receive_timeout)
        events: list = []
        if self.state is State.RECEIVING:
            self._abort(f"timeout: {reason}", events)
        self._neutral()  # DRAINING: its abort was reported already; no EOT came, go on
        return events

    def connection_lost(self) -> list:
        """Events when the connection closes: a transfer under way is given up."""
        events: list = []
        if self.state is State.RECEIVING:
            self._abort("connection closed before EOT", events)
        self._neutral()
        return events

    # -- states --------------------------------------------------------------------------------

    def _enquiry(self, now: float, events: list) -> None:
        busy = self.busy
        if self.state is State.RECEIVING:
            # The sender started over (it timed out waiting for us): its incomplete message is
            # lost; a whole one just delivered is being stored, so this ENQ waits (NAK) too.
            busy = self._abort("ENQ during a transfer: the sender restarted", events) or busy
        if busy:
            self._out += NAK
            events.append(EnquiryRefused())
            return
        self._neutral()
        self.state = State.RECEIVING
        self.deadline = now + self.receive_timeout
        self._out += ACK
        events.append(TransferStarted())

    def _end_of_transfer(self, events: list) -> None:
        if self._in_frame or self._partial:
            self._abort("EOT inside a record: the sender gave up", events)
            return
        if self._accepted:
            events.append(MessageReceived(bytes(self._text), self._accepted))
        self._neutral()

    def _abort(self, reason: str, events: list, unkept: int = 0) -> bool:
        """Give the transfer up: deliver its whole messages (True when there were some),
        report and drop the rest (and `unkept` bytes received but never kept)."""
        delivered = self._whole > 0
        if delivered:
            events.append(MessageReceived(bytes(self._text[:self._whole]), self._whole_frames))
        events.append(TransferAborted(reason, len(self._text) - self._whole + unkept))
        self._neutral()
        return delivered

    def _drain(self, now: float) -> None:
        """Ignore everything until the sender's EOT, or until `receive_timeout` has passed."""
        self.state = State.DRAINING
        self.deadline = now + self.receive_timeout

    def _neutral(self) -> None:
        self.state = State.NEUTRAL
        self.deadline = None
        self._in_frame = False
        self._frame = bytearray()
        self._text = bytearray()
        self._whole = 0
        self._whole_frames = 0
        self._record = 0
        self._expected = 1
        self._previous = None
        self._partial = False
        self._failures = 0
        self._accepted = 0

    # -- frames --------------------------------------------------------------------------------

    def _frame_bytes(self, data: bytes, index: int, now: float, events: list) -> int:
        """Consume bytes of the frame in progress; returns the next index."""
        buffer = self._frame
        if self._end < 0:
            found = _FRAME_STOP.search(data, index)  # one scan: the frame's length, not the read's
            stop = found.start() if found else -1
            if stop >= 0 and data[stop:stop + 1] in (EOT, ENQ):
                # EOT or ENQ are never frame text: the sender gave this frame up (EOT) or
                # started over (ENQ); taken as such, not as text that swallows its next ENQ.
                if data[stop:stop + 1] == EOT:
                    self._abort("EOT inside a frame: the sender gave up", events)
                else:
                    self._enquiry(now, events)
                return stop + 1
            take = data[index:stop] if stop >= 0 else data[index:]
            index += len(take)
            if len(buffer) + len(take) >= self.max_frame_size:
                self._oversize = True  # keep counting nothing more; wait for its end
            else:
                buffer += take
            if stop < 0:
                return index
            buffer += data[stop:stop + 1]
            index += 1
            self._end = len(buffer) - 1
        # After ETX/ETB: two checksum characters, CR, LF. A CR where a checksum character
        # belongs ends the trailer at its LF: a sender that left the checksum out waits for
        # our answer, and a NAK now beats waiting out the receive timeout for two more bytes.
        while True:
            trailer = buffer[self._end + 1:]
            cr = trailer.find(CR, 0, 2)
            need = (cr + 2 if cr >= 0 else 4) - len(trailer)
            if need <= 0:
                break
            if index >= len(data):
                return index
            # Byte by byte until the checksum's place is seen: the trailer may be shorter.
            piece = data[index:index + (1 if len(trailer) < 2 else need)]
            buffer += piece
            index += len(piece)
        self._in_frame = False
        self._complete(bytes(buffer), self._end, now, events)
        return index

    def _complete(self, raw: bytes, terminator: int, now: float, events: list) -> None:
        body = raw[1:terminator + 1]  # FN .. ETX/ETB
        trailer = raw[terminator + 1:]
        number = int(body[:1]) if body[:1].isdigit() else None
        if self._oversize:
            return self._reject(f"frame longer than {self.max_frame_size} bytes", number, now, events)
        if number is None or number > 7:
            return self._reject(f"frame number {body[:1]!r} is not 0-7", None, now, events)
        if trailer[:2].find(CR) >= 0:
            return self._reject("frame trailer has a CR where its checksum belongs "
                                "(checksum left out or cut short)", number, now, events)
        if trailer[2:] != CR + LF:
            return self._reject("frame trailer is not checksum, CR, LF", number, now, events)
        if trailer[:2].upper() != checksum(body):
            return self._reject(f"checksum {trailer[:2].decode('latin-1')!r}, computed "
                                f"{checksum(body).decode()}", number, now, events)
        if number != self._expected:
            if self._previous is not None and body == self._previous:
                # Our ACK was lost: the sender repeats the frame we have. ACK it, keep one copy.
                self._out += ACK
                self.deadline = now + self.receive_timeout
                return None
            return self._reject(f"frame number {number}, expected {self._expected}", number, now, events)
        text = body[1:-1]
        final = body.endswith(ETX)
        if final and not text.endswith((CR, LF)) and (text or self._partial):
            text += CR  # ETX ends a record: its CR left out must not glue it to the next one
        if len(self._text) + len(text) > self.max_message_size:
            self._abort(f"message larger than {self.max_message_size} bytes", events, len(text))
            self._drain(now)
            self._out += EOT  # receiver interrupt: asks the sender to stop
            return None
        self._text += text
        self._previous = body
        self._partial = not final
        self._expected = (self._expected + 1) % 8
        self._failures = 0
        self._accepted += 1
        if final:
            if self._ends_message():
                self._whole, self._whole_frames = len(self._text), self._accepted
            self._record = len(self._text)
        self._out += ACK
        self.deadline = now + self.receive_timeout
        events.append(FrameAccepted(number, not self._partial, len(text)))
        return None

    def _reject(self, reason: str, number: int | None, now: float, events: list) -> None:
        self._failures += 1
        events.append(FrameRejected(reason, number, self._failures))
        if self._failures >= self.max_attempts:
            self._abort(f"{self._failures} failed attempts: {reason}", events)
            self._drain(now)  # the sender now sends EOT
            return
        self._out += NAK
        self.deadline = now + self.receive_timeout

    def _ends_message(self) -> bool:
        """Whether the text ends with an E1394 terminator record ('L|...'): a message end."""
        text, end, record = self._text, len(self._text), self._record
        while end > record and text[end - 1] in b"\r\n":
            end -= 1
        if end == record:  # line ends alone: the message ends if it did before them
            return 0 < record == self._whole
        # Searched within the last record only: from 0, a text without LF (or CR) was scanned
        # whole at every record, quadratic (a 9 MB transfer of one-field records took 21 s).
        start = max(text.rfind(CR, record, end), text.rfind(LF, record, end), record - 1) + 1
        return text[start:start + 1] == b"L" and not text[start + 1:start + 2].isalnum()

    def _flush_junk(self, junk: bytearray, events: list) -> None:
        if junk:
            events.append(JunkDiscarded(bytes(junk)))
            junk.clear()


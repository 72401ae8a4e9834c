"""MLLP framing, sans-IO: bytes in, events out. No sockets, no reactor.

A frame is ``<VT> payload <FS><CR>`` (0x0B ... 0x1C 0x0D). The framer is tolerant on input:

- bytes before a VT are not a message: they are reported as `JunkDiscarded` and dropped;
- a frame ends at FS; the CR that should follow is swallowed when it comes, and a frame
  whose FS has no CR (some senders) is still delivered, at once;
- an FS followed, in what has been read, by anything but CR, LF, a space, a tab or the VT
  of the next frame is not an end block but content (binary data sent raw): the frame goes
  on to the next FS, so that the message is kept whole for its refusal, not cut there with
  its tail dropped as junk and its head acknowledged;
- several frames in one read and one frame over many reads give the same events;
- a frame that grows past `max_frame_size` is reported once as `FrameTooLarge` with the
  first `keep_prefix` bytes (enough to read its MSH), after which the framer is `broken`
  and ignores further input: the caller answers and closes the connection;
- MLLP release 2 commit blocks (a payload of exactly ACK 0x06 or NAK 0x15) are
  `CommitAcknowledged` / `CommitRejected`, not messages.

The payload is delivered without VT and FS/CR; HL7 segments inside keep their CR.
"""
from __future__ import annotations

from dataclasses import dataclass

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
COMMIT_ACK = b"\x06"
# What may follow an FS that ends a frame: its CR (or the LF, blank or tab some senders put
# instead or after it) or the VT of the next frame.
_AFTER_END_BLOCK = frozenset(b"\r\n \t\x0b")
COMMIT_NAK = b"\x15"

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FrameReceived:
    payload: bytes


@dataclass(frozen=True, slots=True)
class JunkDiscarded:
    """Bytes outside any frame (before a VT), dropped."""

    data: bytes


@dataclass(frozen=True, slots=True)
class FrameTooLarge:
    """A frame passed the size limit; `prefix` holds its first bytes, `size` what was seen."""

    prefix: bytes
    size: int
    limit: int


@dataclass(frozen=True, slots=True)
class CommitAcknowledged:
    """MLLP release 2: the peer has durably stored our last frame."""


@dataclass(frozen=True, slots=True)
class CommitRejected:
    """MLLP release 2: the peer could not store our last frame."""


def frame(payload: bytes) -> bytes:
    """The MLLP frame around a payload."""
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


COMMIT_ACK_BLOCK = frame(COMMIT_ACK)
COMMIT_NAK_BLOCK = frame(COMMIT_NAK)


class MllpFramer:
    """Turns a byte stream into MLLP events; one instance per connection."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, keep_prefix: int = 65536):
        self.max_frame_size = max_frame_size
        self.keep_prefix = min(keep_prefix, max_frame_size)
        self._chunks: list[bytes] = []  # bytes after the VT of the frame in progress
        self._size = 0
        self._in_frame = False
        self._swallow_cr = False  # an FS just ended a frame: a CR next belongs to it
        self.broken = False

    @property
    def in_frame(self) -> bool:
        """True while a frame has started (VT seen) and not ended: for the frame deadline."""
        return self._in_frame

    @property
    def buffered(self) -> int:
        """Bytes of the frame in progress."""
        return self._size

    def receive_data(self, data: bytes) -> list:
        """Feed bytes read from the connection; return the events they complete, in order."""
        if self.broken or not data:
            return []
        events: list = []
        if self._swallow_cr:
            self._swallow_cr = False
            if data[:1] == CARRIAGE_RETURN:
                data = data[1:]
        position = 0
        end = len(data)
        while position < end:
            if not self._in_frame:
                start = data.find(START_BLOCK, position)
                if start < 0:
                    events.append(JunkDiscarded(data[position:]))
                    return events
                if start > position:
                    events.append(JunkDiscarded(data[position:start]))
                self._in_frame = True
                position = start + 1
                continue
            stop = data.find(END_BLOCK, position)
            while 0 <= stop < end - 1 and data[stop + 1] not in _AFTER_END_BLOCK:
                stop = data.find(END_BLOCK, stop + 1)  # content, not the end of the frame
            if stop < 0:
                self._append(data[position:], events)
                return events
            payload = data[position:stop]
            if self._chunks:
                self._chunks.append(payload)
                payload = b"".join(self._chunks)
                self._chunks = []
                self._size = 0
            self._in_frame = False
            if len(payload) > self.max_frame_size:
                self._too_large(payload, len(payload), events)
                return events
            events.append(_event_for(payload))
            position = stop + 1
            if position < end:
                if data[position:position + 1] == CARRIAGE_RETURN:
                    position += 1
            else:
                self._swallow_cr = True
        return events

    def _append(self, chunk: bytes, events: list) -> None:
        # A list of chunks, joined once at the end: a big frame read in many pieces stays linear.
        self._size += len(chunk)
        if self._size > self.max_frame_size:
            head = b"".join(self._chunks)[:self.keep_prefix]
            self._too_large(head + chunk[:self.keep_prefix], self._size, events)
            return
        if chunk:
            self._chunks.append(chunk)

    def _too_large(self, seen: bytes, size: int, events: list) -> None:
        self.broken = True
        self._chunks = []
        self._size = 0
        self._in_frame = False
        events.append(FrameTooLarge(seen[:self.keep_prefix], size, self.max_frame_size))


def _event_for(payload: bytes):
    if len(payload) == 1:
        if payload == COMMIT_ACK:
            return CommitAcknowledged()
        if payload == COMMIT_NAK:
            return CommitRejected()
    return FrameReceived(payload)

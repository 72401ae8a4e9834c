"""MllpFramer, sans-IO: bytes in, MLLP events out (no sockets, no reactor)."""
import time

import pytest

from adapters.mllp.framing import (COMMIT_ACK_BLOCK, COMMIT_NAK_BLOCK, CommitAcknowledged,
                                   CommitRejected, FrameReceived, FrameTooLarge, JunkDiscarded,
                                   MllpFramer, frame)

VT, FS, CR = b"\x0b", b"\x1c", b"\r"

# Synthetic messages (no real patient data); segments end with CR inside the frame.
MSG_A = (b"MSH|^~\\&|LAB|CHU_X|HIE|MA|20260101120000||ORU^R01^ORU_R01|A1|P|2.5\r"
         b"PID|1||123^^^CHU_X^PI||Test^Alice\r")
MSG_B = (b"MSH|^~\\&|ADT|CHU_Y|HIE|MA|20260101120001||ADT^A01^ADT_A01|B2|P|2.5\r"
         b"PID|1||456^^^CHU_Y^PI||Test^Bob\r")


def feed(framer: MllpFramer, *chunks: bytes) -> list:
    """All events produced by feeding `chunks` in order."""
    events = []
    for chunk in chunks:
        events.extend(framer.receive_data(chunk))
    return events


def test_whole_frame_in_one_read():
    """A complete frame in one read yields exactly its payload, without VT/FS/CR."""
    framer = MllpFramer()
    assert framer.receive_data(frame(MSG_A)) == [FrameReceived(MSG_A)]
    assert not framer.in_frame and framer.buffered == 0


def test_frame_helper_wraps_payload():
    """frame() puts VT before and FS CR after the payload."""
    assert frame(b"abc") == b"\x0babc\x1c\r"


STREAM = frame(MSG_A) + frame(MSG_B) + COMMIT_ACK_BLOCK + frame(MSG_A)
EXPECTED = [FrameReceived(MSG_A), FrameReceived(MSG_B), CommitAcknowledged(), FrameReceived(MSG_A)]


def test_same_events_at_every_split_point():
    """Splitting the same stream into two reads at any byte gives the same events."""
    assert feed(MllpFramer(), STREAM) == EXPECTED
    for split in range(len(STREAM) + 1):
        framer = MllpFramer()
        events = feed(framer, STREAM[:split], STREAM[split:])
        assert events == EXPECTED, f"split at {split}"
        assert not framer.in_frame and framer.buffered == 0


def test_same_events_one_byte_per_read():
    """Feeding the stream one byte per read gives the same events as one read."""
    framer = MllpFramer()
    events = feed(framer, *(STREAM[i:i + 1] for i in range(len(STREAM))))
    assert events == EXPECTED


def test_several_frames_in_one_read():
    """Several frames in one read are all delivered, in order."""
    framer = MllpFramer()
    assert framer.receive_data(frame(MSG_A) + frame(MSG_B) + frame(b"x")) == [
        FrameReceived(MSG_A), FrameReceived(MSG_B), FrameReceived(b"x")]


def test_junk_before_start_block_is_reported_and_dropped():
    """Bytes before a VT are reported as JunkDiscarded and are not part of the payload."""
    framer = MllpFramer()
    assert framer.receive_data(b"GET / HTTP/1.0\r\n" + frame(MSG_A)) == [
        JunkDiscarded(b"GET / HTTP/1.0\r\n"), FrameReceived(MSG_A)]


def test_junk_only_read():
    """A read with no VT at all is all junk and leaves the framer outside a frame."""
    framer = MllpFramer()
    assert framer.receive_data(b"hello") == [JunkDiscarded(b"hello")]
    assert not framer.in_frame
    assert framer.receive_data(frame(MSG_B)) == [FrameReceived(MSG_B)]


def test_junk_between_frames():
    """Junk between two frames is reported once, between the two frame events."""
    framer = MllpFramer()
    assert framer.receive_data(frame(MSG_A) + b"\n\nnoise" + frame(MSG_B)) == [
        FrameReceived(MSG_A), JunkDiscarded(b"\n\nnoise"), FrameReceived(MSG_B)]


def test_fs_without_cr_is_tolerated_in_the_same_read():
    """A frame ended by FS alone is delivered, and what follows is read normally."""
    framer = MllpFramer()
    assert framer.receive_data(VT + MSG_A + FS + VT + MSG_B + FS + CR) == [
        FrameReceived(MSG_A), FrameReceived(MSG_B)]


def test_fs_without_cr_delivers_at_once_and_late_cr_is_swallowed():
    """A frame is delivered at FS; a CR arriving in the next read is swallowed, not junk."""
    framer = MllpFramer()
    assert framer.receive_data(VT + MSG_A + FS) == [FrameReceived(MSG_A)]
    assert not framer.in_frame
    assert framer.receive_data(CR) == []
    assert framer.receive_data(CR + frame(MSG_B)) == [JunkDiscarded(CR), FrameReceived(MSG_B)]


def test_fs_at_end_of_read_then_next_frame_without_cr():
    """After an FS at the end of a read, a next read starting with VT starts a new frame."""
    framer = MllpFramer()
    assert feed(framer, VT + MSG_A + FS, frame(MSG_B)) == [FrameReceived(MSG_A), FrameReceived(MSG_B)]


def test_an_fs_inside_the_message_is_content_not_the_end_of_the_frame():
    """An FS followed by anything but CR, LF, a blank, a tab or a VT is raw data inside the
    message: the frame runs to the next FS, so the message is kept whole (and refused for it
    by the inspector) rather than cut there, its head acknowledged and its tail dropped as
    junk. The same at every split point but one: right after the inner FS, nothing tells an
    end block from content (the frame ends there, as for a sender without CR)."""
    inner = MSG_A + b"OBX|1|ED|PDF||^AP^^Base64^JVBE" + FS + b"raw\r"
    stream = frame(inner) + frame(MSG_B)
    assert feed(MllpFramer(), stream) == [FrameReceived(inner), FrameReceived(MSG_B)]
    ambiguous = 1 + inner.index(FS) + 1
    for split in range(len(stream) + 1):
        framer = MllpFramer()
        events = feed(framer, stream[:split], stream[split:])
        if split == ambiguous:
            assert events[0] == FrameReceived(inner[:inner.index(FS)])
        else:
            assert events == [FrameReceived(inner), FrameReceived(MSG_B)], f"split at {split}"
    for after in (CR, b"\n", b" ", b"\t", VT):  # what may follow an end block ends the frame
        assert MllpFramer().receive_data(VT + MSG_A + FS + after)[0] == FrameReceived(MSG_A)


def test_frame_too_large_in_one_read():
    """A frame over the limit gives one FrameTooLarge with its first bytes and size, then the
    framer is broken and ignores all further input."""
    framer = MllpFramer(max_frame_size=100, keep_prefix=16)
    payload = b"MSH|" + b"x" * 200
    events = framer.receive_data(frame(payload) + frame(MSG_A))
    assert events == [FrameTooLarge(payload[:16], len(payload), 100)]
    assert framer.broken and not framer.in_frame and framer.buffered == 0
    assert framer.receive_data(frame(MSG_B)) == []


def test_frame_too_large_over_many_reads():
    """A frame growing past the limit over several reads is reported once, as soon as it
    passes the limit, with the prefix of its first bytes."""
    framer = MllpFramer(max_frame_size=100, keep_prefix=10)
    payload = bytes(range(48, 58)) * 30  # 300 bytes, distinct first ten
    events = feed(framer, VT, payload[:60], payload[60:120])
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, FrameTooLarge)
    assert event.prefix == payload[:10]
    assert event.size == 120 and event.limit == 100
    assert framer.broken
    assert feed(framer, payload[120:], FS + CR, frame(MSG_A)) == []


def test_prefix_limited_by_frame_size():
    """keep_prefix larger than the limit is capped at the limit."""
    framer = MllpFramer(max_frame_size=8, keep_prefix=1000)
    [event] = framer.receive_data(frame(b"0123456789ABCDEF"))
    assert event == FrameTooLarge(b"01234567", 16, 8)


@pytest.mark.parametrize("split", [0, 1, 50, 99, 100, 101])
def test_frame_exactly_at_limit_is_accepted(split):
    """A frame of exactly max_frame_size bytes is delivered, whole or in pieces."""
    payload = b"y" * 100
    data = frame(payload)
    framer = MllpFramer(max_frame_size=100, keep_prefix=10)
    assert feed(framer, data[:split], data[split:]) == [FrameReceived(payload)]
    assert not framer.broken


@pytest.mark.parametrize("split", [1, 50, 100, 101, 102])
def test_one_byte_over_limit_is_refused(split):
    """A frame one byte over max_frame_size is refused, whatever the read boundaries."""
    data = frame(b"z" * 101)
    framer = MllpFramer(max_frame_size=100, keep_prefix=10)
    events = feed(framer, data[:split], data[split:])
    assert len(events) == 1 and isinstance(events[0], FrameTooLarge)
    assert events[0].prefix == b"z" * 10 and events[0].size > 100
    assert framer.broken


def test_commit_blocks():
    """MLLP release 2 commit ACK and NAK blocks are commit events, not frames."""
    framer = MllpFramer()
    assert COMMIT_ACK_BLOCK == b"\x0b\x06\x1c\r" and COMMIT_NAK_BLOCK == b"\x0b\x15\x1c\r"
    assert framer.receive_data(COMMIT_ACK_BLOCK + COMMIT_NAK_BLOCK) == [
        CommitAcknowledged(), CommitRejected()]


def test_payload_starting_with_ack_byte_is_a_frame():
    """Only a payload of exactly 0x06 is a commit ACK; longer payloads are frames."""
    framer = MllpFramer()
    assert framer.receive_data(frame(b"\x06\x06")) == [FrameReceived(b"\x06\x06")]


def test_in_frame_and_buffered():
    """in_frame is True between VT and FS, and buffered counts the payload bytes so far."""
    framer = MllpFramer()
    assert not framer.in_frame and framer.buffered == 0
    framer.receive_data(b"junk")
    assert not framer.in_frame
    framer.receive_data(VT)
    assert framer.in_frame and framer.buffered == 0
    framer.receive_data(MSG_A[:10])
    assert framer.in_frame and framer.buffered == 10
    framer.receive_data(MSG_A[10:25])
    assert framer.buffered == 25
    assert framer.receive_data(MSG_A[25:] + FS + CR) == [FrameReceived(MSG_A)]
    assert not framer.in_frame and framer.buffered == 0


def test_empty_read_gives_nothing():
    """An empty read produces no event and changes nothing."""
    framer = MllpFramer()
    framer.receive_data(VT + b"abc")
    assert framer.receive_data(b"") == []
    assert framer.in_frame and framer.buffered == 3


def test_big_frame_in_64k_chunks_is_linear():
    """An 8 MiB frame fed in 64 KiB reads is delivered intact, quickly (no quadratic copying)."""
    payload = (b"OBX|1|ED|PDF^Report||" + b"A" * 1000 + b"\r") * (8 * 1024 * 1024 // 1022)
    data = frame(payload)
    framer = MllpFramer()
    chunk = 64 * 1024
    started = time.perf_counter()
    events = []
    for i in range(0, len(data), chunk):
        events.extend(framer.receive_data(data[i:i + chunk]))
    elapsed = time.perf_counter() - started
    assert events == [FrameReceived(payload)]
    assert elapsed < 2.0, f"{elapsed:.2f} s for {len(payload)} bytes"

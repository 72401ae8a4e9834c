"""ASTM E1381 receiver (adapters/astm/framing.py): pure state machine, no socket, no clock."""
from __future__ import annotations

import json
import os

import pytest

from adapters.astm.framing import (ACK, ENQ, EOT, ETB, ETX, NAK, STX, AstmReceiver, EnquiryRefused,
                                   FrameAccepted, FrameRejected, JunkDiscarded, MessageReceived,
                                   State, TransferAborted, TransferStarted, checksum, frame, frames)
from conftest import corpus_path

MESSAGE = (b"H|\\^&|||XN-550^1|||||LIS|P|1\rP|1|PAT-1||BK123456|EL ALAOUI^Fatima\r"
           b"O|1|SID-1||^^^GLU|R\rR|1|^^^GLU^Glycemie|1.05|g/L|0.70-1.10|N||F\rL|1|N\r")


def transfer(message: bytes = MESSAGE, size: int = 240) -> bytes:
    return ENQ + b"".join(frames(message, size)) + EOT


def feed(receiver: AstmReceiver, *chunks: bytes, now: float = 0.0) -> list:
    events = []
    for chunk in chunks:
        events += receiver.receive_data(chunk, now)
    return events


def of(events, kind):
    return [event for event in events if isinstance(event, kind)]


def test_checksum_is_the_sum_from_frame_number_through_etx_modulo_256():
    """The checksum of '1H|\\^&' CR ETX is two upper-case hex digits of the byte sum mod 256."""
    body = b"1H|\\^&\r" + ETX
    assert checksum(body) == b"%02X" % (sum(body) % 256)
    assert frame(1, b"H|\\^&\r") == STX + body + checksum(body) + b"\r\n"


def test_a_whole_transfer_gives_one_message_and_acks_every_frame():
    """ENQ is answered ACK, each frame ACK, and EOT delivers the records joined."""
    receiver = AstmReceiver()
    events = feed(receiver, transfer())
    assert of(events, TransferStarted)
    (message,) = of(events, MessageReceived)
    assert message.data == MESSAGE and message.frames == 5
    assert receiver.data_to_send() == ACK * 6
    assert receiver.state is State.NEUTRAL and receiver.deadline is None


def test_every_split_point_gives_the_same_message():
    """The transfer cut at every byte gives the same message and the same answers."""
    data = transfer(size=17)  # long records split over ETB frames too
    whole = AstmReceiver()
    expected = of(feed(whole, data), MessageReceived)
    answers = whole.data_to_send()
    for cut in range(1, len(data)):
        receiver = AstmReceiver()
        events = feed(receiver, data[:cut], data[cut:])
        assert of(events, MessageReceived) == expected, cut
        assert receiver.data_to_send() == answers, cut


def test_byte_by_byte():
    """One byte per read is still one message."""
    receiver = AstmReceiver()
    data = transfer(size=30)
    events = feed(receiver, *[data[i:i + 1] for i in range(len(data))])
    assert of(events, MessageReceived)[0].data == MESSAGE


def test_etb_frames_are_joined_into_one_record():
    """A record split over ETB frames arrives whole; frame numbers cycle 1..7,0,1."""
    record = b"R|1|^^^GLU|" + b"9" * 100 + b"\r"
    message = b"H|\\^&\r" + record + b"L|1\r"
    parts = frames(message, size=10)
    assert len(parts) > 9 and parts[7][1:2] == b"0" and parts[8][1:2] == b"1"
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, *parts, EOT)
    assert of(events, MessageReceived)[0].data == message
    assert not of(events, FrameAccepted)[1].final  # the R record's first frame ends in ETB


def test_bad_checksum_is_nakked_and_the_retransmission_accepted():
    """A corrupted frame gets NAK; the same frame sent again gets ACK and counts once."""
    good = frame(1, b"H|\\^&\r")
    bad = good[:-4] + b"00\r\n" if good[-4:-2] != b"00" else good[:-4] + b"01\r\n"
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, bad)
    (rejected,) = of(events, FrameRejected)
    assert "checksum" in rejected.reason and rejected.attempts == 1
    assert receiver.data_to_send() == ACK + NAK
    events = feed(receiver, good, frame(2, b"L|1\r"), EOT)
    assert of(events, MessageReceived)[0].data == b"H|\\^&\rL|1\r"


def test_wrong_frame_number_is_nakked():
    """Frame 3 when 2 is expected is refused with NAK and the reason."""
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, frame(1, b"H|\\^&\r"), frame(3, b"L|1\r"))
    (rejected,) = of(events, FrameRejected)
    assert rejected.reason == "frame number 3, expected 2" and rejected.number == 3
    assert receiver.data_to_send().endswith(NAK)


def test_a_repeated_frame_after_a_lost_ack_is_acked_but_kept_once():
    """The sender repeats the last frame (our ACK was lost): ACK again, no duplicate record."""
    receiver = AstmReceiver()
    first = frame(1, b"H|\\^&\r")
    events = feed(receiver, ENQ, first, first, frame(2, b"L|1\r"), EOT)
    assert of(events, MessageReceived)[0].data == b"H|\\^&\rL|1\r"
    assert receiver.data_to_send() == ACK * 4


def test_six_failures_abort_the_transfer():
    """After six NAKed attempts the transfer is abandoned, then the sender's EOT ends it."""
    receiver = AstmReceiver()
    bad = STX + b"1H|\r" + ETX + b"ZZ\r\n"
    events = feed(receiver, ENQ, *[bad] * 6)
    assert len(of(events, FrameRejected)) == 6
    assert "6 failed attempts" in of(events, TransferAborted)[0].reason
    assert receiver.data_to_send() == ACK + NAK * 5
    assert not of(feed(receiver, EOT), MessageReceived)
    assert receiver.state is State.NEUTRAL


def test_eot_inside_a_record_delivers_nothing():
    """EOT after an ETB frame means the sender gave up: aborted, no message."""
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, frame(1, b"H|\\^&|par", final=False), EOT)
    assert not of(events, MessageReceived)
    assert "inside a record" in of(events, TransferAborted)[0].reason


def test_busy_receiver_refuses_enq_with_nak():
    """While busy, ENQ is answered NAK and no transfer starts."""
    receiver = AstmReceiver()
    receiver.busy = True
    events = feed(receiver, ENQ)
    assert of(events, EnquiryRefused) and receiver.data_to_send() == NAK
    assert receiver.state is State.NEUTRAL


def test_deadlines_abort_a_silent_transfer():
    """No frame 30 s after the ACK: check_timeout aborts; a half frame has 15 s."""
    receiver = AstmReceiver()
    feed(receiver, ENQ, now=100.0)
    assert receiver.deadline == 130.0
    assert receiver.check_timeout(129.9) == []
    (aborted,) = receiver.check_timeout(130.0)
    assert isinstance(aborted, TransferAborted) and "timeout" in aborted.reason
    assert receiver.state is State.NEUTRAL and receiver.deadline is None
    feed(receiver, ENQ, now=200.0)
    feed(receiver, STX + b"1H|", now=201.0)
    assert receiver.deadline == 216.0
    assert "frame not completed" in receiver.check_timeout(216.0)[0].reason


def test_oversize_frame_is_nakked():
    """A frame longer than max_frame_size is refused whatever its checksum."""
    receiver = AstmReceiver(max_frame_size=64)
    events = feed(receiver, ENQ, frame(1, b"H|" + b"x" * 200 + b"\r"))
    assert "longer than 64" in of(events, FrameRejected)[0].reason
    events = feed(receiver, frame(1, b"H|\\^&\r"), frame(2, b"L|1\r"), EOT)
    assert of(events, MessageReceived)[0].data == b"H|\\^&\rL|1\r"


def test_oversize_message_is_interrupted_with_eot():
    """Past max_message_size the receiver answers EOT and ignores the rest until EOT."""
    receiver = AstmReceiver(max_message_size=20)
    events = feed(receiver, ENQ, frame(1, b"H|\\^&\r"), frame(2, b"P|1|" + b"x" * 30 + b"\r"))
    assert "larger than 20" in of(events, TransferAborted)[0].reason
    assert receiver.data_to_send() == ACK + ACK + EOT
    assert not of(feed(receiver, frame(3, b"L|1\r"), EOT), MessageReceived)
    assert receiver.state is State.NEUTRAL


def test_finding_message_ends_does_not_rescan_the_transfer():
    """Whether a record ends a message (an L record) was decided by searching the whole text
    back for its line start, CR and LF alike; with CR-only records the LF search went through
    everything received at every record: 20,000 tiny records after an 8 MB one took 3.4 s.
    Only the record itself is searched now."""
    import time

    records = b"".join(frame(number % 8, b"P|1\r") for number in range(2, 20_002))

    def after(header: bytes) -> tuple[AstmReceiver, float]:
        """A receiver fed `header`'s frame then the records, and the seconds the records took."""
        receiver = AstmReceiver(max_frame_size=1 << 24)
        feed(receiver, ENQ, frame(1, header))
        started = time.monotonic()
        assert len(of(feed(receiver, records), FrameAccepted)) == 20_000
        return receiver, time.monotonic() - started

    _, alone = after(b"H|\\^&|\r")
    receiver, behind = after(b"H|\\^&|" + b"x" * 8_000_000 + b"\r")
    assert behind < 3 * alone + 0.5  # as long whatever came before (it was 30 times longer)
    events = feed(receiver, frame(20_002 % 8, b"L|1\r"), frame(20_003 % 8, b"\r"), frame(20_004 % 8, b"H|"))
    assert len(of(events, FrameAccepted)) == 3
    whole = of(receiver.connection_lost(), MessageReceived)  # a line end after L: still whole
    assert len(whole) == 1 and whole[0].data.endswith(b"P|1\rL|1\r\r") and whole[0].frames == 20_003


def test_junk_is_reported_and_ignored():
    """Bytes outside frames are reported as junk; the transfer goes on."""
    receiver = AstmReceiver()
    events = feed(receiver, b"garbage" + ENQ + b"noise" + frame(1, b"H|\\^&\r") + frame(2, b"L|1\r") + EOT)
    assert [event.data for event in of(events, JunkDiscarded)] == [b"garbage", b"noise"]
    assert of(events, MessageReceived)


def test_a_malformed_trailer_and_frame_number_are_refused():
    """A frame without CR LF after the checksum, or with FN '9', is NAKed."""
    receiver = AstmReceiver()
    body = b"1H|\r" + ETX
    events = feed(receiver, ENQ, STX + body + checksum(body) + b"XX")
    assert "trailer" in of(events, FrameRejected)[0].reason
    body = b"9H|\r" + ETB
    events = feed(receiver, STX + body + checksum(body) + b"\r\n")
    assert "not 0-7" in of(events, FrameRejected)[0].reason


@pytest.mark.parametrize("name", ["roche_multi_frame_bytes", "stago", "d10_error"])
def test_corpus_byte_dumps(name):
    """Captured analyzer transfers (JSON arrays of reads) give one message each, all ACKed."""
    path = corpus_path("astm", "ruby-astm", f"{name}.txt")
    if not os.path.exists(path):
        pytest.skip("corpus not available")
    reads = [bytes(chunk) for chunk in json.load(open(path))]
    receiver = AstmReceiver()
    events = feed(receiver, *reads)
    assert not of(events, FrameRejected)
    (message,) = of(events, MessageReceived)
    assert message.data.startswith(b"H|") and b"\rL|" in message.data
    assert set(receiver.data_to_send()) == {ACK[0]}


@pytest.mark.parametrize("split", [False, True])
def test_a_frame_without_its_checksum_is_nakked_at_once(split):
    """ETX then CR LF, the checksum left out (or one character of it): NAKed as soon as the LF
    arrives, not after the receive timeout (the sender waits for our answer and sends nothing
    more); byte by byte too. The transfer goes on with the frame sent again, and EOT right after
    the short trailer is not taken for part of it."""
    body = b"1H|\\^&\r" + ETX
    for short in (STX + body + b"\r\n", STX + body + checksum(body)[:1] + b"\r\n"):
        receiver = AstmReceiver()
        chunks = [bytes([byte]) for byte in ENQ + short] if split else [ENQ + short]
        (rejected,) = of(feed(receiver, *chunks), FrameRejected)
        assert "checksum" in rejected.reason and rejected.attempts == 1
        assert receiver.data_to_send() == ACK + NAK
        events = feed(receiver, STX + body + checksum(body) + b"\r\n" + frame(2, b"L|1\r") + EOT)
        assert of(events, MessageReceived)[0].data == b"H|\\^&\rL|1\r"
    receiver = AstmReceiver()
    events = feed(receiver, ENQ + STX + body + b"\r\n" + EOT)
    assert of(events, FrameRejected) and not of(events, JunkDiscarded)
    assert receiver.state is State.NEUTRAL

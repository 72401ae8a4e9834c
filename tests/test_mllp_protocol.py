"""The MLLP server protocol without sockets: StringTransport, a fake Clock and a fake handler
that records each frame and lets the test decide when to answer it."""
from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from adapters.mllp.framing import COMMIT_ACK_BLOCK, COMMIT_NAK_BLOCK, frame
from adapters.mllp.protocol import (PIPELINE_LIMIT, Answer, MllpServerFactory, MllpServerProtocol,
                                    MllpSettings)
from gateway.service import source_filter

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def message(control_id: str) -> bytes:
    """A small synthetic ADT^A01 (no real patient)."""
    return (b"MSH|^~\\&|APP|FAC|GW|MA|20250101120000||ADT^A01^ADT_A01|" + control_id.encode()
            + b"|P|2.5\rPID|1||" + control_id.encode() + b"^^^FAC^PI||TEST^PATIENT\r")


def ack(control_id: str) -> bytes:
    return b"MSH|^~\\&|GW|MA|APP|FAC|20250101120001||ACK|A" + control_id.encode() + b"|P|2.5\rMSA|AA|" \
        + control_id.encode() + b"\r"


class FakeHandler:
    """Records every call; the test answers through the recorded `reply`."""

    def __init__(self):
        self.calls: list[dict] = []

    def frame_received(self, payload, connection, reply):
        self.calls.append(dict(kind="frame", payload=payload, connection=connection, reply=reply))

    def frame_too_large(self, prefix, size, limit, connection, reply):
        self.calls.append(dict(kind="too_large", payload=prefix, size=size, limit=limit,
                               connection=connection, reply=reply))

    @property
    def payloads(self) -> list[bytes]:
        return [call["payload"] for call in self.calls]


class Connection:
    def __init__(self, **settings):
        self.clock = Clock()
        self.handler = FakeHandler()
        self.protocol = MllpServerProtocol(self.handler, MllpSettings("mllp-test", **settings), self.clock)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.20.30.40", 40001))
        self.protocol.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answer(self, index: int, response: bytes | None, stored: bool = True) -> None:
        self.handler.calls[index]["reply"](Answer(stored, response))

    @property
    def written(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


def test_two_frames_in_one_read_are_answered_in_order_one_at_a_time():
    """The second of two frames read together reaches the handler only after the first is answered, and ACKs leave in order."""
    c = Connection()
    c.feed(frame(message("C1")) + frame(message("C2")))
    assert c.handler.payloads == [message("C1")]
    assert c.written == b""
    c.answer(0, ack("C1"))
    assert c.handler.payloads == [message("C1"), message("C2")]
    assert c.written == frame(ack("C1"))
    c.answer(1, ack("C2"))
    assert c.written == frame(ack("C1")) + frame(ack("C2"))
    assert c.handler.calls[0]["connection"].peer == "10.20.30.40:40001"
    assert c.handler.calls[0]["connection"].listener == "mllp-test"


def test_frame_split_over_many_reads_is_delivered_once_whole():
    """A frame fed one byte per read is delivered exactly once, byte for byte, when its FS arrives."""
    c = Connection()
    data = frame(message("C1"))
    for i in range(len(data) - 2):
        c.feed(data[i:i + 1])
        assert c.handler.calls == []
    c.feed(data[-2:-1])  # FS
    assert c.handler.payloads == [message("C1")]
    c.feed(data[-1:])  # the trailing CR is not junk, not a frame
    assert c.handler.payloads == [message("C1")]


def test_frame_ended_by_fs_without_cr_is_delivered():
    """FS without the CR still ends the frame, and the next frame in the same read follows."""
    c = Connection()
    c.feed(VT + message("C1") + FS + VT + message("C2") + FS + CR)
    assert c.handler.payloads == [message("C1")]
    c.answer(0, ack("C1"))
    assert c.handler.payloads == [message("C1"), message("C2")]


def test_junk_before_a_frame_is_logged_and_ignored():
    """Bytes before VT are dropped with a warning naming their size, and the frame after them is handled."""
    c = Connection()
    with capturedLogs() as events:
        c.feed(b"GET / HTTP/1.0\r\n\r\n" + frame(message("C1")))
    assert c.handler.payloads == [message("C1")]
    junk = [e for e in events if "discarded" in e.get("log_format", "")]
    assert len(junk) == 1 and junk[0]["size"] == len(b"GET / HTTP/1.0\r\n\r\n")
    assert junk[0]["log_level"].name == "warn"
    assert not c.closed


def test_idle_timeout_closes_after_silence():
    """The connection closes after idle_timeout seconds without a byte, and every byte restarts the count."""
    c = Connection(idle_timeout=10.0)
    c.clock.advance(9.5)
    assert not c.closed
    c.feed(b"x")  # junk still counts as activity
    c.clock.advance(9.5)
    assert not c.closed
    with capturedLogs() as events:
        c.clock.advance(0.6)
    assert c.closed
    assert any("idle" in e.get("log_format", "") for e in events)


def test_frame_deadline_closes_a_trickling_sender():
    """A frame not complete frame_timeout after its first byte is aborted even though a byte arrives every step."""
    c = Connection(frame_timeout=5.0, idle_timeout=2.0)
    data = frame(message("C1"))
    c.feed(data[:1])
    position = 1
    for _ in range(48):  # to 4.8 s
        c.clock.advance(0.1)
        c.feed(data[position:position + 1])
        position += 1
        assert not c.closed  # the idle timeout never fires: bytes keep coming
    assert position < len(data) - 2
    with capturedLogs() as events:
        for _ in range(3):
            c.clock.advance(0.1)
            c.feed(data[position:position + 1])
            position += 1
    assert c.closed and c.transport.disconnected  # aborted
    assert c.handler.calls == []
    assert any("not complete" in e.get("log_format", "") for e in events)


def test_frame_deadline_restarts_for_each_frame():
    """A sender whose reads always end inside a frame is not cut off while each frame completes within frame_timeout."""
    c = Connection(frame_timeout=5.0)
    frames = [frame(message(f"C{i}")) for i in range(6)]
    halves = [(f[:len(f) // 2], f[len(f) // 2:]) for f in frames]
    reads = [halves[0][0]] + [halves[i][1] + halves[i + 1][0] for i in range(len(frames) - 1)] + [halves[-1][1]]
    answered = 0
    for chunk in reads:
        c.feed(chunk)
        while answered < len(c.handler.calls):
            c.answer(answered, ack(f"C{answered}"))
            answered += 1
        c.clock.advance(3.0)  # each frame takes 3 s; the whole stream 21 s
        assert not c.closed, f"closed at {c.clock.seconds()} s"
    assert c.handler.payloads == [message(f"C{i}") for i in range(len(frames))]


def test_oversize_frame_is_refused_from_its_prefix_then_closed():
    """Past max_frame_size the handler gets the prefix, its answer is written, then the connection closes."""
    c = Connection(max_frame_size=100)
    big = message("BIG") + b"OBX|1|TX|||" + b"A" * 400 + b"\r"
    with capturedLogs() as events:
        c.feed(VT + big[:60])
        c.feed(big[60:200])
    assert [call["kind"] for call in c.handler.calls] == ["too_large"]
    call = c.handler.calls[0]
    assert call["payload"] == big[:100]
    assert call["limit"] == 100 and call["size"] > 100
    assert any("exceeds" in e.get("log_format", "") for e in events)
    assert not c.closed and c.written == b""
    c.feed(big[200:] + FS + CR + frame(message("AFTER")))  # the rest is never a new frame
    assert len(c.handler.calls) == 1
    c.answer(0, b"MSA|AR|BIG\r")
    assert c.written == frame(b"MSA|AR|BIG\r")
    assert c.closed


def test_oversize_frame_waits_for_the_frame_before_it():
    """An oversize frame behind a normal one is refused only after the normal one is answered, in order."""
    c = Connection(max_frame_size=100)
    c.feed(frame(message("C1")[:90]) + VT + b"MSH|" + b"Z" * 200)
    assert [call["kind"] for call in c.handler.calls] == ["frame"]
    c.answer(0, b"ONE")
    assert [call["kind"] for call in c.handler.calls] == ["frame", "too_large"]
    assert not c.closed
    c.answer(1, b"TWO")
    assert c.written == frame(b"ONE") + frame(b"TWO") and c.closed


def test_commit_blocks_precede_the_ack_and_nak_when_not_stored():
    """With commit_blocks, a stored answer is preceded by the release-2 ACK block, an unstored one by the NAK block."""
    c = Connection(commit_blocks=True)
    c.feed(frame(message("C1")) + frame(message("C2")) + frame(message("C3")))
    c.answer(0, ack("C1"), stored=True)
    c.answer(1, b"MSA|AE|C2\r", stored=False)
    c.answer(2, None, stored=True)  # no HL7 answer due: the commit block alone
    assert c.written == (COMMIT_ACK_BLOCK + frame(ack("C1")) + COMMIT_NAK_BLOCK + frame(b"MSA|AE|C2\r")
                         + COMMIT_ACK_BLOCK)


def test_no_commit_blocks_by_default():
    """Without commit_blocks only the HL7 answer is written, and no answer at all when none is due."""
    c = Connection()
    c.feed(frame(message("C1")) + frame(message("C2")))
    c.answer(0, None)
    c.answer(1, ack("C2"))
    assert c.written == frame(ack("C2"))


def test_incoming_commit_blocks_are_not_messages():
    """A peer's release-2 commit blocks (ACK/NAK payloads) never reach the handler."""
    c = Connection()
    c.feed(COMMIT_ACK_BLOCK + COMMIT_NAK_BLOCK + frame(message("C1")))
    assert c.handler.payloads == [message("C1")]


def test_reading_pauses_when_too_many_frames_wait_and_resumes_when_drained():
    """With PIPELINE_LIMIT frames waiting behind the one in flight reading pauses, and resumes once all are answered."""
    assert PIPELINE_LIMIT == 16
    c = Connection()
    c.feed(b"".join(frame(message(f"C{i}")) for i in range(PIPELINE_LIMIT)))
    assert c.transport.producerState == "producing"  # 1 in flight, 15 waiting
    c.feed(frame(message(f"C{PIPELINE_LIMIT}")))
    assert c.transport.producerState == "paused"
    for i in range(PIPELINE_LIMIT):
        c.answer(i, ack(f"C{i}"))
        assert c.transport.producerState == "paused", f"resumed after {i + 1} answers"
    c.answer(PIPELINE_LIMIT, ack(f"C{PIPELINE_LIMIT}"))
    assert c.transport.producerState == "producing"
    assert c.written == b"".join(frame(ack(f"C{i}")) for i in range(PIPELINE_LIMIT + 1))


def test_answer_after_disconnect_is_dropped():
    """An answer that comes back after the client left is not written and raises nothing; waiting frames are dropped."""
    c = Connection()
    c.feed(frame(message("C1")) + frame(message("C2")))
    c.protocol.connectionLost(Failure(ConnectionDone()))
    c.answer(0, ack("C1"))
    assert c.written == b""
    assert c.handler.payloads == [message("C1")]  # C2 never handled
    assert c.clock.getDelayedCalls() == []  # no idle or frame timer left behind


def test_disconnect_mid_frame_is_logged_and_cancels_the_deadline():
    """A client leaving in the middle of a frame hands nothing to the handler and leaves no timer running."""
    c = Connection(frame_timeout=5.0)
    with capturedLogs() as events:
        c.feed(VT + message("C1")[:20])
        c.protocol.connectionLost(Failure(ConnectionDone()))
    assert c.handler.calls == []
    assert c.clock.getDelayedCalls() == []
    assert any("middle of a frame" in e.get("log_format", "") for e in events)


@pytest.mark.parametrize("host, accepted", [("10.1.2.3", True), ("192.168.1.5", False)])
def test_allow_list(host, accepted):
    """An address inside the allowed ranges gets the MLLP protocol; one outside a protocol that
    closes the connection as soon as it is made (not None, which a TLS listener would wrap)."""
    factory = MllpServerFactory(FakeHandler(), MllpSettings("mllp-test"), Clock(),
                                source_filter(("10.0.0.0/8",)))
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 5000))
    if accepted:
        assert isinstance(protocol, MllpServerProtocol) and protocol.factory is factory
    else:
        assert protocol is not None and not isinstance(protocol, MllpServerProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        assert transport.disconnecting and transport.value() == b""

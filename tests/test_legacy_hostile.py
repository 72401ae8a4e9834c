"""Hostile and faulty inputs of the legacy formats: ASTM E1381 links that misbehave (no EOT,
EOT or ENQ inside a frame, records without CR, a connection lost after the last frame),
v2 XML that numbers its fields absurdly, and format detection of UTF-16 XML and CR-only CSV."""
from __future__ import annotations

import time
import tracemalloc

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from adapters.astm.framing import (ACK, ENQ, EOT, NAK, STX, AstmReceiver, FrameAccepted,
                                   MessageReceived, State, TransferAborted, frame, frames)
from adapters.astm.protocol import AstmServerFactory, AstmSettings
from gateway.translation.inputs import InputError, detect_format, read_input
from test_astm_framing import feed, of
from test_astm_listener import over_tcp_into_a_store

MESSAGE = (b"H|\\^&|||XN-550^1|||||LIS|P|1\rP|1|PAT-1||BK123456|EL ALAOUI^Fatima\r"
           b"O|1|SID-1||^^^GLU|R\rR|1|^^^GLU^Glycemie|1.05|g/L|0.70-1.10|N||F\rL|1|N\r")


# -- ASTM E1381: the link ----------------------------------------------------------------------

def test_a_sender_that_never_ends_with_eot_does_not_leave_the_link_deaf():
    """After a receiver interrupt (or six failed frames) the receiver waits for EOT; an analyzer
    that never sends it must not have its every later ENQ ignored: after receive_timeout the
    receiver is neutral again and the next ENQ is answered."""
    receiver = AstmReceiver(max_message_size=20)
    feed(receiver, ENQ, frame(1, b"H|\\^&\r"), frame(2, b"P|1|" + b"x" * 30 + b"\r"), now=0.0)
    assert receiver.state is State.DRAINING and receiver.data_to_send().endswith(EOT)
    assert receiver.deadline is not None and receiver.deadline <= 30.0
    assert receiver.check_timeout(receiver.deadline) == []  # already reported: no second abort
    assert receiver.state is State.NEUTRAL
    feed(receiver, ENQ, now=40.0)
    assert receiver.data_to_send() == ACK

    receiver = AstmReceiver()
    bad = STX + b"1H|\r\x03ZZ\r\n"
    feed(receiver, ENQ, *[bad] * 6, now=0.0)
    assert receiver.state is State.DRAINING
    receiver.data_to_send()
    assert receiver.check_timeout(30.0) == [] and receiver.state is State.NEUTRAL
    feed(receiver, ENQ, now=31.0)
    assert receiver.data_to_send() == ACK


def test_an_analyzer_without_eot_is_answered_again_over_the_listener():
    """The same through the Twisted protocol and its clock: an analyzer that keeps sending ENQ
    (so the idle timeout never closes the connection) is answered once receive_timeout passed."""
    clock = Clock()
    handler = _Recording()
    factory = AstmServerFactory(handler, AstmSettings("astm-test", "100234", max_message_size=20), clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(ENQ + frame(1, b"H|\\^&\r") + frame(2, b"P|1|" + b"x" * 30 + b"\r"))
    assert transport.value().endswith(EOT)
    answers = b""
    for _ in range(6):  # the analyzer retries its ENQ every 10 s and never sends EOT
        clock.advance(10)
        transport.clear()
        protocol.dataReceived(ENQ)
        answers += transport.value()
    assert ACK in answers


class _Recording:
    def __init__(self):
        self.messages = []

    def message_received(self, data, connection, done):
        self.messages.append(data)
        done(True)


def test_eot_inside_a_frame_aborts_the_transfer_and_the_next_enq_is_answered():
    """The sender gave up in the middle of a frame (EOT before ETX): the transfer is aborted at
    once, as documented, and the sender's next ENQ starts a new transfer (not swallowed as
    frame text, which left the analyzer unanswered and its next frame NAKed)."""
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, STX + b"1H|\\^&|part", EOT)
    (aborted,) = of(events, TransferAborted)
    assert "EOT" in aborted.reason and receiver.state is State.NEUTRAL
    receiver.data_to_send()
    events = feed(receiver, ENQ, *frames(MESSAGE), EOT)
    assert [event.data for event in of(events, MessageReceived)] == [MESSAGE]
    assert receiver.data_to_send() == ACK * 6


def test_enq_inside_a_frame_restarts_the_transfer():
    """An ENQ before the frame's end means the sender started over: answered ACK at once."""
    receiver = AstmReceiver()
    feed(receiver, ENQ, STX + b"1H|\\^&|part")
    receiver.data_to_send()
    events = feed(receiver, ENQ)
    assert of(events, TransferAborted) and receiver.data_to_send() == ACK
    events = feed(receiver, *frames(MESSAGE), EOT)
    assert [event.data for event in of(events, MessageReceived)] == [MESSAGE]


def test_a_record_whose_frame_ends_without_cr_is_still_one_record():
    """ETX ends a record: an analyzer that leaves out the record's CR before ETX must not have
    its records glued together (the R records of two results merged into one, L lost)."""
    records = [b"H|\\^&|||XN-550", b"P|1|PAT-1", b"O|1|SID-1||^^^GLU", b"R|1|^^^GLU|1.05|g/L",
               b"R|2|^^^CRP|3|mg/L", b"L|1|N"]
    receiver = AstmReceiver()
    parts = [frame(number % 8, record) for number, record in enumerate(records, 1)]
    events = feed(receiver, ENQ, *parts, EOT)
    (message,) = of(events, MessageReceived)
    assert message.data == b"\r".join(records) + b"\r"
    parsed = read_input(message.data, format="astm")
    assert [segment.name for segment in parsed.message.segments] == ["H", "P", "O", "R", "R", "L"]
    assert parsed.message.value("R", 4) == "1.05"
    # A record split over ETB frames gets its CR after the ETX part only.
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, frame(1, b"H|\\^&", final=True), frame(2, b"R|1|^^^GL", final=False),
                  frame(3, b"U|5", final=True), frame(4, b"L|1\r"), EOT)
    assert of(events, MessageReceived)[0].data == b"H|\\^&\rR|1|^^^GLU|5\rL|1\r"


def test_whole_messages_are_kept_when_the_transfer_ends_without_eot():
    """E1381 discards only the incomplete message when the transfer is given up (timeout, ENQ
    restart, EOT mid-record, six failures): the messages before it, through their L record,
    were acknowledged frame by frame and are delivered; the incomplete rest is reported."""
    second = MESSAGE.replace(b"PAT-1", b"PAT-2")
    # All frames acknowledged, then silence: the whole message is delivered at the timeout.
    receiver = AstmReceiver()
    feed(receiver, ENQ, *frames(MESSAGE), now=0.0)
    events = receiver.check_timeout(30.0)
    assert [event.data for event in of(events, MessageReceived)] == [MESSAGE]
    assert of(events, TransferAborted)[0].size == 0 and receiver.state is State.NEUTRAL
    # One whole message, then the sender gives up in the middle of the second's P record.
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, *frames(MESSAGE), frame(6, b"H|\\^&\r"),
                  frame(7, b"P|1|PA", final=False), EOT)
    assert [event.data for event in of(events, MessageReceived)] == [MESSAGE]
    (aborted,) = of(events, TransferAborted)
    assert "inside a record" in aborted.reason and aborted.size == 12
    # The sender restarts (ENQ) after a whole message: kept; while it is being stored the ENQ
    # is answered NAK (as when busy), and the sender's next ENQ starts the new transfer.
    receiver = AstmReceiver()
    events = feed(receiver, ENQ, *frames(MESSAGE), ENQ)
    assert [event.data for event in of(events, MessageReceived)] == [MESSAGE]
    assert receiver.data_to_send() == ACK * 6 + NAK
    events = feed(receiver, ENQ, *frames(second), EOT)
    assert [event.data for event in of(events, MessageReceived)] == [second]
    # Nothing whole: nothing delivered.
    receiver = AstmReceiver()
    feed(receiver, ENQ, *frames(MESSAGE)[:4], now=0.0)
    events = receiver.check_timeout(30.0)
    assert not of(events, MessageReceived) and of(events, TransferAborted)[0].size > 0


def test_a_connection_lost_after_the_last_frame_keeps_the_message():
    """The analyzer's frames are all acknowledged, then the connection drops before its EOT:
    the message is delivered (the analyzer counts it as sent), not silently forgotten."""
    handler, clock = _Recording(), Clock()
    factory = AstmServerFactory(handler, AstmSettings("astm-test", "100234"), clock)
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(ENQ + b"".join(frames(MESSAGE)))
    protocol.connectionLost(None)
    assert handler.messages == [MESSAGE]
    assert not clock.getDelayedCalls()


@pytest_twisted.inlineCallbacks
def test_real_socket_closed_before_eot_stores_the_message(db_url):
    """Over TCP into a real store: every frame ACKed, the socket closed before EOT; the message
    is stored once, raw."""
    answers, rows = yield over_tcp_into_a_store(db_url, MESSAGE, 1, eot=False)
    assert answers == ACK * 6
    assert [(bytes(row.raw), row.format) for row in rows] == [(MESSAGE, "astm")]


def test_tiny_frames_cost_no_more_memory_than_their_text():
    """A sender cutting its records into tiny (or empty) ETB frames: each frame was kept as its
    own object (some 40 bytes each for two bytes of text), so the 16 MiB message limit let one
    connection hold several hundred MB; what is kept now costs what it holds."""
    receiver = AstmReceiver()
    chunk = b"".join(frame(number % 8, b"xy" if number % 2 else b"", final=False)
                     for number in range(1, 100_001))
    receiver.receive_data(ENQ, 0.0)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        accepted = len(of(receiver.receive_data(chunk, 0.0), FrameAccepted))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert accepted == 100_000
    assert grown < 1_000_000, grown  # 100,000 bytes of text kept


# -- HL7 v2 XML --------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"<PID><PID.999999999>x</PID.999999999></PID>",
    b"<PID><PID.3><CX.999999999>x</CX.999999999></PID.3></PID>",
    b"<PID><PID.3><CX.4><HD.999999999>x</HD.999999999></CX.4></PID.3></PID>",
    b"<PID><PID." + b"9" * 5000 + b">x</PID." + b"9" * 5000 + b"></PID>",  # int() refuses these
    b"<PID><PID.3><CX." + b"9" * 5000 + b">x</CX." + b"9" * 5000 + b"></PID.3></PID>",
])
def test_absurd_field_and_component_numbers_are_refused_not_allocated(body):
    """A 100-byte document naming field 999999999 made a list of a billion fields (gigabytes,
    then MemoryError out of the translator); it is an input error naming the element."""
    data = (b"<ADT_A01><MSH><MSH.9><MSG.1>ADT</MSG.1><MSG.2>A01</MSG.2></MSH.9></MSH>" + body +
            b"</ADT_A01>")
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        read_input(data)
    assert time.monotonic() - started < 1.0
    assert "999999999" in caught.value.reason and caught.value.format == "hl7v2-xml"
    assert "numbered from 1 to 1000" in caught.value.reason and caught.value.location.startswith("line ")


def test_a_superscript_digit_in_an_element_name_is_no_field_number():
    """'PID.\u2075' is a valid XML name whose last character isdigit() but int() refuses: it is
    not a field (skipped), never a ValueError out of the reader."""
    data = ("<ADT_A01><MSH><MSH.9><MSG.1>ADT</MSG.1><MSG.2>A01</MSG.2></MSH.9></MSH>"
            "<PID><PID.\u2075>x</PID.\u2075><PID.3>77</PID.3></PID></ADT_A01>").encode()
    assert read_input(data).message.value("PID", 3) == "77"


def test_high_but_plausible_field_numbers_still_read():
    """Z segments with many fields and long data types stay readable."""
    data = (b"<ADT_A01><MSH><MSH.9><MSG.1>ADT</MSG.1><MSG.2>A01</MSG.2></MSH.9></MSH>"
            b"<ZPD><ZPD.250><XX.40>z</XX.40></ZPD.250></ZPD></ADT_A01>")
    assert read_input(data).message.value("ZPD", 250, 40) == "z"


@pytest.mark.parametrize("repeated", [
    b"<ZZZ><ZZZ.1000/></ZZZ>",  # a thousand fields from 22 bytes
    b"<ZZZ><ZZZ.1><X.1000><Y.1000/></X.1000></ZZZ.1></ZZZ>",  # two thousand joins
])
def test_sparse_high_numbers_cannot_multiply_the_document(repeated):
    """Each number below the limit, but together: 20,000 such segments (440 KB) became 166 MB
    of fields in 1.75 s (a 16 MB document: gigabytes), and 1,000 such components (41 KB) took
    1.5 s. A document numbering more fields and components than it has bytes is refused."""
    data = (b"<ADT_A01><MSH><MSH.9><MSG.1>ADT</MSG.1><MSG.2>A01</MSG.2></MSH.9></MSH>" +
            repeated * 20_000 + b"</ADT_A01>")
    started = time.monotonic()
    with pytest.raises(InputError) as caught:
        read_input(data)
    assert time.monotonic() - started < 1.0
    assert "more fields and components than it has bytes" in caught.value.reason
    assert caught.value.location.startswith("line ")


# -- Format detection --------------------------------------------------------------------------

def test_utf16_xml_with_its_byte_order_mark_is_v2_xml():
    """UTF-16 XML begins with a byte order mark (as the XML specification requires): it is
    v2 XML, read with its declared encoding, not 'unrecognised input'."""
    xml = ('<?xml version="1.0" encoding="UTF-16"?>\r\n<ADT_A01><MSH><MSH.9><MSG.1>ADT</MSG.1>'
           '<MSG.2>A01</MSG.2></MSH.9><MSH.10>C1</MSH.10></MSH>'
           '<PID><PID.5><XPN.1>بناني</XPN.1></PID.5></PID></ADT_A01>')
    for data in (xml.encode("utf-16"), b"\xfe\xff" + xml.encode("utf-16-be")):
        assert detect_format(data) == "hl7v2-xml"
        parsed = read_input(data)
        assert parsed.message_type == "ADT^A01" and parsed.message.value("PID", 5) == "بناني"


def test_csv_with_cr_line_ends_is_csv():
    """Exports with CR line ends (old Mac spreadsheets) are CSV, as with LF and CRLF, and their
    delimiter is sniffed from the header alone: the decimal commas of a French ';' export's
    rows (more numerous than its semicolons) must not make ',' the delimiter."""
    data = b"quantity;unit_price;total\r2,5;1,50;3,75\r1,5;2,25;3,38\r"
    assert detect_format(data) == "csv"
    parsed = read_input(data, csv_profiles={})
    assert [segment.fields for segment in parsed.message.segments] == \
        [["ROW", "2,5", "1,50", "3,75"], ["ROW", "1,5", "2,25", "3,38"]]


def test_detection_of_ambiguous_starts_is_unchanged():
    """Empty, blank, a BOM alone, or a CR inside a header line that is not CSV: unrecognised."""
    for data in (b"", b" \r\n\t", b"\xef\xbb\xbf", b"\xff\xfe", b"just words\rmore words\r"):
        assert detect_format(data) == ""
        with pytest.raises(InputError, match="unrecognised input"):
            read_input(data)

"""ASTM listener: the Twisted protocol (StringTransport, Clock), its configuration, and a real
socket into a real store."""
from __future__ import annotations

import json
import socket
import time

import pytest
import pytest_twisted
from sqlalchemy import text
from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport

from adapters.astm.framing import ACK, ENQ, EOT, NAK, frames
from adapters.astm.protocol import AstmServerFactory, AstmSettings
from gateway.config import AstmListenerConfig, ConfigError, load_config
from gateway.ingest.astm import astm_listener_factory, inbound_for
from gateway.store.database import create_gateway_engine, migrate
from gateway.store.ingest_writer import IngestWriter

MESSAGE = (b"H|\\^&|||XN-550^1|||||LIS|P|1\rP|1|PAT-1||BK123456|EL ALAOUI^Fatima\r"
           b"O|1|SID-1||^^^GLU|R\rR|1|^^^GLU^Glycemie|1.05|g/L|0.70-1.10|N||F\rL|1|N\r")


class RecordingHandler:
    def __init__(self):
        self.messages, self.pending = [], []

    def message_received(self, data, connection, done):
        self.messages.append((data, connection))
        self.pending.append(done)


def connect(handler, clock, **settings):
    factory = AstmServerFactory(handler, AstmSettings("astm-test", "100234", **settings), clock)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_protocol_acks_frames_and_hands_over_the_message():
    """ENQ, frames and EOT are answered ACK; the handler gets the message with the facility."""
    handler, clock = RecordingHandler(), Clock()
    protocol, transport = connect(handler, clock)
    protocol.dataReceived(ENQ + b"".join(frames(MESSAGE)) + EOT)
    assert transport.value() == ACK * 6
    ((data, connection),) = handler.messages
    assert data == MESSAGE and connection.facility == "100234" and connection.listener == "astm-test"


def test_enq_is_refused_while_the_previous_message_is_being_stored():
    """Until the store says done, a new ENQ gets NAK; afterwards ACK."""
    handler, clock = RecordingHandler(), Clock()
    protocol, transport = connect(handler, clock)
    protocol.dataReceived(ENQ + b"".join(frames(MESSAGE)) + EOT)
    transport.clear()
    protocol.dataReceived(ENQ)
    assert transport.value() == NAK
    handler.pending.pop()(True)
    transport.clear()
    protocol.dataReceived(ENQ)
    assert transport.value() == ACK


def test_a_silent_sender_is_timed_out_by_the_clock():
    """No frame 30 s after ENQ: the transfer is abandoned; the next ENQ starts afresh."""
    handler, clock = RecordingHandler(), Clock()
    protocol, transport = connect(handler, clock)
    parts = frames(MESSAGE)
    protocol.dataReceived(ENQ + parts[0])
    clock.advance(29)
    assert protocol.receiver.state.value == "receiving"
    clock.advance(1)
    assert protocol.receiver.state.value == "neutral"
    protocol.dataReceived(EOT)
    assert handler.messages == []
    protocol.dataReceived(ENQ + b"".join(parts) + EOT)
    assert handler.messages[0][0] == MESSAGE


def test_an_idle_connection_is_closed():
    """No byte for idle_timeout: the connection is closed."""
    protocol, transport = connect(RecordingHandler(), Clock(), idle_timeout=60)
    protocol.clock.advance(61)
    assert transport.disconnecting


def test_config_reads_astm_listeners_and_reports_every_problem(tmp_path):
    """listeners.astm entries load with their defaults; every mistake is reported at once:
    a missing facility, an unregistered one, a bad port, an unknown key, a clash with MLLP."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "facilities.yaml").write_text(
        'facilities:\n  - {id: "INPE-100002", name: Lab, type: laboratory}\n')
    base = ("database: {url: 'sqlite:///var/g.sqlite'}\n"
            "pki: {ca: c, cert: c, key: k}\nfacilities: conf/facilities.yaml\n")
    good = tmp_path / "conf" / "good.yaml"
    good.write_text(base + "listeners:\n  astm:\n    - {name: lab, port: 5000, facility: INPE-100002,"
                           " interface: 0.0.0.0, allow_sources: [10.0.0.0/8]}\n")
    (listener,) = load_config(str(good), {}).astm
    assert listener == AstmListenerConfig("lab", 5000, "INPE-100002", "0.0.0.0", ("10.0.0.0/8",))
    bad = tmp_path / "conf" / "bad.yaml"
    bad.write_text(base + "listeners:\n  mllp:\n    - {name: m, port: 2575}\n  astm:\n"
                          "    - {name: a, port: 70000}\n"
                          "    - {name: m, port: 2575, facility: INPE-100003, colour: 1}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(bad), {})
    problems = "\n".join(caught.value.problems)
    assert "listeners.astm[0].port" in problems and "70000" in problems
    assert "listeners.astm[0]: missing required key 'facility'" in problems or \
        "listeners.astm[0].facility" in problems
    assert "listeners.astm[1].colour" in problems
    bad.write_text(base + "listeners:\n  mllp:\n    - {name: m, port: 2575}\n  astm:\n"
                          "    - {name: m, port: 2575, facility: INPE-100003}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(bad), {})
    problems = "\n".join(caught.value.problems)
    assert "listeners.astm[0].name: 'm' is also another listener's name" in problems
    assert "listeners.astm[0].port: 2575 is also another listener's port" in problems
    assert "'INPE-100003' is not in the facility registry (did you mean 'INPE-100002'?)" in problems


def test_inbound_record_of_an_astm_message():
    """format astm, type ASTM, received, no ACK, keyed by analyzer, facility and hash."""
    item = inbound_for(MESSAGE, "100234")
    assert (item.format, item.message_type, item.status.value, item.ack) == ("astm", "ASTM", "received", None)
    assert item.sending_application == "XN-550" and item.sending_facility == "100234"
    assert item.control_id.startswith("sha256:") and item.raw == MESSAGE
    garbage = inbound_for(b"\x00junk", "100234")  # kept as received; translation reports it
    assert garbage.raw == b"\x00junk" and garbage.sending_application == ""


def test_ingest_reads_the_header_record_alone():
    """Ingest reads H-5 only, on the reactor thread: a transfer's results are not tokenized
    there (a 13 MB transfer of 400,000 R records took 1.6 s of the reactor, every connection
    waiting), and a message cut before its L record, or with a bad record after H, still gets
    its analyzer's name."""
    from adapters.astm import records

    cut = inbound_for(b"\r# comment\r1H|\\^&|||XN-550|||||||P|1\rR|1|^^^GLU|5.1", "100234")
    assert cut.sending_application == "XN-550"
    assert inbound_for(b"H|\\^&|||XN-550\r?|bad\rL|1\r", "100234").sending_application == "XN-550"
    header = records.parse_records("H|\\^&|||XN-550\rR|bad", header_only=True)
    assert [segment.name for segment in header.segments] == ["H"]


def _send_transfer(port: int, data: bytes, eot: bool = True) -> bytes:
    """ENQ, `data`'s frames (each answer read), then EOT unless `eot` is False (the connection
    is then closed without it); the answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        answers = b""
        sock.sendall(ENQ)
        answers += sock.recv(1)
        for part in frames(data):
            sock.sendall(part)
            answers += sock.recv(1)
        if eot:
            sock.sendall(EOT)
        return answers


@defer.inlineCallbacks
def over_tcp_into_a_store(db_url: str, data: bytes, count: int, eot: bool = True):
    """`data` sent as one transfer (`_send_transfer`) to an ASTM listener on a real store:
    (the answers, the rows of the `count` messages stored, raw with their record)."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    writer = IngestWriter(engine, reactor.callFromThread, lambda item: None)
    writer.start()
    config = AstmListenerConfig("astm-lab", 0, "100234")
    port = reactor.listenTCP(0, astm_listener_factory(config, writer, reactor), interface="127.0.0.1")
    try:
        answers = yield threads.deferToThread(_send_transfer, port.getHost().port, data, eot)
        rows = []
        deadline = time.monotonic() + 30
        while len(rows) < count and time.monotonic() < deadline:
            yield deferLater(reactor, 0.05, lambda: None)
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT raw, format, message_type, status, ack, sending_application, "
                    "sending_facility, sender_id, listener FROM messages "
                    "JOIN message_payloads ON message_id = id ORDER BY id")).all()
        return answers, rows
    finally:
        yield port.stopListening()
        writer.stop()
        engine.dispose()


@pytest_twisted.inlineCallbacks
def test_real_socket_into_a_real_store(db_url):
    """An analyzer's transfer over TCP is stored once per message, raw, as format astm."""
    second = MESSAGE.replace(b"PAT-1", b"PAT-2")
    answers, rows = yield over_tcp_into_a_store(db_url, MESSAGE + second, 2)
    assert answers == ACK * 11
    assert [bytes(row.raw) for row in rows] == [MESSAGE, second]
    for row in rows:
        assert (row.format, row.message_type, row.status, row.ack) == ("astm", "ASTM", "received", None)
        assert (row.sending_application, row.sending_facility, row.sender_id, row.listener) == \
            ("XN-550", "100234", "100234", "astm-lab")


ASTM_MAPPINGS = {
    "messages/ASTM.yaml": """\
        messages: [ASTM]
        resources:
          - name: patient
            from: P
            map: ASTM_P.Patient
        """,
    "segments/ASTM_P.Patient.yaml": """\
        resource: Patient
        map:
          identifier:
            - map: {value: {from: P-3.1}}
        """,
}


@pytest_twisted.inlineCallbacks
def test_gateway_astm_listener_stores_and_translates(db_url, make_config, running_gateway, tmp_path):
    """A gateway configured with listeners.astm takes an analyzer's transfer over TCP, stores it
    and translates it after the commit, like an MLLP message."""
    import dataclasses

    from translation_support import with_mappings, write_mappings

    directory = write_mappings(tmp_path / "mappings", ASTM_MAPPINGS)
    from gateway.config import SenderConfig

    laboratory = SenderConfig("INPE-100002", "Laboratoire Al Amal", "laboratory")
    config = dataclasses.replace(with_mappings(make_config(db_url, senders=[laboratory]), directory),
                                 astm=(AstmListenerConfig("astm-lab", 0, "INPE-100002"),))
    ports = yield running_gateway(config)
    answers = yield threads.deferToThread(_send_transfer, ports["astm-lab"], MESSAGE)
    assert answers == ACK * 6
    engine = create_gateway_engine(db_url)
    try:
        row = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            yield deferLater(reactor, 0.05, lambda: None)
            with engine.connect() as conn:
                row = conn.execute(text(
                    "SELECT m.status, m.listener, t.bundle FROM messages m "
                    "LEFT JOIN canonical_bundles t ON t.message_id = m.id")).first()
            if row is not None and row.status != "received":
                break
        assert row is not None and (row.status, row.listener) == ("translated", "astm-lab")
        bundle = json.loads(row.bundle)
        (patient,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]
        assert patient["identifier"] == [{"value": "PAT-1"}]
    finally:
        engine.dispose()

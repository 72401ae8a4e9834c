"""IHE ATNA export: the audit message XML and its syslog frame (pure), and the export to a
real TLS syslog collector started in the test with the dev PKI: records arrive in seq order,
frames parse, the XML has the right fields; a collector down then up gets everything without
gaps or duplicates; on PostgreSQL two nodes exporting to one collector send each record once."""
from __future__ import annotations

import base64
import dataclasses
import os
import re
import time
from datetime import datetime, timezone

import pytest
import pytest_twisted
from lxml import etree
from sqlalchemy import select, text
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory, Protocol

from gateway.audit import atna
from gateway.audit.chain import AuditEvent, chain
from gateway.audit.export import AuditExportService
from gateway.audit.trail import AuditTrail
from gateway.config import AuditConfig, AuditExportConfig
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.store.schema import audit_exports
from gateway.tls import server_tls_options

T0 = datetime(2026, 11, 22, 9, 30, 1, 250000, tzinfo=timezone.utc)


def record(action="message.received", outcome="success", **changes):
    event = AuditEvent(action, changes.pop("actor", "INPE-100001"), outcome,
                       changes.pop("subject", "message/42"), changes.pop("source", "10.20.0.5:40000"),
                       changes.pop("detail", {"control_id": "B00000000042", "message_type": "ORU^R01",
                                              "size": 1800}), T0)
    return chain(6, "a" * 64, "node-1", [event], T0)[0]


def parsed(xml: bytes):
    return etree.fromstring(xml)


def details(element) -> dict[str, str]:
    return {d.get("type"): base64.b64decode(d.get("value")).decode("utf-8")
            for d in element.iter("ParticipantObjectDetail")}


SOURCE = atna.Source("MA-HIE", "MA")


def test_a_receipt_becomes_an_import_audit_message():
    root = parsed(atna.audit_message(record(), SOURCE))
    assert root.tag == "AuditMessage"
    assert [child.tag for child in root] == ["EventIdentification", "ActiveParticipant",
                                             "ActiveParticipant", "AuditSourceIdentification",
                                             "ParticipantObjectIdentification",
                                             "ParticipantObjectIdentification"]
    event = root.find("EventIdentification")
    assert event.get("EventActionCode") == "C" and event.get("EventOutcomeIndicator") == "0"
    assert event.get("EventDateTime") == "2026-11-22T09:30:01.250000Z"
    assert event.find("EventID").attrib == {"csd-code": "110107", "codeSystemName": "DCM",
                                            "originalText": "Import"}
    actor, node = root.findall("ActiveParticipant")
    assert actor.get("UserID") == "INPE-100001" and actor.get("UserIsRequestor") == "true"
    assert actor.get("NetworkAccessPointID") == "10.20.0.5"
    assert actor.get("NetworkAccessPointTypeCode") == "2"
    assert actor.find("RoleIDCode").get("csd-code") == "110153"  # source
    assert node.get("UserID") == "node-1" and node.find("RoleIDCode").get("csd-code") == "110152"
    source = root.find("AuditSourceIdentification")
    assert (source.get("AuditSourceID"), source.get("AuditEnterpriseSiteID")) == ("MA-HIE", "MA")
    subject, trail = root.findall("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == "message/42"
    assert subject.get("ParticipantObjectTypeCode") == "2"
    assert details(subject) == {"MSH-10": "B00000000042", "message_type": "ORU^R01"}
    assert trail.get("ParticipantObjectID") == "audit/7"
    assert details(trail) == {"seq": "7", "hash": record().hash, "prev_hash": "a" * 64}


@pytest.mark.parametrize("action, outcome, event_id, action_code, indicator, severity", [
    ("message.read", "success", "110110", "R", "0", 5),
    ("message.refused", "refused", "110107", "C", "4", 4),
    ("delivery.attempted", "failure", "110106", "R", "8", 3),
    ("console.login", "refused", "110114", "E", "4", 4),
    ("tls.handshake_failed", "failure", "110113", "E", "8", 3),
    ("prescription.read", "success", "110109", "R", "0", 5),
])
def test_actions_and_outcomes_map_to_dicom_codes_and_syslog_severity(
        action, outcome, event_id, action_code, indicator, severity):
    message = atna.syslog_message(record(action, outcome, detail={"reason": "unknown facility"}),
                                  SOURCE, "gw1.sante.ma")
    header, xml = message.split(b" <?xml", 1)
    assert header.decode() == f"<{10 * 8 + severity}>1 2026-11-22T09:30:01.250000Z gw1.sante.ma " \
                              f"ma-hie-gateway node-1 IHE+RFC-3881 -"
    event = parsed(b"<?xml" + xml).find("EventIdentification")
    assert event.find("EventID").get("csd-code") == event_id
    assert event.get("EventActionCode") == action_code
    assert event.get("EventOutcomeIndicator") == indicator
    if outcome != "success":
        assert event.findtext("EventOutcomeDescription") == "unknown facility"


def test_nothing_but_ids_travels_and_hostile_text_stays_well_formed():
    hostile = record("message.read", actor="console:a\x01<b>&\"c", subject="message/1",
                     source="[2001:db8::1]:443", detail={"control_id": "C\x02&<>"})
    root = parsed(atna.audit_message(hostile, SOURCE))
    assert root.find("ActiveParticipant").get("UserID") == "console:a<b>&\"c"
    assert root.find("ActiveParticipant").get("NetworkAccessPointID") == "2001:db8::1"
    assert details(root.find("ParticipantObjectIdentification"))["MSH-10"] == "C&<>"


@pytest.mark.parametrize("source, address", [
    ("::1:40000", "::1"),
    ("::1:5000", "::1"),
    ("2001:db8::5:443", "2001:db8::5"),
    ("::ffff:10.20.0.5:40000", "::ffff:10.20.0.5"),
    ("10.20.0.5:40000", "10.20.0.5"),
])
def test_an_ipv6_peer_as_the_gateway_writes_it_is_sent_without_its_port(source, address):
    """Doors and console write a peer as f"{host}:{port}", an IPv6 host unbracketed: it was
    sent whole, port included, as a machine name, or as another IP address when the port has
    four digits or fewer (::1:5000 is a valid IPv6 address)."""
    actor = parsed(atna.audit_message(record(source=source), SOURCE)).find("ActiveParticipant")
    assert actor.get("NetworkAccessPointID") == address
    assert actor.get("NetworkAccessPointTypeCode") == "2"


def test_text_xml_cannot_carry_is_dropped_from_every_value():
    """U+FFFE, U+FFFF and control characters (a facility's MSH-4, a login name typed at the
    console) are not XML characters: lxml refused the whole message, and the export tried that
    record again forever, sending nothing after it."""
    odd = "\ufffe\uffff\x01\x1b"
    hostile = record("delivery.attempted", "failure", actor=f"INPE{odd}-1", subject=f"message/{odd}1",
                     source=f"host{odd}.ma:2575", detail={"reason": f"peer{odd} down",
                                                           "destination": f"cnss{odd}",
                                                           "control_id": f"C{odd}1"})
    root = parsed(atna.syslog_message(hostile, SOURCE, "gw1").split(b" ", 7)[7])
    actor = root.find("ActiveParticipant")
    assert actor.get("UserID") == "INPE-1" and actor.get("NetworkAccessPointID") == "host.ma"
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "peer down"
    assert root.findall("ActiveParticipant")[2].get("UserID") == "cnss"
    subject = root.find("ParticipantObjectIdentification")
    assert subject.get("ParticipantObjectID") == "message/1"
    assert details(subject) == {"MSH-10": "C1", "destination": "cnss"}
    assert parsed(atna.audit_message(record(actor="\U0001F600 \ud7ff \ue000 \ufffd"), SOURCE)).find(
        "ActiveParticipant").get("UserID") == "\U0001F600 \ud7ff \ue000 \ufffd"  # XML characters stay


def test_an_action_xml_cannot_carry_is_dropped_too():
    """An action altered in the database (verify names the record) made lxml refuse the
    message: the export tried that record again forever, sending nothing after it."""
    altered = dataclasses.replace(record(), action="message.received\x01\ufffe")
    code = parsed(atna.audit_message(altered, SOURCE)).find("EventIdentification/EventTypeCode")
    assert (code.get("csd-code"), code.get("originalText")) == ("message.received",) * 2


def test_frames_are_octet_counted_and_parse_back_whole_or_in_pieces():
    messages = [atna.syslog_message(record(subject=f"message/{n}", detail={"control_id": "é" * n}),
                                    SOURCE, "gw1") for n in range(1, 4)]
    stream = b"".join(atna.frame(m) for m in messages)
    assert stream.startswith(b"%d <85>1 " % len(messages[0]))
    assert atna.parse_frames(stream) == (messages, b"")
    got, rest = [], b""
    for n in range(0, len(stream), 7):
        frames, rest = atna.parse_frames(rest + stream[n:n + 7])
        got += frames
    assert got == messages and rest == b""
    with pytest.raises(ValueError):
        atna.parse_frames(b"<85>1 no length")


# -- a real collector ----------------------------------------------------------------------


class Collector:
    """A TLS syslog collector (RFC 5425) with the sandbox record's certificate, requiring a
    client certificate from the dev CA; keeps the messages it parsed."""

    def __init__(self, dev_pki: str, port: int = 0):
        self.messages: list[bytes] = []
        self.connections: list = []
        self.options = server_tls_options(os.path.join(dev_pki, "sandbox-record.crt"),
                                          os.path.join(dev_pki, "sandbox-record.key"),
                                          os.path.join(dev_pki, "ca.crt"))
        self.listening = reactor.listenSSL(port, Factory.forProtocol(lambda: _Receiver(self)),
                                           self.options, interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def seqs(self) -> list[int]:
        return [int(re.search(rb'ParticipantObjectID="audit/(\d+)"', m).group(1)) for m in self.messages]

    def stop(self):
        for connection in list(self.connections):
            connection.transport.abortConnection()
        return self.listening.stopListening()


class _Receiver(Protocol):
    def __init__(self, collector: Collector):
        self.collector = collector
        self.buffer = b""

    def connectionMade(self):
        self.collector.connections.append(self)

    def connectionLost(self, reason=None):
        self.collector.connections.remove(self)

    def dataReceived(self, data):
        frames, self.buffer = atna.parse_frames(self.buffer + data)
        self.collector.messages.extend(frames)


def until(condition, timeout: float = 20.0):
    @defer.inlineCallbacks
    def wait():
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            yield task.deferLater(reactor, 0.05, lambda: None)
    return wait()


def events(count: int, first: int):
    return [AuditEvent("message.received", "INPE-100001", subject=f"message/{n}",
                       source="127.0.0.1:5000", detail={"control_id": f"C{n}"})
            for n in range(first, first + count)]


@pytest.fixture
def exporting(db_url, make_config, dev_pki):
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, reactor)
    database.start()
    started = []

    def start(port: int, node: str = "node-1"):
        config = dataclasses.replace(make_config(db_url), audit=AuditConfig(
            export=AuditExportConfig(host="127.0.0.1", port=port, source_id="MA-HIE-TEST")))
        service = AuditExportService(config, AuditTrail(engine, node), database, batch=16,
                                     poll_interval=0.05, settle=0.2, claim_interval=0.2,
                                     hostname="gw-test")
        service.startService()
        started.append(service)
        return service

    yield start, AuditTrail(engine, "node-1"), engine
    for service in started:
        pytest_twisted.blockon(service.stopService())
    database.stop()


def last_seq(engine) -> int | None:
    with engine.connect() as conn:
        return conn.execute(select(audit_exports.c.last_seq)).scalar()


@pytest_twisted.inlineCallbacks
def test_a_collector_down_then_up_gets_everything_once_in_order(exporting, dev_pki):
    start, trail, engine = exporting
    collector = Collector(dev_pki)
    trail.append(events(40, 1))  # more than two batches
    service = start(collector.port)
    yield until(lambda: len(collector.messages) >= 40)
    assert collector.seqs() == list(range(1, 41))
    header, xml = collector.messages[0].split(b" <?xml", 1)
    assert header.startswith(b"<85>1 ") and header.endswith(b" gw-test ma-hie-gateway node-1 IHE+RFC-3881 -")
    root = etree.fromstring(b"<?xml" + xml)
    assert root.find("EventIdentification/EventID").get("csd-code") == "110107"
    assert root.find("AuditSourceIdentification").get("AuditSourceID") == "MA-HIE-TEST"
    assert root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "message/1"
    yield until(lambda: last_seq(engine) == 40)  # confirmed once the connection stayed up

    yield collector.stop()  # the collector goes away; the trail goes on
    trail.append(events(25, 41))
    yield task.deferLater(reactor, 0.5, lambda: None)
    assert len(collector.messages) == 40 and last_seq(engine) == 40
    back = Collector(dev_pki, port=collector.port)
    yield until(lambda: len(back.messages) >= 25)
    yield task.deferLater(reactor, 0.3, lambda: None)
    assert back.seqs() == list(range(41, 66))  # no gap, no repeat
    yield until(lambda: last_seq(engine) == 65)
    assert service.sent == 65 and service.skipped == 0
    yield back.stop()


class _Stalled(_Receiver):
    """A collector that reads its first bytes, then nothing more from its socket (hung, or
    far slower than the gateway)."""

    def dataReceived(self, data):
        super().dataReceived(data)
        self.transport.transport.pauseProducing()  # the TCP socket under TLS


@defer.inlineCallbacks
def stalled_collector(dev_pki):
    collector = Collector(dev_pki)
    yield collector.listening.stopListening()
    collector.listening = reactor.listenSSL(0, Factory.forProtocol(lambda: _Stalled(collector)),
                                            collector.options, interface="127.0.0.1")
    return collector


@pytest_twisted.inlineCallbacks
def test_what_a_stalled_collector_never_read_is_sent_again_to_the_next(exporting, dev_pki):
    """Records written to a collector that stopped reading sit in the gateway's buffers (and
    its socket's send queue): they are not counted as sent, however long the connection stays
    up, so that when it goes the next connection sends them again. (They were counted after
    `settle` seconds: some 1,500 of these 2,000 records never reached any collector.)"""
    start, trail, engine = exporting
    stalled = yield stalled_collector(dev_pki)
    port = stalled.listening.getHost().port
    trail.append(events(2000, 1))
    service = start(port)
    try:
        yield until(lambda: service._protocol is not None and service._protocol.paused)
        yield task.deferLater(reactor, 1.5, lambda: None)  # several settle periods
        assert (last_seq(engine) or 0) <= len(stalled.messages) < service.sent
    finally:
        yield stalled.stop()
    yield task.deferLater(reactor, 0.3, lambda: None)
    back = Collector(dev_pki, port=port)
    yield until(lambda: set(stalled.seqs()) | set(back.seqs()) >= set(range(1, 2001)))
    yield until(lambda: last_seq(engine) == 2000)
    yield back.stop()


@pytest_twisted.inlineCallbacks
def test_a_collector_that_stopped_reading_is_left_after_the_stall_timeout(exporting, dev_pki,
                                                                          monkeypatch, caplog):
    """A collector that stopped reading (hung, its TCP still up) held the export on that
    connection for ever, without a word in the log: after STALL_TIMEOUT without progress the
    connection is dropped, logged, and tried again; what was not confirmed goes again."""
    from gateway.audit import export

    monkeypatch.setattr(export, "STALL_TIMEOUT", 1.0)
    start, trail, engine = exporting
    stalled = yield stalled_collector(dev_pki)
    trail.append(events(2000, 1))
    caplog.set_level("WARNING", logger="gateway.audit.export")
    service = start(stalled.listening.getHost().port)
    try:
        yield until(lambda: service._protocol is not None and service._protocol.paused)
        first = service._protocol
        yield until(lambda: service._protocol is not first)  # (STALL_TIMEOUT itself: 120 s)
        assert "read nothing for 1 s: connection dropped" in caplog.text
    finally:
        yield stalled.stop()


@pytest_twisted.inlineCallbacks
def test_stopping_while_the_collector_reads_nothing_ends_after_the_grace(exporting, dev_pki,
                                                                         monkeypatch):
    """The TLS close waits for the collector's answer, behind what it has not read: a
    collector that reads nothing more held the export's stop, and with it the gateway's (the
    recorder's last flush and the database's close come after it), forever."""
    from gateway.audit import export

    monkeypatch.setattr(export, "STOP_GRACE", 0.5)
    start, trail, engine = exporting
    stalled = yield stalled_collector(dev_pki)
    trail.append(events(2000, 1))
    service = start(stalled.listening.getHost().port)
    stopped = []
    try:
        yield until(lambda: service._protocol is not None and service._protocol.paused)
        service.stopService().addBoth(stopped.append)
        yield until(lambda: stopped, timeout=5)
        assert stopped == [None] and not service.running
    finally:
        yield stalled.stop()


class _Mute(Protocol):
    """A TCP peer that accepts and then answers nothing (`opening`: only those bytes, the
    start of a TLS record, as a server that stops mid-handshake)."""

    def __init__(self, peer: "MutePeer"):
        self.peer = peer

    def connectionMade(self):
        self.peer.connections.append(self)
        if self.peer.opening:
            self.transport.write(self.peer.opening)

    def connectionLost(self, reason=None):
        self.peer.closed += 1


class MutePeer:
    def __init__(self, opening: bytes = b""):
        self.opening = opening
        self.connections: list[_Mute] = []
        self.closed = 0
        self.listening = reactor.listenTCP(0, Factory.forProtocol(lambda: _Mute(self)),
                                           interface="127.0.0.1")
        self.port = self.listening.getHost().port

    def stop(self):
        for connection in self.connections:
            connection.transport.abortConnection()
        return self.listening.stopListening()


@pytest.mark.parametrize("opening", [b"", b"\x16\x03\x03\x00\x7a\x02\x00"],
                         ids=["silent", "stops-mid-handshake"])
@pytest_twisted.inlineCallbacks
def test_a_collector_that_never_completes_the_handshake_is_left_and_tried_again(
        exporting, dev_pki, monkeypatch, caplog, opening):
    """A collector that accepts TCP and never answers the ClientHello (or stops in the middle
    of its answer) held the export on that connection for ever: connected as far as TCP goes,
    it was never retried, and nothing of the trail went anywhere."""
    from gateway.audit import export

    monkeypatch.setattr(export, "HANDSHAKE_TIMEOUT", 0.5)
    start, trail, engine = exporting
    peer = MutePeer(opening)
    trail.append(events(3, 1))
    caplog.set_level("WARNING", logger="gateway.audit.export")
    service = start(peer.port)
    try:
        # Dropped after the timeout, and a new connection tried (the backoff starts at 0.5 s).
        yield until(lambda: peer.closed >= 1 and len(peer.connections) >= 2, timeout=6)
        assert "TLS handshake not complete within 0.5 s" in caplog.text
        assert service._protocol is None and (last_seq(engine) or 0) == 0
        stopped = []
        service.stopService().addBoth(stopped.append)  # the stop is not held by it either
        yield until(lambda: stopped, timeout=3)
        assert stopped == [None]
    finally:
        yield peer.stop()
    # A real collector on the next try gets the whole trail.
    collector = Collector(dev_pki)
    start(collector.port)
    yield until(lambda: collector.seqs() == [1, 2, 3])
    yield collector.stop()


@pytest_twisted.inlineCallbacks
def test_a_record_with_text_xml_cannot_carry_does_not_stop_the_export(exporting, dev_pki):
    start, trail, engine = exporting
    collector = Collector(dev_pki)
    trail.append(events(3, 1))
    trail.append([AuditEvent("console.login", "adm\uffffin", "refused", source="10.0.0.9:5000",
                             detail={"reason": "unknown account\ufffe"})])
    trail.append(events(3, 5))
    start(collector.port)
    yield until(lambda: len(collector.messages) >= 7)
    assert collector.seqs() == list(range(1, 8))
    assert b'UserID="admin"' in collector.messages[3]
    yield until(lambda: last_seq(engine) == 7)
    yield collector.stop()


@pytest_twisted.inlineCallbacks
def test_a_backlog_beyond_the_queue_limit_is_skipped_and_counted(exporting, dev_pki):
    start, trail, engine = exporting
    collector = Collector(dev_pki)
    trail.append(events(30, 1))
    service = start(collector.port)
    service.queue_limit = 12
    yield until(lambda: len(collector.messages) >= 12)
    yield task.deferLater(reactor, 0.3, lambda: None)
    assert collector.seqs() == list(range(19, 31)) and service.skipped == 18
    yield collector.stop()


def two_export_nodes(pg_url, make_config, dev_pki):
    """Two nodes' export services (started) on one PostgreSQL, to one collector."""
    engine = create_gateway_engine(pg_url)
    migrate(engine)
    database = Database(engine, reactor)
    database.start()
    collector = Collector(dev_pki)
    config = dataclasses.replace(make_config(pg_url), audit=AuditConfig(
        export=AuditExportConfig(host="127.0.0.1", port=collector.port)))
    services = [AuditExportService(config, AuditTrail(engine, f"node-{n}"), database, batch=10,
                                   poll_interval=0.05, settle=0.2, claim_interval=0.1)
                for n in (1, 2)]
    for service in services:
        service.startService()
    return engine, database, collector, services


@defer.inlineCallbacks
def stop_export_nodes(engine, database, collector, services):
    for service in services:
        if service.running:
            yield service.stopService()
    yield collector.stop()
    database.stop()
    engine.dispose()


@pytest_twisted.inlineCallbacks
def test_two_nodes_on_postgresql_send_each_record_once(pg_url, make_config, dev_pki):
    engine, database, collector, services = two_export_nodes(pg_url, make_config, dev_pki)
    try:
        AuditTrail(engine, "node-1").append(events(35, 1))
        yield until(lambda: len(collector.messages) >= 35)
        yield task.deferLater(reactor, 0.6, lambda: None)
        assert collector.seqs() == list(range(1, 36))
        assert sorted(s.sent for s in services) == [0, 35]
        # The exporting node stops; the other takes over where it was confirmed.
        exporting_node = next(s for s in services if s.sent)
        yield until(lambda: last_seq(engine) == 35)
        yield exporting_node.stopService()
        AuditTrail(engine, "node-2").append(events(5, 36))
        yield until(lambda: len(collector.messages) >= 40)
        yield task.deferLater(reactor, 0.3, lambda: None)
        assert collector.seqs() == list(range(1, 41))
    finally:
        yield stop_export_nodes(engine, database, collector, services)


@pytest_twisted.inlineCallbacks
def test_a_node_whose_lease_is_lost_stops_sending(pg_url, make_config, dev_pki):
    """The exporting node's session (and with it its lock on the collector) ends under it (a
    PostgreSQL restart, a killed backend): the other node takes the export over, and the first
    stops sending once it sees its lease gone, instead of both sending every record."""
    engine, database, collector, services = two_export_nodes(pg_url, make_config, dev_pki)
    try:
        AuditTrail(engine, "node-1").append(events(10, 1))
        yield until(lambda: len(collector.messages) >= 10 and last_seq(engine) == 10)
        first = next(s for s in services if s.sent)
        other = next(s for s in services if s is not first)
        pid = first._lease[0].connection.dbapi_connection.info.backend_pid
        # Once it has seen its lease gone, the first goes back to claiming it, like the other:
        # either may win (on a busy machine the first did, and the other never took over).
        # This test is about the other taking over: the first claims only once it has.
        claim = first._try_claim
        first._try_claim = lambda: claim() if other._lease is not None else defer.succeed(None)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
        yield until(lambda: other._lease is not None)
        # The first stopped sending: it saw its lease gone and cut its connection to the
        # collector (it checks every claim_interval: not always before the other claims).
        yield until(lambda: first._lease is None and first._protocol is None)
        AuditTrail(engine, "node-1").append(events(10, 11))
        yield until(lambda: len(collector.messages) >= 20)
        yield task.deferLater(reactor, 0.6, lambda: None)
        assert collector.seqs() == list(range(1, 21))
        assert first._lease is None and first.sent == 10
    finally:
        yield stop_export_nodes(engine, database, collector, services)


@pytest_twisted.inlineCallbacks
def test_a_running_gateway_exports_what_it_records(db_url, make_config, running_gateway, dev_pki):
    import hl7msgs
    from twisted.internet import threads

    from adapters.mllp.client import MllpClient

    collector = Collector(dev_pki)
    config = dataclasses.replace(make_config(db_url), audit=AuditConfig(
        flush_interval=0.05, export=AuditExportConfig(host="127.0.0.1", port=collector.port)))
    ports = yield running_gateway(config)

    def exchange():
        with MllpClient("127.0.0.1", ports["mllp-test"], timeout=10) as client:
            return client.send(hl7msgs.message("adt", 3).encode("utf-8")).response

    yield threads.deferToThread(exchange)
    yield until(lambda: any(b"110107" in m for m in collector.messages))
    received = etree.fromstring(b"<?xml" + collector.messages[0].split(b" <?xml", 1)[1])
    assert received.find("EventIdentification").get("EventActionCode") == "C"
    assert received.find("ActiveParticipant").get("NetworkAccessPointID") == "127.0.0.1"
    assert collector.seqs() == list(range(1, len(collector.messages) + 1))
    yield collector.stop()

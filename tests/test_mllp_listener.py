"""The MLLP listener over real loopback sockets, against the real gateway (pipeline, writer,
database): bad input of every kind gets its precise negative ACK, is stored with its reason,
and leaves the connection usable; limits close connections; TLS and MLLP release 2.

The blocking `MllpClient` runs in a thread (deferToThread) so the reactor keeps serving.
Core cases run on SQLite and PostgreSQL (`db_url`), the rest on SQLite only.
"""
from __future__ import annotations

import os
import socket
import ssl
import time

import pytest
import pytest_twisted
from conftest import corpus_path
from twisted.internet import threads

from adapters.mllp.client import MllpClient, MllpClientError, client_tls_context, split_messages
from adapters.mllp.framing import FrameReceived, MllpFramer, frame
from gateway.store.database import create_gateway_engine
from gateway.store.queries import get_message, list_messages

HOST = "127.0.0.1"
VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def message(control_id: str, message_type: bytes = b"ADT^A01^ADT_A01", charset: bytes = b"",
            ack_modes: bytes = b"", pid: bytes = b"PID|1||4500123^^^FAC^PI||TEST^PATIENT\r",
            application: bytes = b"SIH") -> bytes:
    """A synthetic HL7 v2.5 message (no real patient); `ack_modes` is MSH-15|MSH-16."""
    msh = [b"MSH", b"^~\\&", application, b"CHU_TEST", b"GW", b"MA", b"20250114083512", b"",
           message_type, control_id.encode("ascii"), b"P", b"2.5", b"", b"",
           *(ack_modes.split(b"|") if ack_modes else [b"", b""]), b"MAR", charset]
    return b"|".join(msh) + CR + pid


def ack_fields(response: bytes | None) -> dict:
    """MSA-1, MSA-2 and the first ERR's ERR-2, ERR-3 code, ERR-5 code, ERR-7 of an answer."""
    assert response is not None, "no answer"
    segments = {}
    for segment in response.split(CR):
        if segment[:3] not in segments:
            segments[segment[:3]] = segment.split(b"|")
    msa = segments.get(b"MSA", [])
    err = segments.get(b"ERR")
    out = dict(msa1=msa[1].decode() if len(msa) > 1 else None,
               msa2=msa[2].decode() if len(msa) > 2 else None, err=err is not None)
    if err:
        err += [b""] * 8
        out.update(err2=err[2].decode(), err3=err[3].split(b"^")[0].decode(),
                   err5=err[5].split(b"^")[0].decode() or None, err7=err[7].decode())
    return out


def stored(db_url: str) -> list:
    """Every stored message, oldest first, with its details (raw bytes, ACK, truncated)."""
    engine = create_gateway_engine(db_url)
    try:
        with engine.connect() as conn:
            return [get_message(conn, row.id) for row in reversed(list_messages(conn, limit=10_000))]
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.sqlite'}"


def in_thread(function, *args):
    return threads.deferToThread(function, *args)


# -- bad input, each followed by a good message on the same connection -----------------------

BAD_INPUTS = {
    # name: (payload, MSA-1, MSA-2, ERR-2, ERR-3, ERR-5, words of the stored reason)
    "no MSH": (b"PID|1||4500123^^^FAC^PI||TEST^PATIENT\rPV1|1|I\r",
               "AR", "", "MSH^1", "100", "NOT_HL7", "does not start with an MSH"),
    "truncated MSH": (b"MSH|^~\\&|SIH|CHU_TEST",
                      "AR", "", "MSH^1^9", "101", None, "MSH-9 message type is empty"),
    "MSH without control id": (b"MSH|^~\\&|SIH|CHU_TEST|GW|MA|20250114083512||ADT^A01|\r",
                               "AR", "", "MSH^1^10", "101", None, "MSH-10 message control id is empty"),
    "wrong encoding characters": (b"MSH|^~|SIH|CHU_TEST|GW|MA|20250114083512||ADT^A01|BAD1|P|2.5\r",
                                  "AR", "", "MSH^1^2", "102", "NOT_HL7", "MSH-2 encoding characters"),
    "letter as field separator": (b"MSHX^~\\&XSIHXCHU_TEST\r",
                                  "AR", "", "MSH^1^1", "102", "NOT_HL7", "not a punctuation character"),
    "unknown message type": (message("BAD2", message_type=b"XYZ^A01"),
                             "AR", "BAD2", "MSH^1^9^1^1", "200", None, "'XYZ' is not in HL7 table 0076"),
    "unknown message type, enhanced mode": (message("BAD3", message_type=b"XYZ^A01", ack_modes=b"AL|NE"),
                                            "CR", "BAD3", "MSH^1^9^1^1", "200", None, "table 0076"),
    "bytes invalid in UTF-8": (message("BAD4", charset=b"UNICODE UTF-8",
                                       pid=b"PID|1||4500123^^^FAC^PI||TEST\xff\xfePATIENT\r"),
                               "AE", "BAD4", "PID^1^5", "102", "CHARSET_INVALID", "byte 0xff"),
    "bytes invalid in ASCII": (message("BAD5", charset=b"ASCII",
                                       pid=b"PID|1||4500123^^^FAC^PI||H\xe9L\xe8NE\r"),
                               "AE", "BAD5", "PID^1^5", "102", "CHARSET_INVALID", "byte 0xe9"),
    "NUL byte in a field": (message("BAD6", pid=b"PID|1||4500123^^^FAC^PI||TEST\x00PATIENT\r"),
                            "AE", "BAD6", "PID^1^5", "102", "CHARSET_INVALID", "NUL byte (0x00)"),
    # Raw binary data holding MLLP's end block: the message whole, refused (it was cut at the
    # FS, its head acknowledged AA, its tail dropped as junk).
    "end block byte in a field": (message("BAD8", pid=b"PID|1||4500123^^^FAC^PI||TEST\x1cPATIENT\r"),
                                  "AE", "BAD8", "PID^1^5", "102", "CHARSET_INVALID",
                                  "MLLP end block byte (0x1C)"),
    "binary garbage": (bytes(b for b in range(256) if b not in (0x0B, 0x1C)) * 3,
                       "AR", "", "MSH^1", "100", "NOT_HL7", "does not start with an MSH"),
    # A segment id read from the bytes goes into ERR-2 and the store: a byte above 0x7F in
    # it broke the (ASCII) ACK and dropped the connection, a NUL failed the store on PostgreSQL.
    "byte invalid in ASCII in a segment id": (message("BAD7", pid=b"P\xc9D|1||4500123^^^FAC^PI\r"),
                                              "AE", "BAD7", "P?D^1", "102", "CHARSET_INVALID",
                                              "byte 0xc9"),
    "NUL in a segment id of a batch": (b"BHS|^~\\&|SIH|CHU_TEST\r\x00XX|1\r",
                                       "AR", "", "?XX^1", "100", None, "?XX segment outside a message"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest_twisted.inlineCallbacks
def test_bad_input_gets_a_precise_nak_is_stored_and_the_connection_stays_usable(
        case, db_url, make_config, running_gateway):
    """Each malformed input gets its exact negative ACK, is stored raw as rejected with its reason, and the same connection then accepts a good message."""
    payload, msa1, msa2, err2, err3, err5, reason = BAD_INPUTS[case]
    ports = yield running_gateway(make_config(db_url))
    good = message("GOOD1")

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            return client.send(payload).response, client.send(good).response

    bad_answer, good_answer = yield in_thread(exchange)
    fields = ack_fields(bad_answer)
    assert (fields["msa1"], fields["msa2"], fields["err2"], fields["err3"], fields["err5"]) \
        == (msa1, msa2, err2, err3, err5), bad_answer
    assert reason in fields["err7"]
    assert ack_fields(good_answer)["msa1"] == "AA" and ack_fields(good_answer)["msa2"] == "GOOD1"

    rows = stored(db_url)
    assert [(r.summary.status, r.summary.control_id) for r in rows] \
        == [("rejected", msa2 or None), ("received", "GOOD1")]
    refused = rows[0]
    assert refused.raw == payload and refused.ack == bad_answer
    assert refused.summary.error_code == int(err3) and reason in refused.summary.error_reason
    assert refused.summary.ack_code == msa1 and not refused.truncated
    assert rows[1].raw == good and rows[1].ack == good_answer


@pytest_twisted.inlineCallbacks
def test_oversize_frame_gets_ar_then_the_connection_closes(sqlite_url, make_config, running_gateway):
    """A frame past max_frame_size gets AR (207, FRAME_TOO_LARGE) naming its control id, then the connection closes; its prefix is stored truncated."""
    config = make_config(sqlite_url, mllp=[dict(name="mllp-test", max_frame_size=4096,
                                                accept_unknown_senders=True)])
    ports = yield running_gateway(config)
    big = message("BIG1") + b"OBX|1|TX|||" + b"A" * 8000 + CR

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            answer = client.send(big).response
            try:
                after = client.receive().response  # None: closed by the server
            except ConnectionResetError:
                after = None
            return answer, after

    answer, after = yield in_thread(exchange)
    fields = ack_fields(answer)
    assert (fields["msa1"], fields["msa2"], fields["err2"], fields["err3"], fields["err5"]) \
        == ("AR", "BIG1", "MSH^1", "207", "FRAME_TOO_LARGE")
    assert "exceeds the limit of 4096 bytes" in fields["err7"]
    assert after is None
    [row] = stored(sqlite_url)
    assert row.truncated and row.raw == big[:4096]
    assert row.summary.status == "rejected" and row.summary.size > 4096
    assert row.summary.error_code == 207 and row.ack == answer

    def fresh_connection():  # the listener itself still serves
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            return client.send(message("AFTER1")).response

    assert ack_fields((yield in_thread(fresh_connection)))["msa1"] == "AA"


@pytest_twisted.inlineCallbacks
def test_disconnect_mid_frame_stores_nothing_and_others_are_served(sqlite_url, make_config, running_gateway):
    """A client that leaves in the middle of a frame gets nothing stored, while another client's connection keeps working."""
    ports = yield running_gateway(make_config(sqlite_url))
    port = ports["mllp-test"]

    def scenario():
        with MllpClient(HOST, port, timeout=10) as other:
            first = other.send(message("OTHER1")).response
            quitter = socket.create_connection((HOST, port), timeout=5)
            quitter.sendall(VT + message("HALF1")[:40])
            time.sleep(0.1)
            quitter.close()
            time.sleep(0.1)
            second = other.send(message("OTHER2")).response
            return first, second

    first, second = yield in_thread(scenario)
    assert ack_fields(first)["msa1"] == "AA" and ack_fields(second)["msa1"] == "AA"
    rows = stored(sqlite_url)
    assert [r.summary.control_id for r in rows] == ["OTHER1", "OTHER2"]
    assert all(b"HALF1" not in r.raw for r in rows)


def trickle(sock: socket.socket, data: bytes, chunk: int, delay: float) -> None:
    for start in range(0, len(data), chunk):
        sock.sendall(data[start:start + chunk])
        time.sleep(delay)


@pytest_twisted.inlineCallbacks
def test_slow_sender_within_the_frame_deadline_is_accepted(sqlite_url, make_config, running_gateway):
    """A message trickled a few bytes at a time over a fraction of a second is accepted and stored whole."""
    ports = yield running_gateway(make_config(sqlite_url))
    payload = message("SLOW1")

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            started = time.monotonic()
            trickle(client.sock, frame(payload), 4, 0.01)
            took = time.monotonic() - started
            return client.receive().response, took

    answer, took = yield in_thread(exchange)
    assert took > 0.2  # trickled (the frame deadline is 60 s: a busy machine's slower sleeps fit)
    assert ack_fields(answer)["msa1"] == "AA" and ack_fields(answer)["msa2"] == "SLOW1"
    [row] = stored(sqlite_url)
    assert row.raw == payload and row.summary.status == "received"


@pytest_twisted.inlineCallbacks
def test_slow_sender_past_the_frame_deadline_is_disconnected(sqlite_url, make_config, running_gateway):
    """With frame_timeout=0.3 a frame still trickling in after 0.3 s gets the connection closed and nothing is stored."""
    config = make_config(sqlite_url, mllp=[dict(name="mllp-test", frame_timeout=0.3,
                                                accept_unknown_senders=True)])
    ports = yield running_gateway(config)
    data = frame(message("SLOW2"))

    def exchange():
        sock = socket.create_connection((HOST, ports["mllp-test"]), timeout=5)
        started = time.monotonic()
        try:
            trickle(sock, data, 2, 0.02)  # about 1 s in all
            received = sock.recv(65536)
        except OSError:  # reset by the server while we were still sending
            received = b""
        finally:
            sock.close()
        return received, time.monotonic() - started

    received, took = yield in_thread(exchange)
    assert received == b""  # closed, never answered
    assert took < 3
    assert stored(sqlite_url) == []


@pytest_twisted.inlineCallbacks
def test_idle_connection_is_closed(sqlite_url, make_config, running_gateway):
    """A connection silent for idle_timeout seconds is closed by the gateway."""
    config = make_config(sqlite_url, mllp=[dict(name="mllp-test", idle_timeout=0.3,
                                                accept_unknown_senders=True)])
    ports = yield running_gateway(config)

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=5) as client:
            answer = client.send(message("IDLE1")).response
            started = time.monotonic()
            closed = client.receive()  # nothing more to read: returns when the server closes
            return answer, closed.response, time.monotonic() - started

    answer, after, waited = yield in_thread(exchange)
    assert ack_fields(answer)["msa1"] == "AA"
    assert after is None and 0.2 < waited < 2


# -- duplicates, pipelining, batches --------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_resent_message_gets_the_same_ack_and_reused_control_id_is_refused(db_url, make_config, running_gateway):
    """The same bytes again get the stored ACK byte for byte and are stored once; other bytes under the same control id get 207 CONTROL_ID_REUSED and are stored rejected."""
    ports = yield running_gateway(make_config(db_url))
    original = message("DUP1")
    other = message("DUP1", pid=b"PID|1||9999999^^^FAC^PI||OTHER^PATIENT\r")
    other_enhanced = message("DUP1", ack_modes=b"AL|NE", pid=b"PID|1||8888888^^^FAC^PI||THIRD^PATIENT\r")

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            return [client.send(m).response for m in (original, original, other, other_enhanced)]

    first, again, reused, reused_enhanced = yield in_thread(exchange)
    assert ack_fields(first)["msa1"] == "AA"
    assert again == first
    for answer, code in ((reused, "AR"), (reused_enhanced, "CR")):
        fields = ack_fields(answer)
        assert (fields["msa1"], fields["msa2"], fields["err2"], fields["err3"], fields["err5"]) \
            == (code, "DUP1", "MSH^1^10", "207", "CONTROL_ID_REUSED")
    rows = stored(db_url)
    assert [(r.summary.status, r.summary.duplicate_count, r.raw) for r in rows] == [
        ("received", 1, original), ("rejected", 0, other), ("rejected", 0, other_enhanced)]
    assert rows[1].ack == reused and rows[1].summary.error_code == 207


@pytest_twisted.inlineCallbacks
def test_two_frames_in_one_write_get_two_acks_in_order(db_url, make_config, running_gateway):
    """Two frames pipelined in one write are both stored and answered in the order sent."""
    ports = yield running_gateway(make_config(db_url))

    def exchange():
        sock = socket.create_connection((HOST, ports["mllp-test"]), timeout=10)
        framer, answers = MllpFramer(), []
        try:
            sock.sendall(frame(message("PIPE1")) + frame(message("PIPE2", message_type=b"ORU^R01^ORU_R01")))
            while len(answers) < 2:
                data = sock.recv(65536)
                if not data:
                    break
                answers += [e.payload for e in framer.receive_data(data) if isinstance(e, FrameReceived)]
        finally:
            sock.close()
        return answers

    answers = yield in_thread(exchange)
    assert [ack_fields(a)["msa2"] for a in answers] == ["PIPE1", "PIPE2"]
    assert [ack_fields(a)["msa1"] for a in answers] == ["AA", "AA"]
    assert [r.summary.control_id for r in stored(db_url)] == ["PIPE1", "PIPE2"]


@pytest_twisted.inlineCallbacks
def test_batch_is_stored_message_by_message(sqlite_url, make_config, running_gateway):
    """A BHS/BTS batch sent as one frame is stored as its two messages and answered with a batch of ACKs."""
    with open(corpus_path("python-hl7", "sample_batch1.hl7"), "rb") as f:
        [batch] = split_messages(f.read())
    ports = yield running_gateway(make_config(sqlite_url))

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            return client.send(batch).response

    answer = yield in_thread(exchange)
    segments = answer.rstrip(CR).split(CR)
    assert segments[0].startswith(b"BHS|") and segments[0].endswith(b"|abchs20070101123401-1")
    assert segments[-1] == b"BTS|0"  # both messages say MSH-15 NE: no ACK inside
    rows = stored(sqlite_url)
    assert [(r.summary.control_id, r.summary.status, r.summary.message_type) for r in rows] == [
        ("12334456778890", "received", "ADT^A04"), ("12334456778891", "received", "ADT^A04")]
    assert all(r.raw.startswith(b"MSH|") and r.raw in batch for r in rows)


# -- TLS and MLLP release 2 -----------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_tls_listener_accepts_a_facility_certificate(db_url, make_config, running_gateway, dev_pki):
    """Over the TLS listener a client presenting a facility certificate from the CA gets its
    message accepted (MSH-4 is one of the names of the facility the certificate names)."""
    from gateway.config import SenderConfig

    chu = SenderConfig(id="INPE-100001", name="CHU", type="hospital", facilities=("CHU_TEST",))
    ports = yield running_gateway(make_config(db_url, mllp=[dict(name="mllp-tls", tls=True)],
                                              senders=[chu]))
    context = client_tls_context(os.path.join(dev_pki, "ca.crt"), os.path.join(dev_pki, "INPE-100001.crt"),
                                 os.path.join(dev_pki, "INPE-100001.key"))

    def exchange():
        with MllpClient(HOST, ports["mllp-tls"], timeout=10, tls=context) as client:
            return client.send(message("TLS1", ack_modes=b"AL|NE")).response

    answer = yield in_thread(exchange)
    assert ack_fields(answer)["msa1"] == "CA" and ack_fields(answer)["msa2"] == "TLS1"
    [row] = stored(db_url)
    assert row.summary.control_id == "TLS1" and row.sender_id == "INPE-100001"


@pytest_twisted.inlineCallbacks
def test_tls_listener_refuses_a_client_without_certificate(sqlite_url, make_config, running_gateway, dev_pki):
    """A TLS client without a certificate never gets an ACK and nothing is stored."""
    ports = yield running_gateway(make_config(sqlite_url, mllp=[dict(name="mllp-tls", tls=True,
                                                                    accept_unknown_senders=True)]))
    context = client_tls_context(os.path.join(dev_pki, "ca.crt"))

    def exchange():
        try:
            with MllpClient(HOST, ports["mllp-tls"], timeout=5, tls=context) as client:
                return client.send(message("NOCERT1")).response
        except (ssl.SSLError, OSError, MllpClientError) as error:
            return error

    outcome = yield in_thread(exchange)
    # A TLS alert (certificate required) or a closed connection; never an answer, never a hang.
    assert outcome is None or isinstance(outcome, (ssl.SSLError, ConnectionError)), outcome
    assert stored(sqlite_url) == []


@pytest_twisted.inlineCallbacks
def test_release_2_commit_block_comes_with_the_ack(sqlite_url, make_config, running_gateway):
    """With commit_blocks the client sees a commit ACK block for an accepted message and for a stored refusal."""
    ports = yield running_gateway(make_config(sqlite_url, mllp=[dict(name="mllp-test", commit_blocks=True,
                                                                    accept_unknown_senders=True)]))

    def exchange():
        with MllpClient(HOST, ports["mllp-test"], timeout=10) as client:
            return client.send(message("R2A")), client.send(b"not hl7 at all\r")

    accepted, refused = yield in_thread(exchange)
    assert accepted.commit is True and ack_fields(accepted.response)["msa1"] == "AA"
    assert refused.commit is True and ack_fields(refused.response)["msa1"] == "AR"  # stored, then refused
    assert [r.summary.status for r in stored(sqlite_url)] == ["received", "rejected"]


@pytest_twisted.inlineCallbacks
def test_tls_listener_closes_a_connection_from_outside_allow_sources_at_once(
        sqlite_url, make_config, running_gateway, dev_pki):
    """A refused source address on a TLS listener: the TLS layer wrapped the factory's None
    (an Unhandled Error, and the connection left open for good). It is closed at once."""
    from twisted.logger import globalLogPublisher

    failures = []

    def observe(event):
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    ports = yield running_gateway(make_config(sqlite_url, mllp=[dict(
        name="mllp-tls", tls=True, allow_sources=["10.0.0.0/8"])]))
    globalLogPublisher.addObserver(observe)

    def connect():
        with socket.create_connection((HOST, ports["mllp-tls"]), timeout=5) as sock:
            sock.sendall(b"\x16\x03\x01\x00\x05hello")  # the start of a ClientHello
            try:
                return sock.recv(100)
            except ConnectionResetError:
                return b""

    try:
        assert (yield in_thread(connect)) == b""  # closed, not a 5 s timeout
    finally:
        globalLogPublisher.removeObserver(observe)
    assert failures == []


@pytest_twisted.inlineCallbacks
def test_tls_connection_the_gateway_closes_goes_even_if_the_client_never_answers(
        sqlite_url, make_config, running_gateway, dev_pki, monkeypatch):
    """Over TLS, closing waits for the client's close_notify: a client that completed the
    handshake and then reads nothing held its connection forever past idle_timeout. It is
    aborted CLOSE_GRACE seconds after the gateway closed it."""
    from adapters.mllp import protocol
    from gateway.config import SenderConfig

    monkeypatch.setattr(protocol, "CLOSE_GRACE", 0.3)
    chu = SenderConfig(id="INPE-100001", name="CHU", type="hospital", facilities=("CHU_TEST",))
    ports = yield running_gateway(make_config(sqlite_url, mllp=[dict(
        name="mllp-tls", tls=True, idle_timeout=0.3)], senders=[chu]))
    context = client_tls_context(os.path.join(dev_pki, "ca.crt"), os.path.join(dev_pki, "INPE-100001.crt"),
                                 os.path.join(dev_pki, "INPE-100001.key"))

    def hold():
        # The TLS client over memory BIOs: it answers nothing once its handshake is done.
        with socket.create_connection((HOST, ports["mllp-tls"]), timeout=5) as sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    incoming.write(sock.recv(65536))
            sock.sendall(outgoing.read())
            started = time.monotonic()
            try:
                while sock.recv(65536):  # the close_notify, then the end (or a reset)
                    pass
            except ConnectionResetError:
                pass
            return time.monotonic() - started

    took = yield in_thread(hold)  # a socket.timeout (5 s) when the connection stays open
    assert took < 3

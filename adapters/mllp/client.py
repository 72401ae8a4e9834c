"""A small blocking MLLP client, for `gateway send` and for tests: send a message, wait for
its answer. No reactor: hospital IT runs it from a shell to test a link.

`split_messages` turns a file into what a sender would send: a batch file (FHS/BHS first)
is one frame; otherwise each MSH starts a new message. Line endings become CR, the HL7
segment terminator, unless `keep_line_endings`.
"""
from __future__ import annotations

import re
import socket
import ssl
import time
from dataclasses import dataclass

from adapters.hl7v2.charsets import CharsetError, codec_for
from adapters.mllp.framing import (CommitAcknowledged, CommitRejected, FrameReceived, FrameTooLarge,
                                   MllpFramer, frame)

_LINE_END = re.compile(rb"\r\n|\n|\r")


class MllpClientError(Exception):
    pass


def split_messages(data: bytes, raw: bool = False) -> list[bytes]:
    """The messages of a file, each ending with CR; a batch file stays one frame. `raw`: the
    file's bytes exactly, as one frame (to see what the gateway makes of them)."""
    if raw:
        return [data] if data else []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    data = _LINE_END.sub(b"\r", data).strip(b"\r\n \t")
    if not data:
        return []
    if data[:3] in (b"FHS", b"BHS"):
        return [data + b"\r" if not data.endswith(b"\r") else data]
    starts = [m.start() for m in re.finditer(rb"(?:^|\r)MSH", data)]
    starts = [s + 1 if data[s:s + 1] == b"\r" else s for s in starts] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)  # leading non-MSH content is sent as is: the gateway will say why
    pieces = [data[a:b].rstrip(b"\r") + b"\r" for a, b in zip(starts, starts[1:] + [len(data)])]
    return [p for p in pieces if p.strip(b"\r")]


COMMIT_NAK_GRACE = 2.0  # seconds an answer may follow a release-2 commit NAK


@dataclass
class Reply:
    response: bytes | None  # the HL7 answer (None when the connection closed or timed out)
    commit: bool | None = None  # MLLP release 2 commit block: True ACK, False NAK, None none
    seconds: float = 0.0


class MllpClient:
    def __init__(self, host: str, port: int, timeout: float = 30.0, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        self.timeout = timeout
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
        self.sock = sock
        self.framer = MllpFramer()
        self._pending: list = []  # events read but not yet returned (pipelined answers)

    def send(self, payload: bytes, framed: bool = True) -> Reply:
        """Send one message (framed here unless `framed` is False) and wait for its answer."""
        started = time.monotonic()
        self.sock.sendall(frame(payload) if framed else payload)
        return self.receive(started)

    def receive(self, started: float | None = None) -> Reply:
        """The next answer: a frame (with any release-2 commit block before it)."""
        started = started or time.monotonic()
        reply = Reply(None)
        deadline = started + self.timeout
        while True:
            while self._pending:
                event = self._pending.pop(0)
                if isinstance(event, CommitAcknowledged):
                    reply.commit = True
                elif isinstance(event, CommitRejected):
                    reply.commit = False
                    # A server may send the NAK alone (nothing stored, nothing to say): wait
                    # a little for an answer after it, not the whole timeout.
                    deadline = min(deadline, time.monotonic() + COMMIT_NAK_GRACE)
                elif isinstance(event, FrameReceived):
                    reply.response = event.payload
                    reply.seconds = time.monotonic() - started
                    return reply
                elif isinstance(event, FrameTooLarge):
                    raise MllpClientError("answer larger than the client accepts")
            data = None  # stays None when the deadline passes
            remaining = deadline - time.monotonic()
            if remaining > 0:
                self.sock.settimeout(remaining)
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    pass
            if data is None:
                if reply.commit is False:
                    reply.seconds = time.monotonic() - started
                    return reply  # the NAK is the answer
                raise MllpClientError(f"no answer within {self.timeout:g} s")
            if not data:
                reply.seconds = time.monotonic() - started
                return reply  # closed by the server
            self._pending.extend(self.framer.receive_data(data))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "MllpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def client_tls_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ with the server checked against `ca`, presenting a client certificate if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _codec(msh: list[bytes]) -> str:
    """The codec of a message's MSH-18 when it names one, else UTF-8 (what most senders mean)."""
    try:
        declared = msh[17].split(b"~")[0].decode("ascii").strip() if len(msh) > 17 else ""
        return codec_for(declared) if declared else "utf-8"
    except (UnicodeError, CharsetError):
        return "utf-8"


def control_id(message: bytes) -> str | None:
    """MSH-10 of a message (decoded as `describe` decodes MSA-2), None for a batch or no MSH."""
    if not message.startswith(b"MSH") or len(message) < 4:
        return None
    fields = _LINE_END.split(message, 1)[0].split(message[3:4])
    return fields[9].decode(_codec(fields), "replace") if len(fields) > 9 else None


def describe(response: bytes | None) -> dict:
    """MSA-1, MSA-2 and the ERR segments of an answer (for printing); tolerant of anything."""
    if response is None:
        return {"msa1": None, "msa2": None, "errors": []}
    segments = [s for s in _LINE_END.split(response) if s]
    field_separator = segments[0][3:4] if segments and len(segments[0]) > 3 else b"|"
    # Decoded as the answer's MSH-18 says: a server may answer in another set than the message's.
    msh = segments[0].split(field_separator) if segments and segments[0].startswith(b"MSH") else []
    codec = _codec(msh)
    msa1 = msa2 = None
    errors = []
    for segment in segments:
        fields = segment.split(field_separator)
        if fields[0] == b"MSA":
            msa1 = fields[1].decode("ascii", "replace") if len(fields) > 1 else None
            msa2 = fields[2].decode(codec, "replace") if len(fields) > 2 else None
        elif fields[0] == b"ERR":
            errors.append(segment.decode(codec, "replace"))
    return {"msa1": msa1, "msa2": msa2, "errors": errors}

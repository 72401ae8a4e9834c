"""The MLLP server protocol: a thin Twisted shell around `MllpFramer`.

One message is in flight per connection: frames that arrive before the previous answer was
sent wait their turn, so answers always leave in order (and reading pauses if a sender
pipelines too far ahead). Limits, each closing the connection with a logged reason:

- `idle_timeout`: no byte received for that long;
- `frame_timeout`: a frame not complete that long after its first byte (a deadline, so a
  sender that trickles bytes cannot hold a connection open forever);
- `max_frame_size`: the frame is refused (the handler answers from its first bytes), then
  the connection is closed, since the rest of the frame cannot be told from a new one.

The handler does the real work and calls `reply(answer)` when the message is stored.

Over TLS, the factory's `identify(transport)` names the facility of the verified client
certificate once the handshake completes (before any data is read); it raises `PeerRefused`
for a certificate that names no facility, and the connection is closed with that reason
logged. The facility then travels with every frame in `ConnectionInfo`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Protocol as TypingProtocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from adapters.mllp.framing import (COMMIT_ACK_BLOCK, COMMIT_NAK_BLOCK, DEFAULT_MAX_FRAME_SIZE,
                                   FrameReceived, FrameTooLarge,
                                   JunkDiscarded, MllpFramer, frame)

log = Logger()

PIPELINE_LIMIT = 16  # frames waiting on one connection before reading pauses
# Seconds a connection we close may take to go: loseConnection waits for the peer to read what
# is still buffered and, over TLS, to answer our close_notify, which a hostile or broken peer
# never does. After that the connection is aborted.
CLOSE_GRACE = 10.0


@dataclass(frozen=True, slots=True)
class Answer:
    stored: bool  # the frame's content is durably stored (MLLP release 2 commit ACK)
    response: bytes | None  # HL7 bytes to send back, without framing; None: nothing


@dataclass(frozen=True)
class ConnectionInfo:
    listener: str
    peer: str  # "address:port"
    # The registry facility its verified client certificate names (TLS doors); None on plain
    # TCP, where MSH-3/MSH-4 and the source address identify the sender.
    facility_id: str | None = None
    tls: bool = False  # the connection is TLS with a verified client certificate


class PeerRefused(Exception):
    """Raised by an `identify` callable: this TLS peer is not served (the reason is logged)."""


class FrameHandler(TypingProtocol):
    def frame_received(self, payload: bytes, connection: ConnectionInfo,
                       reply: Callable[[Answer], None]) -> None: ...

    def frame_too_large(self, prefix: bytes, size: int, limit: int, connection: ConnectionInfo,
                        reply: Callable[[Answer], None]) -> None: ...


@dataclass(frozen=True)
class MllpSettings:
    listener: str
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    idle_timeout: float = 300.0
    frame_timeout: float = 60.0
    commit_blocks: bool = False  # MLLP release 2


@implementer(IHandshakeListener)
class MllpServerProtocol(Protocol, TimeoutMixin):
    def __init__(self, handler: FrameHandler, settings: MllpSettings, clock,
                 identify: Callable[[object], str] | None = None):
        self.handler = handler
        # TLS listeners: the facility of the client certificate, asked once per connection;
        # until it answers (after the handshake), nothing received is read.
        self.identify = identify
        self.identified = identify is None
        self.refused = False  # identify refused the peer: closing, reason logged
        self.settings = settings
        self.clock = clock
        self.callLater = clock.callLater  # TimeoutMixin schedules on the injected clock
        self.framer = MllpFramer(settings.max_frame_size)
        self.waiting: deque[bytes] = deque()
        self.busy = False  # a frame is with the handler
        self.paused = False
        self.closing = False  # an oversize frame: close after answering it
        self.info: ConnectionInfo | None = None
        self._frame_deadline = None
        self._abort_call = None  # the end of CLOSE_GRACE, once we close

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.info = ConnectionInfo(self.settings.listener, f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}")
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        self.setTimeout(self.settings.idle_timeout)

    def handshakeCompleted(self) -> None:
        if self.identify is None:
            return
        try:
            facility_id = self.identify(self.transport)
        except PeerRefused as refused:
            log.warn("mllp {listener} {peer}: {reason}; closing", listener=self.info.listener,
                     peer=self.info.peer, reason=refused)
            self.refused = True
            self._close()
            return
        except Exception:  # a fault of ours: fail closed, with the traceback
            log.failure("mllp {listener} {peer}: identifying the TLS client failed; closing",
                        listener=self.info.listener, peer=self.info.peer)
            self.refused = True
            self.transport.abortConnection()
            return
        self.info = replace(self.info, facility_id=facility_id, tls=True)
        self.identified = True
        log.info("mllp {listener} {peer}: TLS client certificate of facility {facility}",
                 listener=self.info.listener, peer=self.info.peer, facility=facility_id)

    def dataReceived(self, data: bytes) -> None:
        if not self.identified:
            return  # a refused TLS peer (bytes that came with its handshake are dropped)
        self.resetTimeout()
        ended = False  # a frame ended in this read: a frame still open began after it
        for event in self.framer.receive_data(data):
            kind = type(event)
            if kind is not JunkDiscarded:
                ended = True
            if kind is FrameReceived:
                self.waiting.append(event.payload)
            elif kind is JunkDiscarded:
                log.warn("mllp {listener} {peer}: discarded {size} bytes outside any frame",
                         listener=self.info.listener, peer=self.info.peer, size=len(event.data))
            elif kind is FrameTooLarge:
                log.warn("mllp {listener} {peer}: frame of more than {size} bytes exceeds {limit}; "
                         "refusing it and closing the connection", listener=self.info.listener,
                         peer=self.info.peer, size=event.size, limit=event.limit)
                self.waiting.append(event)  # answered in its turn, then the connection closes
                self._pause()
            # CommitAcknowledged / CommitRejected: release 2 receipts for our ACKs; nothing to do.
        self._watch_frame_deadline(ended)
        if not self.busy and self.waiting:
            self._next()
        if len(self.waiting) >= PIPELINE_LIMIT:
            self._pause()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def _next(self) -> None:
        item = self.waiting.popleft()
        self.busy = True
        if type(item) is FrameTooLarge:
            self.closing = True
            self.handler.frame_too_large(item.prefix, item.size, item.limit, self.info, self._answer)
        else:
            self.handler.frame_received(item, self.info, self._answer)

    def _answer(self, answer: Answer) -> None:
        self.busy = False
        if not self.connected:
            return  # the sender left; it will re-send and get the stored ACK back
        if self.settings.commit_blocks:
            self.transport.write(COMMIT_ACK_BLOCK if answer.stored else COMMIT_NAK_BLOCK)
        if answer.response is not None:
            self.transport.write(frame(answer.response))
        if self.closing:
            self._close()
        elif self.waiting:
            self._next()
        elif self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def _watch_frame_deadline(self, restart: bool = False) -> None:
        if self._frame_deadline is not None and (restart or not self.framer.in_frame):
            self._frame_deadline.cancel()  # its frame ended; a new one gets its own deadline
            self._frame_deadline = None
        if self.framer.in_frame and self._frame_deadline is None:
            self._frame_deadline = self.clock.callLater(self.settings.frame_timeout, self._frame_expired)

    def _frame_expired(self) -> None:
        self._frame_deadline = None
        log.warn("mllp {listener} {peer}: frame not complete {timeout}s after it began "
                 "({size} bytes so far); closing", listener=self.info.listener, peer=self.info.peer,
                 timeout=self.settings.frame_timeout, size=self.framer.buffered)
        self.transport.abortConnection()

    def timeoutConnection(self) -> None:
        log.info("mllp {listener} {peer}: idle for {timeout}s; closing", listener=self.info.listener,
                 peer=self.info.peer, timeout=self.settings.idle_timeout)
        self._close()

    def _close(self) -> None:
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def connectionLost(self, reason=None) -> None:
        self.connected = False  # Twisted never resets it: _answer relies on it to drop late answers
        self.setTimeout(None)
        if self._abort_call is not None:
            if self._abort_call.active():
                self._abort_call.cancel()
            self._abort_call = None
        if self.identify is not None and not self.info.tls and not self.refused \
                and reason is not None and not reason.check(ConnectionDone):
            # The handshake failed (no certificate, an old protocol, a refused certificate:
            # gateway.tls logs which) or the peer left during it.
            log.info("mllp {listener} {peer}: TLS connection ended before the client was "
                     "identified: {error}", listener=self.info.listener, peer=self.info.peer,
                     error=reason.getErrorMessage())
        if self._frame_deadline is not None:
            self._frame_deadline.cancel()
            self._frame_deadline = None
        if self.framer.in_frame:
            log.info("mllp {listener} {peer}: connection closed in the middle of a frame "
                     "({size} bytes dropped, never acknowledged)", listener=self.info.listener,
                     peer=self.info.peer, size=self.framer.buffered)
        self.waiting.clear()


class MllpServerFactory(ServerFactory):
    """Builds one protocol per connection; refuses addresses outside the allow-list."""

    def __init__(self, handler: FrameHandler, settings: MllpSettings, clock,
                 allowed: Callable[[str], bool] = lambda address: True,
                 identify: Callable[[object], str] | None = None):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.allowed = allowed
        self.identify = identify  # TLS listeners: transport -> facility id, or PeerRefused

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if not self.allowed(host):
            log.warn("mllp {listener}: connection from {host} refused (not in allow_sources)",
                     listener=self.settings.listener, host=host)
            # Not None: a TLS listener wraps whatever this returns, and would wrap None (an
            # unhandled error, and a connection left open).
            return _Refused()
        protocol = MllpServerProtocol(self.handler, self.settings, self.clock, self.identify)
        protocol.factory = self
        return protocol


class _Refused(Protocol):
    """A connection from outside allow_sources: closed at once (before any TLS handshake)."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()

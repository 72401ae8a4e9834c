"""The ASTM E1381 server protocol: a thin Twisted shell around `AstmReceiver`.

Bytes go to the receiver, its answers (ACK/NAK/EOT) back to the peer, and each complete
transfer to the handler. While the handler stores a message the receiver is `busy`: a new ENQ
is answered NAK (the analyzer retries after 10 s), so a message is never acknowledged at the
link level while the previous one could still be lost. The receiver's deadline is watched with
the injected clock; a connection idle longer than `idle_timeout` is closed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol as TypingProtocol

from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger

from adapters.astm.framing import (DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_MESSAGE_SIZE, AstmReceiver,
                                   FrameRejected, JunkDiscarded, MessageReceived, TransferAborted)

log = Logger()


@dataclass(frozen=True)
class AstmSettings:
    listener: str
    facility: str  # the analyzer's facility id: ASTM has no reliable sender field
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    receive_timeout: float = 30.0
    frame_timeout: float = 15.0
    idle_timeout: float = 600.0


@dataclass(frozen=True)
class AstmConnection:
    listener: str
    facility: str
    peer: str


class MessageHandler(TypingProtocol):
    def message_received(self, data: bytes, connection: AstmConnection,
                         done: Callable[[bool], None]) -> None:
        """Store `data`; call done(stored) on the reactor thread when finished."""


class AstmServerProtocol(Protocol):
    def __init__(self, handler: MessageHandler, settings: AstmSettings, clock):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.receiver = AstmReceiver(settings.max_frame_size, settings.max_message_size,
                                     settings.receive_timeout, settings.frame_timeout)
        self.info: AstmConnection | None = None
        self._deadline_call = None
        self._idle_call = None
        self.pending = 0  # messages with the handler

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.info = AstmConnection(self.settings.listener, self.settings.facility,
                                   f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}")
        self._touch()

    def dataReceived(self, data: bytes) -> None:
        self._touch()
        self._handle(self.receiver.receive_data(data, self.clock.seconds()))

    def connectionLost(self, reason=None) -> None:
        # A transfer cut off: its whole messages (every frame ACKed) are still stored.
        self._handle(self.receiver.connection_lost())
        for call in (self._deadline_call, self._idle_call):
            if call is not None and call.active():
                call.cancel()
        self._deadline_call = self._idle_call = None

    def _handle(self, events: list) -> None:
        out = self.receiver.data_to_send()
        if out:
            self.transport.write(out)
        for event in events:
            kind = type(event)
            if kind is MessageReceived:
                self._deliver(event.data)
            elif kind is FrameRejected:
                log.warn("astm {listener} {peer}: frame rejected ({reason}), attempt {attempts}",
                         listener=self.info.listener, peer=self.info.peer, reason=event.reason,
                         attempts=event.attempts)
            elif kind is TransferAborted:
                log.warn("astm {listener} {peer}: transfer aborted, {size} bytes dropped: {reason}",
                         listener=self.info.listener, peer=self.info.peer, size=event.size,
                         reason=event.reason)
            elif kind is JunkDiscarded:
                log.warn("astm {listener} {peer}: discarded {size} bytes outside any frame",
                         listener=self.info.listener, peer=self.info.peer, size=len(event.data))
        self._watch_deadline()

    def _deliver(self, data: bytes) -> None:
        self.pending += 1
        self.receiver.busy = True

        def done(stored: bool) -> None:
            self.pending -= 1
            self.receiver.busy = self.pending > 0
            if not stored:
                log.error("astm {listener} {peer}: message of {size} bytes not stored",
                          listener=self.info.listener, peer=self.info.peer, size=len(data))

        self.handler.message_received(data, self.info, done)

    def _watch_deadline(self) -> None:
        deadline = self.receiver.deadline
        call = self._deadline_call
        if call is not None and call.active():
            if deadline is not None and call.getTime() == deadline:
                return
            call.cancel()
        self._deadline_call = None
        if deadline is not None:
            self._deadline_call = self.clock.callLater(max(0.0, deadline - self.clock.seconds()),
                                                       self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        self._handle(self.receiver.check_timeout(self.clock.seconds()))

    def _touch(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.settings.idle_timeout)
        else:
            self._idle_call = self.clock.callLater(self.settings.idle_timeout, self._idle)

    def _idle(self) -> None:
        self._idle_call = None
        log.info("astm {listener} {peer}: idle for {seconds}s, closing",
                 listener=self.info.listener, peer=self.info.peer, seconds=self.settings.idle_timeout)
        self.transport.loseConnection()


class AstmServerFactory(ServerFactory):
    """Builds one protocol per connection; refuses addresses outside the allow-list."""

    def __init__(self, handler: MessageHandler, settings: AstmSettings, clock,
                 allowed: Callable[[str], bool] = lambda address: True):
        self.handler = handler
        self.settings = settings
        self.clock = clock
        self.allowed = allowed

    def buildProtocol(self, addr) -> AstmServerProtocol | None:
        host = getattr(addr, "host", "")
        if not self.allowed(host):
            log.warn("astm {listener}: connection from {host} refused (not in allow_sources)",
                     listener=self.settings.listener, host=host)
            return None
        protocol = AstmServerProtocol(self.handler, self.settings, self.clock)
        protocol.factory = self
        return protocol

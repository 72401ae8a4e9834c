"""Count the TLS handshakes that fail on a listener (event tls.handshake_failed).

Twisted's TLS layer (TLSMemoryBIOProtocol) makes the connection before the handshake and,
when the handshake fails, ends it by calling the application protocol's connectionLost with
the OpenSSL.SSL.Error itself ("certificate verify failed", "tlsv1 alert unknown ca", "wrong
version number", ...). `watch_handshakes` wraps a listening factory so that each protocol it
builds reports such an end, unless its handshake had completed: the application protocol is
told of the handshake (IHandshakeListener) through the watch, which passes it on.

A peer that closes the connection before any TLS byte (a port probe) is no handshake failure.
"""
from __future__ import annotations

import re

from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import alsoProvides

from gateway.events import Event, EventBus

UNKNOWN = "unknown"


def handshake_reason(error: BaseException) -> str:
    """A short code for an OpenSSL error: its last reason string, as words joined by '_'
    (OpenSSL's reasons are a fixed set, so the codes are too)."""
    text = ""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        last = args[0][-1]
        text = last[-1] if isinstance(last, tuple) and last else str(last)
    elif args:
        text = str(args[0])
    code = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return code[:40] or "tls_error"


def watch_handshakes(factory, listener: str, events: EventBus):
    """`factory`, whose protocols now report their failed handshakes to `events`."""
    build = factory.buildProtocol

    def buildProtocol(addr):
        protocol = build(addr)
        if protocol is not None:
            _watch(protocol, listener, _address(addr), events)
        return protocol

    factory.buildProtocol = buildProtocol
    return factory


def _watch(protocol, listener: str, source: str, events: EventBus) -> None:
    state = {"done": False}
    tell_handshake = getattr(protocol, "handshakeCompleted", None) \
        if IHandshakeListener.providedBy(protocol) else None
    lost = protocol.connectionLost

    def handshakeCompleted() -> None:
        state["done"] = True
        if tell_handshake is not None:
            tell_handshake()

    def connectionLost(reason=None) -> None:
        if not state["done"] and reason is not None and reason.check(SSL.Error):
            state["done"] = True  # once per connection
            events.emit(Event("tls.handshake_failed", UNKNOWN, outcome="failure", source=source,
                              listener=listener, detail={"reason": handshake_reason(reason.value)}))
        lost(reason)

    protocol.handshakeCompleted = handshakeCompleted
    protocol.connectionLost = connectionLost
    if tell_handshake is None:
        alsoProvides(protocol, IHandshakeListener)


def _address(addr) -> str:
    host = getattr(addr, "host", None)
    return f"{host}:{getattr(addr, 'port', '?')}" if host else UNKNOWN

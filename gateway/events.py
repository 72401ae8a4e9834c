"""What happens in the gateway, told to whoever listens: the metrics and the audit trail.

Components emit an `Event` at each step (a message received, acknowledged, refused,
translated, delivered; a read of patient data; a reload); `EventBus.emit` hands it to each
listener in turn. Emitting is cheap and never fails the caller: a listener that raises is
logged and the others still run. Listeners must be quick and thread-safe (a few components
emit from database threads). Pure code: no reactor.

Events never carry patient data: subjects are ids ("message/42", "prescription/RX-…"),
details are codes, sizes, hashes, control ids.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})

# The kinds, by what they are about. `outcome` is success, refused (a policy said no) or
# failure (something broke); `duration` is in seconds where a kind has one.
KINDS = frozenset({
    "message.received",            # stored; actor: facility (or MSH-4); detail: control_id, size, sha256
    "message.acknowledged",        # ACK sent; duration: receipt to ACK; detail: ack_code
    "message.refused",             # AR/CR or a refused connection/request; detail: reason, code
    "message.translated",          # canonical bundle stored; detail: mapping_version, resources
    "message.translation_failed",  # outcome failure; detail: error code and location
    "delivery.attempted",          # one send to a destination; outcome success|failure|refused
                                   # (refused: permanent); duration; detail: code, attempt
    "delivery.dead",               # a dead letter (permanent refusal or retries exhausted)
    "delivery.replayed",           # an operator (or the CLI) sent a dead letter or delivery again
    "message.read",                # a console page or API read showed a message's content
    "message.searched",            # a console search by patient identifier; detail: the
                                   # criteria's names (never their values), results, messages (ids)
    "prescription.read",           # a prescription was looked up or shown
    "door.refused",                # an HTTPS/SOAP request or MLLP connection refused (401/403/...)
    "tls.handshake_failed",        # a TLS handshake did not complete; detail: reason
    "config.reloaded",             # registry and CRL reloaded (SIGHUP, `gateway reload`)
    "mappings.reloaded",           # the mapping set reloaded; detail: version
    "console.login",               # outcome success|refused
    "console.logout",
    "retention.expired",           # data of a kind expired; detail: kind, through, rows/partitions
})

SYSTEM = "system"  # the actor of what the gateway does on its own


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # one of KINDS
    actor: str  # a facility id (or the MSH-4 of an unknown sender), a console account, SYSTEM
    subject: str | None = None  # "message/42", "delivery/7", "prescription/RX-…", "config"
    outcome: str = "success"  # success | refused | failure
    source: str | None = None  # the peer's network address, "ip:port" or "ip"
    facility: str | None = None  # for metrics labels: the facility id when known
    message_type: str | None = None  # for metrics labels: "ORU^R01", "ASTM", ...
    destination: str | None = None  # for delivery events
    listener: str | None = None  # the listener's name (mllp-tls, https, admin, ...)
    duration: float | None = None  # seconds
    detail: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # codes, sizes, hashes; no patient data
    at: datetime | None = None  # when; None: now, as the listener sees it
    # Already in the audit trail, written in the transaction that stored what it is about (a
    # receipt, a translation, a delivery attempt): the recorder leaves it out.
    recorded: bool = False


Listener = Callable[[Event], None]


class EventBus:
    """Hands every emitted event to each subscribed listener, in subscription order."""

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()
        self._log = logging.getLogger("gateway.events")

    def subscribe(self, listener: Listener) -> None:
        self._listeners = self._listeners + (listener,)

    def unsubscribe(self, listener: Listener) -> None:
        # ==, not is: a bound method is a new object each time it is read, but compares equal.
        self._listeners = tuple(l for l in self._listeners if l != listener)

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken listener must not fail the message it is told about
                self._log.exception("event listener %r failed on %s", listener, event.kind)

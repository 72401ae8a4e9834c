"""ASTM listeners: their configuration and the factory that stores what analyzers send.

    astm:
      - name: lab-chu-rabat          # listener name (stored with every message)
        port: 2575
        interface: 0.0.0.0          # default 127.0.0.1
        facility: "100234"          # the analyzer's facility id (registry); required, since
                                    # ASTM has no reliable sender field
        max_message_size: 16777216  # optional
        idle_timeout: 600           # optional, seconds

Each complete transfer (ENQ ... EOT) is split into its messages (H ... L) and each is stored
as one `Inbound` (format 'astm', message type 'ASTM', status received, no ACK: E1381 has
already acknowledged every frame). The duplicate key is (analyzer name from H-5, facility,
'sha256:' + 32 hex digits of the bytes): analyzers reuse H-3 freely ('1', or nothing), so only
identical bytes are one message sent twice.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from adapters.astm import records
from adapters.astm.protocol import AstmConnection, AstmServerFactory, AstmSettings
from adapters.hl7v2.codes import Outcome
from gateway.ingest.model import Inbound, MessageStatus
from gateway.store.ingest_writer import IngestJob, IngestWriter

FORMAT = "astm"


@dataclass(frozen=True)
class AstmListenerConfig:
    name: str
    port: int
    facility: str
    interface: str = "127.0.0.1"
    max_frame_size: int = 64 * 1024
    max_message_size: int = 16 * 1024 * 1024
    receive_timeout: float = 30.0
    frame_timeout: float = 15.0
    idle_timeout: float = 600.0


class AstmConfigError(ValueError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def astm_listeners_from(data: Any, where: str = "astm") -> tuple[AstmListenerConfig, ...]:
    """The `astm:` section (a list of mappings); every problem reported at once."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise AstmConfigError([f"{where}: a list of listeners (name, port, facility)"])
    problems, listeners, names = [], [], set()
    known = {f.name: f for f in fields(AstmListenerConfig)}
    for number, item in enumerate(data):
        at = f"{where}[{number}]"
        if not isinstance(item, dict):
            problems.append(f"{at}: a mapping with name, port, facility")
            continue
        values = {}
        for key, value in item.items():
            if key not in known:
                problems.append(f"{at}.{key}: unknown key; known: {', '.join(known)}")
                continue
            kind = known[key].type
            try:
                if kind in ("int", int):
                    if isinstance(value, bool) or int(value) != value:
                        raise ValueError
                    value = int(value)
                elif kind in ("float", float):
                    if isinstance(value, bool):
                        raise ValueError
                    value = float(value)
                else:
                    if value is None or isinstance(value, (dict, list)):
                        raise ValueError
                    value = str(value)
            except (TypeError, ValueError):
                problems.append(f"{at}.{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
                continue
            values[key] = value
        for key in ("name", "port", "facility"):
            if not values.get(key) and not any(p.startswith(f"{at}.{key}:") for p in problems):
                problems.append(f"{at}.{key}: required")
        if "port" in values and not 1 <= values["port"] <= 65535:
            problems.append(f"{at}.port: {values['port']} is not 1-65535")
        if values.get("name") in names:
            problems.append(f"{at}.name: {values['name']!r} is used by another listener")
        names.add(values.get("name"))
        if not any(p.startswith(at) for p in problems):
            listeners.append(AstmListenerConfig(**values))
    if problems:
        raise AstmConfigError(problems)
    return tuple(listeners)


def inbound_for(data: bytes, facility: str) -> Inbound:
    """The stored record of one ASTM message (parsed only for its analyzer name)."""
    digest = hashlib.sha256(data).digest()
    analyzer = ""
    try:
        text, _ = records.decode_records(data)
        message = records.parse_records(text)
        analyzer = message.value("H", 5)
    except records.MessageParseError:
        pass  # stored as received; the translation reports the problem with its location
    extra = {"format": FORMAT} if "format" in getattr(Inbound, "__dataclass_fields__", {}) else {}
    return Inbound(raw=data, sha256=digest, outcome=Outcome.ACCEPT, status=MessageStatus.RECEIVED,
                   ack=None, sending_application=analyzer[:227], sending_facility=facility,
                   control_id="sha256:" + digest.hex()[:32], message_type=records.MESSAGE_TYPE,
                   size=len(data), sender_id=facility, **extra)


class AstmIngest:
    """The handler of one ASTM listener: split a transfer into messages, store them."""

    def __init__(self, writer: IngestWriter, now: Callable[[], float] = time.time):
        self.writer = writer
        self.now = now

    def message_received(self, data: bytes, connection: AstmConnection,
                         done: Callable[[bool], None]) -> None:
        text, codec = records.decode_records(data)
        parts = records.split_messages(text)
        if len(parts) > 1:
            items = [inbound_for(part.encode(codec), connection.facility) for part in parts]
        else:
            items = [inbound_for(data, connection.facility)]
        self.writer.submit(IngestJob(items, connection.listener, connection.peer, self.now(),
                                     lambda _job, error: done(error is None)))


def astm_listener_factory(config: AstmListenerConfig, writer: IngestWriter, clock,
                          now: Callable[[], float] = time.time) -> AstmServerFactory:
    """The Twisted factory of one `astm:` listener; join it to an endpoint
    (TCP4ServerEndpoint(reactor, config.port, interface=config.interface))."""
    settings = AstmSettings(config.name, config.facility, config.max_frame_size,
                            config.max_message_size, config.receive_timeout,
                            config.frame_timeout, config.idle_timeout)
    return AstmServerFactory(AstmIngest(writer, now), settings, clock)

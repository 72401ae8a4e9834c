"""ASTM listeners (`listeners.astm` in the configuration): store what analyzers send.

Each complete transfer (ENQ ... EOT) is split into its messages (H ... L) and each is stored
as one `Inbound` (format 'astm', message type 'ASTM', status received, no ACK: E1381 has
already acknowledged every frame); once committed, new messages go to translation like those
that arrive over MLLP. The duplicate key is (analyzer name from H-5, facility,
'sha256:' + 32 hex digits of the bytes): analyzers reuse H-3 freely ('1', or nothing), so only
identical bytes are one message sent twice.
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Callable

from adapters.astm import records
from adapters.astm.protocol import AstmConnection, AstmServerFactory, AstmSettings
from adapters.hl7v2.codes import Outcome
from gateway.config import AstmListenerConfig
from gateway.events import EventBus
from gateway.ingest import telemetry
from gateway.ingest.model import Inbound, MessageStatus
from gateway.ingest.pipeline import pending_translations
from gateway.store.ingest_writer import IngestJob, IngestWriter

if TYPE_CHECKING:
    from gateway.translation.service import TranslationService

FORMAT = "astm"


def inbound_for(data: bytes, facility: str) -> Inbound:
    """The stored record of one ASTM message (parsed only for its analyzer name)."""
    digest = hashlib.sha256(data).digest()
    analyzer = ""
    try:
        text, _ = records.decode_records(data)
        analyzer = records.parse_records(text, header_only=True).value("H", 5)
    except records.MessageParseError:
        pass  # stored as received; the translation reports the problem with its location
    return Inbound(raw=data, sha256=digest, outcome=Outcome.ACCEPT, status=MessageStatus.RECEIVED,
                   ack=None, sending_application=analyzer[:227], sending_facility=facility,
                   control_id="sha256:" + digest.hex()[:32], message_type=records.MESSAGE_TYPE,
                   size=len(data), sender_id=facility, format=FORMAT)


class AstmIngest:
    """The handler of one ASTM listener: split a transfer into messages, store them, then hand
    the new ones to translation (when the gateway translates)."""

    def __init__(self, writer: IngestWriter, now: Callable[[], float] = time.time,
                 translation: "TranslationService | None" = None, events: EventBus | None = None):
        self.writer = writer
        self.events = events if events is not None else EventBus()
        self.now = now
        self.translation = translation

    def message_received(self, data: bytes, connection: AstmConnection,
                         done: Callable[[bool], None]) -> None:
        text, codec = records.decode_records(data)
        parts = records.split_messages(text)
        if len(parts) > 1:
            items = [inbound_for(part.encode(codec), connection.facility) for part in parts]
        else:
            items = [inbound_for(data, connection.facility)]

        def stored(job: IngestJob, error: Exception | None) -> None:
            done(error is None)
            if error is None:
                telemetry.stored(self.events, job)
            else:
                telemetry.not_stored(self.events, data, len(data), job.listener, job.peer)
            if error is None and self.translation is not None:
                pending = pending_translations(job)
                if pending:
                    from gateway.translation.service import TranslationJob

                    self.translation.submit(TranslationJob(pending))

        self.writer.submit(IngestJob(items, connection.listener, connection.peer, self.now(), stored))


def astm_listener_factory(config: AstmListenerConfig, writer: IngestWriter, clock,
                          now: Callable[[], float] = time.time,
                          translation: "TranslationService | None" = None,
                          allowed: Callable[[str], bool] = lambda address: True,
                          events: EventBus | None = None) -> AstmServerFactory:
    """The Twisted factory of one `astm:` listener; join it to an endpoint
    (TCP4ServerEndpoint(reactor, config.port, interface=config.interface))."""
    settings = AstmSettings(config.name, config.facility, config.max_frame_size,
                            config.max_message_size, config.receive_timeout,
                            config.frame_timeout, config.idle_timeout)
    return AstmServerFactory(AstmIngest(writer, now, translation, events), settings, clock, allowed)

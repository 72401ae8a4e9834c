"""What ingest produces: one `Inbound` record per message, ready to be stored, and the
closed set of message statuses."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from adapters.hl7v2.ack import ErrorDetail
from adapters.hl7v2.codes import Outcome
from adapters.hl7v2.header import MessageHeader


class MessageStatus(str, Enum):
    """received -> translated | failed; rejected and ignored are final."""

    RECEIVED = "received"  # stored and acknowledged; waiting for translation
    REJECTED = "rejected"  # answered with a negative ACK; raw bytes kept with the reason
    IGNORED = "ignored"  # an acknowledgement sent to us: stored, never acknowledged; or a
    # message the mapping set does not translate by design (a query): acknowledged, kept
    TRANSLATED = "translated"  # received, then translated into a canonical bundle
    FAILED = "failed"  # received, but the translation failed (see its translation row)


@dataclass(slots=True)
class Inbound:
    """One received message (or unreadable frame) and the answer it will get once stored."""

    raw: bytes
    sha256: bytes
    outcome: Outcome
    status: MessageStatus
    ack: bytes | None  # the ACK to store and send; None when none is due
    error: ErrorDetail | None = None
    sending_application: str | None = None
    sending_facility: str | None = None
    receiving_application: str | None = None
    receiving_facility: str | None = None
    control_id: str | None = None
    message_type: str | None = None
    version: str | None = None
    processing_id: str | None = None
    charset: str | None = None  # MSH-18 as declared
    codec: str | None = None  # the codec that decoded the bytes
    truncated: bool = False  # raw holds only the start of an oversize frame
    size: int = 0  # the size received (larger than len(raw) when truncated)
    sender_id: str | None = None  # the registry facility, when known
    header: MessageHeader | None = None  # kept in memory to answer a reused control id
    # Set by the store: a re-sent message gets the stored ACK and is not stored again.
    duplicate: bool = False
    message_id: int | None = None  # set by the store once committed (None for a duplicate)
    format: str = "hl7v2"  # the input format (gateway.translation.inputs.FORMATS)

    @property
    def deduplicated(self) -> bool:
        """Accepted messages are unique by (MSH-3, MSH-4, MSH-10); refusals are not."""
        return self.outcome is Outcome.ACCEPT and self.status is MessageStatus.RECEIVED

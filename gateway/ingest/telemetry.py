"""The events of ingest (gateway.events): a message stored (message.received), refused
(message.refused: stored with a negative answer, or not stored at all) and answered
(message.acknowledged, with the time from its receipt to the ACK written), and the audit
record of each receipt (`receipt`), which the ingest writer stores with the message.

Only what identifies a message without its content: the control id, the size, the SHA-256 of
the bytes, the type, the ACK code, the refusal's code. Called on the reactor thread once a
frame's messages are committed; a few small objects per message.
"""
from __future__ import annotations

import time
from datetime import datetime
from typing import TYPE_CHECKING

from gateway.audit.chain import AuditEvent
from gateway.events import Event, EventBus
from gateway.ingest.model import Inbound, MessageStatus

if TYPE_CHECKING:
    from gateway.store.ingest_writer import IngestJob

UNKNOWN = "unknown"
# MSA-1 -> the outcome it tells (the enum of adapters.hl7v2.ack.ack_code_of costs more than
# the rest of an event: this runs for every message).
_ACK_OUTCOMES = {b"AA": "success", b"CA": "success", b"AE": "failure", b"CE": "failure",
                 b"AR": "refused", b"CR": "refused"}


def ack_code(ack: bytes) -> bytes | None:
    """MSA-1 of an answer, or None."""
    start = 0 if ack.startswith(b"MSA") else ack.find(b"\rMSA") + 1
    if start == 0 and not ack.startswith(b"MSA"):
        return None
    code = ack[start + 4:start + 6]
    return code if code in _ACK_OUTCOMES else None


def actor_of(item: Inbound) -> str:
    """Who sent it: the registry facility, else the MSH-4 it gave, else "unknown"."""
    return item.sender_id or (item.sending_facility or "")[:64] or UNKNOWN


def refusal_reason(item: Inbound) -> str:
    """A short code for why a message was refused: ERR-5 (our table) or the HL7 condition."""
    error = item.error
    if error is None:
        return "refused"
    if error.app_code is not None:
        return error.app_code.value.lower()
    return error.condition.name.lower()


def stored(events: EventBus, job: "IngestJob") -> None:
    """message.received for each message of a committed frame; message.refused as well for
    those answered with a refusal (kept, as every refusal is). Marked `recorded` when the
    writer put their receipts in the audit trail with them (`receipt`)."""
    listener, peer, recorded = job.listener, job.peer, job.audited
    for item in job.items:
        actor = actor_of(item)
        events.emit(Event("message.received", actor, _subject(item), source=peer, facility=item.sender_id,
                          message_type=item.message_type, listener=listener, recorded=recorded,
                          detail={"control_id": item.control_id, "size": item.size,
                                  "sha256": item.sha256.hex(), "duplicate": item.duplicate}))
        if item.status is MessageStatus.REJECTED:
            events.emit(Event("message.refused", actor, _subject(item), outcome="refused", source=peer,
                              facility=item.sender_id, message_type=item.message_type,
                              listener=listener, recorded=recorded,
                              detail={"control_id": item.control_id, "reason": refusal_reason(item),
                                      "code": item.error.condition.value if item.error else None}))


def answered(events: EventBus, job: "IngestJob", now: float | None = None) -> None:
    """message.acknowledged for each message whose answer was just written. The answer's code
    is in the receipt's audit record, the answer itself in the store: when the receipts were
    recorded, so is this."""
    duration = max(0.0, (time.time() if now is None else now) - job.received_at)
    listener, peer, recorded = job.listener, job.peer, job.audited
    for item in job.items:
        if item.ack is None:
            continue
        code = ack_code(item.ack)
        events.emit(Event("message.acknowledged", actor_of(item), _subject(item), source=peer,
                          facility=item.sender_id, message_type=item.message_type,
                          listener=listener, duration=duration, recorded=recorded,
                          outcome=_ACK_OUTCOMES[code] if code is not None else "success",
                          detail={"control_id": item.control_id,
                                  "ack_code": code.decode("ascii") if code is not None else None}))


def receipt(item: Inbound, listener: str, peer: str, at: datetime) -> AuditEvent:
    """The audit record of a message's receipt, written by the ingest writer in the
    transaction that stores it: message.received (a duplicate too: `duplicate` in its
    detail), or message.refused for a message stored with a refusal; with the code of the
    answer stored with it."""
    code = ack_code(item.ack) if item.ack is not None else None
    detail = {"control_id": item.control_id, "size": item.size, "sha256": item.sha256.hex(),
              "ack_code": code.decode("ascii") if code is not None else None,
              "listener": listener}
    if item.message_type is not None:
        detail["message_type"] = item.message_type
    if item.duplicate:
        detail["duplicate"] = True
    if item.status is MessageStatus.REJECTED:
        detail["reason"] = refusal_reason(item)
        detail["code"] = item.error.condition.value if item.error else None
        return AuditEvent("message.refused", actor_of(item), "refused", _subject(item), peer,
                          detail, at)
    return AuditEvent("message.received", actor_of(item), "success", _subject(item), peer,
                      detail, at)


def _subject(item: Inbound) -> str | None:
    """message/<id> once the writer stored it (None for a duplicate, answered with the stored ACK)."""
    return f"message/{item.message_id}" if item.message_id is not None else None


def not_stored(events: EventBus, payload: bytes, size: int, listener: str, peer: str) -> None:
    """message.refused (outcome failure) for a frame the store could not keep."""
    import hashlib

    events.emit(Event("message.refused", UNKNOWN, outcome="failure", source=peer, listener=listener,
                      detail={"reason": "store_unavailable", "size": size,
                              "sha256": hashlib.sha256(payload).hexdigest()}))

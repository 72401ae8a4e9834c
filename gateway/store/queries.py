"""Read queries on stored messages: functions that take a connection and return dataclasses."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import Connection, func, select

from gateway.store.schema import deliveries, delivery_attempts, message_payloads, messages

_SUMMARY = [messages.c.id, messages.c.control_id, messages.c.sending_application,
            messages.c.sending_facility, messages.c.message_type, messages.c.status,
            messages.c.received_at, messages.c.ack_code, messages.c.size, messages.c.listener,
            messages.c.error_code, messages.c.error_reason, messages.c.duplicate_count]


@dataclass(frozen=True)
class MessageSummary:
    id: int
    control_id: str | None
    sending_application: str | None
    sending_facility: str | None
    message_type: str | None
    status: str
    received_at: str  # ISO 8601, UTC
    ack_code: str | None
    size: int
    listener: str
    error_code: int | None
    error_reason: str | None
    duplicate_count: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MessageDetail:
    summary: MessageSummary
    peer: str | None
    sender_id: str | None
    receiving_application: str | None
    receiving_facility: str | None
    version: str | None
    processing_id: str | None
    charset: str | None
    codec: str | None
    sha256: str
    truncated: bool
    error_location: str | None
    raw: bytes | None  # None once retention expired it
    ack: bytes | None

    @property
    def text(self) -> str | None:
        """The message decoded as it was accepted (undecodable bytes shown as U+FFFD)."""
        return None if self.raw is None else self.raw.decode(self.codec or "utf-8", "replace")

    def as_dict(self) -> dict:
        data = self.summary.as_dict()
        data.update(peer=self.peer, sender_id=self.sender_id,
                    receiving_application=self.receiving_application,
                    receiving_facility=self.receiving_facility, version=self.version,
                    processing_id=self.processing_id, charset=self.charset, codec=self.codec,
                    sha256=self.sha256, truncated=self.truncated, error_location=self.error_location,
                    text=self.text, payload_expired=self.raw is None,
                    ack=self.ack.decode(self.codec or "utf-8", "replace") if self.ack else None)
        return data


def list_messages(connection: Connection, limit: int = 50, status: str | None = None,
                  control_id: str | None = None, before_id: int | None = None) -> list[MessageSummary]:
    """The newest messages first, optionally filtered."""
    query = select(*_SUMMARY).order_by(messages.c.id.desc()).limit(limit)
    if status:
        query = query.where(messages.c.status == status)
    if control_id:
        query = query.where(messages.c.control_id == control_id)
    if before_id:
        query = query.where(messages.c.id < before_id)
    return [_summary(row) for row in connection.execute(query)]


def get_message(connection: Connection, message_id: int) -> MessageDetail | None:
    query = (select(messages, message_payloads.c.raw)
             .select_from(messages.outerjoin(message_payloads,
                                             message_payloads.c.message_id == messages.c.id))
             .where(messages.c.id == message_id))
    row = connection.execute(query).first()
    if row is None:
        return None
    return MessageDetail(_summary(row), row.peer, row.sender_id, row.receiving_application,
                         row.receiving_facility, row.version, row.processing_id, row.charset,
                         row.codec, bytes(row.sha256).hex(), bool(row.truncated), row.error_location,
                         bytes(row.raw) if row.raw is not None else None, bytes(row.ack) if row.ack is not None else None)


@dataclass(frozen=True)
class AttemptView:
    attempted_at: str  # ISO 8601, UTC
    node: str
    outcome: str  # delivered | transient | permanent
    reason: str | None
    code: int | None  # the peer's HTTP status, if it answered
    duration_ms: int | None


@dataclass(frozen=True)
class DeliveryView:
    destination: str
    status: str  # pending | delivered | dead
    attempts: int
    idempotency_key: str
    next_attempt_at: str | None  # while pending
    finished_at: str | None
    last_reason: str | None
    last_code: int | None
    history: tuple[AttemptView, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def deliveries_of(connection: Connection, message_id: int) -> list[DeliveryView]:
    """A message's deliveries, one per destination, each with its attempts, oldest first."""
    rows = connection.execute(select(deliveries).where(deliveries.c.message_id == message_id)
                              .order_by(deliveries.c.id)).all()
    if not rows:
        return []
    history: dict[int, list[AttemptView]] = {row.id: [] for row in rows}
    attempts = connection.execute(
        select(delivery_attempts).where(delivery_attempts.c.delivery_id.in_(list(history)))
        .order_by(delivery_attempts.c.id))
    for attempt in attempts:
        history[attempt.delivery_id].append(AttemptView(
            _iso(attempt.attempted_at), attempt.node, attempt.outcome, attempt.reason,
            attempt.code, attempt.duration_ms))
    return [DeliveryView(row.destination, row.status, row.attempts, row.idempotency_key,
                         _iso(row.next_attempt_at) if row.status == "pending" else None,
                         _iso(row.finished_at) if row.finished_at else None,
                         row.last_reason, row.last_code, tuple(history[row.id]))
            for row in rows]


def count_messages(connection: Connection, status: str | None = None) -> int:
    query = select(func.count()).select_from(messages)
    if status:
        query = query.where(messages.c.status == status)
    return connection.execute(query).scalar_one()


def _summary(row) -> MessageSummary:
    return MessageSummary(row.id, row.control_id, row.sending_application, row.sending_facility,
                          row.message_type, row.status, _iso(row.received_at), row.ack_code,
                          row.size, row.listener, row.error_code, row.error_reason,
                          row.duplicate_count)


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)  # SQLite keeps UTC without its offset
    return value.astimezone(timezone.utc).isoformat()

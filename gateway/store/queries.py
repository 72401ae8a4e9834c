"""Read queries on stored messages: functions that take a connection and return dataclasses."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import Connection, func, select

from gateway.store.schema import messages

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
    raw: bytes
    ack: bytes | None

    @property
    def text(self) -> str:
        """The message decoded as it was accepted (undecodable bytes shown as U+FFFD)."""
        return self.raw.decode(self.codec or "utf-8", "replace")

    def as_dict(self) -> dict:
        data = self.summary.as_dict()
        data.update(peer=self.peer, sender_id=self.sender_id,
                    receiving_application=self.receiving_application,
                    receiving_facility=self.receiving_facility, version=self.version,
                    processing_id=self.processing_id, charset=self.charset, codec=self.codec,
                    sha256=self.sha256, truncated=self.truncated, error_location=self.error_location,
                    text=self.text, ack=self.ack.decode(self.codec or "utf-8", "replace") if self.ack else None)
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
    row = connection.execute(select(messages).where(messages.c.id == message_id)).first()
    if row is None:
        return None
    return MessageDetail(_summary(row), row.peer, row.sender_id, row.receiving_application,
                         row.receiving_facility, row.version, row.processing_id, row.charset,
                         row.codec, bytes(row.sha256).hex(), bool(row.truncated), row.error_location,
                         bytes(row.raw), bytes(row.ack) if row.ack is not None else None)


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

"""What the console reads: functions that take a connection (one transaction, on a pool
thread) and return plain dataclasses, the same on SQLite and PostgreSQL.

The search's conditions are the store's (gateway.store.queries.message_conditions).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, case, func, select

from gateway.console.criteria import SearchCriteria
from gateway.store.queries import message_conditions
from gateway.store.schema import (canonical_bundles, console_sessions, deliveries,
                                  delivery_attempts, facility_certificates, message_payloads,
                                  messages, translations)
from gateway.store.timestamps import utc as _utc

PAGE_SIZE = 50
MAX_ATTEMPTS_SHOWN = 200  # per delivery, newest kept
MAX_RESPONSE_SHOWN = 16 * 1024  # bytes of a peer's answer shown on the page


@dataclass(frozen=True)
class MessageRow:
    id: int
    received_at: datetime
    sender_id: str | None
    sending_application: str | None
    sending_facility: str | None
    control_id: str | None
    message_type: str | None
    status: str
    ack_code: str | None
    size: int
    format: str


@dataclass(frozen=True)
class SearchPage:
    rows: tuple[MessageRow, ...]
    next_before: int | None  # the `before` of the next (older) page, None on the last


_ROW = (messages.c.id, messages.c.received_at, messages.c.sender_id,
        messages.c.sending_application, messages.c.sending_facility, messages.c.control_id,
        messages.c.message_type, messages.c.status, messages.c.ack_code, messages.c.size,
        messages.c.format)


def search_messages(connection: Connection, criteria: SearchCriteria,
                    limit: int = PAGE_SIZE) -> SearchPage:
    """Messages matching every given criterion, newest first, one page."""
    query = (select(*_ROW).where(*message_conditions(criteria, connection.dialect.name))
             .order_by(messages.c.id.desc()).limit(limit + 1))
    rows = [MessageRow(r.id, _utc(r.received_at), r.sender_id, r.sending_application,
                       r.sending_facility, r.control_id, r.message_type, r.status, r.ack_code,
                       r.size, r.format or "hl7v2")
            for r in connection.execute(query)]
    more = len(rows) > limit
    rows = rows[:limit]
    return SearchPage(tuple(rows), rows[-1].id if more else None)


# -- one message ---------------------------------------------------------------------------

@dataclass(frozen=True)
class AttemptRow:
    id: int
    attempted_at: datetime
    node: str
    outcome: str  # delivered | transient | permanent
    reason: str | None
    code: int | None
    duration_ms: int | None
    response: str | None  # the peer's answer, decoded (cut to MAX_RESPONSE_SHOWN)


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    destination: str
    status: str  # pending | delivered | dead
    attempts: int
    idempotency_key: str
    created_at: datetime
    next_attempt_at: datetime | None
    finished_at: datetime | None
    last_reason: str | None
    last_code: int | None
    last_response: str | None
    in_flight: bool  # a node holds a live lease on it
    history: tuple[AttemptRow, ...]
    earlier_attempts: int = 0  # attempts not shown (beyond MAX_ATTEMPTS_SHOWN)


@dataclass(frozen=True)
class TranslationRow:
    status: str
    mapping_version: str | None
    translated_at: datetime
    error_code: int | None
    error_location: str | None
    error_reason: str | None
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class MessageView:
    id: int
    received_at: datetime
    listener: str
    peer: str | None
    sender_id: str | None
    sending_application: str | None
    sending_facility: str | None
    receiving_application: str | None
    receiving_facility: str | None
    control_id: str | None
    message_type: str | None
    version: str | None
    processing_id: str | None
    charset: str | None
    codec: str | None
    format: str
    sha256: str
    size: int
    truncated: bool
    status: str
    ack_code: str | None
    ack: bytes | None
    error_code: int | None
    error_location: str | None
    error_reason: str | None
    duplicate_count: int
    raw: bytes | None  # None: expired by retention
    bundle: str | None  # the canonical bundle's JSON text; None: none, or expired
    translation: TranslationRow | None
    deliveries: tuple[DeliveryRow, ...] = field(default=())

    def decode(self, data: bytes) -> str:
        """Bytes of this message (or its ACK) as text, with its codec; U+FFFD where undecodable."""
        try:
            return data.decode(self.codec or "utf-8", "replace")
        except LookupError:
            return data.decode("utf-8", "replace")


def message_view(connection: Connection, message_id: int, now: datetime) -> MessageView | None:
    row = connection.execute(select(messages).where(messages.c.id == message_id)).first()
    if row is None:
        return None
    raw = connection.execute(select(message_payloads.c.raw)
                             .where(message_payloads.c.message_id == message_id)).scalar()
    bundle = connection.execute(select(canonical_bundles.c.bundle)
                                .where(canonical_bundles.c.message_id == message_id)).scalar()
    translated = connection.execute(select(translations)
                                    .where(translations.c.message_id == message_id)).first()
    translation = None
    if translated is not None:
        warnings = json.loads(translated.warnings) if translated.warnings else []
        translation = TranslationRow(translated.status, translated.mapping_version,
                                     _utc(translated.translated_at), translated.error_code,
                                     translated.error_location, translated.error_reason,
                                     tuple(str(w) for w in warnings))
    return MessageView(
        row.id, _utc(row.received_at), row.listener, row.peer, row.sender_id,
        row.sending_application, row.sending_facility, row.receiving_application,
        row.receiving_facility, row.control_id, row.message_type, row.version, row.processing_id,
        row.charset, row.codec, row.format or "hl7v2", bytes(row.sha256).hex(), row.size,
        bool(row.truncated), row.status, row.ack_code,
        bytes(row.ack) if row.ack is not None else None, row.error_code, row.error_location,
        row.error_reason, row.duplicate_count or 0,
        bytes(raw) if raw is not None else None, bundle, translation,
        tuple(deliveries_of(connection, message_id, now)))


def deliveries_of(connection: Connection, message_id: int, now: datetime) -> list[DeliveryRow]:
    rows = connection.execute(select(deliveries).where(deliveries.c.message_id == message_id)
                              .order_by(deliveries.c.id)).all()
    result = []
    for row in rows:
        count = connection.execute(select(func.count()).select_from(delivery_attempts)
                                   .where(delivery_attempts.c.delivery_id == row.id)).scalar_one()
        attempts = connection.execute(
            select(delivery_attempts).where(delivery_attempts.c.delivery_id == row.id)
            .order_by(delivery_attempts.c.id.desc()).limit(MAX_ATTEMPTS_SHOWN)).all()
        history = tuple(AttemptRow(a.id, _utc(a.attempted_at), a.node, a.outcome, a.reason, a.code,
                                   a.duration_ms, _answer(a.response))
                        for a in reversed(attempts))
        lease = _utc(row.lease_until) if row.lease_until is not None else None
        result.append(DeliveryRow(
            row.id, row.destination, row.status, row.attempts, row.idempotency_key,
            _utc(row.created_at), _utc(row.next_attempt_at) if row.status == "pending" else None,
            _utc(row.finished_at) if row.finished_at is not None else None, row.last_reason,
            row.last_code, _answer(row.last_response),
            row.status == "pending" and lease is not None and lease > now, history,
            max(0, count - len(history))))
    return result


def _answer(data) -> str | None:
    if data is None:
        return None
    data = bytes(data)
    text = data[:MAX_RESPONSE_SHOWN].decode("utf-8", "replace")
    return text + ("\n…" if len(data) > MAX_RESPONSE_SHOWN else "")


# -- destinations -------------------------------------------------------------------------

@dataclass(frozen=True)
class DestinationStats:
    name: str
    pending: int = 0
    delivered: int = 0
    dead: int = 0
    oldest_pending_at: datetime | None = None  # when the oldest waiting delivery was queued
    attempts_last_hour: int = 0
    failures_last_hour: int = 0  # attempts that did not deliver (transient or permanent)

    @property
    def error_rate(self) -> float | None:
        """Failed attempts over attempts in the last hour; None without attempts."""
        if not self.attempts_last_hour:
            return None
        return self.failures_last_hour / self.attempts_last_hour


def destination_stats(connection: Connection, now: datetime) -> dict[str, DestinationStats]:
    """Per destination that has deliveries: queue depth, oldest waiting, totals, and the
    attempts of the last hour."""
    counts: dict[str, dict] = {}
    for row in connection.execute(
            select(deliveries.c.destination, deliveries.c.status, func.count(),
                   func.min(deliveries.c.created_at))
            .group_by(deliveries.c.destination, deliveries.c.status)):
        entry = counts.setdefault(row[0], {})
        entry[row[1]] = row[2]
        if row[1] == "pending":
            entry["oldest"] = _utc(row[3]) if row[3] is not None else None
    failed = case((delivery_attempts.c.outcome != "delivered", 1), else_=0)
    recent = {}
    for row in connection.execute(
            select(deliveries.c.destination, func.count(), func.sum(failed))
            .select_from(delivery_attempts.join(deliveries, deliveries.c.id == delivery_attempts.c.delivery_id))
            .where(delivery_attempts.c.attempted_at >= now - timedelta(hours=1))
            .group_by(deliveries.c.destination)):
        recent[row[0]] = (row[1], int(row[2] or 0))
    stats = {}
    for name in set(counts) | set(recent):
        entry = counts.get(name, {})
        attempts, failures = recent.get(name, (0, 0))
        stats[name] = DestinationStats(name, entry.get("pending", 0), entry.get("delivered", 0),
                                       entry.get("dead", 0), entry.get("oldest"), attempts, failures)
    return stats


# -- facilities, sessions ------------------------------------------------------------------

@dataclass(frozen=True)
class CertificateRow:
    facility_id: str
    sha256: str
    subject: str
    issuer: str | None
    not_after: datetime
    first_seen_at: datetime
    last_seen_at: datetime
    door: str | None


def certificates(connection: Connection) -> list[CertificateRow]:
    """Client certificates seen on the doors, by facility, the one expiring first first."""
    return [CertificateRow(r.facility_id, r.sha256, r.subject, r.issuer, _utc(r.not_after),
                           _utc(r.first_seen_at), _utc(r.last_seen_at), r.door)
            for r in connection.execute(select(facility_certificates).order_by(
                facility_certificates.c.facility_id, facility_certificates.c.not_after))]


@dataclass(frozen=True)
class SessionRow:
    account: str
    role: str
    source: str | None
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


def open_sessions(connection: Connection, now: datetime, idle: float) -> list[SessionRow]:
    """Sessions neither past their maximum age nor idle too long, most recent first."""
    query = (select(console_sessions).where(
        and_(console_sessions.c.expires_at > now,
             console_sessions.c.last_seen_at > now - timedelta(seconds=idle)))
        .order_by(console_sessions.c.last_seen_at.desc()))
    return [SessionRow(r.account, r.role, r.source, _utc(r.created_at), _utc(r.last_seen_at),
                       _utc(r.expires_at)) for r in connection.execute(query)]

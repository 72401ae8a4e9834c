"""Read queries on stored messages: functions that take a connection and return dataclasses.

Patient search: a message matches an identifier when one of the Patients of its canonical
bundle has that identifier value (in that system, when one is given as `SYSTEM|VALUE`), read
from patient_identifiers, written with the bundle: an index lookup, however large the store.
A message without a bundle (waiting, failed, rejected, ignored: read through their partial
indexes, as rare as they are) matches when its raw payload holds the value as a whole HL7
component (`|<id>^`, `|<id>|`, `~<id>^`, `|<id>~`: PID-3's first component, before the
assigning authority; a substring test, instr on SQLite, position on PostgreSQL). Exact and
case-sensitive, no pattern characters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import (Connection, LargeBinary, exists, false, func, literal, literal_column, or_,
                        select, true, union_all)

from gateway.store.schema import (UNBUNDLED, deliveries, delivery_attempts, message_payloads,
                                  messages, patient_identifiers)
from gateway.store.timestamps import utc

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


@dataclass(frozen=True)
class MessageFilter:
    """What a message search asks for: every criterion given must hold."""

    control_id: str | None = None
    patient: str | None = None  # an identifier: VALUE or SYSTEM|VALUE (Patient.identifier, PID-3.1)
    facility: str | None = None  # a registry id or an MSH-4 value (whole, or its first component)
    type: str | None = None  # "ADT", "ADT^A01"
    status: str | None = None
    since: datetime | None = None  # received at or after
    until: datetime | None = None  # received before
    before: int | None = None  # ids below this one (the next page, newest first)


def list_messages(connection: Connection, limit: int = 50, status: str | None = None,
                  control_id: str | None = None, before_id: int | None = None,
                  search: MessageFilter | None = None) -> list[MessageSummary]:
    """The newest messages first, optionally filtered (`search`, and its shortcuts)."""
    search = search or MessageFilter()
    conditions = message_conditions(search, connection.dialect.name)
    conditions += [messages.c.status == status] if status else []
    conditions += [messages.c.control_id == control_id] if control_id else []
    conditions += [messages.c.id < before_id] if before_id else []
    query = select(*_SUMMARY).where(*conditions).order_by(messages.c.id.desc()).limit(limit)
    return [_summary(row) for row in connection.execute(query)]


def message_conditions(search: MessageFilter, dialect: str) -> list:
    """The WHERE conditions of a search on `messages`."""
    conditions = []
    if search.control_id:
        conditions.append(messages.c.control_id == search.control_id)
    if search.facility:  # the registry's id, or MSH-4 whole or by its first component
        conditions.append(or_(messages.c.sender_id == search.facility,
                              messages.c.sending_facility == search.facility,
                              _starts_with(messages.c.sending_facility, search.facility + "^", dialect)))
    if search.type:
        if "^" in search.type:
            conditions.append(messages.c.message_type == search.type)
        else:
            conditions.append(or_(messages.c.message_type == search.type,
                                  _starts_with(messages.c.message_type, search.type + "^", dialect)))
    if search.status:
        conditions.append(messages.c.status == search.status)
    if search.since:
        conditions.append(_time_bound(search.since, lambda at: messages.c.received_at >= at, True))
    if search.until:
        conditions.append(_time_bound(search.until, lambda at: messages.c.received_at < at, False))
    if search.before:
        conditions.append(messages.c.id < search.before)
    if search.patient:
        conditions.append(_patient_clause(search.patient, dialect))
    return conditions


def _time_bound(instant: datetime, condition, lower: bool):
    """`condition` of `instant` in UTC: SQLite stores UTC without its offset and compares the
    wall time given (10:00+01:00 would read as 10:00 UTC). An instant whose UTC is before
    year 1 or after year 9999 bounds nothing, or everything."""
    try:
        return condition(utc(instant))
    except OverflowError:
        early = instant.utcoffset() > timedelta(0)  # before year 1 in UTC, else after 9999
        return true() if early == lower else false()


def is_patient_search(identifier: str) -> bool:
    """Whether `identifier` can be searched: a value, or SYSTEM|VALUE with one bar and a value
    after it. An empty value would match every payload holding an empty field ('||')."""
    system, bar, value = identifier.partition("|")
    return bool(value if bar else identifier) and "|" not in value


def _patient_clause(identifier: str, dialect: str):
    """`VALUE`, or `SYSTEM|VALUE` as FHIR searches write it (`|VALUE`: no system): the system
    narrows the bundles' identifiers; a payload has none, and is matched by the value."""
    system, bar, value = identifier.partition("|")
    if not bar:
        system, value = None, identifier
    indexed = select(patient_identifiers.c.message_id).where(patient_identifiers.c.value == value)
    if system is not None:
        indexed = indexed.where(patient_identifiers.c.system == system)
    return messages.c.id.in_(union_all(
        indexed,
        # Stated as the partial indexes' predicates, so that the planners use them.
        _in_payload(value, lambda m: m.c.status == literal_column("'received'"), dialect),
        _in_payload(value, lambda m: m.c.status.in_([literal_column(f"'{s}'") for s in UNBUNDLED]),
                    dialect)))


def _in_payload(identifier: str, status, dialect: str):
    """The messages of `status` (a condition on the alias given) whose payload holds the
    identifier as a whole component."""
    candidate = messages.alias("candidate")
    raw = identifier.encode("utf-8")
    patterns = [b"|" + raw + b"^", b"|" + raw + b"|", b"~" + raw + b"^", b"|" + raw + b"~"]
    holds = exists().where(message_payloads.c.message_id == candidate.c.id,
                           or_(*(_contains(message_payloads.c.raw, p, dialect) for p in patterns)))
    return select(candidate.c.id).where(status(candidate), holds)


def _contains(column, part: bytes, dialect: str):
    """The bytes of `column` hold `part`, exactly: no pattern characters to escape, and
    case-sensitive (SQLite's LIKE is not)."""
    if dialect == "postgresql":  # bytea: position(), as strpos() is for text only
        return func.position(literal(part, LargeBinary).op("IN")(column)) > 0
    return func.instr(column, part) > 0


def _starts_with(column, prefix: str, dialect: str):
    """`column` begins with `prefix`, case-sensitive as `=` is: SQLite's LIKE ignores the case
    of ASCII letters."""
    if dialect == "sqlite":
        return func.substr(column, 1, len(prefix)) == prefix
    return column.like(_escape(prefix) + "%", escape="\\")


def _escape(text: str) -> str:
    """`text` as a literal inside a LIKE pattern whose escape character is a backslash."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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

"""The translation store: reading messages to translate and writing their translations.

Functions take a connection (one transaction, the caller's) and plain data. Writing is an
upsert keyed by the message id, with the message's deliveries (gateway.store.outbox) in the
same transaction: translation is deterministic, so the same message translated
twice (by two nodes, by the start sweep and the live path, by a replay) leaves one row, the
last. A message's status only moves between received, translated and failed: a refusal or
an ignored ACK is never touched.

With each bundle go its patients' identifiers (patient_identifiers), which the console's
patient search reads instead of the bundles.

On PostgreSQL a batch's translations, statuses, identifiers and deliveries are written with
one statement each, the rows passed as arrays (unnest): a statement per row cost the gateway
and PostgreSQL more than the rows themselves. Bundles still go row by row (see
_write_postgresql).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import orjson
from sqlalchemy import Connection, DateTime, bindparam, literal_column, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from gateway import fhir_json
from gateway.ingest.model import MessageStatus
from gateway.store.outbox import Enqueue, _among, enqueue, withdraw
from gateway.store.schema import canonical_bundles, message_payloads, messages, translations
from gateway.store.schema import patient_identifiers as patient_identifiers_table
from gateway.store.texts import has_control, storable
from gateway.store.timestamps import utc

# Statuses a translation may move a message between.
TRANSLATABLE = (MessageStatus.RECEIVED.value, MessageStatus.TRANSLATED.value,
                MessageStatus.FAILED.value)

# Written out: an expanding IN cannot go into an executemany.
_TRANSLATABLE_SQL = text("messages.status IN (%s)" % ", ".join(f"'{s}'" for s in TRANSLATABLE))
_KEY_SQL = text("SELECT id FROM messages WHERE accepted AND sending_application = :application "
                "AND sending_facility = :facility AND control_id = :control_id")


@dataclass(slots=True)
class Pending:
    """A stored message to translate: by id (the live path has it from the ingest writer's
    insert; sweep, replay), or else by its key (`resolve_message_id`)."""

    message_id: int | None
    key: tuple[str, str, str] | None  # (MSH-3, MSH-4, MSH-10) of an accepted message
    raw: bytes | None  # None: its payload expired (retention) before it was translated (sweep)
    codec: str | None
    format: str
    sender_id: str | None
    received_at: datetime
    message_type: str | None = None
    context: Any = None  # the caller's own (the Inbound being answered)


@dataclass(slots=True)
class TranslationRecord:
    """The outcome of one translation, as stored."""

    status: str  # translated | failed
    mapping_version: str | None
    bundle: dict | None = None
    error_code: int | None = None
    error_location: str | None = None
    error_reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    ack: bytes | None = None  # a new ACK to store (ack_after: translation), else None
    # Where the routes send it (gateway.delivery.routes); enqueued with the translation.
    destinations: tuple[str, ...] = ()
    patient_key: str | None = None  # the ordering key of its deliveries (None: per message)
    retired_keys: tuple[str, ...] = ()  # those of the patients it retires (a merge: the merged one)
    encoded: bytes | None = None  # the bundle as stored, once sealed (`bundle` is then None)
    entries: int = 0  # how many resources the bundle holds (kept when sealed)
    identifiers: tuple[tuple[str, str], ...] = ()  # its patients' (system, value), kept when sealed

    @property
    def failed(self) -> bool:
        return self.status == MessageStatus.FAILED.value

    @property
    def resources(self) -> int:
        return len(self.bundle.get("entry") or ()) if self.bundle is not None else self.entries

    def seal(self) -> None:
        """Encode the bundle as it will be stored and let the dict go. Done right after the
        translation, while its objects are in the CPU's caches, for a translation nothing reads
        again before it is stored: a batch of live bundles (an ORU^R01's is some 450 dicts and
        lists, and their strings) otherwise waits in memory for its transaction, and the next
        translations allocate fresh memory instead of reusing theirs (measured, ORU^R01,
        batches of 64: about 0.15 ms less per message)."""
        if self.bundle is not None:
            self.entries = len(self.bundle.get("entry") or ())
            self.identifiers = patient_identifiers(self.bundle)
            self.encoded = bundle_bytes(self.bundle)
            self.bundle = None

    def patients(self) -> tuple[tuple[str, str], ...]:
        """The (system, value) of each identifier of each Patient of the bundle."""
        return patient_identifiers(self.bundle) if self.bundle is not None else self.identifiers

    def bundle_dict(self) -> dict | None:
        """The bundle as a dict, read back from its bytes when sealed."""
        return orjson.loads(self.encoded) if self.bundle is None and self.encoded is not None else self.bundle

    def stored_bytes(self) -> bytes | None:
        """The bundle as stored (UTF-8 JSON), or None without one."""
        if self.encoded is not None:
            return self.encoded
        return bundle_bytes(self.bundle) if self.bundle is not None else None


@dataclass(frozen=True)
class StoredTranslation:
    message_id: int
    status: str
    mapping_version: str | None
    translated_at: str  # ISO 8601, UTC
    bundle: dict | None
    error_code: int | None
    error_location: str | None
    error_reason: str | None
    warnings: list[str]

    def as_dict(self) -> dict:
        return {"translation_status": self.status, "mapping_version": self.mapping_version,
                "translated_at": self.translated_at, "translation_error_code": self.error_code,
                "translation_error_location": self.error_location,
                "translation_error_reason": self.error_reason,
                "translation_warnings": self.warnings, "bundle": self.bundle}


_PENDING_COLUMNS = (messages.c.id, message_payloads.c.raw, messages.c.codec, messages.c.format,
                    messages.c.sender_id, messages.c.received_at, messages.c.message_type,
                    messages.c.sending_application, messages.c.sending_facility, messages.c.control_id)
# A message whose payload retention expired cannot be translated again: the join leaves it out.
_WITH_PAYLOAD = messages.join(message_payloads, message_payloads.c.message_id == messages.c.id)
# The sweep reads waiting messages whatever their payload: one that expired before its
# translation is stored as failed (raw None) rather than left 'received' for every sweep and
# stale check to find again.
_MAYBE_PAYLOAD = messages.outerjoin(message_payloads, message_payloads.c.message_id == messages.c.id)


def _pending(row) -> Pending:
    # The key as the live path gives it: a sweep's or a replay's translation names the same
    # control id (its audit record, a document's ids: the live path's, not a stand-in's).
    key = ((row.sending_application, row.sending_facility, row.control_id)
           if row.control_id is not None else None)
    return Pending(row.id, key, bytes(row.raw) if row.raw is not None else None, row.codec,
                   row.format or "hl7v2", row.sender_id, utc(row.received_at), row.message_type)


def pending_messages(connection: Connection, after_id: int = 0, limit: int = 256,
                     status: str = MessageStatus.RECEIVED.value,
                     received_before: datetime | None = None) -> list[Pending]:
    """Messages of `status` (received before `received_before`, when given) with an id above
    `after_id`, oldest first, at most `limit`; raw None for one whose payload expired."""
    query = (select(*_PENDING_COLUMNS).select_from(_MAYBE_PAYLOAD)
             .where(_status_is(status), messages.c.id > after_id)
             .order_by(messages.c.id).limit(limit))
    if received_before is not None:
        query = query.where(messages.c.received_at < received_before)
    return [_pending(row) for row in connection.execute(query)]


def oldest_untranslated(connection: Connection) -> datetime | None:
    """When the oldest message still waiting for translation was received (None: none is)."""
    value = connection.execute(select(messages.c.received_at).where(_status_is(_RECEIVED))
                               .order_by(messages.c.id).limit(1)).scalar()
    return utc(value) if value is not None else None


def _status_is(status: str):
    # 'received' as a literal: the planners use the partial index ix_messages_untranslated
    # only for a query that states its predicate, not a parameter's value.
    if status == _RECEIVED:
        return messages.c.status == literal_column("'received'")
    return messages.c.status == status


_RECEIVED = MessageStatus.RECEIVED.value


def messages_by_id(connection: Connection, ids: Iterable[int]) -> list[Pending]:
    """The translatable messages among `ids` (received, translated or failed), by id."""
    ids = list(ids)
    if not ids:
        return []
    query = (select(*_PENDING_COLUMNS).select_from(_WITH_PAYLOAD).where(messages.c.id.in_(ids),
                                              messages.c.status.in_(TRANSLATABLE))
             .order_by(messages.c.id))
    return [_pending(row) for row in connection.execute(query)]


def resolve_message_id(connection: Connection, pending: Pending) -> int | None:
    """The stored id of `pending` (found by its key on the live path, and then kept on it)."""
    if pending.message_id is None and pending.key is not None:
        application, facility, control_id = pending.key
        pending.message_id = connection.execute(_KEY_SQL, {
            "application": application, "facility": facility, "control_id": control_id}).scalar()
    return pending.message_id


def claim_messages(connection: Connection, pendings: Iterable[Pending], waiting_only: bool = True) -> set[int]:
    """Lock the messages of `pendings` for this transaction (their ids resolved) and return the
    ids this transaction may store a translation of: with `waiting_only` (the live path, the
    sweep), those still 'received'; else (a replay) those still translatable.

    Two nodes, or a node's sweep and its live path, may translate the same message: only the
    first to commit stores it (with its audit record, deliveries, prescription step). The
    other, locking the row after that commit, no longer finds it 'received' (PostgreSQL,
    READ COMMITTED: FOR UPDATE reads the row again once its lock is granted); on SQLite
    the write transaction already runs alone. Locked in id order, so two claims never wait on
    each other crosswise."""
    ids = sorted({message_id for message_id in (resolve_message_id(connection, p) for p in pendings)
                  if message_id is not None})
    if not ids:
        return set()
    status = _status_is(_RECEIVED) if waiting_only else messages.c.status.in_(TRANSLATABLE)
    query = select(messages.c.id).where(_among(connection, messages.c.id, ids), status).order_by(messages.c.id)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    return set(connection.execute(query).scalars())


def stored_outcome(connection: Connection, message_id: int) -> tuple[StoredTranslation | None, bytes | None]:
    """The translation stored for a message and the ACK stored with it (what a translation
    that lost the claim answers with: the winner's)."""
    ack = connection.execute(select(messages.c.ack).where(messages.c.id == message_id)).scalar()
    return get_translation(connection, message_id), (bytes(ack) if ack else None)


def replace_ack(connection: Connection, message_id: int, ack: bytes) -> None:
    """Store `ack` as the message's answer (what a re-sent copy gets back)."""
    connection.execute(update(messages).where(messages.c.id == message_id)
                       .values(ack=ack, ack_code=_ack_code(ack)))


def save_translations(connection: Connection, results: list[tuple[Pending, TranslationRecord]],
                      now: datetime | None = None, again: bool = False, due: datetime | None = None) -> int:
    """Upsert the translation rows, move the messages' statuses (and ACKs, where a new one was
    sent); returns how many were written. Messages found by key get their id set. `again`
    (a replay): their pending deliveries the new translation no longer routes are withdrawn
    (gateway.store.outbox.withdraw). Their deliveries are due at `due` (default `now`): the
    worker gives the database's clock, which claims compare with (outbox.shared_clock)."""
    now = now or datetime.now(timezone.utc)
    rows, bundles, unbundled, statuses, acks, outgoing = [], [], [], [], [], []
    routed: dict[int, tuple[frozenset[str], str]] = {}  # again: what each message now routes to
    identified: dict[int, tuple[datetime, tuple[tuple[str, str], ...]]] = {}  # the last translation's
    if connection.dialect.name == "postgresql":
        # One row per message (a statement cannot upsert a row twice), the last translation of
        # it winning, as it would row after row.
        results = list({resolve_message_id(connection, pending): (pending, record)
                        for pending, record in results}.values())
    for pending, record in results:
        if resolve_message_id(connection, pending) is None:
            continue  # not stored under that key (cannot happen after a commit; be safe)
        encoded = record.stored_bytes()
        bundle = encoded.decode("utf-8") if encoded is not None else None
        rows.append({
            "message_id": pending.message_id, "status": record.status,
            "mapping_version": record.mapping_version, "translated_at": now,
            "error_code": record.error_code,
            # A reason may quote a document's value, a location name a long path (gateway.store.texts).
            "error_location": storable(record.error_location, translations.c.error_location.type.length),
            "error_reason": storable(record.error_reason),
            "warnings": json.dumps(record.warnings, ensure_ascii=False) if record.warnings else None,
        })
        if bundle is not None:
            bundles.append({"message_id": pending.message_id, "received_at": pending.received_at,
                            "bundle": bundle})
            identified[pending.message_id] = (pending.received_at, record.patients())
        else:
            identified.pop(pending.message_id, None)
            unbundled.append(pending.message_id)
        statuses.append({"b_id": pending.message_id, "b_status": record.status})
        if record.ack is not None:
            acks.append({"b_id": pending.message_id, "b_ack": record.ack, "b_code": _ack_code(record.ack)})
        if again:
            routed[pending.message_id] = (
                (frozenset(record.destinations), "withdrawn: translated again, the message no longer "
                                                 "routes to this destination")
                if bundle is not None else
                (frozenset(), f"withdrawn: translated again, its translation is now {record.status} "
                              "(nothing to send); replay it once fixed"))
        if bundle is not None and record.destinations:
            digest = hashlib.sha256(encoded).hexdigest()  # = bundle_digest(bundle)
            patient = record.patient_key or f"message/{pending.message_id}"
            outgoing.extend(Enqueue(pending.message_id, destination, patient, digest, record.retired_keys)
                            for destination in record.destinations)
    if not rows:
        return 0
    if connection.dialect.name == "postgresql":
        _write_postgresql(connection, rows, bundles, statuses, now)
    else:
        connection.execute(_upsert(connection, translations, ("message_id",)), rows)
        if bundles:
            connection.execute(_upsert(connection, canonical_bundles, ("message_id", "received_at")), bundles)
        connection.execute(
            update(messages).where(messages.c.id == bindparam("b_id"), _TRANSLATABLE_SQL)
            .values(status=bindparam("b_status")), statuses)
    if unbundled:  # translated again, and failed this time: no stale bundle stays behind
        connection.execute(canonical_bundles.delete().where(canonical_bundles.c.message_id.in_(unbundled)))
    _replace_identifiers(connection, [row["message_id"] for row in rows], identified)
    if acks:
        connection.execute(update(messages).where(messages.c.id == bindparam("b_id"))
                           .values(ack=bindparam("b_ack"), ack_code=bindparam("b_code")), acks)
    withdraw(connection, routed, now)
    enqueue(connection, outgoing, now, due)
    return len(rows)


def _replace_identifiers(connection: Connection, message_ids: list[int],
                         identified: dict[int, tuple[datetime, tuple[tuple[str, str], ...]]]) -> None:
    """The messages' patient identifiers are now those of `identified` (message id ->
    (received_at, identifiers)); a message translated before loses its old ones first (its
    bundle may name other patients now, or none)."""
    rows = [(message_id, received_at, system, value)
            for message_id, (received_at, identifiers) in identified.items()
            for system, value in identifiers]
    if connection.dialect.name == "postgresql":
        connection.execute(_PG_FORGET_IDENTIFIERS, {"ids": message_ids})
        if rows:
            ids, times, systems, values = (list(column) for column in zip(*rows))
            connection.execute(_PG_IDENTIFIERS, {"ids": ids, "times": times, "systems": systems,
                                                 "values": values})
        return
    table = patient_identifiers_table
    connection.execute(table.delete().where(table.c.message_id.in_(message_ids)))
    if rows:
        connection.execute(table.insert(), [{"message_id": message_id, "received_at": received_at,
                                             "system": system, "value": value}
                                            for message_id, received_at, system, value in rows])


_PG_FORGET_IDENTIFIERS = text("DELETE FROM patient_identifiers WHERE message_id = ANY(CAST(:ids AS bigint[]))")
_PG_IDENTIFIERS = text(
    "INSERT INTO patient_identifiers (message_id, received_at, system, value) "
    "SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:times AS timestamptz[]), "
    "CAST(:systems AS text[]), CAST(:values AS text[]))")
IDENTIFIER_LIMIT = 255  # characters of a system or value (longer ones are not indexed)


def patient_identifiers(bundle: dict) -> tuple[tuple[str, str], ...]:
    """The (system, value) of each identifier of each Patient of `bundle` ('' for no system),
    once each, in order; values or systems too long for the index, or holding a control
    character (a hostile or broken message: PostgreSQL's text cannot keep NUL), are left out
    rather than failing their batch."""
    found: dict[tuple[str, str], None] = {}
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict) or resource.get("resourceType") != "Patient":
            continue
        for identifier in resource.get("identifier") or ():
            if not isinstance(identifier, dict):
                continue
            value, system = identifier.get("value"), identifier.get("system") or ""
            if (isinstance(value, str) and value and isinstance(system, str)
                    and len(value) <= IDENTIFIER_LIMIT and len(system) <= IDENTIFIER_LIMIT
                    and not has_control(value) and not has_control(system)):
                found[(system, value)] = None
    return tuple(found)



def bundle_text(bundle: dict) -> str:
    """A bundle as stored: compact UTF-8 JSON, decimals as the sender wrote them
    (gateway.fhir_json)."""
    return bundle_bytes(bundle).decode("utf-8")


def bundle_bytes(bundle: dict) -> bytes:
    """`bundle_text` encoded in UTF-8 (what its digest is taken of)."""
    return fhir_json.dumps(bundle)


# The rows of a batch as arrays, one statement per table (PostgreSQL).
_PG_TRANSLATIONS = text("""
    INSERT INTO translations (message_id, status, mapping_version, translated_at, error_code,
                              error_location, error_reason, warnings)
    SELECT u.message_id, u.status, u.mapping_version, :now, u.error_code, u.error_location,
           u.error_reason, u.warnings
    FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[]), CAST(:versions AS text[]),
                CAST(:codes AS integer[]), CAST(:locations AS text[]), CAST(:reasons AS text[]),
                CAST(:warnings AS text[]))
         AS u(message_id, status, mapping_version, error_code, error_location, error_reason, warnings)
    ON CONFLICT (message_id) DO UPDATE SET
        status = excluded.status, mapping_version = excluded.mapping_version,
        translated_at = excluded.translated_at, error_code = excluded.error_code,
        error_location = excluded.error_location, error_reason = excluded.error_reason,
        warnings = excluded.warnings""").bindparams(bindparam("now", type_=DateTime(timezone=True)))
_PG_STATUSES = text("""
    UPDATE messages SET status = u.status
    FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS text[])) AS u(id, status)
    WHERE messages.id = u.id AND """ + _TRANSLATABLE_SQL.text)


def _write_postgresql(connection: Connection, rows: list[dict], bundles: list[dict],
                      statuses: list[dict], now: datetime) -> None:
    connection.execute(_PG_TRANSLATIONS, {
        "now": now, "ids": [r["message_id"] for r in rows], "statuses": [r["status"] for r in rows],
        "versions": [r["mapping_version"] for r in rows], "codes": [r["error_code"] for r in rows],
        "locations": [r["error_location"] for r in rows], "reasons": [r["error_reason"] for r in rows],
        "warnings": [r["warnings"] for r in rows]})
    if bundles:
        # Row by row: as an array, the texts would be quoted and escaped character by
        # character on the way (measured: eight times the cost of the rows).
        connection.execute(_upsert(connection, canonical_bundles, ("message_id", "received_at")), bundles)
    connection.execute(_PG_STATUSES, {"ids": [s["b_id"] for s in statuses],
                                      "statuses": [s["b_status"] for s in statuses]})


def _upsert(connection: Connection, table, key: tuple[str, ...]):
    insert = (postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert)(table)
    columns = [c.name for c in table.columns if c.name not in key]
    return insert.on_conflict_do_update(index_elements=[table.c[name] for name in key],
                                        set_={name: insert.excluded[name] for name in columns})


def get_translation(connection: Connection, message_id: int) -> StoredTranslation | None:
    """The translation of a message, with its bundle (None once retention expired it)."""
    query = (select(translations, canonical_bundles.c.bundle)
             .select_from(translations.outerjoin(
                 canonical_bundles, canonical_bundles.c.message_id == translations.c.message_id))
             .where(translations.c.message_id == message_id))
    row = connection.execute(query).first()
    if row is None:
        return None
    return StoredTranslation(row.message_id, row.status, row.mapping_version,
                             utc(row.translated_at).isoformat(),
                             fhir_json.loads(row.bundle) if row.bundle else None, row.error_code,
                             row.error_location, row.error_reason,
                             json.loads(row.warnings) if row.warnings else [])


def message_ids(connection: Connection, status: str, limit: int | None = None) -> list[int]:
    """Ids of the messages of `status`, oldest first."""
    query = select(messages.c.id).where(messages.c.status == status).order_by(messages.c.id)
    if limit:
        query = query.limit(limit)
    return list(connection.execute(query).scalars())


def _ack_code(ack: bytes) -> str | None:
    from adapters.hl7v2.ack import ack_code_of

    code = ack_code_of(ack)
    return code.value if code else None

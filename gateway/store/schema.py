"""The database schema, as SQLAlchemy Core tables, in one module. Alembic migrations in
`migrations/versions/` create exactly this; a test compares the two."""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, PrimaryKeyConstraint, String, Table, Text, text)

metadata = MetaData()

# SQLite only makes INTEGER PRIMARY KEY an alias of its rowid (autoincrementing).
Id = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "messages", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("listener", String(64), nullable=False),
    Column("peer", String(128)),
    Column("sender_id", String(64)),  # facility of the registry, when known
    Column("sending_application", String(227)),  # MSH-3, as text
    Column("sending_facility", String(227)),  # MSH-4
    Column("receiving_application", String(227)),  # MSH-5
    Column("receiving_facility", String(227)),  # MSH-6
    Column("control_id", String(199)),  # MSH-10
    Column("message_type", String(32)),  # MSH-9 as CODE^TRIGGER
    Column("version", String(16)),  # MSH-12
    Column("processing_id", String(8)),  # MSH-11
    Column("charset", String(32)),  # MSH-18 as declared
    Column("codec", String(32)),  # the codec that decoded it
    Column("sha256", LargeBinary(32), nullable=False),
    Column("size", Integer, nullable=False),
    Column("truncated", Boolean, nullable=False, default=False),
    Column("status", String(16), nullable=False),  # gateway.ingest.model.MessageStatus
    Column("accepted", Boolean, nullable=False),  # in the duplicate-detection scope
    Column("ack_code", String(2)),
    Column("ack", LargeBinary),  # the ACK sent, byte for byte (replayed to duplicates)
    Column("error_code", Integer),  # HL7 table 0357
    Column("error_location", String(64)),
    Column("error_reason", Text),
    Column("duplicate_count", Integer, nullable=False, default=0, server_default=text("0")),
    # The input format (gateway.translation.inputs.FORMATS); last, as migration 0002 adds it.
    Column("format", String(16), nullable=False, server_default=text("'hl7v2'")),
)

# (MSH-3, MSH-4, MSH-10) identifies an accepted message; refusals may reuse it freely.
Index("ux_messages_control", messages.c.sending_application, messages.c.sending_facility,
      messages.c.control_id, unique=True,
      sqlite_where=messages.c.accepted, postgresql_where=messages.c.accepted)
Index("ix_messages_received_at", messages.c.received_at)
# The messages waiting for translation (the sweep reads them in id order): partial, as small
# as the backlog. Queries must say status = 'received' as a literal to use it.
Index("ix_messages_untranslated", messages.c.id, sqlite_where=text("status = 'received'"),
      postgresql_where=text("status = 'received'"))
# The messages that ended without a bundle (failed, refused, ignored): a patient search reads
# their payloads, as no patient identifier of theirs is indexed. As small as they are rare.
UNBUNDLED = ("failed", "rejected", "ignored")
_UNBUNDLED_SQL = text("status IN (%s)" % ", ".join(f"'{status}'" for status in UNBUNDLED))
Index("ix_messages_unbundled", messages.c.id, sqlite_where=_UNBUNDLED_SQL, postgresql_where=_UNBUNDLED_SQL)

# The translation of an accepted message into a canonical FHIR bundle: one row per message,
# replaced when the message is translated again (replay, a second node, the start sweep).
translations = Table(
    "translations", metadata,
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("status", String(16), nullable=False),  # translated | failed
    Column("mapping_version", String(64)),  # MappingSet.version that made it
    Column("translated_at", DateTime(timezone=True), nullable=False),
    Column("error_code", Integer),  # HL7 table 0357 (failed)
    Column("error_location", String(64)),  # ERR-2 style location, or a mapping key
    Column("error_reason", Text),
    Column("warnings", Text),  # JSON list of strings
)

# The outbox: one row per (message, destination), written in the translation's transaction.
# A row stays `pending` while it waits or is in flight (a node holds it with a lease), then
# becomes `delivered` or `dead` (a permanent refusal, or retries exhausted). Rows of one
# patient go to one destination in message order: a row waits while an earlier one is pending.
deliveries = Table(
    "deliveries", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("destination", String(64), nullable=False),
    Column("patient_key", String(128), nullable=False),  # 'Patient/<id>', else per message
    Column("status", String(16), nullable=False),  # pending | delivered | dead
    Column("idempotency_key", String(64), nullable=False),  # sent with every attempt
    Column("bundle_sha256", String(64), nullable=False),  # of the translation it carries
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("first_attempt_at", DateTime(timezone=True)),
    Column("attempts", Integer, nullable=False, default=0, server_default=text("0")),
    Column("lease_owner", String(64)),  # the node sending it now
    Column("lease_until", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),  # delivered or dead
    Column("last_reason", Text),  # short, no patient data
    Column("last_code", Integer),  # the peer's HTTP status, if it answered
    Column("last_response", LargeBinary),  # the peer's answer (dead letters keep it), capped
)
Index("ux_deliveries_message", deliveries.c.message_id, deliveries.c.destination, unique=True)
Index("ix_deliveries_due", deliveries.c.next_attempt_at,
      sqlite_where=deliveries.c.status == "pending", postgresql_where=deliveries.c.status == "pending")
Index("ix_deliveries_patient", deliveries.c.destination, deliveries.c.patient_key,
      deliveries.c.message_id,
      sqlite_where=deliveries.c.status == "pending", postgresql_where=deliveries.c.status == "pending")
Index("ix_deliveries_status", deliveries.c.status, deliveries.c.destination)
# The claim's window: a destination's pending deliveries in message order (migration 0006).
Index("ix_deliveries_pending", deliveries.c.destination, deliveries.c.message_id,
      sqlite_where=deliveries.c.status == "pending", postgresql_where=deliveries.c.status == "pending")

# Every attempt, for the console and the audit: when, by which node, what came back.
delivery_attempts = Table(
    "delivery_attempts", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("delivery_id", Id, ForeignKey("deliveries.id", ondelete="CASCADE"), nullable=False),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
    Column("node", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),  # delivered | transient | permanent
    Column("reason", Text),
    Column("code", Integer),
    Column("duration_ms", Integer),
    Column("response", LargeBinary),  # the peer's answer, capped (migration 0008)
)
Index("ix_delivery_attempts_delivery", delivery_attempts.c.delivery_id)
# The console's error rate per destination over the last hour (migration 0008).
Index("ix_delivery_attempts_at", delivery_attempts.c.attempted_at)

# -- Data kept for a limited time (issue 6, migration 0008). The bytes received and the
# bundles made from them live apart from the message index above, which stays for duplicate
# detection and the audit, so that each kind expires on its own schedule. On PostgreSQL these
# tables are partitioned by month of their time column (gateway.retention creates the months
# ahead; a DEFAULT partition catches the rest) and expiry drops whole partitions; on SQLite
# expiry is batched deletes. Their time column is in the primary key, as PostgreSQL requires.
PARTITIONED = ("message_payloads", "canonical_bundles", "patient_identifiers", "audit_log")

message_payloads = Table(
    "message_payloads", metadata,
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),  # = messages.received_at
    Column("raw", LargeBinary, nullable=False),  # the bytes received, exactly
    PrimaryKeyConstraint("message_id", "received_at"),
    postgresql_partition_by="RANGE (received_at)",
)

# The canonical FHIR bundle of a translated message (translations holds its status and
# version); keyed by the message's received_at so that it expires with the same months.
canonical_bundles = Table(
    "canonical_bundles", metadata,
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),  # = messages.received_at
    Column("bundle", Text, nullable=False),  # the Bundle as JSON text
    PrimaryKeyConstraint("message_id", "received_at"),
    postgresql_partition_by="RANGE (received_at)",
)

# The identifiers of the patients a translated message is about (each identifier of each
# Patient of its bundle): the console finds a patient's messages here, not by reading bundles.
# Written with the bundle, replaced with it, and expired with it (retention's `canonical`).
patient_identifiers = Table(
    "patient_identifiers", metadata,
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False),  # = messages.received_at
    Column("system", String(255), nullable=False),  # '' for an identifier without one
    Column("value", String(255), nullable=False),
    PrimaryKeyConstraint("message_id", "received_at", "system", "value"),
    postgresql_partition_by="RANGE (received_at)",
)
Index("ix_patient_identifiers_value", patient_identifiers.c.value, patient_identifiers.c.message_id)

# The audit trail: append-only, each record chained to the one before it by SHA-256
# (gateway.audit.chain). `seq` has no gaps; records that retention expired are accounted for
# by a `retention.expired` record naming the last seq and hash it removed.
audit_log = Table(
    "audit_log", metadata,
    Column("seq", BigInteger, nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
    Column("node", String(64), nullable=False),
    Column("action", String(64), nullable=False),  # gateway.events.KINDS
    Column("actor", String(128), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("subject", String(128)),
    Column("source", String(128)),
    Column("detail", Text, nullable=False),  # JSON object; never patient data
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    PrimaryKeyConstraint("seq", "recorded_at"),
    postgresql_partition_by="RANGE (recorded_at)",
)
Index("ix_audit_log_subject", audit_log.c.subject)

# How far each ATNA collector has been sent the trail, so an export resumes after a restart.
audit_exports = Table(
    "audit_exports", metadata,
    Column("collector", String(255), primary_key=True),  # host:port
    Column("last_seq", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Console sessions, in the database so that any node behind the load balancer serves them.
console_sessions = Table(
    "console_sessions", metadata,
    Column("token_sha256", String(64), primary_key=True),  # the cookie holds the token itself
    Column("account", String(64), nullable=False),
    Column("role", String(16), nullable=False),
    Column("csrf_token", String(64), nullable=False),
    Column("source", String(128)),  # the address it logged in from
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
)
Index("ix_console_sessions_expires", console_sessions.c.expires_at)

# Client certificates seen on the doors, per facility: the console shows their expiry.
facility_certificates = Table(
    "facility_certificates", metadata,
    Column("facility_id", String(64), nullable=False),
    Column("sha256", String(64), nullable=False),  # of the DER certificate, hex
    Column("subject", Text, nullable=False),
    Column("issuer", Text),
    Column("not_after", DateTime(timezone=True), nullable=False),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("door", String(64)),  # the listener it was last seen on
    PrimaryKeyConstraint("facility_id", "sha256"),
)

# Tables defined beside the code that owns them (the HTTPS door's idempotency and refusals,
# the prescriptions) register on this metadata when their module is imported: import them
# here so that `metadata` is always the whole schema, whatever was imported first.
from gateway.doors import store as _doors_store  # noqa: E402,F401
from gateway.prescriptions import store as _prescriptions_store  # noqa: E402,F401

"""The database schema, as SQLAlchemy Core tables, in one module. Alembic migrations in
`migrations/versions/` create exactly this; a test compares the two."""
from __future__ import annotations

from sqlalchemy import (BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Table, Text, text)

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
    Column("raw", LargeBinary, nullable=False),
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

# The translation of an accepted message into a canonical FHIR bundle: one row per message,
# replaced when the message is translated again (replay, a second node, the start sweep).
translations = Table(
    "translations", metadata,
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
    Column("status", String(16), nullable=False),  # translated | failed
    Column("mapping_version", String(64)),  # MappingSet.version that made it
    Column("translated_at", DateTime(timezone=True), nullable=False),
    Column("bundle", Text),  # the Bundle as JSON text (translated)
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
)
Index("ix_delivery_attempts_delivery", delivery_attempts.c.delivery_id)

# Tables defined beside the code that owns them (the HTTPS door's idempotency and refusals,
# the prescriptions) register on this metadata when their module is imported: import them
# here so that `metadata` is always the whole schema, whatever was imported first.
from gateway.doors import store as _doors_store  # noqa: E402,F401
from gateway.prescriptions import store as _prescriptions_store  # noqa: E402,F401

"""patient_identifiers: each translated message's patients, by identifier (the console's
patient search), and the messages that ended without a bundle (ix_messages_unbundled)

Before, a patient search read every bundle and payload of the period asked. The identifiers of
the Patients of each bundle are now written with it; this migration extracts those of the
bundles already stored, reading each once (a few minutes per million messages). On PostgreSQL
the table is partitioned by month like canonical_bundles, with which it expires.

Revision ID: 0010
Revises: 0009
"""
from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)
UNBUNDLED = sa.text("status IN ('failed', 'rejected', 'ignored')")
BATCH = 1000  # bundles read at a time


def upgrade() -> None:
    bind = op.get_bind()
    postgresql = bind.dialect.name == "postgresql"
    op.create_table(
        "patient_identifiers",
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("system", sa.String(255), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "received_at", "system", "value"),
        postgresql_partition_by="RANGE (received_at)",
    )
    op.create_index("ix_patient_identifiers_value", "patient_identifiers", ["value", "message_id"])
    op.create_index("ix_messages_unbundled", "messages", ["id"],
                    sqlite_where=UNBUNDLED, postgresql_where=UNBUNDLED)
    if postgresql:
        op.execute("CREATE TABLE patient_identifiers_default PARTITION OF patient_identifiers DEFAULT")
        # The months of the bundles already stored, so that their identifiers land in their
        # months (as in 0008); the gateway adds the months ahead when it starts.
        from gateway.retention.partitions import ensure_partitions

        oldest = bind.execute(sa.text("SELECT min(received_at) FROM canonical_bundles")).scalar()
        if oldest is not None:
            now = datetime.now(timezone.utc)
            months = (now.year - oldest.year) * 12 + now.month - oldest.month
            ensure_partitions(bind, oldest, months_ahead=max(months, 0) + 2,
                              tables=("patient_identifiers",))
    _extract(bind)


def _extract(bind) -> None:
    """The identifiers of every stored bundle, BATCH bundles at a time in message id order."""
    import json

    from gateway.store.translations import patient_identifiers

    table = sa.table("patient_identifiers", sa.column("message_id"), sa.column("received_at", Time),
                     sa.column("system"), sa.column("value"))
    read = sa.text("SELECT message_id, received_at, bundle FROM canonical_bundles "
                   "WHERE message_id > :after ORDER BY message_id LIMIT :batch"
                   ).columns(sa.column("message_id"), sa.column("received_at", Time), sa.column("bundle"))
    after = 0
    while True:
        batch = bind.execute(read, {"after": after, "batch": BATCH}).all()
        if not batch:
            return
        rows = []
        for message_id, received_at, bundle in batch:
            try:
                found = patient_identifiers(json.loads(bundle))
            except (ValueError, AttributeError):
                continue  # not a JSON object: nothing to index
            rows.extend({"message_id": message_id, "received_at": received_at, "system": system,
                         "value": value} for system, value in found)
        if rows:
            bind.execute(table.insert(), rows)
        after = batch[-1][0]


def downgrade() -> None:
    op.drop_index("ix_messages_unbundled", table_name="messages")
    op.drop_index("ix_patient_identifiers_value", table_name="patient_identifiers")
    op.drop_table("patient_identifiers")

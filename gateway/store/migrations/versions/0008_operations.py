"""operations (issue 6): payloads and bundles apart from the message index, the audit trail,
console sessions, certificates seen, and the peer's answer of each delivery attempt

`messages.raw` moves to `message_payloads` and `translations.bundle` to `canonical_bundles`,
both keyed by the message's received_at, so that retention expires them while the index stays.
On PostgreSQL these and `audit_log` are partitioned by range of their time column; this
migration creates each one's DEFAULT partition and gateway.retention adds the months.

Revision ID: 0008
Revises: 0007
"""
from datetime import datetime, timezone

from alembic import op
import sqlalchemy as sa

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Time = sa.DateTime(timezone=True)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"

    op.create_table(
        "message_payloads",
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("message_id", "received_at"),
        postgresql_partition_by="RANGE (received_at)",
    )
    op.create_table(
        "canonical_bundles",
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("received_at", Time, nullable=False),
        sa.Column("bundle", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("message_id", "received_at"),
        postgresql_partition_by="RANGE (received_at)",
    )
    op.create_table(
        "audit_log",
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("recorded_at", Time, nullable=False),
        sa.Column("node", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(128)),
        sa.Column("source", sa.String(128)),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("seq", "recorded_at"),
        postgresql_partition_by="RANGE (recorded_at)",
    )
    op.create_index("ix_audit_log_subject", "audit_log", ["subject"])
    if postgresql:
        for table in ("message_payloads", "canonical_bundles", "audit_log"):
            op.execute(f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
        # The months of the messages already stored (and two ahead) before they are copied,
        # so that they land in their months and not in DEFAULT, which a later month's creation
        # would have to scan under lock. (An empty database gets its months when the gateway
        # starts.)
        from gateway.retention.partitions import ensure_partitions

        bind = op.get_bind()
        oldest = bind.execute(sa.text("SELECT min(received_at) FROM messages")).scalar()
        if oldest is not None:
            now = datetime.now(timezone.utc)
            months = (now.year - oldest.year) * 12 + now.month - oldest.month
            ensure_partitions(bind, oldest, months_ahead=max(months, 0) + 2,
                              tables=("message_payloads", "canonical_bundles", "audit_log"))

    op.execute("INSERT INTO message_payloads (message_id, received_at, raw) "
               "SELECT id, received_at, raw FROM messages")
    op.execute("INSERT INTO canonical_bundles (message_id, received_at, bundle) "
               "SELECT t.message_id, m.received_at, t.bundle FROM translations t "
               "JOIN messages m ON m.id = t.message_id WHERE t.bundle IS NOT NULL")
    # Not a batch (copy and rename) on SQLite: dropping the old `messages` would cascade to
    # the payloads just copied. SQLite 3.35+ drops a plain column in place, as PostgreSQL does.
    op.execute("ALTER TABLE messages DROP COLUMN raw")
    op.execute("ALTER TABLE translations DROP COLUMN bundle")

    op.create_table(
        "audit_exports",
        sa.Column("collector", sa.String(255), primary_key=True),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", Time, nullable=False),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_sha256", sa.String(64), primary_key=True),
        sa.Column("account", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("source", sa.String(128)),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("last_seen_at", Time, nullable=False),
        sa.Column("expires_at", Time, nullable=False),
    )
    op.create_index("ix_console_sessions_expires", "console_sessions", ["expires_at"])
    op.create_table(
        "facility_certificates",
        sa.Column("facility_id", sa.String(64), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("issuer", sa.Text),
        sa.Column("not_after", Time, nullable=False),
        sa.Column("first_seen_at", Time, nullable=False),
        sa.Column("last_seen_at", Time, nullable=False),
        sa.Column("door", sa.String(64)),
        sa.PrimaryKeyConstraint("facility_id", "sha256"),
    )
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.add_column(sa.Column("response", sa.LargeBinary))
    op.create_index("ix_delivery_attempts_at", "delivery_attempts", ["attempted_at"])


def downgrade() -> None:
    op.drop_index("ix_delivery_attempts_at", "delivery_attempts")
    with op.batch_alter_table("delivery_attempts") as batch:
        batch.drop_column("response")
    op.drop_table("facility_certificates")
    op.drop_table("console_sessions")
    op.drop_table("audit_exports")
    with op.batch_alter_table("translations") as batch:
        batch.add_column(sa.Column("bundle", sa.Text))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("raw", sa.LargeBinary))
    op.execute("UPDATE translations SET bundle = (SELECT bundle FROM canonical_bundles c "
               "WHERE c.message_id = translations.message_id)")
    op.execute("UPDATE messages SET raw = (SELECT raw FROM message_payloads p "
               "WHERE p.message_id = messages.id)")
    op.drop_table("audit_log")
    op.drop_table("canonical_bundles")
    op.drop_table("message_payloads")

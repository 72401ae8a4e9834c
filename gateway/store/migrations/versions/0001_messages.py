"""messages: every frame received, its raw bytes, metadata and the ACK sent

Revision ID: 0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listener", sa.String(64), nullable=False),
        sa.Column("peer", sa.String(128)),
        sa.Column("sender_id", sa.String(64)),
        sa.Column("sending_application", sa.String(227)),
        sa.Column("sending_facility", sa.String(227)),
        sa.Column("receiving_application", sa.String(227)),
        sa.Column("receiving_facility", sa.String(227)),
        sa.Column("control_id", sa.String(199)),
        sa.Column("message_type", sa.String(32)),
        sa.Column("version", sa.String(16)),
        sa.Column("processing_id", sa.String(8)),
        sa.Column("charset", sa.String(32)),
        sa.Column("codec", sa.String(32)),
        sa.Column("sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("accepted", sa.Boolean, nullable=False),
        sa.Column("ack_code", sa.String(2)),
        sa.Column("ack", sa.LargeBinary),
        sa.Column("error_code", sa.Integer),
        sa.Column("error_location", sa.String(64)),
        sa.Column("error_reason", sa.Text),
        sa.Column("duplicate_count", sa.Integer, nullable=False, server_default=sa.text("0")),
    )
    op.create_index("ux_messages_control", "messages",
                    ["sending_application", "sending_facility", "control_id"], unique=True,
                    sqlite_where=sa.text("accepted"), postgresql_where=sa.text("accepted"))
    op.create_index("ix_messages_received_at", "messages", ["received_at"])


def downgrade() -> None:
    op.drop_table("messages")

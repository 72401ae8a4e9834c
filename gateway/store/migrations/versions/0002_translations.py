"""translations: messages.format and the canonical bundle (or the failure) of each message

Revision ID: 0002
Revises: 0001
"""
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("messages", sa.Column("format", sa.String(16), nullable=False,
                                        server_default=sa.text("'hl7v2'")))
    op.create_table(
        "translations",
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("mapping_version", sa.String(64)),
        sa.Column("translated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bundle", sa.Text),
        sa.Column("error_code", sa.Integer),
        sa.Column("error_location", sa.String(64)),
        sa.Column("error_reason", sa.Text),
        sa.Column("warnings", sa.Text),
    )


def downgrade() -> None:
    op.drop_table("translations")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("format")

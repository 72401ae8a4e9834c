"""api_requests.claimed_by: which gateway process claimed an Idempotency-Key

A restarted node takes over at once the requests its killed predecessor (same node name,
another process) left `processing`, instead of answering 409 until their lease (a minute)
ends. Rows claimed before this column existed have none and wait for their lease as before.

Revision ID: 0011
Revises: 0010
"""
from alembic import op
import sqlalchemy as sa

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_requests") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(160)))


def downgrade() -> None:
    with op.batch_alter_table("api_requests") as batch:
        batch.drop_column("claimed_by")

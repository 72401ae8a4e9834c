"""deliveries: pending deliveries by destination in message order (the outbox claim's window)

The claim reads the oldest pending deliveries of a destination; without this index it sorts
every pending row (a backlog after an outage: 100,000 rows, each claim) or walks the unique
index over delivered rows too. Partial: only pending rows, so it stays as small as the backlog.

Revision ID: 0006
Revises: 0005
"""
from alembic import op
import sqlalchemy as sa

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_index("ix_deliveries_pending", "deliveries", ["destination", "message_id"],
                    sqlite_where=PENDING, postgresql_where=PENDING)


def downgrade() -> None:
    op.drop_index("ix_deliveries_pending", table_name="deliveries")

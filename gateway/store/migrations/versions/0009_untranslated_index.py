"""messages: the ones still waiting for translation, by id (the sweep's index)

The sweep (at start, after a lost job, and for messages a dead node left behind) reads the
'received' messages in id order. Without this index each of its reads walks the whole table
when there are none (tens of millions of rows on a national node: at every start). Partial:
only messages still 'received', so it stays as small as the backlog where messages are
translated.

Revision ID: 0009
Revises: 0008
"""
from alembic import op
import sqlalchemy as sa

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

RECEIVED = sa.text("status = 'received'")


def upgrade() -> None:
    op.create_index("ix_messages_untranslated", "messages", ["id"],
                    sqlite_where=RECEIVED, postgresql_where=RECEIVED)


def downgrade() -> None:
    op.drop_index("ix_messages_untranslated", table_name="messages")

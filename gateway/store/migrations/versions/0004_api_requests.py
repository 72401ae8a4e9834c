"""api_requests and api_refusals: the HTTPS door's idempotency records and its refusals

Revision ID: 0004
Revises: 0003
"""
from alembic import op
import sqlalchemy as sa

# The tables are defined in the door's own module, on the shared metadata: importing it here
# puts them in `metadata` whenever the schema is migrated, so that the metadata and the
# migrated database always list the same tables (tests compare them).
import gateway.doors.store  # noqa: F401

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_requests",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("facility_id", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(128), nullable=False),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.Integer),
        sa.Column("content_type", sa.String(128)),
        sa.Column("headers", sa.Text),
        sa.Column("response", sa.LargeBinary),
    )
    op.create_index("ux_api_requests_key", "api_requests", ["facility_id", "idempotency_key"],
                    unique=True)
    op.create_index("ix_api_requests_created_at", "api_requests", ["created_at"])
    op.create_table(
        "api_refusals",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("refused_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("listener", sa.String(64), nullable=False),
        sa.Column("peer", sa.String(128)),
        sa.Column("facility_id", sa.String(64)),
        sa.Column("certificate", sa.String(512)),
        sa.Column("door", sa.String(8), nullable=False),
        sa.Column("operation", sa.String(64)),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_index("ix_api_refusals_refused_at", "api_refusals", ["refused_at"])


def downgrade() -> None:
    op.drop_table("api_refusals")
    op.drop_table("api_requests")

"""prescriptions, prescription_lines and dispensations: the e-prescription flow

Revision ID: 0005
Revises: 0004
"""
from alembic import op
import sqlalchemy as sa

# The tables are defined in gateway.prescriptions.store, on the shared metadata: importing it
# here puts them in `metadata` whenever the schema is migrated, so that the metadata and the
# migrated database always list the same tables (tests compare them).
import gateway.prescriptions.store  # noqa: F401

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "prescriptions",
        sa.Column("id", sa.String(16), primary_key=True),
        sa.Column("prescriber_facility", sa.String(64), nullable=False),
        sa.Column("prescriber_inpe", sa.String(64), nullable=False),
        sa.Column("patient_key", sa.String(128)),
        sa.Column("patient_identifiers", sa.Text, nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("source_message_id", Id, sa.ForeignKey("messages.id", ondelete="SET NULL")),
        sa.Column("qr_payload", sa.Text, nullable=False),
        sa.Column("payload", sa.Text),
    )
    op.create_index("ux_prescriptions_message", "prescriptions", ["source_message_id"], unique=True)
    op.create_table(
        "prescription_lines",
        sa.Column("prescription_id", sa.String(16),
                  sa.ForeignKey("prescriptions.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("line", sa.Integer, primary_key=True),
        sa.Column("medication_system", sa.String(128)),
        sa.Column("medication_code", sa.String(64), nullable=False),
        sa.Column("display", sa.Text),
        sa.Column("quantity_milli", sa.BigInteger, nullable=False),
        sa.Column("unit", sa.String(64)),
        sa.Column("dispensed_milli", sa.BigInteger, nullable=False),
        sa.Column("resource", sa.Text),
    )
    op.create_table(
        "dispensations",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("dispensation_id", sa.String(128), nullable=False),
        sa.Column("prescription_id", sa.String(16), sa.ForeignKey("prescriptions.id")),
        sa.Column("line", sa.Integer),
        sa.Column("paper", sa.Boolean, nullable=False),
        sa.Column("dispensing_facility", sa.String(64), nullable=False),
        sa.Column("message_id", Id, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("medication_code", sa.String(64)),
        sa.Column("quantity_milli", sa.BigInteger, nullable=False),
        sa.Column("dedup_key", sa.String(255), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ux_dispensations_dedup", "dispensations", ["dedup_key"], unique=True)
    op.create_index("ix_dispensations_prescription", "dispensations", ["prescription_id", "line"])
    op.create_index("ix_dispensations_message", "dispensations", ["message_id"])


def downgrade() -> None:
    op.drop_table("dispensations")
    op.drop_table("prescription_lines")
    op.drop_table("prescriptions")

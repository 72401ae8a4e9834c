"""prescription_lines.kind: a line is a drug or an act (lab test, imaging examination)

Prescriptions of acts (ORM^O01, OML^O21, FHIR ServiceRequest) share the prescription tables
with drugs; performed acts are kept in `dispensations` like dispensed drugs. Existing lines are
drugs.

Revision ID: 0007
Revises: 0006
"""
from alembic import op
import sqlalchemy as sa

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("prescription_lines") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="drug"))


def downgrade() -> None:
    with op.batch_alter_table("prescription_lines") as batch:
        batch.drop_column("kind")

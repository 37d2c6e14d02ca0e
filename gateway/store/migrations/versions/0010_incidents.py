"""Personal-data incidents: the record of each, the tenants it affects and the notice
each was sent.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 02:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("discovered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("opened_by", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("closing_note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_incidents"),
    )
    op.create_table(
        "incident_tenants",
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(26), nullable=True),
        sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"],
                                name="fk_incident_tenants_incident_id_incidents"),
        sa.PrimaryKeyConstraint("incident_id", "tenant_id", name="pk_incident_tenants"),
    )
    op.create_index("ix_incident_tenants_tenant_id", "incident_tenants", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_incident_tenants_tenant_id", table_name="incident_tenants")
    op.drop_table("incident_tenants")
    op.drop_table("incidents")

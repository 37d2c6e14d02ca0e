"""What the database must remember about subprocessors: when each appeared, the
change notices sent (which start a tenant's objection window), and objections.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 02:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subprocessor_registry",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("removed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("baseline", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_subprocessor_registry")),
    )
    op.create_table(
        "subprocessor_notices",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("subprocessor", sa.String(length=64), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("effective_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message_id", sa.String(length=26), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subprocessor_notices")),
    )
    op.create_index(op.f("ix_subprocessor_notices_tenant_id"), "subprocessor_notices",
                    ["tenant_id"])
    op.create_table(
        "subprocessor_objections",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("subprocessor", sa.String(length=64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_subprocessor_objections")),
    )


def downgrade() -> None:
    op.drop_table("subprocessor_objections")
    op.drop_index(op.f("ix_subprocessor_notices_tenant_id"), table_name="subprocessor_notices")
    op.drop_table("subprocessor_notices")
    op.drop_table("subprocessor_registry")

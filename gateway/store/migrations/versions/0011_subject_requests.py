"""Data-subject requests that reached the processor: forwarded, due, fulfilled.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 02:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subject_requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message_id", sa.String(26), nullable=True),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("fulfilled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fulfilled_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_subject_requests"),
    )
    op.create_index("ix_subject_requests_tenant_id", "subject_requests", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_subject_requests_tenant_id", table_name="subject_requests")
    op.drop_table("subject_requests")

"""Data-subject requests that came by mail: the message each was read from.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 04:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subject_requests", sa.Column("source_id", sa.String(26), nullable=True))
    op.create_index("ux_subject_requests_source_id", "subject_requests", ["source_id"],
                    unique=True)


def downgrade() -> None:
    op.drop_index("ux_subject_requests_source_id", table_name="subject_requests")
    with op.batch_alter_table("subject_requests") as batch:
        batch.drop_column("source_id")

"""Inbound authentication results: per message, the DKIM result of each signature,
and the Authentication-Results field the gateway adds to what it delivers.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 04:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("auth_results", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("auth_header", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("auth_header")
        batch.drop_column("auth_results")

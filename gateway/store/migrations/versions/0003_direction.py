"""Messages know their direction (inbound or outbound) and who submitted them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 00:20:02.449135
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("direction", sa.String(length=8), server_default="inbound", nullable=False)
        )
        batch_op.add_column(sa.Column("submitted_by", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("submitted_by")
        batch_op.drop_column("direction")

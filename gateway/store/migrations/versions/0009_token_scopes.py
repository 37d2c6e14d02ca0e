"""Admin API token scopes: what a token may do (read, export, erase, admin).  Tokens made
before scopes existed could read, export and erase, and keep exactly that.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 02:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.add_column(sa.Column("scopes", sa.Text(), nullable=False,
                                   server_default="read export erase"))


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_column("scopes")

"""The web console's users and sessions.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 15:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("login", sa.String(254), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("login", name="pk_console_users"),
    )
    op.create_index("ix_console_users_tenant_id", "console_users", ["tenant_id"])
    op.create_table(
        "console_sessions",
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("login", sa.String(254), nullable=True),
        sa.Column("token_id", sa.String(12), nullable=True),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("secret_sha256", name="pk_console_sessions"),
    )
    op.create_index("ix_console_sessions_tenant_id", "console_sessions", ["tenant_id"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_tenant_id", table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_index("ix_console_users_tenant_id", table_name="console_users")
    op.drop_table("console_users")

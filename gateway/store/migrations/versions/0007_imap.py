"""Mailbox import: where each imported folder stands, and what was imported from it;
and per delivery whether its last attempt may have reached the server.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("uncertain", sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    op.create_table(
        "imap_folders",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("last_uid", sa.BigInteger(), nullable=False),
        sa.Column("done_uid", sa.BigInteger(), nullable=False),
        sa.Column("imported", sa.Integer(), nullable=False),
        sa.Column("backlog", sa.Integer(), nullable=False),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("tenant_id", "source", "folder", name="pk_imap_folders"),
    )
    op.create_table(
        "imap_imports",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(64), nullable=False),
        sa.Column("folder", sa.String(255), nullable=False),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=False),
        sa.Column("uid", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(26), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("msgid_hash", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_imap_imports"),
    )
    op.create_index("ix_imap_imports_folder_uid", "imap_imports",
                    ["tenant_id", "source", "folder", "uidvalidity", "uid"])
    op.create_index("ix_imap_imports_sha256", "imap_imports", ["tenant_id", "source", "sha256"])
    op.create_index("ix_imap_imports_msgid_hash", "imap_imports",
                    ["tenant_id", "source", "msgid_hash"])


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_column("uncertain")
    op.drop_table("imap_imports")
    op.drop_table("imap_folders")

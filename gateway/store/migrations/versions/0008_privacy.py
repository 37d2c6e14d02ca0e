"""Privacy: the audit chain, tenant deactivation, the key that sealed each original, and
indexes that let erasure find a
person's mail without reading every row (addresses and copy recipients in lower case,
imported messages by our id); admin API tokens and exports.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=True))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("message_blobs") as batch:
        batch.add_column(sa.Column("key_id", sa.String(90), nullable=True))
    op.drop_index("ix_message_addresses_address", table_name="message_addresses")
    op.create_index("ix_message_addresses_lower_address", "message_addresses",
                    [sa.text("lower(address)")])
    op.create_index("ix_deliveries_lower_recipient", "deliveries", [sa.text("lower(recipient)")])
    op.create_index("ix_imap_imports_message_id", "imap_imports", ["message_id"])
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(12), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
    )
    op.create_index("ix_api_tokens_tenant_id", "api_tokens", ["tenant_id"])
    op.create_table(
        "api_exports",
        sa.Column("id", sa.String(26), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(64), nullable=True),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_exports"),
    )
    op.create_index("ix_api_exports_tenant_id", "api_exports", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("api_exports")
    op.drop_table("api_tokens")
    op.drop_index("ix_imap_imports_message_id", table_name="imap_imports")
    op.drop_index("ix_deliveries_lower_recipient", table_name="deliveries")
    op.drop_index("ix_message_addresses_lower_address", table_name="message_addresses")
    op.create_index("ix_message_addresses_address", "message_addresses", ["address"])
    with op.batch_alter_table("message_blobs") as batch:
        batch.drop_column("key_id")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("deactivated_at")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")

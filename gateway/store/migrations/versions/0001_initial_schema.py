"""Initial schema: tenants, messages, raw originals, addresses, audit events.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 23:20:56.177647
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=26), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.String(length=26), nullable=False),
        sa.Column("tenant_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("mail_from", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("client_address", sa.String(length=64), nullable=False),
        sa.Column("helo", sa.Text(), nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("trace_header", sa.Text(), nullable=False),
        sa.Column("smtputf8", sa.Boolean(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("header_from", sa.Text(), nullable=True),
        sa.Column("header_to", sa.Text(), nullable=True),
        sa.Column("header_cc", sa.Text(), nullable=True),
        sa.Column("subject", sa.Text(), nullable=True),
        sa.Column("date", sa.Text(), nullable=True),
        sa.Column("attachments", sa.JSON(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("defects", sa.JSON(), nullable=True),
        sa.Column("parse_failed", sa.Boolean(), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_messages_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("ix_messages_status_id", ["status", "id"], unique=False)
        batch_op.create_index("ix_messages_tenant_id_id", ["tenant_id", "id"], unique=False)

    op.create_table(
        "message_addresses",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("message_id", sa.String(length=26), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("address", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_message_addresses_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_addresses")),
    )
    with op.batch_alter_table("message_addresses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_message_addresses_address"), ["address"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_message_addresses_message_id"), ["message_id"], unique=False
        )

    op.create_table(
        "message_blobs",
        sa.Column("message_id", sa.String(length=26), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_message_blobs_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("message_id", name=op.f("pk_message_blobs")),
    )


def downgrade() -> None:
    op.drop_table("message_blobs")
    with op.batch_alter_table("message_addresses", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_message_addresses_message_id"))
        batch_op.drop_index(batch_op.f("ix_message_addresses_address"))

    op.drop_table("message_addresses")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_tenant_id_id")
        batch_op.drop_index("ix_messages_status_id")

    op.drop_table("messages")
    op.drop_table("tenants")
    op.drop_table("audit_events")

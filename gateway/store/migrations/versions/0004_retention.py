"""Messages carry their tags in one sortable text, so the retention sweep can use an index.

Each processed message also records the version of the policy set that
tagged and routed it.

``tag_key`` is the message's tags, sorted and comma-joined ('' for none).  The
sweep asks the policy once per (tenant, tag_key) and deletes by the index
(tenant_id, tag_key, received_at) instead of reading every row's JSON.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 10:05:00
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tag_key", sa.Text(), server_default="", nullable=False)
        )
        batch_op.add_column(sa.Column("policy_version", sa.String(length=16), nullable=True))
        batch_op.create_index(
            "ix_messages_tenant_id_tag_key_received_at",
            ["tenant_id", "tag_key", "received_at"],
        )
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, tags FROM messages")).all()
    for message_id, tags in rows:
        values = json.loads(tags) if isinstance(tags, str) else tags
        if values:
            conn.execute(sa.text("UPDATE messages SET tag_key = :k WHERE id = :i"),
                         {"k": ",".join(sorted(set(values))), "i": message_id})


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_tenant_id_tag_key_received_at")
        batch_op.drop_column("policy_version")
        batch_op.drop_column("tag_key")

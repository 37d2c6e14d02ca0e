"""PostgreSQL: the search index's entries ordered by tenant and id, and by nothing else,
so that the newest matches of a common word are found through the tenant's own entries
(SQLite's FTS5 has its own order).  The primary key becomes (tenant_id, message_id); a
hash index serves lookups by id; the index on the tenant alone goes.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 16:20:00
"""

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.drop_constraint("pk_message_search", "message_search", type_="primary")
    op.create_primary_key("pk_message_search", "message_search", ["tenant_id", "message_id"])
    op.create_index("ix_message_search_message_id", "message_search", ["message_id"],
                    postgresql_using="hash")
    op.drop_index("ix_message_search_tenant_id", table_name="message_search")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.create_index("ix_message_search_tenant_id", "message_search", ["tenant_id"])
    op.drop_index("ix_message_search_message_id", table_name="message_search")
    op.drop_constraint("pk_message_search", "message_search", type_="primary")
    op.create_primary_key("pk_message_search", "message_search", ["message_id"])

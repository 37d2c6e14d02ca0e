"""The search index: an FTS5 table on SQLite, a tsvector under a GIN index on PostgreSQL.

Mail stored before this revision is not in it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 13:00:00
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import TSVECTOR

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # AUTOINCREMENT: a rowid is never given again, so an index entry left behind
        # could never name another message
        op.execute("CREATE TABLE message_search_rows ("
                   "id INTEGER PRIMARY KEY AUTOINCREMENT, "
                   "message_id VARCHAR(26) NOT NULL UNIQUE "
                   "REFERENCES messages (id) ON DELETE CASCADE)")
        op.execute("CREATE VIRTUAL TABLE message_search USING fts5("
                   "tenant, subject, sender, recipients, body, attachments, facets, "
                   "tokenize = 'unicode61 remove_diacritics 2')")
        return
    op.create_table(
        "message_search",
        sa.Column("message_id", sa.String(26), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("sender", sa.Text(), nullable=False),
        sa.Column("recipients", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("attachments", sa.Text(), nullable=False),
        sa.Column("facets", sa.Text(), nullable=False),
        sa.Column("document", TSVECTOR(), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], ondelete="CASCADE",
                                name="fk_message_search_message_id_messages"),
        sa.PrimaryKeyConstraint("message_id", name="pk_message_search"),
    )
    op.create_index("ix_message_search_tenant_id", "message_search", ["tenant_id"])
    op.create_index("ix_message_search_document", "message_search", ["document"],
                    postgresql_using="gin")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE message_search")
        op.execute("DROP TABLE message_search_rows")
        return
    op.drop_table("message_search")

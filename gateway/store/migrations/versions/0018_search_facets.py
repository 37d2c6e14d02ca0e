"""The search index's facets: a token for each tag beside ``attachment``, and on
PostgreSQL each word of the subject and the addresses also as a lexeme of its field
(``subject:word``) and each facet as ``facet:token``, so that ``tag:``,
``has:attachment`` and a field's word are found in the index exactly.

Entries made before lack them; rewriting them here would hold the upgrade for minutes
a million messages (an FTS5 row is tokenized again whole).  They are listed in
``search_backfill`` instead (on SQLite those of tagged mail, on PostgreSQL every one),
which ``messages reindex`` empties beside the running daemon; until it is empty,
queries do without the facets (gateway.store.search).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "search_backfill",
        sa.Column("message_id", sa.String(26), nullable=False),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"], ondelete="CASCADE",
                                name="fk_search_backfill_message_id_messages"),
        sa.PrimaryKeyConstraint("message_id", name="pk_search_backfill"),
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute("INSERT INTO search_backfill (message_id) SELECT r.message_id "
                   "FROM message_search_rows AS r JOIN messages AS m ON m.id = r.message_id "
                   "WHERE m.tag_key != ''")
    else:
        op.execute("INSERT INTO search_backfill (message_id) "
                   "SELECT message_id FROM message_search")


def downgrade() -> None:
    """The facets column back to ``attachment`` or nothing, as revision 0017's queries
    read it (the lexemes with a colon stay: no query of theirs asks for one)."""
    op.drop_table("search_backfill")
    if op.get_bind().dialect.name != "sqlite":  # SQLite's look for the token
        op.execute("UPDATE message_search SET facets = CASE WHEN facets LIKE 'attachment%' "
                   "THEN 'attachment' ELSE '' END WHERE facets != ''")

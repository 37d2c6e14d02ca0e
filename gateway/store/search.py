"""The full-text index of stored mail and the queries on it: SQLite's FTS5 on the
embedded default, PostgreSQL's full-text search (a tsvector under a GIN index) there.

Besides its words, an entry holds facets: ``attachment`` for a message with one and
a token for each tag, so that ``tag:`` and ``has:attachment`` next to words narrow the
index's own lists of matches instead of filtering messages one by one; on PostgreSQL
also each word of the subject and the addresses once more as a lexeme of its field
(``subject:word``), which the GIN index finds exactly where a weight label
(``'word':A``) would have every entry holding the word read and checked.

A message is indexed in the transaction that records its parse results
(``MessageStore.finish_many``) and leaves the index in the one that deletes it
(``retention._delete_messages``: retention, erasure, deactivation). On SQLite an
FTS5 delete leaves the words in the index's older segments until they are merged;
``scrub_index`` merges them all (erasure and purge call it), so that no trace of an
erased message stays in the database file. Words are compared as ``query.words``
gives them on both: case and accents folded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    cast,
    column,
    delete,
    exists,
    func,
    literal,
    literal_column,
    select,
    table,
    text,
)
from sqlalchemy.dialects.postgresql import TSQUERY

from gateway.clock import aware
from gateway.query import START, STOP, Query, Term, clean, segments, words
from gateway.records import tags_of
from gateway.store import audit
from gateway.store.base import StoreBase
from gateway.store.models import message_search, messages, search_backfill

# FTS5 columns, and PostgreSQL's weights, of the fields a query can name
_COLUMN = {"from": "sender", "to": "recipients", "subject": "subject"}
_WEIGHT = {"from": "B", "to": "C", "subject": "A"}
_ANY = "{subject sender recipients body attachments}"  # not tenant, nor facets
SNIPPET_WORDS = 16
# matches ranked at most, the newest, when a query has no filter on the messages
# (PostgreSQL: and no field or prefix)
RANKED = 10_000
# PostgreSQL's ts_rank_cd weights, D C B A: the subject weighs most, then the addresses
_PG_WEIGHTS: Any = literal_column("'{0.25, 0.5, 0.5, 1.0}'::float4[]")

# PostgreSQL's memory for a search's sorts and bitmaps, for this transaction only: with
# the default 4 MB the bitmap of a prefix's matches in a million messages went lossy,
# and every entry of its lossy pages was read and checked again (2.5 s, 0.65 s here)
_PG_WORK_MEM = text("SET LOCAL work_mem = '32MB'")

_PG_INSERT = text(
    "INSERT INTO message_search (message_id, tenant_id, subject, sender, recipients, "
    "body, attachments, facets, document) VALUES (:message_id, :tenant_id, :subject, "
    ":sender, :recipients, :body, :attachments, :facets, "
    "setweight(to_tsvector('simple', :w_subject), 'A') || "
    "setweight(to_tsvector('simple', :w_sender), 'B') || "
    "setweight(to_tsvector('simple', :w_recipients), 'C') || "
    "to_tsvector('simple', :w_rest) || "
    "array_to_tsvector(CAST(:w_lexemes AS text[])))")


def facets(tags: Iterable[str], attachment: bool) -> str:
    """The facet tokens of an entry: one for an attachment, one for each tag."""
    return " ".join((["attachment"] if attachment else []) + [_tag_token(t) for t in tags])


def _tag_token(tag: str) -> str:
    # a tag name has . and - in it, which the tokenizer would split at
    return "g" + tag.encode().hex()


def _pg_lexemes(row: dict[str, str]) -> list[str]:
    """The lexemes of an entry's fields and facets: ``subject:word``, ``facet:token``
    (a word of text never has a colon in it)."""
    out = {f"facet:{t}" for t in row["facets"].split()}
    for name, field in _COLUMN.items():
        out.update(f"{name}:{w}" for w in words(row[field]))
    return sorted(out)


def _tenant_token(tenant: str) -> str:
    """The one word of the FTS5 tenant column that only this tenant's rows hold."""
    return "t" + tenant.encode().hex()


def index(conn: Connection, rows: Sequence[dict[str, str]]) -> None:
    """Index messages (each row: message_id, tenant_id and the text of each field),
    replacing what was indexed of them, in the caller's transaction."""
    if not rows:
        return
    unindex(conn, [r["message_id"] for r in rows])
    if conn.dialect.name == "sqlite":
        ids = [r["message_id"] for r in rows]
        conn.execute(text("INSERT INTO message_search_rows (message_id) VALUES (:m)"),
                     [{"m": i} for i in ids])
        rowid = {m: i for m, i in conn.execute(
            text("SELECT message_id, id FROM message_search_rows WHERE message_id IN :ids")
            .bindparams(bindparam("ids", expanding=True)), {"ids": ids})}
        conn.execute(text(
            "INSERT INTO message_search (rowid, tenant, subject, sender, recipients, "
            "body, attachments, facets) VALUES (:rowid, :tenant, :subject, :sender, "
            ":recipients, :body, :attachments, :facets)"),
            [{**r, "rowid": rowid[r["message_id"]], "tenant": _tenant_token(r["tenant_id"])}
             for r in rows])
        return
    conn.execute(_PG_INSERT, [
        {**r, "w_subject": _plain(r["subject"]), "w_sender": _plain(r["sender"]),
         "w_recipients": _plain(r["recipients"]),
         "w_rest": _plain(f"{r['body']} {r['attachments']}"), "w_lexemes": _pg_lexemes(r)}
        for r in rows])


# SQLite's rowids of the index (a table of migration 0015, not of models)
_ROWS = table("message_search_rows", column("id"), column("message_id"))


def indexed(message_id: Any, sqlite: bool) -> Any:
    """Whether the message with this id (a column of messages) is in the index."""
    rows = _ROWS if sqlite else message_search
    return exists().where(rows.c.message_id == message_id)


def _in_index(query: Query) -> bool:
    """Whether the index answers a query (words, or has:attachment; its tags then
    too), or the messages alone do (tags and days only)."""
    return bool(query.terms or query.has_attachment)


def _pg_rank(document: Any, tsquery: Any) -> Any:
    return func.ts_rank_cd(_PG_WEIGHTS, document, tsquery)


def _plain(value: str) -> str:
    """A field's words, folded as queries are, for PostgreSQL's 'simple' parser."""
    return " ".join(words(value))


def unindex(conn: Connection, ids: Sequence[str]) -> None:
    """Take messages out of the index, in the caller's transaction."""
    if not ids:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(delete(message_search).where(message_search.c.message_id.in_(ids)))
        return
    rowids = list(conn.execute(
        text("SELECT id FROM message_search_rows WHERE message_id IN :ids")
        .bindparams(bindparam("ids", expanding=True)), {"ids": list(ids)}).scalars())
    if rowids:
        conn.execute(text("DELETE FROM message_search WHERE rowid IN :r")
                     .bindparams(bindparam("r", expanding=True)), {"r": rowids})
        conn.execute(text("DELETE FROM message_search_rows WHERE id IN :r")
                     .bindparams(bindparam("r", expanding=True)), {"r": rowids})


def fields(tenant_id: str, message_id: str, header_from: str | None, header_to: str | None,
           header_cc: str | None, subject: str | None, body: str,
           attachments: Iterable[dict[str, Any]],
           addresses: Iterable[tuple[str, str]], tags: Iterable[str] = ()) -> dict[str, str]:
    """The row ``index`` takes for one message: its text by field (``body`` as the
    parse stage gives it, cleaned already: query.clean) and its facets."""
    by_role: dict[str, list[str]] = {}
    for role, address in addresses:
        by_role.setdefault(role, []).append(address)

    def joined(*parts: Iterable[str | None]) -> str:
        return " ".join(dict.fromkeys(p for part in parts for p in part if p))

    names = [a.get("filename") or "" for a in attachments]
    return {
        "message_id": message_id, "tenant_id": tenant_id, "subject": clean(subject or ""),
        "sender": clean(joined([header_from], *(by_role.get(r, ()) for r in
                                                ("mail_from", "from", "sender", "reply_to")))),
        "recipients": clean(joined([header_to, header_cc], *(by_role.get(r, ()) for r in
                                                             ("rcpt_to", "to", "cc", "bcc")))),
        "body": body, "attachments": clean(" ".join(n for n in names if n)),
        "facets": facets(tags, bool(names)),
    }


def _fts_term(term: Term) -> str:
    # words are letters and digits only: nothing in them needs quoting but the quotes
    phrase = '"' + " ".join(term.words) + '"' + ("*" if term.prefix else "")
    return f"{_COLUMN[term.field]} : {phrase}" if term.field else f"{_ANY} : {phrase}"


def _facet_tokens(query: Query) -> list[str]:
    return (["attachment"] if query.has_attachment else []) + [_tag_token(t) for t in query.tags]


def _pg_lexeme_term(term: Term) -> str | None:
    """A field's word or prefix as its field lexeme (exact in the GIN index); None for
    what needs the weighted words (a phrase, a word in any field)."""
    if term.field is None or len(term.words) != 1:
        return None
    return f"'{term.field}:{term.words[0]}'" + (":*" if term.prefix else "")


def _pg_term(term: Term) -> str:
    weight = _WEIGHT.get(term.field or "", "")
    last = len(term.words) - 1
    labels = ["*" + weight if term.prefix and n == last else weight
              for n in range(len(term.words))]
    return "(" + " <-> ".join(f"'{w}'" + (f":{label}" if label else "")
                              for w, label in zip(term.words, labels, strict=True)) + ")"


class SearchStore(StoreBase):
    """Queries on the index, and its upkeep after an erasure."""

    def search_for(self, actor: str, tenant: str, query: Query, limit: int,
                   offset: int = 0) -> list[dict[str, Any]]:
        """``search`` as a person asks it (the command, the API): who looked into whose
        mail goes into the audit log, what they looked for only as a digest, since it
        may name a person."""
        found = self.search(tenant, query, limit, offset)
        with self.writing() as conn:
            audit.append(conn, self.audit_key, actor=actor, action="message.search",
                         tenant_id=tenant, detail={
                             "query_sha256": hashlib.sha256(query.text.encode()).hexdigest(),
                             "results": len(found)})
        return found

    def search(self, tenant: str, query: Query, limit: int, offset: int = 0
               ) -> list[dict[str, Any]]:
        """One page of a tenant's messages that match, best first (newest first when
        the query has no words): the message's summary and a snippet of where it
        matched, as {text, match} pieces (query.segments).  The page is ranked first,
        then only its messages get snippets."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            # entries indexed before revision 0018 lack their tags (and on PostgreSQL
            # their fields' lexemes and facets) until ``backfill`` has given them
            # theirs: until then the index is asked without them, messages by tag
            exact = conn.execute(select(search_backfill.c.message_id).limit(1)).first() is None
            if not self._sqlite:
                conn.execute(_PG_WORK_MEM)
            tags_in_index = exact and _in_index(query)
            where: list[Any] = [messages.c.tenant_id == tenant]
            if not tags_in_index:
                for tag in query.tags:
                    where.append((literal(",") + messages.c.tag_key + literal(","))
                                 .contains(f",{tag},", autoescape=True))
            if query.before is not None:
                where.append(messages.c.received_at < query.before)
            if query.after is not None:
                where.append(messages.c.received_at >= query.after)
            # without a filter on the messages only the newest RANKED matches are ranked
            ranked = len(where) == 1
            asked = query if tags_in_index else replace(query, tags=())
            if self._sqlite:
                match = self._match(tenant, asked)
                page = self._sqlite_page(asked, match, where, limit, offset, ranked)
            else:
                tsquery = self._tsquery(asked, exact)
                page = self._pg_page(asked, tsquery, where, limit, offset, tenant,
                                     ranked, exact)
            ids = [r.id for r in conn.execute(page)]
            if not ids:
                return []
            rows = {r.id: r for r in conn.execute(
                select(messages.c.id, messages.c.received_at, messages.c.status,
                       messages.c.mail_from, messages.c.header_from, messages.c.subject,
                       messages.c.tags).where(messages.c.id.in_(ids),
                                              messages.c.tenant_id == tenant))}
            if not _in_index(query):
                snippets: dict[str, str] = {}
            elif self._sqlite:
                snippets = self._sqlite_snippets(
                    conn, match, ids, any(t.prefix for t in query.terms))
            else:
                snippets = self._pg_snippets(conn, query, ids) if query.terms else {}
        return [{"id": r.id, "received_at": aware(r.received_at), "status": r.status,
                 "sender": r.mail_from, "from": r.header_from, "subject": r.subject,
                 "tags": r.tags or [], "snippet": segments(snippets.get(r.id, ""))}
                for r in (rows[i] for i in ids if i in rows)]

    @staticmethod
    def _match(tenant: str, query: Query) -> str:
        return " AND ".join([f'tenant : "{_tenant_token(tenant)}"',
                             *(_fts_term(t) for t in query.terms),
                             *(f'facets : "{t}"' for t in _facet_tokens(query))])

    @staticmethod
    def _sqlite_page(query: Query, match: str, where: list[Any], limit: int, offset: int,
                     ranked: bool) -> Any:
        newest = (messages.c.received_at.desc(), messages.c.id.desc())
        if not _in_index(query):  # filters of messages only
            return select(messages.c.id).where(*where).order_by(*newest) \
                .limit(limit).offset(offset)
        # bm25 with the subject weighing most, addresses next; the tenant column and
        # the facets are filters, not relevance.  Without filters on the messages
        # (before, after), only the newest RANKED matches are ranked: FTS5 gives
        # them newest first and stops there, where ranking all of a common word's
        # matches would take a second a million messages.  They are ranked in the
        # index alone (equal ranks: the later indexed first) and only the page's
        # entries are looked up: their message ids, then their rows (search()).
        bm25 = "bm25(message_search, 0, 4.0, 2.0, 2.0, 1.0, 1.0, 0)"
        if ranked:
            hits = text(
                f"SELECT rowid AS entry, {bm25} AS rank FROM message_search "
                f"WHERE message_search MATCH :match ORDER BY rowid DESC LIMIT {RANKED}"
            ).bindparams(match=match).columns(column("entry"), column("rank")) \
                .subquery("hits")
            best = select(hits.c.entry, hits.c.rank).order_by(hits.c.rank, hits.c.entry.desc()) \
                .limit(limit).offset(offset).subquery("best")
            return select(_ROWS.c.message_id.label("id")) \
                .join_from(best, _ROWS, _ROWS.c.id == best.c.entry) \
                .order_by(best.c.rank, best.c.entry.desc())
        hits = text(
            f"SELECT r.message_id AS message_id, {bm25} AS rank "
            "FROM message_search JOIN message_search_rows AS r "
            "ON r.id = message_search.rowid WHERE message_search MATCH :match"
        ).bindparams(match=match).columns(column("message_id"), column("rank")) \
            .subquery("hits")
        return (select(messages.c.id)
                .join_from(messages, hits, hits.c.message_id == messages.c.id)
                .where(*where).order_by(hits.c.rank, *newest).limit(limit).offset(offset))

    @staticmethod
    def _sqlite_snippets(conn: Connection, match: str, ids: list[str],
                         prefix: bool) -> dict[str, str]:
        """A snippet of each message, from the first of body, subject, attachment names
        and addresses where a word matched (else the body's start).  The page's entries
        are named by rowid, which FTS5 seeks to in the match's lists: named by message
        id through a join, every match of the query was read to find them (350 ms for a
        word in most of a million messages, 4 ms by rowid).  A prefix's list is built
        whole at each seek, so with a ``prefix`` term the page's range of rowids is
        walked once instead (1.9 s against 0.1 s for a common one)."""
        entries: dict[int, str] = {r.id: r.message_id for r in conn.execute(
            text("SELECT id, message_id FROM message_search_rows WHERE message_id IN :ids")
            .bindparams(bindparam("ids", expanding=True)), {"ids": ids})}
        if not entries:
            return {}
        columns = (4, 1, 5, 2, 3)  # body, subject, attachments, sender, recipients
        page = "rowid BETWEEN :lo AND :hi AND +rowid IN :rowids" if prefix \
            else "rowid IN :rowids"
        found = conn.execute(text(
            "SELECT rowid, " + ", ".join(
                f"snippet(message_search, {c}, '{START}', '{STOP}', '…', {SNIPPET_WORDS})"
                for c in columns) +
            f" FROM message_search WHERE message_search MATCH :match AND {page}"
        ).bindparams(bindparam("rowids", expanding=True)),
            {"match": match, "rowids": list(entries), "lo": min(entries), "hi": max(entries)})
        out = {}
        for row in found:
            marked = [s for s in row[1:] if s and START in s]
            out[entries[row[0]]] = marked[0] if marked else (row[1] or "")
        return out

    @staticmethod
    def _tsquery(query: Query, exact: bool) -> Any:
        """The query's words (weighted for a field's phrase) and its exact lexemes:
        a field's word or prefix, each word of a field's phrase, the facets.  Not
        ``exact`` (entries without lexemes in the index): the words, weighted for a
        field; None when there are none (has:attachment alone)."""
        lexeme = _pg_lexeme_term if exact else (lambda _: None)
        weighted = [_pg_term(t) for t in query.terms if lexeme(t) is None]
        lexemes = [x for t in query.terms if (x := lexeme(t))]
        if exact:
            lexemes += [f"'{t.field}:{w}'" for t in query.terms
                        if t.field and len(t.words) > 1 for w in t.words[:-1]]
            lexemes += [f"'facet:{t}'" for t in _facet_tokens(query)]
        parts: list[Any] = []
        if weighted:
            parts.append(func.to_tsquery(literal_column("'simple'::regconfig"),
                                         " & ".join(weighted)))
        if lexemes:
            parts.append(cast(literal(" & ".join(lexemes)), TSQUERY))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts[0].op("&&")(parts[1])

    @staticmethod
    def _pg_page(query: Query, tsquery: Any, where: list[Any], limit: int, offset: int,
                 tenant: str, ranked: bool, exact: bool) -> Any:
        newest = (messages.c.received_at.desc(), messages.c.id.desc())
        if not _in_index(query):
            return select(messages.c.id).where(*where).order_by(*newest) \
                .limit(limit).offset(offset)
        found: list[Any] = [] if tsquery is None else [
            message_search.c.document.op("@@")(tsquery)]
        if query.has_attachment and not exact:
            found.append(message_search.c.facets.startswith("attachment"))
        if ranked and tsquery is not None and all(
                len(t.words) == 1 and (exact or t.field is None) for t in query.terms):
            # words and prefixes, a field's and facets, each an exact lexeme (or the
            # lexemes beginning so) of the GIN index, and no filter on the messages:
            # the newest RANKED matches are ranked, as on SQLite.  The planner finds
            # rare lexemes' entries with the GIN index, and walks the tenant's newest
            # first when they are common until it has them, so a common word costs
            # what RANKED matches do, not what all of them would (a prefix in a third
            # of a million messages: 15 s, 0.24 s capped).  The message id
            # (time-ordered) breaks ties.
            hits = select(message_search.c.message_id, message_search.c.document) \
                .where(message_search.c.tenant_id == tenant, *found) \
                .order_by(message_search.c.message_id.desc()).limit(RANKED).subquery("hits")
            return select(hits.c.message_id.label("id")).order_by(
                _pg_rank(hits.c.document, tsquery).desc(), hits.c.message_id.desc()) \
                .limit(limit).offset(offset)
        # phrases and filters on the messages: every match is ranked (the planner
        # takes a phrase of common words for common, where it may be rare: the walk
        # would then read the whole tenant)
        order = (_pg_rank(message_search.c.document, tsquery).desc(),) if query.terms else ()
        return select(messages.c.id) \
            .join_from(messages, message_search, message_search.c.message_id == messages.c.id) \
            .where(*where, message_search.c.tenant_id == messages.c.tenant_id, *found) \
            .order_by(*order, *newest).limit(limit).offset(offset)

    @staticmethod
    def _pg_snippets(conn: Connection, query: Query, ids: list[str]) -> dict[str, str]:
        """A snippet of each message with its words marked (whatever field they were
        asked in: the headline is of the subject and the text)."""
        simple: Any = literal_column("'simple'::regconfig")
        marked = func.to_tsquery(simple, " | ".join(
            _pg_term(Term(t.words, None, t.prefix)) for t in query.terms))
        snippet = func.ts_headline(
            simple, message_search.c.subject + literal("\n") + message_search.c.body,
            marked, f'StartSel="{START}", StopSel="{STOP}", MaxWords=24, MinWords=8, '
                    'MaxFragments=1, FragmentDelimiter=" … "')
        return {r[0]: r[1] or "" for r in conn.execute(
            select(message_search.c.message_id, snippet)
            .where(message_search.c.message_id.in_(ids)))}

    def backfill(self, limit: int, tenants: Sequence[str] | None = None) -> int:
        """Give up to ``limit`` entries indexed before revision 0018 their tag tokens
        (and on PostgreSQL their fields' lexemes and facets), in one transaction; how
        many it did."""
        with self.writing() as conn:
            todo = select(search_backfill.c.message_id).order_by(search_backfill.c.message_id) \
                .limit(limit)
            if tenants is not None:
                todo = todo.join_from(search_backfill, messages,
                                      messages.c.id == search_backfill.c.message_id) \
                    .where(messages.c.tenant_id.in_(list(tenants)))
            ids = list(conn.execute(todo).scalars())
            if not ids:
                return 0
            of = select(messages.c.id, messages.c.tag_key).where(messages.c.id.in_(ids))
            if not self._sqlite:  # a deletion waits for this transaction, then cascades
                of = of.with_for_update(key_share=True)
            tags = {r.id: tags_of(r.tag_key) for r in conn.execute(of)}

            def completed(r: Any) -> str:  # the facets of an entry with its old ones
                return facets(tags.get(r.message_id, ()), "attachment" in r.facets.split())

            expanding: Any = bindparam("ids", expanding=True)
            if self._sqlite:
                rows = conn.execute(text(
                    "SELECT r.id, r.message_id, s.facets FROM message_search_rows AS r "
                    "JOIN message_search AS s ON s.rowid = r.id WHERE r.message_id IN :ids")
                    .bindparams(expanding), {"ids": ids}).all()
                if rows:
                    conn.execute(text("UPDATE message_search SET facets = :f WHERE rowid = :r"),
                                 [{"r": r.id, "f": completed(r)} for r in rows])
            else:
                rows = conn.execute(select(
                    message_search.c.tenant_id, message_search.c.message_id,
                    message_search.c.subject, message_search.c.sender,
                    message_search.c.recipients, message_search.c.facets)
                    .where(message_search.c.message_id.in_(ids))).all()
                params = []
                for r in rows:
                    row = {**r._mapping, "facets": completed(r)}
                    params.append({"t": r.tenant_id, "m": r.message_id, "f": row["facets"],
                                   "lex": _pg_lexemes(row)})
                if params:
                    conn.execute(text(
                        "UPDATE message_search SET facets = :f, document = document || "
                        "array_to_tsvector(CAST(:lex AS text[])) "
                        "WHERE tenant_id = :t AND message_id = :m"), params)
            conn.execute(search_backfill.delete().where(search_backfill.c.message_id.in_(ids)))
        return len(ids)

    def scrub_index(self) -> None:
        """SQLite: merge the index's segments into one, which drops every word of the
        messages deleted from it (FTS5 keeps them, marked deleted, until a merge).
        The pages freed are overwritten (secure_delete); PostgreSQL needs nothing."""
        if not self._sqlite:
            return
        with self.writing() as conn:
            conn.execute(text("INSERT INTO message_search(message_search) VALUES ('optimize')"))

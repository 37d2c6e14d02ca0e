"""Full-text search of stored mail: the query language, the index the pipeline writes
(SQLite FTS5, PostgreSQL tsvector), the command and the API route, one tenant never
finding another's mail, and erasure taking a message's words out of the database."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import pytest

from gateway import query
from gateway.store import search
from tests.conftest import free_port
from tests.test_api import Api, _token
from tests.test_privacy import _database_bytes

JANE = "jane.doe@sender.test"

POLICIES = {
    "retention.yaml": "default: 1y\ntags:\n  invoice: {keep: 7y}\n",
    "workflows.yaml": """
tenants:
  acme:
    rules:
      - name: invoices
        match: {header: {Subject: "*invoice*"}}
        actions: {tag: [invoice]}
""",
}


def _mail(sender: str, to: str, subject: str, body: str, cc: str | None = None,
          attachment: tuple[str, str, bytes] | None = None) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = sender, to, subject
    if cc:
        m["Cc"] = cc
    m.set_content(body)
    if attachment:
        name, kind, data = attachment
        maintype, subtype = kind.split("/")
        m.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return m.as_bytes()


@pytest.fixture
def searched(make_gateway: Any, tmp_path: Any) -> tuple[Any, Api, dict[str, str]]:
    """A daemon holding three messages of acme and one of globex, processed; the ids
    by a short name."""
    policies = tmp_path / "policies"
    policies.mkdir()
    for name, text in POLICIES.items():
        (policies / name).write_text(text)
    port = free_port()
    gw = make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}"},
                       "policies": {"directory": str(policies)}})
    sent = {
        "invoice": (JANE, ["support@acme.test"], _mail(
            f"Jane Doe <{JANE}>", "support@acme.test", "Invoice 2026-117 overdue",
            "Please pay the café bill before Friday. Reference zanzibarfrog.")),
        "notes": ("bob@client.test", ["billing@acme.test"], _mail(
            "bob@client.test", "billing@acme.test", "Meeting notes",
            "The invoice discussion moved to Monday.", cc=JANE,
            attachment=("minutes.txt", "text/plain", b"quarterly forecast agreed\n"))),
        "sheet": ("carol@client.test", ["billing@acme.test"], _mail(
            "carol@client.test", "billing@acme.test", "Figures",
            "See the sheet.", attachment=("figures-q3.ods", "application/octet-stream",
                                           b"\x00\x01binary forecast"))),
        "globex": (JANE, ["anyone@globex.test"], _mail(
            JANE, "anyone@globex.test", "Invoice for globex", "invoice of globex, Friday")),
    }
    with gw.smtp() as s:
        for sender, rcpts, raw in sent.values():
            s.sendmail(sender, rcpts, raw)
    rows = gw.wait_processed(4)
    by_subject = {r["subject"]: r["id"] for r in rows}
    ids = {"invoice": by_subject["Invoice 2026-117 overdue"],
           "notes": by_subject["Meeting notes"], "sheet": by_subject["Figures"],
           "globex": by_subject["Invoice for globex"]}
    return gw, Api(port), ids


def _search(gw: Any, text: str, tenant: str = "acme") -> list[dict[str, Any]]:
    done = gw.cli("messages", "search", "--tenant", tenant, text, "--json")
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_words_phrases_prefixes_fields_and_filters_find_the_right_mail(searched):
    gw, api, ids = searched
    name = {v: k for k, v in ids.items()}
    tokens = {t: _token(gw, t, "read") for t in ("acme", "globex")}

    def found(text: str, tenant: str = "acme") -> set[str]:
        status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q=text), tokens[tenant])
        assert status == 200, body
        return {name[r["id"]] for r in body["results"]}

    assert found("invoice") == {"invoice", "notes"}  # subject, and body text
    assert found("INVOICE overdue") == {"invoice"}  # every word must match
    assert found('"pay the cafe bill"') == {"invoice"}  # a phrase; accents folded
    assert found('"the pay"') == set()  # the words in that order, not just present
    assert found("zanzib*") == {"invoice"}
    assert found("quarterly") == {"notes"}  # a text attachment's text
    assert found("forecast") == {"notes"}  # not the text of a binary one
    assert found("figures") == {"sheet"} and found("ods") == {"sheet"}  # attachment name
    assert found(f"from:{JANE}") == {"invoice"}  # the Cc'd message is not from her
    assert found(f"to:{JANE}") == {"notes"}
    assert found('from:"jane doe"') == {"invoice"}  # the display name
    assert found("to:billing@acme.test") == {"notes", "sheet"}  # envelope and header
    assert found("subject:invoice") == {"invoice"}
    assert found("subject:monday") == set()
    assert found("tag:invoice") == {"invoice"}
    assert found("has:attachment") == {"notes", "sheet"}
    assert found("has:attachment forecast") == {"notes"}
    # a tag or has:attachment beside words: both must hold
    assert found("tag:invoice invoice") == {"invoice"}
    assert found("tag:invoice quarterly") == set() and found("tag:other invoice") == set()
    assert found("has:attachment tag:invoice") == set()
    assert found("subject:invo*") == {"invoice"} and found("subject:meet*") == {"notes"}
    assert found('subject:"invoice 2026"') == {"invoice"}
    assert found('subject:"2026 invoice"') == set()
    today = datetime.now(UTC).date()
    assert found(f"invoice after:{today}") == {"invoice", "notes"}
    assert found(f"invoice before:{today}") == set()
    # one tenant never finds another's mail, whatever it looks for
    assert found("globex") == set()
    assert found("invoice", "globex") == {"globex"}
    assert found("figures", "globex") == set()


def test_results_come_best_first_with_a_marked_snippet(searched):
    gw, _, ids = searched
    [hit] = _search(gw, "friday")
    assert hit["id"] == ids["invoice"] and hit["subject"] == "Invoice 2026-117 overdue"
    assert hit["tags"] == ["invoice"] and hit["sender"] == JANE
    marked = [s["text"] for s in hit["snippet"] if s["match"]]
    assert [m.lower() for m in marked] == ["friday"]
    assert "".join(s["text"] for s in hit["snippet"]).count("Please pay") == 1
    # paging: one a page, the second page is the other message, the third empty
    pages = [json.loads(gw.cli("messages", "search", "--tenant", "acme", "invoice",
                               "--limit", "1", "--page", str(n), "--json",
                               check=True).stdout) for n in (1, 2, 3)]
    assert [len(p) for p in pages] == [1, 1, 0]
    assert {pages[0][0]["id"], pages[1][0]["id"]} == {ids["invoice"], ids["notes"]}
    table = gw.cli("messages", "search", "--tenant", "acme", "friday",
                   check=True).stdout.decode()
    assert ids["invoice"] in table and "[Friday]" in table
    assert gw.cli("messages", "search", "--tenant", "acme", "nowhere",
                  check=True).stdout == b"no message matches\n"
    # who searched whose mail is in the audit log; what they looked for only as a digest
    events = json.loads(gw.cli("audit", "list", "--action", "message.search", "--json",
                               check=True).stdout)
    assert events and all(e["tenant"] == "acme" for e in events)
    assert "friday" not in json.dumps(events).lower()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("bad, said", [
    ('subject:"unclosed', "unclosed quote at character 9"),
    ("nosuch:word", "nosuch: unknown"),
    ("before:yesterday invoice", "before:yesterday: a day as YYYY-MM-DD"),
    ("a*", "a prefix needs at least 2 letters"),
    ("invoice -overdue", "-overdue: excluding is not supported"),
    ("", "nothing to look for"),
    ("x" * 501, "longer than 500 characters"),
])
def test_a_query_the_language_does_not_allow_is_a_usage_error(searched, bad, said):
    gw, api, _ = searched
    done = gw.cli("messages", "search", "--tenant", "acme", bad)
    err = done.stderr.decode()
    assert done.returncode == 2 and said in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q=bad),
                               _token(gw, "acme", "read"))
    assert status == 400 and said in body["error"]


def _qs(**params: str) -> str:
    from urllib.parse import urlencode
    return urlencode(params)


def test_the_api_searches_the_token_tenant_only(searched):
    gw, api, ids = searched
    acme, globex = _token(gw, "acme", "read"), _token(gw, "globex", "read")
    status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q="invoice"), acme)
    assert status == 200
    assert {r["id"] for r in body["results"]} == {ids["invoice"], ids["notes"]}
    assert body["next"] is None
    status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q="invoice", limit="1"), acme)
    assert status == 200 and len(body["results"]) == 1 and body["next"] == 2
    status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q="invoice", limit="1",
                                                                page="2"), acme)
    assert len(body["results"]) == 1 and body["next"] == 3
    status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q="invoice"), globex)
    assert [r["id"] for r in body["results"]] == [ids["globex"]]
    assert api.call("GET", "/api/v1/search?" + _qs(q="invoice"))[0] == 401
    status, body, _ = api.call("GET", "/api/v1/search", acme)
    assert status == 400 and "q" in body["error"]
    status, body, _ = api.call("GET", "/api/v1/search?" + _qs(q="x", limit="0"), acme)
    assert status == 400


def test_erased_mail_leaves_the_index_and_the_database_files(searched):
    gw, _, ids = searched
    assert {r["id"] for r in _search(gw, "zanzibarfrog")} == {ids["invoice"]}
    before = _database_bytes(gw).lower()
    assert b"zanzibarfrog" in before and b"quarterly" in before  # the scan sees them
    done = gw.cli("erase", "--tenant", "acme", "--subject", JANE, "--yes", "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["messages"] == 2  # from her, and the one Cc'd to her
    assert _search(gw, "zanzibarfrog") == [] and _search(gw, "quarterly") == []
    assert [r["id"] for r in _search(gw, "figures")] == [ids["sheet"]]  # the rest stays
    after = _database_bytes(gw).lower()
    for gone in (b"zanzibarfrog", b"quarterly", b"overdue"):
        assert gone not in after, gone
    assert b"figures" in after  # and would have found what is kept
    # globex's mail from her is another controller's, still found there
    assert [r["id"] for r in _search(gw, "invoice", "globex")] == [ids["globex"]]
    # a deactivated tenant's mail leaves the index with the rest of its data
    done = gw.cli("tenant", "deactivate", "acme")
    assert done.returncode == 0, done.stderr.decode()
    assert _search(gw, "figures") == [] and b"figures" not in _database_bytes(gw).lower()
    assert [r["id"] for r in _search(gw, "invoice", "globex")] == [ids["globex"]]


@pytest.mark.sqlite_only
def test_a_tenant_can_keep_its_mail_out_of_the_index(make_gateway):
    gw = make_gateway({"tenants": {"globex": {"search": False}}})
    with gw.smtp() as s:
        s.sendmail(JANE, ["anyone@globex.test"], _mail(JANE, "anyone@globex.test",
                                                       "Invoice", "kumquat"))
        s.sendmail(JANE, ["support@acme.test"], _mail(JANE, "support@acme.test",
                                                      "Invoice", "kumquat"))
    gw.wait_processed(2)
    assert _search(gw, "kumquat", "globex") == []
    assert len(_search(gw, "kumquat", "acme")) == 1
    unknown = gw.cli("messages", "search", "--tenant", "initech", "kumquat")
    assert unknown.returncode == 1
    assert unknown.stderr.decode().strip().endswith(": no tenant initech in the database")


def test_mail_stored_before_the_index_is_put_into_it_by_reindex(make_gateway):
    gw = make_gateway({"tenants": {"globex": {"search": False}}})
    with gw.smtp() as s:
        for n in range(3):
            s.sendmail(JANE, ["support@acme.test"], _mail(
                JANE, "support@acme.test", f"Invoice {n}", f"kumquat number{n}"))
        s.sendmail(JANE, ["anyone@globex.test"], _mail(JANE, "anyone@globex.test",
                                                       "Invoice", "kumquat"))
    gw.wait_processed(4)
    # as if stored before revision 0015: nothing of it in the index
    ids = [m["id"] for m in gw.messages()]
    with gw.store.writing() as conn:
        search.unindex(conn, ids)
    assert _search(gw, "kumquat", "acme") == []

    done = gw.cli("messages", "reindex", check=True)
    assert done.stdout.decode().strip() == "3 messages indexed"
    assert sorted(r["subject"] for r in _search(gw, "kumquat", "acme")) == [
        "Invoice 0", "Invoice 1", "Invoice 2"]
    assert [r["subject"] for r in _search(gw, "number1 from:jane.doe", "acme")] == [
        "Invoice 1"]
    assert _search(gw, "kumquat", "globex") == []  # its search is off: left out
    again = gw.cli("messages", "reindex", "--json", check=True)
    assert json.loads(again.stdout) == {"indexed": 0, "unreadable": 0, "completed": 0}
    refused = gw.cli("messages", "reindex", "--tenant", "globex")
    assert refused.returncode == 1 and b"search: false" in refused.stderr
    events = json.loads(gw.cli("audit", "list", "--action", "search.reindex", "--json",
                               check=True).stdout)
    assert [e["detail"]["messages"] for e in events] == [3, 0]


@pytest.mark.parametrize("text, terms, filters", [
    ("Invoice", [(("invoice",), None, False)], {}),
    ('"Pay  the Café"', [(("pay", "the", "cafe"), None, False)], {}),
    ("inv*", [(("inv",), None, True)], {}),
    ("From:Jane.Doe@Sender.test", [(("jane", "doe", "sender", "test"), "from", False)], {}),
    ('subject:"q3 figures" to:bob*', [(("q3", "figures"), "subject", False),
                                     (("bob",), "to", True)], {}),
    ("tag:invoice has:attachment", [], {"tags": ("invoice",), "has_attachment": True}),
    ("x after:2026-01-01 before:2026-02-01", [(("x",), None, False)],
     {"after": datetime(2026, 1, 1, tzinfo=UTC), "before": datetime(2026, 2, 1, tzinfo=UTC)}),
    ("foo_bar, baz!", [(("foo", "bar"), None, False), (("baz",), None, False)], {}),
])
def test_the_query_language(text, terms, filters):
    q = query.parse(text)
    assert [(t.words, t.field, t.prefix) for t in q.terms] == terms
    for key, value in filters.items():
        assert getattr(q, key) == value


@pytest.mark.parametrize("bad", ["after:2026-02-01 before:2026-01-01 x", "has:pdf x",
                                 "tag:a,b", "subject:!!!", " ".join(["w"] * 17)])
def test_queries_the_language_refuses(bad):
    with pytest.raises(query.QueryError):
        query.parse(bad)


def test_snippet_marks_become_segments():
    marked = f"a {query.START}b{query.STOP} c {query.START}d{query.STOP}"
    assert query.segments(marked) == [
        {"text": "a ", "match": False}, {"text": "b", "match": True},
        {"text": " c ", "match": False}, {"text": "d", "match": True}]
    assert query.clean(f"x{query.START}y\x00z") == "x y z"
    assert re.fullmatch(r"[^\ue000\ue001]*", query.clean("\ue000\ue001"))


def _stored(store: Any, tenant: str, subject: str, body: str, at: datetime) -> str:
    """A processed message put into the database and the index as finish_many would."""
    from sqlalchemy import insert

    from gateway.store import search
    from gateway.store.ids import new_id
    from gateway.store.models import messages

    message_id = new_id()
    with store.writing() as conn:
        conn.execute(insert(messages).values(
            id=message_id, tenant_id=tenant, status="processed", received_at=at,
            mail_from="a@sender.test", size=100, sha256="0" * 64, client_address="127.0.0.1",
            helo="test", protocol="ESMTP", trace_header="", subject=subject, tags=[],
            tag_key=""))
        search.index(conn, [search.fields(tenant, message_id, "a@sender.test", None, None,
                                          subject, body, [], [("mail_from", "a@sender.test")])])
    return message_id


def test_a_common_word_is_ranked_among_its_newest_matches_and_a_filter_reaches_all(
        store, monkeypatch, backend):
    from datetime import timedelta

    from gateway.store import search

    monkeypatch.setattr(search, "RANKED", 3)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [_stored(store, "acme", f"note {n}", "alpha " * (n + 1), start + timedelta(days=n))
           for n in range(5)]
    _stored(store, "globex", "note", "alpha", start)
    found = [r["id"] for r in store.search("acme", query.parse("alpha"), 20)]
    assert sorted(found) == sorted(ids[2:])  # the newest three, ranked among themselves
    found = [r["id"] for r in store.search("acme", query.parse("alpha after:2025-01-01"), 20)]
    assert sorted(found) == sorted(ids)  # with a filter on the messages: every match
    assert found[0] == ids[4]  # the one that says it most often first
    found = [r["id"] for r in store.search("acme", query.parse("subject:note"), 20)]
    assert sorted(found) == sorted(ids[2:])  # a field's word as a word
    found = [r["id"] for r in store.search("acme", query.parse("alph*"), 20)]
    assert sorted(found) == sorted(ids[2:])  # a prefix as a word
    found = [r["id"] for r in store.search("acme", query.parse('"alpha alpha"'), 20)]
    # a phrase: on PostgreSQL every match is ranked (see search._pg_page)
    assert sorted(found) == sorted(ids[2:] if backend == "sqlite" else ids[1:])


def test_entries_indexed_before_the_facets_are_found_and_completed_by_reindex(
        backend, tmp_path):
    """Entries of revision 0017 lack their tag tokens (and on PostgreSQL their fields'
    lexemes): a tag beside a word, a field's word, find them all the same, before the
    backfill of ``messages reindex`` gives them theirs and after."""
    from alembic import command
    from sqlalchemy import insert, text

    from gateway.store import database
    from gateway.store.models import messages
    from gateway.store.repository import Store
    from tests.conftest import database_url

    cleanups: list[Any] = []
    engine = database.create(database_url(backend, tmp_path, cleanups, fresh=True))
    try:
        command.upgrade(database._alembic_config(engine), "0017")
        Store(engine).sync_tenants({"acme": "Acme"})
        rows = [("01J0000000000000000000000A", "invoice", "Invoice paid", "attachment"),
                ("01J0000000000000000000000B", "", "Invoice draft", "")]
        with engine.begin() as conn:
            for n, (message_id, tag, subject, facets) in enumerate(rows, 1):
                conn.execute(insert(messages).values(
                    id=message_id, tenant_id="acme", status="processed",
                    received_at=datetime(2026, 1, n, tzinfo=UTC), mail_from="a@sender.test",
                    size=1, sha256="0" * 64, client_address="127.0.0.1", helo="h",
                    protocol="ESMTP", trace_header="", subject=subject,
                    tags=[tag] if tag else [], tag_key=tag))
                if backend == "sqlite":
                    conn.execute(text("INSERT INTO message_search_rows (id, message_id) "
                                      "VALUES (:n, :id)"), {"n": n, "id": message_id})
                    conn.execute(text(
                        "INSERT INTO message_search (rowid, tenant, subject, sender, "
                        "recipients, body, attachments, facets) VALUES (:n, :t, :s, "
                        "'a@sender.test', '', 'paid in full', '', :f)"),
                        {"n": n, "t": "t" + b"acme".hex(), "s": subject, "f": facets})
                else:  # as revision 0017's code wrote them: no lexeme with a colon
                    conn.execute(text(
                        "INSERT INTO message_search (message_id, tenant_id, subject, sender, "
                        "recipients, body, attachments, facets, document) VALUES (:id, "
                        "'acme', :s, 'a@sender.test', '', 'paid in full', '', :f, "
                        "setweight(to_tsvector('simple', lower(:s)), 'A') || "
                        "to_tsvector('simple', 'paid in full'))"),
                        {"id": message_id, "s": subject, "f": facets})
        database.upgrade(engine)
        store = Store(engine)

        def found(text: str) -> list[str]:
            return [r["subject"] for r in store.search("acme", query.parse(text), 20)]

        def waiting() -> int:
            with engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM search_backfill"))
                           .scalar_one())

        # the tagged entry waits on SQLite; every entry on PostgreSQL (fields' lexemes)
        assert waiting() == (1 if backend == "sqlite" else 2)
        for step in ("before", "after"):
            assert found("tag:invoice paid") == ["Invoice paid"], step
            assert found("tag:invoice draft") == [], step
            assert found("has:attachment paid") == ["Invoice paid"], step
            assert sorted(found("subject:invoice")) == ["Invoice draft", "Invoice paid"]
            assert found("subject:draft full") == ["Invoice draft"], step
            if step == "before":  # one a call, then the rest, then nothing is left
                assert store.backfill(1) == 1
                assert store.backfill(10) == (0 if backend == "sqlite" else 1)
                assert waiting() == 0 and store.backfill(10) == 0
        if backend == "sqlite":  # the token is in the entry now, not only in messages
            with engine.connect() as conn:
                assert conn.execute(text("SELECT facets FROM message_search WHERE rowid = 1")
                                    ).scalar_one() == "attachment " + "g" + b"invoice".hex()
    finally:
        engine.dispose()
        for cleanup in cleanups:
            cleanup()


def test_each_result_of_a_page_has_the_snippet_of_its_own_message(store):
    """Snippets are drawn for the page's entries only, each its own message's, for
    words and for a prefix (whose page is walked as a range of the index's entries:
    an entry in that range but not on the page gets none, and takes no place)."""
    from datetime import timedelta

    start = datetime(2026, 1, 1, tzinfo=UTC)
    said = {}
    for n, word in enumerate(["alphabet", "alphorn", "alpine", "alphanumeric", "alphas"]):
        body = f"report {n} names {word} " + "filler " * (n * 3)
        said[_stored(store, "acme", f"report {n}", body, start + timedelta(days=n))] = word
    _stored(store, "globex", "report", "alphabet alphorn", start)
    for text, page in (("alph*", 2), ("report", 3), ("names", 5)):
        found = store.search("acme", query.parse(text), page)
        assert len(found) == page
        for hit in found:
            marked = [s["text"].lower() for s in hit["snippet"] if s["match"]]
            whole = "".join(s["text"] for s in hit["snippet"])
            assert said[hit["id"]] in whole, (text, hit)
            assert set(marked) == ({said[hit["id"]]} if text == "alph*" else {text})
    second = store.search("acme", query.parse("alph*"), 2, offset=2)
    assert len(second) == 2 and all(said[h["id"]] in "".join(s["text"] for s in h["snippet"])
                                    for h in second)

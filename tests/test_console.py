"""The web console's session over HTTP against the real daemon: logging in with a token
or a console user's password, the cookie and its CSRF secret, the API taken through a
session with its scopes and tenant isolation, throttled logins, the security headers,
a message's text to read.  tests/test_console_browser.py drives it in a real browser."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

import pytest
from sqlalchemy import select

from gateway.store.models import (
    audit_events,
    console_sessions,
    console_users,
    subprocessor_objections,
)
from tests.test_api import Api, _token, make_api_gateway


@pytest.fixture
def console_gateway(make_gateway: Any, tmp_path: Any, relay: Any) -> tuple[Any, Any]:
    """tests.test_api's daemon: mail of acme and globex, the sub-processor relay-eu."""
    return make_api_gateway(make_gateway, tmp_path, relay)

COOKIE = "__Host-mailflowr-console"
PASSWORD = "a long console password"


class Browser:
    """An HTTP client that keeps the console's cookie as a browser does (it is Secure:
    Python's cookie jar would not send it back over plain HTTP)."""

    def __init__(self, api: Api) -> None:
        self.base = api.base
        self.cookie: str | None = None
        self.csrf: str | None = None

    def call(self, method: str, path: str, body: Any = None, csrf: bool = True,
             ) -> tuple[int, Any, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.cookie:
            request.add_header("Cookie", f"{COOKIE}={self.cookie}")
        if csrf and self.csrf:
            request.add_header("X-CSRF-Token", self.csrf)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, payload, headers = reply.status, reply.read(), reply.headers
        except urllib.error.HTTPError as exc:
            status, payload, headers = exc.code, exc.read(), exc.headers
        doc = json.loads(payload) if headers.get("Content-Type", "").startswith(
            "application/json") else payload
        return status, doc, headers

    def login(self, **body: str) -> tuple[int, Any, Any]:
        status, doc, headers = self.call("POST", "/console/login", body)
        if status == 200:
            set_cookie = headers.get_all("Set-Cookie")
            assert len(set_cookie) == 1, set_cookie
            name, _, rest = set_cookie[0].partition("=")
            assert name == COOKIE
            self.cookie = rest.split(";")[0]
            self.csrf = doc["csrf"]
        return status, doc, headers


def _add_user(gw: Any, login: str, tenant: str, scope: str) -> None:
    added = gw.cli("console", "user", "add", "--tenant", tenant, "--scope", scope, login,
                   input=f"{PASSWORD}\n".encode())
    assert added.returncode == 0, added.stderr


def _objections(gw: Any) -> list[tuple[str, str, str]]:
    with gw.store.engine.connect() as conn:
        return [(r.tenant_id, r.subprocessor, r.actor)
                for r in conn.execute(select(subprocessor_objections))]


def test_a_token_login_opens_a_session_the_api_takes_only_with_its_csrf_header(console_gateway):
    gw, api = console_gateway
    token = _token(gw, "acme", "admin")
    browser = Browser(api)
    status, doc, headers = browser.login(token=token)
    assert status == 200 and doc["tenant"] == "acme" and doc["scopes"] == ["admin"]
    cookie = headers["Set-Cookie"]
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie, cookie
    assert "Domain" not in cookie
    # the cookie's secret is stored as a digest only
    with gw.store.engine.connect() as conn:
        stored = [tuple(r) for r in conn.execute(select(console_sessions))]
    assert len(stored) == 1 and browser.cookie not in repr(stored)

    status, found, _ = browser.call("GET", "/api/v1/search?q=jane")
    assert status == 200
    assert [r["subject"] for r in found["results"]] == ["acme from jane"]
    # without the CSRF header, or with another one, nothing: reading or changing
    for header in (False, True):
        if header:
            browser.csrf = "x" * 43
        status, doc, _ = browser.call("GET", "/api/v1/search?q=jane", csrf=header)
        assert status == 403 and "X-CSRF-Token" in doc["error"]
        status, _, _ = browser.call("POST", "/api/v1/subprocessors/relay-eu/objections",
                                    {"note": "forged"}, csrf=header)
        assert status == 403
    assert _objections(gw) == []
    browser.csrf = doc_csrf = browser.call("GET", "/console/session")[1]["csrf"]
    assert doc_csrf
    status, _, _ = browser.call("POST", "/api/v1/subprocessors/relay-eu/objections",
                                {"note": "from the console"})
    token_id = token.split("_")[1]
    assert status == 201 and _objections(gw) == [("acme", "relay-eu", f"api:{token_id}")]
    with gw.store.engine.connect() as conn:
        events = [(r.actor, r.action) for r in conn.execute(
            select(audit_events).where(audit_events.c.tenant_id == "acme")
            .order_by(audit_events.c.id))]
    assert (f"api:{token_id}", "console.login") in events
    assert (f"api:{token_id}", "subprocessor.objection") in events

    # a revoked token ends its sessions
    gw.cli("token", "revoke", token_id, check=True)
    status, doc, _ = browser.call("GET", "/api/v1/search?q=jane")
    assert status == 401
    assert browser.call("GET", "/console/session")[0] == 401


def test_a_console_user_logs_in_with_a_password_and_has_its_scopes_and_tenant(console_gateway):
    gw, api = console_gateway
    _add_user(gw, "dpo@acme.test", "acme", "read")
    taken = gw.cli("console", "user", "add", "--tenant", "globex", "dpo@acme.test",
                   input=f"{PASSWORD}\n".encode())
    assert taken.returncode == 1 and b"already" in taken.stderr
    short = gw.cli("console", "user", "add", "--tenant", "acme", "x@acme.test",
                   input=b"short\n")
    assert short.returncode == 1 and b"at least 8" in short.stderr
    listed = json.loads(gw.cli("console", "user", "list", "--json", check=True).stdout)
    assert [(u["login"], u["tenant"], u["scopes"]) for u in listed] == [
        ("dpo@acme.test", "acme", ["read"])]
    with gw.store.engine.connect() as conn:
        hashes = [r.password_hash for r in conn.execute(select(console_users))]
    assert hashes[0].startswith("scrypt$") and PASSWORD not in hashes[0]

    browser = Browser(api)
    status, doc, _ = browser.login(login="dpo@acme.test", password="wrong password")
    assert status == 401 and doc["error"] == "wrong token, or wrong login or password"
    assert browser.login(login="nobody@acme.test", password=PASSWORD)[0] == 401
    status, doc, _ = browser.login(login="dpo@acme.test", password=PASSWORD)
    assert status == 200
    assert (doc["tenant"], doc["actor"], doc["scopes"]) == (
        "acme", "console:dpo@acme.test", ["read"])
    assert "authentication failed from 127.0.0.1: console login '[address]'" in gw.log()

    globex_id = next(m["id"] for m in gw.messages(tenant="globex"))
    acme_id = next(m["id"] for m in gw.messages(tenant="acme")
                   if m["subject"] == "acme from bob")
    assert browser.call("GET", f"/api/v1/messages/{globex_id}")[0] == 404
    assert browser.call("GET", f"/api/v1/messages/{globex_id}/text")[0] == 404
    status, text, _ = browser.call("GET", f"/api/v1/messages/{acme_id}/text")
    assert status == 200 and text["text"].strip() == "body of acme from bob"
    assert text["source"] == "plain"
    # read only: no objection
    status, doc, _ = browser.call("POST", "/api/v1/subprocessors/relay-eu/objections", {})
    assert status == 403 and "admin" in doc["error"]
    with gw.store.engine.connect() as conn:
        actors = {r.actor for r in conn.execute(
            select(audit_events).where(audit_events.c.action == "api.get"))}
    assert "console:dpo@acme.test" in actors

    status, _, headers = browser.call("POST", "/console/logout")
    assert status == 200 and "Max-Age=0" in headers["Set-Cookie"]
    assert browser.call("GET", "/api/v1/search?q=jane")[0] == 401

    # removing the user ends its sessions
    browser.login(login="dpo@acme.test", password=PASSWORD)
    assert browser.call("GET", "/console/session")[0] == 200
    gw.cli("console", "user", "remove", "dpo@acme.test", check=True)
    assert browser.call("GET", "/console/session")[0] == 401
    assert browser.call("GET", "/api/v1/search?q=jane")[0] == 401


def test_failed_logins_from_one_address_are_refused_for_a_while(console_gateway):
    gw, api = console_gateway
    token = _token(gw, "acme", "read")
    browser = Browser(api)
    for _ in range(10):
        assert browser.login(token="mfr_000000000000_" + "x" * 43)[0] == 401
    status, doc, headers = browser.login(token=token)  # right, but too soon
    assert status == 429 and "too many failed logins" in doc["error"]
    assert 290 <= int(headers["Retry-After"]) <= 301
    assert ("authentication failed from 127.0.0.1: over 10 failed console logins "
            "(address 127.0.0.1), turned away") in gw.log()


def test_every_answer_forbids_inline_script_framing_and_sniffing(console_gateway):
    _, api = console_gateway
    browser = Browser(api)
    for path in ("/console/", "/console/console.js", "/console/console.css",
                 "/api/v1/openapi.json", "/api/v1/messages", "/console/nothing"):
        headers = browser.call("GET", path)[2]
        policy = headers["Content-Security-Policy"]
        assert "script-src 'self';" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-store"
    status, page, headers = browser.call("GET", "/console/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    html = page.decode()
    assert '<script src="/console/console.js" defer></script>' in html
    assert html.count("<script") == 1 and "<style" not in html
    assert re.search(r"\s(on[a-z]+|style)\s*=", html) is None  # no inline handler or style
    request = urllib.request.Request(api.base + "/", method="GET")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(request, timeout=10)
        raise AssertionError("no redirect")
    except urllib.error.HTTPError as exc:
        assert exc.code == 302 and exc.headers["Location"] == "/console/"
    status, doc, _ = browser.call("POST", "/console/login", {"token": "x", "extra": 1})
    assert status == 400 and "unknown field 'extra'" in doc["error"]
    assert browser.call("POST", "/console/logout")[0] == 401


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


def test_a_message_is_given_to_read_as_text_never_as_html(console_gateway):
    gw, api = console_gateway
    html = ("<html><head><title>hidden title</title><style>p {color: red}</style></head>"
            "<body><p>Dear Jane &amp; co,</p><script>alert('x')</script>"
            "<img src=\"https://tracker.test/pixel.png\"><p>see you</p></body></html>")
    with gw.smtp() as s:
        s.sendmail("html@client.test", ["support@acme.test"],
                   ("From: html@client.test\r\nTo: support@acme.test\r\nSubject: html\r\n"
                    "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                    + html + "\r\n").encode())
    gw.wait_processed(5)
    message_id = next(m["id"] for m in gw.messages(tenant="acme") if m["subject"] == "html")
    token = _token(gw, "acme", "read")
    status, doc, _ = api.call("GET", f"/api/v1/messages/{message_id}/text", token)
    assert status == 200 and doc["source"] == "html" and not doc["truncated"]
    assert doc["text"] == "Dear Jane & co,\n\nsee you"
    # the search index holds what a reader sees of it, not its script, style or title
    for word, hits in (("see", 1), ("alert", 0), ("color", 0), ("hidden", 0)):
        found = api.call("GET", f"/api/v1/search?q=subject:html+{word}", token)[1]
        assert len(found["results"]) == hits, word

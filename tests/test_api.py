"""The admin HTTP API against the real daemon: tokens, every endpoint, tenant isolation
on every endpoint, input errors, exports and erasures, the OpenAPI description."""

from __future__ import annotations

import io
import json
import secrets
import socket
import ssl
import tarfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from gateway.passwords import hash_password
from gateway.store.models import api_tokens
from gateway.store.tokens import TokenStore, parse_scopes
from tests.conftest import client_context, free_port, wait_for
from tests.sink import Sink
from tests.test_incident import SUBPROCESSORS  # relay-eu, authorised by acme and globex
from tests.test_subprocessors import (  # a Bcc of all inbound mail, both tenants
    CONSENT_REFRESH,
    WORKFLOWS,
)

SUBJECT = "jane.doe@sender.test"


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, token: str | None = None, body: Any = None,
             raw: bytes | None = None, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=headers or {})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, payload, headers = reply.status, reply.read(), dict(reply.headers)
        except urllib.error.HTTPError as exc:
            status, payload, headers = exc.code, exc.read(), dict(exc.headers)
        if headers.get("Content-Type", "").startswith("application/json"):
            return status, json.loads(payload), headers
        return status, payload, headers


class SessionApi(Api):
    """The same calls made as the web console makes them: each token logs in once
    (``POST /console/login``) and its calls carry the session's cookie and CSRF header
    in place of the token."""

    def __init__(self, port: int) -> None:
        super().__init__(port)
        self.sessions: dict[str, dict[str, str]] = {}

    def call(self, method: str, path: str, token: str | None = None, body: Any = None,
             raw: bytes | None = None, content_type: str = "application/json",
             headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        if token and token not in self.sessions:
            status, doc, answer = super().call("POST", "/console/login", None,
                                               {"token": token})
            assert status == 200, doc
            cookie = answer["Set-Cookie"].split(";")[0]
            self.sessions[token] = {"Cookie": cookie, "X-CSRF-Token": doc["csrf"]}
        session = self.sessions[token] if token else {}
        return super().call(method, path, None, body, raw, content_type,
                            {**session, **(headers or {})})


def _token(gw: Any, tenant: str, scope: str = "admin") -> str:
    """A token as ``token create`` makes it (tested below), without a command's start-up."""
    return TokenStore(gw.store).create(tenant, f"{tenant} tools", parse_scopes(scope))[1]


AGENT_HASH = hash_password("agent password")


@pytest.fixture
def api_gateway(make_gateway: Any, tmp_path: Any, relay: Sink) -> tuple[Any, Api]:
    return make_api_gateway(make_gateway, tmp_path, relay)


def make_api_gateway(make_gateway: Any, tmp_path: Any, relay: Sink) -> tuple[Any, Api]:
    """A daemon with mail of acme and globex, each message copied (Bcc) through the
    sub-processor relay-eu to the ``relay`` sink."""
    port = free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "retention.yaml").write_text(
        "default: 1y\nholds:\n  - {name: case-9, reason: court, address: held@client.test}\n")
    (policies / "subprocessors.yaml").write_text(SUBPROCESSORS.format(port=relay.port))
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    gw = make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}"},
                       "policies": {"directory": str(policies)},
                       "delivery": {"poll_interval": "0.2s",
                                    "consent_refresh": f"{CONSENT_REFRESH}s"},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
                       "tenants": {"acme": {"users": {"agent": {
                           "password_hash": AGENT_HASH, "send_as": ["agent@acme.test"]}}}}})
    with gw.smtp() as s:
        for sender, to, subject in ((SUBJECT, "support@acme.test", "acme from jane"),
                                    ("bob@client.test", "support@acme.test", "acme from bob"),
                                    ("held@client.test", "support@acme.test", "acme held"),
                                    (SUBJECT, "x@globex.test", "globex from jane")):
            s.sendmail(sender, [to], f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
                                     f"\r\nbody of {subject}\r\n".encode())
    gw.wait_processed(4)
    relay.wait(4)
    return gw, Api(port)


def test_tokens_are_shown_once_and_stored_hashed(api_gateway):
    gw, api = api_gateway
    created = gw.cli("token", "create", "--tenant", "acme", "--name", "acme tools",
                     "--scope", "admin", check=True).stdout.decode()
    assert "it is shown only now" in created
    token = created.split()[-1]
    assert token.startswith("mfr_")
    with gw.store.engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(select(api_tokens))]
    secret = token.split("_", 2)[2]  # the secret itself may hold "_"
    assert len(secret) == 43 and secret not in repr(rows)
    listed = json.loads(gw.cli("token", "list", "--json", check=True).stdout)
    assert [(t["tenant"], t["name"], t["revoked_at"]) for t in listed] == [
        ("acme", "acme tools", None)]
    assert "secret" not in json.dumps(listed)
    assert api.call("GET", "/api/v1/messages", token)[0] == 200
    gw.cli("token", "revoke", listed[0]["id"], check=True)
    status, doc, _ = api.call("GET", "/api/v1/messages", token)
    assert status == 401 and "API token" in doc["error"]
    unknown = gw.cli("token", "create", "--tenant", "nobody")
    assert unknown.returncode == 1 and b"no tenant 'nobody'" in unknown.stderr


@pytest.mark.parametrize("via", ["token", "console session"])
def test_every_endpoint_serves_the_tenant_and_hides_every_other(api_gateway, via):
    gw, api = api_gateway
    if via == "console session":  # the console's way in: the same isolation
        api = SessionApi(int(api.base.rsplit(":", 1)[1]))
    acme, globex = _token(gw, "acme"), _token(gw, "globex")
    status, doc, _ = api.call("GET", "/api/v1/messages?limit=2", acme)
    assert status == 200 and len(doc["messages"]) == 2 and doc["next"]
    rest = api.call("GET", f"/api/v1/messages?after={doc['next']}", acme)[1]
    acme_ids = [m["id"] for m in doc["messages"] + rest["messages"]]
    assert len(acme_ids) == 3 and rest["next"] is None
    mine = api.call("GET", f"/api/v1/messages?address={SUBJECT.upper()}", acme)[1]
    assert [m["subject"] for m in mine["messages"]] == ["acme from jane"]
    one = acme_ids[0]
    status, doc, _ = api.call("GET", f"/api/v1/messages/{one}", acme)
    assert status == 200 and doc["id"] == one
    status, eml, headers = api.call("GET", f"/api/v1/messages/{one}/eml", acme)
    assert status == 200 and headers["Content-Type"] == "message/rfc822"
    assert eml == gw.cli("messages", "export", one, check=True).stdout

    status, started, _ = api.call("POST", "/api/v1/exports", acme, {})
    assert status == 202
    export_id = started["id"]
    deadline = time.monotonic() + 30
    while (state := api.call("GET", f"/api/v1/exports/{export_id}", acme)[1])["status"] \
            == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state["status"] == "done", state
    status, archive, _ = api.call("GET", state["archive"], acme)
    assert status == 200
    with tarfile.open(fileobj=io.BytesIO(archive)) as t:
        manifest = json.load(t.extractfile("manifest.json"))
    assert manifest["tenant"] == "acme" and manifest["counts"]["messages"] == 3

    # globex's token: nothing of acme's exists for it, in the same words as a bad id
    missing = api.call("GET", "/api/v1/messages/01ZZZZZZZZZZZZZZZZZZZZZZZZ", globex)
    assert missing[0] == 404
    listed = api.call("GET", "/api/v1/messages", globex)[1]["messages"]
    assert [m["subject"] for m in listed] == ["globex from jane"]
    for path in (f"/api/v1/messages/{one}", f"/api/v1/messages/{one}/eml",
                 f"/api/v1/exports/{export_id}", f"/api/v1/exports/{export_id}/archive"):
        status, doc, _ = api.call("GET", path, globex)
        assert (status, doc) == (404, missing[1]), path
    assert all(e["action"] != "tenant.export" or e["actor"] != f"api:{acme.split('_')[1]}"
               for e in api.call("GET", "/api/v1/audit", globex)[1]["events"])
    assert {e["action"] for e in api.call("GET", "/api/v1/audit?limit=1000", acme)[1]
            ["events"]} >= {"api.get", "api.post", "tenant.export"}
    probes = [e for e in api.call("GET", "/api/v1/audit?limit=1000", globex)[1]["events"]
              if e["detail"].get("status") == 404]
    assert {e["detail"]["path"] for e in probes} >= {"/api/v1/messages/{id}",
                                                     "/api/v1/exports/{id}/archive"}
    erased = api.call("POST", "/api/v1/erasures", globex, {"subject": SUBJECT})[1]
    assert erased["messages"] == 1  # globex's own message from Jane, not acme's
    assert [m["subject"] for m in gw.messages(tenant="acme")].count("acme from jane") == 1


def test_erasure_over_the_api_respects_legal_holds(api_gateway):
    gw, api = api_gateway
    acme = _token(gw, "acme")
    status, doc, _ = api.call("POST", "/api/v1/erasures", acme,
                              {"subject": SUBJECT, "dry_run": True})
    assert status == 200 and doc["messages"] == 1 and doc["dry_run"] is True
    status, doc, _ = api.call("POST", "/api/v1/erasures", acme, {"subject": SUBJECT})
    assert status == 200 and doc["messages"] == 1
    assert "acme from jane" not in {r["subject"] for r in gw.messages()}
    status, doc, _ = api.call("POST", "/api/v1/erasures", acme,
                              {"subject": "held@client.test"})
    assert status == 409 and "legal hold case-9" in doc["error"]
    assert "acme held" in {r["subject"] for r in gw.messages()}
    events = json.loads(gw.cli("audit", "list", "--action", "subject.erase", "--json",
                               check=True).stdout)
    assert events[-1]["actor"] == f"api:{acme.split('_')[1]}"


BAD_INPUT = [
    ("GET", "/api/v1/messages?limit=abc", None, 400, "limit: not a whole number"),
    ("GET", "/api/v1/messages?limit=0", None, 400, "limit: must be 1 to 1000"),
    ("GET", "/api/v1/messages?since=yesterday", None, 400, "since: not an ISO 8601 time"),
    ("GET", "/api/v1/messages?after=x", None, 400, "after: a message id"),
    # an id is 26 ASCII letters and digits: not empty, no newline after it, no letter
    # that only upper() makes ASCII (dotless i)
    ("GET", "/api/v1/messages?after=", None, 400, "after: a message id"),
    ("GET", f"/api/v1/messages?after={'0' * 26}%0A", None, 400, "after: a message id"),
    ("GET", f"/api/v1/messages?after={'0' * 25}%C4%B1", None, 400, "after: a message id"),
    ("GET", "/api/v1/messages?address=nobody", None, 400, "address: an e-mail address"),
    ("GET", "/api/v1/messages/not-an-id", None, 404, "not found"),
    ("GET", "/api/v1/nothing-here", None, 404, "not found"),
    ("DELETE", "/api/v1/messages", None, 405, "method not allowed"),
    ("POST", "/api/v1/erasures", b"{not json", 400, "not valid JSON"),
    ("POST", "/api/v1/erasures", [1, 2], 400, "a JSON object"),
    ("POST", "/api/v1/erasures", {}, 400, "subject: an e-mail address is needed"),
    ("POST", "/api/v1/erasures", {"subject": "x y@z"}, 400, "subject: an e-mail address"),
    ("POST", "/api/v1/erasures", {"subject": SUBJECT, "dry_run": "yes"}, 400, "dry_run"),
    ("POST", "/api/v1/erasures", {"subject": SUBJECT, "force": True}, 400, "unknown field"),
    ("POST", "/api/v1/exports", {"subject": 5}, 400, "subject: an e-mail address"),
    ("POST", "/api/v1/exports", {"subject": None}, 400, "subject: an e-mail address"),
    ("POST", "/api/v1/exports", b"x" * 2_000_000, 413, "too large"),
    ("POST", "/api/v1/exports", b"[" * 100_000, 400, "nested too deeply"),
    ("POST", "/api/v1/erasures", b'{"a":' * 50_000, 400, "nested too deeply"),
    ("POST", "/api/v1/erasures", b"subject=x", 415, "must be JSON"),
]


@pytest.mark.sqlite_only  # input checks: any database
def test_bad_input_gets_a_json_error(api_gateway):
    gw, api = api_gateway
    token = _token(gw, "acme")
    for method, path, body, status, words in BAD_INPUT:
        raw = body if isinstance(body, bytes) else None
        content_type = "text/plain" if status == 415 else "application/json"
        got, doc, headers = api.call(method, path, token, None if raw else body, raw=raw,
                                     content_type=content_type)
        assert got == status, (method, path, doc)
        assert headers["Content-Type"].startswith("application/json"), path
        assert words in doc["error"], (path, doc)
        assert "Traceback" not in json.dumps(doc)
        if status == 405:
            assert headers["Allow"] == "GET,HEAD", headers
    got, doc, _ = api.call("POST", "/api/v1/erasures", token, {"subject": SUBJECT},
                           content_type="application/json; charset=bogus")
    assert (got, doc) == (415, {"error": "unknown charset 'bogus'"})
    assert "Traceback" not in gw.log()


@pytest.mark.sqlite_only  # input checks: any database
def test_without_a_valid_token_nothing_is_served(api_gateway):
    _gw, api = api_gateway
    for token in (None, "mfr_000000000000_" + "A" * 43, "garbage"):
        status, doc, _ = api.call("GET", "/api/v1/messages", token)
        assert status == 401 and "API token" in doc["error"]
    status, doc, _ = api.call("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"


def test_the_openapi_description_covers_every_route():
    from gateway.api import AdminAPI, openapi_document
    from gateway.api.console import ConsoleRoutes
    from gateway.api.exports import ExportRoutes
    from gateway.api.http import Context
    from gateway.config import GatewayConfig
    from gateway.policyset import PolicySet

    doc = openapi_document()
    routes = {("GET", "/api/v1/openapi.json"),
              ("GET", "/api/v1/messages"), ("GET", "/api/v1/messages/{id}"),
              ("DELETE", "/api/v1/messages/{id}"), ("GET", "/api/v1/messages/{id}/eml"),
              ("GET", "/api/v1/messages/{id}/text"),
              ("GET", "/api/v1/search"),
              ("GET", "/api/v1/deliveries"), ("GET", "/api/v1/deliveries/{id}"),
              ("POST", "/api/v1/deliveries/{id}/retry"),
              ("POST", "/api/v1/deliveries/{id}/drop"),
              ("POST", "/api/v1/exports"), ("GET", "/api/v1/exports/{id}"),
              ("GET", "/api/v1/exports/{id}/archive"), ("POST", "/api/v1/erasures"),
              ("GET", "/api/v1/users"), ("GET", "/api/v1/contacts"),
              ("GET", "/api/v1/subprocessors"), ("GET", "/api/v1/subprocessors/notices"),
              ("POST", "/api/v1/subprocessors/{name}/objections"),
              ("GET", "/api/v1/holds"), ("POST", "/api/v1/holds"),
              ("DELETE", "/api/v1/holds/{id}"), ("GET", "/api/v1/audit"),
              ("GET", "/api/v1/incidents"), ("GET", "/api/v1/incidents/{id}"),
              ("GET", "/api/v1/processing-record"), ("GET", "/api/v1/requests"),
              ("POST", "/api/v1/requests")}
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert described == routes
    # every operation but the document itself names the scope it needs
    scopes = {(m.upper(), p): op.get("security") for p, ops in doc["paths"].items()
              for m, op in ops.items()}
    assert scopes.pop(("GET", "/api/v1/openapi.json")) == []
    assert {s[0]["token"][0] for s in scopes.values()} == {"read", "export", "erase", "admin"}

    api = AdminAPI.__new__(AdminAPI)  # only the routing table is wanted here
    api.config, api._scopes = GatewayConfig(), {}
    api.ctx = Context(GatewayConfig(), None, None, None, None, PolicySet)  # type: ignore[arg-type]
    api.exports = ExportRoutes(api.ctx)
    api.console = ConsoleRoutes(None, None, None)  # type: ignore[arg-type]
    served = {(r.method, r.resource.canonical) for r in api.app().router.routes()
              if r.method != "HEAD"}
    # and the web console's page, files and session, which need no token
    console = {("GET", "/"), ("GET", "/console"), ("GET", "/console/"),
               ("GET", "/console/console.js"), ("GET", "/console/console.css"),
               ("POST", "/console/login"), ("POST", "/console/logout"),
               ("GET", "/console/session")}
    assert served == routes | console


def test_an_id_of_another_tenant_answers_as_one_that_does_not_exist(api_gateway):
    """The same 404, headers and all, from the same query: the lookup is scoped by
    tenant in the database, so a token cannot tell the two apart by their time either
    (bench/api_timing.py measures that)."""
    gw, api = api_gateway
    globex = _token(gw, "globex")
    acme_id = next(m["id"] for m in gw.messages(tenant="acme"))
    answers = [api.call("GET", f"/api/v1/messages/{mid}", globex)
               for mid in (acme_id, "01ZZZZZZZZZZZZZZZZZZZZZZZZ")]
    for status, doc, headers in answers:
        headers.pop("Date")
        assert (status, doc) == (404, {"error": "not found"})
    assert answers[0] == answers[1]
    assert gw.store.get_message(acme_id, tenant="globex") is None
    assert gw.store.get_message(acme_id, tenant="acme")["id"] == acme_id


@pytest.mark.sqlite_only  # the limit is counted in the daemon: any database
def test_exports_running_at_once_per_tenant_are_limited(api_gateway):
    gw, api = api_gateway
    acme, globex = _token(gw, "acme"), _token(gw, "globex")
    limit = 2  # admin_api.max_exports_per_tenant's default
    start = threading.Barrier(8)
    answers: list[tuple[int, Any, dict[str, str]]] = []

    def post() -> None:
        start.wait(10)
        answers.append(api.call("POST", "/api/v1/exports", acme, {}))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    started = [doc["id"] for status, doc, _ in answers if status == 202]
    refused = [(doc, headers) for status, doc, headers in answers if status == 429]
    assert len(started) + len(refused) == 8, answers
    assert refused, "eight exports at once and none refused"
    for doc, headers in refused:
        assert "exports of this tenant are running" in doc["error"], doc
        assert int(headers["Retry-After"]) > 0
    # another tenant has slots of its own meanwhile
    assert api.call("POST", "/api/v1/exports", globex, {})[0] == 202

    def finished() -> list[dict[str, Any]] | None:
        states = [api.call("GET", f"/api/v1/exports/{i}", acme)[1] for i in started]
        return states if all(s["status"] == "done" for s in states) else None

    done = wait_for(finished, what="the exports to finish")
    # never more than the limit running at one time, whatever the timing was
    spans = [(datetime.fromisoformat(d["created_at"]), datetime.fromisoformat(d["finished_at"]))
             for d in done]
    for began, _ in spans:
        assert sum(b <= began < f for b, f in spans) <= limit, spans
    assert api.call("POST", "/api/v1/exports", acme, {})[0] == 202  # the slots are free again


@pytest.mark.sqlite_only  # HTTP answers: any database
def test_an_archive_is_sent_whole_whatever_range_or_condition_the_request_has(api_gateway):
    """Range and If-* headers got 206, 304, 412 and 416 answers, the errors among them
    empty tar pages: none in the API's description, none in its JSON error shape."""
    gw, api = api_gateway
    acme = _token(gw, "acme")
    export_id = api.call("POST", "/api/v1/exports", acme, {})[1]["id"]
    wait_for(lambda: api.call("GET", f"/api/v1/exports/{export_id}", acme)[1]["status"]
             == "done", what="the export")
    path = f"/api/v1/exports/{export_id}/archive"
    whole = api.call("GET", path, acme)[1]
    for header, value in (("Range", "bytes=0-9"), ("Range", "bytes=99999999-"),
                          ("If-None-Match", "*"), ("If-Match", '"other"'),
                          ("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT"),
                          ("If-Unmodified-Since", "Mon, 01 Jan 1990 00:00:00 GMT")):
        request = urllib.request.Request(api.base + path, headers={
            "Authorization": f"Bearer {acme}", header: value})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                answer = reply.status, reply.headers["Content-Type"], reply.read()
        except urllib.error.HTTPError as exc:
            answer = exc.code, exc.headers["Content-Type"], exc.read()
        assert answer == (200, "application/x-tar", whole), (header, answer[:2])
    [archive] = gw.directory.rglob(f"{export_id}.tar")  # var/exports/acme/ID.tar
    archive.unlink()
    assert api.call("GET", path, acme)[:2] == (404, {
        "error": "the archive is not on this instance (or was removed)"})


@pytest.fixture
def bare_api(make_gateway: Any) -> tuple[Any, int, str]:
    """A daemon with the admin API, a header timeout of 1 s and a token of acme."""
    port = free_port()
    gw = make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}", "header_timeout": "1s"}})
    return gw, port, _token(gw, "acme")


def raw_http(port: int, request: bytes, tls: ssl.SSLContext | None = None,
             ) -> tuple[int, dict[str, str], bytes]:
    """Bytes no HTTP library would send; the reply read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain, \
            (tls.wrap_socket(plain, server_hostname="127.0.0.1") if tls else plain) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return int(status.split()[1]), dict(line.split(": ", 1) for line in lines), body


@pytest.mark.sqlite_only  # HTTP parsing: any database
def test_malformed_http_gets_the_json_error_and_no_header_is_logged(bare_api):
    gw, port, token = bare_api
    secret = secrets.token_urlsafe(6750)  # 9,000 characters
    post = (f"POST /api/v1/exports HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n").encode()
    messages = "/api/v1/messages"
    cases = {
        "URL": f"GET {messages}?after={'A' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        "header": f"GET {messages} HTTP/1.1\r\nHost: x\r\nX-Big: {'b' * 9000}\r\n\r\n".encode(),
        "token": f"GET {messages} HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Bearer {token}{secret}\r\n\r\n".encode(),
        "Content-Length": post + b"Content-Length: -5\r\n\r\n{}",
        "TE and CL": post + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"2\r\n{}\r\n0\r\n\r\n",
        "gzip": post + b"Content-Encoding: gzip\r\nContent-Length: 4\r\n\r\n{\"a\"",
        "NUL": f"GET {messages} HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n".encode(),
    }
    for what, request in cases.items():
        status, headers, body = raw_http(port, request)
        assert status == 400, (what, body)
        assert headers["Content-Type"].startswith("application/json"), (what, headers)
        error = json.loads(body)["error"]
        assert error and secret[:20] not in error and token not in error, (what, error)
    # the daemon is fine and said what it refused, without a byte of the token
    status, doc, _ = Api(port).call("GET", messages, token)
    assert status == 200, doc
    log = gw.log()
    assert "answered 400 to a request from 127.0.0.1 (LineTooLong)" in log
    assert all(secret[i:i + 16] not in log for i in range(0, len(secret), 16))
    assert token.split("_", 2)[2] not in log
    assert "Traceback" not in log and " ERROR " not in log


@pytest.mark.sqlite_only  # connection handling: any database
def test_a_client_that_never_finishes_its_headers_is_cut_off(bare_api):
    _gw, port, token = bare_api
    slow = socket.create_connection(("127.0.0.1", port), timeout=5)
    began = time.monotonic()
    slow.sendall(b"GET /api/v1/mess")
    # others are served meanwhile, at once
    assert Api(port).call("GET", "/api/v1/messages", token)[0] == 200
    served = time.monotonic() - began
    closed = None
    slow.settimeout(0.2)
    while closed is None and time.monotonic() - began < 6:
        try:  # a byte now and then: a timer that restarts on data never fires
            slow.sendall(b"a")
            if slow.recv(100) == b"":
                closed = time.monotonic() - began
        except TimeoutError:
            pass
        except OSError:
            closed = time.monotonic() - began
    slow.close()
    assert closed is not None and 0.9 <= closed < 4, closed
    assert served < 0.9  # while the slow one still held its connection


@pytest.mark.sqlite_only  # TLS: any database
def test_with_a_certificate_the_api_speaks_https(make_gateway, tls_files):
    ca, chain, key = tls_files
    port = free_port()
    make_gateway({"admin_api": {"listen": f"127.0.0.1:{port}", "tls_cert_file": str(chain),
                                "tls_key_file": str(key)}})
    tls = client_context(ca)
    request = urllib.request.Request(f"https://127.0.0.1:{port}/api/v1/openapi.json")
    with urllib.request.urlopen(request, context=tls, timeout=10) as reply:
        assert reply.status == 200 and json.load(reply)["openapi"] == "3.1.0"
    status, headers, body = raw_http(port, b"GET /api/v1/messages HTTP/1.1\r\nHost: x\r\n"
                                           b"Content-Length: -5\r\n\r\n", tls)
    assert status == 400 and headers["Content-Type"].startswith("application/json"), body

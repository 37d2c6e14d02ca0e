"""The admin API fuzzed from the OpenAPI document it serves (schemathesis), against the
real daemon: the document must describe what the API does, and what it does must hold.

schemathesis runs as its command line does, with all its phases (the document's
examples, boundaries and invalid values of every parameter and body, random requests,
stateful sequences that carry ids from one answer into the next request) and all its
checks: no 5xx; only documented statuses, content types, headers and bodies; invalid
input refused and valid input accepted; other methods answered 405 with ``Allow``; the
declared token enforced.  (Its pytest integration for a schema that exists only once a
fixture has started the daemon, ``schemathesis.pytest.from_fixture``, sets
``Item._nodeid``, which pytest 9.2 no longer has.)

The first pass carries acme's token; the second none, or one schemathesis makes up, and
every answer there is the 401 in the API's JSON error shape.  No operation is left out:
the erasures may erase acme's mail (the token's own tenant), exports start until the
tenant's limit answers 429.  schemathesis itself does not call the operation that serves
the document it has read (GET /api/v1/openapi.json; tests/test_api.py does).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.api import openapi_document
from tests import test_api
from tests.test_api import _token

api_gateway = test_api.api_gateway  # the fixture: a daemon with acme's and globex's mail

SEED = 20261204  # with --generation-deterministic: the same requests in each run
EXAMPLES = 30  # per operation in the random phase; the coverage phase adds its own
TOKEN_NEEDED = {"error": "a valid API token is needed: Authorization: Bearer TOKEN"}


# A query that fits the document's schema (a string) may still be one the search
# language refuses, an unclosed quote or an unknown field: its 400 is the right answer,
# and no JSON Schema can say which strings parse.
CONFIG = """
[[operations]]
include-path = "/api/v1/search"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403"]
"""


def fuzz(base: str, har: Path, *options: str, examples: int = EXAMPLES
         ) -> list[dict[str, Any]]:
    """Run schemathesis against the API at ``base``; the requests and answers (HAR)."""
    (har.parent / "schemathesis.toml").write_text(CONFIG)
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/api/v1/openapi.json",
               "--checks", "all", "--seed", str(SEED), "--generation-deterministic",
               "--max-examples", str(examples),
               "--report", "har", "--report-har-path", str(har), "--no-color", *options]
    # in the test's own folder: no schemathesis.toml of anyone else's, no files left behind
    result = subprocess.run(command, capture_output=True, timeout=120, cwd=har.parent)
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    entries: list[dict[str, Any]] = json.loads(har.read_text())["log"]["entries"]
    return entries


def _operations() -> dict[tuple[str, re.Pattern[str]], str]:
    return {(method.upper(), re.compile(re.sub(r"\{[^}]+\}", "[^/]+", path) + r"(\?.*)?")):
            f"{method.upper()} {path}"
            for path, methods in openapi_document()["paths"].items() for method in methods}


OPERATIONS = _operations()


def operation(entry: dict[str, Any]) -> str | None:
    """The documented operation a request was for ("GET /api/v1/messages/{id}"), if any."""
    method, url = entry["request"]["method"], entry["request"]["url"]
    path = "/" + url.split("/", 3)[3]
    return next((label for (m, pattern), label in OPERATIONS.items()
                 if m == method and pattern.fullmatch(path)), None)


def assert_json_errors(entries: list[dict[str, Any]]) -> None:
    """Every refusal, documented or not (a 405 to a method no operation has), is JSON
    of one shape."""
    for entry in entries:
        response = entry["response"]
        if response["status"] >= 400:
            where = (entry["request"]["method"], entry["request"]["url"], response["status"])
            assert response["content"]["mimeType"].startswith("application/json"), where
            body = json.loads(response["content"]["text"])
            assert list(body) == ["error"] and body["error"], where


@pytest.mark.sqlite_only  # the API's handling of requests, whatever the database
@pytest.mark.timeout(400)  # two fuzzing runs of up to 120 s each on a slow machine
def test_the_admin_api_does_what_its_openapi_document_says(api_gateway, tmp_path):
    gw, api = api_gateway
    gw.cli("incident", "open", "--tenant", "acme", "--discovered", "2026-12-01T09:00Z",
           "--description", "a misdirected export", check=True)
    token = _token(gw, "acme")

    acme, globex = ([m["id"] for m in gw.messages(tenant=t)] for t in ("acme", "globex"))

    entries = fuzz(api.base, tmp_path / "acme.har", "--header", f"Authorization: Bearer {token}")
    # the token got the fuzzer into every operation, and to acme's data: a 2xx, or a 409
    # for an export not finished yet (or mail under a legal hold)
    reached = {operation(e) for e in entries if 200 <= e["response"]["status"] < 300
               or e["response"]["status"] == 409}
    assert reached == set(OPERATIONS.values()) - {"GET /api/v1/openapi.json"}
    assert_json_errors(entries)
    answers = "".join(e["response"]["content"].get("text", "") for e in entries)
    assert any(message in answers for message in acme)  # ids are there to be seen...
    assert globex and not any(message in answers for message in globex)  # ...but not these

    # without a token, or with one schemathesis makes up: the 401, every time (its warning
    # that every answer was a 401 is the point here); fewer random requests: whatever
    # they hold, the answer is the same
    entries = fuzz(api.base, tmp_path / "anonymous.har", "--warnings", "off", examples=5)
    assert {operation(e) for e in entries} >= reached
    for entry in entries:
        response = entry["response"]
        assert response["status"] == 401, entry["request"]
        assert json.loads(response["content"]["text"]) == TOKEN_NEEDED
    sent = {any(h["name"].lower() == "authorization" for h in e["request"]["headers"])
            for e in entries}
    assert sent == {True, False}, "both kinds of request, with and without a token"

    log = gw.log()
    assert "Traceback" not in log and " ERROR " not in log, log


def test_the_openapi_document_is_valid_openapi_3_1():
    import schemathesis

    schemathesis.openapi.from_dict(openapi_document()).validate()

"""Workflow rules: the semantics as a table, the loader's errors, and `rules test`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.workflow import loader
from gateway.workflow.rules import MessageView, evaluate

ROOT = Path(__file__).resolve().parent.parent
TENANTS = {"acme", "globex"}
DESTINATIONS = {"finance", "archive-server"}
TAGS = {"support", "invoice", "vip", "big"}  # retention.yaml defines them

RULES = """
tenants:
  acme:
    rules:
      - name: vip
        match: {sender: "*@vip.example"}
        actions: {cc: [manager@acme.test], tag: [vip]}
      - name: vip-pdf
        match: {tagged: [vip], attachment_type: application/pdf}
        actions: {route: finance, stop: true}
      - name: agents-out
        match: {direction: outbound}
        actions: {bcc: [archive@acme.test, Manager@acme.test], tag: [support]}
      - name: big
        match: {size_over: 1MB}
        actions: {tag: [big]}
      - name: subject-regex
        match: {header: {Subject: {regex: "^\\\\[ticket #\\\\d+\\\\]"}}}
        actions: {bcc: [tickets@acme.test]}
      - name: exact-case
        match: {header: {X-Flag: {exact: "YES", case_sensitive: true}}}
        actions: {tag: [invoice]}
      - name: no-exe
        match: {attachment_name: "*.exe"}
        actions: {reject: "550 5.7.1 No executables"}
      - name: drop
        match: {not: {any: [{direction: outbound}, {header: {List-Id: "*keep*"}}]},
                header: {List-Id: "*"}}
        actions: {discard: true}
      - name: after-drop
        actions: {bcc: [everything@acme.test]}
"""


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "workflows.yaml"
    path.write_text(RULES)
    return loader.load(path, TENANTS, DESTINATIONS, TAGS).for_tenant("acme")


def view(**kw):
    base = dict(direction="inbound", sender="someone@else.example",
                recipients=("support@acme.test",))
    base.update(kw)
    return MessageView(**base)


@pytest.mark.parametrize(
    ("message", "cc", "bcc", "routes", "tags", "matched", "end"),
    [
        (view(), [], ["everything@acme.test"], [], [], ["after-drop"], None),
        (view(sender="Boss@VIP.example"), ["manager@acme.test"], ["everything@acme.test"], [],
         ["vip"], ["vip", "after-drop"], None),
        (view(sender="boss@vip.example", attachments=(("a.pdf", "application/pdf"),)),
         ["manager@acme.test"], [], ["finance"], ["vip"], ["vip", "vip-pdf"], "stop"),
        # The same address as cc and (differently cased) bcc is one Cc copy.
        (view(direction="outbound", sender="boss@vip.example"), ["manager@acme.test"],
         ["archive@acme.test", "everything@acme.test"], [], ["vip", "support"],
         ["vip", "agents-out", "after-drop"], None),
        (view(size=2_000_000), [], ["everything@acme.test"], [], ["big"], ["big", "after-drop"],
         None),
        (view(headers=(("subject", "[ticket #42] help"),)), [],
         ["tickets@acme.test", "everything@acme.test"], [], [],
         ["subject-regex", "after-drop"], None),
        (view(headers=(("x-flag", "yes"),)), [], ["everything@acme.test"], [], [],
         ["after-drop"], None),
        (view(headers=(("x-flag", "YES"),)), [], ["everything@acme.test"], [], ["invoice"],
         ["exact-case", "after-drop"], None),
        (view(attachments=(("run.EXE", "application/octet-stream"),)), [], [], [], [],
         ["no-exe"], "reject"),
        (view(headers=(("list-id", "<news.example>"),)), [], [], [], [], ["drop"], "discard"),
        (view(headers=(("list-id", "<keep.example>"),)), [], ["everything@acme.test"], [], [],
         ["after-drop"], None),
    ],
)
def test_semantics(rules, message, cc, bcc, routes, tags, matched, end):
    plan = evaluate(rules, message)
    assert plan.cc == cc
    assert plan.bcc == bcc
    assert plan.routes == routes
    assert plan.tags == tags
    assert [name for name, _ in plan.matched] == matched
    if end == "reject":
        assert plan.reject == "550 5.7.1 No executables"
    elif end == "discard":
        assert plan.discard
    elif end == "stop":
        assert plan.stopped_by == matched[-1] and not plan.ended
    else:
        assert plan.stopped_by is None


def test_headers_never_add_copy_targets(rules):
    plan = evaluate(rules, view(headers=(("cc", "attacker@evil.example"),
                                         ("bcc", "attacker@evil.example"))))
    assert "attacker@evil.example" not in plan.cc + plan.bcc


def test_example_file_is_valid():
    from gateway import config
    from gateway import policyset as policy_loader

    cfg = config.load(ROOT / "config" / "gateway.yaml", env={})
    policies = policy_loader.load(ROOT / "policies", cfg.tenants, cfg.destinations)
    assert len(policies.workflows.for_tenant("demo")) == 6
    assert policies.files == ("retention.yaml", "subprocessors.yaml", "workflows.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tenants:\n  nobody:\n    rules: []\n", ":2: unknown tenant 'nobody'"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        actions: {route: nowhere}\n",
         ":5: unknown destination 'nowhere'"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        actions: {tag: [nope]}\n",
         ":5: unknown tag 'nope'"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        match: {sender: {regex: '(['}}\n"
         "        actions: {stop: true}\n", ":5: bad regular expression"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        match: {colour: red}\n"
         "        actions: {stop: true}\n", ":5: unknown key 'colour' in match"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n"
         "        actions: {cc: ['x@y.test\\r\\nRCPT TO:<z@evil.test>']}\n",
         ":5: cc: not a plain address"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n"
         "        actions: {bcc: ['a b@acme.test']}\n",
         ":5: bcc: not a plain address"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        actions: {bcc: [nodomain]}\n",
         ":5: bcc: not a plain address"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        actions: {reject: '250 ok'}\n",
         ":5: reject takes a reply"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        actions: {stop: yes please}\n",
         ":5: stop must be true or false"),
        ("tenants:\n  acme:\n    rules:\n      - match: {}\n        actions: {stop: true}\n",
         ":4: every rule needs a name"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n        actions: {stop: true}\n"
         "      - name: a\n        actions: {stop: true}\n", ":6: duplicate rule name 'a'"),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n", ":4: rule 'a' has no actions"),
        ("tenants:\n  acme:\n    rules: {}\n", ":3: rules must be a list"),
        ("tenants:\n  acme:\n    rules:\n    rules: []\n", ":4: duplicate key 'rules'"),
        ("tenants: [\n", ":2: "),
        ("tenants:\n  acme:\n    rules:\n      - name: a\n"
         "        match: {header: {X: {exact: yes}}}\n        actions: {stop: true}\n",
         ":5: exact takes a string, got a bool (put it in quotes)"),
    ],
)
def test_loader_errors(tmp_path, text, expected):
    path = tmp_path / "workflows.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        loader.load(path, TENANTS, DESTINATIONS, TAGS)
    # file:line:column: message; the tests name the line, the column is where the key starts
    problems = [re.sub(r"^(.*?:\d+):\d+:", r"\1:", p) for p in info.value.problems]
    assert any(p.startswith(str(path)) and expected in p for p in problems), problems


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          timeout=60, cwd=cwd)


def test_rules_test_command(tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(
        b"From: Boss <boss@bigclient.example>\r\nTo: billing@example.test\r\n"
        b"Subject: invoice\r\n\r\nplease pay\r\n"
    )
    result = _cli("rules", "test", "--tenant", "demo", str(eml))
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "matched:    billing-to-finance: direction is inbound and recipient" in out
    assert "matched:    key-clients" in out
    assert "cc copies:  accountmanager@example.test" in out
    assert "routes:     finance" in out
    assert "pre-tags:   support (tenant defaults and classifier)" in out
    assert "tags:       support, invoice, key-client" in out
    assert "retention:  tag invoice (7y, longest of invoice, support)" in out
    doc = json.loads(_cli("rules", "test", "--tenant", "demo", str(eml), "--json").stdout)
    assert [m["rule"] for m in doc["matched"]] == ["billing-to-finance", "key-clients"]
    assert (doc["outcome"], doc["cc"], doc["routes"]) == (
        "delivered", ["accountmanager@example.test"], ["finance"])
    assert doc["tags"] == ["support", "invoice", "key-client"]
    assert doc["retention"] == "tag invoice (7y, longest of invoice, support)"
    out = _cli("rules", "test", "--tenant", "demo", str(eml), "--direction", "outbound",
               "--recipient", "customer@else.example").stdout.decode()
    assert "bcc copies: archive@example.test" in out
    missing = _cli("rules", "test", "--tenant", "demo", str(tmp_path / "none.eml"))
    assert missing.returncode == 1 and b"No such file" in missing.stderr
    unknown = _cli("rules", "test", "--tenant", "nobody", str(eml))
    assert unknown.returncode == 1 and b"no tenant 'nobody'" in unknown.stderr


def test_check_reports_workflow_errors(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "workflows.yaml").write_text(
        "tenants:\n  demo:\n    rules:\n      - name: a\n        actions: {route: mars}\n"
    )
    config = tmp_path / "gw.yaml"
    config.write_text((ROOT / "config" / "gateway.yaml").read_text().replace(
        "../", "").replace("directory: policies", f"directory: {policies}"))
    for command in ("check", "serve"):  # serve never starts half-configured
        result = _cli(command, "--config", str(config))
        assert result.returncode == 1
        expected = f"{policies}/workflows.yaml:5:19: unknown destination 'mars'"
        assert expected.encode() in result.stderr
        assert b"Traceback" not in result.stderr


def test_early_reject_only_before_body_rules(rules):
    from gateway.workflow.rules import can_reject_early

    # acme's first reject (no-exe) needs the body, so nothing is decided at DATA.
    assert not can_reject_early(rules)
    exe = view(attachments=(("run.exe", "application/octet-stream"),))
    early = evaluate(rules, exe, before_body=True)
    assert early.reject is None
    assert early.partial and early.stopped_by is None
    assert evaluate(rules, exe).reject == "550 5.7.1 No executables"
    assert not evaluate(rules, exe).partial

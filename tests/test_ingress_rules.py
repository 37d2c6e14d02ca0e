"""Decisions taken at the end of DATA: loop protection and rules that reject early."""

from __future__ import annotations

import pytest

from tests.conftest import RawClient, simple_message

pytestmark = pytest.mark.sqlite_only  # envelope rules decide before the store

WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: copy-all
        actions: {bcc: [archive@vault.test]}
      - name: no-lottery
        match: {header: {Subject: "*lottery*"}}
        actions: {reject: "550 5.7.1 We do not play"}
      - name: no-exe
        match: {attachment_name: "*.exe"}
        actions: {reject: "550 5.7.1 No executables"}
"""


def _gateway(make_gateway, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    return make_gateway({"policies": {"directory": str(policies)}})


def _send(gw, message: bytes, rcpts=("support@acme.test",)) -> str:
    c = RawClient(gw.port)
    c.reply()
    c.command("EHLO client.test")
    c.command("MAIL FROM:<a@sender.test>")
    for r in rcpts:
        assert c.command(f"RCPT TO:<{r}>").startswith("250")
    assert c.command("DATA").startswith("354")
    return c.command(message + b".")


def test_header_rule_rejects_at_end_of_data(make_gateway, tmp_path):
    gw = _gateway(make_gateway, tmp_path)
    reply = _send(gw, simple_message(subject="You won the LOTTERY"))
    assert reply == "550 5.7.1 We do not play"
    assert _send(gw, simple_message(subject="normal")).startswith("250 2.0.0")
    rows = gw.wait_processed(1)
    assert [r["subject"] for r in rows] == ["normal"]
    # the copy rule ran for the stored one only
    assert [d["recipient"] for d in gw.store.list_deliveries()] == ["archive@vault.test"]


def test_rejecting_tenant_is_left_out_of_a_shared_transaction(make_gateway, tmp_path):
    gw = _gateway(make_gateway, tmp_path)
    reply = _send(gw, simple_message(subject="lottery news"),
                  rcpts=("support@acme.test", "x@globex.test"))
    assert reply.startswith("250 2.0.0")
    rows = gw.wait_processed(1)
    assert [(r["tenant_id"], r["recipients"]) for r in rows] == [("globex", ["x@globex.test"])]


def test_message_over_the_hop_limit_is_554(make_gateway, tmp_path):
    gw = _gateway(make_gateway, tmp_path)
    hops = b"".join(b"Received: from hop%d.test by hop%d.test; Tue, 24 Nov 2026 10:00:00 +0000"
                    b"\r\n" % (n, n + 1) for n in range(50))
    assert _send(gw, hops + simple_message(subject="looping")) == "554 5.4.6 Too many hops"
    assert _send(gw, hops[hops.index(b"Received", 1):] + simple_message(subject="ok")
                 ).startswith("250 2.0.0")
    assert [r["subject"] for r in gw.wait_processed(1)] == ["ok"]
    assert gw.store.list_deliveries()[0]["recipient"] == "archive@vault.test"

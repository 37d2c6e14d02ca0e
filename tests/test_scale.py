"""Several daemons on one PostgreSQL: shared work, each piece done once, kill -9 survived."""

from __future__ import annotations

import time

import pytest

from tests.conftest import _merge, gateway_with_rules, wait_for
from tests.load import Load

RULES = """
tenants:
  acme:
    rules:
      - name: archive
        match: {recipient: "support@acme.test"}
        actions: {bcc: [archive@vault.test]}
"""


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_three_instances_under_load_survive_a_kill_9(make_gateway, tmp_path, relay, backend):
    """Three daemons accept side by side; one is killed while every instance has copies
    in flight (held by the downstream server before any message data went out). The two
    left take over its leases: every message answered 250 is stored and processed, and
    every copy arrives exactly once."""
    lease = {"lease_time": "4s"}
    first = gateway_with_rules(make_gateway, tmp_path, relay, RULES, {
        "smtp": {"max_connections_per_ip": 200},
        "pipeline": lease,
        "delivery": {**lease, "concurrency": 4, "timeout": "30s", "retry_base": "1s"},
    })
    config = _merge(first.config, {"metrics": {"listen": None}})
    victim, third = (make_gateway(config, db_url=first.db_url) for _ in range(2))
    ports = [first.port, victim.port, third.port]
    with Load(ports, clients=9, rcpt=lambda n: "support@acme.test") as load:
        load.wait(150, timeout=60)
        relay.handler.hold = True
        # 3 x 4: every instance has all its delivery slots waiting on the server
        wait_for(lambda: relay.handler.held >= 12, timeout=30, what="12 held copies")
        victim.kill()
        time.sleep(0.5)
        relay.handler.hold = False
        load.wait(len(load.acked) + 100, timeout=60)  # the two left go on accepting
    acked = load.acked
    assert all(load.by_port[p] > 0 for p in ports), load.by_port
    assert relay.handler.cut >= 4, "the kill cut none of the victim's deliveries"

    def settled():
        rows = first.messages()
        return rows if all(r["status"] == "processed" for r in rows) else None

    rows = wait_for(settled, timeout=90, what="every message processed")
    stored = [r["subject"] for r in rows]
    assert len(stored) == len(set(stored))
    assert acked - set(stored) == set(), "acknowledged but not stored"
    # A message committed just before the kill but not answered is stored and handled too.
    wait_for(lambda: len(relay.messages) >= len(stored), timeout=90, what="every copy")
    time.sleep(2)  # a duplicate would arrive by now
    copies = [m.headers["Subject"] for m in relay.messages]
    assert sorted(copies) == sorted(stored)
    deliveries = first.store.list_deliveries()
    assert len(deliveries) == len(stored)
    assert {d["status"] for d in deliveries} == {"sent"}
    for gw in (first, third):
        assert " delivered queue_id=" in gw.log()

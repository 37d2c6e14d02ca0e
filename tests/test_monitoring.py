"""monitoring/: the alert rules pass promtool's checks and their unit tests, and the
alerts and the dashboard only use series the gateway exports."""

from __future__ import annotations

import json
import re
import subprocess

import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.children import _Families
from gateway.metrics import Metrics
from tests.conftest import ROOT, need_tool

MONITORING = ROOT / "monitoring"
SERIES = re.compile(r"\b((?:mailflowr_gateway|process)_[a-z_]+)\b")


def exported_series() -> set[str]:
    """Every sample name a gateway's /metrics can carry."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def test_alert_rules_pass_promtool_check_and_unit_tests():
    promtool = need_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "rules", "alerts.yaml"], cwd=MONITORING,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 22 rules found" in check.stdout
    tests = subprocess.run([promtool, "test", "rules", "alerts.test.yaml"], cwd=MONITORING,
                           capture_output=True, text=True, timeout=120)
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr


def test_every_alert_has_a_unit_test():
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tested = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())
    firing = {t["alertname"] for case in tested["tests"] for t in case["alert_rule_test"]
              if t["exp_alerts"]}
    assert alerts == firing


def test_alerts_and_dashboard_use_only_exported_series():
    exported = exported_series()
    rules = yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    exprs += [t["expr"] for p in panels for t in p["targets"]]
    used = {name for e in exprs for name in SERIES.findall(e)}
    assert used and used <= exported, used - exported
    # The dashboard shows the families an operator looks at first.
    shown = "\n".join(t["expr"] for p in panels for t in p["targets"])
    for family in ("smtp_messages_total", "accept_latency_seconds_bucket",
                   "delivery_queue_oldest_age_seconds", "deliveries_total",
                   "pipeline_backlog_messages", "policy_reload_failing",
                   "auth_results_total", "imap_imports_total", "imap_backlog_messages",
                   "delivery_queue_messages", "smtp_authentication_failures_total"):
        assert f"mailflowr_gateway_{family}" in shown


def test_a_renamed_family_keeps_its_old_name_for_one_release():
    metrics = Metrics()
    metrics.imap_backlog.labels("acme", "inbox").set(7)
    text = generate_latest(metrics.registry).decode()
    assert 'mailflowr_gateway_imap_backlog_messages{source="inbox",tenant="acme"} 7.0' in text
    renamed = re.findall(r"^\| `(mailflowr_gateway_\w+)` \| `(mailflowr_gateway_\w+)` \| "
                         r"([\d.]+) \|$", (ROOT / "docs" / "operations.md").read_text(), re.M)
    assert ("mailflowr_gateway_imap_backlog", "mailflowr_gateway_imap_backlog_messages",
            "0.3.0") in renamed
    shipped = (MONITORING / "alerts.yaml").read_text() + \
        (MONITORING / "dashboard.json").read_text()
    for old, new, until in renamed:
        assert f"# HELP {old} Renamed {new}; this name goes in {until}." in text
        assert re.search(rf"^{old}{{.*}} 7\.0$", text, re.M)  # the same samples
        assert not re.search(rf"\b{old}\b", shipped)  # the shipped rules have moved over


def test_a_child_process_metrics_carry_on_after_it_ends():
    """The daemon shows what its child processes report: once a child has ended
    (idle, or dead and replaced), the next one's counters and histograms are added to
    what the ended ones had reached, with the first child's creation time; a gauge
    is the running child's alone, and none is shown while no child runs."""
    def child(done: int, seconds: list[float], in_hand: int) -> list[Metric]:
        registry = CollectorRegistry()
        Counter("jobs", "Jobs done.", ["kind"], registry=registry).labels("a").inc(done)
        histogram = Histogram("took_seconds", "Time.", buckets=(1.0,), registry=registry)
        for s in seconds:
            histogram.observe(s)
        Gauge("in_hand", "Jobs in hand.", registry=registry).set(in_hand)
        return list(registry.collect())

    def shown(families: _Families) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        registry = CollectorRegistry()
        registry.register(families)
        text = generate_latest(registry).decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    families = _Families([])
    first = child(3, [0.5, 2.0], 4)
    families.report(first)
    created = shown(families)[("jobs_created", frozenset({("kind", "a")}))]
    families.child_ended()
    gone = shown(families)
    assert gone[("jobs_total", frozenset({("kind", "a")}))] == 3
    assert ("in_hand", frozenset()) not in gone
    families.report(child(2, [0.25], 1))
    now = shown(families)
    assert now[("jobs_total", frozenset({("kind", "a")}))] == 5
    assert now[("jobs_created", frozenset({("kind", "a")}))] == created
    assert now[("took_seconds_bucket", frozenset({("le", "1.0")}))] == 2
    assert now[("took_seconds_count", frozenset())] == 3
    assert now[("took_seconds_sum", frozenset())] == 2.75
    assert now[("in_hand", frozenset())] == 1

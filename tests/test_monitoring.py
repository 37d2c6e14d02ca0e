"""monitoring/: the alert rules pass promtool's checks and their unit tests, and the
alerts and the dashboard only use series the gateway exports."""

from __future__ import annotations

import json
import re
import subprocess

import yaml
from prometheus_client import generate_latest

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

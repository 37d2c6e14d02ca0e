"""Hot reload of the policy set: SIGHUP and file changes; a broken edit never takes effect."""

from __future__ import annotations

import signal
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.policy.loader import read_files, version_of
from tests.conftest import free_port, simple_message, wait_for

pytestmark = pytest.mark.sqlite_only  # policy files are read from disk

RETENTION = "default: 1y\ntags:\n  alpha: 1y\n  beta: 2y\ntenants:\n  acme: {tags: [%s]}\n"
WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: copy
        match: {direction: inbound}
        actions: {bcc: [%s@vault.test]}
"""


def _write(directory: Path, tag: str) -> str:
    """Policy version `tag`: every acme message tagged `tag` and copied to tag@vault.test."""
    (directory / "retention.yaml").write_text(RETENTION % tag)
    (directory / "workflows.yaml").write_text(WORKFLOWS % tag)
    return version_of(read_files(directory))


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _send(gw, count=1):
    with gw.smtp() as s:
        for i in range(count):
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(f"m{i}"))


def _copies(gw):
    """message id -> recipients of its deliveries."""
    out: dict[str, set[str]] = {}
    for d in gw.store.list_deliveries():
        out.setdefault(d["message_id"], set()).add(d["recipient"])
    return out


BROKEN = [
    ("retention.yaml", "default: 1y\ntags:\n  alpha: [1y\n", "retention.yaml:4:1: "),
    ("retention.yaml", "default: 1y\ntags:\n  alpha: 1y\n  beta: 2y\nextra: true\n",
     "retention.yaml:5:1: unknown key 'extra'"),
    ("retention.yaml", "default: 1y\ntags:\n  alpha: 1 year\n  beta: 2y\n",
     "retention.yaml:3:3: expected a duration"),
    ("retention.yaml", "default: 1y\ntags:\n  alpha: 1y\n",  # beta still used by workflows?
     None),
    ("workflows.yaml", WORKFLOWS.replace("bcc: [%s@vault.test]", "tag: [gamma]"),
     "workflows.yaml:7:19: unknown tag 'gamma'"),
    ("workflows.yaml", "tenants:\n  acme:\n    rules:\n      - name: copy\n        mat",
     "workflows.yaml:"),  # a half-written file
    ("retention.yaml", b"default: 1y\n\xff\xfe\n", "retention.yaml:2:1: file is not valid UTF-8"),
    ("subprocessors.yaml", "subprocessors:\n  relay-x: {purpose: relaying}\n",
     "subprocessors.yaml:2:13: purpose is one of outbound-relay"),
]


def test_a_broken_edit_keeps_the_policy_in_force(make_gateway, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    good = _write(policies, "alpha")
    metrics_port = free_port()
    gw = make_gateway({"policies": {"directory": str(policies), "watch_interval": "0.2s"},
                       "metrics": {"listen": f"127.0.0.1:{metrics_port}"}})
    assert f'mailflowr_gateway_policy_info{{version="{good}"}} 1.0' in _metrics(metrics_port)
    failures = 0
    removed = ("workflows.yaml", None, "workflows.yaml: the file was removed")
    for name, content, expected in [*BROKEN, removed]:
        path = policies / name
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        if expected is None:  # a valid edit (beta removed, and nothing uses it): takes effect
            wait_for(lambda: "policy reloaded (files changed)" in gw.log(), what="reload")
            _write(policies, "alpha")
            wait_for(lambda: gw.log().count("policy reloaded (files changed)") == 2, what="reload")
            continue
        failures += 1
        wait_for(lambda n=failures: gw.log().count("refused, policy") == n,
              what=f"refusal of {name}: {content!r}")
        refusal = [line for line in gw.log().splitlines() if "refused, policy" in line][-1]
        assert f"policy {good} stays in force" in refusal
        assert f"{policies}/{expected}" in refusal, refusal
        _send(gw)  # processed under the good policy all the same
        wait_for(lambda: all(r["status"] == "processed" for r in gw.messages()), what="processing")
        last = gw.messages()[-1]
        assert (last["tags"], last["policy_version"]) == (["alpha"], good)
        assert _copies(gw)[last["id"]] == {"alpha@vault.test"}
        _write(policies, "alpha")  # back to the good files (same version: no reload logged)
        (policies / "subprocessors.yaml").unlink(missing_ok=True)
        time.sleep(0.5)
    text = _metrics(metrics_port)
    assert f'mailflowr_gateway_policy_reloads_total{{result="failure"}} {failures}.0' in text
    assert f'mailflowr_gateway_policy_info{{version="{good}"}} 1.0' in text
    assert "mailflowr_gateway_policy_last_reload_success_timestamp_seconds" in text
    assert gw.proc.poll() is None


def test_sighup_reloads_and_the_next_message_follows_the_new_policy(make_gateway, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    first = _write(policies, "alpha")
    gw = make_gateway({"policies": {"directory": str(policies), "watch_interval": 0}})
    _send(gw)
    gw.wait_processed(1)
    second = _write(policies, "beta")
    time.sleep(0.3)
    _send(gw)  # no watcher: still the first policy
    wait_for(lambda: len(gw.messages()) == 2 and gw.messages()[1]["status"] == "processed")
    assert gw.messages()[1]["policy_version"] == first
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: f"policy reloaded (SIGHUP): {first} -> {second}" in gw.log(), what="SIGHUP")
    _send(gw)
    rows = gw.wait_processed(3)
    assert [(r["tags"], r["policy_version"]) for r in rows] == [
        (["alpha"], first), (["alpha"], first), (["beta"], second)]
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: f"policy reload (SIGHUP): no change (policy {second})" in gw.log())


@pytest.mark.sqlite_only
def test_no_message_sees_a_mix_of_versions(make_gateway, tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    versions = {"alpha": _write(policies, "alpha")}
    versions["beta"] = _write(policies, "beta")
    _write(policies, "alpha")
    gw = make_gateway({"policies": {"directory": str(policies), "watch_interval": 0},
                       "pipeline": {"batch_size": 4}})
    for round_ in range(12):  # flip the policy while messages are being processed
        _send(gw, 5)
        _write(policies, "beta" if round_ % 2 == 0 else "alpha")
        gw.proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
    rows = gw.wait_processed(60, timeout=60)
    copies = _copies(gw)
    by_version = {v: k for k, v in versions.items()}
    seen = set()
    for r in rows:
        tag = by_version[r["policy_version"]]
        seen.add(tag)
        assert r["tags"] == [tag], r
        assert copies[r["id"]] == {f"{tag}@vault.test"}, r
    assert seen == {"alpha", "beta"}

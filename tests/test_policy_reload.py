"""Hot reload of the policy set: SIGHUP and file changes; a broken edit never takes effect,
nor does a hostile file (deep nesting, huge, a FIFO, empty) stop the next good one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gateway.policyset import FILES, read_files, version_of
from tests.conftest import (
    ROOT,
    free_port,
    gateway_with_rules,
    http_get,
    metrics_port,
    samples,
    simple_message,
    value,
    wait_for,
)

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
        refusal = _refusals(gw)[-1]
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
    assert f"{first} -> {second} (retention.yaml, workflows.yaml changed)" in gw.log()
    # an edit of one file names that file only
    (policies / "retention.yaml").write_text(RETENTION % "beta" + "# reviewed\n")
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "(retention.yaml changed)" in gw.log(), what="the one-file reload")
    [event] = [e for e in gw.store.audit_events() if e["action"] == "policy.reload"][-1:]
    assert event["detail"]["changed"] == ["retention.yaml"]


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
        if round_ in (5, 6):
            # Once under each version for certain: these five are processed before the
            # next flip (beta is in force from round 4's flip, alpha from round 5's).
            # Otherwise a loaded machine may hold every message until after the last flip.
            gw.wait_processed(5 * (round_ + 1), timeout=60)
        _write(policies, "beta" if round_ % 2 == 0 else "alpha")
        gw.proc.send_signal(signal.SIGHUP)
        # the next messages come once the flip is in force, those sent are in hand
        wait_for(lambda n=round_ + 1: gw.log().count("policy reloaded (SIGHUP)") == n,
                 timeout=20, what=f"reload {round_ + 1}")
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


RULES = WORKFLOWS.lstrip("\n")  # the Bcc archive rule: tenants/acme/rules at lines 1-6


def _sparse(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(50 << 20)  # 50 MB that take no disk


def _aliases(path: Path) -> None:
    """1 KB of aliases to aliases: 2**24 nodes if expanded."""
    path.write_text("l0: &l0 [x, y]\n" + "".join(
        f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]\n" for i in range(1, 25)))


# (what, make it at a path, where in the file (after the path), the message); in threes:
# a set with a file that cannot be read at all (the second three) is refused unparsed.
HOSTILE = [
    ("1,000 nested [", lambda p: p.write_text("[" * 1000), ":1:65",
     "nested deeper than 64 levels"),
    ("a 150k-deep flow mapping", lambda p: p.write_text("{a: " * 150_000), ":1:254",
     "nested deeper than 64 levels"),
    ("a 1,000-level block mapping",
     lambda p: p.write_text("".join(" " * i + "a:\n" for i in range(1000))), ":64:64",
     "nested deeper than 64 levels"),
    ("a 50 MB file", _sparse, "", "file is larger than 1048576 bytes (52428800 bytes)"),
    ("a FIFO", os.mkfifo, "", "not a regular file (a FIFO)"),
    ("a directory", Path.mkdir, "", "not a regular file (a directory)"),
    ("an empty file", lambda p: p.write_text(""), "", "the file is empty"),
    ("duplicate keys", lambda p: p.write_text(RULES % "beta" + "  acme:\n    rules: []\n"),
     ":7:3", "duplicate key 'acme'"),
    ("aliases expanding to millions of nodes", _aliases, ":11:6",
     "aliases expand to more than 10000 nodes"),
]

# Valid YAML that reaches the validator: re.compile raises RecursionError, not re.error.
DEEP_REGEX = ("a regex of 5,000 nested groups", lambda p: p.write_text(RULES.replace(
    "{direction: inbound}", "{sender: {regex: '%s'}}" % ("(" * 5000 + ")" * 5000)) % "beta"),
    ":5:17", "regex too large or too deeply nested to compile")


def _replace(path: Path, make) -> None:
    """Put a hostile object in place of ``path``, whatever is there now: made aside and
    renamed into place, so the watcher never sees the file missing in between (only a
    directory cannot be renamed over a file, nor a file over a directory)."""
    aside = path.with_name(f".{path.name}.new")
    make(aside)
    if aside.is_dir() != path.is_dir() and path.exists():
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()
    os.replace(aside, path)


def _refusals(gw) -> list[str]:
    return [line for line in gw.log().splitlines() if "refused, policy" in line]


def test_hostile_policy_files_are_refused_and_the_next_good_edit_loads(make_gateway, tmp_path,
                                                                       relay):
    gw = gateway_with_rules(make_gateway, tmp_path, relay, RULES % "alpha",
                            {"policies": {"watch_interval": "0.2s"}})
    path = tmp_path / "policies" / "workflows.yaml"
    good = version_of(read_files(path.parent))
    port = metrics_port(gw)
    refused = [*HOSTILE, DEEP_REGEX]
    for n, (what, make, where, message) in enumerate(refused, 1):
        _replace(path, make)
        refusals = wait_for(lambda n=n: _refusals(gw)[n - 1:], 10, f"refusal of {what}")
        assert f"policy {good} stays in force: {path}{where}: {message}" in refusals[0]
        _, v = samples(port)
        assert value(v, "mailflowr_gateway_policy_reload_failing") == 1, what
        status = json.loads(http_get(port, "/status")[1])["policy"]
        assert status["version"] == good
        _named(status["reload_refused"], [f"{path}{where}: {message}"])
        if n == 1:  # where operators look: ready (the last good policy serves), degraded
            since = status["reload_refused_since"]
            code, body = http_get(port, "/readyz")
            ready = json.loads(body)
            assert code == 200 and ready["ready"] is True
            assert ready["checks"]["policy"]["since"] == since
            [degraded] = ready["degraded"]
            assert degraded.startswith(f"policy reload refused since {since}, policy {good} "
                                       f"stays in force: {path}{where}")
            shown = gw.cli("status", "--url", f"http://127.0.0.1:{port}").stdout.decode()
            assert f"DEGRADED    policy reload refused since {since}" in shown
        assert json.loads(http_get(port, "/status")[1])["policy"]["reload_refused_since"] \
            == since  # the first refusal of the streak
        _send(gw)  # still copied by the rule in force
        assert relay.wait(n)[-1].rcpt_tos == ["alpha@vault.test"], what
    _replace(path, lambda p: p.write_text(RULES % "beta"))  # the watcher lives on
    wait_for(lambda: "policy reloaded (files changed)" in gw.log(), 10, "the good edit")
    _, v = samples(port)
    assert value(v, "mailflowr_gateway_policy_reload_failing") == 0
    assert value(v, "mailflowr_gateway_policy_reloads_total", result="failure") == len(refused)
    assert json.loads(http_get(port, "/status")[1])["policy"]["reload_refused"] == []
    assert json.loads(http_get(port, "/readyz")[1])["degraded"] == []
    _send(gw)
    assert relay.wait(len(refused) + 1)[-1].rcpt_tos == ["beta@vault.test"]
    assert "Traceback" not in gw.log() and "never retrieved" not in gw.log()


def test_sighup_with_hostile_files_reloads_the_rest_and_sigterm_is_prompt(make_gateway,
                                                                           tmp_path, tls_files):
    _, chain, key = tls_files
    policies = tmp_path / "policies"
    policies.mkdir()
    path = policies / "workflows.yaml"
    path.write_text(RULES % "alpha")
    gw = make_gateway({"policies": {"directory": str(policies), "watch_interval": 0},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
                       "smtp": {"tls": {"cert_file": str(chain), "key_file": str(key)}}})
    port = metrics_port(gw)
    _replace(path, os.mkfifo)
    gw.proc.send_signal(signal.SIGHUP)  # policies, then TLS, then DKIM: each on its own
    wait_for(lambda: value(samples(port)[1], "mailflowr_gateway_dkim_key_reloads_total",
                           result="success") == 1, 10, "the DKIM reload")
    assert f"{path}: not a regular file (a FIFO)" in _refusals(gw)[0]
    _, v = samples(port)
    assert value(v, "mailflowr_gateway_policy_reload_failing") == 1
    assert value(v, "mailflowr_gateway_tls_reloads_total", result="success") == 1
    for n, (_, make, where, message) in enumerate([HOSTILE[0], HOSTILE[4]], 1):  # [ and FIFO
        _replace(gw.config_path, make)  # the configuration, re-read for the DKIM keys
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda n=n: gw.log().count("DKIM key reload refused") == n, 10, message)
        assert f"{gw.config_path}{where}: {message}" in gw.log()
        assert value(samples(port)[1], "mailflowr_gateway_tls_reloads_total",
                     result="success") == n + 1
    assert len(_refusals(gw)) == 3
    started = time.monotonic()
    assert gw.terminate(10) == 0  # a FIFO in place of both files holds nothing up
    assert time.monotonic() - started < 5
    assert "Traceback" not in gw.log()


def _named(lines: list[str], expected: list[str]) -> None:
    """One line for each problem expected (so no traceback), each starting with the
    expected ``file:line:column: message`` (a hint may follow)."""
    assert len(lines) == len(expected), lines
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start), line


def _cli(command: str, config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", command, "--config", str(config),
                           *args], capture_output=True, timeout=60, cwd=ROOT)


def test_check_and_serve_name_hostile_files_without_a_traceback(tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    config = tmp_path / "gateway.yaml"
    config.write_text((ROOT / "config" / "gateway.yaml").read_text().replace(
        "../", "").replace("directory: policies", f"directory: {policies}"))
    staged = tmp_path / "staged"  # an edited copy, checked before it is renamed into place
    shutil.copytree(ROOT / "policies", staged)
    result = _cli("check", config, "--policies", str(staged))
    assert result.returncode == 0, result.stderr
    assert f"{staged / 'workflows.yaml'}: ok" in result.stdout.decode()
    for first in range(0, len(HOSTILE), 3):  # the problems of all three files in one run
        expected = []
        for name, (_, make, where, message) in zip(FILES, HOSTILE[first:first + 3], strict=True):
            _replace(policies / name, make)
            expected.append(f"{policies / name}{where}: {message}")
        for command in ("check", "serve") if first == 0 else ("check",):
            result = _cli(command, config)
            assert result.returncode == 1, result.stderr
            _named(result.stderr.decode().splitlines(), expected)
    for n, (_, make, where, message) in enumerate(HOSTILE[:6]):  # the configuration itself
        _replace(config, make)
        for command in ("check", "serve") if n == 0 else ("check",):
            result = _cli(command, config)
            assert result.returncode == 2
            _named(result.stderr.decode().splitlines(), [f"{config}{where}: {message}"])


def test_messages_show_says_whether_the_retention_rule_it_shows_is_in_force(make_gateway,
                                                                          tmp_path):
    policies = tmp_path / "policies"
    policies.mkdir()
    good = _write(policies, "alpha")
    gw = make_gateway({"policies": {"directory": str(policies), "watch_interval": 0},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}"}})
    _send(gw)
    [message] = gw.wait_processed(1)

    def shown() -> dict:
        return json.loads(gw.cli("messages", "show", message["id"], "--json",
                                 check=True).stdout)

    now = shown()  # the files on disk are the policy in force
    assert (now["retention"], now["retention_policy"]) == ("tag alpha (1y)", good)
    assert "retention_note" not in now
    (policies / "retention.yaml").write_text(RETENTION.replace("alpha: 1y", "alpha: 3y")
                                             % "alpha")
    edited = version_of(read_files(policies))  # not reloaded: no SIGHUP, no watching
    now = shown()
    assert (now["retention"], now["retention_policy"]) == ("tag alpha (3y)", edited)
    assert now["retention_note"] == (f"the daemon has policy {good} in force, not {edited} "
                                     "of the files on disk (not reloaded yet, or refused: "
                                     "see status)")
    (policies / "retention.yaml").write_text("default: 1y\ntags: [\n")
    now = shown()
    assert now["retention"].startswith("unknown: the policy files do not validate (")
    assert now["retention"].endswith(f"; the daemon keeps policy {good} in force")
    _write(policies, "alpha")
    gw.terminate()
    now = shown()
    assert now["retention_note"] == (f"no daemon answered: this is policy {good} of the "
                                     "files on disk")

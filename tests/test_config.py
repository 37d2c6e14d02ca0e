"""Configuration: the shipped example works; every mistake names file, line and key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.config import load
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "gateway.yaml"


def test_example_config_is_valid_and_documented():
    config = load(EXAMPLE, env={})
    assert config.smtp.listen == "127.0.0.1:2525"
    # the example keeps its state beside config/, wherever a command runs
    assert config.sqlite_path is not None
    assert config.sqlite_path == ROOT / "var" / "gateway.db"  # ../var from config/
    assert config.policies.directory == ROOT / "policies"
    assert "example.test" in config.tenants["demo"].domains
    lines = EXAMPLE.read_text().splitlines()
    for n, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.startswith("-"):
            assert lines[n - 1].strip().startswith("#"), f"line {n + 1} has no comment: {line}"


def _problems(tmp_path, text, env=None):
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path, env=env or {})
    return [p.replace(str(path), "gw.yaml") for p in info.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("smtp:\n  listen: nonsense\n", "gw.yaml:2:3: smtp.listen: expected HOST:PORT"),
        ("smtp:\n  max_recipients: many\n", "gw.yaml:2:3: smtp.max_recipients: Input should be"),
        ("smtp:\n  lisen: 127.0.0.1:25\n", "gw.yaml:2:3: smtp.lisen: unknown key"),
        ("smtp:\n  listen: 127.0.0.1:25\n  listen: 127.0.0.1:26\n",
         "gw.yaml:3:3: duplicate key 'listen'"),
        ("smtp: [\n", "gw.yaml:2:1: "),
        ("smtp:\n  idle_timeout: forever\n", "gw.yaml:2:3: smtp.idle_timeout: expected a duration"),
        ("database:\n  url: mysql://x/y\n", "gw.yaml:2:3: database.url: only sqlite"),
        ("delivery:\n  lease_time: 0s\n",
         "gw.yaml:2:3: delivery.lease_time: Input should be greater than or equal to 1"),
        ("tenants:\n  a:\n    domains: [a.test]\n    catch_all: true\n  b:\n    domains: [a.test]\n"
         "    catch_all: true\n", "domain a.test belongs to both a and b"),
        ("tenants:\n  a:\n    domains: [a.test]\n    addresses: [x@b.test]\n",
         "gw.yaml:2:3: tenants.a: 'x@b.test' is not in one of this tenant's domains"),
        ("- just\n- a list\n", "gw.yaml:1: the file must be a mapping"),
        ("smtp: &a\n  tls: *a\n", "gw.yaml:1:7: an alias refers to a node that contains it"),
        ("tenants:\n  a:\n    domains: [a.test]\n    catch_all: true\n    users:\n"
         "      bob@a.test:\n        password_hash: hunter2\n",
         "gw.yaml:7:9: tenants.a.users.bob@a.test.password_hash: store a hash, not a password"),
        ("tenants:\n  a:\n    domains: [a.test]\n    catch_all: true\n    users:\n"
         "      bob:\n        password_hash: scrypt$16384$8$1$AAAA$AAAA\n",
         "user bob: the login is not an address of this tenant's domains, so it may send as "
         "nothing: list send_as"),
        ("tenants:\n  a:\n    domains: [a.test]\n    catch_all: true\n    users:\n"
         "      bob@a.test:\n        password_hash: scrypt$16384$8$1$AAAA$AAAA\n"
         "        send_as: [\"a b@a.test\"]\n",
         "user bob@a.test: send_as 'a b@a.test' is not an address or a pattern such as"),
        ("submission:\n  listen: 127.0.0.1:2587\n",
         "submission.listen needs smtp.tls.cert_file and key_file"),
    ],
)
def test_errors_name_file_line_and_key(tmp_path, text, expected):
    problems = _problems(tmp_path, text)
    assert any(expected in p for p in problems), problems


def test_environment_overrides(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("smtp:\n  listen: 127.0.0.1:2525\n")
    config = load(path, env={"MAILFLOWR_SMTP__LISTEN": "127.0.0.1:2600",
                             "MAILFLOWR_SMTP__MAX_RECIPIENTS": "7",
                             "MAILFLOWR_METRICS__LISTEN": ""})
    assert config.smtp.listen == "127.0.0.1:2600"
    assert config.smtp.max_recipients == 7
    assert config.metrics.listen is None
    problems = _problems(tmp_path, "smtp: {}\n", env={"MAILFLOWR_SMTP__MAX_ERRORS": "lots"})
    assert problems[0].startswith("environment MAILFLOWR_SMTP__MAX_ERRORS: smtp.max_errors:")



def test_environment_values_are_read_by_the_type_of_their_setting(tmp_path):
    """Not as YAML 1.1: ``no`` is a name where a name is wanted, ``010`` is ten."""
    path = tmp_path / "gw.yaml"
    path.write_text("smtp:\n  listen: 127.0.0.1:2525\n")
    config = load(path, env={"MAILFLOWR_SMTP__HOSTNAME": "no",
                             "MAILFLOWR_SMTP__MAX_RECIPIENTS": "010",
                             "MAILFLOWR_DELIVERY__MX_LOOKUP": "yes",
                             "MAILFLOWR_DELIVERY__DNS_SERVERS": "[127.0.0.1:53, 127.0.0.2:53]",
                             "MAILFLOWR_DELIVERY__TIMEOUT": "1.5"})
    assert config.smtp.hostname == "no"
    assert config.smtp.max_recipients == 10
    assert config.delivery.mx_lookup is True
    assert config.delivery.dns_servers == ["127.0.0.1:53", "127.0.0.2:53"]
    assert config.delivery.timeout == 1.5


def _run(*args):
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          timeout=60, cwd=ROOT)


def test_check_command(tmp_path):
    ok = _run("check", "--config", str(EXAMPLE))
    assert ok.returncode == 0 and b"ok" in ok.stdout
    doc = json.loads(_run("check", "--config", str(EXAMPLE), "--json").stdout)
    assert (doc["ok"], doc["tenants"], doc["domains"]) == (True, 1, 1)
    assert doc["policy_files"] == ["retention.yaml", "subprocessors.yaml", "workflows.yaml"]
    assert doc["findings"] == ok.stdout.decode().splitlines()  # the same, line by line
    assert doc["warnings"] and all("warning" in w for w in doc["warnings"])
    assert any(w.startswith("encryption at rest: off; warning") for w in doc["warnings"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp:\n  max_message_size: huge\n")
    result = _run("check", "--config", str(bad))
    assert result.returncode == 2
    err = result.stderr.decode()
    assert f"{bad}:2:3: smtp.max_message_size: expected a size" in err
    assert "Traceback" not in err
    missing = _run("check", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and b"No such file" in missing.stderr


def test_serve_refuses_a_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  Bad Id:\n    domains: [x.test]\n    catch_all: true\n")
    result = _run("serve", "--config", str(bad))
    assert result.returncode == 2
    assert b"tenant id 'Bad Id'" in result.stderr and b"Traceback" not in result.stderr


def test_bad_arguments_are_one_line_exit_2():
    result = _run("messages", "list", "--limit", "zero")
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines()[-1].startswith("mailflowr-gateway")
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("path", ["config/gateway.yaml", "bench/gateway-bench.yaml",
                                  "bench/gateway-copies.yaml"])
def test_every_shipped_config_checks(path):
    result = _run("check", "--config", path)
    assert result.returncode == 0, result.stderr.decode()


def test_imap_accounts_are_checked_and_passwords_never_inline(tmp_path):
    secret = tmp_path / "imap.pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    config = tmp_path / "gw.yaml"
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "workflows.yaml").write_text("tenants: {}\n")
    config.write_text(f"""
policies:
  directory: {tmp_path / "policies"}
imap_accounts:
  own:
    host: imap.customer.test
    tls: none
    username: gw@customer.test
    password_env: MAILFLOWR_TEST_UNSET_PW
  safe:
    host: 127.0.0.1
    port: 1143
    tls: starttls
    verify: false
    username: gw@customer.test
    password_file: {secret}
tenants:
  t:
    domains: [customer.test]
    catch_all: true
    keep_original: {{imap: own, folder: Archive}}
    imap_pull:
      box: {{account: safe, recipient: help@customer.test, after_import: mark_seen}}
""")
    result = _run("check", "--config", str(config))
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "imap own (imap.customer.test:143, tls none): t keep_original" in out
    assert "password_env MAILFLOWR_TEST_UNSET_PW is not set here" in out
    assert "the password crosses the network in clear text" in out
    assert "imap safe (127.0.0.1:1143, tls starttls): t imap_pull box" in out
    assert "verify: false" in out
    inline = config.read_text().replace(f"password_file: {secret}", "password: s3cret")
    config.write_text(inline)
    result = _run("check", "--config", str(config))
    err = result.stderr.decode()
    assert result.returncode == 2 and "imap_accounts.safe.password: unknown key" in err
    secret.chmod(0o644)
    config.write_text(inline.replace("password: s3cret", f"password_file: {secret}"))
    result = _run("check", "--config", str(config))
    assert result.returncode == 2 and "readable by everyone" in result.stderr.decode()


def test_the_example_sends_nothing_anywhere_until_told():
    """Every server the shipped example could deliver to is under .invalid (RFC 6761:
    never resolves), so a first run on a shared machine reaches nobody's server."""
    config = load(EXAMPLE, env={})
    assert config.delivery.relay is None and config.delivery.mx_lookup is False
    hosts = [d.host for d in config.destinations.values()]
    policies = yaml.safe_load((ROOT / "policies" / "subprocessors.yaml").read_text())
    hosts += [s["smtp"]["host"] for s in policies["subprocessors"].values() if "smtp" in s]
    assert hosts and all(h.endswith(".invalid") for h in hosts), hosts

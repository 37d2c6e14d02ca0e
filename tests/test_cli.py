"""The command line behaves alike across commands: --version, --config before or after
the command, confirmation on a terminal, no file overwritten unasked, a state that is
not an error exits 0."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import yaml

from tests.conftest import empty_zone, free_port, simple_message

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "gateway.yaml"


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          timeout=60, cwd=cwd)


def test_version_comes_from_one_place_and_is_shown():
    shown = _run("--version")
    assert shown.returncode == 0
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert pyproject["dynamic"] == ["version"] and "version" not in pyproject
    assert shown.stdout.decode().strip() == \
        f"mailflowr-gateway {metadata.version('mailflowr-gateway')}"


def test_config_may_come_before_or_after_the_command(tmp_path):
    elsewhere = tmp_path / "gw.yaml"
    elsewhere.write_text(EXAMPLE.read_text().replace("max_message_size: 10240000",
                                                     "max_message_size: huge"))
    assert "max_message_size: huge" in elsewhere.read_text()
    for args in (("--config", str(EXAMPLE), "check"), ("check", "--config", str(EXAMPLE)),
                 ("-c", str(elsewhere), "check", "-c", str(EXAMPLE))):
        ok = _run(*args, cwd=tmp_path)
        assert ok.returncode == 0, (args, ok.stderr)
    for args in (("--config", str(elsewhere), "check"), ("check", "--config", str(elsewhere)),
                 ("-c", str(EXAMPLE), "check", "-c", str(elsewhere))):
        bad = _run(*args, cwd=tmp_path)
        assert bad.returncode == 2 and b"smtp.max_message_size" in bad.stderr, args


def test_a_command_imports_only_its_own_module_and_help_lists_them_all():
    """``COMMANDS`` names each command's module: the parser of one command alone is
    the full parser's for that command, and running one does not load the daemon,
    the admin API or another command's module."""
    from gateway.cli import COMMANDS, build_parser

    def commands(parser: object) -> dict[str, str]:
        action = next(a for a in parser._actions if a.dest == "command")  # type: ignore
        return {name: sub.format_help() for name, sub in action.choices.items()}

    every = commands(build_parser())
    assert set(every) == {*COMMANDS, "completion"}
    for name in COMMANDS:
        alone = commands(build_parser(name))
        assert alone[name] == every[name], name
        assert set(alone) == {n for n, m in COMMANDS.items() if m == COMMANDS[name]}, name
    probe = ("import sys; from gateway.cli import main; code = main(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp' or m in "
             "('gateway.daemon', 'gateway.cli.serve', 'gateway.cli.messages')), "
             "file=sys.stderr); sys.exit(code)")
    ran = subprocess.run([sys.executable, "-c", probe, "check", "--config", str(EXAMPLE)],
                         capture_output=True, timeout=60, cwd=ROOT)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr.decode().splitlines()[-1] == "[]"
    usage = _run("-c", str(EXAMPLE), "serve", "--no-such-option")
    assert usage.returncode == 2 and b"unrecognized arguments: --no-such-option" in usage.stderr
    unknown = _run("-c", str(EXAMPLE), "serv")
    assert unknown.returncode == 2 and b"invalid choice: 'serv'" in unknown.stderr
    assert b"'processing-record'" in unknown.stderr


def _listening(port: int, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert daemon.poll() is None, log.read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"not listening within 30s:\n{log.read_text()}")


def test_relative_paths_are_read_from_the_folder_of_the_configuration(tmp_path):
    """Database, privacy key and policies are found from any directory, and a missing
    database or policy folder is an error rather than a new empty one."""
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    (etc / "policies").mkdir(parents=True)
    elsewhere.mkdir()
    (etc / "policies" / "workflows.yaml").write_text("tenants: {}\n")
    port = free_port()
    config = etc / "gateway.yaml"
    config.write_text(yaml.safe_dump({  # database, policies, keys, journal: the defaults
        "smtp": {"listen": f"127.0.0.1:{port}", "hostname": "mx.gateway.test"},
        "metrics": {"listen": None},
        "delivery": {"dns_servers": [empty_zone().address]},
        "tenants": {"acme": {"name": "Acme", "domains": ["acme.test"], "catch_all": True}},
    }))
    before = _run("messages", "list", "--config", str(config), cwd=elsewhere)
    assert before.returncode == 1
    assert f"{etc}/var/gateway.db: no such database".encode() in before.stderr
    assert not (etc / "var").exists() and not (elsewhere / "var").exists()
    assert _run("check", "--config", str(config), cwd=elsewhere).returncode == 0

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                   str(config)], cwd=elsewhere, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        _listening(port, daemon, log)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("alice@sender.test", ["help@acme.test"],
                            simple_message(subject="from elsewhere", to="help@acme.test"))
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0, log.read_text()
    assert (etc / "var" / "gateway.db").is_file() and (etc / "var" / "privacy.key").is_file()
    assert not (elsewhere / "var").exists()
    listed = _run("messages", "list", "--config", "../etc/gateway.yaml", cwd=elsewhere)
    assert listed.returncode == 0, listed.stderr
    assert b"alice@sender.test" in listed.stdout
    [stored] = json.loads(_run("messages", "list", "--json", "--config", str(config),
                               cwd=elsewhere).stdout)
    shown = _run("messages", "show", stored["id"], "--config", str(config), cwd=elsewhere)
    assert shown.returncode == 0  # and audited: the audit chain has begun
    key = etc / "var" / "privacy.key"
    key.rename(tmp_path / "privacy.key")  # a wrong path or a lost file: never a new key
    lost = _run("messages", "list", "--config", str(config), cwd=elsewhere)
    assert lost.returncode == 1 and not key.exists()
    assert f"{key}: no such file (privacy.key_file), but the audit chain in the database " \
        "was made with a key" in lost.stderr.decode()
    (tmp_path / "privacy.key").rename(key)
    linked = tmp_path / "linked"  # a link to the file: read from the link's folder
    linked.mkdir()
    (linked / "gateway.yaml").symlink_to(config)
    through = _run("messages", "list", "--config", str(linked / "gateway.yaml"), cwd=elsewhere)
    assert f"{linked}/var/gateway.db: no such database".encode() in through.stderr
    asked = _run("status", "--url", f"http://127.0.0.1:{port}", cwd=elsewhere)  # no config
    assert asked.returncode == 1 and b"no daemon answers at http://127.0.0.1:" in asked.stderr
    unnamed = _run("messages", "list", cwd=elsewhere)  # the default config/gateway.yaml
    assert unnamed.returncode == 2
    assert f"config/gateway.yaml: no such file in {elsewhere} (the default: give --config " \
        "PATH, or set MAILFLOWR_CONFIG)" in unnamed.stderr.decode()

    shutil.rmtree(etc / "policies")  # a wrong policies.directory: never run without policy
    for command in ("check", "serve"):
        refused = _run(command, "--config", str(config), cwd=elsewhere)
        assert refused.returncode == 1, refused.stderr
        assert f"{etc}/policies: no such directory".encode() in refused.stderr
    (etc / "policies").mkdir()
    empty = _run("check", "--config", str(config), cwd=elsewhere)
    assert empty.returncode == 1
    assert b"none of retention.yaml, subprocessors.yaml, workflows.yaml is there" \
        in empty.stderr


def test_keys_status_with_encryption_off_is_a_state_not_an_error():
    off = _run("keys", "status", "--config", str(EXAMPLE))
    assert off.returncode == 0 and b"encryption at rest is off" in off.stdout
    doc = json.loads(_run("keys", "status", "--json", "--config", str(EXAMPLE)).stdout)
    assert doc == {"encryption": "off", "master": None, "tenants": []}


def test_export_help_names_the_format_it_writes():
    text = _run("export", "--help").stdout.decode()
    assert "tar archive" in text and "ZIP" not in text and "FILE.tar" in text


def test_messages_export_never_replaces_a_file_unasked(gateway, tmp_path):
    with gateway.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message("kept"))
    gateway.wait_processed(1)
    [message] = gateway.messages()
    out = tmp_path / "m.eml"
    out.write_text("mine")
    refused = gateway.cli("messages", "export", message["id"], "--out", str(out))
    assert refused.returncode == 1 and b"exists; --force replaces it" in refused.stderr
    assert out.read_text() == "mine"
    gateway.cli("messages", "export", message["id"], "--out", str(out), "--force",
                check=True)
    assert b"Subject: kept" in out.read_bytes()


def _on_a_terminal(gateway, args: list[str], answer: str) -> tuple[int, str]:
    """Run a command with a terminal for its input, answering its question."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args, "--config", str(gateway.config_path)],
            stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=gateway.directory)
        os.write(leader, answer.encode() + b"\n")
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    return proc.returncode, (out + err).decode()


def test_erase_asks_on_a_terminal_and_not_in_a_script(gateway):
    with gateway.smtp() as s:
        for n in range(2):
            s.sendmail("jane@client.test", ["support@acme.test"], simple_message(f"n{n}"))
    gateway.wait_processed(2)
    erase = ["erase", "--tenant", "acme", "--subject", "jane@client.test"]
    code, said = _on_a_terminal(gateway, erase, "yes")
    assert code == 1 and "not confirmed: nothing changed" in said
    assert "Type jane@client.test to go on" in said
    assert len(gateway.messages()) == 2
    code, said = _on_a_terminal(gateway, erase, "JANE@client.test")
    assert code == 0 and "erased 2 messages" in said, said
    assert gateway.messages() == []
    # --yes, and no terminal at all, do not ask
    code, said = _on_a_terminal(gateway, [*erase, "--yes"], "")
    assert code == 0 and "Type" not in said
    assert gateway.cli(*erase).returncode == 0


def test_commands_that_print_data_print_json_when_asked(gateway):
    made = json.loads(gateway.cli("token", "create", "--tenant", "acme", "--scope",
                                  "read,export", "--json", check=True).stdout)
    assert (made["tenant"], made["scopes"]) == ("acme", ["read", "export"])
    assert made["token"].startswith(f"mfr_{made['id']}_")
    listed = json.loads(gateway.cli("token", "list", "--json", check=True).stdout)
    assert [t["id"] for t in listed] == [made["id"]]
    retried = json.loads(gateway.cli("queue", "retry", "--all", "--json", check=True).stdout)
    assert retried == {"due_now": 0, "delivery": None}
    dropped = gateway.cli("queue", "drop", "7", "--json")
    assert dropped.returncode == 1 and b"no delivery 7" in dropped.stderr


def test_a_database_driver_that_is_not_installed_is_named(tmp_path):
    """psycopg is the [postgres] extra: without it, a PostgreSQL URL gets one line that
    says what to install (the command runs as if psycopg were not installed)."""
    without = ("import sys; sys.modules['psycopg'] = None; from gateway.cli import main; "
               "sys.exit(main())")
    result = subprocess.run(
        [sys.executable, "-c", without, "messages", "list", "--config", str(EXAMPLE)],
        capture_output=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "MAILFLOWR_DATABASE__URL": "postgresql+psycopg://gw@127.0.0.1/x"})
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().strip() == (
        "mailflowr-gateway: database.url needs the Python package 'psycopg': install "
        "mailflowr-gateway[postgres] for postgresql+psycopg://")


def _completed(script: Path, *words: str) -> list[str]:
    """What bash offers after ``mailflowr-gateway WORDS`` (the last word being typed)."""
    line = " ".join(("mailflowr-gateway", *words))
    program = (f"source {script}; COMP_WORDS=(mailflowr-gateway {' '.join(map(repr, words))}); "
               f"COMP_CWORD={len(words)}; COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; "
               f"_shtab_mailflowr_gateway mailflowr-gateway {words[-1]!r} "
               f"{(['mailflowr-gateway', *words])[-2]!r}; echo \"${{COMPREPLY[@]}}\"")
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_shell_completion_comes_from_the_parser(tmp_path):
    script = tmp_path / "mailflowr-gateway.bash"
    made = _run("completion", "bash")
    assert made.returncode == 0
    script.write_bytes(made.stdout)
    assert _completed(script, "mes") == ["messages"]
    assert _completed(script, "request", "") == ["record", "assign", "list", "close"]
    assert "--override-hold" in _completed(script, "erase", "--")
    zsh = _run("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith(b"#compdef mailflowr-gateway")
    wrong = _run("completion", "fish")
    assert wrong.returncode == 2 and b"invalid choice: 'fish'" in wrong.stderr


def test_config_show_says_where_each_setting_came_from(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("smtp:\n  listen: 127.0.0.1:2600\n  max_errors: 20\n"
                    "tenants:\n  acme:\n    domains: [acme.test]\n    catch_all: true\n"
                    "    users:\n      agent@acme.test:\n"
                    "        password_hash: \"scrypt$16384$8$1$c2FsdA==$aGFzaA==\"\n")
    shown = subprocess.run(
        [sys.executable, "-m", "gateway", "config", "show", "--config", str(path), "--json"],
        capture_output=True, timeout=60, cwd=tmp_path,
        env={**os.environ, "MAILFLOWR_SMTP__MAX_RECIPIENTS": "50"})
    assert shown.returncode == 0, shown.stderr
    settings = {s["key"]: (s["value"], s["from"]) for s in json.loads(shown.stdout)}
    assert settings["smtp.listen"] == ("127.0.0.1:2600", f"{path}:2")
    assert settings["smtp.max_recipients"] == (50, "environment MAILFLOWR_SMTP__MAX_RECIPIENTS")
    assert settings["smtp.max_errors"] == (20, f"{path}:3")
    assert settings["smtp.max_message_size"] == (10240000, "default")
    assert settings["tenants.acme.users.agent@acme.test.password_hash"] == ("(set)", f"{path}:10")
    assert b"scrypt$" not in shown.stdout  # a secret is never shown
    changed = _run("config", "show", "--changed", "--config", str(path)).stdout.decode()
    assert changed.splitlines()[0] == f"smtp.listen = 127.0.0.1:2600  # {path}:2"
    # only values that are not the default: written as the default is not a change
    assert "# default" not in changed and "smtp.max_errors" not in changed
    assert "database.url" not in changed  # var/gateway.db from the file's folder


def _stderr_on_a_terminal(gateway, args: list[str]) -> tuple[int, str, bytes]:
    """Run a command whose stderr is a terminal: (exit code, what the terminal showed,
    stdout)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args, "--config", str(gateway.config_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower,
        cwd=gateway.directory)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command has gone and closed its end
            break
        if not chunk:
            break
        shown += chunk
    assert proc.stdout is not None
    with proc.stdout:
        out = proc.stdout.read()
    os.close(leader)
    return proc.wait(60), shown.decode(errors="replace"), out


def test_long_work_shows_its_progress_on_a_terminal_only(gateway, tmp_path):
    with gateway.smtp() as s:
        for n in range(3):
            s.sendmail("jane@client.test", ["support@acme.test"], simple_message(f"p{n}"))
    gateway.wait_processed(3)
    archive = tmp_path / "acme.tar"
    code, shown, out = _stderr_on_a_terminal(
        gateway, ["export", "--tenant", "acme", "--out", str(archive)])
    assert code == 0 and archive.exists()
    assert re.search(r"\rexport: 3 messages, 0\.0 MB", shown), shown
    assert shown.endswith("\r\n")  # the line is ended once the work is done
    assert b"3 messages" in out  # the result itself still goes to stdout
    # not a terminal: nothing but the result
    quiet = gateway.cli("export", "--tenant", "acme", "--out", str(tmp_path / "b.tar"))
    assert quiet.returncode == 0 and quiet.stderr == b""
    code, shown, _ = _stderr_on_a_terminal(
        gateway, ["erase", "--tenant", "acme", "--subject", "jane@client.test", "--yes"])
    assert code == 0 and re.search(r"\rerase: 3 of 3 messages deleted", shown), shown
    with gateway.smtp() as s:
        for n in range(2):
            s.sendmail("joe@client.test", ["support@acme.test"], simple_message(f"q{n}"))
    gateway.wait_processed(2)
    code, shown, _ = _stderr_on_a_terminal(gateway, ["tenant", "deactivate", "acme", "--yes"])
    assert code == 0 and re.search(r"\rdeleting tenant acme: 2 messages deleted", shown), shown
    assert gateway.cli("messages", "list", "--tenant", "acme", "--json").stdout.strip() == b"[]"


def test_init_writes_the_examples_and_never_replaces_a_file(tmp_path):
    target = tmp_path / "site"
    made = _run("init", str(target), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    for name in ("config/gateway.yaml", "policies/workflows.yaml", "policies/retention.yaml",
                 "systemd/mailflowr-gateway.service", "monitoring/alerts.yaml"):
        assert (target / name).read_bytes() == (ROOT / name).read_bytes(), name
    config = target / "config" / "gateway.yaml"
    checked = _run("check", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr  # its ../policies are the ones written
    assert (target / "config" / "gateway.yaml").stat().st_mode & 0o777 == 0o600
    (target / "policies" / "workflows.yaml").write_text("tenants: {}\n")
    again = _run("init", str(target), cwd=tmp_path)
    assert again.returncode == 1
    assert f"{target}/config/gateway.yaml exists".encode() in again.stderr
    assert b"nothing written" in again.stderr
    assert (target / "policies" / "workflows.yaml").read_text() == "tenants: {}\n"
    other, aside = tmp_path / "other", tmp_path / "aside"
    other.mkdir()
    aside.mkdir()
    (other / "policies").symlink_to(aside)  # never written through
    refused = _run("init", str(other), cwd=tmp_path)
    assert refused.returncode == 1 and f"{other}/policies is a link".encode() in refused.stderr
    assert list(aside.iterdir()) == [] and not (other / "config").exists()


def test_a_wheel_carries_the_examples_and_the_documentation(tmp_path):
    """What init writes after an install from a wheel: share/mailflowr-gateway/ under the
    prefix holds every example file, and the docs the unit's Documentation= names."""
    source = tmp_path / "source"
    for name in ("gateway", "config", "policies", "systemd", "monitoring", "docs"):
        shutil.copytree(ROOT / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "var"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, timeout=170)
    assert built.returncode == 0, built.stderr.decode()
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    version = metadata.version("mailflowr-gateway")
    share = f"mailflowr_gateway-{version}.data/data/share/mailflowr-gateway/"
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("config", "policies", "systemd", "monitoring"):
        for path in (ROOT / folder).iterdir():
            if path.is_file():
                assert share + f"{folder}/{path.name}" in names, path
    unit = (ROOT / "systemd" / "mailflowr-gateway.service").read_text()
    documented = re.search(r"^Documentation=(.*)$", unit, re.M)
    assert documented is not None
    for url in documented.group(1).split():
        installed = url.removeprefix("file:///opt/mailflowr-gateway/")
        assert installed in {n.replace(f"mailflowr_gateway-{version}.data/data/", "")
                             for n in names}, url


def test_status_from_a_port_that_is_not_the_daemon_is_one_line(tmp_path):
    """Something else on the port (an SMTP server): the command says no daemon answers."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def answer() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"220 mx.other.test ESMTP\r\n")

    threading.Thread(target=answer, daemon=True).start()
    with server:
        result = _run("status", "--url", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode() == f"mailflowr-gateway: no daemon answers at " \
        f"http://127.0.0.1:{port}: 220 mx.other.test ESMTP  \n"

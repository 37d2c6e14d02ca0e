"""Encryption at rest: originals sealed per tenant, opened wherever they are used;
crypto-shredding on deactivation; master key rotation; running without a key."""

from __future__ import annotations

import json
import shutil
import sqlite3
import tarfile
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.keyfiles import read_master
from gateway.store.keystore import KeyStore, KeyUnavailable
from gateway.store.models import message_blobs
from tests.conftest import gateway_with_rules, wait_for


def _master(tmp_path: Path, name: str = "master.key") -> Path:
    path = tmp_path / name
    path.write_text("ab" * 32 + "\n")
    path.chmod(0o600)
    return path


def _encrypted(make_gateway: Any, tmp_path: Path, extra: dict[str, Any] | None = None) -> Any:
    overrides = {"privacy": {"master_key_file": str(_master(tmp_path)),
                             "keystore": str(tmp_path / "keys")}}
    return make_gateway({**overrides, **(extra or {})})


def _send(gw: Any, to: str, body: str) -> bytes:
    data = f"From: bob@client.test\r\nTo: {to}\r\nSubject: {body}\r\n\r\n{body}\r\n".encode()
    with gw.smtp() as s:
        s.sendmail("bob@client.test", [to], data)
    return data


def _blobs(gw: Any) -> dict[str, tuple[str | None, bytes]]:
    with gw.store.engine.connect() as conn:
        return {r.message_id: (r.key_id, r.data) for r in conn.execute(select(message_blobs))}


def test_originals_are_sealed_and_open_wherever_they_are_used(make_gateway, tmp_path, relay):
    rules = "tenants:\n  acme:\n    rules:\n      - name: copy\n        actions: " \
            "{cc: [desk@copies.test]}\n"
    master = _master(tmp_path)
    gw = gateway_with_rules(make_gateway, tmp_path, relay, rules, {
        "privacy": {"master_key_file": str(master), "keystore": str(tmp_path / "keys")}})
    assert "encryption at rest is on" in gw.log()
    sent = _send(gw, "support@acme.test", "sealedtoken-acme")
    row = gw.wait_processed(1)[0]
    assert row["subject"] == "sealedtoken-acme"  # the pipeline opened it to parse it

    key_id, stored = _blobs(gw)[row["id"]]
    assert key_id.startswith("acme/") and b"sealedtoken" not in stored
    assert sent not in stored and len(stored) == len(sent) + 12 + 16  # nonce + GCM tag

    exported = gw.cli("messages", "export", row["id"])
    assert exported.returncode == 0 and exported.stdout == sent
    archive = tmp_path / "acme.tar"
    gw.cli("export", "--tenant", "acme", "--out", str(archive), check=True)
    with tarfile.open(archive) as t:
        assert t.extractfile(f"messages/{row['id']}.eml").read() == sent
    wait_for(lambda: relay.messages, 15, "the Cc copy delivered")
    assert b"sealedtoken-acme" in relay.messages[0].data  # the delivery opened it too

    keyfile = tmp_path / "keys" / "acme.json"
    assert keyfile.stat().st_mode & 0o777 == 0o600
    assert json.loads(keyfile.read_text())["keys"][0]["id"] == key_id
    status = json.loads(gw.cli("keys", "status", "--json", check=True).stdout)
    assert {t["tenant"] for t in status["tenants"]} == {"acme", "globex"}


def test_deactivation_shreds_the_key_so_backups_do_not_open(make_gateway, tmp_path):
    gw = _encrypted(make_gateway, tmp_path)
    acme = _send(gw, "support@acme.test", "acme secret")
    globex = _send(gw, "x@globex.test", "globex secret")
    rows = {r["tenant_id"]: r["id"] for r in gw.wait_processed(2)}
    backup = _blobs(gw)  # a copy of the database as a backup would hold it
    if gw.db_url.startswith("sqlite"):
        db = Path(gw.db_url.removeprefix("sqlite:///"))
        with sqlite3.connect(db) as src, sqlite3.connect(tmp_path / "backup.db") as dst:
            src.backup(dst)

    result = gw.cli("tenant", "deactivate", "acme")
    assert result.returncode == 0, result.stderr.decode()
    assert b"its data key is destroyed" in result.stdout
    assert not (tmp_path / "keys" / "acme.json").exists()

    # Everything an attacker with the backup and the master key has:
    keys = KeyStore(tmp_path / "keys", read_master(tmp_path / "master.key"))
    key_id, sealed = backup[rows["acme"]]
    with pytest.raises(KeyUnavailable, match="destroyed"):
        keys.open(rows["acme"], key_id, sealed)
    assert keys.open(rows["globex"], *backup[rows["globex"]]) == globex
    if gw.db_url.startswith("sqlite"):
        with sqlite3.connect(tmp_path / "backup.db") as conn:
            copied = dict(conn.execute("SELECT message_id, data FROM message_blobs"))
        assert b"acme secret" not in copied[rows["acme"]]
        assert acme not in b"".join(copied.values())
    events = json.loads(gw.cli("audit", "list", "--action", "tenant.shred", "--json",
                               check=True).stdout)
    assert events[-1]["detail"] == {"data_key_destroyed": True}


def test_rotating_the_master_key_rewraps_the_data_keys(make_gateway, tmp_path):
    gw = _encrypted(make_gateway, tmp_path)
    sent = _send(gw, "support@acme.test", "before rotation")
    row = gw.wait_processed(1)[0]
    new = tmp_path / "new.key"
    made = gw.cli("keys", "generate", "--out", str(new))
    assert made.returncode == 0 and new.stat().st_mode & 0o777 == 0o600
    assert gw.cli("keys", "generate", "--out", str(new)).returncode == 1  # never overwrites

    rotated = gw.cli("keys", "rotate", "--new-master-file", str(new))
    assert rotated.returncode == 0, rotated.stderr.decode()
    assert b"2 tenants' data keys now wrapped" in rotated.stdout
    old_config = gw.config_path.read_text()
    stale = gw.cli("messages", "export", row["id"])  # the old master no longer opens them
    assert stale.returncode != 0 and b"configured master key is" in stale.stderr

    gw.terminate()
    gw.config_path.write_text(old_config.replace(str(tmp_path / "master.key"), str(new)))
    gw.start()
    assert gw.cli("messages", "export", row["id"], check=True).stdout == sent
    assert _send(gw, "support@acme.test", "after rotation")
    gw.wait_processed(2)
    assert len({k for k, _ in _blobs(gw).values()}) == 1  # the same data key, new wrapping


def test_without_a_master_key_the_gateway_says_originals_are_in_clear(gateway):
    sent = _send(gateway, "support@acme.test", "cleartoken")
    row = gateway.wait_processed(1)[0]
    assert "encryption at rest is off" in gateway.log()
    assert _blobs(gateway)[row["id"]] == (None, sent)


@pytest.mark.sqlite_only  # input checks: any database
def test_a_wrong_master_key_stops_the_start_with_a_clear_error(make_gateway, tmp_path):
    gw = _encrypted(make_gateway, tmp_path)
    gw.terminate()
    _master(tmp_path).write_text("cd" * 32 + "\n")
    result = gw.cli("check")
    assert result.returncode == 0  # the file itself is a valid key
    gw.start(wait=False)
    assert gw.proc.wait(30) != 0
    assert "privacy.keystore" in gw.log() and "configured master key is" in gw.log()
    assert "Traceback" not in gw.log()


@pytest.mark.sqlite_only  # input checks: any database
@pytest.mark.parametrize("setting, message", [
    ({"master_key_file": "missing.key"}, "missing.key: No such file or directory"),
    ({"master_key_file": "k", "master_key_env": "X"}, "not both"),
])
def test_master_key_settings_are_checked(make_gateway, setting, message):
    gw = make_gateway({"privacy": setting}, start=False)
    result = gw.cli("check")
    assert result.returncode == 2 and message.encode() in result.stderr


@pytest.mark.sqlite_only  # input checks: any database
def test_a_missing_master_key_variable_is_a_warning_for_check_and_fatal_for_serve(
        make_gateway):
    gw = make_gateway({"privacy": {"master_key_env": "MAILFLOWR_TEST_NO_SUCH_VAR"}},
                      start=False)
    checked = gw.cli("check")
    assert checked.returncode == 0
    assert (b"encryption at rest: warning: environment variable MAILFLOWR_TEST_NO_SUCH_VAR "
            b"(master_key_env) is not set here") in checked.stdout
    bad = gw.cli("check", env={"MAILFLOWR_TEST_NO_SUCH_VAR": "short"})
    assert bad.returncode == 2 and b"64 hexadecimal digits" in bad.stderr
    gw.start(wait=False)
    assert gw.proc.wait(30) != 0
    assert "MAILFLOWR_TEST_NO_SUCH_VAR (master_key_env) is not set" in gw.log()


def test_the_master_key_can_come_from_the_environment(make_gateway, tmp_path):
    gw = make_gateway({"privacy": {"master_key_env": "MAILFLOWR_TEST_MASTER",
                                   "keystore": str(tmp_path / "keys")}}, start=False)
    env = {"MAILFLOWR_TEST_MASTER": "ef" * 32}
    gw.start(env=env)
    sent = _send(gw, "support@acme.test", "from env")
    row = gw.wait_processed(1)[0]
    assert _blobs(gw)[row["id"]][0] is not None
    assert gw.cli("messages", "export", row["id"], env=env, check=True).stdout == sent
    shutil.rmtree(tmp_path / "keys")  # keys lost: a clear error, not a traceback
    lost = gw.cli("messages", "export", row["id"], env=env)
    assert lost.returncode == 1 and b"is not in" in lost.stderr

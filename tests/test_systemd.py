"""The shipped systemd unit: it verifies, and its exposure is rated OK (2.0 or lower)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.conftest import ROOT, need_tool

UNIT = ROOT / "systemd" / "mailflowr-gateway.service"


def _unit_value(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{key}=")]


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze", "systemd")
    # An image of a host the gateway is installed on: systemd's own units, the
    # programs the unit runs (placeholders, never started), and the unit.
    root = tmp_path / "root"
    for units in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (Path("/") / units).is_dir() and not (root / units).exists():
            shutil.copytree(Path("/") / units, root / units, symlinks=True)
    for command in _unit_value("ExecStart") + _unit_value("ExecStartPre") + \
            _unit_value("ExecReload"):
        program = root / command.split()[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    installed = root / "etc/systemd/system" / UNIT.name
    installed.parent.mkdir(parents=True)
    shutil.copy(UNIT, installed)
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", f"/{installed.relative_to(root)}"],
        capture_output=True, text=True, timeout=120)
    # verify exits 0 even for unknown keys; a clean unit prints nothing at all.
    assert result.returncode == 0 and not result.stdout + result.stderr, \
        result.stdout + result.stderr


def test_unit_exposure_is_ok() -> None:
    analyze = need_tool("systemd-analyze", "systemd")
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.0 and found.group(2) == "OK", result.stdout


def test_unit_is_a_notify_service_with_a_watchdog_and_reload() -> None:
    assert _unit_value("Type") == ["notify"]
    assert _unit_value("WatchdogSec") and _unit_value("NotifyAccess") == ["main"]
    assert _unit_value("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _unit_value("AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]

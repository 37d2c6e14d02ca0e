"""The test command itself: a run that could not reach a peer says so at its end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_run_lists_the_peers_it_missed_at_its_end():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFLOWR_TEST_REQUIRE")}
    env["PATH"] = str(Path(sys.executable).parent)  # no swaks on it
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q",
         "tests/test_ingest.py::test_swaks_delivers[sqlite]"],
        capture_output=True, timeout=120, cwd=ROOT, env=env)
    out = run.stdout.decode()
    assert run.returncode == 0, out
    assert "1 skipped" in out
    tail = out[out.index("missing peers: these tests did not run"):]
    assert "    1  swaks is not installed (Debian package swaks)" in tail

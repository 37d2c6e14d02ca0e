"""Freed memory goes back to the system: what a burst of mail leaves behind in the C
allocator's heaps is returned by the trimmer the daemon runs every minute."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway.memory import trimmer

pytestmark = pytest.mark.sqlite_only  # no database involved


@pytest.mark.skipif(trimmer() is None, reason="the C library has no malloc_trim (not glibc)")
def test_memory_freed_inside_the_heap_is_returned():
    # A fresh interpreter: 1,000 originals of 100 KB, of which every twentieth is kept
    # (as a burst leaves a few long-lived objects among the freed ones).
    script = textwrap.dedent("""
        from gateway.memory import trimmer
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
        blocks = [bytes(100_000) + bytes([i % 256]) for i in range(1000)]
        kept = blocks[::20]
        del blocks
        before = rss()
        trimmer()()
        print(before, rss(), len(kept))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True,
                         timeout=60).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before > 90  # the burst's memory is still held
    assert after < before - 60, (before, after)

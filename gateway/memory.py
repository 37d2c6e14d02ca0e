"""Memory of the daemon's processes: start-up objects kept out of the collector's
passes (``settle``), and memory freed after a burst of mail given back to the system.

CPython hands large objects (message bytes, the buffers of sessions that have
ended) back to the C allocator when they are freed, but glibc keeps what was
freed inside its heaps mapped: after a burst, the daemon would go on holding
the memory of its busiest minute.  ``malloc_trim(0)`` returns such free pages
(``madvise``, without moving anything).  On a C library without it (musl),
there is nothing to do and ``trimmer()`` returns None.  The daemon runs
``keep_returning`` for as long as it runs.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
from collections.abc import Callable

TRIM_INTERVAL = 60.0  # seconds between returns of freed memory to the system


def settle() -> None:
    """After a process's start: what it made so far (modules, configuration, policies,
    pools) lives as long as the process; the cyclic collector's passes stop walking it.
    A full pass over it all stalled 1-5% of acceptances for 100-250 ms at 100 sessions
    in the daemon, and was 5% of the delivery process's CPU."""
    gc.collect()
    gc.freeze()


def trimmer() -> Callable[[], None] | None:
    """A function that returns the free memory of this process's heaps, if the C
    library has one (it may take milliseconds: call it from a thread)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def run() -> None:
        trim(0)

    return run


async def keep_returning(trim: Callable[[], None]) -> None:
    """Every minute: what the C allocator holds free goes back to the system."""
    while True:
        await asyncio.sleep(TRIM_INTERVAL)
        await asyncio.to_thread(trim)

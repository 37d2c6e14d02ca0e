"""Postfix's in_flow_delay: when the pipeline falls behind, new mail comes at its pace.

A burst is accepted at the listener's own rate and processed when it pauses
(``pipeline.burst_delay``).  When the oldest work has waited longer than that
and mail still arrives faster than the pipeline processes it, the backlog would
grow for as long as the load lasts.  Then each new message (at MAIL FROM) takes
a token, one for each message the pipeline finished; with none left, the session
waits up to ``smtp.in_flow_delay`` for one and then goes on anyway, as Postfix's
smtpd does: senders slowed to the pipeline's pace, never refused.

Whether a flow of mail is a burst is for ``LoopLoad`` to say, in the daemon's
main process, where the sessions run: mail that arrives while that event loop has
CPU to spare is processed as it comes, so that its copies do not wait for a pause
that a steady flow never makes.  The pipeline, in a process of its own, learns it
as ``Acceptance``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

from gateway.metrics import Metrics

TOKENS_MAX = 100  # finished messages kept as tokens at most (Postfix: its pipe's size)
SAMPLE = 0.1  # seconds between two readings of the loop thread's CPU time
WINDOW = 5  # readings the load is averaged over (half a second)
GRACE = 1.0  # seconds past burst_delay before the pipeline counts as behind


BUSY = 0.05  # seconds: a commit of new mail this recent means sessions are still sending


class Bursts:
    """In the daemon's main process, where the SMTP sessions run: whether they are
    accepting a burst, that is committing new mail (the last commit at most ``BUSY``
    ago) while keeping the event loop busy (``LoopLoad`` at ``burst_load`` or above).
    ``tell(bursting)`` hears every change, so that the pipeline, in its own process,
    need not read a clock another process keeps."""

    def __init__(self, burst_load: float, tell: Callable[[bool], None]) -> None:
        self.burst_load = burst_load
        self.tell = tell
        self.load = LoopLoad()
        self.bursting = False  # as last told
        self.last_commit = float("-inf")
        self._sample: asyncio.TimerHandle | None = None
        self._quiet: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.load.start()
        self._tick()

    def stop(self) -> None:
        self.load.stop()
        for handle in (self._sample, self._quiet):
            if handle is not None:
                handle.cancel()

    def committed(self) -> None:
        self.last_commit = time.monotonic()
        self._update()

    def _tick(self) -> None:
        self._update()
        self._sample = asyncio.get_running_loop().call_later(SAMPLE, self._tick)

    def _expire(self) -> None:
        self._quiet = None
        self._update()

    def _update(self) -> None:
        quiet_in = self.last_commit + BUSY - time.monotonic()
        bursting = quiet_in > 0 and self.load.busy() >= self.burst_load
        if bursting and self._quiet is None:
            self._quiet = asyncio.get_running_loop().call_later(quiet_in, self._expire)
        if bursting != self.bursting:
            self.bursting = bursting
            self.tell(bursting)


class Acceptance:
    """In the pipeline's process: whether the SMTP sessions are accepting a burst, as
    the daemon's main process last said (``Bursts``)."""

    def __init__(self) -> None:
        self.bursting = False
        self._changed = asyncio.Event()

    def set(self, bursting: bool) -> None:
        self.bursting = bursting
        self._changed.set()

    async def changed(self, at_most: float) -> None:
        """Until the next change, at most ``at_most`` seconds."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), at_most)


def overdue(backlog_since: float | None, burst_delay: float, now: float) -> bool:
    """True while the pipeline's oldest work in hand, there since ``backlog_since``,
    has waited past ``burst_delay`` (and a second's grace): mail arrives faster than
    the pipeline processes it."""
    return backlog_since is not None and now - backlog_since > burst_delay + GRACE


class LoopLoad:
    """The share of the last half second that the event loop's thread spent on the
    CPU (its own time, not that of the threads it hands blocking work to): near 1
    while it accepts a burst as fast as it can, well below while mail comes at a
    pace it keeps up with."""

    def __init__(self) -> None:
        self._readings: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=WINDOW + 1)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._read()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _read(self) -> None:
        self._readings.append((time.monotonic(), time.thread_time()))
        self._handle = asyncio.get_running_loop().call_later(SAMPLE, self._read)

    def busy(self) -> float:
        """0 (idle) to 1 (never idle) over the last half second; 0 before two readings."""
        if len(self._readings) < 2:
            return 0.0
        (wall0, cpu0), (wall1, cpu1) = self._readings[0], self._readings[-1]
        return min(1.0, (cpu1 - cpu0) / (wall1 - wall0)) if wall1 > wall0 else 0.0


class InFlow:
    def __init__(self, delay: float, behind: Callable[[], bool],
                 metrics: Metrics | None = None) -> None:
        self.delay = delay  # the longest wait of a session for a token; 0: none
        self.behind = behind  # True while the pipeline's oldest work is overdue
        self.metrics = metrics
        self._tokens = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def finished(self, count: int) -> None:
        """The pipeline finished ``count`` messages: as many new ones may come."""
        while count and self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
        if self.behind():
            self._tokens = min(TOKENS_MAX, self._tokens + count)

    async def admit(self) -> None:
        """Before a new message: at once while the pipeline keeps up or a token is
        left; else when the pipeline finishes one, or after ``delay``."""
        if self.delay <= 0 or not self.behind():
            return
        if self._tokens:
            self._tokens -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        started = time.monotonic()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, self.delay)
        finally:
            with contextlib.suppress(ValueError):
                self._waiting.remove(waiter)
            if self.metrics is not None:
                self.metrics.in_flow_delay.inc(time.monotonic() - started)

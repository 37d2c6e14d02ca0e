"""Postfix's in_flow_delay: when the pipeline falls behind, new mail comes at its pace.

A burst is accepted at the listener's own rate and processed when it pauses
(``pipeline.burst_delay``).  When the oldest work has waited longer than that
and mail still arrives faster than the pipeline processes it, the backlog would
grow for as long as the load lasts.  Then each new message (at MAIL FROM) takes
a token, one for each message the pipeline finished; with none left, the session
waits up to ``smtp.in_flow_delay`` for one and then goes on anyway, as Postfix's
smtpd does: senders slowed to the pipeline's pace, never refused.

Whether a flow of mail is a burst is for ``LoopLoad`` to say: mail that arrives
while the event loop has CPU to spare is processed as it comes, so that its
copies do not wait for a pause that a steady flow never makes.
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

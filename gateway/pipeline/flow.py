"""Postfix's in_flow_delay: when the pipeline falls behind, new mail comes at its pace.

A burst is accepted at the listener's own rate and processed when it pauses
(``pipeline.burst_delay``).  When the oldest work has waited longer than that
and mail still arrives faster than the pipeline processes it, the backlog would
grow for as long as the load lasts.  Then each new message (at MAIL FROM) takes
a token, one for each message the pipeline finished; with none left, the session
waits up to ``smtp.in_flow_delay`` for one and then goes on anyway, as Postfix's
smtpd does: senders slowed to the pipeline's pace, never refused.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

from gateway.metrics import Metrics

TOKENS_MAX = 100  # finished messages kept as tokens at most (Postfix: its pipe's size)


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

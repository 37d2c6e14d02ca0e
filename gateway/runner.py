"""The one loop every background job of the daemon runs: claim, process, record, rest, stop.

Mailman's ``core/runner.py`` is the model: the loop, the lease keeping and the
stop are written here once; each runner writes only what is its own work.

``Runner`` owns the lifecycle: ``start()`` makes the task (and starts the
renewal of the leases of what it holds, when it claims rows with leases);
``run()`` calls ``turn()`` until stopped, resting between turns as long as the
turn asks, on ``wakeup`` (set by whoever has new work: a commit, a free slot);
``stop()`` either lets the turn in hand finish (what is claimed and not begun
is given back by the runner's own ``process``) or cancels it, then lets the
runner write down what is left (``flush``) and close what it opened
(``close``).  A periodic job with no rows to claim (a folder import)
subclasses ``Runner`` itself: its ``turn()`` is one pass and returns the
seconds until the next; ``failed()`` decides what an error of a pass costs
(logged, counted, the pause before the next try); ``begin()`` may rest first
when the first pass is due only after one period.

Two shapes of queue work claim rows from the database with a lease:

- ``BatchRunner``: a batch at a time, processed and recorded before the next
  claim (the pipeline: its stages on the batch, one transaction for the results).
- ``PoolRunner``: up to ``concurrency`` items in hand, each processed in a task
  of its own; results recorded in groups, one transaction for all that finished
  meanwhile, by two writers beside the loop, so that a result seldom waits for the
  commit of the group before it (the delivery queue).

Both claim in the same step (``take``): a claim that fails is logged and counted
and the runner rests, and what it claims is held by a ``LeaseKeeper`` until
its result is recorded.  Log lines go to the runner's own logger, named after
its module, as they always did.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from typing import Generic, TypeVar

from gateway.leases import LeaseKeeper

T = TypeVar("T")  # one claimed item
R = TypeVar("R")  # what processing gives to record


class Runner(abc.ABC):
    """A task that runs turns until stopped; see the module's docstring."""

    cancel_on_stop = False  # stop(): cancel the turn in hand instead of letting it finish

    def __init__(self, name: str, log: logging.Logger, leases: LeaseKeeper | None = None
                 ) -> None:
        self.name = name  # the task's name, and the first word of the loop's log lines
        self.log = log
        self.leases = leases
        self.wakeup = asyncio.Event()
        self.stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=self.name)
        if self.leases is not None:
            self.leases.start()

    async def stop(self) -> None:
        self.stopping = True
        self.wakeup.set()
        if self._task is not None:
            if self.cancel_on_stop:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            else:
                await self._task
            await self.flush()
        if self.leases is not None:
            await self.leases.stop()
        await self.close()

    async def run(self) -> None:
        await self.begin()
        while not self.stopping:
            try:
                wait = await self.turn()
            except Exception as exc:  # the runner's own boundary decides
                wait = await self.failed(exc)
            if wait is not None:
                await self.rest(wait)
        await self.end()

    @abc.abstractmethod
    async def turn(self) -> float | None:
        """One round of work; the seconds to rest after it (None: the next at once)."""

    async def failed(self, exc: Exception) -> float | None:
        """A turn raised: the seconds to rest before the next.  By default the
        runner's task ends with the error (a runner that expects errors says how it
        carries on)."""
        raise exc

    async def rest(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for ``wakeup``; True when woken."""
        self.wakeup.clear()
        try:
            await asyncio.wait_for(self.wakeup.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def begin(self) -> None:
        """Before the first turn."""
        return None

    async def end(self) -> None:
        """After the last turn, in the runner's task."""
        return None

    async def flush(self) -> None:
        """After the task has ended, before the leases stop: write down what is left."""
        return None

    async def close(self) -> None:
        """Last of ``stop()``: close what the runner opened."""
        return None

    def count_failure(self, step: str) -> None:
        """A step of the loop failed (``claim``): the runner's own metric, if it has one."""
        return None


class QueueRunner(Runner, Generic[T]):
    """Claims rows with a lease from the database; see BatchRunner and PoolRunner."""

    leases: LeaseKeeper

    def __init__(self, name: str, log: logging.Logger, leases: LeaseKeeper,
                 poll_interval: float) -> None:
        super().__init__(name, log, leases)
        self.poll_interval = poll_interval  # the longest rest without a wakeup

    @abc.abstractmethod
    async def claim(self, limit: int) -> list[T]:
        """Up to ``limit`` items, leased to this instance."""

    @abc.abstractmethod
    def key(self, item: T) -> str | int:
        """The row an item's lease is kept on."""

    async def before_claim(self) -> None:
        """Before each claim (a pause, a periodic check of the runner's own)."""

    async def take(self, limit: int) -> list[T]:
        """Claim up to ``limit`` items and hold their leases; none when the claim
        fails (logged and counted: the database may be away, the next turn tries again)."""
        try:
            items = await self.claim(limit)
        except Exception:  # loop boundary: the database may be away; try again later
            self.log.exception("%s: claiming work failed", self.name)
            self.count_failure("claim")
            return []
        held = self.leases.held
        if held:
            # one of ours still in hand, its lease run out while renewals failed: it is
            # claimed again (the lease is ours once more) but not worked on a second time
            items = [item for item in items if self.key(item) not in held]
        self.leases.hold(self.key(item) for item in items)
        return items


class BatchRunner(QueueRunner[T], Generic[T, R]):
    """A batch at a time: claim, process, record, then the next claim."""

    def __init__(self, name: str, log: logging.Logger, leases: LeaseKeeper,
                 poll_interval: float, batch_size: int) -> None:
        super().__init__(name, log, leases, poll_interval)
        self.batch_size = batch_size

    async def turn(self) -> float | None:
        await self.before_claim()
        batch = await self.take(self.batch_size)
        if not batch:
            return self.poll_interval
        try:
            await self.record(await self.process(batch))
        finally:
            self.leases.drop(self.key(item) for item in batch)
        return await self.after(batch)

    @abc.abstractmethod
    async def process(self, batch: list[T]) -> R:
        """Work on a claimed batch; what is not done when stopping is given back here."""

    @abc.abstractmethod
    async def record(self, results: R) -> None:
        """Save the results of a batch."""

    async def after(self, batch: list[T]) -> float | None:
        """After a batch is recorded: the seconds to rest (None: claim again at once)."""
        return None


class PoolRunner(QueueRunner[T], Generic[T, R]):
    """Up to ``concurrency`` items in hand, each in a task; results saved in groups.

    A group that cannot be saved (database away) is kept and tried again: work
    already done must be recorded, or its lease would expire and it would be done
    a second time.  On stop, the items in hand finish and their results are saved.
    """

    # Results are written by this many transactions at once: a result that ends while
    # one is being written does not wait for its commit (a copy sent and not yet
    # recorded is sent again if the process dies meanwhile).
    writers = 2

    def __init__(self, name: str, log: logging.Logger, leases: LeaseKeeper,
                 poll_interval: float, concurrency: int) -> None:
        super().__init__(name, log, leases, poll_interval)
        self.concurrency = concurrency
        # Claim when this many slots are free (or none is busy): a claim per finished
        # item would cost a transaction for each.
        self.claim_at = max(1, concurrency // 4)
        self.in_flight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        # each result with the moment its work ended, for recorded()
        self._results: asyncio.Queue[tuple[T, R, float] | None] = asyncio.Queue()
        self._writers = [asyncio.create_task(self._write_results(), name=f"{self.name}-results")
                         for _ in range(self.writers)]
        super().start()

    async def turn(self) -> float | None:
        await self.before_claim()
        free = self.concurrency - len(self.in_flight)
        if self.in_flight and free < self.claim_at:
            return self.poll_interval  # woken again as items finish
        items = await self.take(free)
        for item in items:
            task = asyncio.create_task(self._one(item))
            self.in_flight.add(task)
            task.add_done_callback(self._finished)
        if items and len(self.in_flight) < self.concurrency:
            return None
        return self.poll_interval

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.wakeup.set()  # a slot is free: claim more

    async def _one(self, item: T) -> None:
        result = await self.process(item)
        if result is None:  # nothing to record: its lease will expire
            self.leases.drop((self.key(item),))
            return
        await self._results.put((item, result, time.monotonic()))

    @abc.abstractmethod
    async def process(self, item: T) -> R | None:
        """Work on one item; the result to record, or None when it failed unexpectedly
        (the runner's own catch-all logged it)."""

    @abc.abstractmethod
    async def record(self, group: list[tuple[T, R]]) -> None:
        """Save the results of a group of items in one go (raises: tried again)."""

    def recorded(self, seconds: float) -> None:
        """A result is durable, ``seconds`` after its work ended (the runner's metric)."""
        return None

    async def end(self) -> None:
        if self.in_flight:
            await asyncio.gather(*self.in_flight)

    async def flush(self) -> None:
        for _ in self._writers:
            await self._results.put(None)
        await asyncio.gather(*self._writers)

    async def _write_results(self) -> None:
        """Record results in groups: one transaction for all that finished meanwhile."""
        stopping = False
        group: list[tuple[T, R, float]] = []
        pause = 0.5
        while True:
            if not group:
                if stopping:
                    return
                first = await self._results.get()
                if first is None:
                    return
                group.append(first)
            while not self._results.empty():
                entry = self._results.get_nowait()
                if entry is None:
                    stopping = True
                    break
                group.append(entry)
            try:
                await self.record([(item, result) for item, result, _ in group])
            except Exception:  # loop boundary: keep the results and try again
                self.log.exception("%s: recording %d results failed; retrying in %.1f s",
                                   self.name, len(group), pause)
                if stopping and pause > 8:
                    self.log.error("%s: giving up on %d results at shutdown", self.name,
                                   len(group))
                    return
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            pause = 0.5
            now = time.monotonic()
            for _, _, ended in group:
                self.recorded(now - ended)
            self.leases.drop(self.key(item) for item, _, _ in group)
            group = []

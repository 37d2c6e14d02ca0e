"""Parts of the daemon that run in child processes, each with its own event loop.

The pipeline (gateway.processor) and the delivery queue (gateway.deliverer) each
run in a process of their own, so that the work after the 250 has the machine's
other cores while the daemon's main process accepts mail, as Postfix's cleanup,
qmgr and smtp run apart from its smtpd.  Everything such a child shares with the
daemon is in the database: it claims its work with leases, so it may end at any
moment and a new one takes over (what it had in hand is taken up at once by its
replacement, which frees the leases of this host's dead processes).

Each speaks with the daemon over one pipe, in multiprocessing's framing, in
tuples whose first item names the message.  Every child understands:

- daemon to child: ``("wake",)`` new work is in the database; ``("state", ...)``
  what the child works with changed (the policy set, keys: at every reload);
  ``("stop",)`` finish what is in hand, record it, and exit;
- child to daemon: ``("metrics", families)`` four times a second and at the end:
  the metrics the child owns, which the daemon's /metrics shows as its own.

A child's own messages are its module's to say.  ``Child`` is the daemon's side:
it starts the process, restarts it when it dies (with a pause that grows when it
dies soon after each start) and, at shutdown, waits for it to finish what it has
in hand.  With ``max_idle``, a child that has had no work for that long is told to
stop, as Postfix's master lets its idle services go; the next wake, or work the
daemon finds waiting in the database, starts another.  The metrics of the children
that ended are kept and added up with those of the one that runs, so that a
counter carries on across restarts.  ``ChildLoop`` is the child's side of the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.connection
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from prometheus_client.metrics_core import Metric

from gateway import logs, memory
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.store.repository import Store
from gateway.workers import WorkerPool
from gateway.zygote import Process, spawn

log = logging.getLogger(__name__)

METRICS_EVERY = 0.25  # seconds between a child's reports of its metrics
SHORT_LIFE = 10.0  # seconds: a child that ends sooner is restarted only after a pause
MAX_PAUSE = 30.0  # seconds: the longest pause before a restart


_SUMMED = frozenset({"counter", "histogram", "summary"})  # totals go on across children


def _merged(ended: list[Metric], running: list[Metric]) -> list[Metric]:
    """The counters, histograms and summaries of the children that ended (``ended``
    holds no other kind) with the families of the running one: counts added up
    (their ``_created`` the first), gauges and the rest as the running child has them."""
    now = {family.name: family for family in running}
    out = []
    for old in ended:
        new = now.pop(old.name, None)
        if new is None:
            out.append(old)
            continue
        family = Metric(new.name, new.documentation, new.type, new.unit)
        values: dict[tuple[str, frozenset[tuple[str, str]]], Any] = {}
        for sample in [*old.samples, *new.samples]:
            key = (sample.name, frozenset(sample.labels.items()))
            first = values.get(key)
            if first is None:
                values[key] = sample
            elif not sample.name.endswith("_created"):
                values[key] = first._replace(value=first.value + sample.value)
        family.samples = list(values.values())
        out.append(family)
    return out + list(now.values())


class _Families:
    """A child's metrics in the daemon's registry: what the children that ended
    reported last, added to what the running one last reported; the daemon's own
    (empty) families until a child has reported."""

    def __init__(self, fallback: list[Any]) -> None:
        self.fallback = fallback
        self.families: list[Metric] | None = None  # the running child's last report
        self.ended: list[Metric] | None = None  # those of the children before it
        self._lock = threading.Lock()

    def report(self, families: list[Metric]) -> None:
        with self._lock:
            self.families = families

    def child_ended(self) -> None:
        """The running child ended: its last report joins those before it."""
        with self._lock:
            if self.families is not None:
                self.ended = [family for family in _merged(self.ended or [], self.families)
                              if family.type in _SUMMED]
                self.families = None

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            families, ended = self.families, self.ended
        if ended is not None:
            return ended if families is None else _merged(ended, families)
        if families is not None:
            return families
        return [f for collector in self.fallback for f in collector.collect()]


class _Soon:
    """Messages for the other side sent at the end of the event loop's turn, each at
    most once however often it was asked for meanwhile: a run of commits is one wake."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        self._send = send
        self._pending: set[tuple[Any, ...]] = set()

    def __call__(self, message: tuple[Any, ...]) -> None:
        if message not in self._pending:
            self._pending.add(message)
            asyncio.get_running_loop().call_soon(self._flush, message)

    def _flush(self, message: tuple[Any, ...]) -> None:
        self._pending.discard(message)
        self._send(message)


class Child:
    """The daemon's side of a child process: starts it, tells it of new work and of
    reloads, shows its metrics, restarts it when it dies, stops it.

    ``target(conn, config, *state())`` is the child's module-level entry point;
    ``owned`` names the ``Metrics`` attributes the child reports.  A subclass
    handles the child's other messages in ``received`` (on the event loop).

    With ``max_idle`` (seconds; 0: never) the child is told to stop once it has had
    no work for that long (no wake, no message from it but its metrics) and says it
    has nothing in hand (``idle``);
    another starts at the next ``wake``, or when ``needed`` (asked every
    ``check_every`` seconds meanwhile) finds work waiting for it."""

    def __init__(self, what: str, target: Callable[..., None], config: GatewayConfig,
                 metrics: Metrics, owned: Iterable[str], state: Callable[[], tuple[Any, ...]],
                 stop_timeout: float, nice: int = 0, max_idle: float = 0.0,
                 check_every: float = 2.0) -> None:
        self.what = what  # "delivery process": for the log
        self.target = target
        self.config = config
        self.state = state  # what the child works with, read at every (re)start and reload
        self.stop_timeout = stop_timeout  # seconds a stopping child may take
        self.nice = nice  # how much lower than the daemon's the child's priority is
        self.max_idle = max_idle  # seconds without work before the child is let go
        self.check_every = check_every  # while it is away: how often ``needed`` is asked
        collectors = [getattr(metrics, name) for name in owned]
        for collector in collectors:
            metrics.registry.unregister(collector)
        self.families = _Families(collectors)
        metrics.registry.register(self.families)
        self.process: Process | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.stopping = False
        self.away = False  # told to stop for want of work: not restarted until needed
        self.soon = _Soon(self.send)
        self._last_work = time.monotonic()
        self._needed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Event | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._idle_watch: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()  # a restart in progress: stop() waits for it
        self._reloads = 0  # reloads so far: one during a start is sent again
        self._send_lock = threading.Lock()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._start_child()
        self._supervisor = asyncio.create_task(self._supervise(), name=self.what)
        if self.max_idle > 0:
            self._idle_watch = asyncio.create_task(self._let_idle_go(),
                                                   name=f"{self.what} idle")

    async def _start_child(self, quiet: bool = False) -> None:
        reloads = self._reloads
        process, conn = await asyncio.to_thread(spawn, self.target, self.config, *self.state(),
                                                nice=self.nice)
        with self._send_lock:  # the last child's pipe: its reader has ended
            if self.conn is not None:
                self.conn.close()
            self.process, self.conn = process, conn
        self._ended = ended = asyncio.Event()
        self._last_work = time.monotonic()
        woken = self._needed.is_set()  # perhaps by a commit after the new child's first claim
        self._needed.clear()
        self.away = False
        threading.Thread(target=self._read, args=(conn, ended), name=f"{self.what} pipe",
                         daemon=True).start()
        log.log(logging.DEBUG if quiet else logging.INFO, "%s started (pid %d)", self.what,
                process.pid)
        if reloads != self._reloads:  # a reload while it started went to the last one
            self.reloaded()
        if woken:
            self.soon(("wake",))

    def _read(self, conn: multiprocessing.connection.Connection, ended: asyncio.Event) -> None:
        """The pipe from the child, in a thread of its own: until it ends."""
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle: the child is broken
                log.exception("%s: unreadable message", self.what)
                break
            if message[0] == "metrics":
                self.families.report(message[1])
            else:
                self._last_work = time.monotonic()  # a child speaks of its work
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(self.received, message)
        self.families.child_ended()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is gone
            loop.call_soon_threadsafe(ended.set)

    def received(self, message: tuple[Any, ...]) -> None:
        """A message of the child's own kind, on the event loop."""
        log.warning("%s: unexpected message %r", self.what, message[0])

    async def _supervise(self) -> None:
        """Restart the child whenever it ends while the daemon runs."""
        pause = 1.0
        unstarted = False  # the last start failed (and said so)
        while True:
            started = time.monotonic()
            assert self._ended is not None and self.process is not None
            await self._ended.wait()
            await asyncio.to_thread(self.process.join, 5)
            if self.stopping:
                return
            away = self.away and self.process.exitcode == 0  # not a death on the way out
            if away:
                log.debug("%s (pid %d) left after %.0f s without work", self.what,
                          self.process.pid, self.max_idle)
                await self._until_needed()
                pause = 1.0
            else:
                if not unstarted:
                    log.error("%s (pid %d) ended with %s; starting another", self.what,
                              self.process.pid, self.process.exitcode)
                if time.monotonic() - started < SHORT_LIFE:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, MAX_PAUSE)
                else:
                    pause = 1.0
            async with self._starting:
                if self.stopping:
                    return
                unstarted = False
                try:
                    await self._start_child(quiet=away)
                    self.restarted()
                except Exception:  # loop boundary: try again after the pause
                    log.exception("%s could not be started", self.what)
                    unstarted = True
                    self.away = False  # the next try waits for the pause
                    self._ended = asyncio.Event()
                    self._ended.set()

    def restarted(self) -> None:
        """A new child took over from one that ended (for a subclass's own state)."""

    def idle(self) -> bool:
        """Whether the child, as it last said, has nothing in hand (a subclass's say)."""
        return True

    async def needed(self) -> bool:
        """While the child is away: whether work waits that it would take (a subclass's
        look at the database)."""
        return False

    async def _let_idle_go(self) -> None:
        """Tell the child to stop once it has had no work for ``max_idle`` seconds."""
        every = max(self.max_idle / 4, 0.25)
        while not self.stopping:
            await asyncio.sleep(every)
            running = self._ended is not None and not self._ended.is_set()
            if (running and not self.away and self.idle()
                    and time.monotonic() - self._last_work >= self.max_idle):
                self.away = True
                self._needed.clear()
                self.send(("stop",))  # it finishes what it has in hand, as at shutdown

    async def _until_needed(self) -> None:
        """While the child is away: until it is woken or work waits for it."""
        while not self.stopping:
            try:
                await asyncio.wait_for(self._needed.wait(), self.check_every)
                return
            except TimeoutError:
                pass
            try:
                if await self.needed():
                    return
            except Exception:  # loop boundary: the database may be away; look again
                log.debug("%s: looking for work failed", self.what, exc_info=True)

    def send(self, message: tuple[Any, ...]) -> None:
        conn = self.conn
        if conn is None:
            return
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(message)  # a child that died is restarted by the supervisor

    def wake(self) -> None:
        """New work is in the database: one message to the child, however many calls;
        another child when the last one left for want of work."""
        self._last_work = time.monotonic()
        if self.away:
            self._needed.set()
        else:
            self.soon(("wake",))

    def reloaded(self) -> None:
        """What the child works with changed (``state()``): the child follows."""
        self._reloads += 1
        self.send(("state", *self.state()))

    async def stop(self) -> None:
        self.stopping = True
        self._needed.set()
        if self._idle_watch is not None:
            self._idle_watch.cancel()
        async with self._starting:  # a child being started is stopped, not left behind
            process, ended = self.process, self._ended
        self.send(("stop",))
        if process is not None and ended is not None:
            try:
                await asyncio.wait_for(ended.wait(), self.stop_timeout)
            except TimeoutError:
                log.error("%s (pid %d) did not stop in time; killing it", self.what,
                          process.pid)
                process.kill()
            await asyncio.to_thread(process.join, 5)
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.conn is not None:
            self.conn.close()


# ---------------------------------------------------------------- the child's side
def enter(name: str, config: GatewayConfig) -> None:
    """What a child process does first: the daemon decides when it stops; its name in
    ps and top (15 characters at most); the daemon's logging."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])
    logs.setup(config.logging.level, config.logging.format, config.logging.personal_data)


class _Worker(Protocol):
    wakeup: asyncio.Event  # set: look for new work now

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class ChildLoop:
    """The child's side of the pipe: messages from the daemon handed to ``received``
    on the event loop, the owned metrics reported, ``stop`` set when told to stop or
    when the daemon is gone."""

    def __init__(self, conn: multiprocessing.connection.Connection, config: GatewayConfig,
                 owned: Iterable[str]) -> None:
        self.conn = conn
        self.config = config
        self.stop = asyncio.Event()
        self.soon = _Soon(self.send)
        self.metrics = Metrics(tenant_labels=config.metrics.tenant_labels)
        self._owned = [getattr(self.metrics, name) for name in owned]
        self._worker: _Worker | None = None  # once ``work`` runs it

    def received(self, message: tuple[Any, ...]) -> None:
        if message[0] == "wake":
            if self._worker is not None:
                self._worker.wakeup.set()
        elif message[0] == "stop":
            self.stop.set()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        """The pipe from the daemon, in a thread: its end means stop."""
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            loop.call_soon_threadsafe(self.received, message)
        loop.call_soon_threadsafe(self.stop.set)

    def send(self, message: tuple[Any, ...]) -> None:
        """To the daemon (from the event loop's thread only)."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(message)

    def report(self) -> None:
        self.send(("metrics", [f for c in self._owned for f in c.collect()]))

    async def _reports(self) -> None:
        while True:
            await asyncio.sleep(METRICS_EVERY)
            self.report()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Listen to the daemon and report the metrics while the body runs; a last
        report at the end."""
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop,), name="pipe", daemon=True).start()
        reports = asyncio.create_task(self._reports())
        try:
            yield
        finally:
            reports.cancel()
            self.report()

    async def work(self, worker: _Worker, pool: WorkerPool[Any], store: Store) -> None:
        """Run ``worker`` until told to stop, then let it finish what it has in hand;
        the pool and the store it used are closed at the end."""
        self._worker = worker
        worker.start()
        memory.settle()
        try:
            await self.stop.wait()
            await worker.stop()
        finally:
            await pool.close()
            store.engine.dispose()

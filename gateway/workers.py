"""Worker processes for CPU-bound work the event loop hands off: a call returns a future.

Each process of the daemon does its work on one event loop (the pipeline
process parses and checks mail); Python runs one thread at a time in it, so CPU
work done there in threads (parsing, RSA, DKIM canonicalization, SPF and DMARC
evaluation) holds up that loop however many cores the machine has.  A
``WorkerPool`` runs such work in child processes instead.  Each child serves
several calls at once, in threads, so a call waiting on DNS does not hold up the
others; each is given the pool's ``context`` once, at start, and runs
``fn(context, *args)`` with the module-level ``fn`` a call names.  One pool
serves every kind of such work, and each process costs memory of its own (a few
MiB forked by the zygote, 20-25 MiB as a fresh interpreter), so a process keeps
as few as the configuration asks for.

``run()`` is for work the daemon can also do itself: the call runs in a
thread of the daemon instead when there is no worker process for it or its
process failed it: the call raised there (it raises here too, the way the
caller expects), the process ended, or the call overran the pool's time
bound, which also has its process killed and replaced.  Nothing depends on
the worker processes being healthy.

``run_alone()`` is for work that must never run in the daemon (parsing
hostile mail): one such call at a time in a process, with a time bound of its
own.  When it overruns, its process is killed, so that only the call at fault
fails; calls of the other kind that were in hand there finish in the daemon.

With ``max_idle``, when none of a pool's processes has had a call for that long
they exit, as Postfix's services do after ``max_idle`` (100 s): a quiet gateway
does not keep an interpreter's worth of memory for work that is not there.  The
next call has them forked again (milliseconds, from the zygote) and waits for
the first.

Worker processes are started with ``gateway.zygote.spawn()``: forked by the
daemon's zygote, or fresh interpreters where there is none.  The event loop itself
writes the calls to each process's pipe and reads the results, both without
blocking, in the framing of multiprocessing's ``Connection`` (which the
process uses on its end).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import multiprocessing.connection
import operator
import os
import resource
import signal
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any, Generic, TypeVar

from gateway.zygote import Process, spawn

log = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")  # what the processes are given once: the context of every call
CHILD_MEMORY = 2 << 30  # address-space cap of a worker process
NICE = 10  # this work can wait; accepting mail cannot: under load, the SMTP side comes first
SHORT_LIFE = 10.0  # seconds: a process that ends sooner is restarted only after a pause
MAX_PAUSE = 60.0  # seconds: the longest pause before a restart
MAX_IDLE = 100.0  # seconds without a call before a process exits (Postfix's max_idle)
WAKE_WAIT = 5.0  # seconds a call waits for a process started again before run() does it here
FRAME_JOIN = 65536  # bytes: a smaller call goes to the pipe with its header in one write
READ_CHUNK = 1 << 20  # bytes read from a pipe at a time


def by_value(cls: type[T]) -> type[T]:
    """Pickle a dataclass that crosses to or from the worker processes as its class
    and its field values. The default for a slotted dataclass looks its fields up
    again for every object it unpickles: on results that come back for every message
    that was 4% of the daemon's main thread."""
    values = operator.attrgetter(*(f.name for f in dataclasses.fields(cls)))  # type: ignore[arg-type]

    def __reduce__(self: T) -> tuple[type[T], tuple[Any, ...]]:
        got = values(self)
        return cls, got if isinstance(got, tuple) else (got,)

    cls.__reduce__ = __reduce__  # type: ignore[assignment,method-assign]
    return cls


def once(make: Callable[[], T]) -> Callable[[], T]:
    """``make()`` called once per process, however many of the process's threads ask
    for it at the same time: what the threads serving calls share (a thread pool, a
    table read from disk) is made by the first that asks, the others wait for it."""
    made: list[T] = []
    lock = threading.Lock()

    def get() -> T:
        if not made:
            with lock:
                if not made:
                    made.append(make())
        return made[0]

    return get


class WorkerError(Exception):
    """A call a worker process did not complete; the text says why."""


class ProcessEnded(WorkerError):
    """The process ended with the call in hand (perhaps for another call's sake)."""


class Overran(WorkerError):
    """The call ran past its time bound; its process was killed."""


def child_setup(name: str) -> None:
    """What every worker process of the daemon does first (the parsers' too)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the daemon decides when we stop
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))
    # The name ps, top and the OOM killer's report show (Linux; 15 characters at most).
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write(name[:15])


def _serve(conn: multiprocessing.connection.Connection, name: str, threads: int,
           context: object) -> None:
    """A worker process: calls in, results out, until the pipe closes."""
    child_setup(name)
    sending = threading.Lock()

    def call(number: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            reply: tuple[int, bool, Any] = (number, True, fn(context, *args))
        except Exception as exc:
            reply = (number, False, f"{exc.__class__.__name__}: {str(exc)[:200]}")
        with sending:
            try:
                conn.send(reply)
            except (OSError, ValueError):
                pass  # the daemon is gone or closed the pipe: nobody waits for this
            except Exception as exc:  # a result that cannot be pickled
                conn.send((number, False, f"unsendable result: {exc.__class__.__name__}"))

    with ThreadPoolExecutor(threads, thread_name_prefix="call") as pool:
        while True:
            try:
                number, fn, args = conn.recv()
            except (EOFError, OSError):
                return
            pool.submit(call, number, fn, args)


@dataclass(eq=False)
class _Child:
    slot: int  # its place in the pool: a replacement takes the same one
    process: Process
    conn: multiprocessing.connection.Connection
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    alone: bool = False  # a run_alone() call is in hand
    killed: bool = False  # on its way out: no new calls
    started: float = field(default_factory=time.monotonic)
    used: float = field(default_factory=time.monotonic)  # when its last call ended
    # Framed calls not yet written to the pipe (the loop writes what the pipe takes
    # and waits for it to drain), and bytes of results not yet whole.
    outbox: collections.deque[memoryview] = field(default_factory=collections.deque)
    inbox: bytearray = field(default_factory=bytearray)
    ended: bool = False  # the pipe closed: its calls have failed


class WorkerPool(Generic[C]):
    """``size`` processes, ``threads`` calls at a time each; no call blocks the loop.

    A call may be limited to the processes of the first ``among`` slots: kinds of
    work configured with fewer processes than the pool has share it that way.
    With ``max_idle`` seconds, the processes exit once none has had a call for that
    long, and the next call has them started again.
    """

    def __init__(self, name: str, size: int, threads: int, context: C,
                 timeout: float, max_idle: float | None = None) -> None:
        self.name = name
        self.size = size
        self.threads = threads
        self.context = context
        self.timeout = timeout
        self.max_idle = max_idle
        self._parked: set[int] = set()  # slots whose process exited for being idle
        self._waking: set[int] = set()  # slots started again for a call, not yet serving
        self._retiring: set[_Child] = set()  # idle processes told to exit, not yet reaped
        self._children: list[_Child] = []
        self._numbers = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()  # reaping and restarting processes
        self._short_lives = 0  # processes in a row that ended soon after they started
        self._changed: asyncio.Condition | None = None  # a process freed or started

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        for slot in range(self.size):
            await self._start_slot(slot)
        if self.max_idle and self.size:
            self._track(self._retire_idle(self.max_idle))

    async def _start_slot(self, slot: int) -> None:
        name = f"mailflowr-{self.name}"
        process, conn = await asyncio.to_thread(spawn, _serve, name, self.threads, self.context,
                                                nice=NICE)
        child = _Child(slot, process, conn)
        if self._closing:  # closed while it started: nobody will stop it otherwise
            self._kill(child)
            await asyncio.to_thread(child.process.join, 5)
            conn.close()
            return
        # The pipe is the loop's from here: calls are written and results read as the
        # pipe allows, with no thread in between (a hand-off to a reader and a writer
        # thread, twice per call, cost the loop more than the call's own work).
        assert self._loop is not None
        os.set_blocking(conn.fileno(), False)
        self._loop.add_reader(conn.fileno(), self._readable, child)
        self._children.append(child)
        self._waking.discard(slot)
        await self._notify()

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    def _send(self, child: _Child, call: tuple[int, Callable[..., Any], tuple[Any, ...]]
              ) -> None:
        """Frame a call as multiprocessing's Connection.recv() in the child reads it."""
        data = ForkingPickler.dumps(call)
        size = len(data)
        header = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        waiting = bool(child.outbox)  # then the loop writes when the pipe drains
        if size < FRAME_JOIN:
            child.outbox.append(memoryview(header + bytes(data)))
        else:  # no copy of a large message just to put the header before it
            child.outbox.extend((memoryview(header), memoryview(data)))
        if not waiting:
            self._flush(child)

    def _flush(self, child: _Child) -> None:
        assert self._loop is not None
        fd = child.conn.fileno()
        out = child.outbox
        while out:
            try:
                sent = os.write(fd, out[0])
            except BlockingIOError:
                sent = 0
            except OSError:  # the child is gone: the reader sees the pipe close
                out.clear()
                break
            if sent < len(out[0]):
                out[0] = out[0][sent:]
                self._loop.add_writer(fd, self._flush, child)
                return
            out.popleft()
        self._loop.remove_writer(fd)

    def _readable(self, child: _Child) -> None:
        """Results of one child, as they arrive; its end, when the pipe closes."""
        try:
            chunk = os.read(child.conn.fileno(), READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._pipe_closed(child)
            return
        buf = child.inbox
        buf += chunk
        while len(buf) >= 4:
            (size,) = struct.unpack_from("!i", buf)
            start = 4
            if size == -1:
                if len(buf) < 12:
                    return
                (size,) = struct.unpack_from("!Q", buf, 4)
                start = 12
            if len(buf) < start + size:
                return
            try:
                with memoryview(buf) as view, view[start:start + size] as frame:
                    number, ok, value = ForkingPickler.loads(frame)
            except Exception:  # not a result we can read: the two ends disagree
                log.exception("%s process sent a result that could not be read; "
                              "replacing it", self.name)
                self._kill(child)
                self._pipe_closed(child)
                return
            del buf[:start + size]
            self._settle(child, number, ok, value)

    def _pipe_closed(self, child: _Child) -> None:
        if child.ended:
            return
        self._detach(child)
        self._track(self._reap(child))

    def _detach(self, child: _Child) -> None:
        """The loop stops watching the child's pipe (closed in ``_lost``)."""
        if child.ended:
            return
        child.ended = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(child.conn.fileno())
            self._loop.remove_writer(child.conn.fileno())
        child.outbox.clear()
        child.inbox.clear()

    async def _reap(self, child: _Child) -> None:
        # in a thread, not on the loop: a process may take a moment to end
        await asyncio.to_thread(child.process.join, 5)
        if child.process.is_alive():  # still in a call whose caller gave up on it
            self._kill(child)
            await asyncio.to_thread(child.process.join, 5)
        self._retiring.discard(child)
        self._lost(child)

    @classmethod
    def _settle(cls, child: _Child, number: int, ok: bool, value: Any) -> None:
        if ok:
            future = child.pending.pop(number, None)
            if future is not None and not future.done():  # else the caller gave up on it
                future.set_result(value)
        else:
            cls._fail(child, number, WorkerError(value))

    @staticmethod
    def _fail(child: _Child, number: int, error: WorkerError) -> None:
        future = child.pending.pop(number, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _lost(self, child: _Child) -> None:
        """A child ended: its calls fail, and (unless we are closing) another takes its
        place; after a process that ended soon after it started, only after a pause that
        doubles each time (one that cannot start must not be restarted in a busy loop)."""
        reason = f"{self.name} process ended (exit code {child.process.exitcode})"
        for future in child.pending.values():
            if not future.done():
                future.set_exception(ProcessEnded(reason))
        child.pending.clear()
        self._detach(child)
        child.conn.close()
        if child not in self._children:
            return
        self._children.remove(child)
        if self._closing:
            return
        if time.monotonic() - child.started < SHORT_LIFE:
            self._short_lives += 1
        else:
            self._short_lives = 0
        pause = min(2.0 ** self._short_lives, MAX_PAUSE) if self._short_lives else 0.0
        log.warning("%s; starting another%s", reason, f" in {pause:g} s" if pause else "")
        self._track(self._respawn(child.slot, pause))

    def _track(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of the pool's own (``close()`` cancels those)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self, slot: int, pause: float) -> None:
        """Start the slot's process after ``pause``; while it cannot start (no memory
        or processes left for a fork), try again after pauses that double."""
        while True:
            await asyncio.sleep(pause)
            if self._closing:
                return
            try:
                await self._start_slot(slot)
                return
            except Exception as exc:
                log.error("%s process could not start: %s", self.name, exc)
                self._waking.discard(slot)  # calls stop waiting for it: run() does them here
                pause = min(max(pause * 2, 1.0), MAX_PAUSE)

    async def _retire_idle(self, max_idle: float) -> None:
        """Every quarter of ``max_idle``: when no process of the pool has had a call for
        ``max_idle`` (and none is starting), they all exit.  One at a time would retire
        the processes a light load leaves idle beside the one it keeps busy."""
        while True:
            await asyncio.sleep(max_idle / 4)
            now = time.monotonic()
            children = self._children
            if not children or self._waking or not all(
                    not c.pending and not c.alone and not c.killed and not c.ended
                    and now - c.used >= max_idle for c in children):
                continue
            for child in list(children):
                try:
                    self._retire(child)
                except Exception:
                    log.exception("%s process %d could not be retired", self.name,
                                  child.process.pid)

    def _retire(self, child: _Child) -> None:
        """An idle process exits: its pipe closes (it reads the end and returns) and its
        slot waits for a call (``_unpark``)."""
        log.debug("%s process %d idle for %g s: it exits", self.name, child.process.pid,
                  self.max_idle)
        self._detach(child)
        child.conn.close()
        self._children.remove(child)
        self._parked.add(child.slot)
        self._retiring.add(child)
        self._track(self._reap(child))

    def _unpark(self, among: int | None) -> bool:
        """Start the idle-retired slots of the first ``among`` again; whether any slot
        there is starting for a call."""
        limit = self.size if among is None else among
        for slot in sorted(s for s in self._parked if s < limit):
            self._parked.discard(slot)
            self._waking.add(slot)
            self._track(self._respawn(slot, 0.0))
        return any(s < limit for s in self._waking)

    async def _woken(self, among: int | None) -> list[_Child]:
        """For a call that found no process while retired slots start again: waits for
        the first (``WAKE_WAIT`` at most)."""
        assert self._changed is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAKE_WAIT), self._changed:
                while not (self._serving(among) or self._closing) and self._unpark(among):
                    await self._changed.wait()
        return self._serving(among)

    def _serving(self, among: int | None) -> list[_Child]:
        limit = self.size if among is None else among
        return [c for c in self._children if c.slot < limit and not (c.killed or c.ended)]

    async def run(self, fn: Callable[..., T], *args: Any, among: int | None = None) -> T:
        """``fn(context, *args)`` in a worker process (``fn`` must be module-level),
        or in a thread here when none can.  ``among``: only the first so many slots."""
        children = self._serving(among)
        # the pool was idle: its processes start again, and a call waits for the first
        if (self._parked or self._waking) and self._unpark(among) and not children:
            children = await self._woken(among)
        if children:
            child = min(children, key=lambda c: len(c.pending))
            try:
                return await self._remote(child, self.timeout, fn, *args)
            except WorkerError as exc:
                log.warning("%s: %s; running it in the daemon", fn.__name__, exc)
        return await asyncio.to_thread(fn, self.context, *args)

    async def run_alone(self, fn: Callable[..., T], *args: Any, bound: float,
                        among: int | None = None) -> T:
        """``fn(context, *args)`` in a worker process running no other such call, within
        ``bound`` seconds; waits for a free one.  Never in the daemon: raises
        ``Overran`` (its process was killed), ``ProcessEnded``, or ``WorkerError`` (it
        raised there)."""
        assert self._changed is not None, "WorkerPool.start() was not awaited"
        async with self._changed:
            child = None
            while child is None:
                if self._closing:
                    raise ProcessEnded(f"{self.name} processes are stopping")
                free = [c for c in self._serving(among) if not c.alone]
                if free:
                    child = min(free, key=lambda c: len(c.pending))
                else:
                    self._unpark(among)
                    await self._changed.wait()
            child.alone = True
        try:
            return await self._remote(child, bound, fn, *args)
        finally:
            child.alone = False
            await self._notify()

    async def _remote(self, child: _Child, bound: float, fn: Callable[..., T],
                      *args: Any) -> T:
        if child.killed or child.ended or child not in self._children:  # ended since chosen
            raise ProcessEnded(f"{self.name} process ended (exit code {child.process.exitcode})")
        number = next(self._numbers)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        try:
            self._send(child, (number, fn, args))
        except Exception as exc:  # arguments that cannot be pickled
            raise WorkerError(f"{self.name} call not sent: {exc.__class__.__name__}: "
                              f"{exc}") from None
        child.pending[number] = future
        timer = loop.call_later(bound, self._overran, child, number, bound)
        try:
            return await future
        finally:
            timer.cancel()
            child.pending.pop(number, None)
            child.used = time.monotonic()

    def _overran(self, child: _Child, number: int, bound: float) -> None:
        future = child.pending.pop(number, None)
        if future is None or future.done():
            return
        log.warning("%s: a call ran longer than %g s; replacing its process", self.name, bound)
        self._kill(child)
        future.set_exception(Overran(f"{self.name} call took longer than {bound:g} s"))

    @staticmethod
    def _kill(child: _Child) -> None:
        child.killed = True
        if child.process.is_alive():
            child.process.kill()

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # the retiring too: their reaping was cancelled above
        for child in [*self._children, *self._retiring]:
            self._kill(child)
            await asyncio.to_thread(child.process.join, 5)
            self._lost(child)  # its calls fail; no other takes its place
        self._retiring.clear()
        self._children.clear()
        if self._changed is not None:
            await self._notify()  # calls waiting for a process: there will be none

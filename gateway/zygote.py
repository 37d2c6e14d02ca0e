"""Child processes forked from a copy of the daemon made before it started anything.

A child started as a fresh interpreter imports its libraries again: 0.6 s of CPU
and some 45 MiB of its own for the pipeline's or the delivery's process, every
time one starts (a restart after a crash included, while its leases run).  Forking
the daemon itself once it runs is not safe: its threads (database, DNS, pipes)
hold locks that a forked copy would find taken forever.  So the daemon, first
thing, after its imports and before it opens a database or starts a thread,
forks a zygote (``start``): a single-threaded copy that does nothing but fork
children on request, as Postfix's master process does.  A child so forked starts
at once and shares the zygote's pages until it writes them (``gc.freeze`` keeps
the collector from writing them).

Every process the zygote forks gets a channel of its own to it, so that it can
have children forked too (the pipeline's parse workers).  Over a channel go a
request (the priority wanted, and the child's end of the pipe it will serve, as
SCM_RIGHTS), the reply (its pid) and, whenever a child of that requester ends,
its exit status: the zygote is the children's parent and reaps them.  When the
daemon's channel closes the zygote exits; the children stop on their own when
the pipes to their parents close.

``spawn()`` starts every child: forked by the zygote whenever this process has a
channel to it, else a fresh interpreter (a command of the CLI, tests of a pool
alone, or after the zygote died) that imports only what its work needs.  Not with
multiprocessing's own start methods: its "spawn" imports the daemon's main
module again in every child, and it keeps a resource tracker process beside
them, another interpreter for semaphores and shared memory the daemon never uses.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing.connection
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

NAME = "mailflowr-forks"  # the zygote's name in ps and top
REQUEST = 64  # bytes: the longest message on a channel


def start() -> None:
    """Fork the zygote, if this process runs no other thread yet (else children stay
    fresh interpreters: forking a threaded process is what this avoids)."""
    global _channel
    if threading.active_count() > 1 or _channel is not None:
        log.warning("child processes start as new interpreters: threads already run")
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    gc.collect()
    gc.freeze()  # both copies: neither's collector writes to the pages they share
    pid = os.fork()
    if pid == 0:
        ours.close()
        code = 1
        try:
            _Zygote(theirs).run()
            code = 0
        except BaseException:  # the zygote's own failure: its children go on
            traceback.print_exc()
        finally:
            os._exit(code)
    theirs.close()
    _channel = _Channel(ours, pid)


def stop(timeout: float = 5.0) -> None:
    """At the daemon's end, once its children have stopped: the zygote exits too."""
    global _channel
    channel, _channel = _channel, None
    if channel is None or not channel.zygote:
        return
    channel.closing = True
    with contextlib.suppress(OSError):  # wakes the reader thread; the zygote reads the end
        channel.sock.shutdown(socket.SHUT_RDWR)
    channel.sock.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(channel.zygote, os.WNOHANG)[0] == 0:
                time.sleep(0.01)
                continue
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(channel.zygote, signal.SIGKILL)


def running() -> bool:
    """Whether children of this process are forked by the zygote."""
    return _channel is not None and not _channel.broken


def fork(fd: int, nice: int) -> Forked:
    """A child forked by the zygote that serves the pipe end ``fd`` (sent to it, not
    closed here), ``nice`` lower in priority than this process.  The child reads
    ``(target, args)`` from the pipe and runs ``target(conn, *args)``.  Blocks until
    the zygote answers: call it from a thread, not the loop."""
    if _channel is None:
        raise RuntimeError("no zygote")
    return _channel.fork(fd, os.nice(0) + nice)


class Forked:
    """A child the zygote forked for this process: what the pools need of
    multiprocessing.Process."""

    def __init__(self, pid: int, channel: _Channel) -> None:
        self.pid = pid
        self._channel = channel
        self._code: int | None = None
        self._ended = threading.Event()

    def _end(self, code: int) -> None:
        self._code = code
        self._ended.set()

    @property
    def exitcode(self) -> int | None:
        """None while it runs; negative: the signal that ended it."""
        if self._ended.is_set():
            return self._code
        if self._channel.broken and not os.path.exists(f"/proc/{self.pid}"):
            self._end(-1)  # no zygote left to tell how it ended
        return self._code

    def is_alive(self) -> bool:
        return self.exitcode is None

    def kill(self) -> None:
        if not self._ended.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.exitcode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self._ended.wait(0.1 if left is None else min(left, 0.1))


class _Channel:
    """This process's side of its channel to the zygote."""

    def __init__(self, sock: socket.socket, zygote: int) -> None:
        self.sock = sock
        self.zygote = zygote  # its pid (the daemon's zygote); 0 in a child
        self.broken = False
        self.closing = False  # the daemon ends: the zygote with it
        self._lock = threading.Lock()  # one request at a time
        self._state = threading.Lock()  # the two tables below, shared with the reader
        self._replies: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._children: dict[int, Forked] = {}
        self._ended: dict[int, int] = {}  # exits told before their "started" was read
        self._reader: threading.Thread | None = None

    def fork(self, fd: int, nice: int) -> Forked:
        with self._lock:
            if self._reader is None:
                self._reader = threading.Thread(target=self._read, name="zygote",
                                                daemon=True)
                self._reader.start()
            try:
                socket.send_fds(self.sock, [b"%d" % nice], [fd])
            except OSError:
                self.broken = True
                raise
            pid = self._replies.get()
            if pid < 0:
                raise OSError("the zygote could not fork")
            child = Forked(pid, self)
            with self._state:
                self._children[pid] = child
                code = self._ended.pop(pid, None)
            if code is not None:
                child._end(code)
            return child

    def _read(self) -> None:
        while True:
            try:
                message = self.sock.recv(REQUEST)
            except OSError:
                message = b""
            if not message:
                break
            kind, *numbers = message.split()
            if kind == b"S":
                self._replies.put(int(numbers[0]))
            elif kind == b"E":
                pid, code = int(numbers[0]), int(numbers[1])
                with self._state:
                    child = self._children.pop(pid, None)
                    if child is None:
                        self._ended[pid] = code
                if child is not None:
                    child._end(code)
        self.broken = True
        self._replies.put(-1)
        if not self.closing:
            log.error("the zygote (pid %d) is gone: child processes start as new "
                      "interpreters", self.zygote)


_channel: _Channel | None = None


class _Zygote:
    """The zygote's loop: requests in, children forked, their exits reported."""

    def __init__(self, daemon: socket.socket) -> None:
        self.daemon = daemon
        self.channels: dict[int, socket.socket] = {daemon.fileno(): daemon}
        self.owner: dict[int, socket.socket] = {}  # child pid -> the channel it was asked on
        self.wakeup_r, self.wakeup_w = os.pipe()

    def run(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ends with the daemon
        with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
            comm.write(NAME)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select
        while True:
            readable = select.select([self.wakeup_r, *self.channels], [], [])[0]
            for fd in readable:
                if fd == self.wakeup_r:
                    os.read(self.wakeup_r, 512)
                elif not self._request(self.channels[fd]):
                    return
            self._reap()

    def _request(self, channel: socket.socket) -> bool:
        """Serve one request from ``channel``; False when the daemon's channel closed."""
        try:
            message, fds, _, _ = socket.recv_fds(channel, REQUEST, 1)
        except OSError:
            message, fds = b"", []
        if not message or not fds:
            for fd in fds:
                os.close(fd)
            if channel is self.daemon:
                return False
            del self.channels[channel.fileno()]
            channel.close()
            return True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:
            ours.close()
            self._child(theirs, fds[0], int(message))
        theirs.close()
        os.close(fds[0])
        if pid > 0:
            self.channels[ours.fileno()] = ours
            self.owner[pid] = channel
        else:
            ours.close()
        with contextlib.suppress(OSError):
            channel.send(b"S %d" % pid)
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            channel = self.owner.pop(pid, None)
            if channel is not None and channel.fileno() >= 0:
                with contextlib.suppress(OSError):
                    channel.send(b"E %d %d" % (pid, os.waitstatus_to_exitcode(status)))

    def _child(self, channel: socket.socket, fd: int, nice: int) -> None:
        """In the forked child: back to a plain process, then its work."""
        global _channel
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            for other in self.channels.values():
                other.close()
            _channel = _Channel(channel, 0)
            with contextlib.suppress(OSError):
                os.nice(nice - os.nice(0))
            conn = multiprocessing.connection.Connection(fd)
            target, args = conn.recv()
            target(conn, *args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


# What a worker process runs first: the daemon's sys.path, then its work, from the pipe.
_BOOT = """\
import os, sys
from multiprocessing.connection import Connection
if sys.argv[2] != "0":
    try:
        os.nice(int(sys.argv[2]))
    except OSError:
        pass
conn = Connection(int(sys.argv[1]))
sys.path[:] = conn.recv()
target, args = conn.recv()
del os, sys, Connection
target(conn, *args)
"""


class Interpreter:
    """A child started as a fresh interpreter: what the pools need of
    multiprocessing.Process."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while it runs; negative: the signal that ended it."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)


Process = Interpreter | Forked


def spawn(target: Callable[..., None], *args: Any, nice: int = 0
          ) -> tuple[Process, multiprocessing.connection.Connection]:
    """A child process that runs ``target(conn, *args)`` (``target`` module-level,
    ``args`` picklable) with ``conn`` its end of the pipe returned here, ``nice``
    lower in priority than this process from its start.  Forked by the zygote when
    this process has one (gateway.zygote), else a fresh interpreter.  Blocks until
    the child has its work: call it from a thread, not the loop."""
    ours, theirs = multiprocessing.connection.Pipe()
    process: Process
    try:
        if running():
            process = fork(theirs.fileno(), nice)
        else:
            process = Interpreter(subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(theirs.fileno()), str(nice)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL))
            ours.send(sys.path)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        ours.send((target, args))
    except BaseException:
        process.kill()
        process.join(5)
        ours.close()
        raise
    return process, ours

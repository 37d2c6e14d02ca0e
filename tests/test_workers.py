"""Worker processes: calls run in them, and when one fails a call, dies or hangs, the
call still completes (in the daemon) and the process is replaced.  Then the gateway
itself: its worker processes killed, inbound mail is still checked and copies signed."""

from __future__ import annotations

import asyncio
import itertools
import os
import pickle
import signal
import time
from pathlib import Path

import dkim
import pytest

from gateway.auth.dmarc import DMARCResult
from gateway.auth.inbound import ARCResult, AuthResults
from gateway.auth.spf import SPFResult
from gateway.auth.verify import DKIMResult
from gateway.auth.work import AuthCalls, AuthWork
from gateway.workers import Overran, WorkerPool
from tests.conftest import gateway_with_rules, wait_for
from tests.dns_server import ZoneServer, txt
from tests.test_arc import dns_lookup, signing_key
from tests.test_dkim import keygen
from tests.test_srs import FORWARD_RULES
from tests.worker_calls import (
    Picky,
    Unloadable,
    Unreadable,
    die_unless_in,
    hang_unless_in,
    refuse,
    reverse,
    send_unreadable,
    span,
    whoami,
)

pytestmark = pytest.mark.sqlite_only  # the process pool does not touch the database



def run(size: int, calls, timeout: float = 30.0, threads: int = 2):
    async def main():
        pool = WorkerPool("test", size, threads, "the context", timeout)
        await pool.start()
        try:
            return await calls(pool), [c.process for c in pool._children]
        finally:
            await pool.close()

    return asyncio.run(main())


def test_calls_run_in_the_worker_processes_with_their_context():
    async def calls(pool):
        return await asyncio.gather(*(pool.run(whoami, n) for n in range(20)))

    results, processes = run(2, calls)
    assert [x for _, _, x in results] == list(range(20))
    assert {c for _, c, _ in results} == {"the context"}
    pids = {pid for pid, _, _ in results}
    assert os.getpid() not in pids
    assert pids <= {p.pid for p in processes}
    comm = Path(f"/proc/{processes[0].pid}/comm")
    if comm.exists():
        assert comm.read_text().strip() == "mailflowr-test"


def test_without_processes_calls_run_in_the_daemon():
    async def calls(pool):
        return await pool.run(whoami, 7)

    (pid, context, x), processes = run(0, calls)
    assert (pid, context, x, processes) == (os.getpid(), "the context", 7, [])


def test_a_call_that_raises_raises_its_own_error(caplog):
    async def calls(pool):
        with pytest.raises(ValueError, match="not this one"):
            await pool.run(refuse)
        return await pool.run(whoami, 1)

    (pid, _, _), processes = run(1, calls)
    assert pid == processes[0].pid  # the process that failed the call still serves
    assert "refuse: ValueError: not this one; running it in the daemon" in caplog.text


def test_a_process_that_dies_is_replaced_and_its_call_completes(caplog):
    async def calls(pool):
        first = pool._children[0].process
        answer = await pool.run(die_unless_in, os.getpid())
        first.join(5)
        await wait_for_children(pool, 1)
        after = await pool.run(whoami, 2)
        return answer, first, after

    (answer, first, (pid, _, _)), processes = run(1, calls)
    assert answer == "answered in the daemon"
    assert first.exitcode == 3
    assert pid == processes[0].pid != first.pid
    assert "test process ended (exit code 3); starting another" in caplog.text


def test_a_call_that_overruns_has_its_process_replaced(caplog):
    async def calls(pool):
        first = pool._children[0].process
        started = time.monotonic()
        answer = await pool.run(hang_unless_in, os.getpid())
        took = time.monotonic() - started
        await wait_for_children(pool, 1, not_pid=first.pid)
        return answer, took, first, await pool.run(whoami, 3)

    (answer, took, first, (pid, _, _)), processes = run(1, calls, timeout=1.0)
    assert answer == "answered in the daemon"
    assert took < 10
    assert not first.is_alive()
    assert pid == processes[0].pid != first.pid
    assert "a call ran longer than 1 s; replacing its process" in caplog.text


def test_calls_and_results_larger_than_the_pipe_arrive_whole():
    """Megabytes each way, several calls at once: the loop writes each call as the pipe
    drains and puts each result together from many reads, none mixed with another."""
    payloads = [os.urandom(size) for size in (3, 70_000, 3 << 20, 9 << 20, 65_536)]

    async def calls(pool):
        return await asyncio.gather(*(pool.run(reverse, p) for p in payloads))

    results, processes = run(1, calls)
    assert [data for _, data in results] == [p[::-1] for p in payloads]
    assert {pid for pid, _ in results} == {processes[0].pid}


def test_a_result_that_cannot_be_read_replaces_the_process(caplog):
    async def calls(pool):
        first = pool._children[0].process
        answer = await pool.run(send_unreadable)
        await wait_for_children(pool, 1, not_pid=first.pid)
        return answer, first, await pool.run(whoami, 4)

    (answer, first, (pid, _, x)), processes = run(1, calls)
    assert isinstance(answer, Unreadable)  # run again in the daemon, where it needs no pipe
    assert not first.is_alive()
    assert (pid, x) == (processes[0].pid, 4) and pid != first.pid
    assert "test process sent a result that could not be read; replacing it" in caplog.text


def test_calls_alone_take_turns_in_a_process_beside_other_calls():
    """One run_alone() call at a time in a process; ordinary calls go on beside it."""
    async def calls(pool):
        alone = [pool.run_alone(span, 0.3, bound=10) for _ in range(3)]
        beside = [pool.run(span, 0.3) for _ in range(3)]
        return await asyncio.gather(*alone), await asyncio.gather(*beside)

    (alone, beside), processes = run(1, calls, threads=4)
    assert {pid for pid, _, _ in alone + beside} == {processes[0].pid}
    turns = sorted((start, end) for _, start, end in alone)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(turns))
    together = sorted((start, end) for _, start, end in beside)
    assert together[-1][0] < together[0][1]  # the ordinary ones did overlap


def test_an_idle_pool_exits_and_the_next_call_has_it_started_again():
    """Processes exit only once none of the pool has had a call for max_idle (a light
    load that keeps one busy keeps both); the next call, alone or not, is answered by
    a new process, not the daemon, and every slot is started again."""
    async def calls(pool):
        first = [c.process for c in pool._children]
        await pool.run(span, 1.5)  # longer than max_idle: not retired while it runs
        for _ in range(15):  # a call every 0.1 s: the pool is never idle as a whole
            await pool.run(whoami, 0)
            await asyncio.sleep(0.1)
        assert [c.process for c in pool._children] == first
        await wait_until(lambda: not any(p.is_alive() for p in first), 10)
        assert pool._children == []
        alone, _, _ = await pool.run_alone(span, 0.0, bound=10)
        await wait_until(lambda: len(pool._children) == 2, 10)
        second = [c.process for c in pool._children]
        await wait_until(lambda: not any(p.is_alive() for p in second), 10)
        third, _, _ = await pool.run(span, 0.0)
        await wait_until(lambda: len(pool._children) == 2, 10)
        return first, alone, second, third

    first, alone, second, third = asyncio.run(with_pool(2, 1.0, calls))
    assert alone in {p.pid for p in second}
    pids = {p.pid for p in first} | {p.pid for p in second} | {third, os.getpid()}
    assert len(pids) == 6


def test_a_process_retired_with_an_abandoned_call_in_hand_is_killed_at_close():
    """A caller that gave up leaves its call running in the process; the pool goes idle
    and its process is told to exit, which it cannot while the call runs: close()
    kills it rather than leave it behind."""
    async def calls(pool):
        [process] = [c.process for c in pool._children]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.run(span, 30), 0.2)
        await wait_until(lambda: pool._children == [], 5)
        assert process.is_alive()
        await pool.close()
        return process

    process = asyncio.run(with_pool(1, 0.3, calls))
    assert not process.is_alive()


async def with_pool(size: int, max_idle: float, calls):
    pool = WorkerPool("test", size, 2, "the context", 30.0, max_idle=max_idle)
    await pool.start()
    try:
        return await calls(pool)
    finally:
        await pool.close()


async def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_a_call_alone_that_overruns_fails_alone(caplog):
    """Its process is killed: the call raises Overran, never runs in the daemon; an
    ordinary call that was in hand there finishes in the daemon."""
    async def calls(pool):
        first = pool._children[0].process
        beside = asyncio.create_task(pool.run(hang_unless_in, os.getpid()))
        await asyncio.sleep(0.2)
        with pytest.raises(Overran, match=r"longer than 0\.5 s"):
            await pool.run_alone(hang_unless_in, -1, bound=0.5)
        answer = await beside
        await wait_for_children(pool, 1, not_pid=first.pid)
        after = await pool.run_alone(whoami, 4, bound=10)
        return answer, first, after

    (answer, first, (pid, _, x)), processes = run(1, calls, threads=4)
    assert answer == "answered in the daemon"
    assert not first.is_alive()
    assert (pid, x) == (processes[0].pid, 4) and pid != first.pid
    assert "hang_unless_in: test process ended (exit code -9); running it in the daemon" \
        in caplog.text


def test_checks_of_several_messages_go_in_one_call_and_an_error_stays_with_its_message():
    async def main():
        pool = WorkerPool("test", 1, 2, AuthWork(Picky()), 30.0)  # type: ignore[arg-type]
        await pool.start()
        try:
            results = await AuthCalls(pool, 1).check_many(
                [(raw, "a@sender.test", "mx.sender.test", "192.0.2.1")
                 for raw in (b"one", b"boom", b"two")])
            return results, pool._children[0].process.pid
        finally:
            await pool.close()

    results, pid = asyncio.run(main())
    assert [r for r, _ in results] == [(pid, b"one"), "ValueError: no checks for this one",
                                       (pid, b"two")]
    assert all(seconds >= 0 for _, seconds in results)


def test_a_process_that_cannot_start_is_restarted_after_growing_pauses(caplog):
    async def main():
        pool = WorkerPool("test", 1, 1, Unloadable(), 30.0)
        await pool.start()
        try:
            started = time.monotonic()
            answers = []
            while time.monotonic() - started < 4:
                answers.append(await pool.run(whoami, 1))
                await asyncio.sleep(0.05)
            return answers
        finally:
            await pool.close()

    answers = asyncio.run(main())
    assert answers and all(pid == os.getpid() for pid, _, _ in answers)  # done in the daemon
    ended = caplog.text.count("test process ended (exit code 1); starting another")
    assert 1 <= ended <= 3  # not a busy loop: restarted after 2 s, then 4 s
    assert "test process ended (exit code 1); starting another in 2 s" in caplog.text


async def wait_for_children(pool: WorkerPool, count: int, not_pid: int | None = None) -> None:
    for _ in range(300):
        alive = [c for c in pool._children if c.process.pid != not_pid]
        if len(alive) == count and all(c.process.is_alive() for c in alive):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {count} live worker processes")


def descendants(pid: int, name: str) -> list[int]:
    """Processes named ``name`` among the children of ``pid`` and theirs."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            names[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue
        parents[int(entry.name)] = int(status.split("\nPPid:\t", 1)[1].split("\n", 1)[0])

    def under(child: int) -> bool:
        while child in parents and parents[child] > 1:
            child = parents[child]
            if child == pid:
                return True
        return False

    return [p for p, comm in names.items() if comm == name and under(p)]


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("workers", [0, 2])
def test_inbound_checks_and_copy_signatures_survive_killed_worker_processes(
        make_gateway, tmp_path, relay, workers):
    """auth.workers 0: the checks run in the pipeline process, and the one worker
    process only parses; 2: two processes do both.  All of them killed, nothing is
    missed."""
    key_dir = tmp_path / "keys"
    key_dir.mkdir()
    key_file, record = keygen(key_dir, "acme.test", "s1")
    author = signing_key("sender.test", "ext")
    zone = ZoneServer({("s1._domainkey.acme.test", "TXT"): txt(record),
                       (author.record_name, "TXT"): txt(author.dns_record()),
                       ("sender.test", "TXT"): txt("v=spf1 ip4:127.0.0.0/8 -all")})
    gw = gateway_with_rules(make_gateway, tmp_path, relay, FORWARD_RULES, {
        "delivery": {"dns_servers": [zone.address], "dns_timeout": "3s"},
        "dkim": {"keys": [{"domain": "acme.test", "selector": "s1", "key_file": str(key_file)}]},
        "auth": {"workers": workers},
    })
    processes = max(workers, 1)  # pipeline.parse_workers is 1

    def worker_processes() -> list[int]:
        assert gw.proc is not None
        found = descendants(gw.proc.pid, "mailflowr-work")
        return found if len(found) == processes else []

    try:
        killed = wait_for(worker_processes, what="the worker processes")
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        body = (b"From: Alice <alice@sender.test>\r\nTo: support@acme.test\r\n"
                b"Subject: checked and signed\r\nDate: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
                b"\r\nThe body.\r\n")
        original = dkim.sign(body, b"ext", b"sender.test", author.private) + body
        with gw.smtp() as s:
            s.sendmail("alice@sender.test", ["support@acme.test"], original)
        copy = relay.wait(1)[0].data
        row = gw.wait_processed(1)[0]
        assert row["parse_failed"] is False and row["subject"] == "checked and signed"
        results = row["auth_results"]
        assert results["dkim"][0]["result"] == "pass"
        assert results["spf"]["result"] == "pass"
        lookup = dns_lookup({author.record_name: author.dns_record(),
                             "s1._domainkey.acme.test": record})
        cv, sets, reason = dkim.arc_verify(copy, dnsfunc=lookup)
        assert (cv, len(sets)) == (b"pass", 1), reason
        assert dkim.DKIM(copy).verify(idx=0, dnsfunc=lookup)  # ours, on top
        assert "work process ended (exit code -9); starting another" in gw.log()
        replaced = wait_for(worker_processes, what="new worker processes")
        assert not set(replaced) & set(killed)
    finally:
        zone.stop()


def test_authentication_results_cross_to_the_daemon_whole():
    """The result classes pickle as their field values (``workers.by_value``): every
    field, nested ones too, comes back equal, defaults and all."""
    full = AuthResults(
        (DKIMResult("pass", "a.test", "s1", "rsa-sha256", "", "abcdefgh"),
         DKIMResult("fail", "b.test", reason="body hash did not verify")),
        SPFResult("softfail", "mailfrom", "a.test", "~all"),
        DMARCResult("fail", "a.test", "reject", "reject", "no aligned pass"),
        ARCResult("pass"))
    for results in (full, AuthResults()):
        back = pickle.loads(pickle.dumps(results))
        assert back == results and type(back) is AuthResults
        assert back.header("mx.test") == results.header("mx.test")


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[16])


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="needs Linux /proc")
def test_processing_runs_below_the_smtp_sessions_priority_and_parsing_below_that(make_gateway):
    """Under load the kernel gives the CPU to the sessions first, then to delivery, then
    to the pipeline, and last to its parsers, from their first import on."""
    gw = make_gateway()
    assert gw.proc is not None
    found = wait_for(lambda: (
        (d := descendants(gw.proc.pid, "mailflowr-deliv"))
        and (p := descendants(gw.proc.pid, "mailflowr-pipe"))
        and (w := descendants(gw.proc.pid, "mailflowr-work")) and (d, p, w)),
        what="the daemon's processes")
    delivery, pipeline, workers = found
    base = _nice(gw.proc.pid)
    assert [_nice(pid) - base for pid in delivery] == [0]
    assert [_nice(pid) - base for pid in pipeline] == [5]
    assert [_nice(pid) - base for pid in workers] == [15]

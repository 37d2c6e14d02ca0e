"""Several daemons on one PostgreSQL: shared work, each piece done once, kill -9 survived;
one daemon under a burst: accepting first, processing right after."""

from __future__ import annotations

import asyncio
import random
import smtplib
import socket
import threading
import time

import pytest
from sqlalchemy import update

from gateway.pipeline.flow import BUSY, Bursts, InFlow, LoopLoad
from gateway.pipeline.worker import holdback
from gateway.records import AttemptResult
from gateway.store import database
from gateway.store.models import deliveries
from gateway.store.repository import Store
from tests.conftest import (
    _merge,
    free_port,
    gateway_with_rules,
    metrics_port,
    samples,
    simple_message,
    value,
    wait_for,
)
from tests.load import Load

RULES = """
tenants:
  acme:
    rules:
      - name: archive
        match: {recipient: "support@acme.test"}
        actions: {bcc: [archive@vault.test]}
"""


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_three_instances_under_load_survive_a_kill_9(make_gateway, tmp_path, relay, backend):
    """Three daemons accept side by side; one is killed while every instance has copies
    in flight (held by the downstream server before any message data went out). The two
    left take over its leases: every message answered 250 is stored and processed, and
    every copy arrives exactly once."""
    lease = {"lease_time": "4s"}
    first = gateway_with_rules(make_gateway, tmp_path, relay, RULES, {
        "smtp": {"max_connections_per_ip": 200},
        "pipeline": lease,
        "delivery": {**lease, "concurrency": 4, "timeout": "30s", "retry_base": "1s"},
    })
    config = _merge(first.config, {"metrics": {"listen": None}})
    victim, third = (make_gateway(config, db_url=first.db_url) for _ in range(2))
    ports = [first.port, victim.port, third.port]
    with Load(ports, clients=9, rcpt=lambda n: "support@acme.test") as load:
        load.wait(150, timeout=60)
        relay.handler.hold = True
        # 3 x 4: every instance has all its delivery slots waiting on the server
        wait_for(lambda: relay.handler.held >= 12, timeout=30, what="12 held copies")
        victim.kill()
        time.sleep(0.5)
        relay.handler.hold = False
        load.wait(len(load.acked) + 100, timeout=60)  # the two left go on accepting
    acked = load.acked
    assert all(load.by_port[p] > 0 for p in ports), load.by_port
    assert relay.handler.cut >= 4, "the kill cut none of the victim's deliveries"

    def settled():
        rows = first.messages()
        return rows if all(r["status"] == "processed" for r in rows) else None

    rows = wait_for(settled, timeout=90, what="every message processed")
    stored = [r["subject"] for r in rows]
    assert len(stored) == len(set(stored))
    assert acked - set(stored) == set(), "acknowledged but not stored"
    # A message committed just before the kill but not answered is stored and handled too.
    wait_for(lambda: len(relay.messages) >= len(stored), timeout=90, what="every copy")
    time.sleep(2)  # a duplicate would arrive by now
    copies = [m.headers["Subject"] for m in relay.messages]
    assert sorted(copies) == sorted(stored)
    deliveries = first.store.list_deliveries()
    assert len(deliveries) == len(stored)
    assert {d["status"] for d in deliveries} == {"sent"}
    for gw in (first, third):
        assert " delivered queue_id=" in gw.log()


RULES_TWO_COPIES = """
tenants:
  acme:
    rules:
      - name: copies
        match: {recipient: "support@acme.test"}
        actions: {cc: [cc@vault.test], bcc: [archive@vault.test]}
"""


def _deadlocks(gw) -> int:
    with gw.store.engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        return conn.exec_driver_sql(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).scalar_one()


def _two_daemons(make_gateway, tmp_path, relay, lease: str, concurrency: int):
    """Two daemons on one database, a Cc and a Bcc copy of each message, short leases."""
    leases = {"lease_time": lease}
    first = gateway_with_rules(make_gateway, tmp_path, relay, RULES_TWO_COPIES, {
        "smtp": {"max_connections_per_ip": 200},
        "pipeline": leases,
        "delivery": {**leases, "concurrency": concurrency},
    })
    second = make_gateway(_merge(first.config, {"metrics": {"listen": None}}),
                          db_url=first.db_url)
    return first, second


def _all_sent(gw, at_least: int) -> list:
    """The deliveries, once there are ``at_least`` of them and every one is sent."""
    def settled():
        ds = gw.store.list_deliveries()
        done = len(ds) >= at_least and all(d["status"] == "sent" for d in ds)
        return ds if done else None

    return wait_for(settled, timeout=120, what="every copy sent")


def _assert_no_deadlock(first, before: int, daemons) -> None:
    """None in PostgreSQL's statistics since ``before``, none in the daemons' logs."""
    assert _deadlocks(first) - before == 0
    for gw in daemons:
        assert "deadlock" not in gw.log().lower()


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_instances_renewing_short_leases_under_load_never_deadlock(make_gateway, tmp_path,
                                                                    relay, backend):
    """Two daemons on one PostgreSQL with leases of 1 s (renewed every third of a
    second) accept, process and deliver two copies of each message while the
    downstream server takes its time: renewals and the recording of results touch
    the same rows side by side, and PostgreSQL finds no deadlock between them."""
    relay.handler.delay = 0.1
    first, second = _two_daemons(make_gateway, tmp_path, relay, "1s", 50)
    before = _deadlocks(first)
    with Load([first.port, second.port], clients=8, rcpt=lambda n: "support@acme.test") as load:
        load.wait(800, timeout=120)
    assert len(_all_sent(first, 2 * len(load.acked))) == 2 * len(load.acked)
    time.sleep(1.5)  # PostgreSQL's statistics are flushed about once a second
    _assert_no_deadlock(first, before, (first, second))


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_an_instance_killed_mid_flow_resends_at_most_what_it_held(make_gateway, tmp_path,
                                                                 relay, backend):
    """Two daemons take a steady flow (about 100 messages/s) and deliver two copies of
    each; one is killed with SIGKILL (its delivery process with it) a third of the way
    and started again, 10 ms after the downstream server took a copy.  Every message
    answered 250 is stored once and both its copies arrive; no copy whose 250 the dead
    one had read (written down in its journal) is sent again; one whose 250 was on its
    way may be (the window SMTP leaves open), never more than it had in hand
    (delivery.concurrency: how often that happens is bench/kill.py's to measure);
    PostgreSQL finds no deadlock."""
    # leases longer than a restart takes on a loaded machine (the lease left at the kill
    # is at least two thirds of it): the restart reads the journal before the other
    # instance may take the dead one's copies over; with 10 s a restart beside another
    # test's load once came too late
    first, victim = _two_daemons(make_gateway, tmp_path, relay, "30s", 10)
    before = _deadlocks(first)
    with Load([first.port, victim.port], clients=8, rcpt=lambda n: "support@acme.test",
              pace=0.07) as load:
        load.wait(500, timeout=60)
        wait_for(lambda: len(relay.messages) > 200, timeout=60, what="copies flowing")
        # 10 ms after the downstream server took a copy: inside the window between the
        # 250s of a group and the commit of their results, which the journal closes
        taken = len(relay.messages)
        deadline = time.monotonic() + 10
        while len(relay.messages) == taken and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.01)
        victim.kill()
        # what its delivery process had written down as taken by the relay
        journaled = {int(line) for path in (victim.directory / "var" / "journal").iterdir()
                     for line in path.read_bytes().split()}
        time.sleep(0.5)
        victim.start()
        load.wait(1500, timeout=120)
    acked = load.acked
    assert all(load.by_port.values()), load.by_port
    _all_sent(first, 2 * len(acked))  # and of messages stored but cut before their 250
    time.sleep(1.5)  # a copy sent twice would be in by now; the statistics flushed
    stored = [r["subject"] for r in first.messages()]
    assert len(stored) == len(set(stored)), "a message stored twice"
    assert acked <= set(stored), "acknowledged but not stored"
    copies: dict[tuple[str, str], int] = {}
    for m in relay.messages:
        for rcpt in m.rcpt_tos:
            key = (m.headers["Subject"], rcpt)
            copies[key] = copies.get(key, 0) + 1
    wanted = {(s, r) for s in stored for r in ("cc@vault.test", "archive@vault.test")}
    assert wanted - set(copies) == set(), "copies missing"
    # a copy its journal listed is never sent again (the restart recorded it); one whose
    # 250 was on its way at the kill may be, never more than the dead one had in hand
    subject = {r["id"]: r["subject"] for r in first.messages()}
    listed = {(subject[d["message_id"]], d["recipient"])
              for d in first.store.list_deliveries() if d["id"] in journaled}
    assert journaled and len(listed) == len(journaled)
    assert {key: copies[key] for key in listed if copies[key] > 1} == {}
    twice = sum(n - 1 for n in copies.values())
    assert twice <= 10, f"{twice} copies sent twice: more than the killed daemon held"
    _assert_no_deadlock(first, before, (first, victim))


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_renewing_leases_beside_recording_results_never_deadlocks(make_gateway, tmp_path,
                                                                  relay, backend):
    """A delivery queue renews the leases of all the copies in hand in one statement
    while another thread records the results of those that finished, in the order they
    finished.  Both hammered on the same 60 rows for 3 s: PostgreSQL finds no deadlock
    (before the rows were locked in one order, it found some in every such run)."""
    relay.handler.mode = "tempfail"  # the copies stay pending: rows to work on
    gw = gateway_with_rules(make_gateway, tmp_path, relay, RULES_TWO_COPIES)
    with gw.smtp() as s:
        for n in range(30):
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message(subject=f"d{n}"))
    wait_for(lambda: len(gw.store.list_deliveries()) >= 60, what="60 copies planned")
    gw.terminate()
    ids = [d["id"] for d in gw.store.list_deliveries()]
    renewer, recorder = (Store(database.create(gw.db_url, pool_size=2)) for _ in range(2))
    before = _deadlocks(gw)
    stop = time.monotonic() + 3
    errors: list[Exception] = []

    def renew() -> None:
        while time.monotonic() < stop:
            try:
                renewer.renew_leases("deliveries", "me", ids, 60)
            except Exception as exc:
                errors.append(exc)

    def record() -> None:
        shuffled = random.Random(7)
        while time.monotonic() < stop:
            with recorder.engine.begin() as conn:  # claimed again, as the queue would
                conn.execute(update(deliveries).values(lease_owner="me", status="pending"))
            order = ids[:]
            shuffled.shuffle(order)
            for start in range(0, len(order), 10):
                try:
                    recorder.delivery_results(
                        "me", [AttemptResult(i, "pending") for i in order[start:start + 10]])
                except Exception as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=renew), threading.Thread(target=record)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    renewer.engine.dispose()
    recorder.engine.dispose()
    time.sleep(1.5)  # PostgreSQL's statistics are flushed about once a second
    assert errors == []
    assert _deadlocks(gw) - before == 0


def test_a_pipeline_step_slower_than_its_lease_keeps_the_claim(make_gateway):
    """The inbound checks wait on a DNS server that never answers (2 x 2.5 s); the
    lease is 1 s.  The claim is renewed meanwhile: another instance claiming then gets
    nothing, and the message is processed once, on its first attempt."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        gw = make_gateway({
            "pipeline": {"lease_time": "1s"},
            "delivery": {"dns_servers": [f"127.0.0.1:{silent.getsockname()[1]}"],
                         "dns_timeout": "2.5s"},
        })
        with gw.smtp() as s:
            s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
        wait_for(lambda: gw.messages()[0]["lease_owner"] is not None, what="the claim")
        started = time.monotonic()
        while gw.messages()[0]["status"] == "received":
            assert gw.store.claim("other-host:1", 10, 60) == []
            time.sleep(0.2)
        slow = time.monotonic() - started
    row = gw.messages()[0]
    assert slow > 3.0, f"the checks took {slow:.1f} s: the lease was never at risk"
    assert (row["status"], row["attempts"], row["lease_owner"]) == ("processed", 1, None)
    assert "spf=temperror" in (row["auth_header"] or ""), row["auth_header"]


def test_the_next_claim_waits_for_a_burst_to_end_up_to_the_burst_delay():
    # work left from before (a restart, another instance): taken at once
    assert holdback(now=100.0, backlog_since=None, burst_delay=5) == 0
    # the backlog began a second ago: at most four more seconds
    assert holdback(100.0, backlog_since=99.0, burst_delay=5) == pytest.approx(4.0)
    # the backlog began burst_delay ago: no more waiting
    assert holdback(104.0, 99.0, 5) == 0
    assert holdback(103.99, 99.0, 5) == pytest.approx(0.01)
    # 0 turns the wait off
    assert holdback(100.0, 100.0, 0) == 0


def test_a_burst_is_commits_of_new_mail_while_the_loop_is_busy_and_ends_after_busy_seconds():
    """The main process tells the pipeline's process when a burst begins and ends:
    it begins with a commit while the loop is busy, and ends BUSY seconds after the
    last commit, or when the loop is no longer busy."""
    async def scenario():
        told = []
        bursts = Bursts(0.5, told.append)
        bursts.load.busy = lambda: busy  # the loop's load, as LoopLoad would measure it
        busy = 0.2
        bursts.start()
        bursts.committed()  # mail while the loop has time to spare: a flow, not a burst
        busy = 0.9
        await asyncio.sleep(BUSY * 2)
        assert told == []
        for _ in range(5):  # commits closer together than BUSY, the loop busy
            bursts.committed()
            await asyncio.sleep(BUSY / 5)
        assert told == [True]
        await asyncio.sleep(BUSY * 2)  # no commit for BUSY seconds: it ended
        assert told == [True, False]
        bursts.committed()
        assert told == [True, False, True]
        busy = 0.1  # the loop is no longer busy: ended at the next reading
        await asyncio.sleep(0.3)
        assert told == [True, False, True, False]
        bursts.stop()

    asyncio.run(scenario())


PROCESSED = "mailflowr_gateway_pipeline_messages_total"
HELD_BACK = "mailflowr_gateway_pipeline_held_back_seconds_total"


def _processed_one(gw):
    """One message sent and processed: the pipeline's process is up and idle."""
    with smtplib.SMTP("127.0.0.1", gw.port) as s:
        s.sendmail("a@sender.test", ["support@globex.test"], simple_message())
    gw.wait_processed(1)


def _counters(gw):
    v = samples(metrics_port(gw))[1]
    return value(v, PROCESSED, tenant="globex", outcome="processed"), value(v, HELD_BACK)


@pytest.mark.sqlite_only
def test_a_burst_is_processed_when_it_pauses(make_gateway):
    """Four sessions send without a pause for three seconds: the pipeline waits for them
    most of that time (burst_delay is far away), then processes everything at once
    when the sending stops."""
    gw = make_gateway({"pipeline": {"burst_delay": "60s", "burst_load": 0},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"}})
    _processed_one(gw)
    with Load(gw.port, clients=4) as load:
        load.wait(10, timeout=30)
        time.sleep(3)
        during = _counters(gw)
    assert during[1] >= 1.5, f"held back {during[1]:.2f} s of a 3 s burst"
    assert during[0] < len(load.acked) / 2, during
    started = time.monotonic()
    rows = gw.wait_processed(len(load.acked) + 1, timeout=30)
    assert time.monotonic() - started < 20  # long before the 60 s bound
    assert {r["subject"] for r in rows if r["status"] == "processed"} >= load.acked


@pytest.mark.sqlite_only
def test_under_load_that_goes_on_processing_starts_after_the_burst_delay(make_gateway):
    """The same sessions with burst_delay 1 s: messages are processed while the load
    still goes on, once the oldest has waited that long."""
    gw = make_gateway({"pipeline": {"burst_delay": "1s", "burst_load": 0},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"}})
    _processed_one(gw)
    with Load(gw.port, clients=4) as load:
        load.wait(10, timeout=30)
        _, held = wait_for(lambda: (c := _counters(gw))[0] >= 10 and c, timeout=20,
                           what="messages processed while the load goes on")
        still = len(load.acked)
        load.wait(still + 10, timeout=30)  # and the sessions were accepted meanwhile
    assert held > 0, "the pipeline never waited for the sessions"
    gw.wait_processed(len(load.acked) + 1, timeout=30)


@pytest.mark.sqlite_only
def test_mail_at_a_pace_the_loop_keeps_up_with_is_processed_as_it_comes(make_gateway):
    """Eight sessions that each send a message every 0.05 s (some 140 msgs/s) commit new
    mail far more often than every BUSY seconds, but leave the loop time to spare: a
    flow, not a burst.  It is processed as it comes, although burst_delay (60 s) would
    hold a burst back that long."""
    gw = make_gateway({"pipeline": {"burst_delay": "60s"},
                       "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"}})
    _processed_one(gw)  # the pipeline's process has started: its start-up is not "behind"
    with Load(gw.port, clients=8, pace=0.05) as load:
        load.wait(20, timeout=30)
        time.sleep(4)
        processed, held = _counters(gw)
        acked = len(load.acked)
    assert processed >= acked * 0.8, f"{processed} of {acked} processed while they came"
    assert held < 1, f"held back {held:.2f} s of a steady flow"


def test_the_loop_load_is_the_share_of_time_its_thread_works():
    async def scenario():
        load = LoopLoad()
        load.start()
        assert load.busy() == 0.0  # one reading: nothing to say yet
        await asyncio.sleep(0.6)
        idle = load.busy()
        started, cpu = time.monotonic(), time.thread_time()
        stop = started + 0.8
        while time.monotonic() < stop:  # the loop's thread never idles
            sum(range(10_000))
            await asyncio.sleep(0)
        working = load.busy()
        # what the thread got: all of a core on an idle machine, less where other
        # processes (another test worker) take their share
        got = (time.thread_time() - cpu) / (time.monotonic() - started)
        load.stop()
        return idle, working, got

    idle, working, got = asyncio.run(scenario())
    assert idle < 0.2, idle
    assert got > 0.3, f"the test's thread got {got:.2f} of a core: too busy a machine"
    assert abs(working - got) < 0.2, (working, got)


def test_in_flow_control_lets_a_session_on_per_finished_message_or_after_the_delay():
    async def scenario():
        behind = False
        flow = InFlow(0.5, lambda: behind)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await flow.admit()  # the pipeline keeps up: no wait
        assert loop.time() - started < 0.1
        behind = True
        started = loop.time()
        await flow.admit()  # behind, nothing finished: the whole delay, then on anyway
        assert loop.time() - started >= 0.45
        waiting = [asyncio.create_task(flow.admit()) for _ in range(3)]
        await asyncio.sleep(0.05)
        flow.finished(2)  # two finished: two of the three sessions go on at once
        await asyncio.sleep(0.05)
        assert [t.done() for t in waiting] == [True, True, False]
        await waiting[2]
        flow.finished(1)  # with nobody waiting, it is a token for the next message
        started = loop.time()
        await flow.admit()
        assert loop.time() - started < 0.1

    asyncio.run(scenario())


@pytest.mark.sqlite_only
def test_under_overload_that_goes_on_new_mail_comes_at_the_pipelines_pace(make_gateway):
    """Inbound checks that wait on a DNS server that never answers make the pipeline
    far slower than four sessions sending without a pause.  Once its oldest work is
    overdue (burst_delay 0.5 s + 1 s), each new message waits at MAIL FROM for the
    pipeline to finish one, up to in_flow_delay: the backlog grows by at most one
    message per session and second, every message is still answered 250, none is
    lost."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        gw = make_gateway({
            "smtp": {"in_flow_delay": "1s"},
            "pipeline": {"burst_delay": "0.5s"},
            "delivery": {"dns_servers": [f"127.0.0.1:{silent.getsockname()[1]}"],
                         "dns_timeout": "0.5s"},
            "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
        })

        def waiting():
            return sum(r["status"] == "received" for r in gw.messages())

        with Load(gw.port, clients=4) as load:
            wait_for(lambda: value(samples(metrics_port(gw))[1],
                                   "mailflowr_gateway_smtp_in_flow_delay_seconds_total") > 0,
                     timeout=30, what="sessions waiting for the pipeline")
            before, acked = waiting(), len(load.acked)
            time.sleep(4)
            grown, sent = waiting() - before, len(load.acked) - acked
        assert grown <= 4 * 4 + 8, f"the backlog grew by {grown} in 4 s ({sent} accepted)"
        assert sent > 0, "no session got through"
        assert load.replies == []
        # most are not parsed yet (no subject to match): every 250 is a stored row
        assert len(gw.messages()) >= len(load.acked)
        gw.kill()  # a graceful stop would first work through the backlog, 0.5 s a message

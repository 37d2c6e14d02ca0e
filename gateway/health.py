"""What the daemon says about itself: /healthz, /readyz, /status, STATUS= and SIGUSR1.

``Health`` holds what the lifecycle tells it (the listeners bound, the store once
open) and what it looks at itself every few seconds (the backlog, whether the
database answers).  A heartbeat task beats every second and pings systemd's
watchdog; a stalled event loop stops both, and /healthz then says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway import __version__
from gateway.clock import utcnow
from gateway.errors import one_line
from gateway.ingress.smtp import ConnectionTracker
from gateway.metrics import Metrics
from gateway.policyset import PolicyHolder
from gateway.records import QueueStats
from gateway.sdnotify import Notifier
from gateway.store.incidents import IncidentStore
from gateway.store.repository import Store
from gateway.store.requests import RequestStore

log = logging.getLogger(__name__)

STATS_INTERVAL = 5.0  # seconds between looks at the backlog (metrics.stats_interval)
LOOP_STALL = 10.0  # seconds without a heartbeat before /healthz reports the loop stalled
PROBE_TIMEOUT = 3.0  # seconds a readiness probe waits for the database


class Health:
    def __init__(self, policies: PolicyHolder, metrics: Metrics, notifier: Notifier,
                 stopping: asyncio.Event, *,
                 reload_refused: Callable[[], tuple[list[str], datetime | None]],
                 last_sweep: Callable[[], float | None],
                 stats_interval: float = STATS_INTERVAL) -> None:
        self.policies = policies
        self.stats_interval = stats_interval
        self.metrics = metrics
        self.notifier = notifier
        self.stopping = stopping
        self.reload_refused = reload_refused  # why the last policy reload was refused
        self.last_sweep = last_sweep
        self.started = time.time()
        self.heartbeat = time.monotonic()
        self.listening: dict[str, str] = {}  # listener name -> address, while bound
        self.trackers: dict[str, ConnectionTracker] = {}
        self.store: Store | None = None
        self.queue: QueueStats | None = None
        self.database_up = False
        self._probe = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="probe")

    def routes(self) -> dict[str, Callable[[], tuple[int, dict[str, Any]]]]:
        return {"/healthz": self.healthz, "/readyz": self.readyz, "/status": self.status}

    def close(self) -> None:
        self._probe.shutdown(wait=False, cancel_futures=True)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        """Alive: the process answers and its event loop has run in the last seconds."""
        lag = time.monotonic() - self.heartbeat
        alive = lag < LOOP_STALL
        return (200 if alive else 503), {
            "status": "ok" if alive else "event loop stalled",
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "event_loop_heartbeat_age_seconds": round(lag, 3),
        }

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """Ready: listeners bound, the database answers now, a policy set is in force."""
        listeners_ok = bool(self.listening) and not self.stopping.is_set()
        database_error = self._check_database()
        policy = self.policies.current
        checks: dict[str, dict[str, Any]] = {
            "listeners": {"ok": listeners_ok, "bound": dict(self.listening)},
            "database": {"ok": database_error is None, "error": database_error},
            "policy": {"ok": bool(policy.version), "version": policy.version},
        }
        problems, since = self.reload_refused()
        if problems:  # the last good policy serves on: ready, but say so
            checks["policy"].update(reload_refused=problems, since=_iso(since))
        ready = all(c["ok"] for c in checks.values())
        return (200 if ready else 503), {"ready": ready, "checks": checks,
                                         "degraded": self._degraded(problems, since)}

    def _degraded(self, problems: list[str], since: datetime | None) -> list[str]:
        """What works, but not as configured: a policy edit refused (the last good
        policy stays in force), since when and why."""
        if not problems:
            return []
        return [f"policy reload refused since {_iso(since)}, policy "
                f"{self.policies.current.version} stays in force: {problems[0]}"]

    def _check_database(self) -> str | None:
        store = self.store
        if store is None:
            return "not opened yet"
        try:
            self._probe.submit(store.ping).result(timeout=PROBE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            return f"no answer within {PROBE_TIMEOUT:g} s"
        except Exception as exc:  # any failure means "not reachable"; the text says which
            return one_line(exc)
        return None

    def status(self) -> tuple[int, dict[str, Any]]:
        """What `mailflowr-gateway status` prints and SIGUSR1 logs."""
        policy = self.policies.current
        problems, since = self.reload_refused()
        queue = self.queue
        last_sweep = self.last_sweep()
        deliveries: dict[str, int] = {}
        if queue is not None:
            for _, state, count, _ in queue.deliveries:
                deliveries[state] = deliveries.get(state, 0) + count
        return 200, {
            "version": __version__,
            "pid": os.getpid(),
            "started": datetime.fromtimestamp(self.started, UTC).isoformat(timespec="seconds"),
            "uptime_seconds": round(time.time() - self.started, 1),
            "state": ("stopping" if self.stopping.is_set()
                      else "running" if self.listening else "starting"),
            "listeners": {name: {"address": address,
                                 "sessions": len(self.trackers[name].sessions)}
                          for name, address in self.listening.items()},
            "database": {"up": self.database_up,
                         "name": database_name(self.store) if self.store else None},
            "degraded": self._degraded(problems, since),
            "policy": {"version": policy.version,
                       "loaded_at": policy.loaded_at.isoformat(timespec="seconds"),
                       "reload_refused": problems, "reload_refused_since": _iso(since)},
            "pipeline": {"waiting": queue.pipeline_waiting if queue else None,
                         "oldest_seconds": round(queue.pipeline_oldest, 1) if queue else None},
            "deliveries": {"pending": deliveries.get("pending", 0),
                           "held": deliveries.get("held", 0),
                           "oldest_pending_seconds": round(max(
                               (age for _, state, _, age in queue.deliveries
                                if state == "pending"), default=0.0), 1) if queue else None},
            "retention": {"last_sweep": datetime.fromtimestamp(last_sweep, UTC)
                          .isoformat(timespec="seconds") if last_sweep else None},
        }

    def status_line(self) -> str:
        """One line for systemctl status (STATUS=) and the log."""
        doc = self.status()[1]
        sessions = sum(v["sessions"] for v in doc["listeners"].values())
        where = ", ".join(v["address"] for v in doc["listeners"].values()) or "nothing"
        waiting = doc["pipeline"]["waiting"]
        return (f"{doc['state']} on {where}; {sessions} sessions; "
                f"{'?' if waiting is None else waiting} to process; "
                f"{doc['deliveries']['pending']} deliveries pending "
                f"(oldest {doc['deliveries']['oldest_pending_seconds'] or 0:.0f} s), "
                f"{doc['deliveries']['held']} held; policy {doc['policy']['version']}"
                f"{'; POLICY RELOAD REFUSED' if doc['policy']['reload_refused'] else ''}"
                f"{'' if doc['database']['up'] else '; DATABASE DOWN'}")

    def log_status(self) -> None:
        log.info("status: %s", json.dumps(self.status()[1], sort_keys=True))

    async def beat(self) -> None:
        """Beat every second; ping systemd's watchdog only while the loop beats."""
        interval = self.notifier.watchdog
        last_ping = 0.0
        while True:
            self.heartbeat = time.monotonic()
            if interval is not None and self.heartbeat - last_ping >= interval:
                self.notifier.ping()
                last_ping = self.heartbeat
            await asyncio.sleep(min(1.0, interval or 1.0))

    async def watch_stats(self) -> None:
        """Every few seconds: backlog gauges, database up or not, STATUS= for systemd."""
        store = self.store
        assert store is not None
        while True:
            try:
                self.queue = await asyncio.to_thread(_stats, store)
            except Exception as exc:  # loop boundary: the database may be away
                if self.database_up:
                    log.error("database check failed: %s", one_line(exc))
                self.database_up = False
            else:
                if not self.database_up:
                    log.info("database reachable again")
                self.database_up = True
                self.metrics.queue_levels(self.queue)
            self.metrics.database_up.set(1 if self.database_up else 0)
            self.metrics.ready.set(1 if self.database_up and self.listening
                                   and not self.stopping.is_set() else 0)
            self.notifier.status(self.status_line())
            await asyncio.sleep(self.stats_interval)


def _iso(when: datetime | None) -> str | None:
    return when.isoformat(timespec="seconds") if when else None


def _stats(store: Store) -> QueueStats:
    """The backlog, the sub-processor and breach notices not delivered, the data-subject
    requests not answered."""
    now = utcnow()
    due = IncidentStore(store).due(now)
    requests = RequestStore(store).due(now)
    return dataclasses.replace(store.queue_stats(), notices=store.undelivered_notices(now),
                               breach_notices=due.undelivered, breach_deadline=due.nearest,
                               requests_open=requests.open,
                               request_deadline=requests.nearest)


def database_name(store: Store) -> str:
    """The database without user or password: the log shows which one, not who."""
    url = store.engine.url
    if url.get_backend_name() == "sqlite":
        return f"sqlite {url.database}"
    where = f"{url.host or 'local socket'}{f':{url.port}' if url.port else ''}"
    return f"{url.get_backend_name()} {url.database} on {where}"

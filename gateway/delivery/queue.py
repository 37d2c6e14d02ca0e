"""The delivery worker: claims due deliveries, sends them, records each attempt.

Each planned copy or route is a row in ``deliveries``.  The worker claims due
rows with a lease (SKIP LOCKED on PostgreSQL, so several instances share the
queue), composes the bytes, sends, and records the result: sent; failed for a
5xx or once ``delivery.max_age`` has passed; otherwise pending again with an
exponential backoff.  With policies/subprocessors.yaml, a copy leaves only
through a relay the tenant has authorised (see gateway.policy.subprocessors).
A row that cannot go anywhere (no relay configured, a destination removed
from the configuration, no authorised subprocessor) is held with the reason,
visible in ``queue list``, until a policy reload or an operator retries it.
Keep-original jobs are deliveries too: ``keep`` relays the untouched original
to a destination by SMTP, ``append`` puts it in an IMAP folder
(gateway.delivery.imap_append); neither is signed, sealed or rewritten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from gateway import logs
from gateway.auth.signing import Protected, Signer
from gateway.auth.work import AuthCalls
from gateway.clock import utcnow
from gateway.config import GatewayConfig, KeepOriginalConfig, parse_hostport
from gateway.delivery import dsn
from gateway.delivery.compose import compose
from gateway.delivery.imap_append import Appender, AppendJob
from gateway.delivery.journal import Journal, left_behind
from gateway.delivery.mx import LookupFailed, MXResolver
from gateway.delivery.smtp import PERMANENT, SENT, TEMPORARY, Result, Sender, Target
from gateway.leases import LeaseKeeper, alive, release_dead
from gateway.metrics import Metrics
from gateway.policy.subprocessors import HELD_PREFIX, Consent
from gateway.policyset import PolicySet
from gateway.records import AttemptResult, DeliveryJob
from gateway.runner import PoolRunner
from gateway.srs import SRS
from gateway.store.models import FAILED, HELD, PENDING
from gateway.store.models import SENT as SENT_STATUS
from gateway.store.repository import Store
from gateway.workflow.actions import APPEND, KEEP

log = logging.getLogger(__name__)

HOLD_RECHECK = 600.0  # seconds between re-checks of subprocessor holds
REPLAY_CHUNK = 5000  # copies of a dead process's journal recorded per transaction
_REPLY_CODE = re.compile(r"([2-5][0-9][0-9])(?:[ -]|$)")
FORWARDED = ("cc", "bcc", "route")  # kinds that send inbound mail on: SRS and ARC apply
Content = tuple[str, bytes] | Exception  # our header fields and the original, or why not


def reply_code(detail: str) -> int | None:
    """The SMTP reply code a server's answer starts with ("451 4.3.0 ..."), or None: a
    connection refused ("127.0.0.1:25: ...") or timed out has none."""
    m = _REPLY_CODE.match(detail)
    return int(m.group(1)) if m else None


def backoff(attempts: int, base: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failure: base, 2*base, 4*base, ... max."""
    return float(min(base * (2 ** max(attempts - 1, 0)), maximum))


class DeliveryWorker(PoolRunner[DeliveryJob, AttemptResult]):
    """Sends up to ``delivery.concurrency`` deliveries at once; on stop, lets the sends
    in flight finish, records their results, and stops."""

    def __init__(self, store: Store, config: GatewayConfig, metrics: Metrics,
                 clock: Callable[[], datetime] = utcnow,
                 policies: Callable[[], PolicySet] = PolicySet,
                 signer: Callable[[], Signer] | None = None,
                 srs: Callable[[], SRS | None] = lambda: None,
                 auth: AuthCalls | None = None) -> None:
        self.store = store
        self.signer = signer  # the DKIM keys in force (SIGHUP may swap them)
        self.auth = auth  # where copies are sealed and signed (worker processes)
        self.srs = srs  # the SRS secrets in force: forwarded copies get a rewritten sender
        self.policies = policies
        self.config = config
        self.settings = config.delivery
        self.metrics = metrics
        self.clock = clock
        self.host = socket.gethostname()[:40]
        self.owner = f"{self.host}:{os.getpid()}"
        super().__init__("delivery", log,
                         LeaseKeeper(store, "deliveries", self.owner, self.settings.lease_time),
                         self.settings.poll_interval, self.settings.concurrency)
        self.sender = Sender(helo=config.smtp.hostname, reply_timeout=self.settings.timeout,
                             per_server=self.settings.connections_per_server)
        self.mx = (MXResolver(self.settings.dns_servers, self.settings.dns_timeout)
                   if self.settings.mx_lookup else None)
        self.appender = Appender(config.imap_accounts, self._keep_setting)
        self.journal = Journal(self.settings.journal, self.host)
        self._recheck = 0.0  # when held deliveries were last re-checked
        self._consent: tuple[float, Consent] | None = None
        # by message: the claimed deliveries in hand that need it, and its content
        self._contents: dict[str, tuple[int, Content | None]] = {}

    async def consent(self) -> Consent:
        """Notices and objections from the database, re-read at most every
        ``delivery.consent_refresh`` (objections are recorded by another process)."""
        now = time.monotonic()
        if self._consent is None or now - self._consent[0] > self.settings.consent_refresh:
            rows = await asyncio.to_thread(self.store.consent_rows)
            self._consent = (now, Consent.of(rows))
        return self._consent[1]

    async def close(self) -> None:
        await self.sender.close()
        await self.appender.close()
        self.journal.close()

    def _keep_setting(self, tenant: str) -> KeepOriginalConfig | None:
        settings = self.config.tenants.get(tenant)
        return settings.keep_original if settings is not None else None

    async def targets_for(self, job: DeliveryJob) -> list[Target] | Result | str:
        """Where a delivery goes (hosts in the order to try), a lookup failure as a
        Result, or, as text, why it cannot go anywhere yet (held)."""
        if job.destination is not None:
            dest = self.config.destinations.get(job.destination)
            if dest is None:
                return f"destination {job.destination!r} is not configured"
            return [Target(dest.host, dest.port, dest.tls, name=job.destination)]
        routing = self.policies().subprocessors
        if routing is not None:  # only relays the tenant has authorised, in the rule's order
            route = routing.route(job.tenant_id, job.tags, job.kind, job.recipient,
                                  await self.consent(), self.clock())
            if route.held:
                return route.held
            return [Target(sp.relay.host, sp.relay.port, sp.relay.tls, name=sp.name)
                    for sp in route.relays if sp.relay is not None]
        if self.settings.relay is not None:
            host, port = parse_hostport(self.settings.relay)
            return [Target(host, port, self.settings.relay_tls, name="relay")]
        if self.mx is None:
            return "no relay configured (delivery.relay) for copies to other domains"
        domain = job.recipient.rpartition("@")[2].lower()
        try:
            targets = []
            for host in await self.mx.hosts(domain):
                targets += [Target(ip, self.settings.mx_port, "opportunistic", verify=False)
                            for ip in await self.mx.addresses(host)]
        except LookupFailed as exc:
            return Result(PERMANENT if exc.permanent else TEMPORARY, exc.reason)
        if not targets:
            return Result(TEMPORARY, f"451 4.4.3 no address found for the MX hosts of {domain}")
        return targets

    # ------------------------------------------------------------ the runner's hooks
    async def begin(self) -> None:
        self._recheck = time.monotonic()
        await asyncio.to_thread(self._replay)
        self.journal.open()
        await release_dead(self.store, "deliveries", self.host, "delivery")

    def _replay(self) -> None:
        """Record as sent what the journals of this host's dead processes list (the
        relay took those copies), while their leases still hold: then the work that
        is freed is only what was not sent.  A journal whose copies cannot be recorded
        now (database away) is kept for the next start; the copies it lists go again."""
        me = os.getpid()  # a journal under this process's id is an earlier process's
        for pid, (ids, paths) in left_behind(self.settings.journal, self.host,
                                             lambda pid: pid != me and alive(pid)).items():
            unique = sorted(set(ids))
            try:
                saved = 0
                for start in range(0, len(unique), REPLAY_CHUNK):
                    saved += sum(self.store.delivery_results(f"{self.host}:{pid}", [
                        AttemptResult(i, SENT_STATUS, where="journal")
                        for i in unique[start:start + REPLAY_CHUNK]]))
            except Exception:  # loop boundary: the database may be away; the next start
                log.exception("delivery: recording the journal of process %d failed", pid)
                continue
            if saved:
                log.info("delivery: %d copies that process %d sent before it died recorded "
                         "from its journal", saved, pid)
            for path in paths:
                path.unlink(missing_ok=True)

    async def before_claim(self) -> None:
        if time.monotonic() - self._recheck > HOLD_RECHECK:
            self._recheck = time.monotonic()
            await self._recheck_holds()

    async def claim(self, limit: int) -> list[DeliveryJob]:
        """Due deliveries, and the content of their messages read with them: one read
        for a claim rather than one per copy."""
        known = set(self._contents)
        jobs, contents = await asyncio.to_thread(self._claim, limit, known)
        # content that was in hand at the claim but let go of meanwhile: read it now
        gone = {j.message_id for j in jobs if j.message_id in known
                and j.message_id not in self._contents}
        if gone:
            contents = {**contents, **await asyncio.to_thread(self.store.delivery_contents,
                                                              gone)}
        for job in jobs:
            held = self._contents.get(job.message_id)
            content = held[1] if held is not None else contents.get(job.message_id)
            self._contents[job.message_id] = (held[0] + 1 if held else 1, content)
        return jobs

    def _claim(self, limit: int, known: set[str]
               ) -> tuple[list[DeliveryJob], Mapping[str, Content]]:
        jobs = self.store.claim_deliveries(self.owner, limit, self.settings.lease_time)
        if not jobs:
            return jobs, {}
        return jobs, self.store.delivery_contents(
            {j.message_id for j in jobs if j.message_id not in known})

    def _content(self, job: DeliveryJob) -> Content | None:
        """A claimed delivery's content, read with its claim."""
        held = self._contents.get(job.message_id)
        return held[1] if held is not None else None

    def _done_with(self, job: DeliveryJob) -> None:
        held = self._contents.pop(job.message_id, None)
        if held is not None and held[0] > 1:
            self._contents[job.message_id] = (held[0] - 1, held[1])

    def key(self, job: DeliveryJob) -> int:
        return job.id

    async def _recheck_holds(self) -> None:
        """Copies held for want of a usable subprocessor try again now and then: an
        objection window may have ended since (other changes come with a reload)."""
        if self.policies().subprocessors is None:
            return
        try:
            count = await asyncio.to_thread(self.store.release_held, HELD_PREFIX)
        except Exception:  # loop boundary: the database may be away; next round
            log.exception("delivery: re-checking held deliveries failed")
            return
        if count:
            log.info("delivery: %d deliveries held by the subprocessor policy try again", count)

    async def process(self, job: DeliveryJob) -> AttemptResult | None:
        try:
            return await self.deliver(job)
        except Exception:  # the one catch-all per delivery: its lease will expire
            log.exception("delivery %d of %s failed unexpectedly", job.id, job.message_id)
            self.journal.recorded((job.id,))
            return None
        finally:
            self._done_with(job)

    async def record(self, group: list[tuple[DeliveryJob, AttemptResult]]) -> None:
        """Record attempt results in one transaction (raises: the group is tried again)."""
        saved = await asyncio.to_thread(self.store.delivery_results, self.owner,
                                        [r for _, r in group])
        self.journal.recorded(job.id for job, _ in group)
        for (job, result), ok in zip(group, saved, strict=True):
            if not ok:
                log.warning("delivery %d: lease lost before its result was saved", job.id)
                continue
            tenant = self.metrics.tenant(job.tenant_id)
            label = "deferred" if result.status == PENDING else result.status
            self.metrics.series(self.metrics.deliveries, tenant, job.kind, label,
                                result.where).inc()
            if result.bounce is not None:
                self.metrics.series(self.metrics.dsns, tenant).inc()

    def recorded(self, seconds: float) -> None:
        self.metrics.delivery_unrecorded.observe(seconds)

    async def deliver(self, job: DeliveryJob) -> AttemptResult:
        """Send one delivery; returns the result to record (nothing is written here)."""
        if job.kind == APPEND:  # no SMTP targets: held only when its account is gone
            targets: list[Target] | Result | str = self.appender.held(job.destination or "") or []
        else:
            targets = await self.targets_for(job)
        if isinstance(targets, str):
            self._event(job, "held", logging.WARNING, reason=targets)
            return AttemptResult(job.id, HELD, targets, where="none")
        content = self._content(job)
        if isinstance(content, Exception):
            raise content
        if content is None:
            return AttemptResult(job.id, FAILED, "the stored message is gone", where="none")
        name, host = "mx", "DNS"
        if job.kind == APPEND:  # the original, byte for byte, into the tenant's folder
            assert job.destination is not None
            name = job.destination
            account = self.config.imap_accounts[name]
            host = f"{account.host}:{account.server_port}"
            started = time.monotonic()
            result = await self.appender.append(job.tenant_id, AppendJob(
                name, job.recipient, content[1], job.header_message_id,
                look_first=job.interrupted))
            self.metrics.series(self.metrics.delivery_duration, name).observe(
                time.monotonic() - started)
        elif isinstance(targets, Result):
            result = targets
        else:
            data = content[1] if job.kind == KEEP else await self._signed(job, compose(
                content[0], content[1], kind=job.kind, recipient=job.recipient,
                authserv_id=self.config.authserv_id))
            sender = self.envelope_sender(job)
            for target in targets:  # the next host only when this one could not be reached
                started = time.monotonic()
                result = await self.sender.send(target, sender=sender,
                                                recipient=job.recipient, data=data)
                name, host = target.name, f"{target.host}:{target.port}"
                self.metrics.series(self.metrics.delivery_duration, name).observe(
                    time.monotonic() - started)
                if result.connected:
                    break
        if result.outcome == SENT:  # the relay took it: on disk before anything else
            self.journal.sent(job.id)
        status, retry_at = self._next(job, result)
        bounce = None
        if status == FAILED and dsn.wants_dsn(kind=job.kind, direction=job.direction,
                                              mail_from=job.mail_from):
            bounce = dsn.build(
                hostname=self.config.smtp.hostname, tenant_id=job.tenant_id,
                sender=job.mail_from, recipient=job.recipient, diagnostic=result.detail,
                expired=result.outcome != PERMANENT, original_id=job.message_id,
                original=content[1], arrival=job.created_at, now=self.clock(),
            )
        kind = {SENT_STATUS: "delivered", FAILED: "bounced"}.get(status, "deferred")
        self._event(job, kind, logging.INFO if status == SENT_STATUS else logging.WARNING,
                    code=reply_code(result.detail) if result.connected else None,
                    via=name, relay=host, detail=result.detail,
                    dsn=bounce.id if bounce is not None else None)
        # An APPEND whose connection broke may have arrived: the retry looks first.
        uncertain = job.kind == APPEND and status != SENT_STATUS and result.connected
        return AttemptResult(job.id, status, None if status == SENT_STATUS else result.detail,
                             retry_at, bounce, where=name, uncertain=uncertain)

    def envelope_sender(self, job: DeliveryJob) -> str:
        """MAIL FROM of a delivery: for a copy of inbound mail from another domain,
        the sender rewritten with SRS in the tenant's domain, so that SPF passes at
        the receiver and a bounce comes back to us (and goes on to the sender)."""
        srs = self.srs()
        tenant = self.config.tenants.get(job.tenant_id)
        if (srs is None or tenant is None or not job.mail_from or job.direction != "inbound"
                or job.kind not in FORWARDED
                or job.mail_from.rpartition("@")[2].lower() in tenant.domains):
            return job.mail_from
        domain = tenant.srs_domain.lower().rstrip(".") if tenant.srs_domain else tenant.domains[0]
        return srs.forward(job.mail_from, domain)

    async def _signed(self, job: DeliveryJob, data: bytes) -> bytes:
        """The message with our ARC set (a forwarded copy of inbound mail) and our DKIM
        signatures; unsealed or unsigned (and counted) when no key applies or it
        fails: a message is never held back for want of one."""
        if self.signer is None or self.auth is None:
            return data
        tenant = self.metrics.tenant(job.tenant_id)
        inbound = job.direction == "inbound"  # written by someone we did not authenticate
        forwarded = inbound and job.kind in FORWARDED
        seal_key, sign_keys = self.signer().plan(data, job.tenant_id, seal=forwarded,
                                                 inbound=inbound)
        if seal_key is not None or sign_keys:
            done = await self.auth.protect(data, seal_key, sign_keys, self.config.authserv_id)
        else:
            done = Protected(data, (), ())
        if forwarded:
            seal = "error" if done.seal_error else "sealed" if done.sealed else "none"
            self.metrics.series(self.metrics.arc_seals, tenant, seal).inc()
        if done.seal_error:
            log.warning("delivery %d of %s: not ARC-sealed: %s", job.id, job.message_id,
                        done.seal_error)
        if done.sign_error:
            self.metrics.series(self.metrics.dkim_signatures, tenant, "none", "error").inc()
            log.warning("delivery %d of %s: not DKIM-signed: %s", job.id, job.message_id,
                        done.sign_error)
        elif not done.signed:
            # Mail from outside whose author writes from the tenant's only signing domain
            # (or whose From cannot be read) gets no signature of ours in that domain
            # (gateway.auth.signing).
            why = ("author_domain" if inbound and self.signer().keys_for([], job.tenant_id)
                   else "no_key")
            self.metrics.series(self.metrics.dkim_signatures, tenant, "none", why).inc()
        for key in done.signed:
            self.metrics.series(self.metrics.dkim_signatures, tenant, key.algorithm, "signed").inc()
        return done.data

    def _event(self, job: DeliveryJob, kind: str, level: int, **fields: Any) -> None:
        delay = (self.clock() - job.created_at).total_seconds()
        logs.event(log, kind, level, queue_id=job.message_id, tenant=job.tenant_id,
                   msgid=logs.msgid_hash(job.header_message_id), delivery=job.id,
                   type=job.kind, recipient=job.recipient, attempt=job.attempts + 1,
                   delay=f"{delay:.1f}", **fields)

    def _next(self, job: DeliveryJob, result: Result) -> tuple[str, datetime | None]:
        if result.outcome == SENT:
            return SENT_STATUS, None
        if result.outcome == PERMANENT:
            return FAILED, None
        now = self.clock()
        if now - job.created_at >= timedelta(seconds=self.settings.max_age):
            return FAILED, None
        wait = backoff(job.attempts + 1, self.settings.retry_base, self.settings.retry_max)
        return PENDING, now + timedelta(seconds=wait)

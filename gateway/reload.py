"""Reloading without a restart: the policy set, the DKIM keys, the SRS secrets, TLS.

SIGHUP reloads all four; a change of a policy file reloads the policy set.  A
new policy set takes effect only if it validates as a whole (otherwise the one
in force stays, and the log, the metrics and /status say why); a key, secret or
certificate that does not load leaves the one in use.  The parts that sign,
rewrite or encrypt ask the ``Reloader`` for the current one each time.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.auth import signing
from gateway.clock import utcnow
from gateway.config import GatewayConfig
from gateway.config import load as load_config
from gateway.delivery import notices
from gateway.errors import ConfigError, one_line
from gateway.keyfiles import KeyFileError
from gateway.metrics import Metrics
from gateway.policyset import PolicyError, PolicyHolder, PolicySet, snapshot
from gateway.srs import SRS, load_secrets
from gateway.startup import StartupError, tls_context
from gateway.store.repository import Store

log = logging.getLogger(__name__)

SHOWN_PROBLEMS = 20  # problems of a refused policy reload in its log line and in /status


class Reloader:
    def __init__(self, config: GatewayConfig, policies: PolicyHolder, metrics: Metrics,
                 audit: Callable[[str, dict[str, Any]], Awaitable[None]],
                 config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path  # re-read on SIGHUP for the DKIM keys
        self.policies = policies
        self.metrics = metrics
        self.audit = audit
        self.signer = signing.from_config(config)
        self.signer_config = config  # the configuration ``signer`` was loaded from
        self.on_change: Callable[[], None] = lambda: None  # the policy set, keys or SRS changed
        self.srs = (SRS(load_secrets(config.srs.secret_file), config.srs.max_age_days)
                    if config.srs.secret_file else None)
        self.tls: ssl.SSLContext | None = None  # loaded at the start (startup.tls_context)
        self.store: Store | None = None  # once open: subprocessor changes are recorded
        self.problems: list[str] = []  # why the last policy reload was refused
        self.refused_since: datetime | None = None  # the first refusal since the last load
        self._lock = asyncio.Lock()

    def refused(self) -> tuple[list[str], datetime | None]:
        """Why the last policy reload was refused, as far as the log line shows it, and
        since when reloads have been refused (None: the last one loaded)."""
        return self.problems[:SHOWN_PROBLEMS], self.refused_since

    async def reload(self, why: str) -> None:
        """SIGHUP: the policy set, the TLS certificate, the DKIM keys, the SRS secrets."""
        await self.reload_policies(why)
        self.reload_tls()
        await asyncio.to_thread(self.reload_dkim)
        self.reload_srs()

    def reload_dkim(self) -> None:
        """Read ``dkim.keys`` from the configuration file again and load the keys it
        names (a new selector listed after the old one takes over signing). Other
        changes in the file wait for a restart. Keys that do not load are refused
        and the keys in use stay."""
        if self.config_path is None:
            return
        try:
            fresh = load_config(self.config_path)
            signer = signing.from_config(fresh)
        except (ConfigError, KeyFileError) as exc:
            self.metrics.dkim_reloads.labels("failure").inc()
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error("DKIM key reload refused, the keys in use stay: %s", "; ".join(problems))
            return
        keys = [k for ks in signer.by_domain.values() for k in ks]
        before = {repr(k) for ks in self.signer.by_domain.values() for k in ks}
        self.signer, self.signer_config = signer, fresh
        self.on_change()
        self.metrics.dkim_reloads.labels("success").inc()
        self.metrics.signing_keys(keys)
        if {repr(k) for k in keys} != before:
            log.info("DKIM signing keys now: %s",
                     ", ".join(f"{k.record_name} ({k.algorithm})" for k in keys) or "none")

    def reload_srs(self) -> None:
        """Read the SRS secrets again: to rotate, put the new secret on the first line
        and keep the old ones below it until their bounces are past max_age_days."""
        if self.srs is None or not self.config.srs.secret_file:
            return
        try:
            secrets = load_secrets(self.config.srs.secret_file)
        except KeyFileError as exc:
            log.error("SRS secret reload refused, the secrets in use stay: %s", exc)
            return
        if list(secrets) != list(self.srs.secrets):
            self.srs = SRS(secrets, self.config.srs.max_age_days)
            self.on_change()
            log.info("SRS secrets reloaded: %d in use", len(secrets))

    def reload_tls(self) -> None:
        """Load a renewed certificate and key; new connections use them, open ones
        keep theirs. A file that cannot be loaded leaves the one in use."""
        if not self.config.smtp.tls.enabled:
            return
        try:
            self.tls = tls_context(self.config)
        except StartupError as exc:
            self.metrics.tls_reloads.labels("failure").inc()
            log.error("TLS reload refused, the certificate in use stays: %s", exc)
            return
        self.metrics.tls_reloads.labels("success").inc()
        log.info("TLS certificate reloaded from %s", self.config.smtp.tls.cert_file)

    async def reload_policies(self, why: str) -> None:
        """Validate the policy directory as a whole and swap it in; or keep the one in force."""
        async with self._lock:
            previous = self.policies.current
            try:
                changed = await asyncio.to_thread(self.policies.reload)
            except PolicyError as exc:
                self._refuse_reload(why, exc.problems)
                return
            except Exception as exc:  # whatever fails, the reload is refused, never the watcher
                self._refuse_reload(why, [f"{self.policies.directory}: {one_line(exc)}"], exc)
                return
            self.problems, self.refused_since = [], None
            self.metrics.policy_reload_failing.set(0)
            if not changed:
                log.info("policy reload (%s): no change (policy %s)", why, previous.version)
                return
            current = self.policies.current
            self.on_change()
            self.metrics.policy_reloads.labels("success").inc()
            self.metrics.policy_loaded(current.version, current.loaded_at.timestamp(),
                                       previous.version)
            edited = current.changed_since(previous)
            log.info("policy reloaded (%s): %s -> %s (%s changed)", why, previous.version,
                     current.version, ", ".join(edited) or "no file")
            await self.audit("policy.reload", {
                "from": previous.version, "to": current.version, "why": why,
                "files": sorted(current.files), "changed": edited})
            try:
                await self.sync_subprocessors(previous)
            except Exception:  # the database may be away; the next reload or restart retries
                log.exception("recording subprocessor changes failed")

    def _refuse_reload(self, why: str, problems: list[str],
                       unexpected: BaseException | None = None) -> None:
        """The policy in force stays; the log, the metrics and /status say why."""
        self.problems = problems
        self.refused_since = self.refused_since or utcnow()
        self.metrics.policy_reloads.labels("failure").inc()
        self.metrics.policy_reload_failing.set(1)
        shown = "; ".join(problems[:SHOWN_PROBLEMS])
        more = len(problems) - SHOWN_PROBLEMS
        log.error("policy reload (%s) refused, policy %s stays in force: %s%s", why,
                  self.policies.current.version, shown,
                  f" (and {more} more problems)" if more > 0 else "", exc_info=unexpected)

    async def watch(self, interval: float) -> None:
        """Reload when a policy file changes (after it has stayed the same for a moment,
        so an editor's save in several writes is usually read once, whole).

        Waiting longer would only narrow the window in which a file is read while it
        is written, never close it: a writer may pause for any time, and the part
        written so far may be a valid, shorter policy.  What closes it is a rename
        into place (docs/policies.md); what is refused for sure is an empty file."""
        directory = self.config.policies.directory
        last = await asyncio.to_thread(snapshot, directory)
        while True:
            await asyncio.sleep(interval)
            now = await asyncio.to_thread(snapshot, directory)
            if now == last:
                continue
            await asyncio.sleep(min(interval, 0.25))
            settled = await asyncio.to_thread(snapshot, directory)
            if settled != now:
                continue  # still being written: look again at the next tick
            last = settled
            await self.reload_policies("files changed")

    async def sync_subprocessors(self, previous: PolicySet | None) -> None:
        """Record registry changes with their notices; let held copies try again."""
        if self.store is None:
            return
        await notices.sync(self.store, self.policies.current, previous,
                           {tid: t.name for tid, t in self.config.tenants.items()},
                           self.config.smtp.hostname)

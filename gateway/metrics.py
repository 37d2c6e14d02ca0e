"""All Prometheus metrics of the gateway, on a registry passed in.

Names follow Prometheus conventions (``mailflowr_gateway_`` prefix, ``_total``
counters, ``_seconds`` histograms, base units).  Labels never carry personal
data: no addresses, no subjects, only bounded values: a listener name, a
reason or outcome from a fixed list, a reply code, a rule or destination name
from the configuration, and the tenant id, which ``metrics.tenant_labels:
false`` replaces with ``all`` where the number of tenants would be too large.
The metrics table in docs/operations.md documents every family; a test holds it to that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.records import QueueStats

if TYPE_CHECKING:
    from gateway.keyfiles import SigningKey

PREFIX = "mailflowr_gateway"
ALL_TENANTS = "all"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def reply_class(reply: str) -> str:
    """'250 2.0.0 Ok' -> '2xx'."""
    return f"{reply[:1]}xx" if reply[:1] in "2345" else "other"


NOTICE_STATES = ("pending", "held", "failed", "unsent")


class OldName(Collector):
    """A family renamed in this release, exported under its old name as well until the
    next one, so dashboards and alerts written for the old name keep working meanwhile
    (``until``: the release that drops it, said in its help)."""

    def __init__(self, metric: Gauge | Counter, old: str, until: str,
                 registry: CollectorRegistry) -> None:
        self.metric, self.old, self.until = metric, old, until
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        for family in self.metric.collect():
            old = Metric(self.old, f"Renamed {family.name}; this name goes in {self.until}.",
                         family.type)
            for sample in family.samples:
                old.add_sample(self.old + sample.name[len(family.name):], sample.labels,
                               sample.value)
            yield old


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None,
                 tenant_labels: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.tenant_labels = tenant_labels
        self._depth_seen: set[tuple[str, str]] = set()
        self._oldest_seen: set[str] = set()
        self._series: dict[tuple[object, tuple[str, ...]], Any] = {}
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.build_info = Gauge(
            f"{PREFIX}_build_info", "Always 1; the version of the running gateway.",
            ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.ready = Gauge(
            f"{PREFIX}_ready",
            "1 while the gateway is ready (listeners bound, database reachable at the last "
            "check, policy loaded), 0 otherwise.", registry=r)
        self.database_up = Gauge(
            f"{PREFIX}_database_up",
            "1 if the last database check (every few seconds) succeeded, 0 if not.", registry=r)

        # ---------------------------------------------------------------- SMTP
        self.smtp_connections = Gauge(
            f"{PREFIX}_smtp_connections_open", "SMTP connections (sessions) open now.",
            ["listener"], registry=r)
        self.smtp_connections_total = Counter(
            f"{PREFIX}_smtp_connections_total", "SMTP connections accepted.",
            ["listener"], registry=r)
        self.smtp_connections_refused = Counter(
            f"{PREFIX}_smtp_connections_refused_total",
            "SMTP connections refused before the greeting, by reason "
            "(total, per_ip, shutdown).", ["listener", "reason"], registry=r)
        self.smtp_replies = Counter(
            f"{PREFIX}_smtp_replies_total",
            "Replies sent to SMTP clients, by reply code.", ["listener", "code"], registry=r)
        self.smtp_messages = Counter(
            f"{PREFIX}_smtp_messages_total",
            "Messages at the end of DATA, by reply class (2xx accepted, 4xx deferred, 5xx "
            "rejected) and reason (ok, too_big, line_too_long, bare_newline, too_many_hops, "
            "rule, dmarc, header_from, storage).", ["listener", "class", "reason"], registry=r)
        self.smtp_recipients_refused = Counter(
            f"{PREFIX}_smtp_recipients_refused_total",
            "RCPT TO refused, by reason (relay, unknown_user, syntax, smtputf8, too_many, "
            "inactive (a deactivated tenant), srs_forged, srs_expired, srs_malformed: a bounce "
            "to a rewritten sender that is not ours or too old).",
            ["listener", "reason"], registry=r)
        self.smtp_received_bytes = Counter(
            f"{PREFIX}_smtp_received_bytes_total", "Message bytes accepted.",
            ["listener"], registry=r)
        self.accept_latency = Histogram(
            f"{PREFIX}_accept_latency_seconds",
            "Time from the end of DATA to the 250 reply (includes the durable commit).",
            ["listener"], buckets=LATENCY_BUCKETS, registry=r)
        self.messages_accepted = Counter(
            f"{PREFIX}_messages_accepted_total",
            "Message copies stored (one per tenant the message was for).",
            ["tenant"], registry=r)
        self.commit_batch_size = Histogram(
            f"{PREFIX}_commit_batch_messages", "Messages written per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.commit_duration = Histogram(
            f"{PREFIX}_commit_duration_seconds", "Duration of one group commit.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=r)

        # ------------------------------------------------------------ pipeline
        self.pipeline_messages = Counter(
            f"{PREFIX}_pipeline_messages_total",
            "Messages through the pipeline, by outcome (processed, unparseable, quarantined).",
            ["tenant", "outcome"], registry=r)
        self.pipeline_stage = Histogram(
            f"{PREFIX}_pipeline_stage_duration_seconds",
            "Duration of a pipeline stage (parse: per message, in a worker process; rules: "
            "per message; auth: DKIM, SPF, ARC and DMARC of inbound mail, per message, in a "
            "worker process; save: per batch).",
            ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.pipeline_failures = Counter(
            f"{PREFIX}_pipeline_failures_total",
            "Pipeline stage failures, by stage (claim, read, prepare, save); the work is "
            "retried or the message quarantined.", ["stage"], registry=r)
        self.pipeline_held_back = Counter(
            f"{PREFIX}_pipeline_held_back_seconds_total",
            "Time the pipeline waited for SMTP sessions to stop committing before its next "
            "claim (pipeline.burst_delay bounds each wait).", registry=r)
        self.in_flow_delay = Counter(
            f"{PREFIX}_smtp_in_flow_delay_seconds_total",
            "Time SMTP sessions waited before a new message because the pipeline was behind "
            "(smtp.in_flow_delay bounds each wait).", registry=r)
        self.pipeline_backlog = Gauge(
            f"{PREFIX}_pipeline_backlog_messages",
            "Messages stored but not processed yet (at the last check).", registry=r)
        self.pipeline_oldest = Gauge(
            f"{PREFIX}_pipeline_oldest_age_seconds",
            "Age of the oldest message not processed yet (0 when none).", registry=r)
        self.rule_hits = Counter(
            f"{PREFIX}_workflow_rule_hits_total",
            "Workflow rules that matched a message, by tenant and rule name.",
            ["tenant", "rule"], registry=r)

        # ------------------------------------------------------------ delivery
        self.deliveries = Counter(
            f"{PREFIX}_deliveries_total",
            "Delivery attempts, by kind (cc, bcc, route; rcpt: a recipient of a user's or "
            "the gateway's own message, DSNs and notices included; return: a bounce going "
            "back through our SRS address; keep: an original relayed to the tenant's own "
            "server, append: an original appended to its IMAP folder), result "
            "(sent, deferred, failed, held) and destination (a configured destination or "
            "subprocessor, relay, mx, or the IMAP account).",
            ["tenant", "kind", "result", "destination"], registry=r)
        self.delivery_duration = Histogram(
            f"{PREFIX}_delivery_duration_seconds",
            "Duration of one delivery attempt (connect to final reply).",
            ["destination"], buckets=DELIVERY_BUCKETS, registry=r)
        self.delivery_unrecorded = Histogram(
            f"{PREFIX}_delivery_unrecorded_seconds",
            "Time from the end of a delivery attempt (the relay's final reply) to the "
            "durable record of its result: a copy sent in this window is sent again if "
            "the instance dies in it.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r)
        self.imap_imports = Counter(
            f"{PREFIX}_imap_imports_total",
            "Messages found in a tenant's mailbox (tenants.ID.imap_pull), by source and "
            "outcome (imported; duplicate: already imported, recognised by content; "
            "too_large: over smtp.max_message_size, left on the server).",
            ["tenant", "source", "outcome"], registry=r)
        self.imap_errors = Counter(
            f"{PREFIX}_imap_errors_total",
            "Import rounds of a mailbox source that failed (server away, connection lost, "
            "NO or BAD); each is retried.", ["tenant", "source"], registry=r)
        self.imap_backlog = Gauge(
            f"{PREFIX}_imap_backlog_messages",
            "Messages of a mailbox source waiting to be imported, at the last look.",
            ["tenant", "source"], registry=r)
        OldName(self.imap_backlog, f"{PREFIX}_imap_backlog", "0.3.0", r)
        self.dsns = Counter(
            f"{PREFIX}_dsns_total",
            "Delivery status notifications (bounces) generated for failed deliveries.",
            ["tenant"], registry=r)
        self.queue_depth = Gauge(
            f"{PREFIX}_delivery_queue_messages",
            "Deliveries waiting, by state (pending: due or deferred; held: waiting for an "
            "operator or a policy), at the last check.", ["tenant", "state"], registry=r)
        self.queue_oldest = Gauge(
            f"{PREFIX}_delivery_queue_oldest_age_seconds",
            "Age of the oldest pending delivery (0 when none), at the last check.",
            ["tenant"], registry=r)

        # ---------------------------------------------------------------- DKIM
        self.dkim_signatures = Counter(
            f"{PREFIX}_dkim_signatures_total",
            "DKIM signing of outgoing messages, by algorithm and result (signed; no_key: "
            "sent unsigned, no key for the author's or the tenant's domains; author_domain: "
            "a copy of inbound mail sent unsigned, the tenant's keys are all in the "
            "author's domain; error: sent unsigned, the message could not be signed).",
            ["tenant", "algorithm", "result"], registry=r)
        self.arc_seals = Counter(
            f"{PREFIX}_arc_seals_total",
            "Forwarded copies of inbound mail by ARC sealing result (sealed; none: no RSA "
            "key for the tenant's domains, or a chain that cannot be extended; error: sent "
            "unsealed).", ["tenant", "result"], registry=r)
        self.auth_checks = Counter(
            f"{PREFIX}_auth_results_total",
            "Authentication checks of inbound mail, by method (dkim: per signature, spf, "
            "arc, dmarc) and RFC 8601 result (pass, fail, softfail, neutral, none, "
            "temperror, permerror).", ["method", "result"], registry=r)
        self.dkim_keys = Gauge(
            f"{PREFIX}_dkim_signing_keys",
            "Signing keys in use (1 per domain, selector and algorithm that signs).",
            ["domain", "selector", "algorithm"], registry=r)
        self.dkim_reloads = Counter(
            f"{PREFIX}_dkim_key_reloads_total",
            "Reloads of the DKIM keys on SIGHUP, by result (success, failure: the keys in use "
            "stay).", ["result"], registry=r)

        # ------------------------------------------------------------- policies
        self.policy_reloads = Counter(
            f"{PREFIX}_policy_reloads_total",
            "Policy reloads (SIGHUP or a change in the policy directory), by result "
            "(success, failure; a failure keeps the policy in force).", ["result"], registry=r)
        self.policy_reload_failing = Gauge(
            f"{PREFIX}_policy_reload_failing",
            "1 while the last reload was refused (the files on disk are not in force), "
            "0 after a reload that took effect or found nothing changed.", registry=r)
        self.policy_last_success = Gauge(
            f"{PREFIX}_policy_last_reload_success_timestamp_seconds",
            "When the policy in force was loaded (Unix time).", registry=r)
        self.policy_info = Gauge(
            f"{PREFIX}_policy_info",
            "The policy set in force: 1 for its version (a hash of the files).",
            ["version"], registry=r)
        self.tls_reloads = Counter(
            f"{PREFIX}_tls_reloads_total",
            "Reloads of the TLS certificate and key on SIGHUP, by result (success, failure: "
            "the certificate in use stays).", ["result"], registry=r)
        self.notices_undelivered = Gauge(
            f"{PREFIX}_subprocessor_notices_undelivered",
            "Sub-processor change notices not delivered to the tenant's privacy contact, by "
            "state (pending, held, failed, unsent: no privacy contact). Until delivered, "
            "the sub-processor stays unusable for that tenant.", ["state"], registry=r)
        self.notices_undelivered_oldest = Gauge(
            f"{PREFIX}_subprocessor_notice_undelivered_oldest_seconds",
            "Age of the oldest sub-processor change notice not delivered.", registry=r)
        self.breach_notices = Gauge(
            f"{PREFIX}_breach_notices_undelivered",
            "Tenants affected by an open incident whose breach notice is not delivered "
            "(not queued, pending, held or failed).", registry=r)
        self.breach_deadline = Gauge(
            f"{PREFIX}_breach_notice_deadline_seconds",
            "Seconds to the nearest deadline (discovery + 48 h) among the breach notices "
            "not delivered; negative once passed, 0 when there are none.", registry=r)
        self.requests_open = Gauge(
            f"{PREFIX}_subject_requests_open",
            "Data-subject requests recorded and not yet answered (by an export, an "
            "erasure, or closed by hand).", registry=r)
        self.request_deadline = Gauge(
            f"{PREFIX}_subject_request_deadline_seconds",
            "Seconds to the nearest deadline (received + 1 month) among the open "
            "data-subject requests; negative once passed, 0 when there are none.", registry=r)
        self.api_auth_failures = Counter(
            f"{PREFIX}_api_authentication_failures_total",
            "Admin API requests refused for their token or console session (401), and "
            "console logins refused, by reason: missing, malformed, unknown, "
            "wrong_secret, revoked, deactivated, console_session, wrong_password, "
            "console_throttled.", ["reason"],
            registry=r)
        self.smtp_auth_failures = Counter(
            f"{PREFIX}_smtp_authentication_failures_total",
            "SMTP AUTH on the submission listener refused, by reason: credentials (a "
            "wrong login or password), throttled (the IP had too many failures).",
            ["reason"], registry=r)
        self.retention_sweeps = Counter(
            f"{PREFIX}_retention_sweeps_total",
            "Retention sweeps, by result (success, failure, skipped: another instance swept).",
            ["result"], registry=r)
        self.retention_deleted = Counter(
            f"{PREFIX}_retention_deleted_messages_total",
            "Messages deleted because their retention period had passed.",
            ["tenant"], registry=r)
        self.retention_held = Gauge(
            f"{PREFIX}_retention_held_messages",
            "Expired messages kept by a legal hold, at the last sweep.", registry=r)
        self.retention_last_sweep = Gauge(
            f"{PREFIX}_retention_last_sweep_timestamp_seconds",
            "When the last retention sweep finished (Unix time).", registry=r)

    def series(self, family: Any, *labels: str) -> Any:
        """``family.labels(*labels)``, kept: on the paths every message takes, looking
        the labelled series up again cost more than counting in it. Only for families
        whose series are never removed (those change through ``labels()`` alone)."""
        key = (family, labels)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = family.labels(*labels)
        return found

    def reply(self, listener: str, code: str) -> None:
        """Count one SMTP reply."""
        self.series(self.smtp_replies, listener, code).inc()

    def signing_keys(self, keys: Iterable[SigningKey]) -> None:
        """Show exactly these keys as in use."""
        self.dkim_keys.clear()
        for key in keys:
            self.dkim_keys.labels(key.domain, key.selector, key.algorithm).set(1)

    def tenant(self, tenant_id: str) -> str:
        return tenant_id if self.tenant_labels else ALL_TENANTS

    def auth_results(self, dkim: Iterable[str], verdicts: Iterable[tuple[str, str]]) -> None:
        """Count one message's checks: ``dkim`` one result per signature, ``verdicts``
        (method, result) pairs of the other methods (a DKIM pair there is skipped)."""
        for result in dkim:
            self.series(self.auth_checks, "dkim", result).inc()
        for method, result in verdicts:
            if method != "dkim":  # counted per signature above
                self.series(self.auth_checks, method, result).inc()

    def policy_loaded(self, version: str, at: float, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            self.policy_info.remove(previous)
        self.policy_info.labels(version).set(1)
        self.policy_last_success.set(at)

    def observe_commit(self, batch: int, seconds: float) -> None:
        self.commit_batch_size.observe(batch)
        self.commit_duration.observe(seconds)

    def pipeline_outcome(self, tenant_id: str, outcome: str, rules: list[str]) -> None:
        tenant = self.tenant(tenant_id)
        self.series(self.pipeline_messages, tenant, outcome).inc()
        for rule in rules:
            self.series(self.rule_hits, tenant, rule).inc()

    def queue_levels(self, stats: QueueStats) -> None:
        """Set the backlog gauges from one look at the database."""
        self.pipeline_backlog.set(stats.pipeline_waiting)
        self.pipeline_oldest.set(stats.pipeline_oldest)
        for state in NOTICE_STATES:
            self.notices_undelivered.labels(state).set(stats.notices.get(state, (0, 0.0))[0])
        self.notices_undelivered_oldest.set(max((age for _, age in stats.notices.values()),
                                                default=0.0))
        self.breach_notices.set(stats.breach_notices)
        self.breach_deadline.set(stats.breach_deadline or 0.0)
        self.requests_open.set(stats.requests_open)
        self.request_deadline.set(stats.request_deadline or 0.0)
        depth: dict[tuple[str, str], int] = {}
        oldest: dict[str, float] = {}
        for tenant_id, state, count, age in stats.deliveries:
            tenant = self.tenant(tenant_id)
            depth[(tenant, state)] = depth.get((tenant, state), 0) + count
            if state == "pending":
                oldest[tenant] = max(oldest.get(tenant, 0.0), age)
        # Series of tenants whose queue emptied go to 0, not away: alerts see the drop.
        for key in self._depth_seen:
            depth.setdefault(key, 0)
        for tenant in self._oldest_seen:
            oldest.setdefault(tenant, 0.0)
        self._depth_seen |= depth.keys()
        self._oldest_seen |= oldest.keys()
        for (tenant, state), count in depth.items():
            self.queue_depth.labels(tenant, state).set(count)
        for tenant, age in oldest.items():
            self.queue_oldest.labels(tenant).set(age)

"""All Prometheus metrics of the gateway, on a registry passed in.

Names follow Prometheus conventions (``mailflowr_gateway_`` prefix, ``_total``
counters, ``_seconds`` histograms).  Labels never carry personal data: no
addresses, no subjects, only bounded enumerations such as a reason or outcome.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "mailflowr_gateway"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.smtp_connections = Gauge(
            f"{PREFIX}_smtp_connections_open", "SMTP connections open now.", registry=r
        )
        self.smtp_connections_total = Counter(
            f"{PREFIX}_smtp_connections_total", "SMTP connections accepted.", registry=r
        )
        self.smtp_connections_refused = Counter(
            f"{PREFIX}_smtp_connections_refused_total",
            "SMTP connections refused before the greeting, by reason.",
            ["reason"],
            registry=r,
        )
        self.smtp_messages = Counter(
            f"{PREFIX}_smtp_messages_total",
            "Messages at the end of DATA, by outcome (accepted, rejected, deferred).",
            ["outcome"],
            registry=r,
        )
        self.smtp_recipients_refused = Counter(
            f"{PREFIX}_smtp_recipients_refused_total",
            "RCPT TO refused, by reason (relay, unknown_user, syntax, smtputf8, too_many).",
            ["reason"],
            registry=r,
        )
        self.smtp_received_bytes = Counter(
            f"{PREFIX}_smtp_received_bytes_total", "Message bytes accepted.", registry=r
        )
        self.accept_latency = Histogram(
            f"{PREFIX}_accept_latency_seconds",
            "Time from the end of DATA to the 250 reply (includes the durable commit).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.commit_batch_size = Histogram(
            f"{PREFIX}_commit_batch_messages",
            "Messages written per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.commit_duration = Histogram(
            f"{PREFIX}_commit_duration_seconds",
            "Duration of one group commit.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.pipeline_messages = Counter(
            f"{PREFIX}_pipeline_messages_total",
            "Messages through the pipeline, by outcome (processed, unparseable, quarantined).",
            ["outcome"],
            registry=r,
        )

        self.deliveries = Counter(
            f"{PREFIX}_deliveries_total",
            "Delivery attempts, by kind (cc, bcc, route) and result "
            "(sent, deferred, failed, held).",
            ["kind", "result"],
            registry=r,
        )

        self.policy_reloads = Counter(
            f"{PREFIX}_policy_reloads_total",
            "Policy reloads (SIGHUP or a change in the policy directory), by result "
            "(success, failure; a failure keeps the policy in force).",
            ["result"],
            registry=r,
        )
        self.policy_last_success = Gauge(
            f"{PREFIX}_policy_last_reload_success_timestamp_seconds",
            "When the policy in force was loaded (Unix time).",
            registry=r,
        )
        self.policy_info = Gauge(
            f"{PREFIX}_policy_info",
            "The policy set in force: 1 for its version (a hash of the files).",
            ["version"],
            registry=r,
        )
        self.retention_sweeps = Counter(
            f"{PREFIX}_retention_sweeps_total",
            "Retention sweeps, by result (success, failure, skipped: another instance swept).",
            ["result"],
            registry=r,
        )
        self.retention_deleted = Counter(
            f"{PREFIX}_retention_deleted_messages_total",
            "Messages deleted because their retention period had passed.",
            registry=r,
        )
        self.retention_held = Gauge(
            f"{PREFIX}_retention_held_messages",
            "Expired messages kept by a legal hold, at the last sweep.",
            registry=r,
        )
        self.retention_last_sweep = Gauge(
            f"{PREFIX}_retention_last_sweep_timestamp_seconds",
            "When the last retention sweep finished (Unix time).",
            registry=r,
        )

    def policy_loaded(self, version: str, at: float, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            self.policy_info.remove(previous)
        self.policy_info.labels(version).set(1)
        self.policy_last_success.set(at)

    def observe_commit(self, batch: int, seconds: float) -> None:
        self.commit_batch_size.observe(batch)
        self.commit_duration.observe(seconds)

    def pipeline_outcome(self, outcome: str) -> None:
        self.pipeline_messages.labels(outcome).inc()

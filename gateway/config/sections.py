"""The daemon's sections of gateway.yaml: listeners, TLS, database, pipeline, delivery,
policies, authentication, SRS, privacy, the admin API."""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config.values import (
    HOSTNAME,
    ConfigPath,
    Duration,
    HostName,
    LeaseTime,
    OptionalConfigPath,
    OptionalHostPort,
    Section,
    Size,
    config_folder,
    in_folder,
    parse_hostport,
)
from gateway.keyfiles import KeyFileError, load, parse_master, read_master
from gateway.srs import load_secrets


class TLSConfig(Section):
    cert_file: OptionalConfigPath = None
    key_file: OptionalConfigPath = None

    @model_validator(mode="after")
    def _both_or_neither(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        for f in (self.cert_file, self.key_file):
            if f is not None and not f.is_file():
                raise ValueError(f"{f}: no such file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class SMTPConfig(Section):
    listen: str = "127.0.0.1:2525"
    hostname: str = "mx.example.test"
    max_message_size: Size = 10_240_000
    max_recipients: int = Field(default=1000, ge=1)
    recipient_overshoot_limit: int = Field(default=1000, ge=0)
    max_connections: int = Field(default=2000, ge=1)
    max_connections_per_ip: int = Field(default=50, ge=1)
    idle_timeout: Duration = 300.0
    max_errors: int = Field(default=20, ge=1)
    max_hops: int = Field(default=50, ge=1)
    greet_pause: Duration = 0.0
    in_flow_delay: Duration = 1.0
    bare_newline: Literal["normalize", "reject"] = "normalize"
    shutdown_timeout: Duration = 30.0
    # auto: uvloop when it is installed (faster), else asyncio's own loop.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    tls: TLSConfig = TLSConfig()

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not HOSTNAME.match(v.lower()):
            raise ValueError(f"not a valid host name: {v!r}")
        return v.lower()

    @property
    def address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)


class DatabaseConfig(Section):
    # A relative SQLite file is read from the folder of gateway.yaml, as every path.
    url: str = Field(default="sqlite:///var/gateway.db", validate_default=True)
    commit_batch_max: int = Field(default=512, ge=1)
    pool_size: int = Field(default=5, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str, info: ValidationInfo) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError(f"not a database URL: {v!r}") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:/// and postgresql+psycopg:// URLs are supported")
        if url.get_backend_name() == "postgresql" and url.get_driver_name() != "psycopg":
            raise ValueError("PostgreSQL URLs use the psycopg driver: postgresql+psycopg://...")
        base = config_folder(info)
        if (url.get_backend_name() == "sqlite" and base is not None
                and url.database not in (None, "", ":memory:")
                and not url.database.startswith("file:")
                and not Path(url.database).is_absolute()):
            return url.set(database=str(in_folder(base, Path(url.database)))
                           ).render_as_string(hide_password=False)
        return v


class StorageConfig(Section):
    min_free_space: Size = 100_000_000


class PipelineConfig(Section):
    parse_workers: int = Field(default=1, ge=1, le=64)
    parse_timeout: Duration = 20.0
    batch_size: int = Field(default=100, ge=1)
    poll_interval: Duration = 2.0
    lease_time: LeaseTime = 300.0
    burst_delay: Duration = 5.0
    burst_load: float = Field(default=1.0, ge=0.0, le=1.0)
    max_idle: Duration = 100.0  # the pipeline process exits after this long without work


class MetricsConfig(Section):
    listen: OptionalHostPort = "127.0.0.1:9466"
    tenant_labels: bool = True  # False: the tenant label reads "all" (very many tenants)
    # How often the backlog, notice, incident and request gauges (and systemd's STATUS=
    # line) are read from the database.
    stats_interval: Duration = Field(default=5.0, gt=0)



class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    personal_data: bool = False  # True writes addresses and subjects (debugging only)



class SubmissionConfig(Section):
    """The listener internal users send through (AUTH after STARTTLS)."""

    # host:port, e.g. 127.0.0.1:2587 (587 in production); empty: no submission listener.
    listen: OptionalHostPort = None
    # Failed logins from one client IP within auth_window before it is turned away.
    max_auth_failures: int = Field(default=5, ge=1)
    auth_window: Duration = 600.0



class DestinationConfig(Section):
    """A downstream SMTP server that rules may route to."""

    host: HostName
    port: int = Field(default=25, ge=1, le=65535)
    # none: plain; opportunistic: STARTTLS when offered; required: fail without it.
    tls: Literal["none", "opportunistic", "required"] = "opportunistic"



class DeliveryConfig(Section):
    # host:port of the relay (smarthost) that copies to other domains go through.
    relay: OptionalHostPort = None
    relay_tls: Literal["none", "opportunistic", "required"] = "opportunistic"
    # Copies in hand at once (each holds its message in memory; claimed a quarter at a
    # time), and connections to one server at once (Postfix's
    # default_destination_concurrency_limit).
    concurrency: int = Field(default=10, ge=1, le=500)
    connections_per_server: int = Field(default=20, ge=1, le=500)
    timeout: Duration = 60.0
    poll_interval: Duration = 2.0
    retry_base: Duration = 60.0
    retry_max: Duration = 3600.0
    max_age: Duration = 5 * 86400.0
    lease_time: LeaseTime = 300.0
    # Sub-processor objections and notices recorded by another process (the command
    # line, the admin API, another instance) are obeyed within this time.
    consent_refresh: Duration = 5.0
    # Without a relay, copies may go straight to the recipient domain's MX hosts.
    mx_lookup: bool = False
    # host:port of DNS servers for MX lookups; empty: the system's (/etc/resolv.conf).
    dns_servers: list[str] = []
    dns_timeout: Duration = 10.0
    mx_port: int = Field(default=25, ge=1, le=65535)
    # Where each copy a relay took is written down before its result is committed
    # (gateway.delivery.journal); a restart on the same host reads it.
    journal: ConfigPath = Field(default=Path("var/journal"), validate_default=True)

    @field_validator("dns_servers")
    @classmethod
    def _dns_servers(cls, v: list[str]) -> list[str]:
        for server in v:
            host, _ = parse_hostport(server)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"a DNS server is an IP address with a port: {server!r}") from None
        return v



class PoliciesConfig(Section):
    # Where workflows.yaml, retention.yaml and subprocessors.yaml are read from.
    directory: ConfigPath = Field(default=Path("policies"), validate_default=True)
    # How often the files are checked for changes (then reloaded); 0: only on SIGHUP.
    watch_interval: Duration = 2.0

    @property
    def workflows(self) -> Path:
        return self.directory / "workflows.yaml"


class RetentionConfig(Section):
    """The sweeper that deletes what policies/retention.yaml says has expired."""

    # Time between sweeps (the first runs one interval after start); 0: no sweeper here.
    sweep_interval: Duration = 3600.0
    # Messages deleted per transaction.
    batch_size: int = Field(default=200, ge=1, le=10_000)
    # Least pause between two batches; the sweeper also rests as long as a batch took,
    # so acceptance keeps the database's write lock at least half of the time.
    batch_pause: Duration = 0.02


class DKIMKeyConfig(Section):
    """One signing key: its DNS record is SELECTOR._domainkey.DOMAIN."""

    domain: str
    selector: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    key_file: ConfigPath

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not HOSTNAME.match(v):
            raise ValueError(f"not a domain: {v!r}")
        return v

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                            r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", v):
            raise ValueError(f"not a selector (letters, digits, - and .): {v!r}")
        return v

    @model_validator(mode="after")
    def _readable(self) -> DKIMKeyConfig:

        try:
            load(self.key_file, self.domain, self.selector, self.algorithm)
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
        return self


class AuthConfig(Section):
    """Inbound authentication (DNS through delivery.dns_servers)."""

    # Our name in Authentication-Results (RFC 8601); empty: smtp.hostname.
    authserv_id: str | None = None
    # Verify the DKIM signatures of inbound mail in the pipeline.
    verify_dkim: bool = True
    # Check SPF for the envelope sender (HELO for the null sender).
    check_spf: bool = True
    # Validate the ARC chain of earlier forwarders.
    check_arc: bool = True
    # Evaluate DMARC (needs DKIM and SPF results; computes them when those are off).
    check_dmarc: bool = True
    # Processes that run these checks;
    # 0: threads of the pipeline process itself (slower: they share one core with it).
    workers: int = Field(default=1, ge=0, le=64)

    @field_validator("authserv_id")
    @classmethod
    def _authserv_id(cls, v: str | None) -> str | None:
        if v is not None and not HOSTNAME.match(v.lower()):
            raise ValueError(f"an authserv-id is a host name: {v!r}")
        return v


class SRSConfig(Section):
    """Sender rewriting of forwarded copies, so that they pass SPF at the receiver."""

    # The HMAC secret(s), one per line, first one signs; mode 0600. Empty: no rewriting.
    secret_file: OptionalConfigPath = None
    # Days a bounce to a rewritten sender is accepted.
    max_age_days: int = Field(default=21, ge=1, le=1000)

    @model_validator(mode="after")
    def _secrets_load(self) -> SRSConfig:
        if self.secret_file:

            try:
                load_secrets(self.secret_file)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return self


class PrivacyConfig(Section):
    """Data-subject requests, the audit chain and tenant deactivation."""

    # The gateway's own secret (64 hex digits, mode 0600), made at first start when
    # missing. It keys the audit chain and the hashes erasure names people by; keep it
    # out of database backups, and give every instance on one database the same file.
    key_file: ConfigPath = Field(default=Path("var/privacy.key"), validate_default=True)
    # Encryption at rest of the raw originals: the master key (64 hex digits) in a file
    # (mode 0600) or in an environment variable named here. Neither: stored in clear.
    master_key_file: OptionalConfigPath = None
    master_key_env: str | None = None
    # Where the tenants' data keys are kept, wrapped by the master key. Not in the
    # database, so deactivating a tenant makes its mail in database backups unreadable.
    keystore: ConfigPath = Field(default=Path("var/keys"), validate_default=True)
    # Where people send data-subject requests to the processor (e.g. privacy@ of the
    # operator's domain; an address of one of the tenants here, the operator's own).
    # Mail to it, or to it+TENANT@, is recorded as a request; one naming a tenant is
    # forwarded to that tenant's privacy contact. Empty: none.
    request_address: str | None = None

    @model_validator(mode="after")
    def _master_key(self) -> PrivacyConfig:
        if self.master_key_file and self.master_key_env:
            raise ValueError("give master_key_file or master_key_env, not both")
        # The file must be right wherever the configuration is read; the variable may
        # be missing in a shell that only lists messages (the daemon insists on it).
        if self.master_key_file or (self.master_key_env and self.master_key_env in os.environ):

            try:
                self.master_key()
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return self

    def master_key(self) -> bytes | None:
        """The master key, or None when encryption at rest is off; KeyFileError."""

        if self.master_key_file:
            return read_master(self.master_key_file)
        if self.master_key_env:
            value = os.environ.get(self.master_key_env)
            if not value:
                raise KeyFileError(f"environment variable {self.master_key_env} "
                                   "(master_key_env) is not set")
            return parse_master(value, f"environment variable {self.master_key_env}")
        return None


class AdminAPIConfig(Section):
    """The admin HTTP API: a tenant's messages, exports, erasure and audit log, per
    tenant token (`mailflowr-gateway token create --tenant T`)."""

    # host:port, e.g. 127.0.0.1:9467. Empty: no admin API.
    listen: OptionalHostPort = None
    # A certificate and key for HTTPS; empty: plain HTTP (keep it on loopback then).
    tls_cert_file: OptionalConfigPath = None
    tls_key_file: OptionalConfigPath = None
    # Where exports started over the API are written (one directory per tenant).
    export_directory: ConfigPath = Field(default=Path("var/exports"), validate_default=True)
    # The largest request body accepted (413 above).
    max_body: Size = 1_000_000
    # A connection whose request line and headers have not all arrived this long after
    # it opened (or after the previous response) is closed: a client sending a byte now
    # and then cannot hold it.  Idle keep-alive connections close after it too.
    header_timeout: Duration = Field(default=10.0, gt=0)
    # Exports of one tenant running at once on this instance; one more gets 429.
    max_exports_per_tenant: int = Field(default=2, ge=1)
    # A finished export's archive is deleted this long after it was written.
    export_expiry: Duration = Field(default=7 * 86400.0, gt=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> AdminAPIConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class DKIMConfig(Section):
    """Keys that sign what the gateway sends; the last one listed per domain and
    algorithm signs (list a new selector after the old one to rotate)."""

    keys: list[DKIMKeyConfig] = []

"""Typed daemon settings: loaded and validated once, then passed in.

``load(path)`` reads config/gateway.yaml, applies ``MAILFLOWR_SECTION__KEY``
environment overrides, validates everything and returns a frozen
``GatewayConfig``.  Every problem is reported as ``file:line: key: message``
(or ``environment MAILFLOWR_...: message``) in one ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.yamlfile import KeyPath, YamlDocument, YamlFileError, load_yaml, parse_yaml

ENV_PREFIX = "MAILFLOWR_"

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}$")


def parse_size(value: Any) -> Any:
    """Accept 10240000, "10MB", "25 MiB"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"expected a size such as 10240000, 10MB or 25MiB, got {value!r}")
        return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    return value


def parse_duration(value: Any) -> Any:
    """Accept 30, 0.5, "30s", "5m", "250ms"."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", value)
        if not m or m.group(2) not in _DURATION_UNITS:
            raise ValueError(f"expected a duration such as 30, 30s, 5m or 250ms, got {value!r}")
        return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return value


Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
# How long a dead instance's claims wait before others take them (renewed while alive).
LeaseTime = Annotated[float, BeforeValidator(parse_duration), Field(ge=1)]


def parse_hostport(value: str) -> tuple[str, int]:
    """'127.0.0.1:2525' or '[::1]:2525' -> (host, port); ValueError with a clear text."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^\s:\[\]]+):(\d{1,5})", value.strip())
    if not m:
        raise ValueError(f"expected HOST:PORT (IPv6 as [::1]:PORT), got {value!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def _hostport(value: str | None) -> str | None:
    if value is not None:
        parse_hostport(value)
    return value


OptionalHostPort = Annotated[str | None, AfterValidator(_hostport)]


def host_name(value: str) -> str:
    """A host name, an IP address, or an IPv6 address in brackets."""
    if value.startswith("[") and value.endswith("]"):
        return value
    if not _HOSTNAME.match(value.lower()) and not re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", value):
        raise ValueError(f"not a host name or address: {value!r}")
    return value


HostName = Annotated[str, AfterValidator(host_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Section):
    cert_file: Path | None = None
    key_file: Path | None = None

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


class SMTPConfig(_Section):
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
        if not _HOSTNAME.match(v.lower()):
            raise ValueError(f"not a valid host name: {v!r}")
        return v.lower()

    @property
    def address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)


class DatabaseConfig(_Section):
    url: str = "sqlite:///var/gateway.db"
    commit_batch_max: int = Field(default=512, ge=1)
    pool_size: int = Field(default=5, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
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
        return v


class StorageConfig(_Section):
    min_free_space: Size = 100_000_000


class PipelineConfig(_Section):
    parse_workers: int = Field(default=1, ge=1, le=64)
    parse_timeout: Duration = 20.0
    batch_size: int = Field(default=50, ge=1)
    poll_interval: Duration = 2.0
    lease_time: LeaseTime = 300.0
    burst_delay: Duration = 5.0


class MetricsConfig(_Section):
    listen: OptionalHostPort = "127.0.0.1:9466"
    tenant_labels: bool = True  # False: the tenant label reads "all" (very many tenants)



class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"
    personal_data: bool = False  # True writes addresses and subjects (debugging only)


_FLAG = re.compile(r"^\\?[A-Za-z0-9$_.\-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


def imap_folder(value: str) -> str:
    """A folder name as written in the configuration: anything printable, no CR, LF or
    NUL (those would end the IMAP command it is sent in)."""
    if not value or len(value) > 255 or any(c in value for c in "\r\n\x00"):
        raise ValueError(f"not a folder name (1-255 characters, no CR, LF or NUL): {value!r}")
    return value


Folder = Annotated[str, AfterValidator(imap_folder)]


class ImapAccountConfig(_Section):
    """A login on a customer's IMAP server (for keep_original and imap_pull)."""

    host: HostName
    # Default: 993 with tls: implicit, 143 otherwise.
    port: int | None = Field(default=None, ge=1, le=65535)
    # implicit: TLS from the start (993); starttls: required on the plain port; none:
    # plain text (loopback or a private network only).
    tls: Literal["implicit", "starttls", "none"] = "implicit"
    # CA certificates to trust (PEM); empty: the system's.
    ca_file: Path | None = None
    # Check the server's certificate and name (turn off only for a test server).
    verify: bool = True
    username: str
    # The password: a file (mode 0600 or 0640), or an environment variable (set for
    # example by systemd's EnvironmentFile=).  Never inline.
    password_file: Path | None = None
    password_env: str | None = None
    # Seconds to wait for the server's answer to one command.
    timeout: Duration = 60.0
    # Connections kept open at most for appending originals.
    connections: int = Field(default=4, ge=1, le=50)


    @field_validator("username")
    @classmethod
    def _username(cls, v: str) -> str:
        if not v or any(c in v for c in "\r\n\x00"):
            raise ValueError("a user name has no CR, LF or NUL")
        return v

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"not an environment variable name: {v!r}")
        return v

    @model_validator(mode="after")
    def _one_password(self) -> ImapAccountConfig:
        if (self.password_file is None) == (self.password_env is None):
            raise ValueError("give exactly one of password_file and password_env")
        if self.password_file is not None:
            from gateway.keyfiles import KeyFileError, read_secret

            try:
                read_secret(self.password_file)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"{self.ca_file}: no such file")
        return self

    @property
    def server_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    def password(self, env: Mapping[str, str] | None = None) -> str:
        """The password now (a rotated file or a changed environment is read anew);
        ValueError saying what is missing."""
        if self.password_file is not None:
            from gateway.keyfiles import KeyFileError, read_secret

            try:
                data = read_secret(self.password_file)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
            return data.decode("utf-8").rstrip("\r\n")
        assert self.password_env is not None
        value = (os.environ if env is None else env).get(self.password_env)
        if not value:
            raise ValueError(f"environment variable {self.password_env} is not set")
        return value


class KeepOriginalConfig(_Section):
    """Keep the untouched original of each inbound message on the tenant's own server."""

    # An imap_accounts entry: the original is appended to folder (IMAP APPEND) ...
    imap: str | None = None
    folder: Folder = "INBOX"
    # Flags the kept original gets, e.g. ["\\Seen"].
    flags: list[str] = []
    # Create folder when it does not exist.
    create_folder: bool = True
    # ... or a destinations entry: the original is relayed there by SMTP, to its
    # envelope recipients.
    destination: str | None = None
    # true: every inbound message; false: only those a workflow rule keeps
    # (action keep_original: true).
    all_mail: bool = True

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: list[str]) -> list[str]:
        for flag in v:
            if not _FLAG.match(flag) or flag.lower() == "\\recent":
                raise ValueError(f"not a flag that can be set: {flag!r}")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> KeepOriginalConfig:
        if (self.imap is None) == (self.destination is None):
            raise ValueError("give exactly one of imap (an imap_accounts entry) and "
                             "destination (a destinations entry)")
        return self


class ImapPullConfig(_Section):
    """A mailbox the gateway fetches the tenant's mail from."""

    # An imap_accounts entry.
    account: str
    folders: list[Folder] = ["INBOX"]
    # The envelope recipient imported mail is stored with (an address of the tenant):
    # what workflow rules see as the recipient.
    recipient: str
    # Seconds between checks; with IDLE (when the server offers it), new mail is
    # fetched at once and this is the longest wait.
    interval: Duration = 60.0
    idle: bool = True
    # What happens to a message on the server once its import is committed: keep
    # (untouched, not even marked \\Seen), mark_seen, move (to move_to) or delete.
    after_import: Literal["keep", "mark_seen", "move", "delete"] = "keep"
    move_to: Folder | None = None
    # Messages fetched per round trip (and per transaction).
    batch_size: int = Field(default=100, ge=1, le=200)

    @model_validator(mode="after")
    def _move_to(self) -> ImapPullConfig:
        if (self.after_import == "move") != (self.move_to is not None):
            raise ValueError("move_to goes with after_import: move, and only with it")
        if not self.folders:
            raise ValueError("folders: name at least one")
        return self


class UserConfig(_Section):
    """An internal user of the submission service."""

    password_hash: str
    # Addresses the user may send as, envelope and header From alike; ``*`` in a local
    # part matches any text (``*@example.test``: the whole domain).  Empty: the user's
    # own login address only.
    send_as: list[str] = []

    @field_validator("password_hash")
    @classmethod
    def _hashed(cls, v: str) -> str:
        from gateway.passwords import is_hash

        if not is_hash(v):
            raise ValueError("store a hash, not a password: mailflowr-gateway users hash-password")
        return v


class TenantConfig(_Section):
    name: str = ""
    domains: list[str] = Field(min_length=1)
    addresses: list[str] = []
    catch_all: bool = False
    users: dict[str, UserConfig] = {}
    # Mail failing DMARC from a domain that publishes p=reject: tag (accept it; the
    # result is stored, in Authentication-Results, and rules match dmarc: fail) or
    # reject (550 5.7.1 at the end of DATA).
    dmarc: Literal["tag", "reject"] = "tag"
    # The domain of rewritten (SRS) senders of copies forwarded for this tenant: one of
    # its domains; empty: the first.
    srs_domain: str | None = None
    # Keep each inbound original on the tenant's own mail server (see KeepOriginalConfig).
    keep_original: KeepOriginalConfig | None = None
    # Mailboxes to import mail from, by name (see ImapPullConfig).
    imap_pull: dict[str, ImapPullConfig] = {}

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        out = []
        for d in v:
            d = d.lower().rstrip(".")
            if not _HOSTNAME.match(d) or "." not in d:
                raise ValueError(f"not a valid domain: {d!r}")
            out.append(d)
        return out

    @model_validator(mode="after")
    def _addresses(self) -> TenantConfig:
        for a in self.addresses:
            local, at, domain = a.rpartition("@")
            if not at or not _LOCAL_PART.match(local) or local.startswith(".") or ".." in local:
                raise ValueError(f"not a plain address: {a!r}")
            if domain.lower() not in self.domains:
                raise ValueError(f"{a!r} is not in one of this tenant's domains")
        if not self.addresses and not self.catch_all:
            raise ValueError("a tenant needs addresses, or catch_all: true")
        for login, user in self.users.items():
            for a in user.send_as:
                local, at, domain = a.rpartition("@")
                if not at or not _LOCAL_PART.match(local):
                    raise ValueError(f"user {login}: send_as {a!r} is not an address or "
                                     "a pattern such as *@example.test")
                if domain.lower() not in self.domains:
                    raise ValueError(f"user {login}: send_as {a!r} is not in this tenant's domains")
            if not user.send_as and login.rpartition("@")[2].lower() not in self.domains:
                raise ValueError(f"user {login}: the login is not an address of this tenant's "
                                 "domains, so it may send as nothing: list send_as")
        if self.srs_domain is not None:
            if self.srs_domain.lower().rstrip(".") not in self.domains:
                raise ValueError(f"srs_domain {self.srs_domain!r} is not one of its domains")
        for name, pull in self.imap_pull.items():
            if not _TENANT_ID.match(name):
                raise ValueError(f"imap_pull {name!r}: use lower-case letters, digits, - and _")
            if pull.recipient.rpartition("@")[2].lower() not in self.domains:
                raise ValueError(f"imap_pull {name}: recipient {pull.recipient!r} is not in "
                                 "this tenant's domains")
        return self


class SubmissionConfig(_Section):
    """The listener internal users send through (AUTH after STARTTLS)."""

    # host:port, e.g. 127.0.0.1:2587 (587 in production); empty: no submission listener.
    listen: OptionalHostPort = None
    # Failed logins from one client IP within auth_window before it is turned away.
    max_auth_failures: int = Field(default=5, ge=1)
    auth_window: Duration = 600.0



class DestinationConfig(_Section):
    """A downstream SMTP server that rules may route to."""

    host: HostName
    port: int = Field(default=25, ge=1, le=65535)
    # none: plain; opportunistic: STARTTLS when offered; required: fail without it.
    tls: Literal["none", "opportunistic", "required"] = "opportunistic"



class DeliveryConfig(_Section):
    # host:port of the relay (smarthost) that copies to other domains go through.
    relay: OptionalHostPort = None
    relay_tls: Literal["none", "opportunistic", "required"] = "opportunistic"
    concurrency: int = Field(default=10, ge=1, le=500)
    timeout: Duration = 60.0
    poll_interval: Duration = 2.0
    retry_base: Duration = 60.0
    retry_max: Duration = 3600.0
    max_age: Duration = 5 * 86400.0
    lease_time: LeaseTime = 300.0
    # Without a relay, copies may go straight to the recipient domain's MX hosts.
    mx_lookup: bool = False
    # host:port of DNS servers for MX lookups; empty: the system's (/etc/resolv.conf).
    dns_servers: list[str] = []
    dns_timeout: Duration = 10.0
    mx_port: int = Field(default=25, ge=1, le=65535)

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



class PoliciesConfig(_Section):
    # Where workflows.yaml, retention.yaml and subprocessors.yaml are read from.
    directory: Path = Path("policies")
    # How often the files are checked for changes (then reloaded); 0: only on SIGHUP.
    watch_interval: Duration = 2.0

    @property
    def workflows(self) -> Path:
        return self.directory / "workflows.yaml"


class RetentionConfig(_Section):
    """The sweeper that deletes what policies/retention.yaml says has expired."""

    # Time between sweeps (the first runs one interval after start); 0: no sweeper here.
    sweep_interval: Duration = 3600.0
    # Messages deleted per transaction.
    batch_size: int = Field(default=200, ge=1, le=10_000)
    # Least pause between two batches; the sweeper also rests as long as a batch took,
    # so acceptance keeps the database's write lock at least half of the time.
    batch_pause: Duration = 0.02


class DKIMKeyConfig(_Section):
    """One signing key: its DNS record is SELECTOR._domainkey.DOMAIN."""

    domain: str
    selector: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    key_file: Path

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        v = v.lower().rstrip(".")
        if not _HOSTNAME.match(v):
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
        from gateway.keyfiles import KeyFileError, load

        try:
            load(self.key_file, self.domain, self.selector, self.algorithm)
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
        return self


class AuthConfig(_Section):
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
    # Processes that run these checks and the ARC seals and DKIM signatures of copies;
    # 0: threads of the daemon's own process (slower: they share one core with it).
    workers: int = Field(default=1, ge=0, le=64)

    @field_validator("authserv_id")
    @classmethod
    def _authserv_id(cls, v: str | None) -> str | None:
        if v is not None and not _HOSTNAME.match(v.lower()):
            raise ValueError(f"an authserv-id is a host name: {v!r}")
        return v


class SRSConfig(_Section):
    """Sender rewriting of forwarded copies, so that they pass SPF at the receiver."""

    # The HMAC secret(s), one per line, first one signs; mode 0600. Empty: no rewriting.
    secret_file: str | None = None
    # Days a bounce to a rewritten sender is accepted.
    max_age_days: int = Field(default=21, ge=1, le=1000)

    @model_validator(mode="after")
    def _secrets_load(self) -> SRSConfig:
        if self.secret_file:
            from gateway.keyfiles import KeyFileError
            from gateway.srs import load_secrets

            try:
                load_secrets(self.secret_file)
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return self


class PrivacyConfig(_Section):
    """Data-subject requests, the audit chain and tenant deactivation."""

    # The gateway's own secret (64 hex digits, mode 0600), made at first start when
    # missing. It keys the audit chain and the hashes erasure names people by; keep it
    # out of database backups, and give every instance on one database the same file.
    key_file: Path = Path("var/privacy.key")
    # Encryption at rest of the raw originals: the master key (64 hex digits) in a file
    # (mode 0600) or in an environment variable named here. Neither: stored in clear.
    master_key_file: Path | None = None
    master_key_env: str | None = None
    # Where the tenants' data keys are kept, wrapped by the master key. Not in the
    # database, so deactivating a tenant makes its mail in database backups unreadable.
    keystore: Path = Path("var/keys")

    @model_validator(mode="after")
    def _master_key(self) -> PrivacyConfig:
        if self.master_key_file and self.master_key_env:
            raise ValueError("give master_key_file or master_key_env, not both")
        # The file must be right wherever the configuration is read; the variable may
        # be missing in a shell that only lists messages (the daemon insists on it).
        if self.master_key_file or (self.master_key_env and self.master_key_env in os.environ):
            from gateway.keyfiles import KeyFileError

            try:
                self.master_key()
            except KeyFileError as exc:
                raise ValueError(str(exc)) from None
        return self

    def master_key(self) -> bytes | None:
        """The master key, or None when encryption at rest is off; KeyFileError."""
        from gateway.keyfiles import KeyFileError, parse_master, read_master

        if self.master_key_file:
            return read_master(self.master_key_file)
        if self.master_key_env:
            value = os.environ.get(self.master_key_env)
            if not value:
                raise KeyFileError(f"environment variable {self.master_key_env} "
                                   "(master_key_env) is not set")
            return parse_master(value, f"environment variable {self.master_key_env}")
        return None


class AdminAPIConfig(_Section):
    """The admin HTTP API: a tenant's messages, exports, erasure and audit log, per
    tenant token (`mailflowr-gateway token create --tenant T`)."""

    # host:port, e.g. 127.0.0.1:9467. Empty: no admin API.
    listen: OptionalHostPort = None
    # A certificate and key for HTTPS; empty: plain HTTP (keep it on loopback then).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Where exports started over the API are written (one directory per tenant).
    export_directory: Path = Path("var/exports")
    # The largest request body accepted (413 above).
    max_body: Size = 1_000_000
    # A connection whose request line and headers have not all arrived this long after
    # it opened (or after the previous response) is closed: a client sending a byte now
    # and then cannot hold it.  Idle keep-alive connections close after it too.
    header_timeout: Duration = Field(default=10.0, gt=0)
    # Exports of one tenant running at once on this instance; one more gets 429.
    max_exports_per_tenant: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _tls_pair(self) -> AdminAPIConfig:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return self


class DKIMConfig(_Section):
    """Keys that sign what the gateway sends; the last one listed per domain and
    algorithm signs (list a new selector after the old one to rotate)."""

    keys: list[DKIMKeyConfig] = []


class GatewayConfig(_Section):
    smtp: SMTPConfig = SMTPConfig()
    database: DatabaseConfig = DatabaseConfig()
    storage: StorageConfig = StorageConfig()
    pipeline: PipelineConfig = PipelineConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    submission: SubmissionConfig = SubmissionConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    policies: PoliciesConfig = PoliciesConfig()
    retention: RetentionConfig = RetentionConfig()
    dkim: DKIMConfig = DKIMConfig()
    auth: AuthConfig = AuthConfig()
    srs: SRSConfig = SRSConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    admin_api: AdminAPIConfig = AdminAPIConfig()
    destinations: dict[str, DestinationConfig] = {}
    imap_accounts: dict[str, ImapAccountConfig] = {}
    tenants: dict[str, TenantConfig] = {}

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, v: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        owner: dict[str, str] = {}
        logins: dict[str, str] = {}
        for tid, tenant in v.items():
            for login in tenant.users:
                if login.lower() in logins:
                    raise ValueError(f"user {login} belongs to both {logins[login.lower()]} "
                                     f"and {tid}")
                logins[login.lower()] = tid
            if not _TENANT_ID.match(tid):
                raise ValueError(f"tenant id {tid!r}: use lower-case letters, digits, - and _")
            for d in tenant.domains:
                if d in owner:
                    raise ValueError(f"domain {d} belongs to both {owner[d]} and {tid}")
                owner[d] = tid
        return v

    @model_validator(mode="after")
    def _submission_needs_tls(self) -> GatewayConfig:
        if self.submission.listen and not self.smtp.tls.enabled:
            raise ValueError("submission.listen needs smtp.tls.cert_file and key_file: "
                             "AUTH is only offered after STARTTLS")
        return self

    @model_validator(mode="after")
    def _dmarc_reject_needs_dmarc(self) -> GatewayConfig:
        rejecting = [t for t, tenant in self.tenants.items() if tenant.dmarc == "reject"]
        if rejecting and not self.auth.check_dmarc:
            raise ValueError(f"tenant {rejecting[0]} has dmarc: reject, but auth.check_dmarc "
                             "is false")
        return self

    @model_validator(mode="after")
    def _imap_references(self) -> GatewayConfig:
        for tid, tenant in self.tenants.items():
            keep = tenant.keep_original
            if keep is not None and keep.imap is not None and keep.imap not in self.imap_accounts:
                raise ValueError(f"tenant {tid}: keep_original.imap {keep.imap!r} is not in "
                                 "imap_accounts")
            if (keep is not None and keep.destination is not None
                    and keep.destination not in self.destinations):
                raise ValueError(f"tenant {tid}: keep_original.destination "
                                 f"{keep.destination!r} is not in destinations")
            for name, pull in tenant.imap_pull.items():
                if pull.account not in self.imap_accounts:
                    raise ValueError(f"tenant {tid}: imap_pull {name}: account "
                                     f"{pull.account!r} is not in imap_accounts")
        return self

    @property
    def authserv_id(self) -> str:
        return self.auth.authserv_id or self.smtp.hostname

    @property
    def sqlite_path(self) -> Path | None:
        """The database file for sqlite:/// URLs (None for PostgreSQL or memory)."""
        from sqlalchemy.engine import make_url

        url = make_url(self.database.url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            return Path(url.database)
        return None


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[KeyPath, str]:
    """Overlay MAILFLOWR_A__B=value onto data; returns the paths set from env."""
    origins: dict[KeyPath, str] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = tuple(part.lower() for part in name[len(ENV_PREFIX):].split("__"))
        if not all(path):
            raise ConfigError([f"environment {name}: empty key in the variable name"])
        # Values read as YAML scalars (7 is a number, true a boolean); empty means null.
        try:
            value = parse_yaml(env[name], name).data if env[name].strip() else None
        except YamlFileError:
            value = env[name]
        node = data
        for key in path[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError([f"environment {name}: {key} is not a section"])
            node = child
        node[path[-1]] = value
        origins[path] = name
    return origins


def _format_problem(doc: YamlDocument, origins: dict[KeyPath, str], loc: KeyPath, msg: str) -> str:
    key = ".".join(str(p) for p in loc) or "(top level)"
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in origins:
            return f"environment {origins[tuple(loc[:n])]}: {key}: {msg}"
    return f"{doc.where(loc)}: {key}: {msg}"


def load(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load, override from the environment and validate; raises ConfigError."""
    try:
        doc = load_yaml(path)
    except YamlFileError as exc:
        raise ConfigError([str(exc)]) from None
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([f"{doc.path}:1: the file must be a mapping of sections"])
    origins = _apply_env(data, os.environ if env is None else env)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(_format_problem(doc, origins, loc, msg))
        raise ConfigError(problems) from None
    return config

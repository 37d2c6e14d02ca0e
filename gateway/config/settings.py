"""Typed daemon settings: loaded and validated once, then passed in.

``load(path)`` reads config/gateway.yaml, applies ``MAILFLOWR_SECTION__KEY``
environment overrides, validates everything and returns a frozen
``GatewayConfig``.  Every problem is reported as ``file:line: key: message``
(or ``environment MAILFLOWR_...: message``) in one ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.config.accounts import ImapAccountConfig, TenantConfig
from gateway.config.sections import (
    AdminAPIConfig,
    AuthConfig,
    DatabaseConfig,
    DeliveryConfig,
    DestinationConfig,
    DKIMConfig,
    LoggingConfig,
    MetricsConfig,
    PipelineConfig,
    PoliciesConfig,
    PrivacyConfig,
    RetentionConfig,
    SMTPConfig,
    SRSConfig,
    StorageConfig,
    SubmissionConfig,
)
from gateway.config.values import ENV_PREFIX, TENANT_ID, Section
from gateway.errors import ConfigError
from gateway.yamlfile import KeyPath, YamlDocument, YamlFileError, load_yaml, parse_yaml


class GatewayConfig(Section):
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
            if not TENANT_ID.match(tid):
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

    @model_validator(mode="after")
    def _request_address(self) -> GatewayConfig:
        """privacy.request_address must be one the gateway receives: an address (or the
        domain, catch_all) of a tenant, normally the operator's own."""
        address = self.privacy.request_address
        if not address:
            return self
        local, at, domain = address.rpartition("@")
        if not at or not local or "+" in local or " " in address:
            raise ValueError(f"privacy.request_address {address!r} is not a plain address")
        for tid, tenant in self.tenants.items():
            if domain.lower() in (d.lower() for d in tenant.domains):
                if tenant.catch_all or address.lower() in (a.lower() for a in tenant.addresses):
                    return self
                raise ValueError(f"privacy.request_address {address}: add it to the "
                                 f"addresses of tenant {tid}, whose domain it is in")
        raise ValueError(f"privacy.request_address {address}: no tenant has the domain "
                         f"{domain} (the operator's own tenant receives it)")

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
        # A value is text, read by the type of its setting (pydantic: "010" is 10 for a
        # number, "no" false for a switch and "no" for a name, never YAML 1.1's octal or
        # booleans); a list or a mapping is written as YAML flow ([a, b], {k: v}); empty
        # means unset.
        value: Any = env[name]
        if not value.strip():
            value = None
        elif value.strip()[0] in "[{":
            try:
                value = parse_yaml(value, name).data
            except YamlFileError:
                pass
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
    return _load(path, env)[0]


SECRET_KEYS = frozenset({"password_hash"})  # shown as set or unset, never the value


def explain(path: str | Path, env: Mapping[str, str] | None = None,
            ) -> list[tuple[str, Any, str, bool]]:
    """Every effective setting as (dotted key, value, where it came from: ``file:line``,
    ``environment NAME`` or ``default``, whether the value is the default), secrets as
    ``(set)``/``(unset)``; what ``config show`` prints (as Postfix's postconf)."""
    config, doc, origins = _load(path, env)
    # the defaults: what an empty file in the same folder gives
    defaults = dict(_settings(GatewayConfig.model_validate(
        {name: {} for name in _sections()}, context={"base": _base(doc)})))

    def origin(key: KeyPath) -> str:
        for n in range(len(key), 0, -1):
            if key[:n] in origins:
                return f"environment {origins[key[:n]]}"
        if key in doc.lines:
            return f"{doc.path}:{doc.lines[key][0]}"
        return "default"

    return [(".".join(str(k) for k in key), value, origin(key),
             key in defaults and defaults[key] == value)
            for key, value in _settings(config)]


def _settings(config: GatewayConfig) -> list[tuple[KeyPath, Any]]:
    """Each setting's key path and value, secrets as ``(set)``/``(unset)``."""
    out: list[tuple[KeyPath, Any]] = []

    def walk(value: Any, key: KeyPath) -> None:
        if isinstance(value, dict) and value:
            for name, item in value.items():
                walk(item, (*key, name))
            return
        if key and key[-1] in SECRET_KEYS:
            value = "(set)" if value else "(unset)"
        out.append((key, value))

    walk(config.model_dump(mode="json"), ())
    return out


def _sections() -> list[str]:
    """The top-level keys that are sections of settings (an absent one reads as empty)."""
    return [name for name, field in GatewayConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)]


def _base(doc: YamlDocument) -> Path:
    """The folder relative paths are read from: the one the file is in, as the kernel
    finds it (a linked file, as a ConfigMap mounts it, is read from where its name is,
    not its target's)."""
    return Path(doc.path).absolute().parent.resolve()


def _load(path: str | Path, env: Mapping[str, str] | None,
          ) -> tuple[GatewayConfig, YamlDocument, dict[KeyPath, str]]:
    try:
        doc = load_yaml(path)
    except YamlFileError as exc:
        raise ConfigError([str(exc)]) from None
    data = doc.data if doc.data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError([f"{doc.path}:1: the file must be a mapping of sections"])
    origins = _apply_env(data, os.environ if env is None else env)
    for name in _sections():
        # A section left out is read as written empty, so that its paths, too, are
        # read from the configuration's folder.
        data.setdefault(name, {})
    try:
        config = GatewayConfig.model_validate(data, context={"base": _base(doc)})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append(_format_problem(doc, origins, loc, msg))
        raise ConfigError(problems) from None
    return config, doc, origins


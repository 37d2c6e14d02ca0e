"""The gateway's settings (gateway.yaml): ``load`` reads and validates them into a
frozen ``GatewayConfig`` of sections.  ``values`` holds the value types, ``sections``
the daemon's sections, ``accounts`` the tenants with their users and mailboxes,
``settings`` the whole file and its loading."""

from gateway.config.accounts import (
    ImapAccountConfig,
    ImapPullConfig,
    KeepOriginalConfig,
    TenantConfig,
    UserConfig,
)
from gateway.config.sections import SMTPConfig, SubmissionConfig
from gateway.config.settings import GatewayConfig, explain, load
from gateway.config.values import parse_duration, parse_hostport, parse_size

__all__ = [
    "GatewayConfig",
    "ImapAccountConfig",
    "ImapPullConfig",
    "KeepOriginalConfig",
    "SMTPConfig",
    "SubmissionConfig",
    "TenantConfig",
    "UserConfig",
    "explain",
    "load",
    "parse_duration",
    "parse_hostport",
    "parse_size",
]

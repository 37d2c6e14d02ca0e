"""The libraries whose internals the gateway relies on, checked by name: an upgrade
past the releases these were read against fails here, loudly, with what to re-read,
rather than as a strange fault in production (pyproject.toml bounds them too)."""

from __future__ import annotations

import asyncio
from importlib import metadata

import aioimaplib
import aiosmtpd
from aiosmtpd.smtp import SMTP

from gateway.ingress import fastinit

# aiosmtpd: gateway/ingress/smtp.py overrides these of SMTP; fastinit.py copies __init__
SMTP_METHODS = ("_call_handler_hook", "_cb_client_connected", "_reset_timeout",
                "_set_post_data_state", "_timeout_cb", "_handle_client", "connection_lost",
                "challenge_auth", "push")
SMTP_STATE = ("_handler_coroutine", "_smtp_methods", "_handle_hooks", "_auth_methods",
              "_ehlo_hook_ver", "_auth_callback", "_tls_protocol",
              "_original_transport", "_timeout_handle", "_timeout_duration", "_decode_data",
              "_enforce_call_limit", "_tls_handshake_okay", "_auth_require_tls",
              "_auth_required", "_authenticator")


def test_aiosmtpd_is_a_release_the_ingress_was_read_against():
    assert aiosmtpd.__version__ in fastinit.FAST_INIT_VERSIONS, (
        f"aiosmtpd {aiosmtpd.__version__}: gateway/ingress/fastinit.py copies "
        f"{sorted(fastinit.FAST_INIT_VERSIONS)}'s SMTP.__init__ and gateway/ingress/smtp.py "
        "overrides its internals; read both against this release, then add it")
    missing = [name for name in SMTP_METHODS if not callable(getattr(SMTP, name, None))]
    assert missing == [], f"aiosmtpd {aiosmtpd.__version__} has no SMTP.{missing}"

    class Handler:
        pass

    async def made() -> SMTP:
        return SMTP(Handler())

    protocol = asyncio.run(made())
    missing = [name for name in SMTP_STATE if not hasattr(protocol, name)]
    assert missing == [], f"aiosmtpd {aiosmtpd.__version__}: an SMTP has no {missing}"


def test_aioimaplib_still_reads_untagged_responses_where_the_gateway_watches():
    version = metadata.version("aioimaplib")
    assert version.startswith("2.0."), (
        f"aioimaplib {version}: gateway/imap.py wraps IMAP4ClientProtocol._untagged_response "
        "to see EXISTS during IDLE; read it against this release, then widen the bound")
    assert callable(getattr(aioimaplib.IMAP4ClientProtocol, "_untagged_response", None))
    assert callable(getattr(aioimaplib.IMAP4ClientProtocol, "new_tag", None))

"""Recipient ownership and relay refusal, as a table (no server)."""

from __future__ import annotations

import pytest

from gateway.config import TenantConfig
from gateway.tenancy import Accepted, Refused, TenantDirectory

DIRECTORY = TenantDirectory(
    {
        "acme": TenantConfig(domains=["acme.test"], addresses=["support@acme.test"]),
        "globex": TenantConfig(domains=["globex.test"], catch_all=True),
    }
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("support@acme.test", ("acme", "support@acme.test")),
        ("Support@ACME.test", ("acme", "Support@acme.test")),
        ("support+x@acme.test", ("acme", "support+x@acme.test")),
        ("support@acme.test.", ("acme", "support@acme.test")),
        ("anyone@globex.test", ("globex", "anyone@globex.test")),
        ('"anyone"@globex.test', ("globex", '"anyone"@globex.test')),
        ("nobody@acme.test", "550 5.1.1"),
        ("x@other.test", "554 5.7.1"),
        ("x%other.test@acme.test", "554 5.7.1"),
        ('"x@other.test"@acme.test', "554 5.7.1"),
        ('"x%other"@globex.test', "554 5.7.1"),
        ("other.test!x@acme.test", "554 5.7.1"),
        ("other.test!x", "554 5.7.1"),
        ("@other.test:x@acme.test", "554 5.7.1"),
        ("x@[127.0.0.1]", "554 5.7.1"),
        ("x@acme.test.other.test", "554 5.7.1"),
        ("x", "554 5.7.1"),
        ("@acme.test", "554 5.7.1"),
        ("support@acme.test\r\nRCPT TO:<x@other.test>", "501 5.1.3"),
        ("sup port@acme.test", "501 5.1.3"),
        ("jos\u00e9@globex.test", "553 5.6.7"),
    ],
)
def test_resolve(address, expected):
    verdict = DIRECTORY.resolve(address, smtputf8=False)
    if isinstance(expected, tuple):
        assert verdict == Accepted(*expected)
    else:
        assert isinstance(verdict, Refused)
        assert verdict.reply.startswith(expected)
        assert "\r" not in verdict.reply and "\n" not in verdict.reply


def test_utf8_address_with_smtputf8():
    assert DIRECTORY.resolve("jos\u00e9@globex.test", smtputf8=True) == Accepted(
        "globex", "jos\u00e9@globex.test"
    )

"""Admin API tokens: one tenant each, stored as a hash, shown once when made.

A token reads ``mfr_<id>_<secret>``: the id (12 hex digits) finds the row, the
secret (256 random bits) is compared with the stored SHA-256 in constant time.
A slow password hash is not needed: the secret is random, not chosen by a person.

A token has scopes, what it may do: ``read`` (every GET but an export's archive),
``export`` (start exports, download them), ``erase`` (erasures, deleting a message),
``admin`` (all of these, and what changes the tenant's records: objections, retrying
and dropping deliveries).  A token of a deactivated tenant is refused at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update

from gateway.clock import utcnow
from gateway.store.models import api_tokens, tenants
from gateway.store.repository import Store

_TOKEN = re.compile(r"^mfr_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_TOUCH_EVERY = timedelta(minutes=1)  # last_used_at is written at most this often
SCOPES = ("read", "export", "erase", "admin")
ADMIN = "admin"  # every scope


@dataclass(frozen=True)
class TokenOwner:
    """Who makes a call: an API token, or a console user (``kind`` "console", the
    login as ``id``), of one tenant, with its scopes."""

    id: str
    tenant_id: str
    scopes: frozenset[str]
    kind: str = "api"

    def may(self, scope: str) -> bool:
        return scope in self.scopes or ADMIN in self.scopes

    @property
    def actor(self) -> str:
        """How the audit log names it: ``api:TOKEN-ID`` or ``console:LOGIN``."""
        return f"{self.kind}:{self.id}"


class TokenRefused(Exception):
    """Why a token was refused, for the log and the metric (never shown to the caller):
    ``reason`` is malformed, unknown, wrong_secret, revoked or deactivated."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_scopes(text: str) -> frozenset[str]:
    """``read,export`` (commas or spaces) as a set of scopes; ValueError names an
    unknown one."""
    found = frozenset(part for part in text.replace(",", " ").split())
    unknown = sorted(found - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r} (known: {', '.join(SCOPES)})")
    if not found:
        raise ValueError(f"at least one scope is needed ({', '.join(SCOPES)})")
    return found


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

    def create(self, tenant: str, name: str, scopes: frozenset[str]) -> tuple[str, str]:
        """(id, token); the token is not kept anywhere and cannot be shown again."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        with self.store.writing() as conn:
            conn.execute(insert(api_tokens).values(
                id=token_id, tenant_id=tenant, name=name[:200], secret_sha256=_digest(secret),
                created_at=utcnow(), scopes=" ".join(s for s in SCOPES if s in scopes)))
        return token_id, f"mfr_{token_id}_{secret}"

    def verify(self, token: str) -> TokenOwner:
        """The token's owner; TokenRefused says why not."""
        m = _TOKEN.match(token)
        if m is None:
            raise TokenRefused("malformed", "not a token of this gateway")
        with self.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(
                select(api_tokens, tenants.c.active)
                .join(tenants, tenants.c.id == api_tokens.c.tenant_id, isouter=True)
                .where(api_tokens.c.id == m.group(1))).first()
        if row is None:
            raise TokenRefused("unknown", "unknown token")
        if not hmac.compare_digest(row.secret_sha256, _digest(m.group(2))):
            raise TokenRefused("wrong_secret", f"wrong secret for token {row.id}")
        if row.revoked_at is not None:
            raise TokenRefused("revoked", f"token {row.id} is revoked")
        if row.active is False:
            raise TokenRefused("deactivated", f"token {row.id}: tenant deactivated")
        now = utcnow()
        last = row.last_used_at
        if last is None or now - (last if last.tzinfo else last.replace(tzinfo=now.tzinfo)) \
                > _TOUCH_EVERY:
            with self.store.writing() as conn:
                conn.execute(update(api_tokens).where(api_tokens.c.id == row.id)
                             .values(last_used_at=now))
        return TokenOwner(row.id, row.tenant_id, frozenset(row.scopes.split()))

    def list(self, tenant: str | None = None) -> list[dict[str, Any]]:
        q = select(api_tokens.c.id, api_tokens.c.tenant_id, api_tokens.c.name,
                   api_tokens.c.created_at, api_tokens.c.last_used_at,
                   api_tokens.c.revoked_at, api_tokens.c.scopes).order_by(api_tokens.c.created_at)
        if tenant is not None:
            q = q.where(api_tokens.c.tenant_id == tenant)
        with self.engine.connect().execution_options(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def revoke(self, token_id: str, when: datetime | None = None) -> bool:
        with self.store.writing() as conn:
            done = conn.execute(update(api_tokens)
                                .where(api_tokens.c.id == token_id,
                                       api_tokens.c.revoked_at.is_(None))
                                .values(revoked_at=when or utcnow())).rowcount
        return bool(done == 1)

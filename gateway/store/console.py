"""The web console's users and sessions.

A console user is a person of one tenant (its privacy officer, say) who logs in
with a password, kept as a scrypt hash (``gateway.passwords``), with the scopes of
an API token.  Logging in, with a password or with an API token, opens a session:
its secret goes to the browser as a cookie and is kept here as its SHA-256 only,
beside a CSRF secret the console's script sends back with every call.

A session is checked on every request against what it came from: the user still
exists (with its scopes of now), the token is not revoked, the tenant is active;
it ends after IDLE without a request, and LIFETIME after the login whatever
happens.  Deleting a user ends its sessions; a tenant's purge removes both.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, insert, or_, select, update

from gateway.clock import aware, utcnow
from gateway.store.models import api_tokens, console_sessions, console_users, tenants
from gateway.store.repository import Store
from gateway.store.tokens import SCOPES, TokenOwner

IDLE = timedelta(minutes=30)  # a session without a request for this long is over
LIFETIME = timedelta(hours=12)  # and any session this long after its login
_TOUCH_EVERY = timedelta(minutes=1)  # seen_at is written at most this often


@dataclass(frozen=True)
class Session:
    owner: TokenOwner
    csrf: str

    def csrf_matches(self, given: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), given.encode())


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ConsoleStore:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------ users
    def add_user(self, tenant: str, login: str, password_hash: str,
                 scopes: frozenset[str]) -> bool:
        """A new user; False when the login is taken (in any tenant)."""
        with self.store.writing() as conn:
            if conn.execute(select(console_users.c.login)
                            .where(console_users.c.login == login)).first() is not None:
                return False
            conn.execute(insert(console_users).values(
                login=login, tenant_id=tenant, password_hash=password_hash,
                scopes=" ".join(s for s in SCOPES if s in scopes), created_at=utcnow()))
        return True

    def remove_user(self, login: str) -> bool:
        """Delete a user and end its sessions; False when there is no such user."""
        with self.store.writing() as conn:
            conn.execute(delete(console_sessions).where(console_sessions.c.login == login))
            return bool(conn.execute(delete(console_users)
                                     .where(console_users.c.login == login)).rowcount)

    def users(self, tenant: str | None = None) -> list[dict[str, Any]]:
        q = select(console_users.c.login, console_users.c.tenant_id, console_users.c.scopes,
                   console_users.c.created_at).order_by(console_users.c.login)
        if tenant is not None:
            q = q.where(console_users.c.tenant_id == tenant)
        with self.store.engine.connect().execution_options(readonly=True) as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def user(self, login: str) -> dict[str, Any] | None:
        """A user of an active tenant, with its password hash (for a login)."""
        with self.store.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(
                select(console_users, tenants.c.active)
                .join(tenants, tenants.c.id == console_users.c.tenant_id, isouter=True)
                .where(console_users.c.login == login)).first()
        if row is None or row.active is False:
            return None
        return dict(row._mapping)

    # ------------------------------------------------------------ sessions
    def open(self, owner: TokenOwner) -> tuple[str, str]:
        """A session for ``owner`` (a console user or an API token): its secret, for
        the cookie, and its CSRF secret.  Sessions that are over go at the same time."""
        secret, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), utcnow()
        with self.store.writing() as conn:
            conn.execute(delete(console_sessions).where(or_(
                console_sessions.c.created_at < now - LIFETIME,
                console_sessions.c.seen_at < now - IDLE)))
            conn.execute(insert(console_sessions).values(
                secret_sha256=_digest(secret), tenant_id=owner.tenant_id,
                login=owner.id if owner.kind == "console" else None,
                token_id=owner.id if owner.kind == "api" else None,
                csrf=csrf, created_at=now, seen_at=now))
        return secret, csrf

    def session(self, secret: str) -> Session | None:
        """The session of a cookie's secret, if it is still open and what it came from
        is still valid; its owner with the scopes it has now."""
        with self.store.engine.connect().execution_options(readonly=True) as conn:
            row = conn.execute(
                select(console_sessions, console_users.c.scopes.label("user_scopes"),
                       api_tokens.c.scopes.label("token_scopes"),
                       api_tokens.c.revoked_at, tenants.c.active)
                .join(console_users, console_users.c.login == console_sessions.c.login,
                      isouter=True)
                .join(api_tokens, api_tokens.c.id == console_sessions.c.token_id,
                      isouter=True)
                .join(tenants, tenants.c.id == console_sessions.c.tenant_id, isouter=True)
                .where(console_sessions.c.secret_sha256 == _digest(secret))).first()
        if row is None or row.active is False:
            return None
        now = utcnow()
        if aware(row.created_at) < now - LIFETIME or aware(row.seen_at) < now - IDLE:
            return None
        if row.login is not None and row.user_scopes is not None:
            owner = TokenOwner(row.login, row.tenant_id, frozenset(row.user_scopes.split()),
                               "console")
        elif row.token_id is not None and row.token_scopes is not None \
                and row.revoked_at is None:
            owner = TokenOwner(row.token_id, row.tenant_id,
                               frozenset(row.token_scopes.split()))
        else:  # the user was removed, the token revoked or gone
            return None
        if now - aware(row.seen_at) > _TOUCH_EVERY:
            with self.store.writing() as conn:
                conn.execute(update(console_sessions)
                             .where(console_sessions.c.secret_sha256 == row.secret_sha256)
                             .values(seen_at=now))
        return Session(owner, row.csrf)

    def close(self, secret: str) -> None:
        with self.store.writing() as conn:
            conn.execute(delete(console_sessions)
                         .where(console_sessions.c.secret_sha256 == _digest(secret)))

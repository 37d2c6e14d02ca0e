"""The web console: a tenant's privacy officer searches, reads and acts on the
tenant's mail in a browser, through the admin API's own routes.

The console is three static files (``static/``: a page, its script, its style)
served under ``/console/``, and a session: logging in (``POST /console/login``,
with an API token or a console user's login and password) sets a cookie
``__Host-mailflowr-console`` (Secure, HttpOnly, SameSite=Strict) and answers a
CSRF secret, which the script sends as ``X-CSRF-Token`` with every call to
``/api/v1/...``.  The API takes a session in place of a bearer token only with
that header (``caller``): every action of the console is a call of the API, with
its scopes, its tenant isolation and its audit, and no other path.

Failed logins are counted per client address and per login (``Attempts``): after
MAX_FAILURES in WINDOW, 429 with Retry-After.  A password is checked by one scrypt
at a time (each takes 128 MiB), an unknown login against a hash all the same, so
the time of the answer does not say which logins exist.  Every response carries
a Content-Security-Policy that allows only the console's own script and style.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web

from gateway.api.http import ApiError, Route, body_text, read_body, reply
from gateway.metrics import Metrics
from gateway.passwords import hash_password, verify
from gateway.store.console import LIFETIME, ConsoleStore, Session
from gateway.store.repository import Store
from gateway.store.tokens import TokenOwner, TokenRefused, TokenStore

log = logging.getLogger("gateway.api")

COOKIE = "__Host-mailflowr-console"
CSRF_HEADER = "X-CSRF-Token"
MAX_FAILURES = 10  # failed logins from one address, or for one login, in WINDOW
WINDOW = 300.0  # seconds
REFUSED = "wrong token, or wrong login or password"
# No inline script or style, nothing from elsewhere, no framing, no form sent away
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
          "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
          "base-uri 'none'")
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
           "Cross-Origin-Opener-Policy": "same-origin", "Cache-Control": "no-store"}
_STATIC = Path(__file__).parent / "static"
_FILES = {"": ("index.html", "text/html"), "console.js": ("console.js", "text/javascript"),
          "console.css": ("console.css", "text/css")}


@functools.cache
def _decoy() -> str:
    """A hash an unknown login's password is checked against, to take the same time."""
    return hash_password(secrets.token_urlsafe(16))


class Attempts:
    """Failed logins by key (a client address, a login) within the last WINDOW
    seconds; at most ``keys`` keys are remembered, the oldest forgotten first."""

    def __init__(self, most: int = MAX_FAILURES, window: float = WINDOW,
                 keys: int = 10_000) -> None:
        self.most, self.window, self.keys = most, window, keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may try again (0: now)."""
        times = self._failures.get(key)
        if times is None:
            return 0.0
        now = time.monotonic()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0.0
        return times[0] + self.window - now if len(times) >= self.most else 0.0

    def failed(self, key: str) -> None:
        times = self._failures.pop(key, None) or deque(maxlen=self.most)
        times.append(time.monotonic())
        self._failures[key] = times
        while len(self._failures) > self.keys:
            self._failures.popitem(last=False)


class ConsoleRoutes:
    def __init__(self, store: Store, tokens: TokenStore, metrics: Metrics) -> None:
        self.store = store
        self.tokens = tokens
        self.sessions = ConsoleStore(store)
        self.metrics = metrics
        self.attempts = Attempts()
        self._hashing = asyncio.Semaphore(1)
        self._files = {name: ((_STATIC / file).read_bytes(), kind)
                       for name, (file, kind) in _FILES.items()}

    def routes(self) -> list[Route]:
        """Its routes, below the root (not /api/v1), none of them with a token."""
        return [Route("GET", "/", self.home, None),
                Route("GET", "/console", self.home, None),
                *(Route("GET", "/console/" + name, self.static, None)
                  for name in self._files),
                Route("POST", "/console/login", self.login, None),
                Route("POST", "/console/logout", self.logout, None),
                Route("GET", "/console/session", self.session, None)]

    # ------------------------------------------------------------ the API's caller
    async def caller(self, request: web.Request) -> TokenOwner:
        """The owner of the request's console session, for the API's routes; a session
        without its CSRF header is refused whatever the method."""
        session = await self._session(request)
        if not session.csrf_matches(request.headers.get(CSRF_HEADER, "")):
            raise ApiError(403, f"a console session needs its {CSRF_HEADER} header")
        return session.owner

    async def _session(self, request: web.Request) -> Session:
        secret = request.cookies.get(COOKIE, "")
        session = await asyncio.to_thread(self.sessions.session, secret) \
            if 20 <= len(secret) <= 100 else None
        if session is None:
            raise TokenRefused("console_session", "no open console session")
        return session

    # ------------------------------------------------------------ pages
    async def home(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/console/"})

    async def static(self, request: web.Request) -> web.Response:
        body, kind = self._files[request.path.removeprefix("/console/")]
        return web.Response(body=body, content_type=kind, charset="utf-8")

    # ------------------------------------------------------------ logging in and out
    async def login(self, request: web.Request) -> web.Response:
        remote = request.remote or "unknown"
        self._refuse_if_waiting(f"address {remote}", remote)
        body = await read_body(request, {"token", "login", "password"})
        if "token" in body:
            token = body_text(body, "token", required=True, most=200) or ""
            try:
                owner = await asyncio.to_thread(self.tokens.verify, token.strip())
            except TokenRefused as refused:
                self._failed(remote, None, refused.reason, str(refused))
        else:
            login = body_text(body, "login", required=True, most=254) or ""
            password = body_text(body, "password", required=True, most=1024) or ""
            self._refuse_if_waiting(f"login {login.lower()}", remote)
            async with self._hashing:
                found = await asyncio.to_thread(self._password, login, password)
            if found is None:
                self._failed(remote, login, "wrong_password",
                             f"console login {login[:100]!r}: unknown or wrong password")
            owner = found
        secret, csrf = await asyncio.to_thread(self.sessions.open, owner)
        await asyncio.to_thread(self.store.audit, owner.actor, "console.login",
                                tenant_id=owner.tenant_id,
                                detail={"from": remote, "with": "password" if
                                        owner.kind == "console" else "token"})
        response = reply(_whoami(owner, csrf))
        response.set_cookie(COOKIE, secret, path="/", secure=True, httponly=True,
                            samesite="Strict", max_age=int(LIFETIME.total_seconds()))
        return response

    def _password(self, login: str, password: str) -> TokenOwner | None:
        user = self.sessions.user(login)
        matches = verify(password.encode(), user["password_hash"] if user else _decoy())
        if user is None or not matches:
            return None
        return TokenOwner(user["login"], user["tenant_id"],
                          frozenset(user["scopes"].split()), "console")

    def _refuse_if_waiting(self, key: str, remote: str) -> None:
        wait = self.attempts.wait(key)
        if wait > 0:
            self.metrics.api_auth_failures.labels("console_throttled").inc()
            log.warning("admin API: authentication failed from %s: over %d failed console "
                        "logins (%s), turned away", remote, MAX_FAILURES, key)
            raise ApiError(429, "too many failed logins: try again later",
                           {"Retry-After": str(int(wait) + 1)})

    def _failed(self, remote: str, login: str | None, reason: str, why: str) -> NoReturn:
        self.attempts.failed(f"address {remote}")
        if login is not None:
            self.attempts.failed(f"login {login.lower()}")
        self.metrics.api_auth_failures.labels(reason).inc()
        log.warning("admin API: authentication failed from %s: %s", remote, why)
        raise ApiError(401, REFUSED)

    async def session(self, request: web.Request) -> web.Response:
        """Who the console's session is (after a reload of the page), with its CSRF
        secret: the page's script keeps it in memory only."""
        try:
            session = await self._session(request)
        except TokenRefused:
            raise ApiError(401, "not logged in") from None
        return reply(_whoami(session.owner, session.csrf))

    async def logout(self, request: web.Request) -> web.Response:
        try:
            owner = await self.caller(request)
        except TokenRefused:
            raise ApiError(401, "not logged in") from None
        await asyncio.to_thread(self.sessions.close, request.cookies[COOKIE])
        await asyncio.to_thread(self.store.audit, owner.actor, "console.logout",
                                tenant_id=owner.tenant_id)
        response = reply({"logged_out": True})
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True,
                            samesite="Strict")
        return response


def _whoami(owner: TokenOwner, csrf: str) -> dict[str, Any]:
    return {"tenant": owner.tenant_id, "actor": owner.actor,
            "scopes": sorted(owner.scopes), "csrf": csrf}

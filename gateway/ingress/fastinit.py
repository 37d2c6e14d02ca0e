"""A copy of aiosmtpd 1.4.6's ``SMTP.__init__``, for the speed of session set-up.

aiosmtpd finds its command, hook and AUTH tables by introspection (``dir()``,
``getmembers`` on the protocol and the handler) in every new protocol: that took
45% of the event loop's Python time at one connection per message.  The tables
are the same for every connection of a listener, so the first protocol of a
listener runs aiosmtpd's own ``__init__`` and leaves its tables here; the next
ones are set up from them by ``init_from``, which sets the same attributes as
aiosmtpd 1.4.6 does.  Another aiosmtpd release always gets its own ``__init__``
(``FAST_INIT_VERSIONS``); tests/test_ingress_faults.py holds the two paths to
the same state.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiosmtpd
from aiosmtpd.smtp import SMTP

# aiosmtpd releases whose SMTP.__init__ init_from reproduces.
FAST_INIT_VERSIONS = {"1.4.6"}


@dataclass(frozen=True)
class Tables:
    """What aiosmtpd's SMTP.__init__ finds by introspection, for one protocol class and
    one handler object: the same for every connection of a listener."""

    smtp_functions: dict[str, Callable[..., Any]]
    handle_hooks: dict[str, Callable[..., Any]]
    auth_methods: dict[str, Any]
    ehlo_hook_ver: str | None
    auth_callback: Any

    @classmethod
    def of(cls, protocol: SMTP) -> Tables:
        p = cast(Any, protocol)
        return cls({name: method.__func__ for name, method in p._smtp_methods.items()},
                   dict(p._handle_hooks), dict(p._auth_methods), p._ehlo_hook_ver,
                   p._auth_callback)


TABLES: dict[tuple[type, Any], Tables] = {}


class Bound(Mapping[str, Any]):
    """A session's table of its command or AUTH methods, each bound to the session when
    it is looked up: a dict of bound methods per session was 1.5 KiB of every open
    connection."""

    __slots__ = ("bind", "owner", "table")

    def __init__(self, table: dict[str, Any], owner: object,
                 bind: Callable[[Any, object], Any]) -> None:
        self.table = table
        self.owner = owner
        self.bind = bind

    def __getitem__(self, name: str) -> Any:
        return self.bind(self.table[name], self.owner)

    def get(self, name: str, default: Any = None) -> Any:
        entry = self.table.get(name)
        return default if entry is None else self.bind(entry, self.owner)

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)


def _bind_auth(attr: Any, owner: object) -> Any:
    """aiosmtpd's ``_AuthMechAttr``: its own AUTH methods bound to the session."""
    method = types.MethodType(attr.method.__func__, owner) if attr.is_builtin else attr.method
    return type(attr)(method, attr.is_builtin)


def initialise(protocol: SMTP, handler: Any, options: dict[str, Any], *,
               cacheable: bool) -> None:
    """``SMTP.__init__(protocol, handler, **options)``, from the cached tables when
    ``cacheable`` (options aiosmtpd's introspection does not depend on) and aiosmtpd
    is a release ``init_from`` mirrors."""
    cacheable = cacheable and aiosmtpd.__version__ in FAST_INIT_VERSIONS
    tables = TABLES.get((type(protocol), handler)) if cacheable else None
    if tables is not None:
        init_from(protocol, tables, handler, options)
        return
    SMTP.__init__(protocol, handler, **options)
    if cacheable:
        TABLES[(type(protocol), handler)] = Tables.of(protocol)


def init_from(protocol: SMTP, tables: Tables, handler: Any, options: dict[str, Any]) -> None:
    """What ``SMTP.__init__`` (aiosmtpd 1.4.6) does for the MX listener, without
    looking the command, hook and AUTH tables up again. Same attributes."""
    self = cast(Any, protocol)
    self.__ident__ = options["ident"]
    self.loop = asyncio.get_running_loop()
    asyncio.StreamReaderProtocol.__init__(
        self, asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
        client_connected_cb=self._cb_client_connected, loop=self.loop)
    self.event_handler = handler
    self.data_size_limit = options["data_size_limit"]
    self.enable_SMTPUTF8 = options["enable_SMTPUTF8"]
    self._decode_data = options["decode_data"]
    self.hostname = options["hostname"]
    self.tls_context = options.get("tls_context")
    self.require_starttls = self.tls_context and False  # as aiosmtpd: None without TLS
    self._timeout_duration = options["timeout"]
    self._timeout_handle = None
    self._tls_handshake_okay = True
    self._tls_protocol = None
    self._original_transport = None
    self.session = None
    self.envelope = None
    self.transport = None
    self._handler_coroutine = None
    self._auth_require_tls = True
    self._proxy_timeout = None
    self._authenticator = None
    self._auth_callback = tables.auth_callback
    self._auth_required = False
    self._auth_methods = Bound(tables.auth_methods, self, _bind_auth)
    self._handle_hooks = tables.handle_hooks  # bound to the one shared handler
    self._ehlo_hook_ver = tables.ehlo_hook_ver
    self._smtp_methods = Bound(tables.smtp_functions, self, types.MethodType)
    self._enforce_call_limit = False

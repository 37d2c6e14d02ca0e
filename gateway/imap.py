"""One connection to a customer's IMAP server: aioimaplib, made safe to use unattended.

Everything the gateway says to an IMAP server goes through ``ImapConnection``:

- every string argument is sent quoted and escaped, and one holding CR, LF or NUL
  is refused before it reaches the wire (it would end the command and start
  another); folder names are encoded in modified UTF-7 (RFC 3501 5.1.3);
- TLS is implicit or STARTTLS (which aioimaplib lacks), certificates verified
  unless the account says otherwise;
- every command has a deadline, and a lost connection fails the command in hand
  at once instead of at its deadline;
- a NO or BAD answer raises ``ImapError`` with the server's text, a broken
  connection ``ImapError(broken=True)``: the caller logs the reason and retries.

aioimaplib parses responses recursively, one level per line received in one
read, so callers keep the number of response lines per command small (fetch in
batches of at most a few hundred messages).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aioimaplib

from gateway.config import ImapAccountConfig

_UNSAFE = re.compile(r"[\r\n\x00]")
_FETCH_START = re.compile(rb"^(\d+) FETCH \(")
_LITERAL = re.compile(rb"(BODY\[[^\]]*\](?:<\d+>)?) \{(\d+)\}$")
_INLINE_BODY = re.compile(rb'(BODY\[[^\]]*\](?:<\d+>)?) (NIL|"(?:[^"\\]|\\.)*")')
_ITEM_UID = re.compile(rb"\bUID (\d+)")
_ITEM_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_ITEM_FLAGS = re.compile(rb"\bFLAGS \(([^)]*)\)")
_CODE = re.compile(r"^\[([A-Z-]+)(?: ([^\]]*))?\]")
_RESP_CODE = re.compile(rb"\[(UIDVALIDITY) (\d+)\]")
MULTIAPPEND_MAX = 50  # messages in one APPEND at most
_EXISTS = re.compile(rb"^\* \d+ EXISTS")


class ImapError(Exception):
    """A command failed.  ``broken``: the connection is no longer usable.  ``code``:
    the response code the server gave (TRYCREATE, TOOBIG, ALREADYEXISTS, ...)."""

    def __init__(self, reason: str, *, broken: bool = False, code: str = "") -> None:
        super().__init__(reason)
        self.broken = broken
        self.code = code


@dataclass(frozen=True, slots=True)
class Selected:
    uidvalidity: int
    exists: int


@dataclass(slots=True)
class Fetched:
    uid: int
    size: int | None = None
    flags: tuple[str, ...] = ()
    parts: dict[str, bytes] | None = None  # e.g. {"BODY[]": b"..."}

    def part(self, prefix: str) -> bytes | None:
        """The first body part whose name starts with ``prefix`` ("BODY[]" also
        finds the partial "BODY[]<0>")."""
        for name, data in (self.parts or {}).items():
            if name.startswith(prefix):
                return data
        return None


def quoted(value: str) -> str:
    """A quoted string (RFC 3501 9); CR, LF and NUL cannot be sent in one."""
    if _UNSAFE.search(value):
        raise ImapError(f"refusing to send CR, LF or NUL to the server: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode_folder(name: str) -> str:
    """Modified UTF-7 (RFC 3501 5.1.3): printable ASCII stays, '&' is '&-', the rest
    is '&' + base64 of UTF-16BE with ',' for '/' + '-'."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def folder_arg(name: str) -> str:
    return quoted(encode_folder(name))


def uid_set(uids: Iterable[int]) -> str:
    """1,2,3,7 -> '1:3,7' (short commands for long runs)."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("an empty UID set")
    ranges: list[str] = []
    start = prev = ordered[0]
    for uid in ordered[1:]:
        if uid == prev + 1:
            prev = uid
            continue
        ranges.append(f"{start}:{prev}" if prev != start else str(start))
        start = prev = uid
    ranges.append(f"{start}:{prev}" if prev != start else str(start))
    return ",".join(ranges)


def _appended_uids(text: str) -> list[int | None]:
    """The UIDs of APPENDUID (RFC 4315): "[APPENDUID 38505 3955]" or "... 5:7,9"."""
    match = re.search(r"\[APPENDUID \d+ ([0-9:,]+)\]", text)
    if match is None:
        return []
    uids: list[int | None] = []
    for part in match.group(1).split(","):
        low, _, high = part.partition(":")
        if not low.isdigit() or (high and not high.isdigit()):
            return []
        uids += range(int(low), int(high or low) + 1)
    return uids


def _text(lines: Sequence[Any]) -> str:
    """The server's own words: the tagged status text (last line)."""
    for line in reversed(lines):
        if isinstance(line, bytes):
            return " ".join(line.decode("utf-8", "replace").split())[:300]
    return ""


def parse_fetch(lines: Sequence[Any]) -> list[Fetched]:
    """The FETCH responses in aioimaplib's response lines: literals arrive as
    bytearray items following the line that announced them."""
    out: list[Fetched] = []
    current: Fetched | None = None
    literal_name: str | None = None
    for line in lines:
        if isinstance(line, bytearray):
            if current is not None and literal_name is not None:
                current.parts = current.parts or {}
                current.parts[literal_name] = bytes(line)
            literal_name = None
            continue
        start = _FETCH_START.match(line)
        if start is not None:
            current = Fetched(uid=0)
            out.append(current)
        if current is None:
            continue
        m = _ITEM_UID.search(line)
        if m:
            current.uid = int(m.group(1))
        m = _ITEM_SIZE.search(line)
        if m:
            current.size = int(m.group(1))
        m = _ITEM_FLAGS.search(line)
        if m:
            current.flags = tuple(m.group(1).decode("ascii", "replace").split())
        for m in _INLINE_BODY.finditer(line):
            current.parts = current.parts or {}
            value = m.group(2)
            current.parts[m.group(1).decode()] = (
                b"" if value == b"NIL" else re.sub(rb"\\(.)", rb"\1", value[1:-1]))
        m = _LITERAL.search(line)
        literal_name = m.group(1).decode() if m else None
    return [f for f in out if f.uid]


def tls_context(settings: ImapAccountConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(settings.ca_file) if settings.ca_file is not None else None)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ImapConnection:
    """A logged-in connection; see the module docstring."""

    def __init__(self, settings: ImapAccountConfig) -> None:
        self.settings = settings
        self.timeout = settings.timeout
        self.broken = False
        self._client: aioimaplib.IMAP4 | None = None
        self._gone = asyncio.Event()  # set once the transport is closed
        # The server announced new messages (EXISTS) since this was last cleared: also
        # when it came beside another command's answer, which aioimaplib drops.
        self.new_mail = False

    @property
    def where(self) -> str:
        return f"{self.settings.host}:{self.settings.server_port}"

    @property
    def capabilities(self) -> set[str]:
        assert self._client is not None
        return {c.upper() for c in self._client.protocol.capabilities}

    @classmethod
    async def open(cls, settings: ImapAccountConfig, password: str) -> ImapConnection:
        """Connect, secure, log in; ImapError(broken=True) for anything that fails."""
        conn = cls(settings)
        try:
            await asyncio.wait_for(conn._open(password), settings.timeout)
        except TimeoutError:
            await conn.close()
            raise ImapError(f"{conn.where}: no answer within {settings.timeout:g} s",
                            broken=True) from None
        except (OSError, ssl.SSLError, aioimaplib.AioImapException) as exc:
            await conn.close()
            raise ImapError(f"{conn.where}: {_describe(exc)}", broken=True) from None
        except ImapError:
            await conn.close()
            raise
        return conn

    async def _open(self, password: str) -> None:
        settings = self.settings
        context = tls_context(settings) if settings.tls != "none" else None
        self._client = aioimaplib.IMAP4(
            host=settings.host.strip("[]"), port=settings.server_port, timeout=self.timeout,
            conn_lost_cb=self._lost,
            ssl_context=context if settings.tls == "implicit" else None)
        proto = self._client.protocol
        untagged = proto._untagged_response

        def observe(line: bytes) -> Any:
            if _EXISTS.match(line):
                self.new_mail = True
            return untagged(line)

        proto._untagged_response = observe
        await self._client.wait_hello_from_server()
        if settings.tls == "starttls":
            if "STARTTLS" not in {c.upper() for c in proto.capabilities}:
                raise ImapError(f"{self.where}: the server does not offer STARTTLS",
                                broken=True)
            response = await proto.execute(
                aioimaplib.Command("STARTTLS", proto.new_tag(), loop=proto.loop))
            if response.result != "OK":
                raise ImapError(f"{self.where}: STARTTLS refused: {_text(response.lines)}",
                                broken=True)
            assert context is not None
            proto.transport = await proto.loop.start_tls(
                proto.transport, proto, context, server_hostname=settings.host.strip("[]"))
            await proto.capability()
        if proto.state != aioimaplib.AUTH:
            response = await proto.login(quoted(settings.username), password)
            if response.result != "OK":
                raise ImapError(f"{self.where}: login as {settings.username} failed: "
                                f"{_text(response.lines)}", broken=True)
        await proto.capability()  # what is offered after login may differ

    def _lost(self, exc: BaseException | None) -> None:
        """The connection is gone: fail whatever waits for an answer now."""
        self.broken = True
        self._gone.set()
        if self._client is None:
            return
        proto = self._client.protocol
        waiting = [proto.pending_sync_command, *proto.pending_async_commands.values()]
        for command in waiting:
            if command is not None and not command._event.is_set():
                command._exception = aioimaplib.Abort("the server closed the connection")
                command.close(b"connection lost", "BYE")
        proto.idle_queue.put_nowait(aioimaplib.STOP_WAIT_SERVER_PUSH)  # ends a wait in IDLE

    async def close(self) -> None:
        """Log out politely when possible; always drop the connection."""
        client, self._client = self._client, None
        if client is None:
            return
        proto = client.protocol
        if not self.broken and proto.transport is not None and proto.pending_sync_command is None:
            try:
                await asyncio.wait_for(client.logout(), min(self.timeout, 5.0))
            except (OSError, TimeoutError, aioimaplib.AioImapException):
                pass  # closing anyway
        self.broken = True
        transport = client.protocol.transport
        if transport is not None:
            transport.close()
            try:  # a TLS connection closes after its own shutdown exchange
                await asyncio.wait_for(self._gone.wait(), 2.0)
            except TimeoutError:
                transport.abort()

    async def _run(self, call: Any, what: str) -> Any:
        """Run one aioimaplib call: a deadline, connection errors as ImapError, NO/BAD
        as ImapError with the server's text and response code."""
        if self._client is None or self.broken:
            call.close()  # never started
            raise ImapError(f"{self.where}: {what}: not connected", broken=True)
        try:
            response = await asyncio.wait_for(call, self.timeout)
        except TimeoutError:
            self.broken = True
            raise ImapError(f"{self.where}: {what}: no answer within {self.timeout:g} s",
                            broken=True) from None
        except (OSError, aioimaplib.AioImapException) as exc:
            self.broken = True
            raise ImapError(f"{self.where}: {what}: {_describe(exc)}", broken=True) from None
        if response.result != "OK":
            text = _text(response.lines)
            code = _CODE.match(text)
            if response.result not in ("NO", "BAD"):
                self.broken = True
            raise ImapError(f"{self.where}: {what}: {response.result} {text}",
                            broken=self.broken, code=code.group(1) if code else "")
        return response

    async def create(self, folder: str) -> None:
        """Create ``folder``; one that already exists is fine."""
        assert self._client is not None
        try:
            await self._run(self._client.protocol.simple_command("CREATE", folder_arg(folder)),
                            f"CREATE {folder!r}")
        except ImapError as exc:
            if exc.broken or exc.code != "ALREADYEXISTS":
                raise

    @property
    def batch_limit(self) -> int:
        """How many messages one APPEND may carry (MULTIAPPEND, RFC 3502)."""
        return MULTIAPPEND_MAX if "MULTIAPPEND" in self.capabilities else 1

    async def append(self, folder: str, data: bytes, flags: Sequence[str] = ()) -> int | None:
        """APPEND ``data`` to ``folder``; the new UID when the server says (UIDPLUS)."""
        return (await self.append_many(folder, [data], flags))[0]

    async def append_many(self, folder: str, datas: Sequence[bytes],
                          flags: Sequence[str] = ()) -> list[int | None]:
        """APPEND several messages in one command (MULTIAPPEND: all or none are
        appended); their new UIDs when the server says (UIDPLUS).  With LITERAL+ the
        messages follow the command at once, without waiting for "+" each time."""
        assert self._client is not None and datas
        if len(datas) > self.batch_limit:
            raise ValueError(f"{len(datas)} messages in one APPEND; the server takes "
                             f"{self.batch_limit}")
        proto = self._client.protocol
        flag_list = "(" + " ".join(flags) + ")" if flags else None
        what = f"APPEND to {folder!r}" + (f" ({len(datas)} messages)" if len(datas) > 1 else "")
        if "LITERAL+" in self.capabilities:
            call = self._append_nonsync(folder_arg(folder), datas, flag_list)
        else:
            call = proto.append(datas[0], folder_arg(folder), flag_list, timeout=self.timeout)
        response = await self._run(call, what)
        uids = _appended_uids(_text(response.lines))
        return uids if len(uids) == len(datas) else [None] * len(datas)

    async def _append_nonsync(self, folder: str, datas: Sequence[bytes],
                              flags: str | None) -> Any:
        """APPEND with non-synchronizing literals (RFC 7888), as aioimaplib's execute()
        runs a synchronous command, but writing the literals right after the line."""
        proto = self._client.protocol  # type: ignore[union-attr]
        prefix = [flags] if flags else []
        command = aioimaplib.Command("APPEND", proto.new_tag(), folder, *prefix,
                                     f"{{{len(datas[0])}+}}", loop=proto.loop,
                                     timeout=self.timeout)
        if proto.pending_sync_command is not None:
            await proto.pending_sync_command.wait()
        if proto.pending_async_commands:
            await proto.wait_async_pending_commands()
        proto.pending_sync_command = command
        proto.send(str(command))
        parts = [datas[0]]
        for data in datas[1:]:
            parts.append(f" {flags + ' ' if flags else ''}{{{len(data)}+}}\r\n".encode())
            parts.append(data)
        parts.append(b"\r\n")
        proto.transport.write(b"".join(parts))
        try:
            await command.wait()
        except aioimaplib.CommandTimeout:
            proto.pending_sync_command = None
            raise
        return command.response

    async def select(self, folder: str, *, readonly: bool) -> Selected:
        """SELECT (or EXAMINE: nothing can change, not even \\Recent or \\Seen)."""
        assert self._client is not None
        proto = self._client.protocol
        verb = "EXAMINE" if readonly else "SELECT"
        if readonly:
            call = proto.simple_command("EXAMINE", folder_arg(folder))
        else:
            call = proto.select(folder_arg(folder))
        response = await self._run(call, f"{verb} {folder!r}")
        proto.state = aioimaplib.SELECTED  # aioimaplib tracks SELECT only
        found: dict[bytes, int] = {}
        exists = 0
        for line in response.lines:
            if not isinstance(line, bytes):
                continue
            for m in _RESP_CODE.finditer(line):
                found[m.group(1)] = int(m.group(2))
            if line.endswith(b" EXISTS"):
                exists = int(line.split()[0])
        if b"UIDVALIDITY" not in found:
            self.broken = True
            raise ImapError(f"{self.where}: {verb} {folder!r}: no UIDVALIDITY in the answer",
                            broken=True)
        return Selected(found[b"UIDVALIDITY"], exists)

    async def uid_search(self, *criteria: str) -> list[int]:
        """UIDs matching ``criteria`` (atoms; quote strings with ``quoted``)."""
        assert self._client is not None
        response = await self._run(
            self._client.protocol.search(*criteria, charset=None, by_uid=True),
            "UID SEARCH")
        uids: list[int] = []
        for line in response.lines[:-1]:
            if isinstance(line, bytes):
                words = line.split()
                if words and words[0] == b"SEARCH":
                    words = words[1:]
                uids += [int(w) for w in words if w.isdigit()]
        return uids

    async def fetch(self, uids: Iterable[int], items: str) -> list[Fetched]:
        """UID FETCH ``items`` (e.g. "(UID RFC822.SIZE BODY.PEEK[])") of ``uids``."""
        assert self._client is not None
        wanted = set(uids)
        response = await self._run(
            self._client.protocol.fetch(uid_set(wanted), items, by_uid=True,
                                        timeout=self.timeout),
            "UID FETCH")
        return [f for f in parse_fetch(response.lines) if f.uid in wanted]

    async def add_flags(self, uids: Iterable[int], flags: Sequence[str]) -> None:
        assert self._client is not None
        await self._run(self._client.protocol.store(
            uid_set(uids), "+FLAGS.SILENT", "(" + " ".join(flags) + ")", by_uid=True),
            "UID STORE")

    async def expunge(self, uids: Iterable[int]) -> None:
        """Remove the given messages (already flagged \\Deleted); with UIDPLUS only
        these, otherwise every \\Deleted message of the folder, as EXPUNGE does."""
        assert self._client is not None
        proto = self._client.protocol
        if "UIDPLUS" in self.capabilities:
            await self._run(proto.expunge(uid_set(uids), by_uid=True), "UID EXPUNGE")
        else:
            await self._run(proto.expunge(), "EXPUNGE")

    async def move(self, uids: Iterable[int], folder: str) -> None:
        """MOVE to ``folder`` (COPY, \\Deleted and EXPUNGE where MOVE is missing)."""
        assert self._client is not None
        uids = sorted(set(uids))
        proto = self._client.protocol
        if "MOVE" in self.capabilities:
            await self._run(proto.move(uid_set(uids), folder_arg(folder), by_uid=True),
                            f"UID MOVE to {folder!r}")
            return
        await self._run(proto.copy(uid_set(uids), folder_arg(folder), by_uid=True),
                        f"UID COPY to {folder!r}")
        await self.add_flags(uids, ["\\Deleted"])
        await self.expunge(uids)

    async def idle(self, seconds: float) -> bool:
        """Wait up to ``seconds`` in IDLE; True when the server announced a change."""
        assert self._client is not None
        client = self._client
        try:
            task = await asyncio.wait_for(client.idle_start(timeout=seconds), self.timeout)
            push = await client.wait_server_push(timeout=seconds + self.timeout)
            if not self.broken:
                client.idle_done()
            await asyncio.wait_for(task, self.timeout)
        except TimeoutError:
            self.broken = True
            raise ImapError(f"{self.where}: IDLE: no answer", broken=True) from None
        except (OSError, aioimaplib.AioImapException) as exc:
            self.broken = True
            raise ImapError(f"{self.where}: IDLE: {_describe(exc)}", broken=True) from None
        return push != aioimaplib.STOP_WAIT_SERVER_PUSH


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.errno:  # asyncio's own text names no reason
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or exc.__class__.__name__

"""A real downstream SMTP server for tests: records what arrives, fails on request."""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

from tests.conftest import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool = False  # came over STARTTLS

    @property
    def headers(self) -> Any:
        return email.message_from_bytes(self.data, policy=email.policy.compat32)

    @property
    def header_block(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[0]


@dataclass
class SinkHandler:
    mode: str = "accept"  # accept | tempfail | permfail | permfail_echo | drop
    messages: list[Received] = field(default_factory=list)
    attempts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    hold: bool = False  # keep RCPT TO unanswered while set (no message data has come yet)
    held: int = 0  # transactions waiting at RCPT TO now
    cut: int = 0  # transactions whose client went away while held
    delay: float = 0.0  # seconds before the answer to the final dot (a slow server)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.hold:
            with self.lock:
                self.held += 1
            try:
                while self.hold:  # noqa: ASYNC110 (set from the test thread)
                    await asyncio.sleep(0.02)
            except asyncio.CancelledError:  # aiosmtpd cancels a session whose client left
                with self.lock:
                    self.cut += 1
                raise
            finally:
                with self.lock:
                    self.held -= 1
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.attempts += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "tempfail":
            return "451 4.3.0 Try again later"
        if self.mode == "permfail":
            return "550 5.1.1 No such user here"
        if self.mode == "permfail_echo":  # as Postfix words it: the address in the reply
            return f"550 5.1.1 <{envelope.rcpt_tos[0]}>: Recipient address rejected"
        if self.mode == "drop":
            server.transport.close()
            return "421 4.3.0 gone"
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                          envelope.original_content, session.ssl is not None))
        return "250 2.0.0 Ok: stored"


class Sink:
    def __init__(self, tls_context: Any = None) -> None:
        """``tls_context``: offer STARTTLS with it, and take mail only after it."""
        self.handler = SinkHandler()
        self.port = free_port()
        tls = {"tls_context": tls_context, "require_starttls": True} if tls_context else {}
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     ready_timeout=10, **tls)
        self.controller.start()

    @property
    def messages(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.messages)

    def wait(self, count: int, timeout: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.messages) >= count:
                return self.messages
            time.sleep(0.05)
        raise AssertionError(f"sink got {len(self.messages)} of {count} messages")

    def stop(self) -> None:
        """Stop listening (again: nothing; a test may stop it before its fixture does)."""
        if self.controller.server is not None:
            self.controller.stop()

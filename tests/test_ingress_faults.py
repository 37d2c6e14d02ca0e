"""Faults inside a stage: the listener answers 451 4.3.0, never aiosmtpd's 500 with text.

The SMTP protocol runs on a real loopback listener in this process, with a
hand-written handler that fails the way a broken stage would.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading

from gateway.config import SMTPConfig
from gateway.ingress.smtp import ConnectionTracker, protocol_factory
from gateway.metrics import Metrics


class ExplodingHandler:
    """A stage that fails on MAIL: stands in for any unexpected bug."""

    async def handle_MAIL(self, server, session, envelope, address, options):
        raise RuntimeError("secret internal detail")


def test_unexpected_exception_is_451_without_detail():
    ready = threading.Event()
    state = {}

    def serve():
        async def main():
            settings = SMTPConfig(hostname="mx.fault.test")
            server = await asyncio.get_running_loop().create_server(
                protocol_factory(ExplodingHandler(), settings,  # type: ignore[arg-type]
                                 ConnectionTracker(10, 10), Metrics()),
                "127.0.0.1", 0,
            )
            state["port"] = server.sockets[0].getsockname()[1]
            state["stop"] = asyncio.Event()
            state["loop"] = asyncio.get_running_loop()
            ready.set()
            await state["stop"].wait()
            server.close()
            await server.wait_closed()

        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    assert ready.wait(10)
    try:
        with smtplib.SMTP("127.0.0.1", state["port"], timeout=10) as s:
            s.ehlo()
            code, text = s.mail("a@sender.test")
            assert (code, text) == (451, b"4.3.0 Error: internal error, try again later")
            assert s.noop()[0] == 250  # the session survives
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)

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


def test_protocols_built_from_the_cached_tables_match_aiosmtpd_own():
    """The second and later protocols of a listener skip aiosmtpd's introspection; they
    must come out exactly as aiosmtpd's own __init__ makes them."""
    import aiosmtpd

    from gateway.ingress import fastinit

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok"

    async def build():
        make = protocol_factory(Handler(), SMTPConfig(hostname="mx.cache.test"),
                                ConnectionTracker(10, 10), Metrics())
        return make(), make()

    first, second = asyncio.run(build())
    if aiosmtpd.__version__ not in fastinit.FAST_INIT_VERSIONS:
        assert not fastinit.TABLES  # an unknown release: aiosmtpd's own __init__ every time
        return
    assert set(vars(second)) == set(vars(first))
    for name, value in vars(first).items():
        other = vars(second)[name]
        if name == "_smtp_methods":
            assert other.keys() == value.keys()
            assert all(m.__self__ is second and m.__func__ is value[k].__func__
                       for k, m in other.items())
        elif name == "_auth_methods":
            assert {k: (a.method.__func__, a.is_builtin) for k, a in other.items()} == \
                   {k: (a.method.__func__, a.is_builtin) for k, a in value.items()}
        elif name in {"_handle_hooks", "_ehlo_hook_ver", "_auth_callback", "event_handler",
                      "hostname", "data_size_limit", "enable_SMTPUTF8", "_decode_data",
                      "tls_context", "require_starttls", "_timeout_duration",
                      "_auth_require_tls", "_auth_required", "_enforce_call_limit",
                      "__ident__", "settings", "listener", "submission"}:
            assert other == value, name
    assert second.command_size_limits is not first.command_size_limits


def test_a_finished_session_is_freed_when_its_connection_goes():
    """With the cyclic collector off, a session that ended (after QUIT, or a client that
    hung up) is freed all the same: nothing of it waits for the collector, whose full
    passes over the sessions of the last few seconds paused the loop for 50-80 ms at
    100 sessions."""
    import gc
    import weakref

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            return "250 2.0.0 Ok"

    def client(port: int, quit: bool) -> None:
        s = smtplib.SMTP("127.0.0.1", port, timeout=10)
        s.ehlo()
        s.sendmail("a@sender.test", ["b@rcpt.test"], b"Subject: hi\r\n\r\nhello\r\n")
        if quit:
            s.quit()
        else:
            s.close()

    async def main() -> list[object]:
        make = protocol_factory(Handler(), SMTPConfig(hostname="mx.free.test"),
                                ConnectionTracker(10, 10), Metrics())
        make()  # a listener's first protocol is the model of the others (and kept with them)
        made: list[weakref.ref] = []

        def factory():
            protocol = make()
            made.append(weakref.ref(protocol))
            return protocol

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        gc.collect()
        gc.disable()
        try:
            for quit in (True, False):
                await asyncio.to_thread(client, port, quit)
                for _ in range(200):  # the session ends a few loop turns after the client
                    if made[-1]() is None:
                        break
                    await asyncio.sleep(0.01)
            return [ref() for ref in made]
        finally:
            gc.enable()
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()) == [None, None]

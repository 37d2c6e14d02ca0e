"""The metrics port: /metrics for Prometheus, /healthz, /readyz and /status as JSON.

A small threaded WSGI server from the standard library, as prometheus-client's
own ``start_http_server`` is, with three more paths.  It runs in its own
threads, so a scrape or a readiness probe is answered even while the event
loop is busy, and a stalled event loop shows in /healthz instead of hiding it.
Each JSON handler returns ``(http status, document)``.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

JSONHandler = Callable[[], tuple[int, dict[str, Any]]]
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # every scrape is not an event worth a log line


def app(registry: CollectorRegistry, routes: dict[str, JSONHandler]) -> Callable[..., Any]:
    metrics = make_wsgi_app(registry)

    def handle(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics(environ, start_response)
        handler = routes.get(path)
        if handler is None:
            code, doc = 404, {"error": f"no such path {path}",
                              "paths": ["/metrics", *sorted(routes)]}
        elif environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            code, doc = 405, {"error": "only GET"}
        else:
            try:
                code, doc = handler()
            except Exception as exc:  # a probe answers, whatever broke
                code, doc = 500, {"error": f"{exc.__class__.__name__}: {exc}"}
        body = (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode()
        start_response(f"{code} {_REASONS.get(code, '')}",
                       [("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    return handle


class HTTPServer:
    """Serve ``app`` on host:port in background threads until ``close()``."""

    def __init__(self, host: str, port: int, wsgi: Callable[..., Any]) -> None:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]

        class Server(_Server):
            address_family = family

        self.server = make_server(host, port, wsgi, server_class=Server,
                                  handler_class=_QuietHandler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="http",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

"""What every route of the admin API shares: its errors, its JSON, reading a request's
parameters and body, and the connection handler that answers in JSON what aiohttp's
HTTP parser refuses."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.clock import aware
from gateway.config import GatewayConfig
from gateway.policyset import PolicySet
from gateway.privacy import subject_address
from gateway.privacy.keys import PrivacyKey
from gateway.store.pages import Pages
from gateway.store.privacy import PrivacyStore
from gateway.store.repository import Store
from gateway.store.tokens import TokenOwner

log = logging.getLogger("gateway.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OWNER = web.RequestKey("owner", TokenOwner)
# Matched whole (fullmatch) and before upper(), which makes a dotless i an ASCII "I"
_ID = re.compile(r"[0-9A-Za-z]{26}")
_NUMBER = re.compile(r"[1-9][0-9]{0,17}")
# A character JSON Schema's \S matches (ECMA-262 white space and line terminators are
# fewer than Python's \s, which also counts U+001C-U+001F and U+0085)
_VISIBLE = re.compile("[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f"
                      "\u205f\u3000\ufeff]")


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # below /api/v1
    handler: Handler
    scope: str | None  # what the token must allow (store.tokens.SCOPES); None: no token


@dataclass
class Context:
    """What the routes work with."""

    config: GatewayConfig
    store: Store
    privacy: PrivacyStore
    pages: Pages
    key: PrivacyKey
    policies: Callable[[], PolicySet]  # the policies in force


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def reply(doc: Any, status: int = 200, headers: dict[str, str] | None = None,
          ) -> web.Response:
    return web.json_response(doc, status=status, headers=headers, dumps=lambda d: json.dumps(
        d, default=_default, ensure_ascii=False, sort_keys=True))


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return aware(value).isoformat()
    return str(value)


def when(value: datetime | None) -> str | None:
    return aware(value).isoformat() if value is not None else None


def not_found() -> ApiError:
    return ApiError(404, "not found")


def owner(request: web.Request) -> TokenOwner:
    return request[OWNER]


def tenant(request: web.Request) -> str:
    return request[OWNER].tenant_id


def actor(request: web.Request) -> str:
    return request[OWNER].actor


# ---------------------------------------------------------------- input
def as_id(text: str) -> str | None:
    """The id (of a message or an export) that ``text`` names in any case, or None."""
    return text.upper() if _ID.fullmatch(text) else None


def path_id(request: web.Request) -> str:
    """The message or export id in the path; 404 when it cannot be one."""
    value = as_id(request.match_info["id"])
    if value is None:
        raise not_found()
    return value


def path_number(request: web.Request) -> int:
    """The numeric id (of a delivery) in the path; 404 when it cannot be one."""
    text = request.match_info["id"]
    if not _NUMBER.fullmatch(text):
        raise not_found()
    return int(text)


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(400, f"{name}: not a whole number: {text[:40]!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"{name}: must be {low} to {high}")
    return value


def query_time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{name}: not an ISO 8601 time: {text[:40]!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def query_id(request: web.Request, name: str) -> str | None:
    text = request.query.get(name)
    if text is None:
        return None
    value = as_id(text)
    if value is None:
        raise ApiError(400, f"{name}: a message id (26 letters and digits) is needed")
    return value


def query_address(request: web.Request, name: str) -> str | None:
    text = request.query.get(name)
    if text is not None and subject_address(text) is None:
        raise ApiError(400, f"{name}: an e-mail address is needed")
    return text


def query_choice(request: web.Request, name: str, choices: tuple[str, ...]) -> str | None:
    text = request.query.get(name)
    if text is not None and text not in choices:
        raise ApiError(400, f"{name}: one of {', '.join(choices)}")
    return text


async def read_body(request: web.Request, allowed: set[str]) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "the body must be JSON (Content-Type: application/json)")
    try:
        body = await request.json()
    except RecursionError:  # the decoder's depth limit: no body of ours nests
        raise ApiError(400, "the body is nested too deeply") from None
    except LookupError:  # a charset parameter Python has no codec for
        raise ApiError(415, f"unknown charset {request.charset!r}") from None
    except web.RequestPayloadError:  # a broken chunk or Content-Encoding
        raise ApiError(400, "the body cannot be read as its headers say") from None
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]!r} (known: "
                            f"{', '.join(sorted(allowed))})")
    return body


def body_subject(body: dict[str, Any], required: bool) -> str | None:
    if "subject" not in body and not required:
        return None
    value = body.get("subject")
    address = subject_address(value) if isinstance(value, str) else None
    if address is None:
        raise ApiError(400, "subject: an e-mail address is needed")
    return address


def body_text(body: dict[str, Any], name: str, *, required: bool, most: int = 1000,
              ) -> str | None:
    """A string field of at most ``most`` characters, with something besides spaces."""
    if name not in body and not required:
        return None
    value = body.get(name)
    if not isinstance(value, str) or not _VISIBLE.search(value) or len(value) > most:
        raise ApiError(400, f"{name}: text of 1 to {most} characters is needed")
    return value


# ---------------------------------------------------------------- connections
class Connection(web.RequestHandler):
    """aiohttp's handler of one connection, answering in the API's JSON shape what its
    HTTP parser refuses before any middleware runs: a request line or header too long,
    a bad Content-Length, Transfer-Encoding beside Content-Length...  aiohttp's own
    answer is a text/plain page, and it logs the parser's message at ERROR, which
    quotes the offending bytes: an Authorization header among them."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None,
                     ) -> web.StreamResponse:
        self.log_exception("answered %d to a request from %s", status, request.remote,
                           exc_info=exc)
        if request.writer.output_size > 0:  # as aiohttp does: too late for an answer
            raise ConnectionError("the response had begun when the request failed")
        response = reply({"error": _refusal(status, exc)}, status)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # The exception's class only, never its text or traceback: a parser error quotes
        # the request's bytes, and so does a broken body that aiohttp reads on after the
        # answer (to let the client finish sending) and logs as "Unhandled exception".
        exc = kw.get("exc_info")
        log.warning("admin API: " + args[0] + " (%s)", *args[1:],
                    type(exc).__name__ if exc else "no exception")


def _refusal(status: int, exc: BaseException | None) -> str:
    if isinstance(exc, LineTooLong):  # its message quotes the line: maybe a token
        return "the request line or a header is too long"
    if isinstance(exc, BadHttpMessage):  # the parser's reason, before the quoted bytes
        reason = exc.message.split(":\n")[0]
        return f"malformed request: {reason[:200]}"
    return HTTPStatus(status).phrase.lower()

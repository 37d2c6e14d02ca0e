"""The OpenAPI 3.1 description of the admin API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from gateway import __version__

MAX_LIMIT = 1000  # rows of one page at most


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API: every route, parameter, body, status and
    response body it serves (tests/test_api_fuzz.py holds the daemon to it)."""
    def ref(name: str) -> dict[str, str]:
        return {"$ref": f"#/components/schemas/{name}"}

    def nullable(schema: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [schema, {"type": "null"}]}

    def record(optional: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
        return {"type": "object", "required": sorted(set(properties) - set(optional)),
                "additionalProperties": False, "properties": properties}

    def json_body(schema: dict[str, Any]) -> dict[str, Any]:
        return {"application/json": {"schema": schema}}

    def op(summary: str, ok: dict[str, Any], params: list[dict[str, Any]] | None = None,
           body: dict[str, Any] | None = None, status: str = "200",
           errors: tuple[str, ...] = ("401",)) -> dict[str, Any]:
        # 400 on every route: aiohttp's parser refuses a malformed request before routing;
        # 404 for an id of nothing the tenant has
        codes = {"400", *errors, *(("413", "415") if body else ()),
                 *(("404",) if any(p["in"] == "path" for p in params or ()) else ())}
        doc: dict[str, Any] = {"summary": summary, "responses": {
            status: {"description": "success", "content": ok},
            **{code: {"$ref": "#/components/responses/error"} for code in sorted(codes)}}}
        if params:
            doc["parameters"] = params
        if body:
            doc["requestBody"] = {"required": True, "content": json_body(body)}
        return doc

    def q(name: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema,
                "description": what}

    string, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    text, strings = nullable(string), {"type": "array", "items": string}
    when = {"type": "string", "format": "date-time"}
    address = {"type": "string", "format": "email"}
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
    path_id = [{"name": "id", "in": "path", "required": True, "schema": ref("id")}]
    summary: dict[str, Any] = {
        "id": ref("id"), "received_at": when, "status": string, "sender": string,
        "recipients": strings, "message_id": text, "from": text, "to": text, "cc": text,
        "subject": text, "date": text, "size": count, "tags": strings}
    message = record(**summary, direction={"enum": ["inbound", "outbound"]},
                     sha256={"type": "string", "pattern": "^[0-9a-f]{64}$"}, defects=strings,
                     header_addresses={"type": "array",
                                       "items": record(role=string, address=string)},
                     attachments={"type": "array",
                                  "items": record(filename=text, content_type=text, size=count)})
    export = record(id=ref("id"), status={"enum": ["running", "done", "failed", "removed"]},
                    created_at=when, finished_at=nullable(when), bytes=nullable(count),
                    error=text, archive=text)
    erasure = record(dry_run={"type": "boolean"}, messages=count,
                     held={"type": "object", "additionalProperties": count,
                           "description": "legal hold -> messages of the person it covers"},
                     seconds={"type": "number", "minimum": 0},
                     exports={"type": "array", "items": ref("id"),
                              "description": "the tenant's exports that go (went) with it"},
                     # what was removed, when it was not a dry run
                     deliveries=count, pending_deliveries=count, imported=count,
                     optional=("deliveries", "pending_deliveries", "imported"))
    event = record(id={"type": "integer"}, at=when, actor=string, action=string,
                   message_id=nullable(ref("id")), detail={"type": "object"}, hash=text)

    start_export = op("Start an export of the tenant, or of one person (subject)",
                      json_body(record(id=ref("id"), status={"const": "running"})),
                      body=record(subject=address, optional=("subject",)), status="202")
    start_export["responses"]["429"] = {
        "description": "as many exports of the tenant as allowed are running",
        "headers": {"Retry-After": {"required": True, "schema": {"type": "integer"},
                                    "description": "seconds"}},
        "content": json_body(ref("error"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": "MailFlowr Gateway admin API", "version": __version__,
                 "description": "A tenant's own data. Every token belongs to one tenant; "
                                "whatever is not that tenant's answers 404."},
        "security": [{"token": []}],
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "from `token create --tenant T`"}},
            "schemas": {"id": {"type": "string", "pattern": "^[0-9A-Za-z]{26}$",
                               "description": "a message's or an export's id (a ULID)"},
                        "error": record(error=string)},
            "responses": {"error": {"description": "an error",
                                    "content": json_body(ref("error"))}},
        },
        "paths": {
            "/api/v1/openapi.json": {"get": {
                **op("This description", json_body({"type": "object"}), errors=()),
                "security": []}},
            "/api/v1/messages": {"get": op(
                "List the tenant's messages, oldest first",
                json_body(record(messages={"type": "array", "items": record(**summary)},
                                 next=nullable(ref("id")))), [
                    q("limit", limit, "at most"),
                    q("after", ref("id"), "the 'next' of the previous page"),
                    q("address", address, "only messages with this address (any role)"),
                    q("since", when, "received at or after"),
                    q("until", when, "received before")])},
            "/api/v1/messages/{id}": {"get": op("One message's metadata", json_body(message),
                                                path_id)},
            "/api/v1/messages/{id}/eml": {"get": op(
                "One message as received (.eml)", {"message/rfc822": {}}, path_id)},
            "/api/v1/exports": {"post": start_export},
            "/api/v1/exports/{id}": {"get": op("An export's state", json_body(export),
                                               path_id)},
            "/api/v1/exports/{id}/archive": {"get": op(
                "Download a finished export (tar); 409 while it is not", {
                    "application/x-tar": {}}, path_id, errors=("401", "409"))},
            "/api/v1/erasures": {"post": op(
                "Erase every message of the tenant in which an address appears; 409 when "
                "a legal hold covers one", json_body(erasure),
                body=record(subject=address, dry_run={"type": "boolean"},
                            optional=("dry_run",)), errors=("401", "409"))},
            "/api/v1/audit": {"get": op(
                "The tenant's audit events, oldest first",
                json_body(record(events={"type": "array", "items": event})), [
                    q("limit", limit, "the newest"), q("since", when, "at or after")])},
        },
    }

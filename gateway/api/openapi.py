"""The OpenAPI 3.1 description of the admin API, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.query import MAX_PAGE, MAX_PAGES, MAX_QUERY
from gateway.store.models import FAILED, HELD, PENDING, SENT
from gateway.store.requests import KINDS
from gateway.store.tokens import SCOPES

MAX_LIMIT = 1000  # rows of one page at most
MAX_REQUEST_TEXT = 100_000  # characters of a data-subject request's text
DELIVERY_STATUSES = (PENDING, HELD, SENT, FAILED)


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
           errors: tuple[str, ...] = (), scope: str | None = "read",
           links: dict[str, tuple[str, str, str]] | None = None) -> dict[str, Any]:
        # 400 on every route: aiohttp's parser refuses a malformed request before routing;
        # 401 and 403 where a token is needed; 404 for an id of nothing the tenant has
        codes = {"400", *errors, *(("413", "415") if body else ()),
                 *(("401", "403") if scope else ()),
                 *(("404",) if any(p["in"] == "path" for p in params or ()) else ())}
        doc: dict[str, Any] = {"summary": summary, "responses": {
            status: {"description": "success", "content": ok, **({"links": {
                name: {"operationId": target, "parameters": {param: value}}
                for name, (target, param, value) in links.items()}} if links else {})},
            **{code: {"$ref": "#/components/responses/error"} for code in sorted(codes)}}}
        if scope:
            doc["security"] = [{"token": [scope]}]
            doc["description"] = f"Needs a token with the scope `{scope}` (or `admin`)."
        if params:
            doc["parameters"] = params
        if body:
            doc["requestBody"] = {"required": True, "content": json_body(body)}
        return doc

    def first(items: str, field: str, *targets: str) -> dict[str, tuple[str, str, str]]:
        """Links from a list's first item to the operations on one item."""
        return {target: (target, field, f"$response.body#/{items}/0/{field}")
                for target in targets}

    def q(name: str, schema: dict[str, Any], what: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": schema,
                "description": what}

    string, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    text, strings = nullable(string), {"type": "array", "items": string}
    when = {"type": "string", "format": "date-time"}
    address = {"type": "string", "format": "email"}
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
    number = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
    path_id = [{"name": "id", "in": "path", "required": True, "schema": ref("id")}]
    path_number = [{"name": "id", "in": "path", "required": True, "schema": number}]

    def page(name: str, item: dict[str, Any], cursor: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {name: {"type": "array", "items": item},
                                  "next": nullable(cursor)}
        return json_body(record(**fields))

    summary: dict[str, Any] = {
        "id": ref("id"), "received_at": when, "status": string, "sender": string,
        "recipients": strings, "message_id": text, "from": text, "to": text, "cc": text,
        "subject": text, "date": text, "size": count, "tags": strings}
    delivery = record(
        id=number, message=ref("id"), kind=string, recipient=string, destination=string,
        rule=string, status={"enum": list(DELIVERY_STATUSES)}, attempts=count,
        created_at=when, last_attempt_at=nullable(when), next_attempt_at=nullable(when),
        reason=text, uncertain={"type": "boolean"})
    attempt = record(at=nullable(when), status={"enum": list(DELIVERY_STATUSES)},
                     reason=text)
    delivery_detail = {**delivery, "required": [*delivery["required"], "history"],
                       "properties": {**delivery["properties"], "history": {
                           "type": "array", "items": attempt}}}
    retention = record(rule=string, expires_at=nullable(when), held_by=strings)
    message = record(**summary, direction={"enum": ["inbound", "outbound"]},
                     sha256={"type": "string", "pattern": "^[0-9a-f]{64}$"}, defects=strings,
                     header_addresses={"type": "array",
                                       "items": record(role=string, address=string)},
                     attachments={"type": "array",
                                  "items": record(filename=text, content_type=text, size=count)},
                     processed_at=nullable(when), rules=strings,
                     deliveries={"type": "array", "items": delivery},
                     authentication={"type": "object",
                                     "description": "the checks' results (dkim, spf, arc, "
                                                    "dmarc) as stored"},
                     retention=retention)
    hit: dict[str, Any] = {"id": ref("id"), "received_at": when, "status": string,
                           "sender": string, "from": text, "subject": text, "tags": strings,
                           "snippet": {"type": "array", "items": record(
                               text=string, match={"type": "boolean"})}}
    found = record(**hit)
    export = record(id=ref("id"), status={"enum": ["running", "done", "failed", "removed"]},
                    created_at=when, finished_at=nullable(when), bytes=nullable(count),
                    messages={**nullable(count), "description": "written so far, while it "
                              "runs on the instance asked (else null); bytes likewise"},
                    error=text, archive=text)
    removed: dict[str, Any] = {"deliveries": count, "pending_deliveries": count, "imported": count,
               "exports": {"type": "array", "items": ref("id"),
                           "description": "the tenant's exports that go (went) with it"}}
    erasure = record(dry_run={"type": "boolean"}, messages=count,
                     held={"type": "object", "additionalProperties": count,
                           "description": "legal hold -> messages of the person it covers"},
                     seconds={"type": "number", "minimum": 0},
                     # what was removed, when it was not a dry run
                     **removed, optional=("deliveries", "pending_deliveries", "imported"))
    deleted = record(id=ref("id"), messages=count, **removed)
    event = record(id={"type": "integer"}, at=when, actor=string, action=string,
                   message_id=nullable(ref("id")), detail={"type": "object"}, hash=text)
    subprocessor = record(
        name=string, purpose=string, entity=string, country=string, region=string,
        data_categories=strings, added={"type": "string", "format": "date"},
        usable={"type": "boolean"}, why_not=text)
    notice = record(subprocessor=string, change={"enum": ["added", "removed"]},
                    queued_at=when, delivered_at=nullable(when),
                    objection_window_ends=nullable(when),
                    state={"enum": ["sent", "pending", "held", "failed", "unsent"]},
                    why=text, message=nullable(ref("id")))
    hold = record(id=nullable(number), placed_by={"enum": ["gateway", "tenant"]},
                  name=string, reason=string, address=text, tag=text,
                  tenant_only={"type": "boolean"},
                  until=nullable({"type": "string", "format": "date"}))
    new_hold = record(
        name={"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"\S"},
        reason={"type": "string", "minLength": 1, "maxLength": 1000, "pattern": r"\S"},
        address=address, tag=string,
        until={"type": "string", "format": "date"},
        optional=("address", "tag", "until"))
    kinds = {"enum": list(KINDS)}
    subject_request = record(
        id=number, kind=kinds, subject=string, status={"enum": ["open", "fulfilled", "closed"]},
        received_at=when, due_at=when,
        forward={"enum": ["not forwarded", "pending", "held", "failed", "sent"]},
        forwarded_at=nullable(when), fulfilled_at=nullable(when), fulfilled_by=text)
    incident = record(
        id=number, status={"enum": ["open", "closed"]}, description=string,
        discovered_at=when, deadline=when, closed_at=nullable(when), closing_note=text,
        notice=record(message=nullable(ref("id")),
                      state={"enum": ["not notified", "pending", "held", "failed", "sent"]},
                      queued_at=nullable(when), delivered_at=nullable(when),
                      in_time=nullable({"type": "boolean"})))
    processing = record(
        tenant=string, tenant_name=string, generated_at=when, processor=string,
        privacy_contact=text,
        categories={"type": "array", "items": record(
            category=string, tag=text, messages=count, bytes=count)},
        retention={"type": "object"},
        subprocessors={"type": "array", "items": record(
            name=string, entity=string, purpose=string, country=string, region=string,
            outside_eea={"type": "boolean"}, data_categories=strings,
            in_use={"type": "boolean"}, why_not=text)},
        own_servers={"type": "array", "items": record(what=string, where=string)},
        security={"type": "object"}, counts={"type": "object"}, not_stated=strings)
    contact = record(address=string, roles=strings, messages=count,
                     first_seen=nullable(when), last_seen=nullable(when))
    note = {"type": "string", "minLength": 1, "maxLength": 1000, "pattern": r"\S"}
    reason = {"type": "string", "minLength": 1, "maxLength": 500, "pattern": r"\S"}

    start_export = op("Start an export of the tenant, or of one person (subject)",
                      json_body(record(id=ref("id"), status={"const": "running"})),
                      body=record(subject=address, optional=("subject",)), status="202",
                      scope="export", links={
                          target: (target, "id", "$response.body#/id")
                          for target in ("get_exports_id", "get_exports_id_archive")})
    start_export["responses"]["429"] = {
        "description": "as many exports of the tenant as allowed are running",
        "headers": {"Retry-After": {"required": True, "schema": {"type": "integer"},
                                    "description": "seconds"}},
        "content": json_body(ref("error"))}
    paths: dict[str, dict[str, Any]] = {
        "/api/v1/openapi.json": {"get": {
            **op("This description", json_body({"type": "object"}), scope=None),
            "security": []}},
        "/api/v1/messages": {"get": op(
            "List the tenant's messages, oldest first",
            page("messages", record(**summary), ref("id")), [
                q("limit", limit, "at most"),
                q("after", ref("id"), "the 'next' of the previous page"),
                q("address", address, "only messages with this address (any role)"),
                q("since", when, "received at or after"),
                q("until", when, "received before")],
            links=first("messages", "id", "get_messages_id", "get_messages_id_eml",
                        "delete_messages_id"))},
        "/api/v1/search": {"get": op(
            "The tenant's messages that match a full-text query, best first (newest "
            "first when it has no words), each with a snippet of where it matched",
            json_body(record(results={"type": "array", "items": found},
                             next=nullable({"type": "integer", "minimum": 2,
                                            "maximum": MAX_PAGES}))), [
                {"name": "q", "in": "query", "required": True,
                 "schema": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY},
                 "description": "words, \"a phrase\", prefix*, from:, to:, subject:, "
                                "tag:, before:YYYY-MM-DD, after:YYYY-MM-DD, has:attachment "
                                "(docs/search.md)"},
                q("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                  "results a page (20)"),
                q("page", {"type": "integer", "minimum": 1, "maximum": MAX_PAGES},
                  "the 'next' of the previous page")],
            links=first("results", "id", "get_messages_id", "get_messages_id_eml"))},
        "/api/v1/messages/{id}": {
            "get": op("One message: its metadata, the rules it matched, its copies "
                      "and their attempts, its authentication results, the retention "
                      "rule that keeps it and the legal holds on it", json_body(message),
                      path_id),
            "delete": op(
                "Delete one message, with the tenant's exports made before it; 409 "
                "when a legal hold covers it (override_hold: the scope admin)",
                json_body(deleted), [*path_id, q(
                    "override_hold", reason,
                    "why a legal hold is overridden (a token with the scope admin)")],
                errors=("409",), scope="erase")},
        "/api/v1/messages/{id}/eml": {"get": op(
            "One message as received (.eml)", {"message/rfc822": {}}, path_id)},
        "/api/v1/messages/{id}/text": {"get": op(
            "One message's text, to read: its plain-text part, or its HTML part as "
            "text (without tags, scripts, styles or remote content) when it has none",
            json_body(record(
                id=ref("id"), text={"type": "string"},
                source={"enum": ["plain", "html", "none"]},
                truncated={"type": "boolean"})), path_id)},
        "/api/v1/deliveries": {"get": op(
            "List the copies of the tenant's mail, oldest first",
            page("deliveries", delivery, number), [
                q("limit", limit, "at most"),
                q("after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                  "the 'next' of the previous page"),
                q("status", {"enum": list(DELIVERY_STATUSES)}, "only these"),
                q("message", ref("id"), "only the copies of this message"),
                q("recipient", address, "only copies to this address")],
            links=first("deliveries", "id", "get_deliveries_id",
                        "post_deliveries_id_retry", "post_deliveries_id_drop"))},
        "/api/v1/deliveries/{id}": {"get": op(
            "One copy: where it goes, and its attempts (history: each that did not "
            "deliver it, the newest 100, with the reply or reason, then the one that did)",
            json_body(delivery_detail), path_number)},
        "/api/v1/deliveries/{id}/retry": {"post": op(
            "Try a deferred, held or failed copy again now; 409 when it was sent",
            json_body(delivery), path_number, errors=("409",), scope="admin")},
        "/api/v1/deliveries/{id}/drop": {"post": op(
            "Give up a pending or held copy (kept as failed); 409 when it is not",
            json_body(delivery), path_number,
            body=record(reason=reason, optional=("reason",)), errors=("409",),
            scope="admin")},
        "/api/v1/exports": {"post": start_export},
        "/api/v1/exports/{id}": {"get": op("An export's state", json_body(export),
                                           path_id)},
        "/api/v1/exports/{id}/archive": {"get": op(
            "Download a finished export (tar); 409 while it is not", {
                "application/x-tar": {}}, path_id, errors=("409",), scope="export")},
        "/api/v1/erasures": {"post": op(
            "Erase every message of the tenant in which an address appears; 409 when "
            "a legal hold covers one", json_body(erasure),
            body=record(subject=address, dry_run={"type": "boolean"},
                        optional=("dry_run",)), errors=("409",), scope="erase")},
        "/api/v1/users": {"get": op(
            "The tenant's submission users (never their password hashes)",
            json_body(record(users={"type": "array", "items": record(
                login=string, send_as=strings)})))},
        "/api/v1/contacts": {"get": op(
            "The addresses the tenant's mail holds, in order",
            page("contacts", contact, string), [
                q("limit", limit, "at most"),
                q("after", {"type": "string", "maxLength": 1000},
                  "the 'next' of the previous page")])},
        "/api/v1/subprocessors": {"get": op(
            "The sub-processors of the registry, and whether the tenant's mail may go "
            "through each now (and if not, why)",
            json_body(record(policy={"type": "boolean"},
                             subprocessors={"type": "array", "items": subprocessor})),
            links=first("subprocessors", "name",
                        "post_subprocessors_name_objections"))},
        "/api/v1/subprocessors/notices": {"get": op(
            "The tenant's sub-processor change notices and their objection windows",
            json_body(record(notices={"type": "array", "items": notice})))},
        "/api/v1/subprocessors/{name}/objections": {"post": op(
            "Record the tenant's objection to a sub-processor: from now on it does "
            "not handle the tenant's mail",
            json_body(record(subprocessor=string, note=string,
                             usable={"const": False})),
            [{"name": "name", "in": "path", "required": True, "schema": string}],
            body=record(note=note, optional=("note",)), status="201", scope="admin")},
        "/api/v1/holds": {
            "get": op("The legal holds in force on the tenant's mail",
                      json_body(record(holds={"type": "array", "items": hold}))),
            "post": op("Place a legal hold on the tenant's mail (all of it, or what carries "
                       "an address or a tag); 409 when one of that name is in force, the "
                       "retention policy in force has no such tag, or until has passed",
                       json_body(record(id=number, name=string)), body=new_hold,
                       status="201", errors=("409",), scope="admin")},
        "/api/v1/holds/{id}": {"delete": op(
            "Release a legal hold the tenant placed",
            json_body(record(id=number, released={"const": True})), path_number,
            scope="admin")},
        "/api/v1/incidents": {"get": op(
            "The personal-data incidents that affect the tenant, newest first, with the "
            "notice to the tenant: queued, delivered, the deadline, kept or not",
            json_body(record(incidents={"type": "array", "items": incident})),
            links=first("incidents", "id", "get_incidents_id"))},
        "/api/v1/incidents/{id}": {"get": op(
            "One incident that affects the tenant", json_body(incident), path_number)},
        "/api/v1/requests": {
            "get": op("The data-subject requests about the tenant's data that reached the "
                      "processor, newest first: forwarded, due, answered by which export "
                      "or erasure",
                      json_body(record(requests={"type": "array", "items": subject_request}))),
            "post": op("Record a data-subject request that reached the processor through the "
                       "tenant's own channel and forward it, quoted, to the tenant's privacy "
                       "contact; 409 when the tenant names no privacy contact or "
                       "received_at is to come or over a year ago",
                       json_body(subject_request), body=record(
                           kind=kinds, subject=address,
                           text={"type": "string", "minLength": 1,
                                 "maxLength": MAX_REQUEST_TEXT, "pattern": r"\S"},
                           received_at=when, optional=("received_at",)),
                       status="201", errors=("409",), scope="admin")},
        "/api/v1/processing-record": {"get": op(
            "The tenant's record of processing (GDPR art. 30) as the gateway can state it: "
            "categories of data, retention, sub-processors, security, counts",
            {**json_body(processing), "text/markdown": {"schema": string}},
            [q("format", {"enum": ["json", "markdown"]}, "json (default) or markdown")])},
        "/api/v1/audit": {"get": op(
            "The tenant's audit events, oldest first: the newest page, or the page "
            "before/after an event",
            json_body(record(events={"type": "array", "items": event},
                             older=nullable({"type": "integer"}),
                             newer=nullable({"type": "integer"}))), [
                q("limit", limit, "at most"),
                q("before", number, "older than this event (a page's 'older')"),
                q("after", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                  "newer than this event (a page's 'newer')"),
                q("action", {"type": "string", "minLength": 1, "maxLength": 64},
                  "this action, or this family of actions (api: api.get, api.post..)"),
                q("subject", address, "events about this person (erasures, exports)"),
                q("since", when, "at or after"), q("until", when, "before")])},
    }
    for path, methods in paths.items():
        for method, operation in methods.items():
            operation["operationId"] = _operation_id(method, path)
    return {
        "openapi": "3.1.0",
        "info": {"title": "MailFlowr Gateway admin API", "version": __version__,
                 "description": "A tenant's own data. Every token belongs to one tenant; "
                                "whatever is not that tenant's answers 404. A token's "
                                f"scopes ({', '.join(SCOPES)}) say what it may do; "
                                "`admin` may do everything."},
        "security": [{"token": []}],
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "from `token create --tenant T "
                                                         "--scope S`"}},
            "schemas": {"id": {"type": "string", "pattern": "^[0-9A-Za-z]{26}$",
                               "description": "a message's or an export's id (a ULID)"},
                        "error": record(error=string)},
            "responses": {"error": {"description": "an error",
                                    "content": json_body(ref("error"))}},
        },
        "paths": paths,
    }


def _operation_id(method: str, path: str) -> str:
    """``get_messages_id`` for GET /api/v1/messages/{id}."""
    words = path.removeprefix("/api/v1/").replace(".", "_").replace("{", "").replace("}", "")
    return f"{method}_{words.replace('/', '_')}"

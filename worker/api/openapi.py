"""The OpenAPI 3.1 description of the progress API (`GET /v1/openapi.json`); a test keeps it in step with the routes."""

from __future__ import annotations

from functools import cache
from typing import Any

_ERROR = {"$ref": "#/components/responses/Error"}
_ORDER_ID = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
    "description": "The upstream app's order id",
}
_STREAM_TOKEN = {
    "name": "token",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "A stream token for this order (POST /v1/orders/{order_id}/stream-token) instead of a bearer token",
}
_READ: list[dict[str, list[str]]] = [{"bearer": []}]
_READ_OR_STREAM: list[dict[str, list[str]]] = [{"bearer": []}, {"streamToken": []}]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _ERROR for status in statuses}


def _op(summary: str, responses: dict[str, Any], *, security: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    op["security"] = _READ if security is None else security
    return op


_GENERATION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "generation_id": {"type": "integer", "description": "The run's id (a generation's, an edit's or a rollback's)"},
        "kind": {"enum": ["generation", "edit", "rollback"]},
        "version": {"type": ["integer", "null"], "description": "The version the run made, once it succeeded"},
        "status": {"enum": ["waiting", "queued", "running", "succeeded", "failed", "cancelled"]},
        "current_phase": {
            "type": ["string", "null"],
            "enum": ["plan", "content", "code", "assemble", "edit_plan", "edit_files", "publish", None],
        },
        "attempt": {"type": "integer"},
        "error": {"type": ["object", "null"], "description": "type, message, phase, retryable, traceback, details"},
        "usage": {"type": "object", "description": "input_tokens, output_tokens, calls, cost_usd"},
        "cost_usd": {"type": "number"},
        "pages": {"type": "array", "items": {"type": "string"}},
        "replica_id": {"type": ["string", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
        "started_at": {"type": ["string", "null"], "format": "date-time"},
        "finished_at": {"type": ["string", "null"], "format": "date-time"},
        "phases": {
            "type": "array",
            "description": "Only on GET /v1/orders/{order_id}: the committed phases",
            "items": {
                "type": "object",
                "properties": {
                    "phase": {"type": "string"},
                    "duration_ms": {"type": ["integer", "null"]},
                    "usage": {"type": "object"},
                    "completed_at": {"type": "string", "format": "date-time"},
                },
            },
        },
    },
}
_N = {
    "name": "n",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
    "description": "A version number of the order's site (1, 2, 3...)",
}
_VERSION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "number": {"type": "integer"},
        "parent": {"type": ["integer", "null"], "description": "The version live when this one was made"},
        "kind": {"enum": ["generation", "edit", "rollback"]},
        "generation_id": {"type": ["integer", "null"], "description": "The run that made it"},
        "instruction": {"type": ["string", "null"], "description": "An edit's instruction"},
        "rolled_back_to": {"type": ["integer", "null"], "description": "A rollback's source version"},
        "usage": {"type": "object", "description": "input_tokens, output_tokens, calls, cost_usd"},
        "cost_usd": {"type": "number"},
        "created_at": {"type": "string", "format": "date-time"},
        "live": {"type": "boolean"},
        "files": {"type": "integer"},
        "bytes": {"type": "integer"},
    },
}
_VERSION_FILE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "sha256": {"type": "string"},
        "bytes": {"type": "integer"},
        "media_type": {"type": "string"},
    },
}
_EDIT_QUEUED = {
    "type": "object",
    "properties": {
        "job_id": {"type": ["string", "null"]},
        "queued": {"type": "boolean"},
        "order_id": {"type": "integer"},
        "live_version": {"type": ["integer", "null"], "description": "Live when the job was sent"},
    },
    "required": ["job_id", "queued"],
}
_QUEUED = {
    "type": "object",
    "properties": {"job_id": {"type": "string"}, "queued": {"type": "boolean"}},
    "required": ["job_id", "queued"],
}


@cache
def openapi_document() -> dict[str, Any]:
    order = "/v1/orders/{order_id}"
    paths: dict[str, Any] = {
        "/healthz": {
            "get": _op(
                "200 while PostgreSQL answers and the LISTEN connection is up; 503 otherwise",
                {"200": _json({"type": "object"}, "healthy"), "503": _json({"type": "object"}, "unhealthy")},
                security=[],
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics of this serve process",
                {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}, **_errors(401)},
            )
        },
        "/v1/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")})},
        order: {
            "get": _op(
                "The order and its latest generation, with its phases",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "order_id": {"type": "integer"},
                                "has_brief": {"type": "boolean"},
                                "created_at": {"type": "string", "format": "date-time"},
                                "generation": {"oneOf": [_GENERATION, {"type": "null"}]},
                            },
                        },
                        "the order",
                    ),
                    **_errors(400, 401, 404),
                },
            )
        },
        f"{order}/generations": {
            "get": _op(
                "The order's generations, newest first",
                {
                    "200": _json(
                        {"type": "object", "properties": {"generations": {"type": "array", "items": _GENERATION}}},
                        "the history",
                    ),
                    **_errors(400, 401, 404),
                },
                parameters=[
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}
                ],
            )
        },
        f"{order}/events": {
            "get": _op(
                "Server-Sent Events: each progress row as `event: progress` (id: the row id), then `event: end`",
                {
                    "200": {
                        "description": "text/event-stream. Replays the rows after Last-Event-ID (or ?after=), else "
                        "every row of the latest generation, then streams live; a comment every 15 s while idle; "
                        '`event: end` with data {"status", "generation_id"} once the generation is terminal and '
                        "every row announcing its end was sent, then closes.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 401, 403, 404),
                },
                security=_READ_OR_STREAM,
                parameters=[
                    {"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                    _STREAM_TOKEN,
                ],
            )
        },
        f"{order}/generate": {
            "post": _op(
                "Enqueue the order's generation (worker.client.enqueue_generation); needs a write token",
                {
                    "202": _json(_QUEUED, "enqueued (queued=false: a job for the order was already queued)"),
                    **_errors(400, 401, 403, 404),
                },
                requestBody={
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "brief": {"type": "object", "description": "See the README's brief"},
                                    "regenerate": {"type": "boolean", "default": False},
                                },
                                "additionalProperties": False,
                            }
                        }
                    },
                },
            )
        },
        f"{order}/cancel": {
            "post": _op(
                "Cancel the order's active generation (sitegen cancel); needs a write token",
                {
                    "202": _json(
                        {
                            "type": "object",
                            "properties": {
                                "generation_id": {"type": "integer"},
                                "status": {"enum": ["cancelled", "cancel_requested"]},
                            },
                        },
                        "cancelled, or asked to stop at its next safe point",
                    ),
                    **_errors(400, 401, 403, 404, 409),
                },
            )
        },
        f"{order}/retry": {
            "post": _op(
                "Run a failed or cancelled generation again with the stored brief (sitegen retry); write token",
                {"202": _json(_QUEUED, "enqueued"), **_errors(400, 401, 403, 404, 409)},
            )
        },
        f"{order}/stream-token": {
            "post": _op(
                "A signed token for this order's events and site only, to pass as ?token=",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"token": {"type": "string"}, "expires_at": {"type": "number"}},
                        },
                        "the token and its expiry (Unix seconds)",
                    ),
                    **_errors(400, 401, 404),
                },
            )
        },
        f"{order}/site/{{path}}": {
            "get": _op(
                "A file of the order's latest succeeded site (site/ serves index.html)",
                {"200": {"description": "the file, with its stored media type"}, **_errors(400, 401, 403, 404)},
                security=_READ_OR_STREAM,
                parameters=[
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
                    _STREAM_TOKEN,
                ],
            )
        },
        f"{order}/versions": {
            "get": _op(
                "The order's site versions, newest first (issue 22)",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "order_id": {"type": "integer"},
                                "live_version": {"type": ["integer", "null"]},
                                "versions": {"type": "array", "items": _VERSION},
                            },
                        },
                        "the versions",
                    ),
                    **_errors(400, 401, 404),
                },
                parameters=[
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}
                ],
            )
        },
        f"{order}/versions/{{n}}": {
            "get": _op(
                "One version: its instruction, parent, usage, quality report and files",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                **_VERSION["properties"],
                                "quality": {"type": "object", "description": "The site checks' report"},
                                "files": {"type": "array", "items": _VERSION_FILE},
                            },
                        },
                        "the version",
                    ),
                    **_errors(400, 401, 404),
                },
                parameters=[_N],
            )
        },
        f"{order}/versions/{{n}}/diff": {
            "get": _op(
                "What changed from version `against` (default: n's parent) to version n",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "version": {"type": "integer"},
                                "against": {"type": ["integer", "null"], "description": "null: no parent"},
                                "changed": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "path": {"type": "string"},
                                            "media_type": {"type": "string"},
                                            "from_sha256": {"type": "string"},
                                            "to_sha256": {"type": "string"},
                                            "from_bytes": {"type": "integer"},
                                            "to_bytes": {"type": "integer"},
                                            "binary": {"type": "boolean"},
                                            "diff": {
                                                "type": ["string", "null"],
                                                "description": "unified diff (null for a binary file)",
                                            },
                                        },
                                    },
                                },
                                "added": {"type": "array", "items": _VERSION_FILE},
                                "removed": {"type": "array", "items": _VERSION_FILE},
                                "unchanged": {"type": "integer"},
                            },
                        },
                        "the differences",
                    ),
                    **_errors(400, 401, 404),
                },
                parameters=[
                    _N,
                    {"name": "against", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}},
                ],
            )
        },
        f"{order}/versions/{{n}}/site/{{path}}": {
            "get": _op(
                "A file of version n of the order's site, with the live site's headers (site/ serves index.html)",
                {"200": {"description": "the file, with its stored media type"}, **_errors(400, 401, 403, 404)},
                security=_READ_OR_STREAM,
                parameters=[
                    _N,
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
                    _STREAM_TOKEN,
                ],
            )
        },
        f"{order}/edits": {
            "post": _op(
                "Enqueue an edit of the order's live site (worker.client.enqueue_edit); needs a write token",
                {"202": _json(_EDIT_QUEUED, "enqueued"), **_errors(400, 401, 403, 404, 409)},
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "instruction": {"type": "string", "minLength": 1, "maxLength": 2000},
                                    "base_version": {"type": ["integer", "null"], "minimum": 1},
                                    "pages": {
                                        "type": ["array", "null"],
                                        "items": {"type": "string"},
                                        "minItems": 1,
                                        "maxItems": 12,
                                        "description": "page slugs the edit is limited to",
                                    },
                                },
                                "required": ["instruction"],
                                "additionalProperties": False,
                            }
                        }
                    },
                },
            )
        },
        f"{order}/rollback": {
            "post": _op(
                "Make an earlier version live again, as a new version (worker.client.enqueue_rollback); write token",
                {"202": _json(_EDIT_QUEUED, "enqueued"), **_errors(400, 401, 403, 404, 409)},
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"version": {"type": "integer", "minimum": 1}},
                                "required": ["version"],
                                "additionalProperties": False,
                            }
                        }
                    },
                },
            )
        },
        f"{order}/site.zip": {
            "get": _op(
                "The whole latest succeeded site as a zip",
                {
                    "200": {"description": "application/zip", "content": {"application/zip": {}}},
                    **_errors(400, 401, 403, 404),
                },
                security=_READ_OR_STREAM,
                parameters=[_STREAM_TOKEN],
            )
        },
    }
    for path, item in paths.items():
        for method, op in item.items():
            if "{order_id}" in path:
                op["parameters"] = [_ORDER_ID, *op.get("parameters", [])]
            if op["security"]:
                # Any credential may be refused: failed ones are throttled per client address (429).
                op["security"] = [*op["security"], {"session": []}]
                op["responses"].setdefault("429", _ERROR)
            if method == "post":
                op["responses"].setdefault("415", _ERROR)  # a body must be application/json
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "sitegen progress API",
            "version": "1",
            "description": "Live progress of site generations for upstream frontends (docs/api.md).",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "SITEGEN_API_READ_TOKENS or SITEGEN_API_WRITE_TOKENS",
                },
                "streamToken": {"type": "apiKey", "in": "query", "name": "token"},
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "__Host-sitegen_session",
                    "description": "the dashboard's session (`sitegen_session` over http on loopback); docs/api.md",
                },
            },
            "responses": {
                "Error": _json(
                    {
                        "type": "object",
                        "properties": {
                            "error": {
                                "type": "object",
                                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
                                "required": ["type", "message"],
                            }
                        },
                        "required": ["error"],
                    },
                    "an error",
                )
            },
        },
    }

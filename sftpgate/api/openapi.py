"""``/openapi.json``: OpenAPI 3.0 rendered from the route table (routes.py). Pure."""

from __future__ import annotations

from typing import Any

from .. import __version__
from .routes import ROUTES, SCHEMAS, Route

_REASONS = {
    400: "Bad request: an unknown parameter, a bad value, bad JSON",
    401: "No valid bearer token",
    403: "The token's role may not do this",
    404: "No such thing",
    409: "It clashes with the state of the records",
    413: "The body is larger than api.max_body",
    422: "The config file was refused (the message says why)",
    503: "The database cannot be reached now",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _operation(route: Route) -> dict[str, Any]:
    media = "application/x-ndjson" if route.stream else "application/json"
    response_schema: dict[str, Any] = (
        {"type": "object"} if route.response == "OpenAPI" else _ref(route.response)
    )
    responses: dict[str, Any] = {
        str(route.status): {
            "description": "one JSON object a line" if route.stream else "OK",
            "content": {media: {"schema": response_schema}},
        }
    }
    codes = set(route.errors)
    if route.role is not None:
        codes.add(401)
    if route.role == "admin":
        codes.add(403)
    for code in sorted(codes):
        responses[str(code)] = {
            "description": _REASONS[code],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    op: dict[str, Any] = {
        "operationId": route.handler,
        "summary": route.summary,
        "parameters": [
            {
                "name": p.name,
                "in": p.where,
                "required": p.where == "path",
                "description": p.doc,
                "schema": p.schema(),
                **({"style": "form", "explode": True} if p.many else {}),
            }
            for p in route.params
        ],
        "responses": responses,
    }
    if route.role is None:
        op["security"] = []
    else:
        op["description"] = f"Needs a token of role `{route.role}`" + (
            " (or `admin`)." if route.role == "read" else "."
        )
    if route.body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(route.body)}},
        }
    return op


def document() -> dict[str, Any]:
    """The OpenAPI document of every route in ROUTES."""
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "sftpgate admin API",
            "version": __version__,
            "description": "The journal, sessions, jobs, uploads, users and bans of an sftpgate "
            "cluster (docs/api.md). Every request, refused ones too, is journaled as an `admin` "
            "operation.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
        },
    }

"""`/v1/openapi.json`: the OpenAPI 3.1 document of the REST door, built from its Routes, so
that what is described is what is served. Pure code.

Each Route brings its Operation Object and the schemas it refers to (a `Problem` schema of a
route is the door's own, PROBLEM_SCHEMA, whatever the route says); the door adds what every
operation shares and no module should have to repeat: the `Idempotency-Key` header of every
POST, the path parameters of the template when the spec leaves them out, and the problem
answers the door itself gives (401, 403, 404 for paths with parameters, 409/422 for POST
idempotency, 413, 503), all as RFC 9457 problem+json. Security is mutual TLS for everything.
An operation says the facility right it needs in `x-operation`; one open to every facility
its certificate names (Route.operation ANY_FACILITY) says `x-any-facility: true` instead.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from gateway.doors.api import PROBLEM_CONTENT_TYPE, Route
from gateway.doors.router import compile_template

OPENAPI_VERSION = "3.1.0"

PROBLEM_SCHEMA = {
    "type": "object",
    "description": "An RFC 9457 problem. Extension members depend on the problem type.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
    },
    "additionalProperties": True,
}

IDEMPOTENCY_PARAMETER = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "Makes a POST safe to send again: the same key with the same request gets "
                   "the first answer back (with `Idempotency-Replayed: true`) without being "
                   "processed twice; with another request, 422; while the first is still being "
                   "processed, 409. Keys are per facility; 1 to 128 visible ASCII characters.",
    "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"},
}

_DOOR_ANSWERS = {
    "400": "Malformed request (body, header or parameter)",
    "401": "The client certificate names no facility of the registry",
    "403": "The caller's facility type may not call this operation",
    "413": "Request body larger than the door accepts",
    "503": "The gateway could not answer in time or could not store the request; send it again",
}


def problem_answer(description: str) -> dict:
    return {"description": description,
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


class SpecConflict(ValueError):
    """Two routes that declare different schemas under the same name."""


def openapi_document(routes: Iterable[Route], *, title: str = "MA-HIE gateway REST API",
                     version: str = "1", description: str | None = None,
                     server_url: str | None = None) -> dict:
    """The OpenAPI 3.1 document describing `routes` (see the module docstring)."""
    schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}
    paths: dict[str, dict] = {}
    for route in routes:
        for name, schema in route.schemas.items():
            if name == "Problem":
                continue  # the door's own: every problem answer is the door's
            if name in schemas and schemas[name] != schema:
                raise SpecConflict(f"schema {name!r} is declared differently by two routes "
                                   f"({route.method} {route.template})")
            schemas[name] = schema
        paths.setdefault(route.template, {})[route.method.lower()] = _operation(route)
    document = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version,
                 "description": description or (
                     "REST door of the national health information exchange gateway. Every "
                     "call is made over mutual TLS: the client certificate names the calling "
                     "facility, whose type decides which operations it may call. Errors are "
                     "RFC 9457 problem+json.")},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {"mutualTLS": {
                "type": "mutualTLS",
                "description": "A client certificate issued by the gateway's CA that names a "
                               "facility of the registry (by subject, fingerprint, or as the "
                               "development PKI names them, CN = facility id)."}},
        },
        "security": [{"mutualTLS": []}],
    }
    if server_url:
        document["servers"] = [{"url": server_url}]
    return document


def _operation(route: Route) -> dict:
    operation = copy.deepcopy(dict(route.spec))
    if route.operation is not None:
        operation.setdefault("x-operation", route.operation)  # the facility right it needs
    else:
        operation.setdefault("x-any-facility", True)  # no right needed beyond a known certificate
    parameters = list(operation.get("parameters", ()))
    declared = {(p.get("in"), p.get("name")) for p in parameters if isinstance(p, dict)}
    path_parameters = [text for is_parameter, text in compile_template(route.template) if is_parameter]
    for name in path_parameters:
        if ("path", name) not in declared:
            parameters.append({"name": name, "in": "path", "required": True, "schema": {"type": "string"}})
    post = route.method.upper() == "POST"
    if post and ("header", "Idempotency-Key") not in declared:
        parameters.append(copy.deepcopy(IDEMPOTENCY_PARAMETER))
    if parameters:
        operation["parameters"] = parameters
    responses = operation.setdefault("responses", {})
    answers = dict(_DOOR_ANSWERS)
    if route.operation is None:
        answers.pop("403", None)  # any facility named by its certificate may call it
    if path_parameters:
        answers["404"] = "Nothing of the caller's at this path"
    if post:
        answers["409"] = "A request with this Idempotency-Key is still being processed"
        answers["422"] = "The request cannot be processed as it is (see the problem's detail)"
    for status, description in answers.items():
        responses.setdefault(status, problem_answer(description))
    return operation

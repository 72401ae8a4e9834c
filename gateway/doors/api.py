"""The shapes every REST operation of the HTTPS door shares. Pure code (no reactor).

An operation is a `Route`: method, path template, the API operation a facility's type must
allow (facilities.yaml `types:`; ANY_FACILITY, None, for what every facility named by its
certificate may call, such as the OpenAPI document or the QR signing key), the handler, and its OpenAPI 3.1 Operation Object, from which
`/v1/openapi.json` is built, so that the document cannot drift from what is served. The door
identifies the caller by its client certificate, checks the operation, honours
`Idempotency-Key`, limits sizes and turns `Problem` into RFC 9457 problem+json; handlers only
do their job.
"""
from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway import fhir_json, strict_json
from gateway.config import SenderConfig

PROBLEM_TYPE_BASE = "https://ma-hie.example/problems/"  # + a slug: our problem types


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str  # as received, without the query
    path_params: Mapping[str, str]  # from the route's template: {"id": "..."}
    query: Mapping[str, tuple[str, ...]]
    headers: Mapping[str, str]  # names in lower case
    body: bytes
    facility: SenderConfig  # the caller, named by its verified client certificate
    peer: str  # "address:port"
    request_id: str  # for logs and problem bodies


@dataclass
class ApiResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class Problem(Exception):
    """An RFC 9457 problem: raised by a handler, answered as application/problem+json."""

    def __init__(self, status: int, slug: str, title: str, detail: str, **extensions: Any):
        super().__init__(detail)
        self.status = status
        self.slug = slug  # the type is PROBLEM_TYPE_BASE + slug
        self.title = title
        self.detail = detail
        self.extensions = extensions

    def as_dict(self, instance: str | None = None) -> dict:
        body = {"type": PROBLEM_TYPE_BASE + self.slug, "title": self.title,
                "status": self.status, "detail": self.detail}
        if instance:
            body["instance"] = instance
        body.update(self.extensions)
        return body


PROBLEM_CONTENT_TYPE = "application/problem+json"


def problem_response(problem: Problem, instance: str | None = None) -> ApiResponse:
    """A Problem as its RFC 9457 answer (with Allow for a 405, Retry-After when it says)."""
    headers = {}
    allow = problem.extensions.get("allow")
    if allow:
        headers["Allow"] = ", ".join(allow)
    retry = problem.extensions.get("retry_after")
    if retry is not None:
        headers["Retry-After"] = str(retry)
    body = json.dumps(problem.as_dict(instance), ensure_ascii=False).encode("utf-8")
    return ApiResponse(problem.status, body, PROBLEM_CONTENT_TYPE, headers)


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> ApiResponse:
    return ApiResponse(status, fhir_json.dumps(data), "application/json", dict(headers or {}))


def read_json(request: ApiRequest) -> Any:
    """The request body as JSON read strictly (gateway.strict_json: no key twice, no NaN, ...),
    or a problem saying why not: 415 for a charset other than UTF-8, 400 otherwise."""
    refuse_foreign_charset(request)
    try:
        return strict_json.loads(request.body)
    except strict_json.NotUtf8 as error:
        raise Problem(400, "bad-encoding", "Body is not UTF-8", str(error)) from None
    except strict_json.JsonInputError as error:
        raise Problem(400, "bad-json", "Body is not JSON", str(error)) from None


def refuse_foreign_charset(request: ApiRequest) -> None:
    """A 415 problem when the Content-Type names a charset other than UTF-8 (JSON is UTF-8)."""
    charset = strict_json.foreign_charset(request.headers.get("content-type"))
    if charset is not None:
        raise Problem(415, "unsupported-charset", "Unsupported charset",
                      f"charset {charset!r} of the Content-Type: JSON is sent as UTF-8 "
                      "(RFC 8259 section 8.1)")


ANY_FACILITY = None  # Route.operation of what every known facility may call

Handler = Callable[[ApiRequest], "ApiResponse | Awaitable[ApiResponse]"]


@dataclass(frozen=True)
class Route:
    method: str  # GET, POST
    template: str  # "/v1/prescriptions/{id}" (path parameters in braces, one segment each)
    # An API operation of gateway.config.API_OPERATIONS the caller's type must be allowed, or
    # ANY_FACILITY (None): any facility its certificate names may call it (never a 403).
    operation: str | None
    handler: Handler  # returns an ApiResponse, or a Deferred/coroutine of one; may raise Problem
    spec: Mapping[str, Any]  # its OpenAPI 3.1 Operation Object (summary, parameters, responses)
    # Schemas its spec refers to as "#/components/schemas/NAME".
    schemas: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.operation is not ANY_FACILITY and not (isinstance(self.operation, str) and self.operation):
            raise ValueError(f"route {self.method} {self.template}: operation must name an API "
                             "operation, or be ANY_FACILITY (None) for every facility")

"""Which Route answers a request: templates matched segment by segment. Pure code.

A template is a path whose segments are literals or `{name}` (one whole segment). Literal
segments win over parameters at the same place (`/v1/prescriptions/lookup` before
`/v1/prescriptions/{id}`). A path that matches no template is a 404 problem; one whose
template exists for other methods only is a 405 problem with the methods allowed.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.doors.api import Problem, Route

_PARAMETER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class RouteConflict(ValueError):
    """Two routes for the same method and template, or a malformed template."""


@dataclass(frozen=True)
class Match:
    route: Route
    params: dict[str, str]


@dataclass(frozen=True)
class _Compiled:
    route: Route
    parts: tuple[tuple[bool, str], ...]  # (is parameter, literal or parameter name)

    @property
    def rank(self) -> tuple:
        # Literals before parameters, place by place.
        return tuple(is_parameter for is_parameter, _ in self.parts)


def compile_template(template: str) -> tuple[tuple[bool, str], ...]:
    if not template.startswith("/") or "//" in template or "?" in template:
        raise RouteConflict(f"route template {template!r} must be an absolute path without query")
    parts = []
    for segment in template.strip("/").split("/"):
        found = _PARAMETER.match(segment)
        if found:
            parts.append((True, found.group(1)))
        elif "{" in segment or "}" in segment:
            raise RouteConflict(f"route template {template!r}: a parameter is a whole segment")
        else:
            parts.append((False, segment))
    return tuple(parts)


class RouteTable:
    def __init__(self, routes: Iterable[Route]):
        compiled: list[_Compiled] = []
        seen: set[tuple[str, tuple]] = set()
        for route in routes:
            parts = compile_template(route.template)
            shape = (route.method.upper(), tuple("{}" if p else text for p, text in parts))
            if shape in seen:
                raise RouteConflict(f"two routes for {route.method} {route.template}")
            seen.add(shape)
            compiled.append(_Compiled(route, parts))
        self._routes = sorted(compiled, key=lambda c: c.rank)
        self.routes = tuple(c.route for c in compiled)

    def match(self, method: str, path: str) -> Match:
        """The route for `method path` (path without the query), or a 404/405 Problem."""
        segments = path.strip("/").split("/")
        wanted = "GET" if method == "HEAD" else method  # GET without the body (RFC 9110 9.3.2)
        allowed: list[str] = []
        for compiled in self._routes:
            params = _bind(compiled.parts, segments)
            if params is None:
                continue
            route_method = compiled.route.method.upper()
            if route_method == wanted:
                return Match(compiled.route, params)
            for each in (route_method, "HEAD") if route_method == "GET" else (route_method,):
                if each not in allowed:
                    allowed.append(each)
        if allowed:
            raise Problem(405, "method-not-allowed", "Method not allowed",
                          f"{method} is not allowed here; allowed: {', '.join(allowed)}",
                          allow=allowed)
        raise Problem(404, "not-found", "Not found", "no operation at this path")


def _bind(parts: tuple[tuple[bool, str], ...], segments: list[str]) -> dict[str, str] | None:
    if len(parts) != len(segments):
        return None
    params = {}
    for (is_parameter, text), segment in zip(parts, segments):
        if is_parameter:
            if not segment:
                return None
            params[text] = unquote(segment)
        elif segment != text:
            return None
    return params

"""Routing: which destinations a translated message goes to. Pure code.

A route matches when every key of its `when` matches (within a key, any of its values):
the message type (`ORU^R01`, `ADT^*`, `ADT`, `ASTM`, `*`), the sending facility or its type,
the resource types present in the canonical bundle, or a code present in any coding of it.
A message goes to the union of the destinations of the routes it matches, each once, in the
order the routes name them.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator

from gateway.config import RouteConfig, SenderConfig
from gateway.facilities import type_matches


class Router:
    def __init__(self, routes: Iterable[RouteConfig], senders: Iterable[SenderConfig] = ()):
        self.routes = tuple(routes)
        self.sender_types = {sender.id: sender.type for sender in senders}

    def destinations(self, message_type: str, sender_id: str | None, bundle: dict) -> tuple[str, ...]:
        """The destination names for one translated message (possibly none)."""
        chosen: dict[str, None] = {}
        content: _Content | None = None
        for route in self.routes:
            when = route.when
            if when.message_types and not any(type_matches(p, message_type) for p in when.message_types):
                continue
            if when.senders and sender_id not in when.senders:
                continue
            if when.sender_types and self.sender_types.get(sender_id or "") not in when.sender_types:
                continue
            if when.resources or when.codes:
                content = content or _Content(bundle)
                if when.resources and not content.resource_types.intersection(when.resources):
                    continue
                if when.codes and not content.codes.intersection(when.codes):
                    continue
            chosen.update(dict.fromkeys(route.to))
        return tuple(chosen)


class _Content:
    """What routes look at in a bundle, computed once per message and only when asked (most
    routes never look at codes, and walking a whole bundle for them is not free)."""

    def __init__(self, bundle: dict):
        self.resources = [entry.get("resource") or {} for entry in bundle.get("entry", ())]
        self.resource_types = {resource.get("resourceType") for resource in self.resources}

    @functools.cached_property
    def codes(self) -> set[str]:
        codes: set[str] = set()
        for resource in self.resources:
            for coding in _codings(resource):
                code = coding.get("code")
                if isinstance(code, str):
                    codes.add(code)
                    if isinstance(coding.get("system"), str):
                        codes.add(f"{coding['system']}|{code}")
        return codes


def _codings(value) -> Iterator[dict]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "coding" and isinstance(item, list):
                yield from (c for c in item if isinstance(c, dict))
            else:
                yield from _codings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _codings(item)


def patient_key(bundle: dict) -> str | None:
    """The ordering key of a message's deliveries: its first Patient that no other replaces (a
    merge's survivor, wherever the bundle lists it), else its first Patient (None: it has none,
    and its deliveries are ordered with nothing else)."""
    patients = _patients(bundle)
    chosen = [p for p in patients if not _replaced(p)] or patients
    return f"Patient/{chosen[0]['id']}" if chosen else None


def retired_keys(bundle: dict) -> tuple[str, ...]:
    """The ordering keys of the Patients a message retires (a merge's merged patient: linked
    `replaced-by`), whose earlier deliveries must reach each destination before it."""
    return tuple(f"Patient/{p['id']}" for p in _patients(bundle) if _replaced(p))


def _patients(bundle: dict) -> list[dict]:
    resources = (entry.get("resource") or {} for entry in bundle.get("entry", ()))
    return [r for r in resources if r.get("resourceType") == "Patient" and r.get("id")]


def _replaced(patient: dict) -> bool:
    return any(isinstance(link, dict) and link.get("type") == "replaced-by"
               for link in patient.get("link") or ())

"""What travels between the outbox, the transport and a destination adapter.

A destination adapter is pure: it turns a canonical bundle into an `HttpRequest` and an
`HttpResponse` (or a transport failure) into a `DeliveryOutcome`. The outbox worker decides
what happens next from the outcome's kind alone: delivered, retry later, or dead letter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OutcomeKind = Literal["delivered", "transient", "permanent"]


@dataclass(frozen=True)
class HttpRequest:
    """One request to a peer. `url` is absolute; `headers` name → value (one value each)."""

    method: str
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpResponse:
    """A peer's whole answer. Header names are lower case."""

    code: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class DeliveryOutcome:
    """The verdict on one attempt.

    `reason` is short and free of patient data (it is logged and shown in the console);
    `response` keeps the peer's answer, if any, for the dead-letter record.
    """

    kind: OutcomeKind
    reason: str
    response: HttpResponse | None = None

    @classmethod
    def delivered(cls, reason: str = "delivered", response: HttpResponse | None = None):
        return cls("delivered", reason, response)

    @classmethod
    def transient(cls, reason: str, response: HttpResponse | None = None):
        return cls("transient", reason, response)

    @classmethod
    def permanent(cls, reason: str, response: HttpResponse | None = None):
        return cls("permanent", reason, response)

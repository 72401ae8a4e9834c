"""`Idempotency-Key` on every POST of the REST door.

The key is claimed in the database before the request is processed (gateway.doors.store):
- a new key: process, keep the answer, send it;
- the same key again with the same request (method, path, body): the kept answer, replayed
  byte for byte with `Idempotency-Replayed: true`, without processing anything;
- the same key with another request: 422 problem;
- the same key while the first request is still being processed: 409 problem (try later);
  a request left processing by an earlier process of this node (killed mid-request) is
  taken over at once rather than after its lease.
Answers of 5xx (the store was down, a timeout inside) and 409 (the same message is still being
processed under another request) are not kept: the claim is released so that the same request
may be sent again with the same key, and then gets the real answer. Keys are scoped per facility.
"""
from __future__ import annotations

import hashlib
import re
import uuid
from datetime import datetime, timezone
from typing import Awaitable, Callable

from gateway.doors.api import ApiRequest, ApiResponse, Problem, problem_response
from gateway.doors.store import (StoredAnswer, claim_request_on_shared_clock, claimant,
                                 finish_request, release_request)

HEADER = "idempotency-key"
# Visible ASCII, 1 to 128 characters (a UUID is the usual choice).
_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")
# Headers of an answer that belong to it and are replayed with it.
_KEPT_HEADERS = ("location", "content-location", "retry-after")


def request_digest(request: ApiRequest) -> str:
    """What makes two requests the same: method, path and body."""
    digest = hashlib.sha256()
    digest.update(request.method.encode() + b" " + request.path.encode("utf-8") + b"\n")
    digest.update(request.body)
    return digest.hexdigest()


def idempotency_key(request: ApiRequest) -> str | None:
    """The request's key, None without one; a 400 problem when malformed."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not _KEY.match(key):
        raise Problem(400, "bad-idempotency-key", "Malformed Idempotency-Key",
                      "Idempotency-Key must be 1 to 128 visible ASCII characters (a UUID, say)")
    return key


# This process's own id: a node restarted after a crash is another process of the same node.
PROCESS_INSTANCE = uuid.uuid4().hex[:16]


class IdempotencyGuard:
    def __init__(self, database, lease: float, now: Callable[[], float], node: str = "",
                 instance: str = PROCESS_INSTANCE):
        self.database = database
        self.lease = lease  # seconds a claim holds before another node may take it over
        self.now = now
        self.claimant = claimant(node, instance) if node else None

    def _instant(self) -> datetime:
        return datetime.fromtimestamp(self.now(), timezone.utc)

    async def run(self, request: ApiRequest, key: str, operation: str,
                  process: Callable[[], Awaitable[ApiResponse]]) -> ApiResponse:
        facility = request.facility.id
        claim = await self.database.run_write(claim_request_on_shared_clock, facility, key, operation or "-",
                                              request_digest(request), self._instant(), self.lease,
                                              self.claimant)
        if claim.outcome == "replay":
            answer = claim.answer
            return ApiResponse(answer.status, answer.body, answer.content_type,
                               {**answer.headers, "Idempotency-Replayed": "true"})
        if claim.outcome == "mismatch":
            raise Problem(422, "idempotency-key-reused", "Idempotency-Key reused",
                          "this Idempotency-Key was used for a different request (method, path or "
                          "body); use a new key for a new request")
        if claim.outcome == "in_progress":
            raise Problem(409, "request-in-progress", "Request in progress",
                          "a request with this Idempotency-Key is still being processed; "
                          "send it again later to get its answer", retry_after=1)
        try:
            response = await process()
        except Problem as problem:
            response = problem_response(problem, request.path)
        except BaseException:
            await self.database.run_write(release_request, facility, key)
            raise
        if response.status >= 500 or response.status == 409:
            await self.database.run_write(release_request, facility, key)
        else:
            headers = {name: value for name, value in response.headers.items()
                       if name.lower() in _KEPT_HEADERS}
            await self.database.run_write(finish_request, facility, key, StoredAnswer(
                response.status, response.content_type, headers, response.body), self._instant())
        return response


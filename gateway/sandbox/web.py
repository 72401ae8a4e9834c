"""Twisted web pieces shared by the sandbox peers: the fault control resource and the gate
every peer request passes through before it is answered."""
from __future__ import annotations

from collections.abc import Callable

from twisted.web import resource, server

from gateway.sandbox.faults import FaultPlan, FaultPlanError, Faults


class FaultControl(resource.Resource):
    """`/_sandbox/faults`: GET the plan, PUT a new one, DELETE to clear it (see faults.py)."""

    isLeaf = True

    def __init__(self, faults: Faults):
        super().__init__()
        self.faults = faults

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.faults.plan.to_json()

    def render_PUT(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        try:
            plan = FaultPlan.from_json(request.content.read())
        except FaultPlanError as e:
            request.setResponseCode(400)
            return str(e).encode()
        self.faults.set(plan)
        return plan.to_json()

    def render_DELETE(self, request) -> bytes:
        self.faults.clear()
        request.setHeader(b"content-type", b"application/json")
        return self.faults.plan.to_json()


def with_faults(
    request,
    faults: Faults,
    reactor,
    answer: Callable[[], None],
    error_answer: Callable[[int], None] | None = None,
) -> object:
    """Apply the current fault to `request`, then call `answer()` unless the fault replaces it.

    Returns `server.NOT_DONE_YET`: `answer` (or the fault) finishes the request. `error_answer`
    writes a peer-specific body for `http_500`/`http_503`/`http_400` (plain text when not given).
    Modes a peer does not know (`soap_fault` on the record) are the caller's to handle first.
    """
    plan = faults.take()
    if plan.mode == "down":
        request.transport.abortConnection()
        return server.NOT_DONE_YET
    if plan.mode in ("http_500", "http_503", "http_400"):
        code = int(plan.mode[5:])
        if error_answer is not None:
            error_answer(code)
        else:
            request.setResponseCode(code)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"sandbox fault injected\n")
            request.finish()
        return server.NOT_DONE_YET
    if plan.mode == "drop_answer":
        # The peer does the work; what it writes back never leaves.
        request.write = lambda data: None
        request.finish = request.transport.abortConnection
        answer()
        return server.NOT_DONE_YET
    if plan.mode == "slow" and plan.delay > 0:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        reactor.callLater(plan.delay, lambda: None if gone else answer())
        return server.NOT_DONE_YET
    answer()
    return server.NOT_DONE_YET


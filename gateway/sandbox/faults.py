"""Fault injection for the sandbox peers, set by the tests over the peer's own control path.

`PUT /_sandbox/faults` with `{"mode": ..., "delay": seconds, "count": n}` sets the plan;
`GET` reads it; `DELETE` clears it. `count` is how many requests the fault applies to
(absent or null: until cleared). Modes:

- `none`: answer normally;
- `down`: drop the connection without an answer (the client sees a connection error);
- `slow`: answer normally after `delay` seconds;
- `http_500`, `http_503`: answer with that status and an error body (a transient failure);
- `http_400`: answer 400 with an error body (a permanent refusal: the request is not done);
- `drop_answer`: do the work, then drop the connection instead of answering (the client
  cannot know it was done: it must retry with the same idempotency key);
- `soap_fault`: (CNSS only) answer with a SOAP server fault.

The control path itself is never subject to the faults.
"""
from __future__ import annotations

import json
import math
import threading
from dataclasses import asdict, dataclass

MODES = ("none", "down", "slow", "http_500", "http_503", "http_400", "drop_answer", "soap_fault")
CONTROL_PATH = b"/_sandbox/faults"


class FaultPlanError(ValueError):
    """A control request that does not describe a fault plan."""


@dataclass(frozen=True)
class FaultPlan:
    mode: str = "none"
    delay: float = 0.0
    count: int | None = None

    @classmethod
    def from_json(cls, body: bytes) -> FaultPlan:
        try:
            data = json.loads(body or b"{}")
        except ValueError as e:
            raise FaultPlanError(f"not JSON: {e}") from e
        if not isinstance(data, dict):
            raise FaultPlanError("expected a JSON object")
        unknown = set(data) - {"mode", "delay", "count"}
        if unknown:
            raise FaultPlanError(f"unknown keys: {', '.join(sorted(unknown))}")
        mode = data.get("mode", "none")
        if mode not in MODES:
            raise FaultPlanError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        delay = data.get("delay", 0.0)
        # json reads NaN, Infinity and 1e400 (inf): a plan that never answers or is not JSON again
        if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not 0 <= delay < math.inf:
            raise FaultPlanError("delay must be a finite number of seconds, 0 or more")
        count = data.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise FaultPlanError("count must be a positive integer or null")
        return cls(mode, float(delay), count)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class Faults:
    """The current plan of one peer; `take()` consumes one request's worth of it.

    Thread-safe, since a peer's handlers may run in a thread pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._plan = FaultPlan()

    @property
    def plan(self) -> FaultPlan:
        with self._lock:
            return self._plan

    def set(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan

    def clear(self) -> None:
        self.set(FaultPlan())

    def take(self) -> FaultPlan:
        """The fault (possibly `none`) for the request that has just arrived."""
        with self._lock:
            plan = self._plan
            if plan.mode == "none":
                return plan
            if plan.count is not None:
                left = plan.count - 1
                self._plan = FaultPlan() if left == 0 else FaultPlan(plan.mode, plan.delay, left)
            return plan

"""The audit recorder: the service that writes the gateway's events to the audit trail.

Not all of them: a message's receipt, its translation and each delivery attempt are appended
in the transaction that stores them (the ingest writer, the translation worker, the delivery
service), and their events come marked `recorded`; the recorder leaves those out. What it
keeps is the rest: reads, logins, refusals at the doors, failed handshakes, reloads.

It listens to the tree's EventBus, keeps what it hears in memory (events come from the
reactor and from database threads: a deque takes both without a lock) and every
`flush_interval` appends what has gathered, in the database thread pool, one append at a time
(each append is one transaction under the chain's lock; many small ones would queue on it).
What is left is appended when the service stops, which the tree does just before the database
closes.

The queue is bounded: beyond `limit` events (the database down, or slower than the gateway
for long) new events are not kept. That is never silent: the loss is logged, counted in
`lost`, and recorded in the trail itself as an `audit.lost` record once appending resumes.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool

from gateway.audit.chain import AuditEvent
from gateway.audit.trail import AuditTrail
from gateway.events import SYSTEM, Event, EventBus
from gateway.store.database import value_refused

log = logging.getLogger(__name__)

LOST = "audit.lost"  # the action of the record that says how many events were not kept
_LABELS = ("facility", "message_type", "destination", "listener")


def audit_event(event: Event, now: datetime | None = None) -> AuditEvent:
    """The audit record's content for a gateway event: its kind as the action, its detail
    with the facility, message type, destination, listener and duration when they are set."""
    detail = {key: _plain(value) for key, value in event.detail.items()}
    for key in _LABELS:
        value = getattr(event, key)
        if value is not None:
            detail[key] = value
    if event.duration is not None:
        detail["duration"] = round(event.duration, 6)
    return AuditEvent(event.kind, event.actor, event.outcome, event.subject, event.source,
                      detail, event.at or now)


class AuditRecorder(Service):
    """Appends the events of `events` to `trail` through `database` (gateway.store.database.
    Database: its thread pool and reactor)."""

    name = "audit"

    def __init__(self, trail: AuditTrail, events: EventBus, database, flush_interval: float = 0.2,
                 limit: int = 200_000, batch: int = 1_000):
        self.trail = trail
        self.events = events
        self.database = database
        self.flush_interval = flush_interval
        self.limit = limit
        self.batch = batch
        self.lost = 0  # events not kept since the start (the queue was full)
        self.appended = 0  # records appended since the start
        self._queue: deque[tuple[Event, datetime]] = deque()
        self._unrecorded_loss = 0  # lost events the trail has not been told of yet
        self._appending: defer.Deferred | None = None
        self._loop: task.LoopingCall | None = None
        self._listener = self.hear  # one bound method: unsubscribe compares by identity

    # -- the listener (any thread) -----------------------------------------------------------

    def hear(self, event: Event) -> None:
        if event.recorded:
            return
        if len(self._queue) >= self.limit:
            self.lost += 1
            self._unrecorded_loss += 1
            if self.lost == 1 or self.lost % 10_000 == 0:
                log.error("audit queue full (%d events): %d event(s) not recorded so far",
                          self.limit, self.lost)
            return
        self._queue.append((event, datetime.now(timezone.utc)))

    # -- the service (reactor thread) --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.events.subscribe(self._listener)
        self._loop = task.LoopingCall(self.flush)
        self._loop.clock = self.database.reactor
        self._loop.start(self.flush_interval, now=False).addErrback(
            lambda failure: log.error("audit flush loop ended: %s", failure.value))

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self.events.unsubscribe(self._listener)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._appending is not None:
            yield self._appending
        while self._queue or self._unrecorded_loss:
            appended = yield self.flush()
            if not appended:  # the database refused: the rest cannot be kept
                log.error("audit: %d event(s) left unrecorded at stop", len(self._queue))
                break

    def flush(self) -> defer.Deferred:
        """Append what has gathered (at most `batch` events); fires with the number of
        records appended (0 when one is in flight, nothing waits, or the append failed)."""
        if self._appending is not None or not (self._queue or self._unrecorded_loss):
            return defer.succeed(0)
        taken = [self._queue.popleft() for _ in range(min(len(self._queue), self.batch))]
        lost, self._unrecorded_loss = self._unrecorded_loss, 0
        self._appending = deferToThreadPool(self.database.reactor, self.database.pool,
                                            self._append, taken, lost)

        def done(count):
            self._appending = None
            self.appended += count
            if self._queue and self.running and len(self._queue) >= self.batch:
                self.database.reactor.callLater(0, self.flush)  # behind: do not wait a tick
            return count

        def failed(failure):
            self._appending = None
            # Keep them for the next tick, in order; the transaction rolled back.
            self._queue.extendleft(reversed(taken))
            self._unrecorded_loss += lost
            log.log(self.database.availability.level(failure), "audit append of %d event(s) failed: %s", len(taken),
                    failure.value)
            return 0

        return self._appending.addCallbacks(done, failed)

    def _append(self, taken: list[tuple[Event, datetime]], lost: int) -> int:
        events = [audit_event(event, heard) for event, heard in taken]
        if lost:
            events.append(AuditEvent(LOST, SYSTEM, "failure", "audit", None,
                                     {"events": lost, "limit": self.limit}))
        refused = value_refused(self.trail.engine)
        try:
            return len(self.trail.append(events))
        except refused:
            pass  # (any other failure: the database is away, the whole batch is tried again)
        # The database refused a value of one event: otherwise the batch, retried before every
        # later event, would stop the trail. Each on its own; one still refused is counted lost.
        appended = 0
        for event in events:
            try:
                appended += len(self.trail.append([event]))
            except refused as error:
                log.error("audit: a %s event refused by the database (%s): recorded as lost",
                          event.action, type(error).__name__)
                appended += len(self.trail.append([AuditEvent(
                    LOST, SYSTEM, "failure", "audit", None,
                    {"events": 1, "action": event.action, "reason": type(error).__name__})]))
        return appended


def _plain(value: Any) -> Any:
    """A JSON value for a detail (the hash covers its JSON text): datetimes as ISO text,
    bytes as hex, tuples as lists, non-finite numbers as text, anything else as its str."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


__all__ = ["AuditRecorder", "LOST", "audit_event"]

"""The delivery service: this node's outbox worker.

It claims due deliveries per destination as batches (up to the destination's `concurrency`
requests in flight; a batch is one request: up to the adapter's batch size of deliveries for
the shared record, of one patient or several, in order; one care sheet for CNSS), builds each
request with the destination's adapter under the batch's idempotency key, sends it over
mutual TLS, classifies the answer, and settles every delivery of the batch with it, in
batches of settlements: delivered, retried later with backoff, or dead.
It looks at the outbox when woken (a translation stored new deliveries, an attempt was
settled) and every `poll_interval` otherwise, so deliveries enqueued by other nodes, retries
that fall due and leases that expire are all picked up.

Batches fill up under load: while a request to a destination is in flight, only full batches
(its batch size) are sent to it; a partial one waits until nothing is in flight there (at most
the time of the requests already out) and then goes with whatever is due. A lone message
still leaves at once; a stream of them goes in a few large requests rather than many small
ones, which costs every side less per message (bench-deliver, 3,000 ORU^R01 to the record at
concurrency 4: 56-59 messages per request instead of 17-45, 426-446 messages/s end to end
instead of 371-431, the record's CPU per message about 0.08 ms lower).

Settling is isolated: when the database refuses a value of one attempt (a peer's answer kept
for a dead letter that is over-long, or text it cannot store), the batch is settled again one
attempt at a time, and the refused one is recorded without the peer's answer (its reason says
so), so that it does not hold the others (nor come back for ever). A settlement that fails for
another reason (the database away) is kept and tried again: each attempt is settled once.

Stopping lets requests in flight finish (each is bounded by its response timeout), settles
them, and gives back what it had claimed but not sent.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from twisted.application.service import Service
from sqlalchemy.exc import IntegrityError
from twisted.internet import defer, threads

from gateway.audit.chain import AuditEvent
from gateway.audit.recorder import audit_event
from gateway.audit.trail import AuditTrail
from gateway.config import GatewayConfig
from gateway.delivery.destinations import Destination, destination_for
from gateway.delivery.outcome import DeliveryOutcome
from gateway.delivery.retry import retry_after
from gateway.events import SYSTEM, Event, EventBus
from gateway.store import outbox
from gateway.store.database import Database, value_refused

log = logging.getLogger(__name__)


class DeliveryService(Service):
    name = "delivery"

    def __init__(self, config: GatewayConfig, database: Database, reactor,
                 rand: Callable[[], float] = random.random,
                 transport_factory: Callable | None = None, events: EventBus | None = None,
                 audit: AuditTrail | None = None):
        self.config = config
        self.events = events if events is not None else EventBus()
        # The attempts' records go to `audit` in the transaction that settles them.
        self.audit = audit
        self.database = database
        self.reactor = reactor
        self.rand = rand
        self.node = config.node_name
        self.destinations: dict[str, Destination] = {
            d.name: destination_for(d) for d in config.destinations}
        self.policies = {d.name: d.retry.policy() for d in config.destinations}
        self._transport_factory = transport_factory or self._https_transport
        self.transports: dict = {}
        self.in_flight: dict[str, int] = {name: 0 for name in self.destinations}
        self._sending: set[defer.Deferred] = set()
        self._settlements: list[outbox.Settlement] = []
        self._records: list[AuditEvent] = []  # the audit records of those settlements
        # delivery.dead of those settlements that would make a dead letter: told (and recorded)
        # once the settlement has moved the delivery, which a node whose lease was taken over
        # (too slow) does not.
        self._deaths: dict[int, Event] = {}
        self._flushing: defer.Deferred | None = None
        self._reflush = None  # the delayed call of a settlement tried again (database away)
        self._claiming = False
        self._again = False  # woken while a claim ran: look again when it ends
        self._timer = None
        self._stopping = False
        self.delivered = self.retried = self.dead = 0

    # -- life cycle -------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.transports = {name: self._transport_factory(d.config)
                           for name, d in self.destinations.items()}
        # Deliveries still leased to this node's name were claimed by an earlier process of it
        # (node names are one process each) that stopped without settling them: a crash. They
        # are taken back before the first claim, not left until their leases expire.
        self._claiming = True
        d = self.database.run_write(outbox.release_node, self.node)
        d.addCallbacks(self._taken_back, self._take_back_failed)

    def _taken_back(self, count: int) -> None:
        self._claiming = False
        if count:
            log.warning("delivery: %d deliveries leased by an earlier process of node %s (which "
                        "stopped without settling them) are due again", count, self.node)
        self.wake()

    def _take_back_failed(self, failure) -> None:
        self._claiming = False
        log.error("delivery: taking back this node's earlier leases failed: %s (they are due "
                  "again when they expire)", failure.getErrorMessage())
        self.wake()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._reflush is not None and self._reflush.active():
            self._reflush.cancel()
        while self._sending or self._claiming:
            yield defer.DeferredList(list(self._sending)) if self._sending else _later(self.reactor, 0.01)
        yield self._flush()
        for transport in self.transports.values():
            yield transport.close()

    def _https_transport(self, destination):
        from gateway.delivery.transport import HttpsTransport

        return HttpsTransport(self.reactor, ca_path=self.config.pki.ca,
                              cert_path=self.config.pki.cert, key_path=self.config.pki.key,
                              connect_timeout=destination.connect_timeout,
                              response_timeout=destination.response_timeout,
                              max_connections_per_host=destination.concurrency)

    # -- looking at the outbox --------------------------------------------------------------

    def wake(self) -> None:
        """Look at the outbox now (any thread may ask through reactor.callFromThread)."""
        if self._stopping or not self.running:
            return
        if self._claiming:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._claim()

    def _claim(self) -> None:
        if self._claiming:  # a claim runs (perhaps with a settlement): look again after it
            self._again = True
            return
        plan = self._claim_plan()
        if not plan:
            return  # every destination is busy: a settled attempt wakes us
        self._claiming = True
        d = self.database.run_write(_claim_all, self.node, plan, _now(), self.config.delivery.lease)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claim_plan(self) -> dict[str, _ClaimPlan]:
        """What to claim per destination: requests it has room for (at most `claim_batch`
        deliveries' worth), each of up to its adapter's batch size."""
        plan = {}
        for name, destination in self.destinations.items():
            room = destination.config.concurrency - self.in_flight[name]
            if room > 0:
                requests = min(room, max(1, self.config.delivery.claim_batch // destination.batch_size))
                fill = destination.batch_size if self.in_flight[name] else 1
                plan[name] = _ClaimPlan(requests, destination.batch_size, destination.batch_bytes, fill)
        return plan

    def _claimed(self, batches: list[outbox.Batch]) -> None:
        self._claiming = False
        if self._stopping:
            self.database.run_write(outbox.release, self.node, [i for b in batches for i in b.ids])
            return
        for batch in batches:
            self._send(batch)
        if self._again or batches:
            self._again = False
            self._claim()  # more may be due (a full batch, or woken meanwhile)
        else:
            self._sleep()

    def _claim_failed(self, failure) -> None:
        self._claiming = False
        log.log(self.database.availability.level(failure), "delivery: claiming from the outbox failed: %s", failure.getErrorMessage())
        self._sleep()

    def _sleep(self) -> None:
        if not self._stopping:
            self._timer = self.reactor.callLater(self.config.delivery.poll_interval, self.wake)

    # -- one attempt ------------------------------------------------------------------------

    def _send(self, batch: outbox.Batch) -> None:
        expired = [c for c in batch.claims if c.bundle is None]
        if expired and len(expired) < len(batch.claims):
            # Retention took these bundles: they can never go (dead letters on their own), but
            # the other deliveries of the request, other patients' among them, still can.
            self._send(outbox.Batch(tuple(expired)))
            batch = outbox.Batch(tuple(c for c in batch.claims if c.bundle is not None))
        name = batch.claims[0].destination
        destination = self.destinations[name]
        started = time.monotonic()
        attempted_at = _now()
        self.in_flight[name] += 1
        try:
            if any(c.bundle is None for c in batch.claims):
                raise LookupError("the canonical bundle expired (retention) before it was delivered")
            request = destination.build([c.bundle for c in batch.claims], batch.idempotency_key)
        except Exception as error:  # bundles this destination cannot take: never will
            log.warning("deliveries %s to %s: no request could be built: %s", _ids(batch), name,
                        type(error).__name__)
            d = defer.succeed(DeliveryOutcome.permanent(f"cannot build the request: {error}"))
        else:
            if request is None:
                d = defer.succeed(DeliveryOutcome.delivered("nothing for this destination"))
            else:
                d = self.transports[name].request(request)
                d.addCallbacks(destination.classify, _transport_failure, callbackArgs=(request,))
        d.addErrback(lambda f: DeliveryOutcome.transient(f"internal error: {f.getErrorMessage()}"))
        d.addCallback(self._attempted, batch, attempted_at, started)
        self._sending.add(d)
        d.addBoth(self._sent, d, name)

    def _sent(self, result, d, destination: str):
        self._sending.discard(d)
        self.in_flight[destination] -= 1
        if not self._stopping:
            self._flush()
        return result

    def _attempted(self, outcome: DeliveryOutcome, batch: outbox.Batch, attempted_at: datetime,
                   started: float) -> None:
        """Settle every delivery of the request with its outcome. After a transient failure
        each is retried on its own schedule (its own attempts and age: one that has reached
        its limit becomes a dead letter, the others wait); one draw of jitter for the request
        keeps those with the same history together, so they travel together again."""
        response = outcome.response
        name = batch.claims[0].destination
        duration_ms = int((time.monotonic() - started) * 1000)
        draw = self.rand()
        pause = (retry_after(response.headers.get("retry-after"), attempted_at.timestamp())
                 if response is not None and outcome.kind == "transient" else None)
        retried = dead = 0
        seconds = duration_ms / 1000
        for claim in batch.claims:
            next_at = None
            if outcome.kind == "transient":
                first = (claim.first_attempt_at or attempted_at).timestamp()
                at = self.policies[name].next_attempt(attempted_at.timestamp(), claim.attempts + 1,
                                                      first, lambda: draw, pause)
                if at is not None:
                    next_at = datetime.fromtimestamp(at, timezone.utc)
            if outcome.kind == "delivered":
                self.delivered += 1
            elif next_at is not None:
                self.retried += 1
                retried += 1
            else:
                dead += 1
            self._tell(claim, outcome, seconds, response.code if response else None, next_at is None)
            self._settlements.append(outbox.Settlement(
                claim.id, outcome.kind, outcome.reason[:1000], attempted_at, duration_ms,
                response.code if response else None, response.body if response else None, next_at,
                claim.idempotency_key))
        attempts = batch.claims[0].attempts + 1
        if retried:
            log.info("deliveries %s to %s: attempt %d failed (%s); %d to retry", _ids(batch), name,
                     attempts, reason_head(outcome.reason), retried)
        if dead:
            log.warning("deliveries %s to %s: %d dead letters after attempt %d: %s", _ids(batch), name,
                        dead, attempts, reason_head(outcome.reason))
        if retried or dead:
            log.debug("deliveries %s to %s: the peer's reason: %s", _ids(batch), name, outcome.reason)

    def _tell(self, claim: outbox.Claim, outcome: DeliveryOutcome, seconds: float,
              code: int | None, final: bool) -> None:
        """delivery.attempted for one delivery of the request; delivery.dead, when the attempt
        makes it a dead letter (a permanent refusal, or its retries are used up), is kept for
        its settlement (`_deaths`)."""
        subject = f"delivery/{claim.id}"
        detail = {"message_id": claim.message_id, "attempt": claim.attempts + 1, "code": code}
        recorded = self.audit is not None
        attempted = Event("delivery.attempted", SYSTEM, subject=subject, outcome=_OUTCOMES[outcome.kind],
                          destination=claim.destination, duration=seconds, detail=detail,
                          recorded=recorded)
        self.events.emit(attempted)
        if recorded:
            self._records.append(audit_event(attempted, datetime.now(timezone.utc)))
        if outcome.kind != "delivered" and final:
            self._deaths[claim.id] = Event("delivery.dead", SYSTEM, subject=subject, outcome="failure",
                                           destination=claim.destination, recorded=recorded,
                                           detail={**detail, "reason": reason_head(outcome.reason)},
                                           at=datetime.now(timezone.utc))

    def _told_dead(self, deaths: list[Event]) -> None:
        """The dead letters a settlement made (recorded in its transaction), told."""
        for event in deaths:
            self.dead += 1
            self.events.emit(event)

    def _flush(self) -> defer.Deferred:
        """Settle what is waiting, one batch at a time, and in the same transaction claim what
        is now due (a patient's next deliveries are, once these are settled): one trip to the
        database between two requests of a patient instead of two."""
        if self._flushing is not None:
            return self._flushing
        if not self._settlements and not self._records:
            return defer.succeed(None)
        batch, self._settlements = self._settlements, []
        records, self._records = self._records, []
        deaths, self._deaths = self._deaths, {}
        plan = {} if (self._stopping or self._claiming or not self.running) else self._claim_plan()
        if plan:
            self._claiming = True
        d = threads.deferToThreadPool(self.reactor, self.database.pool, _settle_isolated,
                                      self.database, self.node, batch, plan, _now(),
                                      self.config.delivery.lease, self.audit, records, deaths)

        def settled(result):
            batches, dead = result
            self._flushing = None
            self._told_dead(dead)
            if plan:
                self._claimed(batches)
            if self._settlements:
                return self._flush()
            if not plan:
                self.wake()  # a later delivery of the same patient may now be due

        def failed(failure):
            self._flushing = None
            # Kept and tried again (before the leases expire, or the deliveries would be sent
            # again): the attempts were made. What a partial run settled is not settled twice.
            partly = failure.value if failure.check(_PartlySettled) else None
            left = partly.left if partly else batch
            error = partly.error if partly else failure.value
            self._settlements[:0] = left
            self._records[:0] = records if partly is None or partly.records is None else partly.records
            if partly is not None:
                self._told_dead(partly.dead)
            self._deaths.update((s.delivery_id, deaths[s.delivery_id]) for s in left if s.delivery_id in deaths)
            log.log(self.database.availability.level(error), "delivery: recording %d attempts failed (tried again in %g s): %s",
                    len(left), self.config.delivery.poll_interval, _error_text(error))
            if plan:
                self._claiming = False
                self._sleep()
            if not self._stopping and (self._reflush is None or not self._reflush.active()):
                self._reflush = self.reactor.callLater(self.config.delivery.poll_interval, self._flush)

        d.addCallbacks(settled, failed)
        self._flushing = d
        return d


@dataclass(frozen=True)
class _ClaimPlan:
    requests: int
    batch_size: int
    batch_bytes: int | None
    min_size: int = 1  # smaller batches are left for later (requests are in flight)


def _claim_all(connection, node: str, plans: dict[str, _ClaimPlan], now: datetime,
               lease: float) -> list[outbox.Batch]:
    # Leases are taken and compared on one clock, the database's, where nodes share it: a
    # node whose clock ran ahead would take deliveries whose lease another still holds.
    now = outbox.shared_clock(connection) or now
    batches = []
    for destination, plan in plans.items():
        batches.extend(outbox.claim_batches(connection, node, destination, now, lease,
                                            requests=plan.requests, batch_size=plan.batch_size,
                                            batch_bytes=plan.batch_bytes, min_size=plan.min_size))
    return batches


def _settle_and_claim(connection, node: str, settlements: list[outbox.Settlement],
                      plans: dict[str, _ClaimPlan], now: datetime, lease: float,
                      audit: AuditTrail | None = None, records: list[AuditEvent] = (),
                      deaths: dict[int, Event] | None = None) -> tuple[list[outbox.Batch], list[Event]]:
    """Settle, record, claim: (the batches claimed, the `deaths` the settlement made: those
    of deliveries this node still held)."""
    deaths = deaths or {}
    moved = outbox.settle(connection, node, settlements, confirm=deaths, now=now) if settlements else set()
    dead = [deaths[s.delivery_id] for s in settlements if s.delivery_id in moved]
    if audit is not None and (records or dead):
        # Committed with the attempts they record.
        audit.append_in(connection, [*records, *(audit_event(event, now) for event in dead)])
    return (_claim_all(connection, node, plans, now, lease) if plans else []), dead


class _PartlySettled(Exception):
    """Settling one by one stopped on a failure that is not a refused value (the database
    went away): `left` are the settlements not recorded yet, `records` the audit records
    (None: all of them), `dead` the dead letters made by those recorded."""

    def __init__(self, left: list[outbox.Settlement], error: BaseException,
                 records: list[AuditEvent] | None = None, dead: list[Event] = ()):
        super().__init__(len(left), error)
        self.left = left
        self.error = error
        self.records = records
        self.dead = list(dead)


def _refused(error: BaseException, engine) -> bool:
    """Whether the database refused a value of the statement (too long, a NUL, text it cannot
    encode, a row gone: a foreign key) rather than being unreachable or busy."""
    if isinstance(error, value_refused(engine)) or isinstance(error, IntegrityError):
        return True
    cause = getattr(error, "orig", None)
    return isinstance(cause, (UnicodeError, engine.dialect.loaded_dbapi.IntegrityError))


def _error_text(error: BaseException) -> str:
    """An error for a log line: its class and first line (SQLAlchemy's errors name the
    statement; its parameters are hidden by the engine)."""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _without_answer(settlement: outbox.Settlement, error: BaseException, head: bool) -> outbox.Settlement:
    """The attempt with nothing of the peer's answer but its status and, with `head`, the
    start of the reason ("HTTP 422", "CNSS Client fault E12")."""
    note = f"answer not stored: {type(error).__name__}"
    reason = f"{reason_head(settlement.reason)} ({note})" if head else note
    return dataclasses.replace(settlement, reason=reason, response=None)


def _settle_isolated(database: Database, node: str, settlements: list[outbox.Settlement],
                     plans: dict[str, _ClaimPlan], now: datetime, lease: float,
                     audit: AuditTrail | None, records: list[AuditEvent],
                     deaths: dict[int, Event]) -> tuple[list[outbox.Batch], list[Event]]:
    """`_settle_and_claim` in one transaction; when the database refuses a value of it, each
    attempt in a transaction of its own, a refused one again without the peer's answer (and
    given up, logged, if even that is refused: its lease expires and it is sent again).
    Raises _PartlySettled when the database fails otherwise half way."""
    engine = database.engine
    try:
        return database.run_write_now(_settle_and_claim, node, settlements, plans, now, lease,
                                      audit, records, deaths)
    except Exception as error:
        if not _refused(error, engine):
            raise  # the database is away: the whole batch is tried again
        log.error("delivery: settling %d attempts: the database refused a value (%s); settling "
                  "them one by one", len(settlements), type(error).__name__)
    dead: list[Event] = []
    for number, settlement in enumerate(settlements):
        tries = [settlement]
        while tries:
            tried = tries.pop(0)
            try:
                _, made = database.run_write_now(_settle_and_claim, node, [tried], {}, now, lease,
                                                 audit, (), deaths)
                dead += made
                break
            except Exception as error:
                if not _refused(error, engine):
                    raise _PartlySettled(settlements[number:], error, dead=dead) from error
                if tried is settlement:
                    log.error("delivery %d: the database refused its attempt (%s): recorded "
                              "without the peer's answer", settlement.delivery_id, type(error).__name__)
                    tries = [_without_answer(settlement, error, True),
                             _without_answer(settlement, error, False)]
                elif not tries:
                    log.error("delivery %d: its attempt could not be recorded (%s): if still "
                              "pending, it is sent again when its lease ends",
                              settlement.delivery_id, type(error).__name__)
    try:
        batches, _ = database.run_write_now(_settle_and_claim, node, [], plans, now, lease, audit, records)
        return batches, dead
    except Exception as error:
        if not _refused(error, engine) or audit is None:
            raise _PartlySettled([], error, dead=dead) from error
    # An audit record refused (no peer text reaches one, but it must not hold the claims).
    for number, record in enumerate(records):
        try:
            audit.append([record])
        except Exception as error:
            if not _refused(error, engine):
                raise _PartlySettled([], error, records[number:], dead) from error
            log.error("delivery: an audit record (%s, %s) refused by the database (%s): not kept",
                      record.action, record.subject, type(error).__name__)
    return (database.run_write_now(_claim_all, node, plans, now, lease) if plans else []), dead


_OUTCOMES = {"delivered": "success", "transient": "failure", "permanent": "refused"}


def reason_head(reason: str) -> str:
    """What a log line above debug (or an event) shows of an attempt's reason: the part before
    the peer's own words ("HTTP 422", "CNSS Client fault E12", "ConnectionRefusedError"), which
    may quote the patient's data back (an OperationOutcome's diagnostics, a fault string)."""
    return reason.split(": ", 1)[0][:120]


def _ids(batch: outbox.Batch) -> str:
    """Delivery ids for a log line: the first and the count beyond it."""
    ids = batch.ids
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]} (+{len(ids) - 1})"


def _transport_failure(failure) -> DeliveryOutcome:
    from gateway.delivery.transport import TransportError

    if failure.check(TransportError):
        if failure.value.kind == "request":  # refused before any I/O: a retry cannot help
            return DeliveryOutcome.permanent(failure.value.reason)
        return DeliveryOutcome.transient(failure.value.reason)
    return DeliveryOutcome.transient(f"{failure.type.__name__}: {failure.getErrorMessage()}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _later(reactor, seconds: float) -> defer.Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)

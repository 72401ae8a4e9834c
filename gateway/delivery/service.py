"""The delivery service: this node's outbox worker.

It claims due deliveries per destination (up to the destination's `concurrency` in flight),
builds each request with the destination's adapter, sends it over mutual TLS, classifies the
answer, and settles the attempts in batches: delivered, retried later with backoff, or dead.
It looks at the outbox when woken (a translation stored new deliveries, an attempt was
settled) and every `poll_interval` otherwise, so deliveries enqueued by other nodes, retries
that fall due and leases that expire are all picked up.

Stopping lets requests in flight finish (each is bounded by its response timeout), settles
them, and gives back what it had claimed but not sent.
"""
from __future__ import annotations

import json
import logging
import random
import time
from datetime import datetime, timezone
from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer

from gateway.config import GatewayConfig
from gateway.delivery.destinations import Destination, destination_for
from gateway.delivery.outcome import DeliveryOutcome
from gateway.store import outbox
from gateway.store.database import Database

log = logging.getLogger(__name__)


class DeliveryService(Service):
    name = "delivery"

    def __init__(self, config: GatewayConfig, database: Database, reactor,
                 rand: Callable[[], float] = random.random,
                 transport_factory: Callable | None = None):
        self.config = config
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
        self._flushing: defer.Deferred | None = None
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
        self.wake()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
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
        wanted = {name: destination.config.concurrency - self.in_flight[name]
                  for name, destination in self.destinations.items()}
        wanted = {name: n for name, n in wanted.items() if n > 0}
        if not wanted:
            return  # every destination is busy: a settled attempt wakes us
        self._claiming = True
        d = self.database.run_write(_claim_all, self.node, wanted, _now(),
                              self.config.delivery.lease, self.config.delivery.claim_batch)
        d.addCallbacks(self._claimed, self._claim_failed)

    def _claimed(self, claims: list[outbox.Claim]) -> None:
        self._claiming = False
        if self._stopping:
            self.database.run_write(outbox.release, self.node, [c.id for c in claims])
            return
        for claim in claims:
            self._send(claim)
        if self._again or claims:
            self._again = False
            self._claim()  # more may be due (a full batch, or woken meanwhile)
        else:
            self._sleep()

    def _claim_failed(self, failure) -> None:
        self._claiming = False
        log.error("delivery: claiming from the outbox failed: %s", failure.getErrorMessage())
        self._sleep()

    def _sleep(self) -> None:
        if not self._stopping:
            self._timer = self.reactor.callLater(self.config.delivery.poll_interval, self.wake)

    # -- one attempt ------------------------------------------------------------------------

    def _send(self, claim: outbox.Claim) -> None:
        destination = self.destinations[claim.destination]
        started = time.monotonic()
        attempted_at = _now()
        self.in_flight[claim.destination] += 1
        try:
            request = destination.build(json.loads(claim.bundle), claim.idempotency_key)
        except Exception as error:  # a bundle this destination cannot take: never will
            log.warning("delivery %d to %s: no request could be built: %s", claim.id,
                        claim.destination, type(error).__name__)
            d = defer.succeed(DeliveryOutcome.permanent(f"cannot build the request: {error}"))
        else:
            if request is None:
                d = defer.succeed(DeliveryOutcome.delivered("nothing for this destination"))
            else:
                d = self.transports[claim.destination].request(request)
                d.addCallbacks(destination.classify, _transport_failure)
        d.addErrback(lambda f: DeliveryOutcome.transient(f"internal error: {f.getErrorMessage()}"))
        d.addCallback(self._attempted, claim, attempted_at, started)
        self._sending.add(d)
        d.addBoth(self._sent, d, claim.destination)

    def _sent(self, result, d, destination: str):
        self._sending.discard(d)
        self.in_flight[destination] -= 1
        return result

    def _attempted(self, outcome: DeliveryOutcome, claim: outbox.Claim, attempted_at: datetime,
                   started: float) -> None:
        response = outcome.response
        next_at = None
        if outcome.kind == "transient":
            first = (claim.first_attempt_at or attempted_at).timestamp()
            at = self.policies[claim.destination].next_attempt(
                attempted_at.timestamp(), claim.attempts + 1, first, self.rand)
            if at is not None:
                next_at = datetime.fromtimestamp(at, timezone.utc)
        if outcome.kind == "delivered":
            self.delivered += 1
        elif next_at is not None:
            self.retried += 1
            log.info("delivery %d to %s: attempt %d failed (%s); next at %s", claim.id,
                     claim.destination, claim.attempts + 1, outcome.reason, next_at.isoformat())
        else:
            self.dead += 1
            log.warning("delivery %d to %s: dead letter after %d attempts: %s", claim.id,
                        claim.destination, claim.attempts + 1, outcome.reason)
        self._settlements.append(outbox.Settlement(
            claim.id, outcome.kind, outcome.reason[:1000], attempted_at,
            int((time.monotonic() - started) * 1000), response.code if response else None,
            response.body if response else None, next_at))
        if not self._stopping:
            self._flush()

    def _flush(self) -> defer.Deferred:
        """Settle what is waiting, one batch at a time; then look at the outbox again."""
        if self._flushing is not None:
            return self._flushing
        if not self._settlements:
            return defer.succeed(None)
        batch, self._settlements = self._settlements, []
        d = self.database.run_write(outbox.settle, self.node, batch)

        def settled(_):
            self._flushing = None
            if self._settlements:
                return self._flush()
            self.wake()  # a later delivery of the same patient may now be due

        def failed(failure):
            self._flushing = None
            # The leases expire and another attempt follows: nothing is lost, only repeated.
            log.error("delivery: recording %d attempts failed: %s", len(batch), failure.getErrorMessage())

        d.addCallbacks(settled, failed)
        self._flushing = d
        return d


def _claim_all(connection, node: str, wanted: dict[str, int], now: datetime, lease: float,
               batch: int) -> list[outbox.Claim]:
    claims = []
    for destination, count in wanted.items():
        claims.extend(outbox.claim(connection, node, destination, now, lease, min(count, batch)))
    return claims


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

"""Prometheus metrics of one gateway, counted from its events (gateway.events) and, for the
outbox, read from the deliveries table when scraped.

`GatewayMetrics.observe` is the EventBus listener: a dictionary lookup and a labelled counter
increment per event (about a microsecond or two). Every label is bounded: listeners and
destinations come from the configuration, a facility is a registry id or "unknown", a message
type that does not look like one is "other", a reason that is not a short code is "other".

The outbox gauges are read in a database thread at scrape time, at most every few seconds,
and the scrape waits for them at most two seconds (then answers with what it last read): the
reactor never waits on the database. Each gateway has its own CollectorRegistry, so tests can
run several gateways in one process.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway.events import Event

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
OTHER = "other"
_TYPE = re.compile(r"^[A-Z0-9]{2,3}(\^[A-Z0-9]{2,3})?$|^ASTM$|^CSV[A-Za-z0-9_^.-]{0,29}$")
_CODE = re.compile(r"^[A-Za-z0-9_.:-]{1,40}$")
# Seconds: an ACK is usually a few milliseconds after the commit; translation-time ACKs and
# a loaded database stretch it to seconds.
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OUTBOX_MAX_AGE = 5.0  # seconds a scrape reuses the outbox figures it read
OUTBOX_WAIT = 2.0  # seconds a scrape waits for fresh outbox figures


class _Bounded:
    """A label value checked (a regular expression) and, when it passes, remembered; at most
    `size` distinct values become labels, any other is "other": the pattern alone admits billions
    (ADT^A01 to ZZZ^ZZZ), and each label is a series of several metrics, which a sender
    inventing message types would grow without end (and every scrape renders on the reactor
    thread). A flood of junk costs a regex each, not memory."""

    def __init__(self, pattern: re.Pattern, size: int = 512):
        self._pattern = pattern
        self._labels: set[str] = set()
        self._size = size

    def __call__(self, value: object) -> str:
        if value is None:
            return OTHER
        value = str(value)
        if value in self._labels:
            return value
        if len(self._labels) >= self._size or not self._pattern.fullmatch(value):  # not match: $ passes a final \n
            return OTHER
        self._labels.add(value)
        return value


class _Children:
    """A metric's labelled children, remembered by label values: `labels()` validates and
    locks on every call, a dictionary lookup is a tenth of that (the label values are bounded
    before they get here)."""

    __slots__ = ("metric", "cache")

    def __init__(self, metric):
        self.metric = metric
        self.cache: dict[tuple, object] = {}

    def __call__(self, *labels: str):
        child = self.cache.get(labels)
        if child is None:
            child = self.cache[labels] = self.metric.labels(*labels)
        return child


class GatewayMetrics:
    """The gateway's counters and histogram, fed by `observe` (an EventBus listener)."""

    def __init__(self, node: str = "gateway-1", *, known_facility: Callable[[str], bool] | None = None,
                 outbox: "OutboxGauges | None" = None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._known_facility = known_facility or (lambda facility: True)
        self._type = _Bounded(_TYPE)
        self._code = _Bounded(_CODE)
        r = self.registry
        self.received = Counter("gateway_messages_received", "Messages stored on receipt",
                                ["listener", "facility", "type"], registry=r)
        self.acknowledged = Counter("gateway_messages_acknowledged", "ACKs sent, by code",
                                    ["listener", "facility", "type", "code"], registry=r)
        self.refused = Counter("gateway_messages_refused",
                               "Messages refused (AR/CR, or a refused request)",
                               ["listener", "facility", "type", "reason"], registry=r)
        self.ack_latency = Histogram("gateway_ack_latency_seconds",
                                     "Seconds from a message's receipt to its ACK written",
                                     ["listener"], buckets=ACK_BUCKETS, registry=r)
        self.translated = Counter("gateway_messages_translated", "Messages translated to FHIR",
                                  ["facility", "type"], registry=r)
        self.translation_failures = Counter("gateway_translation_failures",
                                            "Messages whose translation failed",
                                            ["facility", "type"], registry=r)
        self.delivery_attempts = Counter("gateway_delivery_attempts",
                                         "Sends to a destination, by outcome "
                                         "(success, failure: retried, refused: permanent)",
                                         ["destination", "outcome"], registry=r)
        self.delivery_failures = Counter("gateway_delivery_failures",
                                         "Failed sends (transient: retried; permanent: refused)",
                                         ["destination", "kind"], registry=r)
        self.dead_letters = Counter("gateway_dead_letters", "Deliveries given up (dead letters)",
                                    ["destination"], registry=r)
        self.replays = Counter("gateway_delivery_replays", "Deliveries sent again by an operator",
                               ["destination"], registry=r)
        self.tls_failures = Counter("gateway_tls_handshake_failures",
                                    "TLS handshakes that did not complete",
                                    ["listener", "reason"], registry=r)
        self.door_refusals = Counter("gateway_door_refusals",
                                     "Requests or connections refused at a door, by HTTP status",
                                     ["door", "status"], registry=r)
        self.reloads = Counter("gateway_reloads", "Reloads of the configuration and mappings",
                               ["what", "outcome"], registry=r)
        Info("gateway_build", "The gateway's version and node name", registry=r).info(
            {"version": _version(), "node": node})
        self._received, self._acknowledged, self._refused, self._latency, self._translated, \
            self._failed = (_Children(m) for m in (self.received, self.acknowledged, self.refused,
                                                   self.ack_latency, self.translated,
                                                   self.translation_failures))
        self.outbox = outbox
        if outbox is not None:
            r.register(outbox)
        self._handlers: dict[str, Callable[[Event], None]] = {
            "message.received": self._on_received,
            "message.acknowledged": self._on_acknowledged,
            "message.refused": self._on_refused,
            "message.translated": self._on_translated,
            "message.translation_failed": self._on_translation_failed,
            "delivery.attempted": self._attempted,
            "delivery.dead": self._dead,
            "delivery.replayed": self._replayed,
            "tls.handshake_failed": self._tls_failed,
            "door.refused": self._door_refused,
            "config.reloaded": self._reloaded,
            "mappings.reloaded": self._reloaded,
        }

    @classmethod
    def for_gateway(cls, gateway, config, reactor) -> "GatewayMetrics":
        """Metrics subscribed to `gateway.events`, with the outbox gauges of its database."""
        store = gateway.getServiceNamed("store")
        identity = gateway.getServiceNamed("identity")
        outbox = OutboxGauges(store.database, reactor, [d.name for d in config.destinations])
        metrics = cls(config.node_name, outbox=outbox,
                      known_facility=lambda facility: identity.registry.current.get(facility) is not None)
        gateway.events.subscribe(metrics.observe)
        return metrics

    def observe(self, event: Event) -> None:
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event)

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) for a scrape, in the format the Accept header asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # -- labels

    def _facility(self, event: Event) -> str:
        facility = event.facility
        if facility and self._known_facility(facility):
            return facility
        return UNKNOWN

    def _listener(self, event: Event) -> str:
        return event.listener or UNKNOWN

    # -- handlers, one per kind

    def _on_received(self, event: Event) -> None:
        # A re-sent message counts again: its first copy may have been stored by a commit whose
        # answer the connection lost (told "not stored" then), and counted nowhere else.
        self._received(event.listener or UNKNOWN, self._facility(event),
                       self._type(event.message_type)).inc()

    def _on_acknowledged(self, event: Event) -> None:
        listener = event.listener or UNKNOWN
        self._acknowledged(listener, self._facility(event), self._type(event.message_type),
                           self._code(event.detail.get("ack_code"))).inc()
        if event.duration is not None:
            self._latency(listener).observe(event.duration)

    def _on_refused(self, event: Event) -> None:
        self._refused(event.listener or UNKNOWN, self._facility(event), self._type(event.message_type),
                      self._code(event.detail.get("reason"))).inc()

    def _on_translated(self, event: Event) -> None:
        self._translated(self._facility(event), self._type(event.message_type)).inc()

    def _on_translation_failed(self, event: Event) -> None:
        self._failed(self._facility(event), self._type(event.message_type)).inc()

    def _attempted(self, event: Event) -> None:
        destination = event.destination or UNKNOWN
        self.delivery_attempts.labels(destination, self._code(event.outcome)).inc()
        if event.outcome == "failure":
            self.delivery_failures.labels(destination, "transient").inc()
        elif event.outcome == "refused":
            self.delivery_failures.labels(destination, "permanent").inc()

    def _dead(self, event: Event) -> None:
        self.dead_letters.labels(event.destination or UNKNOWN).inc()

    def _replayed(self, event: Event) -> None:
        self.replays.labels(event.destination or UNKNOWN).inc()

    def _tls_failed(self, event: Event) -> None:
        self.tls_failures.labels(self._listener(event), self._code(event.detail.get("reason"))).inc()

    def _door_refused(self, event: Event) -> None:
        door = event.detail.get("door") or event.listener  # rest, soap, mllp
        self.door_refusals.labels(self._code(door), self._code(event.detail.get("status"))).inc()

    def _reloaded(self, event: Event) -> None:
        self.reloads.labels(event.kind.split(".")[0], self._code(event.outcome)).inc()


class OutboxGauges:
    """gateway_outbox_depth and gateway_outbox_oldest_age_seconds per destination, from the
    pending deliveries: a prometheus collector that reports the figures `refresh` last read
    (the age is counted to the moment of the scrape)."""

    def __init__(self, database, reactor, destinations: Iterable[str] = (),
                 max_age: float = OUTBOX_MAX_AGE, clock: Callable[[], float] = time.monotonic):
        self._database = database
        self._reactor = reactor
        self._destinations = tuple(destinations)
        self._max_age = max_age
        self._clock = clock
        self._read_at: float | None = None
        self._pending: dict[str, tuple[int, datetime | None]] = {}
        self._reading: defer.Deferred | None = None

    def stale(self) -> bool:
        return self._read_at is None or self._clock() - self._read_at > self._max_age

    def refresh(self) -> defer.Deferred:
        """Read the figures again in a database thread (one read at a time; a Deferred firing
        when it is done, never failing: a failed read keeps the figures before it)."""
        if self._reading is None:
            self._reading = self._database.run(_pending_by_destination).addCallbacks(
                self._use, self._failed)
        waiter = defer.Deferred()
        self._reading.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    def _use(self, rows) -> None:
        self._pending = {destination: (count, oldest) for destination, count, oldest in rows}
        self._read_at = self._clock()
        self._reading = None

    def _failed(self, failure) -> None:
        log.log(self._database.availability.level(failure, logging.WARNING), "outbox figures not read: %s",
                failure.getErrorMessage())
        self._reading = None

    def describe(self):
        return []  # the families are built at collection

    def collect(self):
        depth = GaugeMetricFamily("gateway_outbox_depth", "Deliveries pending per destination",
                                  labels=["destination"])
        age = GaugeMetricFamily("gateway_outbox_oldest_age_seconds",
                                "Age of the oldest pending delivery per destination",
                                labels=["destination"])
        now = datetime.now(timezone.utc)
        for destination in sorted(set(self._destinations) | set(self._pending)):
            count, oldest = self._pending.get(destination, (0, None))
            depth.add_metric([destination], count)
            age.add_metric([destination], max(0.0, (now - _aware(oldest)).total_seconds())
                           if oldest is not None else 0.0)
        yield depth
        yield age


def _pending_by_destination(conn) -> list[tuple[str, int, datetime | None]]:
    from sqlalchemy import func, select

    from gateway.store.schema import deliveries

    rows = conn.execute(select(deliveries.c.destination, func.count(), func.min(deliveries.c.created_at))
                        .where(deliveries.c.status == "pending")
                        .group_by(deliveries.c.destination))
    return [(destination, int(count), oldest) for destination, count, oldest in rows]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _version() -> str:
    try:
        return metadata.version("ma-hie-gateway")
    except metadata.PackageNotFoundError:
        return "unknown"


class MetricsResource(Resource):
    """GET /metrics: the Prometheus text format (or OpenMetrics, when asked)."""

    isLeaf = True

    def __init__(self, metrics: GatewayMetrics, reactor=None, wait: float = OUTBOX_WAIT):
        super().__init__()
        self.metrics = metrics
        self._reactor = reactor
        self._wait = wait

    def render_GET(self, request):
        outbox = self.metrics.outbox
        if outbox is None or not outbox.stale():
            return self._body(request)
        from twisted.internet import reactor as default_reactor

        reactor = self._reactor or default_reactor
        done = defer.Deferred()
        timer = reactor.callLater(self._wait, lambda: done.called or done.callback(None))
        outbox.refresh().addBoth(lambda _: done.called or done.callback(None))
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)  # the scraper went away

        def answer(_):
            if timer.active():
                timer.cancel()
            if not finished.called:
                request.write(self._body(request))
                request.finish()

        done.addCallback(answer)
        return NOT_DONE_YET

    def _body(self, request) -> bytes:
        body, content_type = self.metrics.exposition(_header(request, b"accept"))
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


def _header(request, name: bytes) -> str | None:
    value = request.getHeader(name)
    if value is None:
        return None
    return value.decode("latin-1") if isinstance(value, bytes) else value

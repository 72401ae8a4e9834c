"""The gateway's service tree, built in one function and started in order: the database
(schema migrated), the ingest writer, the identity service (facility registry and CRL, shared
by every door), the translation service with the prescription step (mapping set loaded,
worker started, untranslated messages swept), the delivery service (when routes are
configured), then the listeners (MLLP, ASTM, HTTPS), so that nothing is accepted before it can
be stored and translated. Stopping runs in reverse: listeners close (an MLLP listener once
the frames in hand are committed and answered, see MllpListenerService), deliveries in flight
finish and are recorded, the translation worker stores what it holds, the writer commits what
it holds, the database closes last.
"""
from __future__ import annotations

import functools
import logging
from datetime import datetime, timezone

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint

from adapters.hl7v2.ack import AckBuilder, Sender
from adapters.mllp.protocol import MllpServerFactory, MllpSettings, PeerRefused
from gateway.audit.trail import AuditTrail
from gateway.certificates import CertificateSightings
from gateway.config import GatewayConfig, MllpListenerConfig
from gateway.delivery.service import DeliveryService
from gateway.events import SYSTEM, Event, EventBus
from gateway.doors.https import https_door_services
from gateway.facilities import SourceNetworks
from gateway.identity import IdentityService
from gateway.ingest.astm import astm_listener_factory
from gateway.ingest.inspect import IngestPolicy, Inspector, refuse_reused
from gateway.ingest.pipeline import IngestPipeline
from gateway.prescriptions.api import prescription_routes
from gateway.prescriptions.service import PrescriptionService
from gateway.retention.service import RetentionService
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.store.ingest_writer import IngestWriter
from gateway.tls import peer_certificate, server_tls_options
from gateway.tls_watch import watch_handshakes
from gateway.translation.service import TranslationService


log = logging.getLogger(__name__)


class StoreService(Service):
    """The database pool and the ingest writer; ready (schema migrated) before listeners start."""

    name = "store"

    def __init__(self, config: GatewayConfig, reactor):
        self.engine = create_gateway_engine(config.database.url, config.database.pool_size)
        self.database = Database(self.engine, reactor, config.database.pool_size)
        self.builder = AckBuilder(Sender(config.identity.application.encode("ascii"),
                                         config.identity.facility.encode("ascii")))
        # Each message's receipt goes to the audit trail in the transaction that stores it.
        self.writer = IngestWriter(self.engine, reactor.callFromThread,
                                   functools.partial(refuse_reused, self.builder),
                                   config.database.ingest_max_batch,
                                   audit=AuditTrail(self.engine, config.node_name))

    def startService(self) -> None:
        # Before the reactor accepts anything: the schema must exist to store the first message.
        migrate(self.engine)
        self.database.start()
        self.writer.start()
        super().startService()

    def stopService(self):
        super().stopService()
        self.writer.stop()
        self.database.stop()


class OrderedServices(MultiService):
    """Starts children in order and stops them in reverse, each once the one after it has
    finished stopping (MultiService stops them all at once): deliveries in flight must be
    recorded before the database closes."""

    @defer.inlineCallbacks
    def stopService(self):
        Service.stopService(self)
        failure = None
        for service in reversed(list(self)):
            try:
                yield defer.maybeDeferred(service.stopService)
            except Exception as error:  # stop the others all the same: their threads must end
                log.error("stopping %s failed: %s", service.name or type(service).__name__, error)
                failure = failure or error
        if failure is not None:
            raise failure


def build_service(config: GatewayConfig, reactor) -> MultiService:
    """The whole tree; raises IdentityError or TlsConfigError when the registry, the CRL or a
    certificate cannot serve the listeners."""
    root = OrderedServices()
    # One bus for the whole tree: the metrics and the audit trail subscribe to root.events.
    root.events = events = EventBus()
    store = StoreService(config, reactor)
    store.setServiceParent(root)
    _audit(root, config, store, events)
    # The months ahead exist before any listener opens; expiry runs daily at retention.run_at.
    RetentionService(config, store.database, reactor).setServiceParent(root)
    identity = IdentityService(config, reactor)
    identity.certificates = CertificateSightings(store.database)  # what the doors identify by
    identity.setServiceParent(root)
    translation = delivery = prescriptions = None
    if config.mappings is not None and config.routes:
        delivery = DeliveryService(config, store.database, reactor, events=events,
                                   audit=store.writer.audit)
    if config.mappings is not None:
        # Prescriptions are a step of the translation (same transaction), so they need it.
        prescriptions = PrescriptionService(config, store.database, store.builder, reactor,
                                            registry=identity.registry)
        translation = TranslationService(config, store.engine, reactor,
                                         on_enqueued=delivery.wake if delivery else None,
                                         step=prescriptions.flow, events=events,
                                         audit=store.writer.audit)
        translation.setServiceParent(root)
        prescriptions.setServiceParent(root)  # stopped before the translation worker is joined
    if delivery is not None:
        delivery.setServiceParent(root)
    for listener in config.mllp:
        factory = _mllp_factory(listener, store, identity, translation, reactor, events)
        if listener.tls:
            watch_handshakes(factory, listener.name, events)
        service = MllpListenerService(_endpoint(config, listener, identity, reactor), factory, reactor)
        _listen(root, listener.name, service)
    for listener in config.astm:
        factory = astm_listener_factory(listener, store.writer, reactor, translation=translation,
                                        allowed=source_filter(listener.allow_sources, events,
                                                              listener.name, "astm"),
                                        events=events)
        _listen(root, listener.name, StreamServerEndpointService(
            TCP4ServerEndpoint(reactor, listener.port, interface=listener.interface), factory))
    routes = prescription_routes(prescriptions, events) if prescriptions is not None else []
    for door in https_door_services(config, store, translation, identity, reactor, extra_routes=routes,
                                    events=events):
        door.setServiceParent(root)
    if config.admin:
        # The console, with /metrics and /health/ mounted beside it (no login: no patient data).
        from gateway.admin import admin_services
        from gateway.observability import observability_resources

        extra = observability_resources(root, config, reactor)
        for admin in admin_services(config, store, identity, translation, delivery, reactor,
                                    events=events, extra=extra):
            admin.setServiceParent(root)
    return root


def _audit(root: MultiService, config: GatewayConfig, store: StoreService, events) -> None:
    """The audit recorder (and the ATNA export when configured), right after the store: they
    stop just before the database closes, once everything else has told what it did."""
    from gateway.audit.recorder import AuditRecorder

    trail = store.writer.audit
    AuditRecorder(trail, events, store.database, config.audit.flush_interval).setServiceParent(root)
    if config.audit.export is not None:
        from gateway.audit.export import AuditExportService

        AuditExportService(config, trail, store.database).setServiceParent(root)


def reload_service(root: MultiService) -> defer.Deferred:
    """What SIGHUP reloads: the facility registry and CRL, and the mapping set when the
    gateway translates. Fires when both are done (each logs its own outcome; each is told to
    root.events: config.reloaded, mappings.reloaded, outcome success or refused)."""
    events = getattr(root, "events", None) or EventBus()

    def told(replaced: bool, kind: str, detail) -> bool:
        events.emit(Event(kind, SYSTEM, subject="config" if kind == "config.reloaded" else "mappings",
                          outcome="success" if replaced else "refused", detail=detail()))
        return replaced

    identity = root.getServiceNamed("identity")
    reloads = [identity.reload().addCallback(told, "config.reloaded", lambda: {
        "facilities": len(identity.registry.current.facilities)})]
    try:
        translation = root.getServiceNamed("translation")
    except KeyError:
        pass
    else:
        reloads.append(translation.reload().addCallback(told, "mappings.reloaded", lambda: {
            "version": translation.mappings.version if translation.mappings else None}))
    return defer.gatherResults(reloads)


def _mllp_factory(listener: MllpListenerConfig, store: StoreService, identity: IdentityService,
                  translation, reactor, events: EventBus) -> MllpServerFactory:
    inspector = Inspector(store.builder, IngestPolicy(
        listener.name, frozenset(p.encode("ascii") for p in listener.processing_ids),
        listener.accept_unknown_senders, identity.registry))
    pipeline = IngestPipeline(inspector, store.writer, translation=translation,
                              ack_after_translation=listener.ack_after == "translation", events=events)
    return MllpServerFactory(pipeline, MllpSettings(
        listener.name, listener.max_frame_size, listener.idle_timeout, listener.frame_timeout,
        listener.commit_blocks), reactor, source_filter(listener.allow_sources, events, listener.name),
        identify=functools.partial(_identify_or_keep, identity, store.database, listener.name, events)
        if listener.tls else None)


def _identify_or_keep(identity: IdentityService, database: Database, listener: str, events: EventBus,
                      transport) -> str:
    """The facility of a TLS client (IdentityService.identify), its certificate noted as seen;
    a certificate that names none is refused, and the refusal kept with the HTTPS door's (door
    'mllp', status 401: what the door would have answered) and told to `events` before the
    connection closes."""
    try:
        facility_id = identity.identify(transport)
    except PeerRefused as refused:
        from gateway.doors.store import Refusal, record_refusal

        peer, cert = transport.getPeer(), peer_certificate(transport)
        refusal = Refusal(datetime.now(timezone.utc), listener,
                          f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}", None,
                          cert.subject.rfc4514_string() if cert is not None else None,
                          "mllp", None, 401, str(refused))
        database.run_write(record_refusal, refusal).addErrback(
            lambda failure: log.error("refusal not stored: %s", failure.value))
        events.emit(Event("door.refused", "unknown", outcome="refused", source=refusal.peer,
                          listener=listener, detail={"door": "mllp", "status": 401,
                                                     "certificate": refusal.certificate}))
        raise
    sightings = getattr(identity, "certificates", None)
    if sightings is not None:
        sightings.seen(facility_id, peer_certificate(transport), listener)
    return facility_id


# Seconds a stopping MLLP listener waits for the frames in hand to be committed and answered.
DRAIN_TIMEOUT = 30.0
_DRAIN_POLL = 0.02


class MllpListenerService(StreamServerEndpointService):
    """An MLLP listener that, on stop, closes its port, then has its pipeline answer every
    frame received from then on "not stored, send again", and waits (at most DRAIN_TIMEOUT)
    until the frames in hand are committed and answered, and for a reactor turn that writes
    those answers out: the reactor drops the connections once the services have stopped, and
    a committed message must not lose its answer there."""

    def __init__(self, endpoint, factory: MllpServerFactory, clock):
        super().__init__(endpoint, factory)
        self.clock = clock

    def privilegedStartService(self) -> None:
        self.factory.handler.refusing = False  # started again after a stop
        super().privilegedStartService()

    @defer.inlineCallbacks
    def stopService(self):
        yield super().stopService()
        pipeline = self.factory.handler
        pipeline.refusing = True
        deadline = self.clock.seconds() + DRAIN_TIMEOUT
        while pipeline.in_flight > 0 and self.clock.seconds() < deadline:
            yield task.deferLater(self.clock, _DRAIN_POLL, lambda: None)
        if pipeline.in_flight > 0:
            log.error("listener %s stopped with %d frames still unanswered", self.name,
                      pipeline.in_flight)
        yield task.deferLater(self.clock, 0, lambda: None)


def _listen(root: MultiService, name: str, service: StreamServerEndpointService) -> None:
    service.setName(name)
    service._raiseSynchronously = True  # a port in use fails `gateway run` at once
    service.setServiceParent(root)


def _endpoint(config: GatewayConfig, listener: MllpListenerConfig, identity: IdentityService,
              reactor):
    if listener.tls:
        options = server_tls_options(config.pki.cert, config.pki.key, config.pki.ca,
                                     revocations=identity.revocations, name=f"mllp {listener.name}")
        return SSL4ServerEndpoint(reactor, listener.port, options, backlog=512, interface=listener.interface)
    return TCP4ServerEndpoint(reactor, listener.port, backlog=512, interface=listener.interface)


def source_filter(allow_sources: tuple[str, ...], events: EventBus | None = None,
                  listener: str | None = None, door: str = "mllp"):
    """A predicate on the peer address: inside one of the CIDR ranges (any, when none given).
    With `events`, each address refused is told (door.refused, status 403)."""
    if not allow_sources:
        return lambda address: True
    allows = SourceNetworks(allow_sources).allows
    if events is None:
        return allows

    def allowed(address: str) -> bool:
        if allows(address):
            return True
        events.emit(Event("door.refused", "unknown", outcome="refused", source=address,
                          listener=listener, detail={"door": door, "status": 403,
                                                     "reason": "source_not_allowed"}))
        return False

    return allowed

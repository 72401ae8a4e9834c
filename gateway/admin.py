"""The admin listener (listeners.admin, 8080 in development): the operators' console at /,
and the resources given as `extra` (the metrics at /metrics, health at /health/...), which
need no login since they hold no patient data.

Plain HTTP is for loopback in development; with `tls: true` the listener serves pki.cert and
pki.key and asks no client certificate (accounts log in; the session cookie is then Secure).
`allow_sources` limits which networks may connect at all.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.web import resource, server

from gateway.config import AdminListenerConfig, GatewayConfig
from gateway.console.web import ConsoleContext, site
from gateway.events import EventBus
from gateway.facilities import SourceNetworks
from gateway.tls import server_tls_options
from gateway.tls_watch import watch_handshakes


def admin_site(config: GatewayConfig, listener: AdminListenerConfig, database, reactor, *,
               events: EventBus | None = None, registry: Callable | None = None,
               mappings: Callable | None = None, reload_mappings: Callable | None = None,
               wake_delivery: Callable[[], None] | None = None,
               extra: Mapping[str, resource.Resource] | None = None,
               now: Callable[[], float] = time.time) -> server.Site:
    """The site of one admin listener: the console over `database` (a started
    gateway.store.database.Database), with `extra` resources mounted by path."""
    context = ConsoleContext(config, listener, database, reactor,
                             events if events is not None else EventBus(), registry, mappings,
                             reload_mappings, wake_delivery, now)
    built = site(context, dict(extra or {}))
    if listener.allow_sources:
        built.allowed = SourceNetworks(listener.allow_sources).allows
    return built


def admin_services(config: GatewayConfig, store, identity, translation, delivery, reactor, *,
                   events: EventBus | None = None,
                   extra: Mapping[str, resource.Resource] | None = None) -> list:
    """One listening service per `listeners.admin` entry, named after it; add them to the
    tree last, with the other listeners. `store` is the StoreService (its Database),
    `identity` the IdentityService (its registry), `translation` and `delivery` their
    services or None."""
    services = []
    for listener in config.admin:
        built = admin_site(
            config, listener, store.database, reactor, events=events,
            registry=lambda: identity.registry.current,
            mappings=(lambda: translation.mappings) if translation is not None else None,
            reload_mappings=translation.reload if translation is not None else None,
            wake_delivery=delivery.wake if delivery is not None else None, extra=extra)
        if listener.tls:
            options = server_tls_options(config.pki.cert, config.pki.key, None,
                                         require_client_cert=False, name=f"admin {listener.name}")
            endpoint = SSL4ServerEndpoint(reactor, listener.port, options, interface=listener.interface)
            if events is not None:  # failed handshakes counted, as on the other doors
                watch_handshakes(built, listener.name, events)
        else:
            endpoint = TCP4ServerEndpoint(reactor, listener.port, interface=listener.interface)
        service = StreamServerEndpointService(endpoint, built)
        service.setName(listener.name)
        service._raiseSynchronously = True  # a port in use fails `gateway run` at once
        services.append(service)
    return services

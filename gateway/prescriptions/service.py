"""The e-prescription service: the signing key, the facility registry, the AMO eligibility
checker and the translation step, built once and stopped in order.

Wiring (gateway/service.py):

    prescriptions = PrescriptionService(config, store.database, store.builder, reactor,
                                        registry=identity.registry)
    translation = TranslationService(config, store.engine, reactor, on_enqueued=...,
                                      step=prescriptions.flow)
    translation.setServiceParent(root)
    prescriptions.setServiceParent(root)   # after translation: stopped before it (see stopService)
    ... HTTPS door routes: prescription_routes(prescriptions)  (gateway.prescriptions.api)
"""
from __future__ import annotations

import logging
import os

from twisted.application.service import Service

from gateway.config import GatewayConfig
from gateway.facilities import FacilityRegistry, RegistryRef
from gateway.prescriptions import qr
from gateway.prescriptions.eligibility import EligibilityChecker
from gateway.prescriptions.flow import PrescriptionFlow

log = logging.getLogger(__name__)


def signing_key_for(config: GatewayConfig) -> qr.SigningKey:
    """The prescription signing key of `config`; created when missing if it lives in the
    development PKI folder (pki.dev_dir), else a ValueError saying where it is expected."""
    path = config.resolve(config.pki.prescription_key)
    dev_dir = config.resolve(config.pki.dev_dir)
    if not os.path.exists(path) and os.path.commonpath([path, dev_dir]) == dev_dir:
        if qr.ensure_signing_key(path):
            log.warning("created the development prescription signing key %s", path)
    return qr.load_signing_key(path)


class PrescriptionService(Service):
    name = "prescriptions"

    def __init__(self, config: GatewayConfig, database, builder, reactor,
                 registry: "FacilityRegistry | RegistryRef | None" = None, transport_factory=None):
        self.config = config
        self.database = database  # gateway.store.database.Database, for the REST routes
        self.reactor = reactor
        self.key = signing_key_for(config)
        self.registry = registry or FacilityRegistry.from_config(config)
        self.eligibility = self._eligibility(transport_factory)
        self.flow = PrescriptionFlow(config, self.key, self.registry, builder, self.eligibility)

    def _eligibility(self, transport_factory) -> EligibilityChecker | None:
        settings = self.config.prescriptions
        if settings.eligibility is None:
            return None
        destination = next(d for d in self.config.destinations if d.name == settings.eligibility)
        pki = self.config.pki

        def https():
            from gateway.delivery.transport import HttpsTransport

            return HttpsTransport(self.reactor, ca_path=pki.ca, cert_path=pki.cert, key_path=pki.key,
                                  connect_timeout=min(destination.connect_timeout, settings.eligibility_timeout),
                                  response_timeout=settings.eligibility_timeout)

        return EligibilityChecker(self.reactor, destination.url, transport_factory or https,
                                  settings.eligibility_timeout)

    def stopService(self):
        super().stopService()
        # Before the translation worker is joined: later eligibility questions are answered
        # 'unavailable' at once instead of waiting on a reactor busy joining the worker.
        if self.eligibility is not None:
            return self.eligibility.close()
        return None

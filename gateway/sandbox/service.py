"""The sandbox peers as one Twisted service, built from the `sandbox:` configuration section:
what `gateway sandbox` runs alone and `gateway run --sandbox` (hence `make run`) runs beside
the gateway. Each peer listens with its own dev certificate (`sandbox-record`,
`sandbox-cnss` in pki.dev_dir), trusts pki.ca, and serves only the gateway's certificate."""
from __future__ import annotations

import os

from twisted.application.service import Service
from twisted.internet import defer

from gateway.config import GatewayConfig
from gateway.tls import server_tls_options

# The client certificate subject CN the peers accept: the gateway's own (gateway pki init).
GATEWAY_CLIENT = "gateway"


class SandboxService(Service):
    name = "sandbox"

    def __init__(self, config: GatewayConfig, reactor):
        self.config = config
        self.reactor = reactor
        self.peers: dict[str, object] = {}
        self.ports: dict[str, object] = {}

    def _tls(self, party: str):
        directory = self.config.pki.dev_dir
        return server_tls_options(os.path.join(directory, f"{party}.crt"),
                                  os.path.join(directory, f"{party}.key"), self.config.pki.ca)

    def startService(self):
        """A Deferred (also kept as `ready`): it fails when a peer cannot listen. A parent
        MultiService drops it, so `gateway run --sandbox` watches `ready`."""
        self.ready = self._start()
        return self.ready

    @defer.inlineCallbacks
    def _start(self):
        from gateway.sandbox.cnss import CnssPeer, listen_cnss_peer
        from gateway.sandbox.record import RecordPeer, listen_record_peer

        super().startService()
        sandbox = self.config.sandbox
        allowed = frozenset({GATEWAY_CLIENT})
        if sandbox.record is not None:
            os.makedirs(os.path.dirname(sandbox.record.store), exist_ok=True)
            peer = RecordPeer(sandbox.record.store, reactor=self.reactor, allowed_clients=allowed,
                              validate=sandbox.record.validate)
            self.peers["record"] = peer
            self.ports["record"] = listen_record_peer(self.reactor, peer, sandbox.record.port,
                                                      sandbox.record.interface,
                                                      self._tls("sandbox-record"))
        if sandbox.cnss is not None:
            os.makedirs(os.path.dirname(sandbox.cnss.store), exist_ok=True)
            peer = CnssPeer(sandbox.cnss.store, reactor=self.reactor, allowed_clients=allowed)
            self.peers["cnss"] = peer
            self.ports["cnss"] = yield listen_cnss_peer(self.reactor, peer, sandbox.cnss.port,
                                                        sandbox.cnss.interface,
                                                        self._tls("sandbox-cnss"))

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        for port in self.ports.values():
            yield port.stopListening()
        record, cnss = self.peers.get("record"), self.peers.get("cnss")
        if record is not None:
            yield record.close()
        if cnss is not None:
            yield cnss.stop()
        self.ports.clear()
        self.peers.clear()

    def port(self, kind: str) -> int:
        return self.ports[kind].getHost().port

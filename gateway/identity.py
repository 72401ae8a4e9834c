"""Who is on the other end, for every door: the facility registry and the CRL in force, held
once per process, and reloaded together (SIGHUP, `gateway mappings reload`).

- `registry`: a `RegistryRef`; the inspectors (and the HTTPS door) read `registry.current`
  for each message, so a reload applies to the next message of every open connection;
- `revocations`: the `Revocations` every TLS listener checks in its handshakes;
- `identify(transport)`: the facility id a TLS connection's verified client certificate names,
  or `PeerRefused` (from our CA, but no facility of the registry is bound to it). The
  connection is remembered while it is open: when a reload puts its certificate in the CRL,
  or binds it to no facility or to another, the connection is closed (an HIS keeps its MLLP
  connection for days: a revoked certificate must not keep it).

A reload reads the configuration again with `load_config` (in a thread: files only) and takes
its registry; a configuration with any problem is refused whole, every problem logged, and the
old registry kept. The CRL file is read again too, on its own: a broken CRL keeps the old CRL
and does not hold back a good registry. Other changes to the configuration wait for a restart.
"""
from __future__ import annotations

import logging
import weakref

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from adapters.mllp.protocol import PeerRefused
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.facilities import FacilityRegistry, RegistryRef
from gateway.pki import certificate_fingerprint
from gateway.tls import Crl, Revocations, TlsConfigError, load_crl, peer_certificate

log = logging.getLogger(__name__)

ASTM = "ASTM"  # the message type of everything an ASTM listener receives


class IdentityError(Exception):
    """The registry cannot serve the configured listeners (every problem, one per line)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def registry_problems(config: GatewayConfig, registry: FacilityRegistry) -> list[str]:
    """What the running listeners need of a registry: each ASTM listener's laboratory is in it,
    and its type may send ASTM."""
    problems = []
    for listener in config.astm:
        facility = registry.get(listener.facility)
        if facility is None:
            problems.append(f"listeners.astm {listener.name}: facility {listener.facility!r} "
                            "is not in the facility registry")
        elif not registry.may_send(facility, ASTM):
            problems.append(f"listeners.astm {listener.name}: facility {facility.id} is of type "
                            f"{facility.type}, which may not send ASTM (facilities.yaml types:)")
    return problems


def read_crl(config: GatewayConfig) -> Crl | None:
    """pki.crl, checked against pki.ca (TlsConfigError); None when no CRL is configured."""
    if config.pki.crl is None:
        return None
    crl = load_crl(config.pki.crl, config.pki.ca)
    if crl.expired():
        log.warning("CRL %s is past its nextUpdate (%s): install the newer one and reload; "
                    "certificates it lists are still refused", crl.path, crl.next_update.isoformat())
    return crl


class IdentityService(Service):
    name = "identity"

    def __init__(self, config: GatewayConfig, reactor):
        """Raises IdentityError (the registry does not fit the listeners) or TlsConfigError
        (an unusable CRL): the gateway does not start."""
        self.config = config
        self.reactor = reactor
        registry = FacilityRegistry.from_config(config)
        problems = registry_problems(config, registry)
        if problems:
            raise IdentityError(problems)
        self.registry = RegistryRef(registry)
        self.revocations = Revocations(read_crl(config))
        # Open TLS connections (their transports) and the facility each was identified as.
        self._open: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def identify(self, transport) -> str:
        """The facility id the verified client certificate of a TLS `transport` names."""
        cert = peer_certificate(transport)
        if cert is None:
            raise PeerRefused("no client certificate")
        crl = self.revocations.crl
        if crl is not None and crl.revokes(cert):
            # Verified before a reload installed this CRL, the handshake ending after it (and
            # after the reload closed the revoked connections it knew of).
            raise PeerRefused(f"client certificate {cert.subject.rfc4514_string()!r} (sha256 "
                              f"{certificate_fingerprint(cert)}) is revoked by the CRL {crl.path}")
        facility = self.registry.current.by_certificate(cert)
        if facility is None:
            raise PeerRefused(f"client certificate {cert.subject.rfc4514_string()!r} (sha256 "
                              f"{certificate_fingerprint(cert)}) is from the configured CA but "
                              "names no facility of the registry (certificate_subject, "
                              "certificate_sha256, or a common name equal to a facility id)")
        self._open[transport] = facility.id
        return facility.id

    def watch(self, transport, facility_id: str) -> None:
        """Re-check `transport` at each reload as the MLLP connections `identify` saw: a door
        that identifies its callers itself (HTTPS) hands its kept-alive connections here."""
        self._open[transport] = facility_id

    def _recheck(self) -> None:
        """Close each open connection whose certificate the CRL in force revokes, or which the
        registry now binds to no facility or to another than it was identified as."""
        crl, registry = self.revocations.crl, self.registry.current
        for transport, facility_id in list(self._open.items()):
            if not getattr(transport, "connected", False) or getattr(transport, "disconnecting", False):
                continue
            cert = peer_certificate(transport)
            if cert is None:
                continue
            if crl is not None and crl.revokes(cert):
                reason = "its certificate is revoked"
            else:
                named = registry.by_certificate(cert)
                if named is not None and named.id == facility_id:
                    continue
                reason = ("its certificate now names facility " + named.id if named is not None
                          else "its certificate names no facility of the registry now")
            log.warning("closing the connection of facility %s from %s: %s (sha256 %s)", facility_id,
                        _peer(transport), reason, certificate_fingerprint(cert))
            del self._open[transport]
            transport.abortConnection()

    def reload(self) -> defer.Deferred:
        """Read the registry and the CRL again; a Deferred firing with True when the registry
        was replaced, False when it was refused (the CRL is replaced or kept on its own)."""
        pool = self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, self._read).addCallback(self._use)

    def _read(self):
        """(registry or None, [problems], crl or None, crl problem or None), in a thread."""
        registry, problems = None, []
        try:
            fresh = load_config(self.config.path)
        except ConfigError as error:
            problems = error.problems
        except Exception as error:  # unreadable files: refused like any other problem
            problems = [f"{self.config.path}: {error}"]
        else:
            registry = FacilityRegistry.from_config(fresh)
            problems = registry_problems(self.config, registry)
        crl, crl_problem = None, None
        try:
            crl = read_crl(self.config)
        except TlsConfigError as error:
            crl_problem = str(error)
        return registry, problems, crl, crl_problem

    def _use(self, read) -> bool:
        registry, problems, crl, crl_problem = read
        if crl_problem is not None:
            log.error("CRL refused: %s; keeping the CRL in force", crl_problem)
        elif crl is not None:
            old = self.revocations.crl
            if self.revocations.use(crl):
                log.info("CRL %s reloaded: %d revoked certificates, issued %s (was %s)", crl.path,
                         len(crl.serials), crl.last_update.isoformat(),
                         len(old.serials) if old is not None else "none")
        if problems or registry is None:
            log.error("facility registry refused (%d problems); keeping the registry in force "
                      "(%d facilities)", len(problems), len(self.registry.current.facilities))
            for problem in problems:
                log.error("  %s", problem)
            self._recheck()  # the CRL may have been replaced all the same
            return False
        old_ids = {f.id for f in self.registry.current.facilities}
        new_ids = {f.id for f in registry.facilities}
        self.registry.current = registry
        log.info("facility registry reloaded: %d facilities (added: %s; removed: %s)",
                 len(new_ids), ", ".join(sorted(new_ids - old_ids)) or "none",
                 ", ".join(sorted(old_ids - new_ids)) or "none")
        self._recheck()
        return True


def _peer(transport) -> str:
    peer = transport.getPeer()
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

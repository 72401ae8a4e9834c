"""The facility registry: who a party is (by certificate or MSH-3/MSH-4) and what it may do.

Pure code. Every door asks the same questions of one `FacilityRegistry`:
- `by_certificate(cert)`: the facility a client certificate names: by its configured SHA-256
  fingerprint, else its configured subject, else (the development PKI's naming) a certificate
  whose common name is the facility id and that no other facility binds;
- `by_header(application, facility)`: the facility behind MSH-3/MSH-4 (plain MLLP);
- `may_send(facility, message_type)` and `may(facility, operation)`: what its type allows
  (facilities.yaml `types:`);
- `source_allowed(facility, address)`: whether it may send from that network address.

`authorize_message` (and its two halves, `authorize_certified` and `authorize_sender`) turns
those answers into one `Refusal` or None: the same rules on every door (MLLP, REST, SOAP).

The registry is rebuilt whole on reload; the doors share a `RegistryRef` and read its
`current` registry for each message, so a reload never drops a connection. Answers the hot
path asks per message are dict lookups (type rights and source checks are memoised).
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from adapters.hl7v2.codes import AppErrorCode
from gateway.config import (DEFAULT_FACILITY_TYPES, FacilityTypeConfig, GatewayConfig,
                            SenderConfig)
from gateway.pki import certificate_common_name, certificate_fingerprint

# Memoised answers kept per registry; beyond this many (hostile senders inventing Z types or
# many source addresses), answers are computed each time instead of stored.
_MEMO_LIMIT = 4096


def type_matches(pattern: str, message_type: str) -> bool:
    """Whether `message_type` (ORU^R01, ASTM, CSV^profile) matches a pattern (ORU^R01, ORU^*,
    ORU, ASTM, CSV^*, *)."""
    if pattern == "*" or pattern == message_type:
        return True
    code = message_type.partition("^")[0]
    if pattern == code:
        return True
    return pattern.endswith("^*") and pattern[:-2] == code


class FacilityRegistry:
    def __init__(self, facilities: Iterable[SenderConfig],
                 types: Mapping[str, FacilityTypeConfig] | None = None):
        self.facilities = tuple(facilities)
        self.types = dict(DEFAULT_FACILITY_TYPES if types is None else types)
        self._by_id = {facility.id: facility for facility in self.facilities}
        self._by_fingerprint = {f.certificate_sha256: f for f in self.facilities
                                if f.certificate_sha256}
        self._by_subject = {_normal_subject(f.certificate_subject): f for f in self.facilities
                            if f.certificate_subject}
        self._by_header: dict[str, list[SenderConfig]] = {}
        for facility in self.facilities:
            for name in facility.facilities or (facility.id,):
                self._by_header.setdefault(name, []).append(facility)
        self._names = {f.id: frozenset(f.facilities or (f.id,)) for f in self.facilities}
        self._sources = {f.id: SourceNetworks(f.allow_sources) for f in self.facilities
                         if f.allow_sources}
        self._may_send: dict[tuple[str, str], bool] = {}
        self._source_allowed: dict[tuple[str, str], bool] = {}

    @classmethod
    def from_config(cls, config: GatewayConfig) -> "FacilityRegistry":
        return cls(config.senders, config.facility_types)

    def get(self, facility_id: str | None) -> SenderConfig | None:
        return self._by_id.get(facility_id or "")

    def by_certificate(self, cert: x509.Certificate) -> SenderConfig | None:
        """The facility this (already verified) client certificate names, or None."""
        facility = self._by_fingerprint.get(certificate_fingerprint(cert))
        if facility is not None:
            return facility
        # A certificate's subject prints in the normal form already; parsing it again would
        # raise for names the parser refuses (a common name over 64 characters...).
        facility = self._by_subject.get(cert.subject.rfc4514_string())
        if facility is not None:
            return facility
        if len(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)) != 1:
            return None  # several common names name no one facility (tools differ on which counts)
        facility = self._by_id.get(certificate_common_name(cert) or "")
        if facility is not None and not (facility.certificate_sha256 or facility.certificate_subject):
            return facility  # bound by name only when no explicit binding is configured
        return None

    def by_header(self, application: str, facility: str) -> SenderConfig | None:
        """The facility behind MSH-3/MSH-4 (first components), or None. Facilities sharing an
        MSH-4 name are told apart by MSH-3: one that lists it wins over one that takes any."""
        application = application.split("^", 1)[0]
        any_application = None
        for candidate in self._by_header.get(facility.split("^", 1)[0], ()):
            if not candidate.applications:
                any_application = any_application or candidate
            elif application in candidate.applications:
                return candidate
        return any_application

    def names_facility(self, facility: SenderConfig, msh4: str) -> bool:
        """Whether MSH-4 (first component) is one of `facility`'s own names."""
        names = self._names.get(facility.id)
        if names is None:  # a facility from elsewhere than this registry
            names = facility.facilities or (facility.id,)
        return msh4.split("^", 1)[0] in names

    def may_send(self, facility: SenderConfig, message_type: str) -> bool:
        """Whether its type allows `message_type` ('ORU^R01', 'ASTM', 'CSV^profile')."""
        key = (facility.type, message_type)
        allowed = self._may_send.get(key)
        if allowed is None:
            rights = self.types.get(facility.type)
            allowed = rights is not None and any(type_matches(p, message_type) for p in rights.messages)
            if len(self._may_send) < _MEMO_LIMIT:
                self._may_send[key] = allowed
        return allowed

    def source_allowed(self, facility: SenderConfig, address: str) -> bool:
        """Whether `facility` may send from `address` (its allow_sources; none: any)."""
        networks = self._sources.get(facility.id)
        if networks is None:
            if facility.allow_sources and facility.id not in self._by_id:
                networks = SourceNetworks(facility.allow_sources)  # not ours: no memo
            else:
                return True
        key = (facility.id, address)
        allowed = self._source_allowed.get(key)
        if allowed is None:
            allowed = networks.allows(address)
            if len(self._source_allowed) < _MEMO_LIMIT:
                self._source_allowed[key] = allowed
        return allowed

    def may(self, facility: SenderConfig, operation: str) -> bool:
        rights = self.types.get(facility.type)
        return rights is not None and operation in rights.operations


class RegistryRef:
    """The registry in force, shared by every door; a reload replaces `current` whole."""

    __slots__ = ("current",)

    def __init__(self, registry: FacilityRegistry | None = None):
        self.current = registry if registry is not None else FacilityRegistry(())


class SourceNetworks:
    """CIDR networks parsed once; `allows(address)`: inside one of them (any, when none)."""

    def __init__(self, cidrs: Iterable[str]):
        self.networks = tuple(_unmapped(ipaddress.ip_network(cidr, strict=False)) for cidr in cidrs)

    def allows(self, address: str) -> bool:
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.1.2.3 on a dual-stack socket is 10.1.2.3
        return any(ip in network for network in self.networks)


def _unmapped(network):
    """An IPv4-mapped network (::ffff:10.0.0.0/104) as the IPv4 one it is (10.0.0.0/8), since
    addresses are compared in their IPv4 form; any other network as it is."""
    address = network.network_address
    if network.version == 6 and network.prefixlen >= 96 and address.ipv4_mapped is not None:
        return ipaddress.ip_network(f"{address.ipv4_mapped}/{network.prefixlen - 96}")
    return network


# -- authorization: the same rules on every door ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a message is refused at the door. `reason` names facilities and message types,
    never patient data: it goes into the ACK (MSA-3, ERR-7), a problem+json or a SOAP fault,
    the store and the log."""

    reason: str
    field: int  # the MSH field it concerns: 4 (who sends) or 9 (what is sent)
    code: AppErrorCode  # ERR-5 (our table MA-HIE-ERR)

    @property
    def location(self) -> str:
        return f"MSH-{self.field}"


def authorize_message(registry: FacilityRegistry, certified: str | None, application: str,
                      facility: str, message_type: str, peer_address: str | None = None,
                      accept_unknown: bool = False) -> Refusal | None:
    """None when the message may pass, else the Refusal.

    `certified`: the facility id a verified client certificate names (MLLP over TLS, HTTPS),
    or None on plain MLLP, where MSH-3/MSH-4 (`application`, `facility`) find the sender and
    `peer_address` (the connection's IP address) must be in its allow_sources.
    `accept_unknown` (plain MLLP, development): a sender missing from the registry passes.
    """
    if certified is not None:
        return authorize_certified(registry, registry.get(certified), facility, message_type,
                                   certified)
    return authorize_sender(registry, registry.by_header(application, facility), facility,
                            message_type, peer_address, accept_unknown)


def authorize_certified(registry: FacilityRegistry, facility: SenderConfig | None, msh4: str,
                        message_type: str, certified: str | None = None) -> Refusal | None:
    """A connection whose certificate names `facility` (None: no longer in the registry, once
    reloaded; `certified` is then its former id): MSH-4 must be one of its names and its type
    must allow `message_type`."""
    if facility is None:
        return Refusal(f"facility {certified or '?'} named by the client certificate is no longer "
                       "in the facility registry", 4, AppErrorCode.SENDER_NOT_ALLOWED)
    if not registry.names_facility(facility, msh4):
        return Refusal(f"MSH-4 {_first(msh4)!r} is not a name of facility {facility.id}, whose "
                       "certificate this connection presented", 4, AppErrorCode.FACILITY_MISMATCH)
    if not registry.may_send(facility, message_type):
        return _type_refusal(facility, message_type)
    return None


def authorize_sender(registry: FacilityRegistry, sender: SenderConfig | None, msh4: str,
                     message_type: str, peer_address: str | None,
                     accept_unknown: bool) -> Refusal | None:
    """Plain MLLP: `sender` is what MSH-3/MSH-4 found in the registry (None: nothing). An
    unknown sender passes only with `accept_unknown`, and then without a type check; a known
    one must send from its allow_sources (when `peer_address` is known) and what its type allows."""
    if sender is None:
        if accept_unknown:
            return None
        return Refusal(f"sending facility {_first(msh4)!r} (MSH-3/MSH-4) is not in the facility "
                       "registry", 4, AppErrorCode.SENDER_NOT_ALLOWED)
    if peer_address is not None and not registry.source_allowed(sender, peer_address):
        return Refusal(f"facility {sender.id} may not send from {peer_address} (not in its "
                       "allow_sources)", 4, AppErrorCode.SOURCE_NOT_ALLOWED)
    if not registry.may_send(sender, message_type):
        return _type_refusal(sender, message_type)
    return None


def _type_refusal(facility: SenderConfig, message_type: str) -> Refusal:
    return Refusal(f"message type {message_type} is not allowed for facility {facility.id} "
                   f"(type {facility.type})", 9, AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED)


def _first(component: str) -> str:
    return component.split("^", 1)[0]


def _normal_subject(text: str) -> str:
    """A subject in one comparable form (attribute order and spacing as RFC 4514 prints them)."""
    return x509.Name.from_rfc4514_string(text).rfc4514_string()

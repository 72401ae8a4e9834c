"""The facility registry: who a party is (by certificate or MSH-3/MSH-4) and what it may do.

Pure code. Every door asks the same questions of one `FacilityRegistry`:
- `by_certificate(cert)`: the facility a client certificate names: by its configured SHA-256
  fingerprint, else its configured subject, else (the development PKI's naming) a certificate
  whose common name is the facility id and that no other facility binds;
- `by_header(application, facility)`: the facility behind MSH-3/MSH-4 (plain MLLP);
- `may_send(facility, message_type)` and `may(facility, operation)`: what its type allows
  (facilities.yaml `types:`).
The registry is rebuilt whole on reload; callers keep a reference to the current one.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from cryptography import x509

from gateway.config import (DEFAULT_FACILITY_TYPES, FacilityTypeConfig, GatewayConfig,
                            SenderConfig)
from gateway.pki import certificate_common_name, certificate_fingerprint


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
        facility = self._by_subject.get(_normal_subject(cert.subject.rfc4514_string()))
        if facility is not None:
            return facility
        facility = self._by_id.get(certificate_common_name(cert) or "")
        if facility is not None and not (facility.certificate_sha256 or facility.certificate_subject):
            return facility  # bound by name only when no explicit binding is configured
        return None

    def by_header(self, application: str, facility: str) -> SenderConfig | None:
        """The facility behind MSH-3/MSH-4 (first components), or None."""
        for candidate in self._by_header.get(facility.split("^", 1)[0], ()):
            if not candidate.applications or application.split("^", 1)[0] in candidate.applications:
                return candidate
        return None

    def names_facility(self, facility: SenderConfig, msh4: str) -> bool:
        """Whether MSH-4 (first component) is one of `facility`'s own names."""
        return msh4.split("^", 1)[0] in (facility.facilities or (facility.id,))

    def may_send(self, facility: SenderConfig, message_type: str) -> bool:
        rights = self.types.get(facility.type)
        return rights is not None and any(type_matches(p, message_type) for p in rights.messages)

    def may(self, facility: SenderConfig, operation: str) -> bool:
        rights = self.types.get(facility.type)
        return rights is not None and operation in rights.operations


def _normal_subject(text: str) -> str:
    """A subject in one comparable form (attribute order and spacing as RFC 4514 prints them)."""
    return x509.Name.from_rfc4514_string(text).rfc4514_string()

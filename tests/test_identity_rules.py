"""The pure identity rules: authorize_message and its halves (gateway.facilities), source
networks, CRL loading (gateway.tls.load_crl), what the ASTM listeners need of a registry."""
from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.hl7v2.codes import AppErrorCode
from gateway.config import AstmListenerConfig, FacilityTypeConfig, SenderConfig
from gateway.facilities import (FacilityRegistry, Refusal, SourceNetworks, authorize_certified,
                                authorize_message, authorize_sender)
from gateway.identity import IdentityError, registry_problems
from gateway.pki import init_dev_pki
from gateway.tls import TlsConfigError, load_crl

CHU = SenderConfig(id="INPE-100001", name="CHU", type="hospital", applications=("HIS",),
                   facilities=("CHU_A", "CHU_A_URG"))
PHARMACY = SenderConfig(id="INPE-100004", name="Pharmacie", type="pharmacy", facilities=("PHARM_A",))
LAB = SenderConfig(id="INPE-100002", name="Labo", type="laboratory", facilities=("LAB_A",),
                   allow_sources=("10.9.0.0/16", "2001:db8::/32"))
DOCTOR = SenderConfig(id="INPE-200001", name="Dr", type="doctor")  # MSH-4 is its id
REGISTRY = FacilityRegistry([CHU, PHARMACY, LAB, DOCTOR])


def test_certified_facility_may_send_what_its_type_allows_in_its_own_name():
    """Over TLS: any of the facility's MSH-4 names (first component) and an allowed type pass."""
    assert authorize_message(REGISTRY, CHU.id, "ANY", "CHU_A_URG^2.16.504^ISO", "ORU^R01") is None
    assert authorize_message(REGISTRY, PHARMACY.id, "X", "PHARM_A", "RDS^O13") is None
    assert authorize_message(REGISTRY, DOCTOR.id, "X", "INPE-200001", "RDE^O11") is None


@pytest.mark.parametrize("certified, msh4, message_type, code, field, words", [
    (PHARMACY.id, "PHARM_A", "ADT^A01", AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED, 9, "type pharmacy"),
    (DOCTOR.id, "INPE-200001", "RDS^O13", AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED, 9, "type doctor"),
    (LAB.id, "LAB_A", "RDE^O11", AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED, 9, "RDE^O11"),
    (CHU.id, "PHARM_A", "ADT^A01", AppErrorCode.FACILITY_MISMATCH, 4, "'PHARM_A' is not a name of"),
    (CHU.id, "", "ADT^A01", AppErrorCode.FACILITY_MISMATCH, 4, "INPE-100001"),
    ("INPE-GONE", "CHU_A", "ADT^A01", AppErrorCode.SENDER_NOT_ALLOWED, 4, "no longer in the facility"),
])
def test_certified_refusals(certified, msh4, message_type, code, field, words):
    """A certificate sending in another's name, a type its kind may not send, or a facility
    removed from the registry since the connection began: each its own code and field."""
    refusal = authorize_message(REGISTRY, certified, "APP", msh4, message_type)
    assert isinstance(refusal, Refusal)
    assert (refusal.code, refusal.field, refusal.location) == (code, field, f"MSH-{field}")
    assert words in refusal.reason


def test_mismatch_is_checked_before_the_type():
    """A certificate in another's name is told so, even when the type would also be refused."""
    refusal = authorize_certified(REGISTRY, PHARMACY, "CHU_A", "ADT^A01")
    assert refusal.code is AppErrorCode.FACILITY_MISMATCH


def test_plain_sender_found_by_header_then_source_then_type():
    """Plain MLLP: MSH-3/MSH-4 find the facility; then its networks; then its type."""
    assert authorize_message(REGISTRY, None, "HIS", "CHU_A", "ADT^A01", "192.0.2.7") is None
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ORU^R01", "10.9.4.2") is None
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ORU^R01", "2001:db8::5") is None
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ORU^R01", "::ffff:10.9.0.1") is None
    outside = authorize_message(REGISTRY, None, "LIS", "LAB_A", "ORU^R01", "10.10.0.1")
    assert (outside.code, outside.field) == (AppErrorCode.SOURCE_NOT_ALLOWED, 4)
    assert "10.10.0.1" in outside.reason
    # The source is checked first: a stranger on the wrong network learns nothing about types.
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ADT^A01", "10.10.0.1").code \
        is AppErrorCode.SOURCE_NOT_ALLOWED
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ADT^A01", "10.9.0.1").code \
        is AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED
    # No address known (no door): no source check.
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ORU^R01", None) is None


@pytest.mark.parametrize("address", ["not-an-ip", "", "10.9.0.1:2575", "999.1.1.1"])
def test_unreadable_source_address_is_outside_every_network(address):
    assert authorize_message(REGISTRY, None, "LIS", "LAB_A", "ORU^R01", address).code \
        is AppErrorCode.SOURCE_NOT_ALLOWED


def test_plain_unknown_sender():
    """Unknown MSH-3/MSH-4: refused naming MSH-4, unless accepted (then no type check at all)."""
    refusal = authorize_message(REGISTRY, None, "HIS", "NOBODY^1.2^ISO", "ADT^A01", "127.0.0.1")
    assert (refusal.code, refusal.field) == (AppErrorCode.SENDER_NOT_ALLOWED, 4)
    assert "'NOBODY'" in refusal.reason and "1.2" not in refusal.reason
    assert authorize_message(REGISTRY, None, "HIS", "NOBODY", "ZZZ^Z99", "127.0.0.1",
                             accept_unknown=True) is None
    # MSH-3 outside the facility's applications: not that facility.
    assert authorize_message(REGISTRY, None, "OTHER_APP", "CHU_A", "ADT^A01").code \
        is AppErrorCode.SENDER_NOT_ALLOWED


def test_accepting_unknown_senders_does_not_free_known_ones():
    """accept_unknown_senders welcomes strangers; a known pharmacy is still held to its type."""
    assert authorize_sender(REGISTRY, PHARMACY, "PHARM_A", "ADT^A01", "127.0.0.1", True).code \
        is AppErrorCode.MESSAGE_TYPE_NOT_ALLOWED


def test_types_section_overrides_rights_and_unknown_types_may_nothing():
    """facilities.yaml `types:` decides; a facility whose type has no rights may send nothing."""
    registry = FacilityRegistry([PHARMACY, SenderConfig(id="X", name="X", type="veterinary")],
                                {"pharmacy": FacilityTypeConfig(("RDS^*", "ADT^A08"), ())})
    assert registry.may_send(PHARMACY, "ADT^A08") and not registry.may_send(PHARMACY, "ADT^A01")
    assert registry.may_send(PHARMACY, "RDS^O13")
    assert not registry.may_send(registry.get("X"), "ADT^A01")


def test_memoised_answers_stay_right_past_the_memo_limit():
    """Thousands of invented Z types (a hostile sender) neither grow the memo without bound
    nor change an answer."""
    for n in range(5000):
        assert not REGISTRY.may_send(PHARMACY, f"Z{n:02d}^Z01")
        assert not REGISTRY.source_allowed(LAB, f"10.{n // 250}.{n % 250}.1") or n // 250 == 9
    assert len(REGISTRY._may_send) <= 4096 and len(REGISTRY._source_allowed) <= 4096
    assert REGISTRY.may_send(PHARMACY, "RDS^O13") and REGISTRY.may_send(CHU, "ZZZ^Z99")
    assert REGISTRY.source_allowed(LAB, "10.9.8.7")


def test_source_networks():
    networks = SourceNetworks(["10.0.0.0/8", "fd00::/8"])
    assert networks.allows("10.1.2.3") and networks.allows("fd12::1")
    assert not networks.allows("11.0.0.1") and not networks.allows("garbage")
    assert SourceNetworks([]).allows("anything")


def test_ipv4_mapped_source_networks_hold_their_ipv4_addresses():
    """A network written as IPv4-mapped IPv6 (as a dual-stack socket shows its peers) holds the
    same addresses whether the peer comes as ::ffff:10.9.0.1 or as 10.9.0.1."""
    networks = SourceNetworks(["::ffff:10.9.0.0/112", "::ffff:192.0.2.7/128"])
    assert networks.allows("::ffff:10.9.4.2") and networks.allows("10.9.4.2")
    assert networks.allows("192.0.2.7") and networks.allows("::ffff:192.0.2.7")
    assert not networks.allows("10.10.0.1") and not networks.allows("::ffff:10.10.0.1")
    assert not networks.allows("2001:db8::1")


def test_facilities_sharing_an_msh4_name_are_told_apart_by_msh3():
    """Two establishments behind one MSH-4: the one that lists MSH-3 is the sender, whatever
    the order of the registry; the one that takes any application gets the others."""
    group = SenderConfig(id="INPE-300001", name="Groupe", type="hospital", facilities=("GRP",))
    lab = SenderConfig(id="INPE-300002", name="Labo du groupe", type="laboratory",
                       applications=("LIS_GRP",), facilities=("GRP",))
    for registry in (FacilityRegistry([group, lab]), FacilityRegistry([lab, group])):
        assert registry.by_header("LIS_GRP", "GRP") is lab
        assert registry.by_header("LIS_GRP^1.2.3^ISO", "GRP^2.16.504^ISO") is lab
        assert registry.by_header("HIS_GRP", "GRP") is group
    assert FacilityRegistry([lab]).by_header("HIS_GRP", "GRP") is None


def test_astm_listener_needs_a_laboratory_that_may_send_astm():
    """An ASTM listener's facility must be in the registry and of a type allowed ASTM."""
    class Config:
        astm = (AstmListenerConfig("astm-lab", 1, LAB.id), AstmListenerConfig("astm-pharm", 2, PHARMACY.id),
                AstmListenerConfig("astm-gone", 3, "INPE-GONE"))

    problems = registry_problems(Config, REGISTRY)
    assert len(problems) == 2
    assert "astm-pharm" in problems[0] and "type pharmacy, which may not send ASTM" in problems[0]
    assert "astm-gone" in problems[1] and "not in the facility registry" in problems[1]


def test_gateway_with_an_astm_listener_for_a_pharmacy_does_not_build(make_config, tmp_path):
    """build_service refuses (IdentityError) rather than accept analyzers in a pharmacy's name."""
    import dataclasses

    from twisted.internet import reactor

    from gateway.service import build_service

    config = make_config(f"sqlite:///{tmp_path / 'g.sqlite'}", mllp=[], senders=[PHARMACY])
    config = dataclasses.replace(config, astm=(AstmListenerConfig("astm-pharm", 0, PHARMACY.id),))
    with pytest.raises(IdentityError, match="may not send ASTM"):
        build_service(config, reactor)


# -- CRL loading -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rules-pki")
    init_dev_pki(str(directory), ["FAC1"])
    other = tmp_path_factory.mktemp("rules-other")
    init_dev_pki(str(other), [])
    return directory, other


def _crl(directory, key=None, issuer=None, serials=(7,)):
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = key or serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer or ca_cert.subject)
               .last_update(now).next_update(now + datetime.timedelta(days=1)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_crl_loads_in_pem_and_der(ca, tmp_path, encoding):
    directory, _ = ca
    path = tmp_path / "ca.crl"
    path.write_bytes(_crl(directory, serials=(7, 0xABCDEF)).public_bytes(encoding))
    crl = load_crl(str(path), str(directory / "ca.crt"))
    assert crl.serials == {7, 0xABCDEF} and not crl.expired()
    cert = x509.load_pem_x509_certificate((directory / "FAC1.crt").read_bytes())
    assert not crl.revokes(cert)


def test_crl_problems_name_the_file(ca, tmp_path):
    """Garbage, truncated, another CA's CRL, a forged signature, a missing file: TlsConfigError."""
    directory, other = ca
    good = _crl(directory).public_bytes(serialization.Encoding.DER)
    cases = {
        "garbage.crl": (b"not a crl at all", "not a certificate revocation list"),
        "truncated.crl": (good[: len(good) // 2], "not a certificate revocation list"),
        # Another dev CA: the same name as ours, another key.
        "other.crl": (_crl(other).public_bytes(serialization.Encoding.PEM), "signature does not verify"),
        "stranger.crl": (_crl(directory, issuer=x509.Name([x509.NameAttribute(
            x509.oid.NameOID.COMMON_NAME, "Another CA")])).public_bytes(serialization.Encoding.DER),
            "issued by 'CN=Another CA', which is not a CA of"),
        "forged.crl": (_crl(directory, key=ec.generate_private_key(ec.SECP256R1())).public_bytes(
            serialization.Encoding.PEM), "signature does not verify"),
    }
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TlsConfigError) as info:
            load_crl(str(tmp_path / name), str(directory / "ca.crt"))
        assert info.value.path == str(tmp_path / name) and words in info.value.reason, name
    with pytest.raises(TlsConfigError, match="cannot read CRL"):
        load_crl(str(tmp_path / "absent.crl"), str(directory / "ca.crt"))


# -- naming a facility by certificate --------------------------------------------------------

def _leaf(directory, *common_names: str) -> x509.Certificate:
    """A client certificate of the CA in `directory` whose subject holds these common names
    (unchecked: a CA may issue what the name parser refuses, a CN over 64 characters)."""
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name, _validate=False)
                         for name in common_names])
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(ca_key, hashes.SHA256()))


@pytest.mark.filterwarnings("ignore:Attribute's length")
def test_certificate_names_a_facility_by_its_one_common_name(ca):
    """A common name equal to a facility id names it; a subject with two common names names
    none (tools differ on which one counts), and a common name over 64 characters, which the
    RFC 4514 parser refuses, is looked up like any other instead of raising."""
    directory, _ = ca
    subject_bound = SenderConfig(id="INPE-100009", name="Bound", type="clinic",
                                 certificate_subject="CN=SOMETHING ELSE")
    registry = FacilityRegistry([CHU, PHARMACY, subject_bound])
    assert registry.by_certificate(_leaf(directory, CHU.id)) is CHU
    assert registry.by_certificate(_leaf(directory, CHU.id, PHARMACY.id)) is None
    assert registry.by_certificate(_leaf(directory, PHARMACY.id, CHU.id)) is None
    assert registry.by_certificate(_leaf(directory, "INPE-" + "1" * 60)) is None

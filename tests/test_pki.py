"""Tests for the development PKI (gateway.pki)."""
from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway import pki

PARTIES = ("ca", "gateway", "sandbox-cnss", "sandbox-record")


def _load(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _eku(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_creates_all_files_with_private_keys_0600(tmp_path):
    """init_dev_pki writes a cert and key for the CA, each party and each facility, keys 0600."""
    written = pki.init_dev_pki(str(tmp_path), ["FAC001", "FAC002"])
    names = PARTIES + ("FAC001", "FAC002")
    expected = {str(tmp_path / f"{n}.{ext}") for n in names for ext in ("crt", "key")}
    expected.add(str(tmp_path / "prescription-signing.key"))
    assert set(written) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in expected)
    for name in names:
        assert stat.S_IMODE(os.stat(tmp_path / f"{name}.key").st_mode) == 0o600
        with open(tmp_path / f"{name}.key", "rb") as f:
            assert f.read().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted


def test_second_run_writes_nothing(tmp_path):
    """A second call with the same facilities writes nothing and leaves the files unchanged."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert pki.init_dev_pki(str(tmp_path), ["FAC001"]) == []
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_new_facility_is_signed_by_existing_ca(tmp_path):
    """A facility added later gets its own pair, signed by the CA already on disk."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    ca_before = (tmp_path / "ca.crt").read_bytes()
    written = pki.init_dev_pki(str(tmp_path), ["FAC001", "FAC002"])
    assert sorted(written) == [str(tmp_path / "FAC002.crt"), str(tmp_path / "FAC002.key")]
    assert (tmp_path / "ca.crt").read_bytes() == ca_before
    _load(tmp_path / "FAC002.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))


def test_overwrite_regenerates_everything(tmp_path):
    """With overwrite, a new CA is made and every leaf is reissued under it."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    ca_before = (tmp_path / "ca.crt").read_bytes()
    written = pki.init_dev_pki(str(tmp_path), ["FAC001"], overwrite=True)
    assert len(written) == 10
    assert (tmp_path / "ca.crt").read_bytes() != ca_before
    _load(tmp_path / "FAC001.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))


def test_leaf_from_another_ca_is_reissued(tmp_path):
    """A leaf pair that does not chain to the CA on disk is replaced by one that does."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    other = tmp_path / "other"
    pki.init_dev_pki(str(other), ["FAC001"])
    for ext in ("crt", "key"):
        (tmp_path / f"FAC001.{ext}").write_bytes((other / f"FAC001.{ext}").read_bytes())
    written = pki.init_dev_pki(str(tmp_path), ["FAC001"])
    assert sorted(written) == [str(tmp_path / "FAC001.crt"), str(tmp_path / "FAC001.key")]
    _load(tmp_path / "FAC001.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))


def test_ca_is_self_signed_ca(tmp_path):
    """The CA is self-signed, named as documented, CA=true critical, signs certs and CRLs."""
    pki.init_dev_pki(str(tmp_path))
    ca = _load(tmp_path / "ca.crt")
    ca.verify_directly_issued_by(ca)
    assert pki.certificate_common_name(ca) == "MA HIE Development CA"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


def test_leaves_chain_to_ca_with_right_usages_and_names(tmp_path):
    """Server parties carry serverAuth+clientAuth and loopback SANs; facilities clientAuth only."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    ca = _load(tmp_path / "ca.crt")
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for name in ("gateway", "sandbox-cnss", "sandbox-record", "FAC001"):
        cert = _load(tmp_path / f"{name}.crt")
        cert.verify_directly_issued_by(ca)
        assert cert.signature_hash_algorithm.name == "sha256"
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    for name in ("gateway", "sandbox-cnss", "sandbox-record"):
        cert = _load(tmp_path / f"{name}.crt")
        assert _eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        assert set(san.get_values_for_type(x509.IPAddress)) == {
            ipaddress.ip_address("127.0.0.1"),
            ipaddress.ip_address("::1"),
        }
    facility = _load(tmp_path / "FAC001.crt")
    assert _eku(facility) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert pki.certificate_common_name(facility) == "FAC001"
    org = facility.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value
    assert org == "MA HIE facility"


def test_leaf_validity_follows_days(tmp_path):
    """Leaves expire `days` after issue."""
    pki.init_dev_pki(str(tmp_path), days=30)
    cert = _load(tmp_path / "gateway.crt")
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=29) < remaining <= datetime.timedelta(days=30)


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", "gateway", "ca", ".hidden"])
def test_unsafe_facility_ids_are_rejected(tmp_path, bad):
    """A facility id that is not a plain file name, or is reserved, raises ValueError."""
    with pytest.raises(ValueError):
        pki.init_dev_pki(str(tmp_path), [bad])


def test_half_a_ca_is_an_error(tmp_path):
    """A CA certificate without its key raises PkiError rather than silently replacing it."""
    pki.init_dev_pki(str(tmp_path))
    os.unlink(tmp_path / "ca.key")
    with pytest.raises(pki.PkiError) as info:
        pki.init_dev_pki(str(tmp_path), ["FAC001"])
    assert info.value.path == str(tmp_path / "ca.key")


def test_describe_fingerprints_match(tmp_path):
    """describe_certificates lists each certificate with the fingerprint certificate_fingerprint gives."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    infos = pki.describe_certificates(str(tmp_path))
    assert [os.path.basename(i.path) for i in infos] == sorted(
        f"{n}.crt" for n in PARTIES + ("FAC001",)
    )
    for info in infos:
        with open(info.path, "rb") as f:
            pem = f.read()
        assert info.fingerprint == pki.certificate_fingerprint(pem)
        assert len(info.fingerprint) == 64 and info.fingerprint == info.fingerprint.lower()
        assert info.not_after.tzinfo is not None
        assert info.is_ca == (os.path.basename(info.path) == "ca.crt")
        assert info.issuer == "CN=MA HIE Development CA,O=MA HIE,C=MA"


def test_describe_missing_directory_is_empty(tmp_path):
    """describe_certificates on a directory that does not exist returns no certificates."""
    assert pki.describe_certificates(str(tmp_path / "nope")) == []


def test_common_name_absent_is_none(tmp_path):
    """certificate_common_name returns None for a subject without CN."""
    pki.init_dev_pki(str(tmp_path))
    cert = _load(tmp_path / "gateway.crt")
    assert pki.certificate_common_name(cert) == "gateway"

    class NoCn:
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "X")])

    assert pki.certificate_common_name(NoCn()) is None


def _config(root, facility_ids):
    return SimpleNamespace(
        root=str(root),
        pki=SimpleNamespace(dev_dir="certs/dev"),
        senders=tuple(SimpleNamespace(id=f) for f in facility_ids),
    )


def test_cmd_pki_init_and_show(tmp_path, capsys):
    """cmd_pki_init writes under root/dev_dir for every sender; cmd_pki_show prints each cert."""
    config = _config(tmp_path, ["FAC001"])
    args = SimpleNamespace(dir=None, force=False)
    assert pki.cmd_pki_init(config, args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 11  # CA, 3 parties, 1 facility (certificate and key), the signing key
    assert (tmp_path / "certs" / "dev" / "FAC001.crt").exists()
    assert pki.cmd_pki_init(config, args) == 0
    assert "nothing written" in capsys.readouterr().out
    assert pki.cmd_pki_show(config, SimpleNamespace(dir=None)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5
    fac = [line for line in lines if line.startswith("FAC001.crt")][0]
    fp = pki.certificate_fingerprint((tmp_path / "certs" / "dev" / "FAC001.crt").read_bytes())
    assert "CN=FAC001" in fac and fp in fac


def test_cmd_dir_override_and_errors(tmp_path, capsys):
    """--dir overrides the configured directory; show on an empty directory returns 1."""
    config = _config(tmp_path, [])
    other = tmp_path / "elsewhere"
    assert pki.cmd_pki_show(config, SimpleNamespace(dir=str(other))) == 1
    assert pki.cmd_pki_init(config, SimpleNamespace(dir=str(other), force=False)) == 0
    assert (other / "gateway.crt").exists()
    assert not (tmp_path / "certs").exists()
    assert pki.cmd_pki_init(_config(tmp_path, ["../x"]), SimpleNamespace(dir=str(other))) == 1
    assert "../x" in capsys.readouterr().err


def _write_ca(directory, *, ca=True, ski=True, days=(-1, 365)):
    """A CA of another making in `directory` (ca.crt, ca.key): without subjectKeyIdentifier,
    not a CA, or already expired, as asked."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hospital IT CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now + datetime.timedelta(days=days[0]))
               .not_valid_after(now + datetime.timedelta(days=days[1]))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ski:
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                        critical=False)
    cert = builder.sign(key, hashes.SHA256())
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert


def test_existing_ca_without_subject_key_identifier_signs_the_leaves(tmp_path):
    """A CA made by other tools without subjectKeyIdentifier is used, not a traceback."""
    ca = _write_ca(tmp_path, ski=False)
    pki.init_dev_pki(str(tmp_path), ["FAC001"])
    leaf = _load(tmp_path / "FAC001.crt")
    leaf.verify_directly_issued_by(ca)
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki == x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())


@pytest.mark.parametrize("kind, words", [
    (dict(ca=False), "is not a CA certificate"),
    (dict(days=(-400, -35)), "the CA expired on"),
])
def test_existing_ca_that_cannot_sign_is_a_precise_error(tmp_path, capsys, kind, words):
    """A ca.crt that is no CA, or has expired, is refused naming the file: leaves it signed
    would be refused at every handshake (and an expired CA cannot sign a valid leaf at all)."""
    _write_ca(tmp_path, **kind)
    with pytest.raises(pki.PkiError) as info:
        pki.init_dev_pki(str(tmp_path), ["FAC001"])
    assert info.value.path == str(tmp_path / "ca.crt") and words in info.value.reason
    assert not (tmp_path / "FAC001.crt").exists()
    assert pki.cmd_pki_init(_config(tmp_path, []), SimpleNamespace(dir=str(tmp_path))) == 1
    assert words in capsys.readouterr().err


def test_expired_leaf_is_reissued(tmp_path, monkeypatch):
    """A leaf past its notAfter is not 'up to date': it is issued again by the same CA."""
    pki.init_dev_pki(str(tmp_path), ["FAC001"], days=1)
    ca = _load(tmp_path / "ca.crt")
    later = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) \
        + datetime.timedelta(days=2)
    monkeypatch.setattr(pki, "_now", lambda: later)
    written = pki.init_dev_pki(str(tmp_path), ["FAC001"])
    assert str(tmp_path / "FAC001.crt") in written and str(tmp_path / "gateway.crt") in written
    assert str(tmp_path / "ca.crt") not in written
    leaf = _load(tmp_path / "FAC001.crt")
    leaf.verify_directly_issued_by(ca)
    assert leaf.not_valid_after_utc > later

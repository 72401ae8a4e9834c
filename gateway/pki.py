"""Development PKI: a local CA and the certificates `gateway pki init` writes to `certs/dev/`.

Everything here is for development and tests. Private keys are written unencrypted (file
mode 0600); production deployments point `pki.ca`, `pki.cert` and `pki.key` at certificates
issued by a real PKI and never run this code.

Layout written by `init_dev_pki(directory, facility_ids)`:

- `ca.crt`, `ca.key`: the self-signed "MA HIE Development CA";
- `gateway.crt/.key`, `sandbox-cnss.crt/.key`, `sandbox-record.crt/.key`: server and client
  authentication, valid for `localhost`, `127.0.0.1` and `::1`;
- `FACILITY.crt/.key` for each facility id: client authentication only, subject
  `CN=<facility id>, O=MA HIE facility`, which is how the gateway recognises the facility;
- `prescription-signing.key`: the Ed25519 key that signs prescription QR payloads.

All keys are ECDSA P-256, all signatures SHA-256.
"""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.prescriptions.qr import ensure_signing_key

CA_NAME = "ca"
PRESCRIPTION_SIGNING_KEY = "prescription-signing.key"  # pki.prescription_key's default name
CA_COMMON_NAME = "MA HIE Development CA"
ORGANIZATION = "MA HIE"
FACILITY_ORGANIZATION = "MA HIE facility"
# Parties that run TLS servers (and also act as clients): the gateway and the sandbox peers.
SERVER_PARTIES = ("gateway", "sandbox-cnss", "sandbox-record")
SERVER_DNS_NAMES = ("localhost",)
SERVER_IP_ADDRESSES = ("127.0.0.1", "::1")

# The CA outlives its leaves so that facilities added later still get full-length
# certificates; a leaf is never issued beyond the CA's own expiry.
_CA_MIN_DAYS = 3650
# Tolerate small clock differences between the machine that issues and the one that checks.
_BACKDATE = datetime.timedelta(minutes=5)
# Facility ids become file names: keep them to a portable, path-free alphabet.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PkiError(Exception):
    """A PKI file that is missing, unreadable or inconsistent, with the path concerned."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class CertificateInfo:
    """What `gateway pki show` prints about one certificate."""

    path: str
    subject: str  # RFC 4514
    issuer: str  # RFC 4514
    not_after: datetime.datetime  # timezone-aware, UTC
    fingerprint: str  # SHA-256 of the DER encoding, lowercase hex
    is_ca: bool


# -- helpers used elsewhere (facility identification by certificate) -------------------------


def certificate_fingerprint(pem_bytes: bytes | x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex without separators.

    Accepts PEM bytes (the first certificate is used) or an already loaded certificate.
    Raises ValueError when the bytes hold no PEM certificate.
    """
    if isinstance(pem_bytes, x509.Certificate):
        cert = pem_bytes
    else:
        cert = x509.load_pem_x509_certificate(pem_bytes)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def certificate_common_name(cert: x509.Certificate) -> str | None:
    """The subject's first commonName, or None when the subject has none."""
    attributes = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        return None
    value = attributes[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# -- generation ------------------------------------------------------------------------------


def init_dev_pki(
    directory: str,
    facility_ids: Iterable[str] = (),
    *,
    days: int = 825,
    overwrite: bool = False,
) -> list[str]:
    """Create the development CA and certificates under `directory`; return the files written.

    Idempotent: existing, consistent files are kept, so a second call writes only what is
    missing (e.g. certificates for facilities added to the registry since). A party's pair
    is (re)issued when its certificate or key is missing, when they do not match, or when the
    certificate has expired or was not signed by the current CA. With `overwrite`, everything
    is regenerated, CA included. Leaves are valid `days` days (capped at the CA's expiry); a
    new CA is valid at least ten years.

    Raises ValueError for a facility id that is not a safe file name or that collides with
    a reserved name, and PkiError when only half of the CA exists, the existing CA is not a CA
    certificate or has expired, or a file cannot be read.
    """
    if days <= 0:
        raise ValueError(f"days must be positive, not {days}")
    facilities = _check_facility_ids(facility_ids)
    os.makedirs(directory, exist_ok=True)
    written: list[str] = []

    ca_cert, ca_key = _load_or_create_ca(directory, days, overwrite, written)

    parties: list[tuple[str, x509.Name, bool]] = [
        (name, _name(name, ORGANIZATION), True) for name in SERVER_PARTIES
    ]
    parties += [(fid, _name(fid, FACILITY_ORGANIZATION), False) for fid in facilities]
    for name, subject, is_server in parties:
        cert_path = os.path.join(directory, name + ".crt")
        key_path = os.path.join(directory, name + ".key")
        if not overwrite and _leaf_is_valid(cert_path, key_path, ca_cert):
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_leaf(subject, key, ca_cert, ca_key, days, is_server)
        _write_private_key(key_path, key)
        _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += [cert_path, key_path]
    signing_key = os.path.join(directory, PRESCRIPTION_SIGNING_KEY)
    if ensure_signing_key(signing_key):
        written.append(signing_key)
    return written


def _check_facility_ids(facility_ids: Iterable[str]) -> list[str]:
    reserved = {CA_NAME, *SERVER_PARTIES}
    result: list[str] = []
    for fid in facility_ids:
        if not isinstance(fid, str) or not _NAME_RE.match(fid):
            raise ValueError(f"facility id {fid!r} cannot name a certificate file")
        if fid in reserved:
            raise ValueError(f"facility id {fid!r} is reserved for the development PKI")
        if fid not in result:
            result.append(fid)
    return result


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "MA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _load_or_create_ca(
    directory: str, days: int, overwrite: bool, written: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path = os.path.join(directory, CA_NAME + ".crt")
    key_path = os.path.join(directory, CA_NAME + ".key")
    have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
    if not overwrite and (have_cert or have_key):
        if not (have_cert and have_key):
            missing = key_path if have_cert else cert_path
            raise PkiError(missing, "missing while its pair exists; restore it or use --force")
        cert = _read_certificate(cert_path)
        key = _read_private_key(key_path)
        if not _same_public_key(cert, key):
            raise PkiError(key_path, f"does not match {cert_path}")
        if not _is_ca(cert):
            raise PkiError(cert_path, "is not a CA certificate (basicConstraints CA:TRUE): "
                                      "certificates it signed would be refused")
        if cert.not_valid_after_utc <= _now():
            raise PkiError(cert_path, f"the CA expired on {cert.not_valid_after_utc.isoformat()}; "
                                      "make a new one with --force (every certificate is reissued)")
        return cert, key

    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(CA_COMMON_NAME, ORGANIZATION)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=max(days, _CA_MIN_DAYS)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_private_key(key_path, key)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    written += [cert_path, key_path]
    return cert, key


def _issue_leaf(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
    is_server: bool,
) -> x509.Certificate:
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if is_server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    try:
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:  # a CA of another making, without the extension
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,  # ECDHE_ECDSA signs the handshake
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(authority, critical=False)
    )
    if is_server:
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in SERVER_DNS_NAMES]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in SERVER_IP_ADDRESSES]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _leaf_is_valid(cert_path: str, key_path: str, ca_cert: x509.Certificate) -> bool:
    """True when both files exist, match each other, the certificate chains to `ca_cert` and
    has not expired (an expired one would be kept for ever, every handshake refused)."""
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        return False
    try:
        cert = _read_certificate(cert_path)
        key = _read_private_key(key_path)
    except PkiError:
        return False
    return (_same_public_key(cert, key) and _signed_by(cert, ca_cert)
            and cert.not_valid_after_utc > _now())


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_public_key(cert: x509.Certificate, key) -> bool:
    return cert.public_key() == key.public_key()


# -- files -----------------------------------------------------------------------------------


def _write_private_key(path: str, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(path, pem, 0o600)


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Write atomically: a fresh temporary file created with `mode`, then renamed over `path`.

    Creating the file with its final mode (rather than chmod afterwards) means a key is never
    readable by others, even for an instant; the rename means a crash never leaves half a file.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PkiError(path, e.strerror or str(e)) from e


def _read_certificate(path: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_bytes(path))
    except ValueError as e:
        raise PkiError(path, f"not a PEM certificate ({e})") from e


def _read_private_key(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        return serialization.load_pem_private_key(_read_bytes(path), password=None)
    except (ValueError, TypeError) as e:
        raise PkiError(path, f"not an unencrypted PEM private key ({e})") from e


# -- inspection ------------------------------------------------------------------------------


def describe_certificates(directory: str) -> list[CertificateInfo]:
    """Describe every certificate in the `*.crt` files of `directory`, sorted by file name.

    A file holding several certificates (a chain) yields one entry per certificate. A missing
    directory yields an empty list; an unreadable or malformed file raises PkiError.
    """
    if not os.path.isdir(directory):
        return []
    infos: list[CertificateInfo] = []
    for filename in sorted(os.listdir(directory)):
        if not filename.endswith(".crt"):
            continue
        path = os.path.join(directory, filename)
        try:
            certs = x509.load_pem_x509_certificates(_read_bytes(path))
        except ValueError as e:
            raise PkiError(path, f"not a PEM certificate ({e})") from e
        for cert in certs:
            try:
                is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except x509.ExtensionNotFound:
                is_ca = False
            infos.append(
                CertificateInfo(
                    path=path,
                    subject=cert.subject.rfc4514_string(),
                    issuer=cert.issuer.rfc4514_string(),
                    not_after=cert.not_valid_after_utc,
                    fingerprint=certificate_fingerprint(cert),
                    is_ca=is_ca,
                )
            )
    return infos


# -- command line glue (called by gateway/cli.py) --------------------------------------------


def _pki_directory(config, args) -> str:
    override = getattr(args, "dir", None)
    return override if override else os.path.join(config.root, config.pki.dev_dir)


def cmd_pki_init(config, args) -> int:
    """`gateway pki init [--dir D] [--force]`: print each file written; 0 on success, 1 on error."""
    directory = _pki_directory(config, args)
    try:
        written = init_dev_pki(
            directory,
            [s.id for s in config.senders],
            overwrite=bool(getattr(args, "force", False)),
        )
    except (PkiError, ValueError, OSError) as e:
        print(f"gateway pki init: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"{directory}: up to date, nothing written")
    return 0


def cmd_pki_show(config, args) -> int:
    """`gateway pki show [--dir D]`: one line per certificate; 1 when there are none or on error."""
    directory = _pki_directory(config, args)
    try:
        infos = describe_certificates(directory)
    except PkiError as e:
        print(f"gateway pki show: {e}", file=sys.stderr)
        return 1
    if not infos:
        print(f"gateway pki show: no certificates in {directory}; run `gateway pki init`",
              file=sys.stderr)
        return 1
    for info in infos:
        kind = " (CA)" if info.is_ca else ""
        print(
            f"{os.path.basename(info.path)}: {info.subject}{kind}"
            f"  not after {info.not_after.isoformat()}  sha256 {info.fingerprint}"
        )
    return 0

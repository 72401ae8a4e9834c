"""TLS options for Twisted listeners and clients, built from PEM files.

`server_tls_options` feeds `SSL4ServerEndpoint` / `reactor.listenSSL`; `client_tls_options`
feeds `SSL4ClientEndpoint` / `wrapClientTLS`. Both enforce TLS 1.2 or later and, for TLS 1.2,
only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3 suites are
OpenSSL's defaults, all of them AEAD. Trust is limited to the CA file given: the system
trust store is never used.

Every file problem raises `TlsConfigError(path, reason)` when the options are built, so a
bad configuration stops the gateway at start-up instead of failing the first handshake.

Servers that verify client certificates log every refused certificate with its reason (other
CA, expired, revoked...) and, given `Revocations`, refuse certificates a CRL lists (`load_crl`:
PEM or DER, signed by a CA of the CA file). OpenSSL checks the CRL in the handshake, so a
revoked certificate never completes one; `Revocations.use` installs a newer CRL while the
listeners run (a reload).
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

# TLS 1.2 suites: forward secrecy (ECDHE) and authenticated encryption only. OpenSSL keeps the
# TLS 1.3 suites apart from this list; they are all AEAD.
CIPHER_STRING = "ECDHE+AESGCM:ECDHE+CHACHA20"
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


_log = Logger()


class TlsConfigError(Exception):
    """A certificate, key or CA file that cannot be used, with the path concerned."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _acceptable_ciphers():
    return ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHER_STRING)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsConfigError(path, f"cannot read {what}: {e.strerror or e}") from e


def _load_certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TlsConfigError(path, f"{what} is not PEM: {e}") from e
    return certs


def _load_private_key(path: str):
    data = _read(path, "private key")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # an encrypted key: we have no passphrase to offer
        raise TlsConfigError(path, f"private key is encrypted: {e}") from e
    except ValueError as e:
        raise TlsConfigError(path, f"private key is not PEM: {e}") from e


def _to_openssl(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def _load_identity(cert_path: str, key_path: str):
    """(leaf certificate, private key, [intermediates]) as cryptography objects, checked to match.

    pyOpenSSL takes cryptography objects directly (its own X509/PKey wrappers are deprecated
    for this use), and Twisted only passes them through to it.
    """
    chain = _load_certificates(cert_path, "certificate")
    key = _load_private_key(key_path)
    if chain[0].public_key() != key.public_key():
        raise TlsConfigError(key_path, f"private key does not match the certificate {cert_path}")
    return chain[0], key, chain[1:]


def server_tls_options(
    cert_path: str,
    key_path: str,
    ca_path: str | None,
    *,
    require_client_cert: bool = True,
    revocations: "Revocations | None" = None,
    name: str = "tls",
) -> ssl.CertificateOptions:
    """Options for a TLS listener presenting `cert_path` (leaf first, then any intermediates).

    With `require_client_cert` (the default) a client must present a certificate that chains
    to a CA in `ca_path` and carries clientAuth if it has an extended key usage; otherwise the
    handshake fails. Without it, a client certificate is optional but still verified against
    `ca_path` when one is presented (and `ca_path` may then be None: no client certificates
    are requested at all). A certificate in `revocations`' CRL fails the handshake (without
    `revocations`, revocation is not checked). Refused client certificates are logged with
    the listener's `name`, the peer address and the reason.
    """
    cert, key, extra = _load_identity(cert_path, key_path)
    ca_certs = None
    if ca_path is not None:
        ca_certs = [_to_openssl(c) for c in _load_certificates(ca_path, "CA certificates")]
    elif require_client_cert:
        raise TlsConfigError("<none>", "a CA file is needed to require client certificates")
    try:
        options = ssl.CertificateOptions(
            privateKey=key,
            certificate=cert,
            extraCertChain=extra,
            verify=ca_certs is not None,
            caCerts=ca_certs,
            requireCertificate=require_client_cert,
            raiseMinimumTo=MINIMUM_TLS_VERSION,
            acceptableCiphers=_acceptable_ciphers(),
        )
    except ValueError as e:
        raise TlsConfigError(cert_path, f"unusable TLS configuration: {e}") from e
    if ca_certs is not None:
        # Twisted builds the context once and reuses it for every connection: what is set
        # here (before any connection, after which pyOpenSSL forbids changes) serves all.
        context = options.getContext()
        mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if require_client_cert else 0)
        context.set_verify(mode, _client_verify_callback(name, revocations))
        if revocations is not None:
            revocations.attach(context)
    return options


# -- certificate revocation ------------------------------------------------------------------


@dataclass(frozen=True)
class Crl:
    """One certificate revocation list, as loaded and checked by `load_crl`."""

    path: str
    issuer: x509.Name
    serials: frozenset[int]
    last_update: datetime.datetime
    next_update: datetime.datetime | None
    crl: x509.CertificateRevocationList = field(repr=False, compare=False)

    def revokes(self, cert: x509.Certificate) -> bool:
        return cert.serial_number in self.serials and cert.issuer == self.issuer

    def expired(self, now: datetime.datetime | None = None) -> bool:
        """Past its nextUpdate: a newer CRL should have been published and installed."""
        now = now or datetime.datetime.now(datetime.timezone.utc)
        return self.next_update is not None and now > self.next_update


def load_crl(path: str, ca_path: str) -> Crl:
    """Read a CRL (PEM or DER) issued and signed by one of the CAs in `ca_path`.

    Raises TlsConfigError naming the file: unreadable, not a CRL, from another issuer, or a
    signature that does not verify. An expired CRL loads (callers warn, handshakes use it):
    refusing every client because a publication is late would stop the national service.
    """
    data = _read(path, "CRL")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError as e:
        raise TlsConfigError(path, f"not a certificate revocation list (PEM or DER): {e}") from e
    cas = [c for c in _load_certificates(ca_path, "CA certificates") if c.subject == crl.issuer]
    if not cas:
        raise TlsConfigError(path, f"CRL issued by {crl.issuer.rfc4514_string()!r}, which is not "
                                   f"a CA of {ca_path}")
    if not any(_crl_signed_by(crl, ca) for ca in cas):
        raise TlsConfigError(path, f"CRL signature does not verify with the key of "
                                   f"{crl.issuer.rfc4514_string()!r} in {ca_path}")
    return Crl(path, crl.issuer, frozenset(entry.serial_number for entry in crl),
               crl.last_update_utc, crl.next_update_utc, crl)


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError):  # a key type that cannot sign CRLs
        return False


class Revocations:
    """The CRL in force for the TLS listeners built with it (None: none).

    OpenSSL checks it in the handshake (X509_V_FLAG_CRL_CHECK: the client's certificate
    against the CRL of its issuer), so a revoked client gets the 'certificate revoked' alert.
    `use(crl)` installs a newer CRL in every listener's store, where OpenSSL prefers, among
    the CRLs of one issuer, the one with the latest lastUpdate; a store never forgets a CRL,
    so an older file put back is ignored (reissue it with a newer date).
    """

    def __init__(self, crl: Crl | None = None):
        self.crl = crl
        self._contexts: list[tuple[SSL.Context, crypto.X509Store]] = []

    def attach(self, context: SSL.Context) -> None:
        store = context.get_cert_store()
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        if self.crl is not None:
            store.add_crl(self.crl.crl)
        # The store object borrows the context's: keep the context alive with it.
        self._contexts.append((context, store))

    def use(self, crl: Crl) -> bool:
        """Install `crl` (True), unless it is the one in force (False)."""
        if self.crl is not None and self.crl.crl == crl.crl:
            return False
        for _, store in self._contexts:
            store.add_crl(crl.crl)
        self.crl = crl
        return True


# Verification errors that a configured CRL lets pass: no CRL for the certificate's issuer
# (pki.crl covers one CA of the CA file), and a CRL not yet or no longer valid (warned about
# when loaded; its list still applies). OpenSSL X509_V_ERR_* codes.
_CRL_LENIENT = {3, 11, 12}  # UNABLE_TO_GET_CRL, CRL_NOT_YET_VALID, CRL_HAS_EXPIRED


def _client_verify_callback(name: str, revocations: Revocations | None):
    """OpenSSL's verification result (CRL included), every refusal logged with its reason."""

    def verify(connection, cert, err, depth, ok) -> bool:
        try:
            if ok:
                return True
            if revocations is not None and err in _CRL_LENIENT:
                return True
            reason = describe_x509_error(err, depth, "client")
            if err == 23 and revocations is not None and revocations.crl is not None:
                reason += f" (serial {cert.get_serial_number():x} is in the CRL {revocations.crl.path})"
            _log_refusal(name, connection, cert, reason)
            return False
        except BaseException:  # an exception inside an OpenSSL callback would be lost
            _log.failure("verifying a client certificate")
            return False

    return verify


def _log_refusal(name: str, connection, cert, reason: str) -> None:
    try:
        peer = connection.get_app_data().transport.getPeer()
        address = f"{peer.host}:{peer.port}"
    except Exception:  # no transport any more: the refusal matters more than the address
        address = "?"
    try:
        subject = cert.to_cryptography().subject.rfc4514_string()
    except Exception:
        subject = "?"
    _log.warn("{name}: TLS client {address} refused: {reason} (subject {subject})",
              name=name, address=address, reason=reason, subject=subject)


def client_tls_options(
    ca_path: str,
    hostname: str,
    cert_path: str | None = None,
    key_path: str | None = None,
) -> IOpenSSLClientConnectionCreator:
    """A client connection creator that trusts only `ca_path` and checks the server's name.

    `hostname` is matched against the server certificate's subjectAltName (a DNS name, or an
    IP address when `hostname` is one) and sent as SNI when it is a DNS name. Give
    `cert_path` and `key_path` together to present a client certificate.
    """
    if (cert_path is None) != (key_path is None):
        raise TlsConfigError(
            cert_path or key_path or "<none>",
            "a client certificate needs both its certificate and its key",
        )
    trust = ssl.trustRootFromCertificates(
        [ssl.Certificate(_to_openssl(c)) for c in _load_certificates(ca_path, "CA certificates")]
    )
    extra_options: dict = {
        "raiseMinimumTo": MINIMUM_TLS_VERSION,
        "acceptableCiphers": _acceptable_ciphers(),
    }
    if cert_path is not None and key_path is not None:
        # Given as CertificateOptions arguments rather than `clientCertificate`, which would
        # wrap them in pyOpenSSL objects that pyOpenSSL now deprecates; the effect is the same.
        cert, key, extra = _load_identity(cert_path, key_path)
        extra_options.update(privateKey=key, certificate=cert, extraCertChain=extra)
    # Twisted's own check lets a certificate without subjectAltName through (service_identity
    # raises CertificateError, which it only logs): verify ourselves, failing closed.
    return _VerifyingConnectionCreator(ssl.optionsForClientTLS(
        hostname, trustRoot=trust, extraCertificateOptions=extra_options
    ), hostname)


class ServerCertificateRejected(Exception):
    """Raised into the TLS connection when our verification refuses the server's certificate."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


# -- Server certificate verification that fails closed and names the failure ---------------

# OpenSSL's X509_V_ERR_* codes (stable across 1.1 and 3.x) for what a misconfigured peer
# actually shows; others are reported by number.
_X509_ERRORS = {
    2: "issued by a CA other than the configured one",  # UNABLE_TO_GET_ISSUER_CERT
    7: "bad signature",  # CERT_SIGNATURE_FAILURE
    9: "not yet valid",  # CERT_NOT_YET_VALID
    10: "expired",  # CERT_HAS_EXPIRED
    13: "malformed validity dates",  # ERROR_IN_CERT_NOT_BEFORE_FIELD
    14: "malformed validity dates",  # ERROR_IN_CERT_NOT_AFTER_FIELD
    18: "self-signed, not issued by the configured CA",  # DEPTH_ZERO_SELF_SIGNED_CERT
    19: "chain ends in a CA other than the configured one",  # SELF_SIGNED_CERT_IN_CHAIN
    20: "issued by a CA other than the configured one",  # UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "issued by a CA other than the configured one",  # UNABLE_TO_VERIFY_LEAF_SIGNATURE
    23: "revoked",  # CERT_REVOKED
    24: "issued by a certificate that is not a CA",  # INVALID_CA
    25: "chain too long",  # PATH_LENGTH_EXCEEDED
    26: "not valid for TLS server use (extended key usage)",  # INVALID_PURPOSE
    28: "rejected by the trust settings",  # CERT_REJECTED
    32: "issuer key usage does not allow signing certificates",  # KEYUSAGE_NO_CERTSIGN
}


def describe_x509_error(code: int, depth: int, role: str = "server") -> str:
    """A short description of an OpenSSL certificate verification error for an operator;
    `role`: whose certificate it is, "server" or "client"."""
    what = _X509_ERRORS.get(code, f"failed verification (OpenSSL X509 error {code})")
    if code == 26:
        what = f"not valid for TLS {role} use (extended key usage)"
    where = f"{role} certificate" if depth == 0 else f"certificate {depth} of the {role} chain"
    return f"{where} {what}"


def _service_id(hostname: str):
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return DNS_ID(hostname)
    return IPAddress_ID(hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _VerifyingConnectionCreator:
    """Wraps Twisted's client connection creator and replaces its verification callback.

    The replacement keeps the same checks (OpenSSL's chain verification against the CA, then
    the leaf against the expected name with service_identity) but fails closed on anything
    unexpected and reports the cause through `failVerification`, which Twisted delivers as
    the connection's loss reason.
    """

    def __init__(self, inner: IOpenSSLClientConnectionCreator, hostname: str):
        self._inner = inner
        self._hostname = hostname
        self._service_id = _service_id(hostname)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            self._verify_callback(tlsProtocol),
        )
        return connection

    def _verify_callback(self, tls_protocol):
        protocol_ref = [tls_protocol]  # dropped after the first refusal: no reference cycle
        hostname, service_id = self._hostname, self._service_id

        def refuse(detail: str) -> bool:
            if protocol_ref:
                protocol_ref.pop().failVerification(Failure(ServerCertificateRejected(detail)))
            return False

        def verify(connection, cert, err, depth, ok) -> bool:
            try:
                if not ok:
                    return refuse(describe_x509_error(err, depth))
                if depth != 0:
                    return True
                try:
                    verify_service_identity(extract_patterns(cert), [service_id], [])
                except VerificationError:
                    return refuse(f"server certificate does not name {hostname} (hostname mismatch)")
                except CertificateError:
                    return refuse(
                        f"server certificate has no subjectAltName, cannot match {hostname}"
                    )
                protocol_ref.clear()  # the leaf comes last: no further call needs it
                return True
            except BaseException:  # an exception inside an OpenSSL callback would be lost
                _log.failure("verifying a server certificate")
                return refuse("server certificate could not be verified (internal error)")

        return verify


def peer_certificate(transport) -> x509.Certificate | None:
    """The certificate the peer presented on a TLS transport, or None.

    None on a plain TCP transport, before the handshake has completed, after the connection
    is gone, or when the peer presented no certificate. On a server built with
    `server_tls_options`, a certificate returned here has passed verification.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except (AttributeError, ValueError):
        # Twisted drops the OpenSSL connection once the transport is closed.
        return None
    if cert is None:
        return None
    return cert.to_cryptography()

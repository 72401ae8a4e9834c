"""TLS options for Twisted listeners and clients, built from PEM files.

`server_tls_options` feeds `SSL4ServerEndpoint` / `reactor.listenSSL`; `client_tls_options`
feeds `SSL4ClientEndpoint` / `wrapClientTLS`. Both enforce TLS 1.2 or later and, for TLS 1.2,
only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); TLS 1.3 suites are
OpenSSL's defaults, all of them AEAD. Trust is limited to the CA file given: the system
trust store is never used.

Every file problem raises `TlsConfigError(path, reason)` when the options are built, so a
bad configuration stops the gateway at start-up instead of failing the first handshake.
"""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

# TLS 1.2 suites: forward secrecy (ECDHE) and authenticated encryption only. OpenSSL keeps the
# TLS 1.3 suites apart from this list; they are all AEAD.
CIPHER_STRING = "ECDHE+AESGCM:ECDHE+CHACHA20"
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


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
) -> ssl.CertificateOptions:
    """Options for a TLS listener presenting `cert_path` (leaf first, then any intermediates).

    With `require_client_cert` (the default) a client must present a certificate that chains
    to a CA in `ca_path` and carries clientAuth if it has an extended key usage; otherwise the
    handshake fails. Without it, a client certificate is optional but still verified against
    `ca_path` when one is presented (and `ca_path` may then be None: no client certificates
    are requested at all). Revocation is not checked.
    """
    cert, key, extra = _load_identity(cert_path, key_path)
    ca_certs = None
    if ca_path is not None:
        ca_certs = [_to_openssl(c) for c in _load_certificates(ca_path, "CA certificates")]
    elif require_client_cert:
        raise TlsConfigError("<none>", "a CA file is needed to require client certificates")
    try:
        return ssl.CertificateOptions(
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
    return ssl.optionsForClientTLS(
        hostname, trustRoot=trust, extraCertificateOptions=extra_options
    )


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

"""Tests for gateway.tls: real TLS handshakes over loopback with the development PKI."""
from __future__ import annotations

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, endpoints, reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from gateway import pki
from gateway.tls import (
    Revocations,
    ServerCertificateRejected,
    TlsConfigError,
    client_tls_options,
    load_crl,
    peer_certificate,
    server_tls_options,
)

TIMEOUT = 3  # seconds; a handshake on loopback takes milliseconds


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Two independent development PKIs: `main` (the gateway's) and `other` (a stranger's)."""
    main = tmp_path_factory.mktemp("pki-main")
    other = tmp_path_factory.mktemp("pki-other")
    pki.init_dev_pki(str(main), ["FAC001"])
    pki.init_dev_pki(str(other), ["ROGUE"])

    class Paths:
        def __init__(self, root):
            self.root = root

        def __call__(self, name):
            return str(self.root / name)

    return Paths(main), Paths(other)


class EchoServer(Protocol):
    def dataReceived(self, data):
        self.factory.peers.append(peer_certificate(self.transport))
        self.factory.received.append(data)
        self.transport.write(data)


class EchoFactory(Factory):
    protocol = EchoServer

    def __init__(self):
        self.peers = []
        self.received = []


@implementer(IHandshakeListener)
class Probe(Protocol):
    """Sends b"ping", closes once it is echoed; `done` fires with the connectionLost reason."""

    def __init__(self):
        self.received = b""
        self.handshake_done = False
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"ping")

    def handshakeCompleted(self):
        self.handshake_done = True

    def dataReceived(self, data):
        self.received += data
        if self.received == b"ping":
            self.transport.loseConnection()

    def connectionLost(self, reason):
        # Wrapped in a list: a Failure passed to callback() would errback instead.
        self.done.callback([reason])


@defer.inlineCallbacks
def _listen(options):
    factory = EchoFactory()
    endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    port = yield endpoint.listen(factory)
    return port, factory


@defer.inlineCallbacks
def _exchange(port, client_options):
    """Connect, send b"ping", wait for the connection to end; return (probe, reason)."""
    tcp = endpoints.TCP4ClientEndpoint(
        reactor, "127.0.0.1", port.getHost().port, timeout=TIMEOUT
    )
    probe = Probe()
    yield endpoints.connectProtocol(endpoints.wrapClientTLS(client_options, tcp), probe)
    try:
        [reason] = yield probe.done.addTimeout(TIMEOUT, reactor)
    finally:
        if probe.transport is not None and probe.transport.connected:
            probe.transport.abortConnection()
    return probe, reason


@defer.inlineCallbacks
def _session(server_options, client_options):
    """A server with `server_options`, one client exchange, the server closed again;
    returns (probe, reason, factory)."""
    port, factory = yield _listen(server_options)
    try:
        probe, reason = yield _exchange(port, client_options)
    finally:
        yield port.stopListening()
    return probe, reason, factory


def _server_options(main):
    return server_tls_options(main("gateway.crt"), main("gateway.key"), main("ca.crt"))


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
@pytest_twisted.inlineCallbacks
def test_client_with_dev_certificate_exchanges_bytes(certs, hostname):
    """A client with a facility certificate from the dev CA completes TLS and gets its echo."""
    main, _ = certs
    client = client_tls_options(
        main("ca.crt"), hostname, main("FAC001.crt"), main("FAC001.key")
    )
    probe, reason, factory = yield _session(_server_options(main), client)
    assert probe.handshake_done
    assert probe.received == b"ping"
    assert reason.check(ConnectionDone)
    assert factory.received == [b"ping"]
    assert pki.certificate_common_name(factory.peers[0]) == "FAC001"


@pytest_twisted.inlineCallbacks
def test_client_without_certificate_is_refused(certs):
    """A client that presents no certificate never gets data echoed and loses the connection."""
    main, _ = certs
    client = client_tls_options(main("ca.crt"), "localhost")
    probe, reason, factory = yield _session(_server_options(main), client)
    assert probe.received == b""
    assert factory.received == []
    assert reason.check(SSL.Error)
    assert "certificate required" in str(reason.value)


@pytest_twisted.inlineCallbacks
def test_client_certificate_from_another_ca_is_refused(certs):
    """A client whose certificate was issued by a different CA is refused by the server."""
    main, other = certs
    client = client_tls_options(
        main("ca.crt"), "localhost", other("ROGUE.crt"), other("ROGUE.key")
    )
    probe, reason, factory = yield _session(_server_options(main), client)
    assert probe.received == b""
    assert factory.received == []
    assert reason.check(SSL.Error)
    assert "unknown ca" in str(reason.value)


@pytest_twisted.inlineCallbacks
def test_server_from_another_ca_is_refused_by_client(certs):
    """A client trusting only the dev CA refuses a server whose certificate comes from another CA."""
    main, other = certs
    options = server_tls_options(other("gateway.crt"), other("gateway.key"), main("ca.crt"))
    client = client_tls_options(
        main("ca.crt"), "localhost", main("FAC001.crt"), main("FAC001.key")
    )
    probe, reason, factory = yield _session(options, client)
    assert not probe.handshake_done
    assert probe.received == b""
    assert factory.received == []
    assert reason.check(ServerCertificateRejected)
    assert "issued by a CA other than the configured one" in str(reason.value)


def _write_crl(main, revoked: str) -> str:
    """A CRL of `main`'s CA revoking the certificate of `revoked`; returns its path."""
    import datetime

    from cryptography.hazmat.primitives import hashes

    ca = x509.load_pem_x509_certificate(open(main("ca.crt"), "rb").read())
    key = serialization.load_pem_private_key(open(main("ca.key"), "rb").read(), None)
    serial = x509.load_pem_x509_certificate(open(main(f"{revoked}.crt"), "rb").read()).serial_number
    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
           .next_update(now + datetime.timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                    .revocation_date(now).build())
           .sign(key, hashes.SHA256()))
    path = main("revoked.crl")
    with open(path, "wb") as f:
        f.write(crl.public_bytes(serialization.Encoding.PEM))
    return path


@pytest_twisted.inlineCallbacks
def test_revoked_client_certificate_is_refused_with_the_revoked_alert(certs):
    """With Revocations, a client certificate in the CRL fails the handshake: the client is
    told 'certificate revoked' and the server's protocol never sees a byte."""
    main, _ = certs
    revocations = Revocations(load_crl(_write_crl(main, "FAC001"), main("ca.crt")))
    options = server_tls_options(main("gateway.crt"), main("gateway.key"), main("ca.crt"),
                                 revocations=revocations)
    client = client_tls_options(main("ca.crt"), "localhost", main("FAC001.crt"), main("FAC001.key"))
    probe, reason, factory = yield _session(options, client)
    assert probe.received == b"" and factory.received == []
    assert reason.check(SSL.Error)
    assert "certificate revoked" in str(reason.value)
    # The same certificate is served by options without the CRL.
    probe, reason, factory = yield _session(_server_options(main), client)
    assert probe.received == b"ping"


@implementer(IOpenSSLClientConnectionCreator)
class Tls11OnlyClient:
    """A deliberately outdated client: TLS 1.0-1.1 only, any cipher, with a valid certificate."""

    def __init__(self, cert_path, key_path):
        with open(cert_path, "rb") as f:
            self.cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), password=None)

    def clientConnectionForTLS(self, tlsProtocol):
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
        # OpenSSL 3 refuses TLS 1.1 at its default security level; lower it so the
        # ClientHello really goes out and it is the server that says no.
        ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.use_certificate(self.cert)
        ctx.use_privatekey(self.key)
        connection = SSL.Connection(ctx, None)
        connection.set_app_data(tlsProtocol)
        connection.set_connect_state()
        return connection


@pytest_twisted.inlineCallbacks
def test_client_limited_to_tls_1_1_is_refused(certs):
    """A client offering at most TLS 1.1 fails the handshake with a protocol version error."""
    main, _ = certs
    client = Tls11OnlyClient(main("FAC001.crt"), main("FAC001.key"))
    probe, reason, factory = yield _session(_server_options(main), client)
    assert not probe.handshake_done
    assert probe.received == b""
    assert factory.received == []
    assert reason.check(SSL.Error)
    assert "protocol version" in str(reason.value)


@pytest_twisted.inlineCallbacks
def test_wrong_hostname_is_refused_by_client(certs):
    """A client expecting "wrong.example" refuses the gateway certificate (made for localhost)."""
    main, _ = certs
    client = client_tls_options(
        main("ca.crt"), "wrong.example", main("FAC001.crt"), main("FAC001.key")
    )
    probe, reason, factory = yield _session(_server_options(main), client)
    assert probe.received == b""
    assert factory.received == []
    assert reason.check(ServerCertificateRejected)
    assert "does not name wrong.example" in str(reason.value)


@pytest_twisted.inlineCallbacks
def test_optional_client_certificate(certs):
    """With require_client_cert=False a client without certificate is served and has no peer cert."""
    main, _ = certs
    options = server_tls_options(
        main("gateway.crt"), main("gateway.key"), main("ca.crt"), require_client_cert=False
    )
    client = client_tls_options(main("ca.crt"), "localhost")
    probe, reason, factory = yield _session(options, client)
    assert probe.received == b"ping"
    assert factory.peers == [None]


def test_server_options_restrict_versions_and_ciphers(certs):
    """The server context refuses anything below TLS 1.2 and offers only ECDHE AEAD suites for 1.2."""
    main, _ = certs
    context = _server_options(main).getContext()
    # set_options(0) adds nothing and returns the options in force; it must run before the
    # context is used for a Connection, after which pyOpenSSL forbids changes.
    assert context.set_options(0) & SSL.OP_NO_TLSv1_1
    suites = SSL.Connection(context, None).get_cipher_list()
    tls12 = [s for s in suites if not s.startswith("TLS_")]
    assert tls12
    assert all(s.startswith("ECDHE-") and ("GCM" in s or "CHACHA20" in s) for s in tls12)


def test_peer_certificate_on_plain_transport_is_none():
    """peer_certificate returns None on a transport without TLS."""
    assert peer_certificate(StringTransport()) is None


def test_missing_file_raises_tls_config_error(certs, tmp_path):
    """A missing certificate file raises TlsConfigError naming that path."""
    main, _ = certs
    missing = str(tmp_path / "absent.crt")
    with pytest.raises(TlsConfigError) as info:
        server_tls_options(missing, main("gateway.key"), main("ca.crt"))
    assert info.value.path == missing
    with pytest.raises(TlsConfigError) as info:
        client_tls_options(missing, "localhost")
    assert info.value.path == missing


def test_garbage_and_mismatched_files_raise_tls_config_error(certs, tmp_path):
    """A file that is not PEM, or a key that does not match its certificate, raises TlsConfigError."""
    main, _ = certs
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate\n")
    with pytest.raises(TlsConfigError) as info:
        server_tls_options(main("gateway.crt"), main("gateway.key"), str(garbage))
    assert info.value.path == str(garbage)
    with pytest.raises(TlsConfigError) as info:
        server_tls_options(main("gateway.crt"), str(garbage), main("ca.crt"))
    assert info.value.path == str(garbage)
    with pytest.raises(TlsConfigError) as info:
        server_tls_options(main("gateway.crt"), main("FAC001.key"), main("ca.crt"))
    assert info.value.path == main("FAC001.key")
    with pytest.raises(TlsConfigError):
        client_tls_options(main("ca.crt"), "localhost", main("FAC001.crt"), None)

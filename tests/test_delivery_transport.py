"""Tests for gateway.delivery.transport: real mutual-TLS servers on loopback, a temporary PKI.

Every test leaves the reactor as it found it: the `net` fixture closes the transports, the
server connections and the listening ports, then waits until no new delayed call, reader or
writer remains (and fails the test otherwise).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import time

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server
from zope.interface import implementer

from gateway import pki
from gateway.delivery.outcome import HttpRequest, HttpResponse
from gateway.delivery.transport import HttpsTransport, TransportError
from gateway.tls import TlsConfigError, peer_certificate, server_tls_options

SHORT = 0.5  # seconds: the timeouts under test
SETTLE = 3.0  # seconds allowed for the reactor to get back to its initial state


# -- PKI -------------------------------------------------------------------------------------


class Paths:
    def __init__(self, root):
        self.root = root

    def __call__(self, name: str) -> str:
        return os.path.join(self.root, name)


def _issue_server_cert(ca: Paths, out: Paths, name: str, *, sans, not_before, not_after):
    """A server certificate `name.crt/.key` signed by the CA in `ca`, with the given SANs
    (None: no subjectAltName extension at all) and validity."""
    with open(ca("ca.crt"), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    with open(ca("ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    with open(out(name + ".crt"), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(out(name + ".key"), "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """`main` (the gateway's dev PKI plus odd server certificates) and `other` (a stranger's)."""
    main = Paths(str(tmp_path_factory.mktemp("pki-main")))
    other = Paths(str(tmp_path_factory.mktemp("pki-other")))
    pki.init_dev_pki(main.root, ["FAC001"])
    pki.init_dev_pki(other.root, [])
    now = datetime.datetime.now(datetime.timezone.utc)
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    day = datetime.timedelta(days=1)
    _issue_server_cert(main, main, "expired", sans=loopback,
                       not_before=now - 30 * day, not_after=now - day)
    _issue_server_cert(main, main, "future", sans=loopback,
                       not_before=now + day, not_after=now + 30 * day)
    _issue_server_cert(main, main, "wrong-name", sans=[x509.DNSName("wrong.example")],
                       not_before=now - day, not_after=now + 30 * day)
    _issue_server_cert(main, main, "no-san", sans=None,
                       not_before=now - day, not_after=now + 30 * day)
    return main, other


# -- servers ---------------------------------------------------------------------------------


class CountingSite(server.Site):
    """A Site that counts TCP connections and keeps them, to check reuse and close them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0
        self.channels = []

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        self.connections += 1
        self.channels.append(channel)
        return channel


class Echo(resource.Resource):
    """Records each request; answers 201 with headers and b"ack:" + body."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []
        self.in_flight = 0
        self.max_in_flight = 0

    def render(self, request):
        cert = peer_certificate(request.channel.transport)
        self.seen.append(dict(
            method=request.method,
            uri=request.uri,
            headers={k.lower(): v for k, v in request.requestHeaders.getAllRawHeaders()},
            body=request.content.read(),
            client_cn=pki.certificate_common_name(cert) if cert is not None else None,
        ))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/fhir+json")
        request.setHeader(b"X-Receipt", b"R-42")
        request.responseHeaders.addRawHeader(b"X-Multi", b"a")
        request.responseHeaders.addRawHeader(b"X-Multi", b"b")
        body = b"ack:" + self.seen[-1]["body"]

        def answer():
            self.in_flight -= 1
            request.write(body)
            request.finish()

        # Answer on the next turn so that concurrent requests really overlap on the server.
        reactor.callLater(0.01, answer)
        return server.NOT_DONE_YET


class Big(resource.Resource):
    """A body of `size` bytes, with Content-Length or streamed in chunks without one."""

    isLeaf = True

    def __init__(self, size: int, chunked: bool):
        super().__init__()
        self.size = size
        self.chunked = chunked

    def render(self, request):
        if not self.chunked:
            return b"x" * self.size
        for start in range(0, self.size, 4096):
            request.write(b"x" * min(4096, self.size - start))
        request.finish()
        return server.NOT_DONE_YET


class Scripted(Protocol):
    """Answers the first bytes of a request with `factory.script(transport)`."""

    def connectionMade(self):
        self.factory.protocols.append(self)
        self.answered = False

    def dataReceived(self, data):
        if not self.answered:
            self.answered = True
            self.factory.script(self.transport)


class ScriptedFactory(Factory):
    protocol = Scripted

    def __init__(self, script=None):
        self.script = script or (lambda transport: None)
        self.protocols = []


@implementer(IOpenSSLContextFactory)
class OldProtocolServer:
    """A server context limited to TLS 1.0-1.1 (or, with `tls12_cbc`, TLS 1.2 CBC suites only)."""

    def __init__(self, cert_path, key_path, tls12_cbc=False):
        with open(cert_path, "rb") as f:
            self.cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), password=None)
        self.tls12_cbc = tls12_cbc

    def getContext(self):
        ctx = SSL.Context(SSL.TLS_METHOD)
        if self.tls12_cbc:
            ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
            ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
            ctx.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")
        else:
            ctx.set_min_proto_version(SSL.TLS1_VERSION)
            ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
            # OpenSSL 3 refuses TLS 1.1 at its default security level; lower it so that the
            # server really offers it and it is our client that says no.
            ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        ctx.use_certificate(self.cert)
        ctx.use_privatekey(self.key)
        return ctx


class Net:
    """Servers and transports made by a test, all closed and checked at teardown."""

    def __init__(self, certs):
        self.main, self.other = certs
        self.ports = []
        self.sites = []
        self.factories = []
        self.transports = []
        self.delayed_before = set(reactor.getDelayedCalls())
        self.readers_before = set(reactor.getReaders())
        self.writers_before = set(reactor.getWriters())

    def transport(self, **kwargs) -> HttpsTransport:
        options = dict(connect_timeout=2.0, response_timeout=5.0, max_response_size=1 << 20,
                       max_connections_per_host=4)
        options.update(kwargs)
        t = HttpsTransport(reactor, self.main("ca.crt"), self.main("gateway.crt"),
                           self.main("gateway.key"), **options)
        self.transports.append(t)
        return t

    def tls_options(self, name="gateway", pki_paths=None, client_ca=None):
        paths = pki_paths or self.main
        return server_tls_options(paths(name + ".crt"), paths(name + ".key"),
                                  client_ca or self.main("ca.crt"), require_client_cert=True)

    @defer.inlineCallbacks
    def listen(self, factory, options=None) -> int:
        """Listen on a free loopback port, over TLS when `options` is given; return the port."""
        if options is None:
            endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        else:
            endpoint = endpoints.SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        port = yield endpoint.listen(factory)
        self.ports.append(port)
        if isinstance(factory, CountingSite):
            self.sites.append(factory)
        else:
            self.factories.append(factory)
        return port.getHost().port

    @defer.inlineCallbacks
    def listen_on(self, site, options, interface) -> int:
        port = yield endpoints.SSL4ServerEndpoint(reactor, 0, options,
                                                  interface=interface).listen(site)
        self.ports.append(port)
        self.sites.append(site)
        return port.getHost().port

    @defer.inlineCallbacks
    def site(self, root, options="default"):
        site = CountingSite(root)
        port = yield self.listen(site, self.tls_options() if options == "default" else options)
        return site, port

    @defer.inlineCallbacks
    def close(self):
        for t in self.transports:
            yield t.close()
        for site in self.sites:
            for channel in site.channels:
                # Site wraps each HTTPChannel in a protocol-negotiation proxy.
                inner = getattr(channel, "_channel", channel)
                if inner.transport is not None and inner.transport.connected:
                    inner.transport.abortConnection()
        for factory in self.factories:
            for protocol in factory.protocols:
                if protocol.transport is not None and protocol.transport.connected:
                    protocol.transport.abortConnection()
        for port in self.ports:
            yield port.stopListening()
        deadline = time.monotonic() + SETTLE
        while True:
            leftovers = self.leftovers()
            if not leftovers or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        assert not leftovers, f"reactor not clean after the test: {leftovers}"

    def leftovers(self):
        calls = [c for c in reactor.getDelayedCalls() if c not in self.delayed_before and c.active()]
        # The reactor's own wakers appear when pytest-twisted starts it during the first test.
        readers = [r for r in reactor.getReaders()
                   if r not in self.readers_before and "Waker" not in type(r).__name__]
        writers = [w for w in reactor.getWriters()
                   if w not in self.writers_before and "Waker" not in type(w).__name__]
        return calls + readers + writers


@pytest.fixture
def net(certs):
    n = Net(certs)
    yield n
    pytest_twisted.blockon(n.close())


def _post(port, body=b'{"resourceType":"Bundle"}', path="/fhir", host="127.0.0.1", **headers):
    return HttpRequest("POST", f"https://{host}:{port}{path}", body,
                       {"Content-Type": "application/fhir+json", **headers})


@defer.inlineCallbacks
def _failure(d) -> TransportError:
    """The TransportError a request fails with (the test fails if it succeeds)."""
    try:
        response = yield d
    except TransportError as e:
        return e
    raise AssertionError(f"expected a TransportError, got {response!r}")


@defer.inlineCallbacks
def _free_port():
    """A loopback port nobody listens on (bound then released)."""
    port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
    number = port.getHost().port
    yield port.stopListening()
    return number


# -- exchanges -------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_post_arrives_intact_and_the_answer_comes_back(net):
    """Method, path, query, headers and body reach the peer; code, headers and body return."""
    echo = Echo()
    site, port = yield net.site(echo)
    body = "{\"name\":\"Zineb Aït-Ḥaddou — زينب\"}".encode("utf-8") + bytes(range(256))
    transport = net.transport()
    response = yield transport.request(
        _post(port, body, path="/fhir/Bundle?_format=json", **{"Idempotency-Key": "k-123"}))
    assert isinstance(response, HttpResponse)
    assert response.code == 201
    assert response.body == b"ack:" + body
    assert response.headers["content-type"] == "application/fhir+json"
    assert response.headers["x-receipt"] == "R-42"
    assert response.headers["x-multi"] == "a, b"
    assert all(name == name.lower() for name in response.headers)
    [seen] = echo.seen
    assert seen["method"] == b"POST"
    assert seen["uri"] == b"/fhir/Bundle?_format=json"
    assert seen["body"] == body
    assert seen["headers"][b"idempotency-key"] == [b"k-123"]
    assert seen["headers"][b"content-type"] == [b"application/fhir+json"]
    assert seen["headers"][b"content-length"] == [str(len(body)).encode()]
    assert seen["headers"][b"host"] == [f"127.0.0.1:{port}".encode()]


@pytest_twisted.inlineCallbacks
def test_the_gateway_client_certificate_is_presented(net):
    """The peer sees the gateway's client certificate (CN=gateway) on the connection."""
    echo = Echo()
    _, port = yield net.site(echo)
    yield net.transport().request(_post(port))
    assert echo.seen[0]["client_cn"] == "gateway"


@pytest_twisted.inlineCallbacks
def test_get_without_body_and_localhost_name(net):
    """A GET sends no body; a DNS name (localhost) is checked against the DNS SAN."""
    echo = Echo()
    _, port = yield net.site(echo)
    response = yield net.transport().request(
        HttpRequest("GET", f"https://localhost:{port}/fhir/Patient?identifier=x", b""))
    assert response.code == 201
    assert echo.seen[0]["method"] == b"GET"
    assert echo.seen[0]["body"] == b""
    assert b"content-length" not in echo.seen[0]["headers"]


@pytest_twisted.inlineCallbacks
def test_ipv6_literal_url(net):
    """https://[::1]:port/ connects over IPv6 and matches the ::1 IP SAN."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    echo = Echo()
    site = CountingSite(echo)
    try:
        port = yield net.listen_on(site, net.tls_options(), "::1")
    except Exception as e:  # loopback without IPv6 in this sandbox
        pytest.skip(f"cannot listen on ::1: {e}")
    response = yield net.transport().request(_post(port, host="[::1]"))
    assert response.code == 201
    assert echo.seen[0]["client_cn"] == "gateway"


@pytest_twisted.inlineCallbacks
def test_sequential_requests_reuse_one_connection(net):
    """Keep-alive: ten requests in a row travel over a single TCP (and TLS) connection."""
    echo = Echo()
    site, port = yield net.site(echo)
    transport = net.transport()
    for n in range(10):
        response = yield transport.request(_post(port, b"msg-%d" % n))
        assert response.body == b"ack:msg-%d" % n
    assert site.connections == 1
    assert [s["client_cn"] for s in echo.seen] == ["gateway"] * 10


@pytest_twisted.inlineCallbacks
def test_error_statuses_are_answers_not_transport_errors(net):
    """A 503 with its headers and body comes back as an HttpResponse: judging it is the
    destination adapter's job."""
    factory = ScriptedFactory(lambda t: t.write(
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 4\r\n\r\nbusy"))
    port = yield net.listen(factory, net.tls_options())
    response = yield net.transport().request(_post(port))
    assert (response.code, response.body) == (503, b"busy")
    assert response.headers["retry-after"] == "5"


@pytest_twisted.inlineCallbacks
def test_a_kept_connection_closed_by_the_peer_is_replaced(net):
    """When the peer closes an idle kept connection, the next request opens a new one."""
    echo = Echo()
    site = CountingSite(echo, timeout=0.2)  # the peer drops idle connections after 0.2 s
    port = yield net.listen(site, net.tls_options())
    transport = net.transport()
    yield transport.request(_post(port, b"one"))
    while site.channels[0]._channel.transport.connected:
        yield task.deferLater(reactor, 0.05, lambda: None)
    yield task.deferLater(reactor, 0.05, lambda: None)  # let our side see the close
    response = yield transport.request(_post(port, b"two"))
    assert response.body == b"ack:two"
    assert site.connections == 2


@pytest_twisted.inlineCallbacks
def test_concurrent_requests_are_bounded_per_host(net):
    """Twenty concurrent requests all succeed over at most max_connections_per_host connections."""
    echo = Echo()
    site, port = yield net.site(echo)
    transport = net.transport(max_connections_per_host=3)
    responses = yield defer.gatherResults(
        [transport.request(_post(port, b"c-%d" % n)) for n in range(20)], consumeErrors=True)
    assert sorted(r.body for r in responses) == sorted(b"ack:c-%d" % n for n in range(20))
    assert 1 < site.connections <= 3
    assert echo.max_in_flight <= 3
    # The connections are kept: a second burst opens none.
    yield defer.gatherResults([transport.request(_post(port)) for _ in range(6)],
                              consumeErrors=True)
    assert site.connections <= 3


@pytest_twisted.inlineCallbacks
def test_plain_http_is_refused_by_default_and_allowed_on_request(net):
    """http:// fails with kind "request" before any I/O unless allow_plain_http=True."""
    echo = Echo()
    site, port = yield net.site(echo, options=None)
    request = HttpRequest("POST", f"http://127.0.0.1:{port}/fhir", b"{}")
    e = yield _failure(net.transport().request(request))
    assert e.kind == "request"
    assert "plain http:// refused" in e.reason
    assert site.connections == 0
    response = yield net.transport(allow_plain_http=True).request(request)
    assert response.code == 201
    assert echo.seen[0]["client_cn"] is None


# -- TLS refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("expired", "server certificate expired"),
        ("future", "server certificate not yet valid"),
        ("wrong-name", "server certificate does not name 127.0.0.1 (hostname mismatch)"),
        ("no-san", "server certificate has no subjectAltName, cannot match 127.0.0.1"),
        # A facility's certificate (clientAuth only, no SAN) cannot pose as a server.
        ("FAC001", "server certificate not valid for TLS server use (extended key usage)"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_untrusted_server_certificates_are_refused_with_the_cause(net, name, expected):
    """Expired, not yet valid, wrong name, no SAN, client-only: kind "tls", a reason that says
    which, and the request never reaches the server."""
    echo = Echo()
    site, port = yield net.site(echo, options=net.tls_options(name))
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "tls"
    assert e.reason.startswith(expected), e.reason
    assert f"127.0.0.1:{port}" in e.reason
    assert echo.seen == []


@pytest_twisted.inlineCallbacks
def test_server_certificate_from_a_foreign_ca_is_refused(net):
    """A server whose certificate comes from another CA is not trusted (kind "tls")."""
    echo = Echo()
    _, port = yield net.site(echo, options=net.tls_options("gateway", pki_paths=net.other))
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "tls"
    assert e.reason.startswith("server certificate issued by a CA other than the configured one")
    assert echo.seen == []


@pytest_twisted.inlineCallbacks
def test_server_refusing_our_client_certificate_is_reported_as_such(net):
    """A peer that trusts another CA for clients refuses us: kind "tls", named as a client
    certificate problem rather than a generic error."""
    echo = Echo()
    _, port = yield net.site(echo, options=net.tls_options(client_ca=net.other("ca.crt")))
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "tls"
    assert e.reason.startswith("server refused our client certificate"), e.reason
    assert echo.seen == []


@pytest_twisted.inlineCallbacks
def test_server_limited_to_tls_1_1_is_refused(net):
    """A server that speaks at most TLS 1.1 fails the handshake: no common protocol version."""
    factory = ScriptedFactory()
    port = yield net.listen(factory, OldProtocolServer(net.main("gateway.crt"),
                                                       net.main("gateway.key")))
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "tls"
    assert "no common protocol version" in e.reason, e.reason
    assert not any(p.answered for p in factory.protocols)


@pytest_twisted.inlineCallbacks
def test_server_offering_only_cbc_suites_is_refused(net):
    """A TLS 1.2 server without AEAD suites fails the handshake (kind "tls")."""
    factory = ScriptedFactory()
    port = yield net.listen(factory, OldProtocolServer(net.main("gateway.crt"),
                                                       net.main("gateway.key"), tls12_cbc=True))
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "tls"
    assert e.reason.startswith("TLS handshake failed"), e.reason
    assert not any(p.answered for p in factory.protocols)


@pytest_twisted.inlineCallbacks
def test_plain_http_answer_on_an_https_url_is_a_tls_failure(net):
    """A plain-HTTP server answering our ClientHello with an HTTP error: kind "tls"."""
    factory = ScriptedFactory(lambda t: t.write(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    port = yield net.listen(factory)
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "tls", e.reason
    assert e.reason.startswith("TLS handshake failed: the server did not answer in TLS"), e.reason


# -- connection failures and timeouts --------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_connection_refused_is_a_connect_error(net):
    """Nobody listening on the port: kind "connect", naming host and port."""
    port = yield _free_port()
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "connect"
    assert e.reason == f"connection refused by 127.0.0.1:{port}"


@pytest_twisted.inlineCallbacks
def test_unknown_host_name_is_a_connect_error(net):
    """A name that does not resolve (RFC 6761 .invalid): kind "connect", "cannot resolve"."""
    transport = net.transport(response_timeout=3.0)
    e = yield _failure(transport.request(_post(9444, host="no-such-peer.invalid")))
    if e.kind == "timeout":
        pytest.skip("the resolver of this machine does not answer")
    assert (e.kind, e.reason) == ("connect", "cannot resolve no-such-peer.invalid")


@pytest_twisted.inlineCallbacks
def test_connect_timeout_when_the_peer_drops_our_syn(net):
    """A listener whose accept queue is full drops new SYNs: kind "timeout" after
    connect_timeout, named as a connection that was not established."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):  # fill the accept queue (backlog 0 still admits one or two)
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield task.deferLater(reactor, 0.05, lambda: None)
        transport = net.transport(connect_timeout=0.3, response_timeout=3.0)
        started = time.monotonic()
        e = yield _failure(transport.request(_post(port)))
        elapsed = time.monotonic() - started
    finally:
        for sock in fillers + [listener]:
            sock.close()
    assert e.kind == "timeout", e.reason
    assert e.reason == f"connection to 127.0.0.1:{port} not established within 0.3 s"
    assert 0.3 <= elapsed < 1.5


@pytest_twisted.inlineCallbacks
def test_server_that_accepts_but_never_answers_times_out(net):
    """TCP accepted, TLS handshake never answered: kind "timeout" after response_timeout."""
    factory = ScriptedFactory()
    port = yield net.listen(factory)  # plain TCP: our ClientHello is never answered
    transport = net.transport(response_timeout=SHORT)
    started = time.monotonic()
    e = yield _failure(transport.request(_post(port)))
    elapsed = time.monotonic() - started
    assert e.kind == "timeout"
    assert e.reason == f"no response from 127.0.0.1:{port} within 0.5 s"
    assert SHORT <= elapsed < SHORT + 1.0  # generous: the machine is shared


@pytest_twisted.inlineCallbacks
def test_server_that_never_sends_the_response_head_times_out(net):
    """TLS up, request read, no status line ever: kind "timeout"."""
    factory = ScriptedFactory(lambda t: None)
    port = yield net.listen(factory, net.tls_options())
    started = time.monotonic()
    e = yield _failure(net.transport(response_timeout=SHORT).request(_post(port)))
    assert e.kind == "timeout"
    assert time.monotonic() - started < SHORT + 1.0
    assert [p.answered for p in factory.protocols] == [True]


@pytest_twisted.inlineCallbacks
def test_slow_body_times_out(net):
    """Headers arrive but the body stalls: kind "timeout" naming the body, within the limit."""
    factory = ScriptedFactory(
        lambda t: t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"))
    port = yield net.listen(factory, net.tls_options())
    started = time.monotonic()
    e = yield _failure(net.transport(response_timeout=SHORT).request(_post(port)))
    assert e.kind == "timeout"
    assert e.reason == f"response body from 127.0.0.1:{port} not complete within 0.5 s"
    assert time.monotonic() - started < SHORT + 1.0


@pytest.mark.parametrize("opening, drip", [
    (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"X"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n"),
], ids=["head", "body"])
@pytest_twisted.inlineCallbacks
def test_a_peer_trickling_its_answer_byte_by_byte_times_out(net, opening, drip):
    """A little every 50 ms for ever (a header line that never ends, or a chunked body that
    never ends, each well under its size limit): the response timeout bounds the whole
    exchange, not the silence between two reads."""
    loops = []

    def script(t):
        t.write(opening)
        loops.append(task.LoopingCall(t.write, drip))
        loops[-1].start(0.05)

    port = yield net.listen(ScriptedFactory(script), net.tls_options())
    started = time.monotonic()
    try:
        e = yield _failure(net.transport(response_timeout=SHORT).request(_post(port)))
    finally:
        for loop in loops:
            loop.stop()
    assert e.kind == "timeout"
    assert time.monotonic() - started < SHORT + 1.0


@pytest_twisted.inlineCallbacks
def test_a_timed_out_connection_is_not_reused(net):
    """After a timeout the next request opens a fresh connection and succeeds."""
    calls = []

    def script(t):
        calls.append(t)
        if len(calls) == 1:
            return  # first request: silence
        t.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    factory = ScriptedFactory(script)
    port = yield net.listen(factory, net.tls_options())
    transport = net.transport(response_timeout=SHORT)
    e = yield _failure(transport.request(_post(port)))
    assert e.kind == "timeout"
    response = yield transport.request(_post(port))
    assert response.code == 204 and response.body == b""
    assert len(factory.protocols) == 2


# -- protocol violations ---------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
@pytest_twisted.inlineCallbacks
def test_oversize_body_is_a_protocol_error(net, chunked):
    """A body over max_response_size is refused (declared length or streamed) and the
    connection dropped; a body exactly at the limit is fine."""
    limit = 64 * 1024
    _, port = yield net.site(Big(limit + 1, chunked))
    transport = net.transport(max_response_size=limit)
    e = yield _failure(transport.request(_post(port)))
    assert e.kind == "protocol"
    if chunked:
        assert e.reason == f"response body from 127.0.0.1:{port} exceeds the {limit}-byte limit"
    else:
        assert e.reason == (f"response from 127.0.0.1:{port} declares {limit + 1} bytes, "
                            f"over the {limit}-byte limit")
    _, port2 = yield net.site(Big(limit, chunked))
    response = yield transport.request(_post(port2))
    assert len(response.body) == limit


@pytest_twisted.inlineCallbacks
def test_connection_closed_mid_response_is_a_protocol_error(net):
    """The server sends half the declared body then closes: kind "protocol"."""
    def script(t):
        t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        t.loseConnection()

    port = yield net.listen(ScriptedFactory(script), net.tls_options())
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "protocol"
    assert e.reason == f"connection to 127.0.0.1:{port} lost mid-response"


@pytest_twisted.inlineCallbacks
def test_connection_closed_before_any_response_is_a_protocol_error(net):
    """The server reads the request and closes without a word: kind "protocol"."""
    port = yield net.listen(ScriptedFactory(lambda t: t.loseConnection()), net.tls_options())
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "protocol"
    assert e.reason == f"connection to 127.0.0.1:{port} closed before a response"


@pytest_twisted.inlineCallbacks
def test_garbage_instead_of_http_is_a_protocol_error(net):
    """A reply that is not HTTP: kind "protocol", "malformed HTTP response"."""
    port = yield net.listen(ScriptedFactory(lambda t: t.write(b"SPAM SPAM SPAM\r\n\r\n")),
                            net.tls_options())
    e = yield _failure(net.transport().request(_post(port)))
    assert e.kind == "protocol"
    assert e.reason == f"malformed HTTP response from 127.0.0.1:{port}"


@pytest_twisted.inlineCallbacks
def test_body_delimited_by_close_is_accepted(net):
    """A response without length or chunking ends at the close (allowed by HTTP/1.1)."""
    def script(t):
        t.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        t.loseConnection()

    port = yield net.listen(ScriptedFactory(script), net.tls_options())
    response = yield net.transport().request(_post(port))
    assert (response.code, response.body) == (200, b"all of it")


@pytest_twisted.inlineCallbacks
def test_body_delimited_by_a_close_without_close_notify_is_a_lost_response(net):
    """A close-delimited body whose connection ends without TLS close_notify (a reset, a bare
    TCP close: anyone on the path can cut it there) may be incomplete (RFC 9112, 9.8): it used
    to be read as the whole answer (a cut 200 became a dead letter, "body is not JSON"); it is
    a connection lost mid-response, retried."""
    def script(t):
        t.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"resourceType":"Bund')
        reactor.callLater(0.1, t.abortConnection)  # after the bytes are out

    port = yield net.listen(ScriptedFactory(script), net.tls_options())
    e = yield _failure(net.transport().request(_post(port)))
    assert (e.kind, e.reason) == ("protocol", f"connection to 127.0.0.1:{port} lost mid-response")


# -- requests refused before any I/O ---------------------------------------------------------


@pytest.mark.parametrize(
    "request_, expected",
    [
        (HttpRequest("POST", "ftp://127.0.0.1/x", b""), "unsupported URL scheme 'ftp'"),
        (HttpRequest("POST", "127.0.0.1:9444/fhir", b""), "unsupported URL scheme"),
        (HttpRequest("POST", "https:///fhir", b""), "URL has no host"),
        (HttpRequest("POST", "https://127.0.0.1:99999/", b""), "URL has an invalid port"),
        (HttpRequest("POST", "https://u:p@127.0.0.1/", b""), "credentials in the URL are refused"),
        (HttpRequest("POST", "https://127.0.0.1/a b", b""), "URL contains whitespace"),
        (HttpRequest("POST", "https://127.0.0.1/\r\nX: y", b""), "URL contains whitespace"),
        (HttpRequest("POST", "https://127.0.0.1/é", b""), "URL must be ASCII"),
        (HttpRequest("PO ST", "https://127.0.0.1/", b""), "invalid HTTP method"),
        (HttpRequest("POST", "https://127.0.0.1/", "text"), "request body must be bytes"),
        (HttpRequest("POST", "https://127.0.0.1/", b"", {"Content-Length": "5"}),
         "header content-length is set by the transport"),
        (HttpRequest("POST", "https://127.0.0.1/", b"", {"Transfer-Encoding": "chunked"}),
         "header transfer-encoding is set by the transport"),
        (HttpRequest("POST", "https://127.0.0.1/", b"", {"Host": "evil"}),
         "header host is set by the transport"),
        (HttpRequest("POST", "https://127.0.0.1/", b"", {"X-Ok": "a\r\nX-Injected: 1"}),
         "invalid value for request header x-ok"),
        (HttpRequest("POST", "https://127.0.0.1/", b"", {"Bad Name": "v"}),
         "invalid request header name"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_malformed_requests_are_refused_before_any_io(net, request_, expected):
    """Bad URLs, methods, bodies and headers fail at once with kind "request"."""
    e = yield _failure(net.transport().request(request_))
    assert e.kind == "request"
    assert e.reason.startswith(expected), e.reason
    assert "/fhir" not in e.reason  # reasons never echo the path (patient data may be there)


@pytest_twisted.inlineCallbacks
def test_close_cancels_requests_in_flight_and_refuses_new_ones(net):
    """close() fails a pending request with CancelledError; later requests get kind "request"."""
    factory = ScriptedFactory(lambda t: None)
    port = yield net.listen(factory, net.tls_options())
    transport = net.transport()
    pending = transport.request(_post(port))
    while not any(p.answered for p in factory.protocols):  # the request reached the server
        yield task.deferLater(reactor, 0.01, lambda: None)
    yield transport.close()
    with pytest.raises(defer.CancelledError):
        yield pending
    e = yield _failure(transport.request(_post(port)))
    assert (e.kind, e.reason) == ("request", "transport closed")


# -- construction ----------------------------------------------------------------------------


def test_bad_tls_files_fail_at_construction(certs, tmp_path):
    """A missing CA or a key that does not match the certificate stops start-up."""
    main, _ = certs
    with pytest.raises(TlsConfigError):
        HttpsTransport(reactor, str(tmp_path / "absent.crt"), main("gateway.crt"),
                       main("gateway.key"))
    with pytest.raises(TlsConfigError):
        HttpsTransport(reactor, main("ca.crt"), main("gateway.crt"), main("expired.key"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(connect_timeout=0), "connect_timeout must be a positive number"),
        (dict(response_timeout=-1), "response_timeout must be a positive number"),
        (dict(idle_timeout="30"), "idle_timeout must be a positive number"),
        (dict(max_response_size=0), "max_response_size must be a whole number of at least 1"),
        (dict(max_connections_per_host=2.5), "max_connections_per_host must be a whole number"),
    ],
)
def test_bad_limits_raise_value_errors(certs, kwargs, message):
    """Timeouts and limits are checked when the transport is built."""
    main, _ = certs
    with pytest.raises(ValueError, match=message):
        HttpsTransport(reactor, main("ca.crt"), main("gateway.crt"), main("gateway.key"),
                       **kwargs)

"""Outbound HTTPS for deliveries: mutual TLS, persistent connections, timeouts, size limits.

`HttpsTransport.request(HttpRequest)` returns a Deferred that fires with the peer's whole
`HttpResponse` (whatever its status code: judging it is the destination adapter's job) or
fails with `TransportError(reason, kind)`. `kind` is a closed set:

- `connect`: the peer could not be reached (connection refused, name not resolved, no route);
- `tls`: the TLS handshake failed: server certificate not trusted (expired, another CA,
  hostname mismatch, ...; the reason says which), no common protocol version or cipher
  suite, our client certificate refused by the server, or our own TLS files unusable;
- `timeout`: the TCP connection was not established within `connect_timeout`, or the whole
  exchange (handshake, request, response head and body) took longer than `response_timeout`;
- `protocol`: the peer broke HTTP: unparseable response, a status code outside 100-599, a
  response head over `MAX_RESPONSE_HEAD`, body over `max_response_size`, connection closed
  before or in the middle of the response;
- `request`: the request was refused before any I/O (plain `http://` without
  `allow_plain_http`, a malformed URL or header, a framing header the transport owns, the
  transport closed). A retry cannot fix these; every other kind is worth retrying.

Reasons are short, name at most the peer's host and port, and never carry the URL path,
query, headers or body (they are logged and shown to operators; patient data stays out).

TLS: the client presents the gateway's own certificate and trusts only the configured CA
(`gateway.tls.client_tls_options`, TLS 1.2+, ECDHE+AEAD), whose verification fails closed and
says *why* ("expired", "issued by another CA", "does not name 127.0.0.1"); a failure arrives
here as `ServerCertificateRejected` and becomes kind `tls`.

Connections: one `HTTPConnectionPool` with keep-alive; at most `max_connections_per_host`
requests in flight per (scheme, host, port), the others wait their turn (the timeout clock
starts when a request gets its slot), and as many idle connections are kept for reuse, for
`idle_timeout` seconds. A POST that meets a kept connection the peer has just closed is not
replayed here (Twisted replays only bodiless idempotent requests): it fails with kind
`protocol` and the outbox retries it with the same idempotency key.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (  # no public alias: parse error, client protocol, parser states
    HEADER,
    STATUS,
    HTTP11ClientProtocol,
    ParseError,
    ResponseFailed,
)
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import (  # no public alias: the body's decoder, its chunk error
    _IdentityTransferDecoder,
    _MalformedChunkedDataError,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from gateway.delivery.outcome import HttpRequest, HttpResponse
from gateway.tls import ServerCertificateRejected, TlsConfigError, client_tls_options

TransportErrorKind = Literal["connect", "tls", "timeout", "protocol", "request"]

_log = Logger()

# RFC 9110 token: method and header names.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Framing and connection management belong to the transport: a caller's value would clash
# with the one Twisted writes (two Content-Length headers is a request-smuggling classic).
_MANAGED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
     "trailer", "upgrade", "proxy-connection"}
)
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "TRACE"})
# Status line and headers of a response (with any 1xx before it). Twisted's client bounds one
# line (16 KiB) but keeps every header line it is sent: a peer streaming header lines would
# fill the memory until the response timeout. Servers cap a request head at 8 to 64 KiB.
MAX_RESPONSE_HEAD = 64 * 1024


class TransportError(Exception):
    """A request that got no usable HTTP response; `kind` says what went wrong (module doc)."""

    def __init__(self, reason: str, kind: TransportErrorKind):
        super().__init__(reason, kind)
        self.reason = reason
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


class ResponseTooLarge(Exception):
    """The response body exceeds the configured limit."""

    def __init__(self, limit: int, declared: int | None = None):
        super().__init__(limit, declared)
        self.limit = limit
        self.declared = declared


class ResponseHeadTooLarge(Exception):
    """The response's status line and headers exceed MAX_RESPONSE_HEAD bytes."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.limit = limit


# -- TLS: per-host client options (gateway.tls verifies and names the failure) -------------


@implementer(IPolicyForHTTPS)
class MutualTlsPolicy:
    """Client TLS options per host: trust only `ca_path`, present `cert_path`/`key_path`.

    Options are built once per host name and cached (building reads and parses the PEM
    files and creates an OpenSSL context). Host names may be IP addresses, matched against
    the certificate's IP subjectAltName.
    """

    def __init__(self, ca_path: str, cert_path: str, key_path: str):
        self._ca_path = ca_path
        self._cert_path = cert_path
        self._key_path = key_path
        self._cache: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creator_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        creator = self._cache.get(hostname)
        if creator is None:
            creator = client_tls_options(self._ca_path, hostname, self._cert_path, self._key_path)
            self._cache[hostname] = creator
        return creator

    def creatorForNetloc(self, hostname: bytes, port: int):
        host = hostname.decode("ascii") if isinstance(hostname, bytes) else hostname
        return self.creator_for(host.strip("[]"))  # an IPv6 literal may keep its brackets


@implementer(IAgentEndpointFactory)
class _EndpointCache:
    """One endpoint per (scheme, host, port), built once.

    Twisted's default factory builds a new endpoint (IDNA checks, TLS policy look-up) for
    every request, even when the pool then hands out a kept connection; endpoints are
    stateless recipes for new connections, so one per destination is enough.
    """

    def __init__(self, reactor, policy: MutualTlsPolicy, connect_timeout: float):
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            host = uri.host.decode("ascii").strip("[]")
            endpoint = HostnameEndpoint(self._reactor, host, uri.port,
                                        timeout=self._connect_timeout)
            if uri.scheme == b"https":
                endpoint = wrapClientTLS(self._policy.creator_for(host), endpoint)
            self._endpoints[key] = endpoint
        return endpoint


# -- bodies ----------------------------------------------------------------------------------


@implementer(IBodyProducer)
class _BytesProducer:
    """The whole request body at once, with its length (so Content-Length is sent)."""

    def __init__(self, body: bytes):
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _LimitedBodyReader(Protocol):
    """Collects a response body up to `limit` bytes, dropping the connection beyond it.

    `finished` fires with the body, or fails with ResponseTooLarge or the connection's loss
    reason; cancelling it drops the connection. A body delimited by the connection's close
    (no length, not chunked) ends with PotentialDataLoss, which HTTP/1.1 allows: accepted
    (after a clean TLS close only: see _HeadLimitedProtocol.connectionLost).
    """

    def __init__(self, limit: int, declared_length):
        self._limit = limit
        self._declared = None if declared_length is UNKNOWN_LENGTH else declared_length
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self.finished: defer.Deferred[bytes] = defer.Deferred(self._cancel)

    def connectionMade(self):
        if self._declared is not None and self._declared > self._limit:
            self._fail(ResponseTooLarge(self._limit, self._declared))

    def dataReceived(self, data: bytes):
        if self._done:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._fail(ResponseTooLarge(self._limit))
            return
        self._chunks.append(data)

    def connectionLost(self, reason=None):
        if self._done:
            return
        self._done = True
        if reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)
        self._chunks = []

    def _fail(self, exc: Exception):
        self._done = True
        self._chunks = []
        self.finished.errback(Failure(exc))
        self._drop_connection()

    def _cancel(self, _deferred):
        if not self._done:
            self._done = True
            self._chunks = []
            self._drop_connection()
        # Deferred.cancel then fails `finished` with CancelledError.

    def _drop_connection(self):
        # The response's transport is a proxy without abortConnection; stopProducing closes
        # the underlying TCP connection, which the pool then forgets.
        if self.transport is not None:
            self.transport.stopProducing()


# -- connections: Twisted's HTTP/1.1 client with a bounded response head -------------------


class _HeadLimitedProtocol(HTTP11ClientProtocol):
    """A client connection that gives up on a response whose head grows past
    MAX_RESPONSE_HEAD bytes (counted per request, 1xx responses included); it may overshoot
    by the one read that crosses the limit."""

    _head = 0

    def request(self, request):
        self._head = 0
        return super().request(request)

    def dataReceived(self, data: bytes):
        parser = self._parser
        if parser is not None and parser.state in (STATUS, HEADER):
            if self._head > MAX_RESPONSE_HEAD:
                self._giveUp(Failure(ResponseHeadTooLarge(MAX_RESPONSE_HEAD)))
                return
            self._head += len(data)
        super().dataReceived(data)

    def connectionLost(self, reason=None):
        # A body delimited by the close (no length, not chunked) is whole only when the peer
        # closed TLS properly (close_notify: ConnectionDone); a bare TCP close or reset may
        # have cut it (RFC 9112, 9.8). Twisted reports both as PotentialDataLoss, so a cut
        # 200 would be read as a complete (malformed) answer: a length the decoder cannot
        # have reached makes it report the loss instead.
        decoder = getattr(self._parser, "bodyDecoder", None)
        if isinstance(decoder, _IdentityTransferDecoder) and decoder.contentLength is None \
                and reason is not None and not reason.check(error.ConnectionDone):
            decoder.contentLength = -1
        super().connectionLost(reason)


class _HeadLimitedFactory(_HTTP11ClientFactory):
    def buildProtocol(self, addr):
        return _HeadLimitedProtocol(self._quiescentCallback)


class _ConnectionPool(HTTPConnectionPool):
    _factory = _HeadLimitedFactory  # the pool's (private) hook for its connections' protocol


# -- the transport ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    url: bytes

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class _Attempt:
    """Mutable state of one request: for the timeout and for naming the stage that failed."""

    def __init__(self, target: _Target):
        self.target = target
        self.stage = "queued"  # queued → waiting (connect, TLS, request, head) → body
        self.timed_out = False
        self.deferred: defer.Deferred | None = None
        self.timer = None

    def expire(self):
        self.timer = None
        self.timed_out = True
        if self.deferred is not None:
            self.deferred.cancel()


_BAD_URL_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f]")


@functools.lru_cache(maxsize=512)  # deliveries go to a handful of URLs, again and again
def _parse_target(url: str, allow_plain_http: bool) -> _Target:
    """Check an absolute URL and split it; raise TransportError (kind "request") if unusable."""
    if _BAD_URL_CHARACTERS.search(url):
        raise TransportError("URL contains whitespace or control characters", "request")
    try:
        url_bytes = url.encode("ascii")
    except UnicodeEncodeError:
        raise TransportError("URL must be ASCII (percent-encode the rest)", "request") from None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "http":
        if not allow_plain_http:
            raise TransportError(
                "plain http:// refused: deliveries go over https:// "
                "(allow_plain_http is for local tests only)",
                "request",
            )
    elif scheme != "https":
        raise TransportError(f"unsupported URL scheme {scheme or '(none)'!r}", "request")
    if parts.username is not None or parts.password is not None:
        raise TransportError("credentials in the URL are refused", "request")
    host = parts.hostname
    if not host:
        raise TransportError("URL has no host", "request")
    try:
        port = parts.port
    except ValueError:
        raise TransportError("URL has an invalid port", "request") from None
    if port is None:
        port = 443 if scheme == "https" else 80
    if parts.fragment:
        url_bytes = url_bytes.split(b"#", 1)[0]  # fragments are never sent
    return _Target(scheme, host, port, url_bytes)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, not {value!r}")


class HttpsTransport:
    """Sends `HttpRequest`s over mutual TLS with a keep-alive pool (see the module doc)."""

    def __init__(
        self,
        reactor,
        ca_path: str,
        cert_path: str,
        key_path: str,
        *,
        connect_timeout: float = 5.0,
        response_timeout: float = 30.0,
        max_response_size: int = 10 * 1024 * 1024,
        max_connections_per_host: int = 8,
        idle_timeout: float = 30.0,
        allow_plain_http: bool = False,
    ):
        """Raise ValueError for a bad limit and TlsConfigError for unusable PEM files.

        The TLS files are loaded once here so that a bad configuration stops the gateway at
        start-up rather than failing every delivery.
        """
        _positive("connect_timeout", connect_timeout)
        _positive("response_timeout", response_timeout)
        _positive("idle_timeout", idle_timeout)
        for name, value in (("max_response_size", max_response_size),
                            ("max_connections_per_host", max_connections_per_host)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, not {value!r}")
        self._reactor = reactor
        self.connect_timeout = float(connect_timeout)
        self.response_timeout = float(response_timeout)
        self.max_response_size = max_response_size
        self.max_connections_per_host = max_connections_per_host
        self.allow_plain_http = allow_plain_http
        self._policy = MutualTlsPolicy(ca_path, cert_path, key_path)
        self._policy.creator_for("localhost")  # load and check the files now
        self._pool = _ConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections_per_host
        self._pool.cachedConnectionTimeout = float(idle_timeout)
        self._agent = Agent.usingEndpointFactory(
            reactor, _EndpointCache(reactor, self._policy, self.connect_timeout), pool=self._pool
        )
        self._slots: dict[tuple[str, str, int], defer.DeferredSemaphore] = {}
        self._in_flight: set[defer.Deferred] = set()
        self._closed = False

    # -- public API --------------------------------------------------------------------------

    def request(self, req: HttpRequest) -> defer.Deferred[HttpResponse]:
        """Send `req` and read the whole answer; fails with TransportError (module doc).

        Cancelling the returned Deferred drops the request's connection and fails it with
        CancelledError.
        """
        if self._closed:
            return defer.fail(TransportError("transport closed", "request"))
        try:
            target = self._target(req.url)
            method, headers, producer = self._prepare(req)
        except TransportError as e:
            return defer.fail(e)
        attempt = _Attempt(target)
        d = self._send(attempt, method, headers, producer)
        attempt.deferred = d
        if not d.called:
            self._in_flight.add(d)
            d.addBoth(self._forget, d)
        return d

    def close(self) -> defer.Deferred[None]:
        """Cancel requests still in flight and close the kept connections.

        Fires once the kept connections are closed; later requests fail with kind `request`.
        """
        self._closed = True
        for d in list(self._in_flight):
            d.cancel()
        return self._pool.closeCachedConnections()

    # -- checks before any I/O ---------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        if not isinstance(url, str):
            raise TransportError("URL must be text", "request")
        return _parse_target(url, self.allow_plain_http)

    def _prepare(self, req: HttpRequest):
        method = req.method
        if not isinstance(method, str) or not _TOKEN.match(method):
            raise TransportError("invalid HTTP method", "request")
        if not isinstance(req.body, (bytes, bytearray, memoryview)):
            raise TransportError("request body must be bytes", "request")
        headers = Headers()
        for name, value in req.headers.items():
            if not isinstance(name, str) or not _TOKEN.match(name):
                raise TransportError("invalid request header name", "request")
            if name.lower() in _MANAGED_HEADERS:
                raise TransportError(f"header {name.lower()} is set by the transport", "request")
            if not isinstance(value, str) or any(c in value for c in "\r\n\x00"):
                raise TransportError(f"invalid value for request header {name.lower()}", "request")
            headers.addRawHeader(name.encode("ascii"), value.encode("utf-8"))
        body = req.body if isinstance(req.body, bytes) else bytes(req.body)
        upper = method.upper()
        producer = None if (not body and upper in _BODYLESS_METHODS) else _BytesProducer(body)
        return method.encode("ascii"), headers, producer

    # -- the exchange ------------------------------------------------------------------------

    def _slot(self, target: _Target) -> defer.DeferredSemaphore:
        key = (target.scheme, target.host, target.port)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = defer.DeferredSemaphore(self.max_connections_per_host)
        return slot

    @defer.inlineCallbacks
    def _send(self, attempt: _Attempt, method: bytes, headers: Headers, producer):
        slot = self._slot(attempt.target)
        yield slot.acquire()
        try:
            attempt.stage = "waiting"
            attempt.timer = self._reactor.callLater(self.response_timeout, attempt.expire)
            try:
                response = yield self._agent.request(method, attempt.target.url, headers, producer)
                attempt.stage = "body"
                reader = _LimitedBodyReader(self.max_response_size, response.length)
                response.deliverBody(reader)
                body = yield reader.finished
            except Exception as e:
                raise self._classify(e, attempt) from None
        finally:
            if attempt.timer is not None and attempt.timer.active():
                attempt.timer.cancel()
            attempt.timer = None
            slot.release()
        if not 100 <= response.code <= 599:  # Twisted takes any integer ("99999999999", "-1")
            raise TransportError(f"malformed HTTP response from {attempt.target.netloc} "
                                 "(status code outside 100-599)", "protocol")
        return HttpResponse(code=response.code, headers=_lower_headers(response.headers), body=body)

    def _forget(self, result, d):
        self._in_flight.discard(d)
        return result

    # -- failures ----------------------------------------------------------------------------

    def _classify(self, exc: BaseException, attempt: _Attempt) -> BaseException:
        """Turn whatever Twisted raised into a TransportError (or let a cancellation through)."""
        netloc = attempt.target.netloc
        causes = _root_causes(exc)
        if attempt.timed_out:
            if attempt.stage == "body":
                return TransportError(
                    f"response body from {netloc} not complete within "
                    f"{self.response_timeout:g} s", "timeout")
            return TransportError(
                f"no response from {netloc} within {self.response_timeout:g} s", "timeout")
        for cause in causes:
            if isinstance(cause, ServerCertificateRejected):
                return TransportError(f"{cause.detail} ({netloc})", "tls")
        for cause in causes:
            if isinstance(cause, SSL.Error):
                return TransportError(f"{_describe_ssl_error(cause)} ({netloc})", "tls")
            if isinstance(cause, VerificationError):  # should not happen: we verify ourselves
                return TransportError(
                    f"server certificate does not match the host name ({netloc})", "tls")
            if isinstance(cause, TlsConfigError):
                return TransportError(f"client TLS configuration unusable: {cause}", "tls")
        for cause in causes:
            if isinstance(cause, ResponseTooLarge):
                return TransportError(_describe_too_large(cause, netloc), "protocol")
            if isinstance(cause, ResponseHeadTooLarge):
                return TransportError(f"response head from {netloc} exceeds the "
                                      f"{cause.limit}-byte limit", "protocol")
            if isinstance(cause, (error.TimeoutError, error.TCPTimedOutError)):
                return TransportError(
                    f"connection to {netloc} not established within "
                    f"{self.connect_timeout:g} s", "timeout")
            if isinstance(cause, error.ConnectionRefusedError):
                return TransportError(f"connection refused by {netloc}", "connect")
            if isinstance(cause, error.DNSLookupError):
                return TransportError(f"cannot resolve {attempt.target.host}", "connect")
            if isinstance(cause, error.NoRouteError):
                return TransportError(f"no route to {netloc}", "connect")
            if isinstance(cause, error.ConnectError):
                return TransportError(
                    f"cannot connect to {netloc} ({type(cause).__name__})", "connect")
            # Twisted's response parser raises ValueError (a bad or repeated Content-Length, a
            # header line without a colon), KeyError (an unknown Transfer-Encoding) and its
            # chunk error besides ParseError: all of them the peer breaking HTTP.
            if isinstance(cause, ParseError) or (isinstance(exc, ResponseFailed) and isinstance(
                    cause, (ValueError, KeyError, _MalformedChunkedDataError))):
                return TransportError(f"malformed HTTP response from {netloc}", "protocol")
        for cause in causes:
            if isinstance(cause, defer.CancelledError):
                return exc if isinstance(exc, defer.CancelledError) else defer.CancelledError()
        if attempt.stage == "body":
            return TransportError(f"connection to {netloc} lost mid-response", "protocol")
        if any(isinstance(c, (error.ConnectionDone, error.ConnectionLost)) for c in causes):
            return TransportError(
                f"connection to {netloc} closed before a response", "protocol")
        _log.debug("unclassified transport failure: {error!r}", error=exc)
        return TransportError(
            f"request to {netloc} failed ({type(causes[0]).__name__})", "protocol")


def _root_causes(exc: BaseException) -> list[BaseException]:
    """The leaf exceptions inside Twisted's wrapper exceptions (which carry `reasons`)."""
    reasons = getattr(exc, "reasons", None)
    if not isinstance(reasons, list) or not reasons:
        return [exc]
    found: list[BaseException] = []
    for reason in reasons:
        value = reason.value if isinstance(reason, Failure) else reason
        if isinstance(value, BaseException):
            found.extend(_root_causes(value))
    return found or [exc]


def _ssl_reasons(exc: SSL.Error) -> list[str]:
    """OpenSSL's reason strings from an SSL.Error (its args hold (lib, func, reason) tuples)."""
    reasons: list[str] = []
    for arg in exc.args:
        if isinstance(arg, list):
            reasons += [str(item[2]) for item in arg if isinstance(item, tuple) and len(item) == 3]
        elif isinstance(arg, str):
            reasons.append(arg)
    return [r for r in reasons if r]


def _describe_ssl_error(exc: SSL.Error) -> str:
    reasons = _ssl_reasons(exc)
    text = "; ".join(reasons).lower()
    shown = "; ".join(reasons) or type(exc).__name__
    if "certificate verify failed" in text:
        return f"server certificate not trusted ({shown})"
    if any(k in text for k in ("wrong version number", "packet length too long", "http request")):
        return f"TLS handshake failed: the server did not answer in TLS, is it plain HTTP? ({shown})"
    if any(k in text for k in ("unsupported protocol", "protocol version", "version too low")):
        return f"TLS handshake failed: no common protocol version, TLS 1.2 or newer required ({shown})"
    if "no shared cipher" in text or "no cipher" in text:
        return f"TLS handshake failed: no common cipher suite ({shown})"
    if any(k in text for k in ("alert certificate required", "alert bad certificate",
                               "alert unknown ca", "alert certificate expired",
                               "alert certificate unknown", "alert certificate revoked",
                               "alert unsupported certificate", "alert access denied")):
        return f"server refused our client certificate ({shown})"
    return f"TLS handshake failed ({shown})"


def _describe_too_large(exc: ResponseTooLarge, netloc: str) -> str:
    if exc.declared is not None:
        return (f"response from {netloc} declares {exc.declared} bytes, "
                f"over the {exc.limit}-byte limit")
    return f"response body from {netloc} exceeds the {exc.limit}-byte limit"


def _lower_headers(headers: Headers) -> dict[str, str]:
    """Header names lower-cased; repeated headers joined with ", " (RFC 9110 §5.3)."""
    result: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        key = name.decode("latin-1").lower()
        value = ", ".join(v.decode("latin-1") for v in values)
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


__all__ = [
    "HttpsTransport",
    "MutualTlsPolicy",
    "ResponseTooLarge",
    "ServerCertificateRejected",
    "TransportError",
    "TransportErrorKind",
]

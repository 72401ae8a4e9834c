"""The HTTPS door (listeners.https, 8443 in development): REST under /v1/, SOAP under /soap/,
on Twisted web over mutual TLS.

Every request:
1. the caller is the facility its client certificate names (FacilityRegistry.by_certificate,
   looked up once per connection); TLS has already checked that the certificate chains to
   pki.ca. A certificate that names no facility: 401 (a soap:Client fault on SOAP);
2. its route (404/405 problem otherwise), and the API operation the route needs: a
   facility whose type lacks it gets 403 (a soap:Client fault on SOAP); a route that needs
   none (ANY_FACILITY) is open to every facility the certificate names;
3. POSTs with an Idempotency-Key go through the idempotency guard;
4. answers are JSON, problem+json (RFC 9457) for every error, SOAP envelopes on /soap/.

Limits: a body over `max_request_size` is answered 413 as soon as its length is known
(Content-Length, or while a chunked body arrives), without reading the rest; a malformed
request head is a 400 problem, one over Twisted's limits (a line of 16 KiB, 500 headers or
16 KiB of headers) a 431 problem, a request not arrived whole `read_timeout` after its first
byte a 408 problem (a client that trickles bytes keeps resetting the idle timeout), the
connection closed in each case; a request not
answered within `request_timeout` gets a 503 problem (the work goes on, and with an
Idempotency-Key its answer is kept for the retry); a connection idle for `idle_timeout` is
closed. Refusals (401, 403, 413) are logged (facility, operation, reason; never content) and
stored in api_refusals for the audit.
"""
from __future__ import annotations

import inspect
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import parse_qs

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web import http, resource, server

from gateway.config import GatewayConfig, HttpsListenerConfig, SenderConfig
from gateway.doors.api import (ANY_FACILITY, ApiRequest, ApiResponse, Problem, Route, json_response,
                               problem_response)
from gateway.doors.idempotency import IdempotencyGuard, idempotency_key
from gateway.doors.ingest_bridge import IngestBridge
from gateway.doors.openapi import openapi_document
from gateway.doors.rest import RestOperations, media_type
from gateway.doors.router import RouteTable
from gateway.doors.schemas import openapi_spec
from gateway.doors.soap import SoapDoor, Unauthorized, fault_answer
from gateway.doors.store import Refusal, record_refusal
from gateway.events import Event, EventBus
from gateway.facilities import FacilityRegistry, RegistryRef
from gateway.http_deadline import RequestDeadline
from gateway.http_request import Request
from gateway.tls import peer_certificate, server_tls_options
from gateway.tls_watch import watch_handshakes

log = logging.getLogger(__name__)

LINGER = 2.0  # seconds an oversize request's connection drains before it is closed
_UNSET = object()


@dataclass(frozen=True)
class Identity:
    facility: SenderConfig | None
    subject: str | None  # the certificate's subject (RFC 4514), for refusals
    revoked: bool = False  # the certificate is in the CRL in force (since a reload)

    @property
    def refusal(self) -> str:
        """Why a caller without a facility is refused (kept and logged)."""
        return "certificate revoked" if self.revoked else "certificate names no facility"

    @property
    def told(self) -> str:
        """What the caller is told of it."""
        return ("the client certificate is revoked (CRL)" if self.revoked
                else "the client certificate names no facility of the registry")


class DoorRequest(Request):
    """A request whose body is refused (413) as soon as it is known to exceed the limit."""

    max_body = 16 * 1024 * 1024
    oversize = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self._refuse_oversize(length)
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.oversize:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse_oversize(None)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self.oversize:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def process(self):
        # RFC 9112 3.2: an HTTP/1.1 request names its Host once (two are how a request gets read
        # for one host by a proxy and another here; the WSDL's address is the Host's).
        hosts = self.requestHeaders.getRawHeaders(b"host") or []
        if self.clientproto != b"HTTP/1.0" and (len(hosts) != 1 or b"," in hosts[0]):
            self.channel._refuse_head(400, "an HTTP/1.1 request has exactly one Host header "
                                           f"(RFC 9112 section 3.2): {'several' if hosts else 'none'} here")
            return
        # RFC 9112 3.2.2: the absolute-form (https://host/v1/...) is accepted, its authority
        # standing for the Host; Twisted took the whole URI for the path (a 404).
        scheme, sep, rest = self.uri.partition(b"://")
        if sep and scheme.lower() in (b"http", b"https"):
            cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
            authority, target = rest[:cut], rest[cut:]
            self.uri = target if target.startswith(b"/") else b"/" + target
            self.path = self.uri.split(b"?", 1)[0]
            self.requestHeaders.setRawHeaders(b"host", [authority])
        super().process()

    def _handleStar(self):
        # `GET *` got Twisted's bare 405: the door answers it (a 404 problem, as any path
        # outside /v1/ and /soap/); OPTIONS * keeps Twisted's empty 200.
        if self.method == b"OPTIONS":
            super()._handleStar()
        else:
            self.render(self.site.resource)

    def _refuse_oversize(self, length: int | None) -> None:
        self.oversize = True
        self.content = io.BytesIO()  # let go of what was kept
        channel = self.channel
        self.requestHeaders.removeHeader(b"expect")  # no 100 Continue after the refusal
        door: HttpsDoor = channel.site.resource
        body = door.oversize(self, length)
        channel.transport.write(_closing_answer(413, b"Content Too Large", body))
        # Read and drop what the client still sends, then close: closing with unread data
        # would reset the connection before the client has read the 413. The channel closes
        # it as on its idle timeout (TLS close, then an abort if the peer holds on):
        # transport.loseConnection alone never closes under TLS while the channel is the
        # transport's producer, and a client that waits would keep the connection forever.
        channel.dataReceived = lambda data: None
        channel.setTimeout(None)
        hang_up = door.reactor.callLater(LINGER, channel.timeoutConnection)
        self.notifyFinish().addErrback(lambda _: hang_up.active() and hang_up.cancel())


def _closing_answer(status: int, phrase: bytes, problem: bytes) -> bytes:
    """A whole HTTP/1.1 answer carrying `problem` (problem+json), written on the transport
    itself (outside Twisted's request cycle) before the connection is closed."""
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, phrase, len(problem)) + problem)


# status: (reason phrase, problem slug, problem title)
_HEAD_REFUSALS = {400: (b"Bad Request", "bad-request", "Malformed request"),
                  408: (b"Request Timeout", "request-timeout", "Request not received in time"),
                  431: (b"Request Header Fields Too Large", "request-header-too-large",
                        "Request header too large")}


class DoorChannel(RequestDeadline, http.HTTPChannel):
    """HTTP/1.1 whose refusals of a malformed, oversize or late request head are problem+json,
    as every other answer of the door. Twisted answers them with a bare 400, and a line over
    MAX_LENGTH with nothing at all (LineReceiver closes through the transport, which under TLS
    waits for the channel, its producer: the client waited for the idle timeout)."""

    _refused = False

    @property
    def read_timeout(self) -> float:
        return self.site.resource.listener.read_timeout

    def too_slow(self) -> None:
        self._refuse_head(408, f"the request did not arrive whole within {self.read_timeout:g} s")

    def lineLengthExceeded(self, line):
        self._refuse_head(431, f"a request or header line exceeds {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self):  # Twisted's answer to every malformed head
        if self._receivedHeaderCount > self.maxHeaders or self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse_head(431, f"the request's headers exceed {self.maxHeaders} lines or "
                                   f"{self.totalHeadersSize} bytes")
        else:
            self._refuse_head(400, "the request line, a header, the Content-Length or the chunked "
                                   "encoding is malformed")

    def _refuse_head(self, status: int, reason: str) -> None:
        if self._refused:
            return
        self._refused = True
        door: HttpsDoor = self.site.resource
        log.warning("%s refused %d from %s: %s", door.listener.name, status, _address(self.transport), reason)
        phrase, slug, title = _HEAD_REFUSALS[status]
        body = json.dumps(Problem(status, slug, title, reason).as_dict()).encode("utf-8")
        self.transport.write(_closing_answer(status, phrase, body))
        # Nothing more is read; the idle timeout, no longer reset, aborts a peer that holds on.
        self.dataReceived = lambda data: None
        self.loseConnection()


class DoorSite(server.Site):
    """The door's site: no access log (paths carry ids; refusals are logged by the door).
    HTTP/1.1 only (DoorChannel; the door offers no HTTP/2)."""

    protocol = DoorChannel

    def log(self, request) -> None:
        pass


class HttpsDoor(resource.Resource):
    isLeaf = True

    def __init__(self, listener: HttpsListenerConfig, registry: Callable[[], FacilityRegistry],
                 database, routes: Iterable[Route], soap: SoapDoor | None, reactor,
                 now: Callable[[], float] = time.time, events: EventBus | None = None,
                 certificates=None, revocations=None, node: str = "", watch=None):
        super().__init__()
        self.listener = listener
        # (transport, facility id) -> None: the identity service closes the connection at a
        # reload that revokes or rebinds its certificate (IdentityService.watch).
        self.watch = watch
        self.revocations = revocations  # gateway.tls.Revocations: the CRL in force, or None
        self.events = events if events is not None else EventBus()
        self.certificates = certificates  # a CertificateSightings, or None
        self.registry = registry
        self.database = database
        self.reactor = reactor
        self.now = now
        routes = list(routes)
        self.openapi: dict | None = None
        routes.append(Route("GET", "/v1/openapi.json", ANY_FACILITY, self._openapi, openapi_spec()))
        self.routes = RouteTable(routes)
        self.openapi = openapi_document(self.routes.routes)
        self.soap = soap
        self.guard = IdempotencyGuard(database, max(60.0, 4 * listener.request_timeout), now, node)

    # -- identity and refusals ---------------------------------------------------------------

    def identify(self, request) -> Identity:
        """The caller, from its certificate; cached on the connection (one look-up each)
        until a reload replaces the registry or the CRL: a kept-alive connection then answers
        to the new ones at its next request, as MLLP does at its next message."""
        channel = request.channel
        registry = self.registry()
        crl = self.revocations.crl if self.revocations is not None else None
        cached = getattr(channel, "_door_identity", _UNSET)
        if cached is not _UNSET and cached[0] is registry and cached[1] is crl:
            return cached[2]
        cert = peer_certificate(request.transport)
        revoked = cert is not None and crl is not None and crl.revokes(cert)
        facility = registry.by_certificate(cert) if cert is not None and not revoked else None
        subject = cert.subject.rfc4514_string() if cert is not None else None
        identity = Identity(facility, subject, revoked)
        channel._door_identity = (registry, crl, identity)
        if facility is not None:
            if self.certificates is not None:
                self.certificates.seen(facility.id, cert, self.listener.name)
            if self.watch is not None:
                self.watch(request.transport, facility.id)
        return identity

    def refuse(self, request, identity: Identity, door: str, operation: str | None, status: int,
               reason: str) -> defer.Deferred:
        """Log and keep a refusal (never content: who, what, why); fires once stored (a
        storage failure is logged, not raised: the caller is refused all the same)."""
        peer = _peer(request)
        facility = identity.facility.id if identity.facility else None
        log.warning("%s refused %d on %s: facility %s, certificate %s, operation %s: %s",
                    self.listener.name, status, door, facility or "-", identity.subject or "-",
                    operation or "-", reason)
        refusal = Refusal(datetime.fromtimestamp(self.now(), timezone.utc), self.listener.name, peer,
                          facility, identity.subject, door, operation, status, reason)
        self.events.emit(Event("door.refused", facility or "unknown", outcome="refused",
                               source=peer, facility=facility, listener=self.listener.name,
                               detail={"door": door, "status": status, "operation": operation,
                                       "certificate": identity.subject}))
        d = self.database.run_write(record_refusal, refusal)
        d.addErrback(lambda failure: log.error("refusal not stored: %s", failure.value))
        return d

    def oversize(self, request: DoorRequest, length: int | None) -> bytes:
        """The 413 body for an oversize request, refused before its body is read."""
        channel = request.channel
        path = getattr(channel, "_path", b"").split(b"?", 1)[0].decode("utf-8", "replace")
        identity = self.identify(request)
        size = f"{length} bytes" if length is not None else "a chunked body"
        reason = f"request body ({size}) exceeds the limit of {request.max_body} bytes"
        self.refuse(request, identity, "soap" if path.startswith("/soap") else "rest", path, 413, reason)
        problem = Problem(413, "request-too-large", "Request too large", reason,
                          limit=request.max_body)
        return json.dumps(problem.as_dict(path)).encode("utf-8")

    # -- dispatch ----------------------------------------------------------------------------

    def render(self, request):
        deadline = self.reactor.callLater(self.listener.request_timeout, self._timed_out, request)
        request.notifyFinish().addBoth(lambda _: deadline.active() and deadline.cancel())
        d = defer.ensureDeferred(self._serve(request))
        d.addErrback(self._crashed, request)
        return server.NOT_DONE_YET

    async def _serve(self, request) -> None:
        path = request.path.decode("utf-8", "replace")
        identity = self.identify(request)
        if path == "/soap" or path.startswith("/soap/"):
            await self._serve_soap(request, path, identity)
        else:
            self._send(request, await self._serve_rest(request, path, identity))

    async def _serve_rest(self, request, path: str, identity: Identity) -> ApiResponse:
        method = request.method.decode("ascii", "replace")
        try:
            if identity.facility is None:
                await self.refuse(request, identity, "rest", path, 401, identity.refusal)
                raise Problem(401, "unknown-certificate", "Unknown certificate", identity.told)
            if not path.startswith("/v1/"):
                raise Problem(404, "not-found", "Not found", "the REST API is under /v1/")
            match = self.routes.match(method, path)
            route = match.route
            facility = identity.facility
            if route.operation is not ANY_FACILITY and not self.registry().may(facility, route.operation):
                await self.refuse(request, identity, "rest", route.operation, 403,
                            f"operation not allowed for facility type {facility.type}")
                raise Problem(403, "operation-not-allowed", "Operation not allowed",
                              f"a facility of type {facility.type} may not call {route.operation}")
            api_request = self._api_request(request, method, path, match.params, facility)
            key = idempotency_key(api_request) if method == "POST" else None
            if key is not None:
                return await self.guard.run(api_request, key, route.operation,
                                            lambda: _call(route.handler, api_request))
            return await _call(route.handler, api_request)
        except Problem as problem:
            return problem_response(problem, path)

    async def _serve_soap(self, request, path: str, identity: Identity) -> None:
        method = request.method
        if self.soap is None:
            return self._send(request, problem_response(Problem(404, "not-found", "Not found",
                                                                "no SOAP service here"), path))
        if method in (b"GET", b"HEAD"):
            name = "wsdl" if path in ("/soap", "/soap/") and _asks_for_wsdl(request.uri) else path[len("/soap/"):]
            document = self.soap.document(name, (request.getHeader(b"host") or b"").decode("ascii", "replace"))
            if identity.facility is None:
                await self.refuse(request, identity, "soap", "contract", 401, identity.refusal)
                return self._send(request, problem_response(Problem(
                    401, "unknown-certificate", "Unknown certificate", identity.told), path))
            if document is None:
                return self._send(request, problem_response(Problem(
                    404, "not-found", "Not found", "the WSDL is at /soap/?wsdl"), path))
            return self._send(request, ApiResponse(200, document, "text/xml; charset=utf-8"))
        if path not in ("/soap", "/soap/"):
            return self._send(request, problem_response(Problem(404, "not-found", "Not found",
                                                                "SOAP requests go to /soap/"), path))
        if method != b"POST":
            return self._send(request, problem_response(Problem(
                405, "method-not-allowed", "Method not allowed", "POST SOAP 1.1 requests to /soap/",
                allow=["GET", "POST"]), path))
        from adapters.soap.gateway.envelope import client_fault

        if identity.facility is None:
            await self.refuse(request, identity, "soap", None, 401, identity.refusal)
            return self._send_soap(request, fault_answer(client_fault("UNKNOWN_CERTIFICATE", identity.told)))
        media, parameters = media_type((request.getHeader(b"content-type") or b"").decode("latin-1"))
        if media != "text/xml":
            return self._send_soap(request, fault_answer(client_fault(
                "INVALID_ENVELOPE", "Content-Type text/xml expected (SOAP 1.1)")))
        facility = identity.facility
        registry = self.registry()
        try:
            operation, element = self.soap.operation_of(_body(request),
                                                        lambda right: registry.may(facility, right),
                                                        parameters.get("charset"))
        except Unauthorized as refused:
            await self.refuse(request, identity, "soap", refused.right, 403,
                        f"{refused.operation} not allowed for facility type {facility.type}")
            return self._send_soap(request, fault_answer(refused.fault))
        except Exception as fault:  # SoapFault, from parsing or the schema
            from adapters.soap.gateway.envelope import SoapFault

            if not isinstance(fault, SoapFault):
                raise
            return self._send_soap(request, fault_answer(fault))
        answer = await self.soap.handle(operation, element, facility, _peer(request))
        self._send_soap(request, answer)

    def _api_request(self, request, method: str, path: str, params: dict[str, str],
                     facility: SenderConfig) -> ApiRequest:
        headers: dict[str, str] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1").lower()] = ", ".join(v.decode("latin-1") for v in values)
        query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        return ApiRequest(method, path, params,
                          {k: tuple(v) for k, v in parse_qs(query, keep_blank_values=True).items()},
                          headers, _body(request), facility, _peer(request), _request_id(request))

    async def _openapi(self, request: ApiRequest) -> ApiResponse:
        return json_response(200, self.openapi)

    # -- answers -----------------------------------------------------------------------------

    def _send(self, request, response: ApiResponse) -> None:
        if request.finished or getattr(request, "_disconnected", False) or request.channel is None:
            return  # timed out or gone; the work is done (and kept, with an Idempotency-Key)
        request.setResponseCode(response.status)
        request.setHeader(b"content-type", response.content_type.encode("latin-1"))
        request.setHeader(b"content-length", str(len(response.body)).encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-request-id", _request_id(request).encode())
        for name, value in response.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()

    def _send_soap(self, request, answer) -> None:
        self._send(request, ApiResponse(answer.status, answer.body, answer.content_type))

    def _timed_out(self, request) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        path = request.path.decode("utf-8", "replace")
        log.warning("%s: %s %s not answered within %.0f s; told to send it again", self.listener.name,
                    request.method.decode("ascii", "replace"), path, self.listener.request_timeout)
        if path.startswith("/soap"):  # a SOAP client reads a fault, not a problem
            from adapters.soap.gateway.envelope import server_fault

            return self._send_soap(request, fault_answer(server_fault(
                "REQUEST_TIMEOUT", f"the request was not answered within "
                                   f"{self.listener.request_timeout:g} s; send it again later")))
        self._send(request, problem_response(Problem(
            503, "request-timeout", "Not answered in time",
            f"the request was not answered within {self.listener.request_timeout:g} s; send it again "
            "(with the same Idempotency-Key, to get its answer once ready)", retry_after=5), path))

    def _crashed(self, failure, request) -> None:
        log.error("%s: internal error answering %s %s: %s", self.listener.name,
                  request.method.decode("ascii", "replace"), request.path.decode("utf-8", "replace"),
                  failure.getErrorMessage())
        log.debug("internal error", exc_info=(failure.type, failure.value, failure.getTracebackObject()))
        path = request.path.decode("utf-8", "replace")
        if path.startswith("/soap"):
            from adapters.soap.gateway.envelope import server_fault

            self._send_soap(request, fault_answer(server_fault("INTERNAL_ERROR", "internal error")))
        else:
            self._send(request, problem_response(Problem(500, "internal-error", "Internal error",
                                                         "the gateway failed to answer; see its log"), path))


async def _call(handler, api_request: ApiRequest) -> ApiResponse:
    result = handler(api_request)
    if inspect.isawaitable(result):
        result = await result
    return result


def _body(request) -> bytes:
    request.content.seek(0)
    return request.content.read()


def _peer(request) -> str:
    return _address(request.transport)


def _address(transport) -> str:
    peer = transport.getPeer() if transport is not None else None
    return f"{peer.host}:{peer.port}" if peer is not None and hasattr(peer, "host") else "?"


def _request_id(request) -> str:
    request_id = getattr(request, "_door_request_id", None)
    if request_id is None:
        request_id = request._door_request_id = uuid.uuid4().hex[:16]
    return request_id


def _asks_for_wsdl(uri: bytes) -> bool:
    query = uri.partition(b"?")[2].lower()
    return any(item.partition(b"=")[0] == b"wsdl" for item in query.split(b"&"))


# -- the service -----------------------------------------------------------------------------

def door_site(listener: HttpsListenerConfig, door: HttpsDoor) -> DoorSite:
    request_class = type("DoorRequestLimited", (DoorRequest,), {"max_body": listener.max_request_size})
    site = DoorSite(door, requestFactory=request_class, timeout=listener.idle_timeout,
                    parsePOSTFormSubmission=False)
    site.displayTracebacks = False
    return site


def build_door(config: GatewayConfig, listener: HttpsListenerConfig, store_service, translation,
               registry: RegistryRef, reactor, extra_routes: Iterable[Route] = (),
               events: EventBus | None = None, certificates=None, revocations=None,
               watch=None) -> HttpsDoor:
    """The door's resource for one listener: its own ingest pipeline (the shared Inspector's
    rules with the certificate's facility, the store's writer and ACK builder, the translation
    service), the REST operations, the extra routes and SOAP."""
    from gateway.ingest.inspect import IngestPolicy, Inspector
    from gateway.ingest.pipeline import IngestPipeline

    inspector = Inspector(store_service.builder, IngestPolicy(
        listener.name, accept_unknown_senders=False, registry=registry))
    events = events if events is not None else EventBus()
    pipeline = IngestPipeline(inspector, store_service.writer, translation=translation, events=events)
    bridge = IngestBridge(listener.name, pipeline, store_service.writer, store_service.database,
                          translation, events=events)
    rest = RestOperations(bridge, store_service.database, listener.name, events=events)
    soap = SoapDoor(bridge, listener.name)
    return HttpsDoor(listener, lambda: registry.current, store_service.database,
                     rest.routes() + list(extra_routes), soap, reactor, events=events,
                     certificates=certificates, revocations=revocations, node=config.node_name,
                     watch=watch)


def https_door_services(config: GatewayConfig, store_service, translation_service, identity,
                        reactor, extra_routes: Iterable[Route] = (), events: EventBus | None = None) -> list:
    """One listening service per `listeners.https` entry, named after it, over mutual TLS
    with the identity service's CRL; add them to the tree after the store, identity and
    translation services (listeners last). Refusals and failed TLS handshakes are told to
    `events`."""
    events = events if events is not None else EventBus()
    extra_routes = list(extra_routes)
    services = []
    for listener in config.https:
        door = build_door(config, listener, store_service, translation_service, identity.registry,
                          reactor, extra_routes, events=events,
                          certificates=getattr(identity, "certificates", None),
                          revocations=identity.revocations, watch=getattr(identity, "watch", None))
        options = server_tls_options(config.pki.cert, config.pki.key, config.pki.ca,
                                     revocations=identity.revocations, name=f"https {listener.name}")
        endpoint = SSL4ServerEndpoint(reactor, listener.port, options, backlog=512,
                                      interface=listener.interface)
        service = StreamServerEndpointService(
            endpoint, watch_handshakes(door_site(listener, door), listener.name, events))
        service.setName(listener.name)
        service._raiseSynchronously = True  # a port in use fails `gateway run` at once
        services.append(service)
    return services

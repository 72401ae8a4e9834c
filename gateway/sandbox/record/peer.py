"""The shared-record peer on Twisted web: routes, the client-certificate gate, the size limit,
fault injection, and the database thread.

Routes (under `/fhir`):
- `POST /fhir`: a transaction Bundle (`Idempotency-Key` header honoured, see api.py);
- `GET /fhir/metadata`: the CapabilityStatement;
- `GET /fhir/Type/id`: read; `GET /fhir/Type?...`: search (search.py); HEAD wherever GET;
  other methods a 405 with Allow;
- `/_sandbox/faults`: the fault plan (gateway/sandbox/faults.py), never itself faulted;
- `GET /_sandbox/stats`: how many transaction requests came and what became of them (api.py).
  Injected errors are OperationOutcomes (issue code `transient` for 5xx, `invalid` for 400);
  `soap_fault`, which has no REST meaning, answers like `http_500`.

Every request must come over TLS from a client whose certificate's subject CN is in
`allowed_clients`; others get a 403 OperationOutcome (the TLS layer has already refused
clients without a certificate from the CA). A body larger than `max_request_bytes` is answered
with 413 as soon as that is known (from Content-Length or while receiving chunks) and the
connection is closed. All database work runs in one dedicated thread, in arrival order.
The access log is off: URLs carry identifiers.
"""
from __future__ import annotations

import gc
import io

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server

from gateway import strict_json
from gateway.pki import certificate_common_name
from gateway.sandbox.faults import Faults
from gateway.sandbox.record import json_codec
from gateway.sandbox.record.api import FHIR_JSON, Answer, RecordApi, error_answer
from gateway.sandbox.record.operation_outcome import FhirError
from gateway.sandbox.record.store import RecordStore
from gateway.sandbox.web import FaultControl, with_faults
from gateway.tls import peer_certificate

MAX_REQUEST_BYTES = 32 * 1024 * 1024
log = Logger()


class SizeLimitedRequest(server.Request):
    """A request whose body may not exceed `max_body_bytes`; beyond it, a 413 and a close."""

    max_body_bytes = MAX_REQUEST_BYTES
    body_too_large = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body_bytes:
            self._refuse_oversize()
            return
        # In memory whatever the size (Twisted would spill bodies over 100 kB to a temporary
        # file): the limit bounds it, and batched transactions are often that large.
        self.content = io.BytesIO()

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._refuse_oversize()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self.body_too_large:  # answered already; the connection is closing
            return
        super().requestReceived(command, path, version)

    def _refuse_oversize(self) -> None:
        # Answered before the body is read, as the request never reaches a resource; the
        # previous request on this connection is complete, since Twisted does not pipeline.
        self.body_too_large = True
        self.content = None
        body = error_answer(FhirError.single(
            413, "too-costly", f"request body larger than {self.max_body_bytes} bytes")).body
        self.channel.transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: " + FHIR_JSON.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body)
        self.channel.loseConnection()


class _QuietSite(server.Site):
    def log(self, request) -> None:
        """No access log: request URLs carry patient identifiers."""


def _client_name(request) -> str | None:
    """The subject CN of the client's certificate, read once per connection."""
    channel = request.channel
    name = getattr(channel, "_record_client_name", False)
    if name is False:
        cert = peer_certificate(getattr(channel, "transport", None) or request.transport)
        name = certificate_common_name(cert) if cert is not None else None
        channel._record_client_name = name
    return name


def _write(request, answer: Answer) -> None:
    if getattr(request, "_record_gone", False):
        return
    request.setResponseCode(answer.status)
    request.setHeader(b"content-type", FHIR_JSON.encode())
    # The whole answer is at hand: its length, rather than chunked encoding, which the
    # gateway's client decodes chunk by chunk in Python (a batch's answer is 100 KB and more).
    request.setHeader(b"content-length", str(len(answer.body)).encode("ascii"))
    for name, value in answer.headers.items():
        request.setHeader(name.encode(), value.encode())
    request.write(answer.body)
    request.finish()


def _forbidden(request, allowed_clients: frozenset[str]) -> bytes | None:
    """The 403 body when the client may not use the peer, else None."""
    name = _client_name(request)
    if name is not None and name in allowed_clients:
        return None
    request.setResponseCode(403)
    request.setHeader(b"content-type", FHIR_JSON.encode())
    who = "no client certificate" if name is None else f"client {name[:64]!r} is not allowed"
    log.info("sandbox record refused a client: {who}", who=who)
    return error_answer(FhirError.single(403, "forbidden", who)).body


def _method_not_allowed(allow: str, diagnostics: str = "method not allowed") -> Answer:
    """RFC 9110: a 405 names the methods the target supports (Allow)."""
    answer = error_answer(FhirError.single(405, "not-supported", diagnostics))
    return Answer(answer.status, answer.body, {"allow": allow})


def _fault_answer(request, status: int) -> None:
    code = "transient" if status >= 500 else "invalid"
    _write(request, error_answer(FhirError.single(status, code, "sandbox fault injected")))


class _GuardedFaultControl(FaultControl):
    def __init__(self, faults: Faults, allowed_clients: frozenset[str]):
        super().__init__(faults)
        self.allowed_clients = allowed_clients

    def render(self, request):
        refusal = _forbidden(request, self.allowed_clients)
        return refusal if refusal is not None else super().render(request)


class _Stats(resource.Resource):
    isLeaf = True

    def __init__(self, peer: RecordPeer):
        super().__init__()
        self.peer = peer

    def render_GET(self, request):
        refusal = _forbidden(request, self.peer.allowed_clients)
        if refusal is not None:
            return refusal
        request.setHeader(b"content-type", b"application/json")
        return json_codec.dumps_bytes(self.peer.api.counts.as_dict())


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(404)
        request.setHeader(b"content-type", FHIR_JSON.encode())
        return error_answer(FhirError.single(404, "not-found", "no such endpoint")).body


class _Root(resource.Resource):
    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


class FhirEndpoint(resource.Resource):
    """Everything under `/fhir`."""

    isLeaf = True

    def __init__(self, peer: RecordPeer):
        super().__init__()
        self.peer = peer

    def render(self, request):
        refusal = _forbidden(request, self.peer.allowed_clients)
        if refusal is not None:
            return refusal
        request._record_gone = False
        request.notifyFinish().addErrback(lambda _: setattr(request, "_record_gone", True))
        faults = self.peer.faults
        if faults.plan.mode == "soap_fault":  # CNSS's server fault is a 500 in REST terms
            faults.take()
            _fault_answer(request, 500)
            return server.NOT_DONE_YET
        return with_faults(request, faults, self.peer.reactor,
                           lambda: self._answer(request), lambda code: _fault_answer(request, code))

    def _answer(self, request) -> None:
        path = [segment.decode("utf-8", "replace") for segment in request.postpath]
        while path and path[-1] == "":
            path.pop()
        method = request.method
        try:
            call = self._route(request, method, path)
        except FhirError as error:
            _write(request, error_answer(error))
            return
        if isinstance(call, Answer):
            _write(request, call)
            return
        self.peer.run(call).addCallbacks(
            lambda answer: _write(request, answer),
            lambda failure: self._failed(request, failure))

    def _route(self, request, method: bytes, path: list[str]):
        """An Answer now, or a function of no arguments to run in the database thread."""
        api = self.peer.api
        if path == [] and method == b"POST":
            content_type = (request.getHeader(b"content-type") or b"application/fhir+json").decode("latin-1")
            if content_type.split(";")[0].strip().lower() not in ("application/fhir+json", "application/json"):
                raise FhirError.single(415, "not-supported", "send application/fhir+json")
            charset = strict_json.foreign_charset(content_type)
            if charset is not None:
                raise FhirError.single(415, "not-supported", f"charset {charset!r}: send the JSON as UTF-8")
            key = request.getHeader(b"idempotency-key")
            if key is not None:
                key = key.decode("latin-1")
                if not 0 < len(key) <= 200 or not key.isprintable() or not key.isascii():
                    raise FhirError.single(400, "value", "Idempotency-Key must be 1 to 200 printable ASCII characters")
            request.content.seek(0)
            body = request.content.read()
            return lambda: api.transaction(body, key)
        if method not in (b"GET", b"HEAD", b"POST"):
            return _method_not_allowed("POST" if path == [] else "GET, HEAD")
        if method in (b"GET", b"HEAD"):  # HEAD: Twisted sends the headers of GET, no body
            if path == ["metadata"]:
                return RecordApi.capability_statement()
            if len(path) == 1:
                try:
                    query = request.uri.partition(b"?")[2].decode("ascii")
                except UnicodeDecodeError:
                    raise FhirError.single(400, "invalid", "percent-encode the query string") from None
                return lambda: api.search(path[0], query, self._base_url(request))
            if len(path) == 2:
                return lambda: api.read(path[0], path[1])
        if method == b"POST" and len(path) == 2 and path[1] == "_search":
            return _method_not_allowed("GET, HEAD", "search with GET")
        raise FhirError.single(404, "not-found", "no such endpoint")

    @staticmethod
    def _base_url(request) -> str:
        host = request.getHeader(b"host") or b"127.0.0.1"
        return f"https://{host.decode('latin-1')}/fhir"

    @staticmethod
    def _failed(request, failure) -> None:
        log.failure("sandbox record failed to answer a request", failure)
        _write(request, error_answer(FhirError.single(500, "exception", "internal error")))


class RecordPeer:
    """The shared-record peer: a store file, its database thread and the web resource tree.

    `site()` is what a TLS listener serves (see `listen_record_peer`); `close()` stops the
    database thread and closes the store (stop listening first).
    """

    def __init__(self, store_path: str, *, reactor, allowed_clients=frozenset({"gateway"}),
                 validate: bool = True, max_request_bytes: int = MAX_REQUEST_BYTES):
        self.reactor = reactor
        self.allowed_clients = frozenset(allowed_clients)
        self.max_request_bytes = max_request_bytes
        self.faults = Faults()
        self.store = RecordStore(store_path)
        self.api = RecordApi(self.store, validate=validate)
        # What is loaded by now (Twisted, the FHIR models: a few hundred thousand objects) lives
        # as long as the process: out of the garbage collector's sight, its collections no
        # longer scan it each time a batched transaction allocates its thousands of resources
        # (parsing one such transaction took four times as long with it).
        gc.collect()
        gc.freeze()
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="sandbox-record-db")
        self._pool.start()
        self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._stop_pool)
        self._closed = False

    def run(self, function):
        """Run `function()` in the database thread; a Deferred of its result."""
        return deferToThreadPool(self.reactor, self._pool, function)

    def resource(self) -> resource.Resource:
        root = _Root()
        root.putChild(b"fhir", FhirEndpoint(self))
        sandbox = resource.Resource()
        sandbox.putChild(b"faults", _GuardedFaultControl(self.faults, self.allowed_clients))
        sandbox.putChild(b"stats", _Stats(self))
        root.putChild(b"_sandbox", sandbox)
        return root

    def site(self) -> server.Site:
        request_factory = type("RecordRequest", (SizeLimitedRequest,), {"max_body_bytes": self.max_request_bytes})
        site = _QuietSite(self.resource(), requestFactory=request_factory)
        site.noisy = False
        return site

    def close(self):
        """A Deferred that fires once queued database work is done and the store is closed."""
        if self._closed:
            from twisted.internet.defer import succeed
            return succeed(None)
        self._closed = True
        self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
        done = self.run(self.store.close)
        done.addBoth(lambda result: (self._stop_pool(), result)[1])
        return done

    def _stop_pool(self) -> None:
        if self._pool.started:
            self._pool.stop()


def listen_record_peer(reactor, peer: RecordPeer, port: int, interface: str, tls_options):
    """Serve `peer` over TLS on `interface:port` (0: a free port); the IListeningPort."""
    return reactor.listenSSL(port, peer.site(), tls_options, interface=interface)

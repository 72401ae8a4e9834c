"""The CNSS peer on Twisted web: mutual TLS, one resource tree, work in a one-thread pool.

Paths: `POST /` SOAP 1.1 requests (service.py); `GET /?wsdl` the WSDL (its address rewritten
to the Host the client used) and `GET /cnss-fse.xsd` the schema it imports; `/_sandbox/faults`
the fault plan (gateway/sandbox/faults.py). Every path first checks the client certificate's
subject CN against `allowed_clients`: the TLS layer has already verified that it chains to the
CA, and this keeps out the facilities' certificates from the same CA (soap:Client fault
ACCES_REFUSE, HTTP 500, as for every SOAP fault).

Request bodies over `max_request_bytes` are not kept (counted and dropped as they arrive) and
get a TAILLE_EXCESSIVE fault. Fault injection applies to `POST /` only, after the access check:
`soap_fault` answers a soap:Server fault, `http_500` a soap:Server fault with status 500,
`http_503` a plain-text 503 (as a proxy in front of the service would), `http_400` a
soap:Client fault REQUETE_REFUSEE with status 400, `down` drops the connection, `slow` delays
the answer, `drop_answer` does the work (the care sheet is stored) and drops the connection.
"""
from __future__ import annotations

import io
import os
import re
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server

from adapters.soap.cnss import WSDL_PATH, XSD_NAME, XSD_PATH
from adapters.soap.envelope import client_fault, server_fault
from gateway.pki import certificate_common_name
from gateway.sandbox.cnss import seed
from gateway.sandbox.cnss.service import CnssService
from gateway.sandbox.cnss.soap import fault_envelope
from gateway.sandbox.cnss.store import CareSheetStore
from gateway.sandbox.faults import CONTROL_PATH, Faults
from gateway.sandbox.web import FaultControl, with_faults
from gateway.tls import peer_certificate, server_tls_options

log = Logger()

DEFAULT_MAX_REQUEST_BYTES = 1_000_000  # a 500-line care sheet is about 150 kB
SOAP_CONTENT_TYPE = b"text/xml; charset=utf-8"
_HOST = re.compile(rb"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_ADDRESS = re.compile(rb'(<soap:address location=")[^"]*(")')


class _BoundedRequest(server.Request):
    """A request that keeps at most `max_body` bytes of body; beyond, `oversize` is set."""

    max_body = DEFAULT_MAX_REQUEST_BYTES
    oversize = False
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body:
            self.oversize = True
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > self.max_body and not self.oversize:
            self.oversize = True
            self.content = io.BytesIO()  # let go of what was kept so far
        if not self.oversize:
            super().handleContentChunk(data)


def _asks_for_wsdl(uri: bytes) -> bool:
    query = uri.partition(b"?")[2].lower()
    return any(item.partition(b"=")[0] == b"wsdl" for item in query.split(b"&"))


def _common_name(request) -> str | None:
    cert = peer_certificate(request.transport)
    return certificate_common_name(cert) if cert is not None else None


class CnssResource(resource.Resource):
    isLeaf = True

    def __init__(self, peer: CnssPeer):
        super().__init__()
        self.peer = peer
        self.control = FaultControl(peer.faults)

    def render(self, request):
        client = _common_name(request)
        if client not in self.peer.allowed_clients:
            log.warn("CNSS peer: access refused to client certificate {client!r}", client=client)
            return self._fault(request, client_fault("ACCES_REFUSE",
                                                     "accès refusé: certificat client non autorisé"))
        path = request.path
        if path == CONTROL_PATH:
            return self.control.render(request)
        if path == b"/" and request.method == b"POST":
            return self._soap(request)
        if request.method in (b"GET", b"HEAD"):
            if path == b"/" and _asks_for_wsdl(request.uri):
                return self._document(request, self.peer.wsdl_for(request.getHeader(b"host")))
            if path == b"/" + XSD_NAME.encode():
                return self._document(request, self.peer.xsd)
            if path == b"/":
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                return b"CNSS sandbox: POST SOAP 1.1 requests here; the contract is at /?wsdl\n"
        if path in (b"/", b"/" + XSD_NAME.encode()):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, POST" if path == b"/" else b"GET")
            return b""
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"

    @staticmethod
    def _document(request, data: bytes) -> bytes:
        request.setHeader(b"content-type", b"text/xml; charset=utf-8")
        return data

    @staticmethod
    def _fault(request, fault, code: int = 500) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", SOAP_CONTENT_TYPE)
        return fault_envelope(fault)

    def _soap(self, request):
        faults = self.peer.faults
        if faults.plan.mode == "soap_fault":
            faults.take()
            return self._fault(request, server_fault(
                "SERVICE_INDISPONIBLE", "service temporairement indisponible, réessayer plus tard"))
        return with_faults(request, faults, self.peer.reactor,
                           answer=lambda: self._answer(request),
                           error_answer=lambda code: self._error_answer(request, code))

    def _error_answer(self, request, code: int) -> None:
        if code == 503:  # as a load balancer in front of the service would answer
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.write(b"Service Unavailable\n")
        elif code < 500:
            request.write(self._fault(request, client_fault("REQUETE_REFUSEE", "requête refusée par le service"),
                                      code))
        else:
            request.write(self._fault(request, server_fault("ERREUR_INTERNE", "erreur interne du service"),
                                      code))
        request.finish()

    def _answer(self, request) -> None:
        if request.oversize:
            request.write(self._fault(request, client_fault(
                "TAILLE_EXCESSIVE", f"requête trop volumineuse (plus de {self.peer.max_request_bytes} octets)")))
            request.finish()
            return
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type != b"text/xml":
            request.write(self._fault(request, client_fault(
                "ENVELOPPE_INVALIDE", "Content-Type text/xml attendu (SOAP 1.1)")))
            request.finish()
            return
        body = request.content.read()
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        received_at = datetime.fromtimestamp(self.peer.reactor.seconds(), timezone.utc)
        d = self.peer.run(self.peer.service.handle, body, received_at)

        def reply(result):
            if gone:
                return
            status, payload = result
            request.setResponseCode(status)
            request.setHeader(b"content-type", SOAP_CONTENT_TYPE)
            request.write(payload)
            request.finish()

        def failed(failure):
            log.failure("CNSS peer: request failed", failure)
            if not gone:
                request.write(self._fault(request, server_fault("ERREUR_INTERNE", "erreur interne du service")))
                request.finish()

        d.addCallbacks(reply, failed)


class CnssPeer:
    """The reference CNSS: its store, fault plan, thread pool and web site.

    `start()` opens the store (in the pool) and must have fired before requests arrive;
    `stop()` closes it and stops the pool, once the listening port has been stopped.
    """

    def __init__(
        self,
        store_path: str,
        *,
        reactor,
        allowed_clients: frozenset[str] = frozenset({"gateway"}),
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        insured: tuple[seed.InsuredPerson, ...] = seed.INSURED,
    ):
        self.reactor = reactor
        self.allowed_clients = frozenset(allowed_clients)
        self.max_request_bytes = max_request_bytes
        self.faults = Faults()
        self.store = CareSheetStore(store_path)
        self.service = CnssService(self.store, insured=insured)
        with open(WSDL_PATH, "rb") as f:
            self.wsdl = f.read()
        with open(XSD_PATH, "rb") as f:
            self.xsd = f.read()
        # One thread: SQLite wants one writer, and lxml schemas are not shared across threads.
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="cnss-peer")
        self._started = False

    def run(self, function, *args):
        """`function(*args)` in the peer's thread, as a Deferred."""
        return deferToThreadPool(self.reactor, self._pool, function, *args)

    def start(self):
        if not self._started:
            self._pool.start()
            self._started = True
        return self.run(self.store.open)

    def stop(self):
        if not self._started:
            return defer.succeed(None)
        d = self.run(self.store.close)

        def stop_pool(result):
            self._started = False
            self._pool.stop()
            return result

        return d.addBoth(stop_pool)

    def site(self) -> server.Site:
        request_class = type("CnssRequest", (_BoundedRequest,), {"max_body": self.max_request_bytes})
        site = server.Site(CnssResource(self))
        site.requestFactory = request_class
        site.displayTracebacks = False
        return site

    def wsdl_for(self, host: bytes | None) -> bytes:
        """The WSDL with its address pointing at the host the client reached us by."""
        if not host or not _HOST.match(host):
            return self.wsdl
        return _ADDRESS.sub(rb"\g<1>https://" + host.replace(b"\\", b"") + rb"/\g<2>", self.wsdl, count=1)


def listen_cnss_peer(reactor, peer: CnssPeer, port: int, interface: str, tls_options):
    """Start `peer` then listen on `interface:port` with `tls_options` (see peer_tls_options).

    Returns a Deferred firing with the IListeningPort (`port=0` picks a free port).
    """
    def listen(_):
        return reactor.listenSSL(port, peer.site(), tls_options, interface=interface)

    return peer.start().addCallback(listen)


def peer_tls_options(certs_dir: str):
    """Server TLS options from a dev PKI folder: `sandbox-cnss.crt`/`.key`, clients from `ca.crt`."""
    return server_tls_options(os.path.join(certs_dir, "sandbox-cnss.crt"),
                              os.path.join(certs_dir, "sandbox-cnss.key"),
                              os.path.join(certs_dir, "ca.crt"), require_client_cert=True)

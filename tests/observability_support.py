"""A gateway in this process with its observability resources served on a real port, and the
clients the metrics, health, events and logs tests talk to it with (all real sockets)."""
from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from twisted.internet import defer, reactor, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from adapters.mllp.client import MllpClient, MllpClientError, client_tls_context
from gateway.config import (DeliveryConfig, DestinationConfig, RetryConfig, RouteConfig, RouteMatch,
                            SenderConfig)
from gateway.events import Event
from translation_support import with_mappings, write_mappings
from process_support import listening_port

HOST = "127.0.0.1"
CHU = SenderConfig(id="INPE-100001", name="CHU", type="hospital", facilities=("CHU_TEST",))
# Synthetic patients: what must never reach a log line above debug or an event.
PATIENT_NAME, PATIENT_GIVEN, PATIENT_ID = "Elmansouri", "Zineb", "PX-778812"


def hl7(control_id: str, kind: str = "ADT^A01^ADT_A01", facility: str = "CHU_TEST",
        processing: str = "P") -> bytes:
    """A synthetic v2.5 message naming the synthetic patient (original mode: AA/AE/AR)."""
    return (f"MSH|^~\\&|HIS|{facility}|MA_HIE_GATEWAY|MA_HIE|20250114083512||{kind}|"
            f"{control_id}|{processing}|2.5|||||MAR|UNICODE UTF-8\r"
            f"PID|1||{PATIENT_ID}^^^CHU^PI||{PATIENT_NAME}^{PATIENT_GIVEN}||19850714|F\r").encode("utf-8")


def closed_port() -> int:
    """A loopback port nothing listens on (a destination that is down)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def observed_config(make_config, db_url: str, tmp_path, tls: bool = True, translate: bool = True,
                    **changes):
    """Plain MLLP (unknown senders accepted) and, with `tls`, MLLP over TLS; the small test
    mapping set (ADT translates, ORU fails) routing Patients to a destination that is down
    and retries late, so its deliveries stay pending."""
    listeners = [dict(name="mllp-test", accept_unknown_senders=True)]
    if tls:
        listeners.append(dict(name="mllp-tls", tls=True))
    config = make_config(db_url, mllp=listeners, senders=[CHU])
    if translate:
        config = with_mappings(config, write_mappings(tmp_path / "mappings"))
        down = DestinationConfig("record-down", "fhir-record", f"https://{HOST}:{closed_port()}/fhir",
                                 connect_timeout=2, response_timeout=2,
                                 retry=RetryConfig(base=600, factor=2.0, cap=600, max_age=86400))
        config = dataclasses.replace(
            config, destinations=(down,),
            routes=(RouteConfig("clinical", ("record-down",), RouteMatch(resources=("Patient",))),),
            delivery=DeliveryConfig(lease=30, poll_interval=0.2))
    return dataclasses.replace(config, **changes) if changes else config


@dataclass
class Observed:
    """A started gateway, its listener ports, the base URL of its observability resources,
    and every event it emitted (in order)."""

    service: object
    ports: dict
    base: str
    site_port: object
    events: list[Event] = field(default_factory=list)

    def kinds(self, *kinds: str) -> list[Event]:
        return [e for e in self.events if e.kind in kinds]


@defer.inlineCallbacks
def start_observed(config, started: list) -> Observed:
    """Build the tree, mount observability_resources on a Site on a free port, start it."""
    from gateway.observability import observability_resources
    from gateway.service import build_service

    service = build_service(config, reactor)
    resources = observability_resources(service, config, reactor)
    root = Resource()
    root.putChild(b"metrics", resources["metrics"])
    root.putChild(b"health", resources["health"])
    site_port = reactor.listenTCP(0, Site(root), interface=HOST)
    observed = Observed(service, {}, f"http://{HOST}:{site_port.getHost().port}", site_port)
    service.events.subscribe(observed.events.append)
    service.startService()
    started.append(observed)
    for listener in config.mllp + config.astm + config.https:
        port = yield listening_port(service.getServiceNamed(listener.name))
        observed.ports[listener.name] = port.getHost().port
    return observed


@defer.inlineCallbacks
def stop_observed(observed: Observed):
    yield observed.site_port.stopListening()
    yield defer.maybeDeferred(observed.service.stopService)


def http_get(url: str, accept: str | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a GET, any status."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def send_mllp(port: int, *messages: bytes, tls=None) -> list[bytes | None]:
    with MllpClient(HOST, port, timeout=15, tls=tls) as client:
        return [client.send(message).response for message in messages]


def facility_tls(pki_dir: str, name: str, ca_dir: str | None = None):
    """A client TLS context presenting `name`'s certificate from `pki_dir` and trusting the
    CA of `ca_dir` (default: the same PKI)."""
    return client_tls_context(os.path.join(ca_dir or pki_dir, "ca.crt"),
                              os.path.join(pki_dir, f"{name}.crt"), os.path.join(pki_dir, f"{name}.key"))


def try_tls(port: int, context, payload: bytes) -> object:
    """Send over TLS, expecting a refusal: the answer, or the error the client saw."""
    try:
        return send_mllp(port, payload, tls=context)
    except (ssl.SSLError, OSError, MllpClientError) as error:
        return error


def in_thread(function, *args):
    return threads.deferToThread(function, *args)


def until(check, timeout: float = 15.0, interval: float = 0.05) -> defer.Deferred:
    """Fires with check()'s first truthy answer (polled on the reactor), or fails at timeout."""
    import time

    deadline = time.monotonic() + timeout
    result = defer.Deferred()

    def poll():
        value = check()
        if value:
            result.callback(value)
        elif time.monotonic() > deadline:
            result.errback(AssertionError(f"not true within {timeout} s: {check}"))
        else:
            reactor.callLater(interval, poll)

    poll()
    return result

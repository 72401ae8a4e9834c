"""The HTTPS door in this process for tests: a dev PKI with one facility of each kind, a
configuration on a temporary SQLite (or a given URL), the store, translation (the
repository's mapping set, loaded once per run) and the door on a free port; and a client
over real mutual TLS (Twisted's Agent) that presents the certificate of a chosen facility."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

from twisted.internet import defer, reactor
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from sqlalchemy import select
from zope.interface import implementer

from gateway.config import (DatabaseConfig, GatewayConfig, HttpsListenerConfig, MappingsConfig,
                            PkiConfig, SenderConfig)
from gateway.doors.api import Route, json_response, read_json
from gateway.store.schema import canonical_bundles, message_payloads, messages, translations
from gateway.tls import client_tls_options
from process_support import listening_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOSPITAL = SenderConfig("INPE-100001", "CHU Ibn Rochd", "hospital", ("HIS_CHU",), ("CHU_IBN_ROCHD",))
LAB = SenderConfig("INPE-100002", "Laboratoire Al Amal", "laboratory", ("LIS_ALAMAL",), ("LAB_ALAMAL_RABAT",))
IMAGING = SenderConfig("INPE-100003", "Imagerie Atlas", "imaging", ("RIS_ATLAS",), ("IMG_ATLAS",))
PHARMACY = SenderConfig("INPE-100004", "Pharmacie Agdal", "pharmacy", ("PHARMA_AGDAL",), ("PHARM_AGDAL",))
FACILITIES = (HOSPITAL, LAB, IMAGING, PHARMACY)
STRANGER = "INPE-999999"  # certificate from the CA, facility not in the registry
PKI_NAMES = [f.id for f in FACILITIES] + [STRANGER]


def door_config(pki: str, db_url: str, **listener) -> GatewayConfig:
    return GatewayConfig(
        path=os.path.join(ROOT, "conf", "gateway.yaml"), root=ROOT,
        database=DatabaseConfig(url=db_url),
        pki=PkiConfig(ca=os.path.join(pki, "ca.crt"), cert=os.path.join(pki, "gateway.crt"),
                      key=os.path.join(pki, "gateway.key"), dev_dir=pki),
        https=(HttpsListenerConfig(**{"name": "https-test", "port": 0, **listener}),),
        senders=FACILITIES, mappings=MappingsConfig("mappings"),
    )


@dataclass
class Door:
    config: GatewayConfig
    port: int
    pki: str
    store: object
    translation: object
    services: list = field(default_factory=list)
    identity: object = None  # its IdentityService: the registry and the CRL in force

    def path(self, name: str) -> str:
        return os.path.join(self.pki, name)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"


@defer.inlineCallbacks
def start_door(config: GatewayConfig, pki: str, extra_routes=(), translate: bool = True,
               **door_options):
    """Store, translation and the door; a Door. (Tests patch MappingSet.load to hand over the
    run's preloaded mapping set.)"""
    from gateway.doors.https import https_door_services
    from gateway.identity import IdentityService
    from gateway.service import StoreService
    from gateway.translation.service import TranslationService

    store = StoreService(config, reactor)
    store.startService()
    translation = None
    if translate:
        translation = TranslationService(config, store.engine, reactor)
        translation.startService()
    identity = IdentityService(config, reactor)
    services = https_door_services(config, store, translation, identity, reactor, extra_routes,
                                   **door_options)
    for service in services:
        service.startService()
    port = yield listening_port(services[0])
    return Door(config, port.getHost().port, pki, store, translation, services + [translation, store],
                identity)


@defer.inlineCallbacks
def stop_door(door: Door):
    for service in door.services:
        if service is not None:
            yield defer.maybeDeferred(service.stopService)


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, creator):
        self.creator = creator

    def creatorForNetloc(self, hostname, port):
        return self.creator


@dataclass
class Answer:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("latin-1"))
        return values[0].decode("latin-1") if values else None

    def json(self):
        return json.loads(self.body)


class Client:
    """HTTPS requests to a Door, presenting facility `who`'s certificate (persistent
    connections off: each request is a fresh TLS connection, so the identity is re-read)."""

    def __init__(self, door: Door, who: str):
        creator = client_tls_options(door.path("ca.crt"), "127.0.0.1", door.path(f"{who}.crt"),
                                     door.path(f"{who}.key"))
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, contextFactory=_Policy(creator), pool=self.pool)
        self.door = door

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                headers: dict[str, str] | None = None):
        raw = Headers({k: [v] for k, v in (headers or {}).items()})
        if content_type:
            raw.setRawHeaders("content-type", [content_type])
        producer = FileBodyProducer(__import__("io").BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method.encode(), (self.door.base + path).encode(), raw, producer)
        data = yield readBody(response)
        return Answer(response.code, response.headers, data)

    def post(self, path: str, body: bytes, content_type: str, **headers):
        return self.request("POST", path, body, content_type,
                            {k.replace("_", "-"): v for k, v in headers.items()})

    def get(self, path: str):
        return self.request("GET", path)


def hl7(control_id: str, kind: str = "ADT^A01^ADT_A01", application: str = "HIS_CHU",
        facility: str = "CHU_IBN_ROCHD", charset: str = "UNICODE UTF-8",
        body: str = "PID|1||P-1^^^CHU^PI||Benali^Karim||19800101|M", version: str = "2.5") -> bytes:
    msh = (f"MSH|^~\\&|{application}|{facility}|MA_HIE_GATEWAY|MA_HIE|20250114083512||{kind}|"
           f"{control_id}|P|{version}|||||MAR|{charset}")
    return (msh + "\r" + body + "\r").encode("utf-8")


def fhir_bundle(kind: str = "transaction", cnie: str = "AB123456") -> dict:
    patient_url = "urn:uuid:8e4f6c1a-0d44-4d5e-9c89-0a6b3f2f0c11"
    return {
        "resourceType": "Bundle", "type": kind,
        "entry": [
            {"fullUrl": patient_url,
             "resource": {"resourceType": "Patient",
                          "identifier": [{"system": "urn:ma:cnie", "value": cnie}],
                          "name": [{"family": "El Amrani", "given": ["Fatima-Zahra"]}],
                          "birthDate": "1984-03-09", "gender": "female"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": "urn:uuid:5b1e7d2c-7f7e-4a0b-a1f0-2d8c9e6b4a22",
             "resource": {"resourceType": "Observation", "status": "final",
                          "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7",
                                               "display": "Glucose"}]},
                          "subject": {"reference": patient_url},
                          "valueQuantity": {"value": 5.4, "unit": "mmol/L",
                                            "system": "http://unitsofmeasure.org", "code": "mmol/L"}},
             "request": {"method": "POST", "url": "Observation"}},
        ],
    }


def with_listener(config: GatewayConfig, **changes) -> GatewayConfig:
    return replace(config, https=tuple(replace(listener, **changes) for listener in config.https))


def rows(door, table, *where):
    """Rows of `table` in the door's store; a message row also has its `raw` payload, a
    translation its `bundle`."""
    query = select(table)
    if table is messages:
        query = (select(messages, message_payloads.c.raw)
                 .select_from(messages.outerjoin(message_payloads,
                                                 message_payloads.c.message_id == messages.c.id)))
    elif table is translations:
        query = (select(translations, canonical_bundles.c.bundle)
                 .select_from(translations.outerjoin(
                     canonical_bundles, canonical_bundles.c.message_id == translations.c.message_id)))
    key = table.c.id if "id" in table.c else table.c.message_id
    with door.store.engine.connect() as connection:
        return connection.execute(query.where(*where).order_by(key)).all()


def echo_json_route() -> Route:
    """A route that reads its body with read_json, as the prescription API does (extra_routes
    of start_door)."""
    return Route("POST", "/v1/test/echo", "hl7v2.submit", lambda request: json_response(200, read_json(request)),
                 {"operationId": "echo", "responses": {"200": {"description": "the body"}}})

"""The console over real HTTP for tests: a small client (http.client in a thread, cookies kept,
redirects not followed, pages parsed with lxml and CSS selectors), accounts with known
passwords, a clock the test moves, and rows written straight into a real store."""
from __future__ import annotations

import dataclasses
import http.client
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.cookies import SimpleCookie
from urllib.parse import urlencode

import lxml.html
from twisted.internet import threads

from gateway.config import ConsoleAccount, ConsoleConfig
from gateway.console.passwords import hash_password

PASSWORDS = {"admin": "admin-secret", "operator": "operator-secret", "viewer": "viewer-secret"}


def accounts_config(**changes) -> ConsoleConfig:
    """The three roles, hashed once per process (scrypt costs 0.1 s each)."""
    global _HASHES
    if not _HASHES:
        _HASHES = {name: hash_password(password) for name, password in PASSWORDS.items()}
    accounts = tuple(ConsoleAccount(name, name, _HASHES[name],
                                    display_name={"admin": "Amina Admin", "operator": "عمر المشغل",
                                                  "viewer": None}[name])
                     for name in PASSWORDS)
    return dataclasses.replace(ConsoleConfig(accounts=accounts, login_attempts=3, login_pause=300.0,
                                             session_idle_timeout=600.0, session_max_age=3600.0),
                               **changes)


_HASHES: dict[str, str] = {}


class Clock:
    """time.time() plus an offset the test moves."""

    def __init__(self):
        import time

        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Page:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    @property
    def location(self) -> str | None:
        values = self.headers.get("location")
        return values[0] if values else None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def doc(self):
        return lxml.html.document_fromstring(self.body.decode("utf-8"))

    def select(self, css: str) -> list:
        return self.doc.cssselect(css)

    def one(self, css: str):
        found = self.select(css)
        assert len(found) == 1, f"{css}: {len(found)} elements"
        return found[0]


@dataclass
class Client:
    port: int
    cookies: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    tls: object = None  # an ssl.SSLContext: HTTPS

    def request_now(self, method: str, path: str, form: dict | list | None = None,
                    headers: dict[str, str] | None = None, body: bytes | None = None) -> Page:
        if self.tls is not None:
            connection = http.client.HTTPSConnection(self.host, self.port, timeout=15, context=self.tls)
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=15)
        try:
            sent = dict(headers or {})
            if form is not None:
                body = urlencode(form, doseq=True).encode("utf-8")
                sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
            if self.cookies:
                sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            data = response.read()
            received: dict[str, list[str]] = {}
            for name, value in response.getheaders():
                received.setdefault(name.lower(), []).append(value)
            for line in received.get("set-cookie", []):
                cookie = SimpleCookie()
                cookie.load(line)
                for key, morsel in cookie.items():
                    if morsel.value and morsel["max-age"] != "0":
                        self.cookies[key] = morsel.value
                    else:
                        self.cookies.pop(key, None)
            return Page(response.status, received, data)
        finally:
            connection.close()

    def request(self, method: str, path: str, **kwargs):
        """The same, as a Deferred (the blocking call runs in a thread)."""
        return threads.deferToThread(self.request_now, method, path, **kwargs)

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, form=None, **kwargs):
        return self.request("POST", path, form=form, **kwargs)

    async def login(self, account: str, password: str | None = None) -> Page:
        page = await self.post("/login", {"username": account,
                                          "password": password or PASSWORDS[account],
                                          "next": "/messages"})
        assert page.status == 303, (page.status, page.text[:500])
        return page

    async def csrf(self) -> str:
        page = await self.get("/messages")
        assert page.status == 200, page.status
        return page.one("form#logout input[name=csrf_token]").get("value")


# -- rows written straight into the store -------------------------------------------------------

ADT = ("MSH|^~\\&|HIS_CHU|CHUIR|HIE|MS|20250114083500||ADT^A01^ADT_A01|{control}|P|2.5|||AL|NE|MAR|"
       "UNICODE UTF-8\r"
       "EVN|A01|20250114083500\r"
       "PID|1||{patient}^^^CHUIR^MR~be123456^^^CNIE^NI||{name}|ALAOUI^Khadija|19850312|F\r")
ARABIC = "بنعلي^فاطمة^^^^^L"
ARABIC_FAMILY = "بنعلي"


def ack_of(control: str) -> bytes:
    return (f"MSH|^~\\&|HIE|MS|HIS_CHU|CHUIR|20250114083501||ACK^A01^ACK|A{control}|P|2.5\r"
            f"MSA|CA|{control}\r").encode("utf-8")


def bundle_of(patient: str, name: str = "BENALI") -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": f"p-{patient}",
                      "identifier": [{"system": "urn:oid:2.16.504.1.1", "value": patient}],
                      "name": [{"family": name}]}}]}


@dataclass
class Seeded:
    id: int
    control_id: str
    received_at: datetime
    deliveries: dict[str, int] = field(default_factory=dict)  # destination -> delivery id


def seed_message(connection, *, control: str, patient: str = "4500123456",
                 name: str = "BENALI^Fatima^^^Mme^^L~" + ARABIC, received_at: datetime | None = None,
                 sender: str | None = "CHUIR", facility: str = "CHUIR", message_type: str = "ADT^A01",
                 status: str = "translated", payload: bool = True, bundle: bool = True,
                 deliveries: dict[str, str] | None = None, raw: bytes | None = None,
                 fmt: str = "hl7v2") -> Seeded:
    """One stored message as the gateway keeps it: index row, payload, ACK, translation,
    bundle and deliveries (destination -> status); expired kinds left out on request."""
    import hashlib

    from gateway.store.outbox import bundle_digest, idempotency_key
    from gateway.store.schema import (canonical_bundles, deliveries as deliveries_table,
                                      message_payloads, messages, translations)
    from gateway.store.schema import patient_identifiers as patient_identifiers_table
    from gateway.store.translations import bundle_text, patient_identifiers

    received_at = received_at or datetime.now(timezone.utc)
    raw = raw if raw is not None else ADT.format(control=control, patient=patient, name=name).encode("utf-8")
    message_id = connection.execute(messages.insert().values(
        received_at=received_at, listener="mllp-test", peer="127.0.0.1:40000", sender_id=sender,
        sending_application="HIS_CHU", sending_facility=facility, receiving_application="HIE",
        receiving_facility="MS", control_id=control, message_type=message_type, version="2.5",
        processing_id="P", charset="UNICODE UTF-8", codec="utf-8",
        sha256=hashlib.sha256(raw).digest(), size=len(raw), truncated=False, status=status,
        accepted=status != "rejected", ack_code="CA", ack=ack_of(control), format=fmt,
    )).inserted_primary_key[0]
    if payload:
        connection.execute(message_payloads.insert().values(message_id=message_id,
                                                            received_at=received_at, raw=raw))
    text = bundle_text(bundle_of(patient))
    if status in ("translated", "failed"):
        connection.execute(translations.insert().values(
            message_id=message_id, status=status, mapping_version="sha256:abcdef123456",
            translated_at=received_at + timedelta(milliseconds=5),
            error_code=207 if status == "failed" else None,
            error_reason="no mapping" if status == "failed" else None,
            warnings=json.dumps(["PID-8 : code inconnu"]) if status == "translated" else None))
        if bundle and status == "translated":
            connection.execute(canonical_bundles.insert().values(
                message_id=message_id, received_at=received_at, bundle=text))
            connection.execute(patient_identifiers_table.insert(), [
                {"message_id": message_id, "received_at": received_at, "system": system, "value": value}
                for system, value in patient_identifiers(bundle_of(patient))])
    seeded = Seeded(message_id, control, received_at)
    for destination, delivery_status in (deliveries or {}).items():
        digest = bundle_digest(text)
        seeded.deliveries[destination] = connection.execute(deliveries_table.insert().values(
            message_id=message_id, destination=destination, patient_key=f"Patient/p-{patient}",
            status=delivery_status, idempotency_key=idempotency_key(destination, message_id, digest),
            bundle_sha256=digest, created_at=received_at, next_attempt_at=received_at,
            attempts=0, finished_at=None if delivery_status == "pending" else received_at,
        )).inserted_primary_key[0]
    return seeded


def seed_attempt(connection, delivery_id: int, *, at: datetime, outcome: str, code: int | None = None,
                 reason: str | None = None, response: bytes | None = None, node: str = "gateway-1") -> None:
    from sqlalchemy import update

    from gateway.store.schema import deliveries, delivery_attempts

    connection.execute(delivery_attempts.insert().values(
        delivery_id=delivery_id, attempted_at=at, node=node, outcome=outcome, reason=reason,
        code=code, duration_ms=12, response=response))
    connection.execute(update(deliveries).where(deliveries.c.id == delivery_id)
                       .values(attempts=deliveries.c.attempts + 1, last_reason=reason, last_code=code))

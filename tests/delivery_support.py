"""The sandbox peers for delivery tests: started on free ports in the test's reactor, with a
client for their FHIR API and fault control; and an asynchronous wait on the database."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest_twisted
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater

from gateway.config import SandboxConfig, SandboxPeerConfig
from gateway.delivery.outcome import HttpRequest
from gateway.delivery.transport import HttpsTransport
from gateway.sandbox.service import SandboxService
from translation_support import rows


@pytest_twisted.inlineCallbacks
def until(query, check, db_url, timeout: float = 20.0, **params):
    """Poll `query` (off the reactor thread) until `check(rows)` holds; returns the rows."""
    deadline = time.monotonic() + timeout
    found = None
    while time.monotonic() < deadline:
        found = yield threads.deferToThread(rows, db_url, query, **params)
        if check(found):
            return found
        yield deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"{query}: {[tuple(r) for r in found or ()]!r}")


def start_peers(make_config, dev_pki, tmp_path) -> "Peers":
    config = dataclasses.replace(make_config("sqlite://"), sandbox=SandboxConfig(
        record=SandboxPeerConfig(0, str(tmp_path / "peers" / "record.sqlite")),
        cnss=SandboxPeerConfig(0, str(tmp_path / "peers" / "cnss.sqlite"))))
    peers = Peers(config, dev_pki)
    pytest_twisted.blockon(defer.maybeDeferred(peers.service.startService))
    return peers


def stop_peers(peers: "Peers") -> None:
    pytest_twisted.blockon(peers.client.close())
    pytest_twisted.blockon(defer.maybeDeferred(peers.service.stopService))


class Peers:
    """The sandbox peers on free ports, and a client for their FHIR API and fault control."""

    def __init__(self, config, dev_pki):
        self.service = SandboxService(config, reactor)
        self.client = HttpsTransport(reactor, os.path.join(dev_pki, "ca.crt"),
                                     os.path.join(dev_pki, "gateway.crt"),
                                     os.path.join(dev_pki, "gateway.key"), response_timeout=10)

    def url(self, kind: str, path: str = "") -> str:
        base = "/fhir" if kind == "record" else ""
        return f"https://127.0.0.1:{self.service.port(kind)}{base}{path}"

    @defer.inlineCallbacks
    def faults(self, kind: str, mode: str = "none", **plan):
        body = json.dumps({"mode": mode, **plan}).encode()
        response = yield self.client.request(HttpRequest(
            "PUT", f"https://127.0.0.1:{self.service.port(kind)}/_sandbox/faults", body,
            {"Content-Type": "application/json"}))
        assert response.code == 200, response.body

    @defer.inlineCallbacks
    def search(self, query: str) -> dict:
        response = yield self.client.request(HttpRequest("GET", self.url("record", query), b"",
                                                         {"Accept": "application/fhir+json"}))
        assert response.code == 200, response.body
        return json.loads(response.body)


def store_translated(conn, received_at, control_id: str, bundle: str, raw: bytes = b"MSH") -> int:
    """A translated message as the store keeps it (index row, payload, translation, bundle);
    its id."""
    from sqlalchemy import insert

    from gateway.store.schema import canonical_bundles, message_payloads, messages, translations

    message_id = conn.execute(insert(messages).values(
        received_at=received_at, listener="test", control_id=control_id,
        sending_application="APP", sending_facility="FAC", sha256=bytes(32), size=len(raw),
        truncated=False, status="translated", accepted=True, duplicate_count=0,
        format="hl7v2").returning(messages.c.id)).scalar_one()
    conn.execute(insert(message_payloads).values(message_id=message_id, received_at=received_at, raw=raw))
    conn.execute(insert(translations).values(message_id=message_id, status="translated",
                                             translated_at=received_at))
    conn.execute(insert(canonical_bundles).values(message_id=message_id, received_at=received_at,
                                                  bundle=bundle))
    return message_id

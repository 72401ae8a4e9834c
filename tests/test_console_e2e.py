"""The console in the whole gateway (build_service, in this process, real sockets), on SQLite
and PostgreSQL: a message in over MLLP is translated and delivered to the sandbox shared
record; an operator finds it, reads it, replays its delivery, and the delivery service makes
the new attempt under the same idempotency key. The audit trail records who read and
replayed it; /metrics and /health/ answer beside the console without a login."""
from __future__ import annotations

import dataclasses
import os

import pytest_twisted
from twisted.internet import threads

from adapters.mllp.client import MllpClient, describe
from console_support import ARABIC_FAMILY, Client, accounts_config
from delivery_support import until
from gateway.config import (AdminListenerConfig, DeliveryConfig, DestinationConfig, RetryConfig,
                            RouteConfig, RouteMatch)
from translation_support import with_mappings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADMISSION = os.path.join(ROOT, "mappings", "tests", "adt", "a01-admission.hl7")


def admission(control_id: str, patient_id: str) -> bytes:
    """The shipped ADT^A01 (Arabic second name in PID-5) with its own control id and patient."""
    with open(ADMISSION, encoding="utf-8") as handle:
        text = handle.read().replace("\n", "\r").rstrip("\r") + "\r"
    return text.replace("|ADT0001|", f"|{control_id}|").replace(
        "|123456^^^CHUIR^MR", f"|{patient_id}^^^CHUIR^MR").encode("utf-8")


def send(port: int, message: bytes) -> str:
    with MllpClient("127.0.0.1", port, timeout=15) as client:
        return describe(client.send(message).response)["msa1"]


def console_gateway(make_config, db_url, peers):
    config = with_mappings(make_config(db_url), os.path.join(ROOT, "mappings"))
    record = DestinationConfig("shared-record", "fhir-record", peers.url("record"), response_timeout=5,
                               retry=RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600))
    return dataclasses.replace(
        config, destinations=(record,),
        routes=(RouteConfig("clinical", ("shared-record",), RouteMatch(resources=("Patient",))),),
        delivery=DeliveryConfig(lease=5, poll_interval=0.1),
        admin=(AdminListenerConfig("admin", 0),), console=accounts_config())


ATTEMPTS = ("SELECT d.id, d.status, d.attempts, d.idempotency_key, a.outcome, a.code FROM deliveries d "
            "JOIN messages m ON m.id = d.message_id JOIN delivery_attempts a ON a.delivery_id = d.id "
            "WHERE m.control_id = :control ORDER BY a.id")


@pytest_twisted.ensureDeferred
async def test_an_operator_replays_a_delivered_message_and_the_delivery_service_sends_it(
        db_url, make_config, running_gateway, peers):
    ports = await running_gateway(console_gateway(make_config, db_url, peers))
    client = Client(ports["admin"])
    # No login for what holds no patient data.
    metrics = await client.get("/metrics")
    assert metrics.status == 200 and b"gateway_" in metrics.body
    assert (await client.get("/health/live")).status == 200
    assert (await client.get("/messages")).status == 303  # the console does need one

    assert await threads.deferToThread(send, ports["mllp-test"], admission("CONSOLE01", "55501")) == "CA"
    (first,) = await until(ATTEMPTS, lambda rows: len(rows) == 1 and rows[0].status == "delivered",
                           db_url, control="CONSOLE01")
    assert (first.outcome, first.code) == ("delivered", 200)

    await client.login("operator")
    page = await client.get("/messages?control_id=CONSOLE01")
    (link,) = page.select("table#messages tr.message a.message-link")
    page = await client.get(link.get("href"))
    assert page.status == 200
    name = [row for row in page.select("table#segments tr.field") if row.cssselect("td.position")[0].text == "PID-5"]
    assert any(ARABIC_FAMILY in bdi.text and bdi.get("dir") == "auto" for bdi in name[0].cssselect("bdi"))
    assert "MSA|CA|CONSOLE01" in page.one("section#ack").text_content()
    assert '"resourceType": "Patient"' in page.one("section#canonical pre").text
    (delivery,) = page.select("div.delivery[data-destination=shared-record]")
    assert len(delivery.cssselect("table.attempts tr.attempt")) == 1
    form = delivery.cssselect("form.replay")[0]
    csrf = form.cssselect("input[name=csrf_token]")[0].get("value")

    answer = await client.post(form.get("action"), {"csrf_token": csrf})
    assert answer.status == 303 and answer.location.endswith("?notice=replayed")
    rows = await until(ATTEMPTS, lambda rows: len(rows) == 2 and rows[-1].status == "delivered",
                       db_url, control="CONSOLE01")
    assert [(r.outcome, r.code) for r in rows] == [("delivered", 200), ("delivered", 200)]
    assert rows[-1].idempotency_key == first.idempotency_key  # the peer keeps one copy
    page = await client.get(answer.location)
    assert page.select(".notice")
    (delivery,) = page.select("div.delivery[data-destination=shared-record]")
    assert len(delivery.cssselect("tr.attempt")) == 2
    # The replay started a fresh count for the retry policy; the page says both.
    assert delivery.cssselect("p")[0].text_content().startswith("2 tentative(s) dont 1 depuis la dernière reprise")

    message_id = int(link.get("href").rsplit("/", 1)[1])
    audit = await until("SELECT action, actor, outcome, subject FROM audit_log WHERE actor = 'operator' "
                        "ORDER BY seq", lambda rows: {"delivery.replayed", "message.read"}
                        <= {r.action for r in rows}, db_url)
    actions = [(r.action, r.subject) for r in audit]
    assert ("console.login", None) in actions
    assert ("message.read", f"message/{message_id}") in actions
    assert any(action == "delivery.replayed" and subject.startswith("delivery/") for action, subject in actions)

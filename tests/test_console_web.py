"""The console over real HTTP on a real port, on SQLite and PostgreSQL: the admin site built
on a real store (migrated schema, the Database's thread pool), rows written as the gateway
writes them, a clock the test moves. Login and throttling, sessions and their expiry, CSRF,
roles, the search, the message page, the operators' actions, the other pages, hostile input."""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import ssl
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import pytest_twisted
from sqlalchemy import select, text
from twisted.internet import defer, reactor, threads
from twisted.internet.task import deferLater

from console_support import (ADT, ARABIC_FAMILY, PASSWORDS, Client, Clock, accounts_config, seed_attempt,
                             seed_message)
from gateway.admin import admin_services, admin_site
from gateway.config import AdminListenerConfig, DestinationConfig, SenderConfig
from gateway.console.passwords import hash_password
from gateway.console.queries import PAGE_SIZE
from gateway.events import EventBus
from gateway.facilities import FacilityRegistry, RegistryRef
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.store.schema import deliveries, facility_certificates
from process_support import listening_port

SENDERS = (SenderConfig("CHUIR", "CHU Ibn Rochd — المستشفى الجامعي ابن رشد", "hospital",
                        facilities=("CHUIR",)),
           SenderConfig("LAB-ANFA", "Laboratoire Anfa", "laboratory"))


class Console:
    """A started admin site on a free port, its database, events and clock."""

    def __init__(self, config, database: Database, clock: Clock, events: list, port, mappings=None):
        self.config, self.database, self.clock, self.events = config, database, clock, events
        self.port = port
        self.mappings = mappings

    def client(self) -> Client:
        return Client(self.port.getHost().port)

    def run(self, work, *args, **kwargs):
        return self.database.run_write_now(work, *args, **kwargs)

    def sql(self, query: str, **params) -> list:
        return self.database.run_now(lambda c: c.execute(text(query), params).all())

    def kinds(self, kind: str) -> list:
        return [e for e in self.events if e.kind == kind]


def start_console(config, clock: Clock, mappings=None, reload_mappings=None) -> Console:
    engine = create_gateway_engine(config.database.url)
    migrate(engine)
    database = Database(engine, reactor, 4)
    database.start()
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    registry = FacilityRegistry(config.senders)
    site = admin_site(config, config.admin[0], database, reactor, events=bus,
                      registry=lambda: registry, mappings=(lambda: mappings) if mappings else None,
                      reload_mappings=reload_mappings, now=clock)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return Console(config, database, clock, seen, port, mappings)


async def stop_console(console: Console) -> None:
    try:
        await console.port.stopListening()
    finally:
        console.database.stop()  # its pool threads would keep the process alive


def console_config(make_config, db_url, **changes):
    return dataclasses.replace(
        make_config(db_url), admin=(AdminListenerConfig("admin", 0),), console=accounts_config(),
        senders=SENDERS,
        destinations=(DestinationConfig("shared-record", "fhir-record", "https://127.0.0.1:9/fhir"),
                      DestinationConfig("cnss", "cnss", "https://127.0.0.1:9/cnss")),
        **changes)


@pytest.fixture
def console(db_url, make_config, repo_mappings):
    clock = Clock()
    started = start_console(console_config(make_config, db_url), clock, mappings=repo_mappings)
    yield started
    pytest_twisted.blockon(defer.ensureDeferred(stop_console(started)))


def now() -> datetime:
    return datetime.now(timezone.utc)


# -- login, sessions ---------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_refuses_generically_then_throttles_and_sets_a_strict_cookie(console):
    client = console.client()
    page = await client.get("/messages?status=failed")
    assert page.status == 303 and page.location == "/login?next=%2Fmessages%3Fstatus%3Dfailed"
    page = await client.get(page.location)
    assert page.status == 200
    form = page.one("form#login")
    assert form.cssselect("input[name=username]") and form.cssselect("button[type=submit]")
    assert form.cssselect("input[name=password]")[0].get("type") == "password"
    assert page.select("nav") == [] and page.select("#account") == []
    assert page.one("html").get("lang") == "fr" and page.one("html").get("dir") == "ltr"

    wrong = await client.post("/login", {"username": "operator", "password": "nope"})
    unknown = await client.post("/login", {"username": "nobody", "password": "nope"})
    for refused in (wrong, unknown):  # the same answer: nothing tells which accounts exist
        assert refused.status == 401 and not client.cookies
        assert refused.one("p.error").text == "Identifiant ou mot de passe incorrect."
    for attempt in ("again", "and again"):
        assert (await client.post("/login", {"username": "operator", "password": attempt})).status == 401
    # The third failure paused the pair: even the right password is refused now...
    paused = await client.post("/login", {"username": "operator", "password": PASSWORDS["operator"]})
    assert paused.status == 429 and not client.cookies
    # ...but only that account from that address.
    other = console.client()
    await other.login("viewer")
    console.clock.advance(301)
    page = await client.post("/login", {"username": "operator", "password": PASSWORDS["operator"],
                                        "next": "/messages?status=failed"})
    assert page.status == 303 and page.location == "/messages?status=failed"
    cookie = page.header("set-cookie")
    token = client.cookies["gw_console"]
    assert re.search(r"(?i)httponly", cookie) and re.search(r"(?i)samesite=strict", cookie)
    assert "Path=/" in cookie and "secure" not in cookie.lower()  # plain HTTP listener
    stored = console.sql("SELECT token_sha256, account, role FROM console_sessions WHERE account = 'operator'")
    assert [(r.token_sha256, r.role) for r in stored] == [(hashlib.sha256(token.encode()).hexdigest(), "operator")]
    page = await client.get("/messages")
    assert page.status == 200 and "operator" in page.one("#account").text_content()

    logins = [(e.actor, e.outcome, e.detail.get("reason")) for e in console.kinds("console.login")]
    assert logins == [("operator", "refused", "bad credentials"), ("nobody", "refused", "bad credentials"),
                      ("operator", "refused", "bad credentials"), ("operator", "refused", "bad credentials"),
                      ("operator", "refused", "throttled"),
                      ("viewer", "success", None), ("operator", "success", None)]
    assert all(e.source and e.source.startswith("127.0.0.1:") for e in console.kinds("console.login"))


@pytest_twisted.ensureDeferred
async def test_sessions_end_when_idle_past_their_age_and_at_logout(console):
    client = console.client()
    await client.login("viewer")
    console.clock.advance(599)
    assert (await client.get("/messages")).status == 200  # used: idle time starts again
    console.clock.advance(599)
    assert (await client.get("/messages")).status == 200
    console.clock.advance(601)  # idle too long
    page = await client.get("/messages")
    assert page.status == 303 and page.location.startswith("/login")
    assert console.sql("SELECT account FROM console_sessions") == []

    await client.login("viewer")
    for _ in range(6):  # active all along, but the maximum age (1 h) ends it
        console.clock.advance(590)
        assert (await client.get("/destinations")).status == 200
    console.clock.advance(590)
    assert (await client.get("/destinations")).status == 303

    await client.login("operator")
    token = client.cookies["gw_console"]
    csrf = await client.csrf()
    page = await client.post("/logout", {"csrf_token": csrf})
    assert page.status == 303 and page.location == "/login" and "gw_console" not in client.cookies
    assert console.sql("SELECT account FROM console_sessions") == []
    client.cookies["gw_console"] = token  # the old cookie opens nothing
    assert (await client.get("/messages")).status == 303
    assert [e.actor for e in console.kinds("console.logout")] == ["operator"]


@pytest_twisted.ensureDeferred
async def test_a_changed_password_ends_the_accounts_open_sessions(make_config, db_url):
    # A stolen session (or password) must not outlive the new hash an admin puts in the
    # configuration: sessions are in the database, so they would survive the restart.
    config = console_config(make_config, db_url)
    first = start_console(config, Clock())
    try:
        operator, viewer = first.client(), first.client()
        await operator.login("operator")
        await viewer.login("viewer")
    finally:
        await stop_console(first)
    accounts = tuple(dataclasses.replace(a, password_hash=hash_password("rotated-secret"))
                     if a.name == "operator" else a for a in config.console.accounts)
    rotated = dataclasses.replace(config, console=dataclasses.replace(config.console, accounts=accounts))
    second = start_console(rotated, Clock())
    try:
        operator.port = viewer.port = second.port.getHost().port
        page = await operator.get("/messages")
        assert page.status == 303 and page.location.startswith("/login"), page.status
        assert console_sessions_of(second, "operator") == []  # ended, not only refused
        assert (await viewer.get("/messages")).status == 200  # the others keep theirs
        await operator.login("operator", "rotated-secret")
        assert (await operator.get("/messages")).status == 200
    finally:
        await stop_console(second)


def console_sessions_of(console: Console, account: str) -> list:
    return console.sql("SELECT account FROM console_sessions WHERE account = :account", account=account)


@pytest_twisted.ensureDeferred
async def test_posts_need_the_sessions_csrf_token_and_this_sites_origin(console):
    seeded = console.run(seed_message, control="CSRF1", deliveries={"shared-record": "dead"})
    delivery = seeded.deliveries["shared-record"]
    action = f"/messages/{seeded.id}/deliveries/{delivery}/replay"
    anonymous = console.client()
    assert (await anonymous.post(action, {"csrf_token": "x" * 43})).status == 403
    client = console.client()
    await client.login("operator")
    csrf = await client.csrf()
    assert (await client.post(action, {})).status == 403
    assert (await client.post(action, {"csrf_token": csrf[:-1] + ("A" if csrf[-1] != "A" else "B")})).status == 403
    assert (await client.post(action, {"csrf_token": [csrf, csrf]})).status == 403
    foreign = await client.post(action, {"csrf_token": csrf}, headers={"Origin": "http://evil.example"})
    assert foreign.status == 403
    assert (await client.post("/logout", {})).status == 403  # still logged in
    assert (await client.get("/messages")).status == 200
    assert console.sql("SELECT status FROM deliveries")[0].status == "dead"  # nothing happened
    other = console.client()
    await other.login("operator")
    other_csrf = await other.csrf()
    assert other_csrf != csrf
    assert (await client.post(action, {"csrf_token": other_csrf})).status == 403  # not this session's
    page = await client.post(action, {"csrf_token": csrf},
                             headers={"Origin": f"http://127.0.0.1:{client.port}"})
    assert page.status == 303


@pytest_twisted.ensureDeferred
async def test_roles_viewer_reads_operator_acts_admin_sees_accounts(console):
    seeded = console.run(seed_message, control="ROLE1", deliveries={"shared-record": "pending"})
    delivery = seeded.deliveries["shared-record"]
    before = [tuple(r) for r in console.sql("SELECT status, next_attempt_at, last_reason FROM deliveries")]
    viewer = console.client()
    await viewer.login("viewer")
    page = await viewer.get(f"/messages/{seeded.id}")
    assert page.status == 200 and page.select("div.delivery table.attempts")
    assert page.select("form.replay") == page.select("button.replay") == page.select("form.dead-letter") == []
    csrf = page.one("form#logout input[name=csrf_token]").get("value")
    for action in ("replay", "dead-letter"):
        refused = await viewer.post(f"/messages/{seeded.id}/deliveries/{delivery}/{action}", {"csrf_token": csrf})
        assert refused.status == 403
    assert (await viewer.get("/accounts")).status == 403
    assert [tuple(r) for r in console.sql("SELECT status, next_attempt_at, last_reason FROM deliveries")] == before
    assert console.kinds("delivery.replayed") == [] and console.kinds("delivery.dead") == []

    operator = console.client()
    await operator.login("operator")
    page = await operator.get(f"/messages/{seeded.id}")
    assert len(page.select("form.replay button.replay")) == 1
    assert len(page.select("form.dead-letter button.dead-letter")) == 1
    assert (await operator.get("/accounts")).status == 403
    assert page.select("nav a[href='/accounts']") == []

    admin = console.client()
    await admin.login("admin")
    page = await admin.get("/accounts")
    assert page.status == 200
    names = [row.cssselect("td")[0].text for row in page.select("table#accounts tr.account-row")]
    assert names == ["admin", "operator", "viewer"]
    assert "scrypt$" not in page.text  # never the hashes
    sessions = {row.cssselect("td")[0].text for row in page.select("table#sessions tbody tr")}
    assert sessions == {"viewer", "operator", "admin"}
    assert "عمر المشغل" in page.text


# -- search ------------------------------------------------------------------------------------

def result_ids(page) -> list[int]:
    assert page.status == 200, page.text[:300]
    return [int(a.get("href").rsplit("/", 1)[1]) for a in page.select("table#messages tr.message a.message-link")]


@pytest_twisted.ensureDeferred
async def test_search_by_each_criterion_newest_first_and_paginated(console):
    base = now() - timedelta(days=2)
    first = console.run(seed_message, control="S-1", patient="P100", received_at=base)
    second = console.run(seed_message, control="S-2", patient="P200", received_at=base + timedelta(hours=1),
                         sender="LAB-ANFA", facility="ANFA_LAB", message_type="ORU^R01")
    failed = console.run(seed_message, control="S-3", patient="P300", received_at=base + timedelta(hours=2),
                         status="failed")  # no bundle: found by its payload
    rejected = console.run(seed_message, control="S-4", patient="P100", received_at=base + timedelta(hours=3),
                           status="rejected", sender=None, facility="UNKNOWN^2.16.504.9^ISO")
    client = console.client()
    await client.login("viewer")
    page = await client.get("/messages")
    assert result_ids(page) == [rejected.id, failed.id, second.id, first.id]
    search = page.one("form#search")
    for name in ("control_id", "patient", "facility", "type", "status", "since", "until"):
        assert len(search.cssselect(f"[name={name}]")) == 1
    assert search.cssselect("button[type=submit]")

    assert result_ids(await client.get("/messages?control_id=S-2")) == [second.id]
    assert result_ids(await client.get("/messages?control_id=S")) == []  # exact
    assert result_ids(await client.get("/messages?patient=P100")) == [rejected.id, first.id]
    assert result_ids(await client.get("/messages?patient=P300")) == [failed.id]
    assert result_ids(await client.get("/messages?patient=P10")) == []  # whole values only
    assert result_ids(await client.get("/messages?patient=p100")) == []  # case-sensitive
    assert result_ids(await client.get("/messages?patient=%25")) == []  # no wildcard
    assert result_ids(await client.get("/messages?facility=LAB-ANFA")) == [second.id]
    assert result_ids(await client.get("/messages?facility=ANFA_LAB")) == [second.id]  # MSH-4
    assert result_ids(await client.get("/messages?facility=UNKNOWN")) == [rejected.id]  # MSH-4.1
    assert result_ids(await client.get("/messages?facility=UNKNOWN%5E2.16.504.9%5EISO")) == [rejected.id]
    assert result_ids(await client.get("/messages?facility=UNKNOW")) == []
    assert result_ids(await client.get("/messages?type=ORU")) == [second.id]
    assert result_ids(await client.get("/messages?type=ADT%5EA01")) == [rejected.id, failed.id, first.id]
    assert result_ids(await client.get("/messages?status=failed")) == [failed.id]
    # The form's times are on the console's clock (console.timezone, Africa/Casablanca).
    casablanca = ZoneInfo("Africa/Casablanca")
    since = (base + timedelta(minutes=30)).astimezone(casablanca).strftime("%Y-%m-%dT%H:%M")
    until = (base + timedelta(hours=2, minutes=30)).astimezone(casablanca).strftime("%Y-%m-%dT%H:%M")
    assert result_ids(await client.get(f"/messages?since={since}")) == [rejected.id, failed.id, second.id]
    assert result_ids(await client.get(f"/messages?until={until}")) == [failed.id, second.id, first.id]
    page = await client.get(f"/messages?since={since}&until={until}&type=ADT")
    assert result_ids(page) == [failed.id]
    assert page.one("form#search input[name=since]").get("value") == since  # kept in the form
    shown = (base + timedelta(hours=2)).astimezone(casablanca).strftime("%Y-%m-%d %H:%M:%S %Z")
    assert shown in page.text and shown[-3:] in ("+01", "+00")  # with Morocco's offset
    assert result_ids(await client.get("/messages?patient=P100&status=translated")) == [first.id]

    # Pages of PAGE_SIZE, newest first, each continuing below the last.
    def many(connection):
        return [seed_message(connection, control=f"M-{i:03d}", patient="PAGED", payload=False).id
                for i in range(PAGE_SIZE + 5)]
    ids = console.run(many)
    page = await client.get("/messages?patient=PAGED")
    assert result_ids(page) == sorted(ids, reverse=True)[:PAGE_SIZE]
    link = page.one("a[rel=next]").get("href")
    assert "patient=PAGED" in link and f"before={sorted(ids, reverse=True)[PAGE_SIZE - 1]}" in link
    page = await client.get(link)
    assert result_ids(page) == sorted(ids, reverse=True)[PAGE_SIZE:]
    assert page.select("a[rel=next]") == []


@pytest_twisted.ensureDeferred
async def test_patient_search_reads_the_bundles_patients_and_the_payloads_of_messages_without_one(console):
    """A translated message is found by its bundle's Patients (patient_identifiers), whatever its
    payload holds, and by system|value; a message without a bundle (waiting, failed, rejected)
    by its payload."""
    base = now() - timedelta(hours=3)
    other = ADT.format(control="B-1", patient="SOMEONE-ELSE", name="X").encode()
    by_bundle = console.run(seed_message, control="B-1", patient="IN-BUNDLE", raw=other, received_at=base)
    waiting = console.run(seed_message, control="B-2", patient="IN-BUNDLE", status="received",
                          received_at=base + timedelta(minutes=1))
    assert result_ids(await _viewer(console, "/messages?patient=IN-BUNDLE")) == [waiting.id, by_bundle.id]
    # SYSTEM|VALUE narrows the bundles' identifiers to that system (a payload has none).
    found = await _viewer(console, "/messages?patient=urn%3Aoid%3A2.16.504.1.1%7CIN-BUNDLE")
    assert result_ids(found) == [waiting.id, by_bundle.id]
    assert result_ids(await _viewer(console, "/messages?patient=urn%3Aother%7CIN-BUNDLE")) == [waiting.id]
    assert result_ids(await _viewer(console, "/messages?patient=%7CIN-BUNDLE")) == [waiting.id]
    # A translated message's payload is not read: its patients are those of its bundle.
    assert result_ids(await _viewer(console, "/messages?patient=SOMEONE-ELSE")) == []


async def _viewer(console, path: str):
    client = console.client()
    await client.login("viewer")
    return await client.get(path)


@pytest_twisted.ensureDeferred
async def test_a_search_by_patient_is_audited_without_the_identifier(console):
    # Which messages concern a patient is patient data ("everything that touches patient
    # data is audited"); the audit trail holds ids, never the identifier searched.
    first = console.run(seed_message, control="AUD-1", patient="CNIE-AB998877")
    console.run(seed_message, control="AUD-2", patient="OTHER-1")
    client = console.client()
    await client.login("viewer")
    assert (await client.get("/messages?status=translated")).status == 200  # no patient: not audited
    assert console.kinds("message.searched") == []
    page = await client.get("/messages?patient=CNIE-AB998877&status=translated")
    assert page.status == 200 and len(page.select("tr.message")) == 1
    [searched] = console.kinds("message.searched")
    assert searched.actor == "viewer" and searched.source.startswith("127.0.0.1:")
    assert dict(searched.detail) == {"criteria": ["patient", "status"], "results": 1, "messages": [first.id]}
    assert "AB998877" not in repr(searched)


def test_patient_search_goes_through_indexes(db_url):
    """The patient search's query reads patient_identifiers by value and the messages without a
    bundle through their partial indexes: never every message of the store."""
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql, sqlite

    from gateway.store.database import create_gateway_engine, migrate
    from gateway.store.queries import MessageFilter, message_conditions
    from gateway.store.schema import messages

    engine = create_gateway_engine(db_url)
    migrate(engine)
    name = engine.dialect.name
    query = (select(messages.c.id).where(*message_conditions(MessageFilter(patient="BE123456"), name))
             .order_by(messages.c.id.desc()).limit(51))
    sql = str(query.compile(dialect=sqlite.dialect() if name == "sqlite" else postgresql.dialect(),
                            compile_kwargs={"literal_binds": True}))
    try:
        with engine.connect() as conn:
            if name == "sqlite":
                plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
                assert "SCAN messages" not in plan, plan
            else:
                conn.exec_driver_sql("SET enable_seqscan = off")
                plan = " ".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + sql))
        for index in ("ix_patient_identifiers_value", "value_message_id_idx"):
            if index in plan:
                break
        else:
            raise AssertionError(plan)
        assert "ix_messages_untranslated" in plan and "ix_messages_unbundled" in plan, plan
    finally:
        engine.dispose()


# -- the message page --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_message_page_lays_out_fields_ack_canonical_and_deliveries(console):
    seeded = console.run(seed_message, control="PAGE1", patient="4500123456",
                         deliveries={"shared-record": "delivered", "cnss": "dead"})
    t0 = now() - timedelta(minutes=5)
    record, cnss = seeded.deliveries["shared-record"], seeded.deliveries["cnss"]
    console.run(seed_attempt, record, at=t0, outcome="transient", code=503, reason="peer unavailable",
                response=b'{"resourceType":"OperationOutcome","issue":[{"diagnostics":"busy"}]}')
    console.run(seed_attempt, record, at=t0 + timedelta(seconds=2), outcome="delivered", code=200,
                reason="delivered", response=b'{"resourceType":"Bundle","type":"transaction-response"}')
    console.run(seed_attempt, cnss, at=t0, outcome="permanent", code=400, reason="refused by CNSS")
    client = console.client()
    await client.login("operator")
    page = await client.get(f"/messages/{seeded.id}")
    assert page.status == 200
    assert page.header("content-type") == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.header("content-security-policy")
    assert page.header("strict-transport-security") is None  # plain HTTP (loopback, development)

    # The raw message by segment and field, named from hl7apy (HL7 2.5).
    rows = {row.cssselect("td.position")[0].text: row for row in page.select("table#segments tr.field")}
    assert rows["MSH-10"].cssselect("td.field-name")[0].text == "Message Control Id"
    assert rows["PID-5"].cssselect("td.field-name")[0].text == "Patient Name"
    assert rows["PID-3"].cssselect("td.field-name")[0].text == "Patient Identifier List"
    names = rows["PID-5"].cssselect("td.value bdi")
    assert [b.text for b in names] == ["BENALI^Fatima^^^Mme^^L", "بنعلي^فاطمة^^^^^L"]
    assert all(b.get("dir") == "auto" for b in names)  # each repetition in its own direction
    assert [s.get("data-segment") for s in page.select("table#segments tbody.segment")] == ["MSH", "EVN", "PID"]
    raw = page.one("pre#raw")
    assert raw.get("dir") == "auto" and ARABIC_FAMILY in raw.text and "PID|1||4500123456" in raw.text

    assert "MSA|CA|PAGE1" in page.one("section#ack pre").text
    canonical = page.one("section#canonical pre")
    assert json.loads(canonical.text)["entry"][0]["resource"]["identifier"][0]["value"] == "4500123456"
    assert "\n  " in canonical.text  # pretty
    assert "sha256:abcdef123456" in page.one("section#canonical").text_content()
    assert "PID-8 : code inconnu" in page.one("section#canonical").text_content()

    shown = {d.get("data-destination"): d for d in page.select("section#deliveries div.delivery")}
    assert set(shown) == {"shared-record", "cnss"}
    attempts = shown["shared-record"].cssselect("table.attempts tr.attempt")
    assert [a.get("class") for a in attempts] == ["attempt outcome-transient", "attempt outcome-delivered"]
    assert "busy" in attempts[0].text_content() and "transaction-response" in attempts[1].text_content()
    assert "503" in attempts[0].text_content()
    assert len(shown["cnss"].cssselect("tr.attempt")) == 1
    assert shown["shared-record"].cssselect("p")[0].text_content().startswith("2 tentative(s) · clé")
    assert "refused by CNSS" in shown["cnss"].text_content()
    assert len(page.select("form.replay")) == 2 and page.select("form.dead-letter") == []  # none pending

    (read,) = console.kinds("message.read")
    assert (read.actor, read.subject, read.outcome, read.facility) == ("operator", f"message/{seeded.id}",
                                                                        "success", "CHUIR")
    assert read.source.startswith("127.0.0.1:") and read.listener == "admin"
    await client.get("/messages?control_id=PAGE1")  # a search shows no content: no read
    assert len(console.kinds("message.read")) == 1


@pytest_twisted.ensureDeferred
async def test_expired_payload_and_bundle_show_a_notice_and_other_formats_show_as_text(console):
    expired = console.run(seed_message, control="OLD1", payload=False, bundle=False)
    astm = console.run(seed_message, control="ASTM1", message_type="ASTM", fmt="astm", status="received",
                       raw="H|\\^&|||LAB\rP|1||PAT7||بنعلي\rL|1\r".encode("utf-8"))
    client = console.client()
    await client.login("viewer")
    page = await client.get(f"/messages/{expired.id}")
    assert page.status == 200
    assert "expiré (rétention)" in page.one("section#payload p.expired").text
    assert "expirée (rétention)" in page.one("section#canonical p.expired").text
    assert page.select("pre#raw") == page.select("table#segments") == []
    assert "MSA|CA|OLD1" in page.one("section#ack").text_content()  # the index keeps the ACK
    page = await client.get(f"/messages/{astm.id}")
    assert page.select("table#segments") == []
    assert "P|1||PAT7||بنعلي" in page.one("pre#raw").text
    assert "Pas encore traduit." in page.one("section#canonical").text_content()


@pytest_twisted.ensureDeferred
async def test_the_canonical_bundle_shows_its_decimals_as_stored(console):
    # FHIR decimals keep their precision (5.10 is not 5.1): the page shows what is delivered.
    from gateway.store.schema import canonical_bundles

    seeded = console.run(seed_message, control="DEC1")
    stored = ('{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":'
              '"Observation","valueQuantity":{"value":5.10},"note":[{"text":"بنعلي"}]}}],"total":0.010}')
    console.run(lambda c: c.execute(canonical_bundles.update()
                                    .where(canonical_bundles.c.message_id == seeded.id).values(bundle=stored)))
    client = console.client()
    await client.login("viewer")
    shown = (await client.get(f"/messages/{seeded.id}")).one("section#canonical pre").text
    assert '"value": 5.10\n' in shown and '"total": 0.010\n' in shown, shown
    assert json.loads(shown) == json.loads(stored) and "بنعلي" in shown and "\n  " in shown


@pytest_twisted.ensureDeferred
async def test_bidi_overrides_from_a_sender_are_named_not_obeyed(console):
    # RLO reversed what follows it: this PID-3 read "123456", a patient it is not.
    seeded = console.run(seed_message, control="\u202eRLO1", patient="\u202e654321",
                         name="\u202dبنعلي^فاطمة")
    client = console.client()
    await client.login("viewer")
    page = await client.get(f"/messages/{seeded.id}")
    assert page.status == 200 and "\u202e" not in page.text and "\u202d" not in page.text
    assert "PID|1||<U+202E>654321^^^CHUIR" in page.one("pre#raw").text
    pid3 = [row for row in page.select("table#segments tr.field") if row.cssselect("td.position")[0].text == "PID-3"]
    assert pid3[0].cssselect("bdi")[0].text == "<U+202E>654321^^^CHUIR^MR"
    assert page.select("td[dir=auto]:contains('<U+202E>RLO1')") and "<U+202D>بنعلي" in page.one("pre#raw").text
    listed = await client.get("/messages?control_id=%E2%80%AERLO1")  # found, and shown named too
    assert [a.text for a in listed.select("a.message-link")] == [str(seeded.id)]
    assert "\u202e" not in listed.text and "<U+202E>RLO1" in listed.one("table#messages").text_content()


# -- actions -----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_replay_and_dead_letter_move_the_delivery_and_say_so(console):
    seeded = console.run(seed_message, control="ACT1", deliveries={"shared-record": "dead", "cnss": "pending"})
    record, cnss = seeded.deliveries["shared-record"], seeded.deliveries["cnss"]
    keys = {r.id: r.idempotency_key for r in console.sql("SELECT id, idempotency_key FROM deliveries")}
    client = console.client()
    await client.login("operator")
    csrf = await client.csrf()
    before = now()
    page = await client.post(f"/messages/{seeded.id}/deliveries/{record}/replay", {"csrf_token": csrf})
    assert page.status == 303 and page.location == f"/messages/{seeded.id}?notice=replayed"
    shown = await client.get(page.location)
    assert "Nouvelle tentative" in shown.one(".notice").text
    row = console.run(lambda c: c.execute(select(deliveries).where(deliveries.c.id == record)).first())
    assert row.status == "pending" and row.attempts == 0 and row.finished_at is None
    assert row.idempotency_key == keys[record]
    due = row.next_attempt_at if row.next_attempt_at.tzinfo else row.next_attempt_at.replace(tzinfo=timezone.utc)
    assert before - timedelta(seconds=1) <= due <= now() + timedelta(seconds=1)
    (replayed,) = console.kinds("delivery.replayed")
    assert (replayed.actor, replayed.subject, replayed.destination) == ("operator", f"delivery/{record}",
                                                                         "shared-record")

    page = await client.post(f"/messages/{seeded.id}/deliveries/{cnss}/dead-letter", {"csrf_token": csrf})
    assert page.location == f"/messages/{seeded.id}?notice=dead-lettered"
    status = {r.destination: (r.status, r.last_reason) for r in console.sql("SELECT * FROM deliveries")}
    assert status["cnss"] == ("dead", "dead-lettered from the console by operator")
    assert [e.subject for e in console.kinds("delivery.dead")] == [f"delivery/{cnss}"]
    # A dead one cannot be dead-lettered again; a delivery of another message is not found.
    page = await client.post(f"/messages/{seeded.id}/deliveries/{cnss}/dead-letter", {"csrf_token": csrf})
    assert page.location.endswith("notice=not-pending")
    assert "lettre morte" in (await client.get(page.location)).one(".notice.error").text
    page = await client.post(f"/messages/{seeded.id + 1}/deliveries/{cnss}/replay", {"csrf_token": csrf})
    assert page.location.endswith("notice=not-found")
    # Held by a node right now: left alone.
    console.run(lambda c: c.execute(text("UPDATE deliveries SET lease_owner = 'gateway-2', lease_until = :until "
                                         "WHERE id = :id"), {"until": now() + timedelta(minutes=1), "id": record}))
    page = await client.post(f"/messages/{seeded.id}/deliveries/{record}/dead-letter", {"csrf_token": csrf})
    assert page.location.endswith("notice=in-flight")
    # The bundle expired: nothing to send again.
    gone = console.run(seed_message, control="ACT2", bundle=False, deliveries={"shared-record": "dead"})
    page = await client.post(f"/messages/{gone.id}/deliveries/{gone.deliveries['shared-record']}/replay",
                             {"csrf_token": csrf})
    assert page.location.endswith("notice=expired")
    assert len(console.kinds("delivery.replayed")) == 1


# -- destinations, facilities, mappings ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_destinations_show_depth_oldest_age_and_error_rate_of_the_last_hour(console):
    old = now() - timedelta(hours=3)
    waiting = console.run(seed_message, control="D1", received_at=old, deliveries={"shared-record": "pending"})
    console.run(seed_message, control="D2", deliveries={"shared-record": "pending", "cnss": "delivered"})
    record = waiting.deliveries["shared-record"]
    console.run(seed_attempt, record, at=old, outcome="transient", code=503)  # over an hour ago
    for minutes, outcome in ((50, "transient"), (30, "transient"), (10, "delivered"), (5, "transient")):
        console.run(seed_attempt, record, at=now() - timedelta(minutes=minutes), outcome=outcome)
    client = console.client()
    await client.login("viewer")
    page = await client.get("/destinations")
    rows = {r.get("data-destination"): r for r in page.select("table#destinations tr.destination")}
    assert list(rows) == ["shared-record", "cnss"]
    shared = rows["shared-record"]
    assert shared.cssselect("td.depth")[0].text == "2"
    assert shared.cssselect("td.oldest")[0].text.startswith("3 h")
    assert shared.cssselect("td.error-rate")[0].text == "75,0 % (3/4)"
    assert rows["cnss"].cssselect("td.depth")[0].text == "0"
    assert "aucune tentative" in rows["cnss"].cssselect("td.error-rate")[0].text


@pytest_twisted.ensureDeferred
async def test_facilities_show_the_certificates_seen_and_their_expiry(console):
    def certificates(connection):
        for facility, days, subject in (("CHUIR", 200, "CN=CHUIR,O=MA HIE facility"),
                                        ("CHUIR", 12, "CN=CHUIR-2,O=MA HIE facility"),
                                        ("LAB-ANFA", -3, "CN=LAB-ANFA"), ("GHOST", 90, "CN=GHOST")):
            connection.execute(facility_certificates.insert().values(
                facility_id=facility, sha256=hashlib.sha256(subject.encode()).hexdigest(), subject=subject,
                issuer="CN=MA HIE dev CA", not_after=now() + timedelta(days=days), first_seen_at=now(),
                last_seen_at=now(), door="mllp-tls"))
    console.run(certificates)
    client = console.client()
    await client.login("viewer")
    page = await client.get("/facilities")
    rows = {r.get("data-facility"): r for r in page.select("table#facilities tr.facility")}
    assert list(rows) == ["CHUIR", "LAB-ANFA"]
    assert rows["CHUIR"].cssselect("td[dir=auto]")[0].text == SENDERS[0].name
    states = [c.get("class") for c in rows["CHUIR"].cssselect("div.certificate")]
    assert states == ["certificate expiring", "certificate valid"]  # the one expiring first first
    assert "expire dans 11 j" in rows["CHUIR"].text_content() or "expire dans 12 j" in rows["CHUIR"].text_content()
    assert [c.get("class") for c in rows["LAB-ANFA"].cssselect("div.certificate")] == ["certificate expired"]
    assert "GHOST" in page.one("ul").text_content()  # seen, but not in the registry


@pytest_twisted.ensureDeferred
async def test_mappings_page_shows_the_version_and_files_and_only_admins_reload(make_config, db_url, repo_mappings):
    reloads = []

    def reload():
        from twisted.internet import defer
        reloads.append(1)
        return defer.succeed(True)

    started = start_console(console_config(make_config, db_url), Clock(), mappings=repo_mappings,
                            reload_mappings=reload)
    try:
        operator = started.client()
        await operator.login("operator")
        page = await operator.get("/mappings")
        assert page.one("#mapping-version").text == repo_mappings.version
        files = [r.cssselect("td")[0].text for r in page.select("tr.mapping-file")]
        assert "messages/ADT_A01.yaml" in files and len(files) >= 20
        assert page.select("form#reload") == []
        csrf = page.one("form#logout input[name=csrf_token]").get("value")
        assert (await operator.post("/mappings/reload", {"csrf_token": csrf})).status == 403
        admin = started.client()
        await admin.login("admin")
        page = await admin.get("/mappings")
        csrf = page.one("form#reload input[name=csrf_token]").get("value")
        page = await admin.post("/mappings/reload", {"csrf_token": csrf})
        assert page.status == 303 and page.location == "/mappings?notice=reloaded"
        assert reloads == [1]
        assert "rechargé" in (await admin.get(page.location)).one(".notice").text
        (event,) = started.kinds("mappings.reloaded")
        assert (event.actor, event.outcome, event.detail["version"]) == ("admin", "success", repo_mappings.version)
    finally:
        await stop_console(started)


# -- hostile input -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_hostile_input_is_refused_or_escaped(console):
    script = "<script>alert(1)</script>"
    evil = console.run(seed_message, control='X"><img src=x onerror=alert(1)>',
                       name=f"{script}^&amp;", patient="<b>P</b>", sender="CHUIR")
    client = console.client()
    await client.login("operator")
    for query in ("status=nonsense", "since=yesterday", "until=2025-13-40", "type=%3Cscript%3E",
                  "control_id=" + "A" * 129, "before=abc", "before=-1", "before=%C2%B2", "control_id=%FF%FE",
                  "control_id=a%00b", "&".join(f"x{i}=1" for i in range(40)),
                  "since=2025-01-02&until=2025-01-01", "status=failed&status=rejected"):
        page = await client.get("/messages?" + query)
        assert page.status == 400, (query, page.status)
        assert page.select("form#search")  or page.select("p.error"), query
    assert (await client.get("/messages?control_id=" + "A" * 5000)).status == 400
    page = await client.get("/messages?status=nonsense")
    assert page.one("ul.error li").text == "Statut : inconnu"
    assert (await client.get("/messages/99999999999999999999")).status == 404
    assert (await client.get("/messages/12abc")).status == 404
    assert (await client.get(f"/messages/{evil.id + 1000}")).status == 404
    assert (await client.request("PUT", "/messages")).status == 405

    page = await client.get(f"/messages/{evil.id}")
    assert page.status == 200
    body = page.text
    assert script not in body and "<img src=x" not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert page.select("script") == [] and page.select("img") == []
    assert page.one("section#summary td[dir=auto]:contains('onerror')") is not None
    page = await client.get("/messages?control_id=" + "%3Cscript%3E")
    assert page.status == 200 and page.select("script") == []
    assert page.one("form#search input[name=control_id]").get("value") == "<script>"

    csrf = await client.csrf()
    page = await client.request("POST", "/logout", body=b"csrf_token=" + csrf.encode() + b"&x=" + b"y" * 100_000,
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert page.status == 413
    assert (await client.get("/messages")).status == 200  # not logged out by it
    # After login, only a path of this site.
    other = console.client()
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example", "/logout"):
        page = await other.post("/login", {"username": "viewer", "password": PASSWORDS["viewer"], "next": target})
        assert page.status == 303 and page.location == "/messages", target
    # A forged or malformed cookie is no session.
    for cookie in ("A" * 43, "short", "x" * 500, "é"):
        forged = console.client()
        forged.cookies["gw_console"] = cookie
        assert (await forged.get("/messages")).status == 303
    # The style sheet needs no login and carries no patient data.
    page = await console.client().get("/static/console.css")
    assert page.status == 200 and page.header("content-type").startswith("text/css")


@pytest_twisted.ensureDeferred
async def test_allowed_sources_close_other_connections(make_config, db_url):
    config = console_config(make_config, db_url)
    config = dataclasses.replace(config, admin=(AdminListenerConfig("admin", 0, allow_sources=("10.9.0.0/16",)),))
    started = start_console(config, Clock())
    try:
        with pytest.raises(ConnectionError):  # closed before any answer
            await started.client().get("/login")
    finally:
        await stop_console(started)


def test_a_refused_source_is_closed_by_a_protocol_not_none():
    """A TLS listener wraps what buildProtocol returns: None (a refused source) was an unhandled
    error and a connection left open; a protocol that closes it at once is not."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from twisted.web import resource

    from gateway.console.web import _ConsoleSite

    site = _ConsoleSite(resource.Resource())
    site.allowed = lambda host: host.startswith("10.9.")
    refused = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.disconnecting and transport.value() == b""
    assert site.buildProtocol(IPv4Address("TCP", "10.9.0.1", 5000)) is not None


@pytest_twisted.ensureDeferred
async def test_over_plain_http_only_addresses_localhost_and_named_hosts_reach_the_console(make_config, db_url):
    """DNS rebinding: a web page whose name now points at 127.0.0.1 is, for the browser, the
    console's origin; it could try passwords through the operator's browser and read the pages
    of an account it guessed. Its requests carry its own name as Host: 421, nothing done."""
    config = console_config(make_config, db_url)
    config = dataclasses.replace(config, admin=(AdminListenerConfig("admin", 0, hosts=("console.gateway.sante.ma",)),))
    started = start_console(config, Clock())
    try:
        client, port = started.client(), started.port.getHost().port
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example",
                     "[::1.evil]", "console.gateway.sante.ma.evil.example"):
            page = await client.get("/login", headers={"Host": host})
            assert page.status == 421 and "listeners.admin (admin).hosts" in page.text, host
        refused = await client.post("/login", {"username": "admin", "password": PASSWORDS["admin"]},
                                    headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
        assert refused.status == 421 and not client.cookies
        assert started.sql("SELECT count(*) FROM console_sessions")[0][0] == 0
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "10.20.0.5",
                     f"Console.Gateway.Sante.MA:{port}"):
            assert (await client.get("/login", headers={"Host": host})).status == 200, host
        page = await client.login("viewer")  # its own Host: 127.0.0.1:port
        assert page.status == 303 and page.header("server") == "ma-hie-gateway"  # no version
    finally:
        await stop_console(started)



def _answer(port: int, method: str, target: str, body: bytes | None = None) -> tuple[int, str, str | None]:
    """The status, reason phrase and Server header of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        connection.request(method, target, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, response.reason, response.getheader("server")
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_answers_carry_their_reason_phrase_and_no_twisted_version(console):
    """OPTIONS * is answered by Twisted, not the console: it named TwistedWeb and its version.
    A paused login went out as "429 Unknown Status" (Twisted knows no phrase for 429)."""
    port = console.port.getHost().port
    assert await threads.deferToThread(_answer, port, "OPTIONS", "*") == (200, "OK", "ma-hie-gateway")
    client = console.client()
    for attempt in ("one", "two", "three"):
        assert (await client.post("/login", {"username": "operator", "password": attempt})).status == 401
    paused = await threads.deferToThread(_answer, port, "POST", "/login", b"username=operator&password=x")
    assert paused == (429, "Too Many Requests", "ma-hie-gateway")

@pytest_twisted.ensureDeferred
async def test_a_tls_listener_asks_no_client_certificate_and_secures_the_cookie(make_config, db_url, dev_pki):
    config = dataclasses.replace(console_config(make_config, db_url),
                                 admin=(AdminListenerConfig("admin-tls", 0, tls=True),))
    engine = create_gateway_engine(config.database.url)
    migrate(engine)
    database = Database(engine, reactor, 2)
    database.start()
    # What admin_services reads of the store and identity services: their database and registry.
    store = SimpleNamespace(database=database)
    identity = SimpleNamespace(registry=RegistryRef(FacilityRegistry(SENDERS)))
    events, heard = EventBus(), []
    events.subscribe(heard.append)
    (service,) = admin_services(config, store, identity, None, None, reactor, events=events)
    assert service.name == "admin-tls"
    service.startService()
    try:
        port = await listening_port(service)
        context = ssl.create_default_context(cafile=os.path.join(dev_pki, "ca.crt"))  # no client cert
        client = Client(port.getHost().port, tls=context)
        page = await client.post("/login", {"username": "viewer", "password": PASSWORDS["viewer"]})
        assert page.status == 303
        assert re.search(r"(?i);\s*secure", page.header("set-cookie"))
        page = await client.get("/facilities")
        assert page.status == 200 and [r.get("data-facility") for r in page.select("tr.facility")] == ["CHUIR", "LAB-ANFA"]
        assert page.header("strict-transport-security") == "max-age=31536000"
        # Over TLS the certificate's names refuse a rebound name: any Host is served.
        assert (await client.get("/facilities", headers={"Host": "console.example"})).status == 200
        assert "Pas de mappings" not in page.text and (await client.get("/mappings")).status == 200
        plain = Client(port.getHost().port)
        with pytest.raises((ConnectionError, http.client.HTTPException)):  # TLS only
            await plain.get("/login")
        for _ in range(100):  # the server's side of the failed handshake ends just after
            if any(e.kind == "tls.handshake_failed" for e in heard):
                break
            await deferLater(reactor, 0.02, lambda: None)
        [failed] = [e for e in heard if e.kind == "tls.handshake_failed"]  # the good ones are not
        assert failed.listener == "admin-tls" and failed.detail["reason"]
    finally:
        await service.stopService()
        database.stop()

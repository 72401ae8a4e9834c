"""Retention in the running gateway and on the command line: when the daily run falls (local
time, clock changes), the months created at start before any listener opens, the scheduled run
in the database pool, a failed run logged and tried again the next day, and `gateway retention
run` as a real process."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import pytest_twisted
from sqlalchemy import func, select, text
from twisted.internet import defer, reactor, task

from gateway.audit.trail import AuditTrail
from gateway.config import RetentionConfig
from gateway.retention.schedule import DEFAULT_ZONE, local_zone, next_run, parse_run_at
from gateway.retention.service import RetentionService
from gateway.store.database import Database, create_gateway_engine, migrate
from gateway.store.schema import message_payloads
from process_support import child_environment
from test_retention_run import NOW, TIMES, audit_records, store_messages

CASABLANCA = ZoneInfo("Africa/Casablanca")


def utc(*parts) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


# -- When ------------------------------------------------------------------------------------


def test_next_run_is_the_next_time_the_local_clock_reads_run_at():
    # Casablanca is UTC+1 outside Ramadan: 03:00 local is 02:00 UTC.
    assert next_run(utc(2026, 11, 22, 1, 0), "03:00", CASABLANCA) == utc(2026, 11, 22, 2, 0)
    assert next_run(utc(2026, 11, 22, 2, 0), "03:00", CASABLANCA) == utc(2026, 11, 23, 2, 0)
    assert next_run(utc(2026, 11, 22, 19, 0), "03:00", CASABLANCA) == utc(2026, 11, 23, 2, 0)
    assert next_run(utc(2026, 11, 22, 19, 0), "03:00", ZoneInfo("UTC")) == utc(2026, 11, 23, 3, 0)
    # A naive instant is UTC.
    assert next_run(datetime(2026, 11, 22, 1, 0), "03:00", CASABLANCA) == utc(2026, 11, 22, 2, 0)


def test_next_run_follows_the_clock_changes_of_ramadan():
    """Morocco sets its clocks back to UTC+0 for Ramadan (2026: 15 February to 22 March): the
    run stays at 03:00 on the wall clock."""
    before = next_run(utc(2026, 2, 10, 12), "03:00", CASABLANCA)
    during = next_run(utc(2026, 3, 1, 12), "03:00", CASABLANCA)
    assert before.astimezone(CASABLANCA).strftime("%H:%M") == "03:00"
    assert during.astimezone(CASABLANCA).strftime("%H:%M") == "03:00"
    assert (before.hour, during.hour) == (2, 3)


def test_local_zone_from_tz_else_casablanca(caplog):
    assert local_zone({"TZ": "Europe/Paris"}) == ZoneInfo("Europe/Paris")
    assert local_zone({"TZ": ":UTC"}) == ZoneInfo("UTC")
    assert local_zone({}) == ZoneInfo(DEFAULT_ZONE)
    with caplog.at_level(logging.WARNING):
        assert local_zone({"TZ": "Mars/Olympus"}) == ZoneInfo(DEFAULT_ZONE)
    assert "names no time zone" in caplog.text


def test_run_at_must_be_hours_and_minutes():
    assert parse_run_at("03:00").hour == 3 and parse_run_at("23:45").minute == 45
    for bad in ("3", "03:0", "ab:cd", "25:00"):
        with pytest.raises(ValueError):
            parse_run_at(bad)


# -- In the running gateway ------------------------------------------------------------------


@pytest.fixture
def database(db_url):
    engine = create_gateway_engine(db_url)
    migrate(engine)
    database = Database(engine, reactor, threads=2)
    database.start()
    yield database
    database.stop()


def service_config(make_config, db_url, **retention):
    import dataclasses

    config = make_config(db_url)
    return dataclasses.replace(config, retention=RetentionConfig(**retention))


@pytest_twisted.inlineCallbacks
def test_the_gateway_creates_the_months_before_its_listeners_open(make_config, pg_url, running_gateway):
    config = make_config(pg_url)
    yield running_gateway(config)
    engine = create_gateway_engine(pg_url)
    try:
        with engine.connect() as conn:
            names = set(conn.execute(text("SELECT relname FROM pg_class")).scalars())
    finally:
        engine.dispose()
    month = datetime.now(timezone.utc)
    assert f"message_payloads_{month:%Y_%m}" in names and f"audit_log_{month:%Y_%m}" in names


@pytest_twisted.inlineCallbacks
def test_the_daily_run_happens_at_run_at_and_the_next_is_scheduled(make_config, db_url, database):
    store_messages(database.engine, TIMES)
    # The clock read 02:59:59.5 in Casablanca on the day of NOW: the run is half a second away.
    started, real = datetime(2026, 6, 15, 2, 59, 59, 500000, tzinfo=CASABLANCA), reactor.seconds()
    config = service_config(make_config, db_url, raw_payloads=60, run_at="03:00", batch_size=3)
    service = RetentionService(config, database, reactor, zone=CASABLANCA,
                               clock=lambda: started + timedelta(seconds=reactor.seconds() - real))
    service.startService()
    try:
        assert 0 < service.call.getTime() - reactor.seconds() <= 0.6
        while service.last_report is None:
            yield task.deferLater(reactor, 0.05, lambda: None)
        report = service.last_report
        assert {k.kind: k for k in report.kinds}["raw_payloads"].days == 60
        with database.engine.connect() as conn:
            left = conn.execute(select(func.count()).select_from(message_payloads)).scalar()
        assert 0 < left < len(TIMES)
        # The next run: tomorrow at 03:00 local time.
        assert service.call is not None and service.call.active()
        assert 86398 < service.call.getTime() - reactor.seconds() <= 86400.5
    finally:
        yield defer.maybeDeferred(service.stopService)
    assert service.call is None


def test_the_audit_expiry_waits_for_the_configured_atna_collector(make_config, tmp_path):
    """The service (and `gateway retention run`) name the collector of audit.export, under
    the name the export keeps its progress by; none without an export."""
    import dataclasses

    from gateway.audit.export import collector_name
    from gateway.config import AuditConfig, AuditExportConfig
    from gateway.retention.service import audit_exports_of

    config = make_config(f"sqlite:///{tmp_path / 'x.sqlite'}")
    assert audit_exports_of(config) == ()
    exported = dataclasses.replace(config, audit=AuditConfig(
        export=AuditExportConfig("atna.sante.gov.ma", 6514)))
    assert audit_exports_of(exported) == (collector_name("atna.sante.gov.ma", 6514),)


@pytest_twisted.inlineCallbacks
def test_a_failed_run_is_logged_and_tried_again_the_next_day(make_config, tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'broken.sqlite'}"
    engine = create_gateway_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE message_payloads"))  # what a run needs is gone
    database = Database(engine, reactor, threads=1)
    database.start()
    config = service_config(make_config, url, raw_payloads=1)
    service = RetentionService(config, database, reactor)
    service.startService()
    try:
        with caplog.at_level(logging.ERROR):
            report = yield service.run_now()
        assert report is None
        assert "retention run failed, tried again tomorrow" in caplog.text
        assert service.call is not None and service.call.active()
        assert 0 < service.call.getTime() - reactor.seconds() <= 86400
    finally:
        yield defer.maybeDeferred(service.stopService)
        database.stop()


@pytest_twisted.inlineCallbacks
def test_stopping_waits_for_the_run_in_progress(make_config, db_url, database):
    store_messages(database.engine, TIMES)
    config = service_config(make_config, db_url, raw_payloads=60, batch_size=1)
    service = RetentionService(config, database, reactor, clock=lambda: NOW)
    service.startService()
    running = service.run_now()
    stopped = defer.maybeDeferred(service.stopService)
    yield stopped
    assert running.called and service.in_progress is None and service.call is None


# -- On the command line ---------------------------------------------------------------------


def test_gateway_retention_run_prints_the_report(tmp_path, dev_pki, db_url):
    engine = create_gateway_engine(db_url)
    migrate(engine)
    store_messages(engine, TIMES)
    audit_records(AuditTrail(engine, "node-1"), TIMES)
    engine.dispose()
    config = tmp_path / "gateway.yaml"
    config.write_text(textwrap.dedent(f"""\
        node: {{name: cli-retention}}
        database: {{url: "{db_url}"}}
        pki: {{ca: {dev_pki}/ca.crt, cert: {dev_pki}/gateway.crt, key: {dev_pki}/gateway.key}}
        identity: {{application: MA_HIE_GATEWAY, facility: MA_HIE}}
        retention: {{raw_payloads: 60, canonical: 30, audit: 90, batch_size: 4}}
        """), encoding="utf-8")
    gateway = os.path.join(sys.prefix, "bin", "gateway")

    def cli(*args, command=("retention", "run")):
        return subprocess.run([gateway, *command, "-c", str(config), *args], cwd=tmp_path,
                              env=child_environment(), capture_output=True, text=True, timeout=60)

    done = cli("--now", "2026-06-15T03:00:00Z")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("retention run at 2026-06-15T03:00:00Z on ")
    assert "raw_payloads  60 days: recorded before" in done.stdout
    assert "audit         90 days: recorded before" in done.stdout
    # The trail starts after the expired records, and `gateway audit verify` accepts it.
    verified = cli(command=("audit", "verify"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    expired = 3 if "postgresql" in db_url else 4  # whole months on PostgreSQL
    assert f"expired: records 1 to {expired} (vouched for" in verified.stdout
    assert verified.stdout.rstrip().endswith("intact")
    again = cli("--now", "2026-06-15T03:00:00Z", "--json")
    report = json.loads(again.stdout)
    assert [k["kind"] for k in report["kinds"]] == ["raw_payloads", "canonical", "audit"]
    assert report["kinds"][0]["rows"] == 0 and report["kinds"][0]["partitions"] == []
    bad = cli("--now", "yesterday")
    assert bad.returncode == 2 and "not an ISO 8601 instant" in bad.stderr
    # A mistyped year would count back from the future (and expire what is to be kept), or
    # overflow: refused, nothing run.
    for typo in ("2062-06-15T03:00:00Z", "0001-01-02T00:00:00Z"):
        refused = cli("--now", typo)
        assert refused.returncode == 2 and "not between 2000-01-01 and the present" in refused.stderr
    zero = cli("--batch", "0", command=("audit", "verify"))
    assert zero.returncode == 2 and "not a whole number of at least 1" in zero.stderr

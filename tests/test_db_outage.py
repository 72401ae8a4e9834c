"""A running gateway (`gateway run`, PostgreSQL) through database outages, under a steady MLLP
load, delivering to the reference shared record and exporting its audit trail to a collector.
The outages are made per database, never by stopping the server: every connection of the
gateway killed again and again, then the database closed to connections for a few seconds,
then the messages table locked by another session. (And on SQLite: another process holding
the write lock.)
During them senders get AE with ERR-3 207 and ERR-5 STORE_UNAVAILABLE, never a positive ACK
for what was not stored, and /health/ready says not ready; the gateway neither crashes nor
spins. After them, without a restart, everything resumes on its own: each message a sender
got AA for is stored, translated and in the record exactly once, the audit chain verifies
and reaches the collector, and the log tells each outage in a few lines."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import psycopg
import pytest
import pytest_twisted
from sqlalchemy.engine import make_url
from twisted.internet import reactor, threads
from twisted.internet.task import deferLater

import hl7msgs
from adapters.mllp.client import MllpClient, describe
from delivery_support import until
from process_support import (child_environment, free_port, start_gateway, stop_processes, terminate,
                             write_record_node_config)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
SENDERS = 2


def oru(number: int, control_id: str) -> bytes:
    """The benchmark's ORU^R01 with its own control id and patient (PID-3)."""
    text = hl7msgs.TEMPLATES["oru"].replace(hl7msgs.CID, control_id)
    return text.replace("4500987654", f"66{number:08d}").encode("utf-8")


@dataclass
class Sender:
    """A HIS: sends its messages one after the other, each again (after a pause) until it
    gets a positive ACK, as the README asks of a sender that got AE or no answer."""

    number: int
    port: int
    acked: list[str] = field(default_factory=list)
    negative: list[tuple[str, dict]] = field(default_factory=list)  # (control id, describe())
    unanswered: int = 0
    sent: int = 0

    def run(self, stop: threading.Event) -> None:
        client = None
        i = 0
        while not stop.is_set():
            i += 1
            number = self.number * 100_000 + i
            control_id = f"OUT{number:09d}"
            raw = oru(number, control_id)
            while True:  # this message until it is acknowledged (or the test ends)
                try:
                    if client is None:
                        client = MllpClient("127.0.0.1", self.port, timeout=10)
                    self.sent += 1
                    answer = describe(client.send(raw).response)
                except Exception:  # reset, closed, timed out: send it again on a new connection
                    self.unanswered += 1
                    if client is not None:
                        client.close()
                    client = None
                    time.sleep(0.2)
                    continue
                if answer["msa1"] in ("AA", "CA"):
                    self.acked.append(control_id)
                    break
                self.negative.append((control_id, answer))
                if stop.is_set():
                    break
                time.sleep(0.2)
            time.sleep(0.02)
        if client is not None:
            client.close()


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Outage:
    """Database-level outages of one database, made from the server's `postgres` database."""

    def __init__(self, pg_url: str):
        url = make_url(pg_url)
        self.database = url.database
        self.host, self.port, self.user = url.host or "127.0.0.1", url.port or 5432, url.username or "postgres"
        self.conn = psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres",
                                    autocommit=True)

    def kill_connections(self) -> int:
        return len(self.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND pid <> pg_backend_pid()", (self.database,)).fetchall())

    def connections(self) -> int:
        return self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                                 (self.database,)).fetchone()[0]

    def lock(self, table: str) -> psycopg.Connection:
        """A session of the gateway's database holding `table` locked until it is closed."""
        conn = psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=self.database)
        conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        return conn

    def allow(self, allowed: bool) -> None:
        self.conn.execute(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS {str(allowed).lower()}')

    def close(self) -> None:
        self.allow(True)
        self.conn.close()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_a_database_outage_under_load_is_refused_precisely_and_everything_resumes(
        pg_url, dev_pki, peers, tmp_path):
    from test_audit_export import Collector

    collector = Collector(dev_pki)
    mllp, admin = free_port(), free_port()
    config = write_record_node_config(tmp_path / "conf", "outage-node", pg_url, mllp, dev_pki, peers.url("record"),
                                      admin_port=admin,
                                      more=f"audit: {{export: {{host: 127.0.0.1, port: {collector.port}, source_id: MA-HIE-TEST}}}}\n")
    process = yield threads.deferToThread(start_gateway, config, tmp_path, mllp, "gateway.log")
    outage = Outage(pg_url)
    stop = threading.Event()
    senders = [Sender(n + 1, mllp) for n in range(SENDERS)]
    running = [threads.deferToThread(s.run, stop) for s in senders]
    try:
        deadline = time.monotonic() + 30  # the senders are under way
        while sum(len(s.acked) for s in senders) <= 5:
            assert time.monotonic() < deadline, [len(s.acked) for s in senders]
            yield sleep(0.2)
        status, _ = yield threads.deferToThread(admin_get, admin, "/health/ready")
        assert status == 200

        # Outage 1: every connection of the gateway killed, again and again, for 3 s.
        log_before = (tmp_path / "gateway.log").read_bytes()
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            yield threads.deferToThread(outage.kill_connections)
            yield sleep(0.1)
        yield sleep(2.0)

        # Outage 2: the database closed to connections for 6 s (and those open killed).
        yield threads.deferToThread(outage.allow, False)
        yield threads.deferToThread(outage.kill_connections)
        # Counted once no connection is left: what was acknowledged until then was stored
        # before the outage (the senders went on while it was being set up).
        acked_between = sum(len(s.acked) for s in senders)
        started, cpu_before = time.monotonic(), cpu_seconds(process.pid)
        readiness = []
        while time.monotonic() - started < 6.0:
            yield sleep(0.5)
            status, body = yield threads.deferToThread(admin_get, admin, "/health/ready")
            readiness.append(status)
        cpu = (cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - started)
        negatives_during = [answer for s in senders for _cid, answer in s.negative]
        acked_during = sum(len(s.acked) for s in senders) - acked_between
        yield threads.deferToThread(outage.allow, True)
        back = time.monotonic()

        assert process.poll() is None, "the gateway exited during the outage"
        assert cpu < 0.8, f"the gateway used {cpu:.0%} of a core during the outage"
        assert readiness[-1] == 503 and readiness.count(503) >= len(readiness) - 1, readiness
        assert json.loads(body)["checks"]["database"]["ok"] is False
        # Each sender waits on one message: at most one ACK per sender may have been in flight.
        assert acked_during <= SENDERS, acked_during
        assert negatives_during, "no negative ACK during the outage"
        for answer in negatives_during:
            assert answer["msa1"] in ("AE", "CE"), answer
            (err,) = answer["errors"]
            assert "|207" in err and "STORE_UNAVAILABLE" in err, err

        # Back: ready, and taking messages again, within seconds.
        while True:
            status, body = yield threads.deferToThread(admin_get, admin, "/health/ready")
            if status == 200:
                break
            assert time.monotonic() - back < 10, f"not ready 10 s after the outage: {body!r}"
            yield sleep(0.2)
        acked_back = sum(len(s.acked) for s in senders)
        while sum(len(s.acked) for s in senders) < acked_back + 20:
            assert time.monotonic() - back < 15, "ingest did not resume"
            yield sleep(0.2)

        # Outage 3: another session holds the messages table locked for 4 s.
        locked = yield threads.deferToThread(outage.lock, "messages")
        yield sleep(4.0)
        acked_locked = sum(len(s.acked) for s in senders)
        yield threads.deferToThread(locked.close)
        assert process.poll() is None
        unlocked = time.monotonic()
        while sum(len(s.acked) for s in senders) < acked_locked + 20:
            assert time.monotonic() - unlocked < 15, "ingest did not resume after the lock"
            yield sleep(0.2)
        yield sleep(2.0)
    finally:
        stop.set()
        for finished in running:
            yield finished
    try:
        acked = sorted(cid for s in senders for cid in s.acked)
        assert len(acked) == len(set(acked))
        # Every positive ACK stored once, nothing stored that was not acknowledged in the end.
        stored = yield until("SELECT control_id, status FROM messages WHERE accepted ORDER BY control_id",
                             lambda f: [r.control_id for r in f] == acked
                             and all(r.status == "translated" for r in f), pg_url, timeout=20)
        assert len(stored) == len(acked)
        yield until("SELECT d.status FROM deliveries d",
                    lambda f: len(f) == len(acked) and all(r.status == "delivered" for r in f),
                    pg_url, timeout=30)
        record = sqlite3.connect(tmp_path / "peers" / "record.sqlite")
        try:
            patients = record.execute("SELECT id, version FROM resources WHERE type = 'Patient'").fetchall()
        finally:
            record.close()
        assert len(patients) == len(acked) and all(version == 1 for _id, version in patients)
        # The audit trail verifies, and the collector got it all.
        verify = yield threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "gateway", "audit", "verify", "-c", config],
            cwd=tmp_path, env=child_environment(), capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        last = yield until("SELECT max(seq) AS seq FROM audit_log", lambda f: f[0].seq, pg_url)
        deadline = time.monotonic() + 20
        while not collector.messages or max(collector.seqs()) < last[0].seq:
            assert time.monotonic() < deadline, "the audit export did not resume"
            yield sleep(0.2)
        assert set(range(1, last[0].seq + 1)) <= set(collector.seqs())
        # Metrics answer and count what was stored.
        status, text = yield threads.deferToThread(admin_get, admin, "/metrics")
        assert status == 200
        received = sum(float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
                       if line.startswith("gateway_messages_received_total"))
        assert received == len(acked)
        # No connection leaked: the pool's size at most.
        connections = yield threads.deferToThread(outage.connections)
        assert connections <= 16, connections
        # The log tells each outage in a few lines rather than one per unit of work.
        log = (tmp_path / "gateway.log").read_bytes()[len(log_before):].decode("utf-8", "replace")
        problems = [json.loads(line) for line in log.splitlines()
                    if '"level": "error"' in line or '"level": "warn"' in line]
        assert len(problems) <= 12, "\n".join(p["message"][:200] for p in problems)
        told = [p["message"] for p in problems if p["namespace"] == "gateway.store.database"]
        assert any(m.startswith("database unavailable: connection failed") and
                   "not currently accepting connections" in m for m in told), told
        assert any(m.startswith("database available again after") for m in told), told
    finally:
        outage.close()
        terminate(process)
        yield threads.deferToThread(stop_processes, process)
        yield collector.stop()


def write_sqlite_config(root, db_path, dev_pki: str, mllp: int, admin: int) -> str:
    conf = root / "conf"
    conf.mkdir(parents=True)
    (conf / "facilities.yaml").write_text("facilities: []\n", encoding="utf-8")
    path = conf / "gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        node: {{name: outage-sqlite}}
        log_level: info
        database: {{url: "sqlite:///{db_path}"}}
        pki: {{ca: {dev_pki}/ca.crt, cert: {dev_pki}/gateway.crt, key: {dev_pki}/gateway.key}}
        listeners:
          mllp:
            - {{name: mllp-plain, port: {mllp}, interface: 127.0.0.1, accept_unknown_senders: true}}
          admin:
            - {{name: admin, port: {admin}, interface: 127.0.0.1}}
        facilities: conf/facilities.yaml
        mappings: {{directory: {ROOT}/mappings}}
        """), encoding="utf-8")
    return str(path)


@pytest_twisted.inlineCallbacks
def test_sqlite_write_lock_held_by_another_process_delays_and_then_everything_resumes(dev_pki, tmp_path):
    """Another process holds SQLite's write lock (BEGIN IMMEDIATE) for 5 s: senders wait, no
    positive ACK is given for what is not stored, and once it lets go everything acknowledged
    is stored and translated, the gateway still running."""
    db_path = tmp_path / "var" / "gateway.sqlite"
    mllp, admin = free_port(), free_port()
    config = write_sqlite_config(tmp_path, db_path, dev_pki, mllp, admin)
    process = yield threads.deferToThread(start_gateway, config, tmp_path, mllp, "gateway.log")
    stop = threading.Event()
    senders = [Sender(n + 1, mllp) for n in range(SENDERS)]
    running = [threads.deferToThread(s.run, stop) for s in senders]
    holder = None
    try:
        yield sleep(1.5)
        holder = sqlite3.connect(db_path, isolation_level=None, timeout=30, check_same_thread=False)
        yield threads.deferToThread(holder.execute, "BEGIN IMMEDIATE")
        acked_at_lock = sum(len(s.acked) for s in senders)
        yield sleep(5.0)
        # A sender may have had its ACK on its way when the lock was taken; none after that.
        assert sum(len(s.acked) for s in senders) <= acked_at_lock + SENDERS
        holder.execute("ROLLBACK")
        holder.close()
        holder = None
        released = time.monotonic()
        while sum(len(s.acked) for s in senders) < acked_at_lock + 20:
            assert time.monotonic() - released < 15, "ingest did not resume after the lock"
            yield sleep(0.2)
        assert process.poll() is None
    finally:
        stop.set()
        for finished in running:
            yield finished
        if holder is not None:
            holder.close()
    try:
        acked = sorted(cid for s in senders for cid in s.acked)
        url = f"sqlite:///{db_path}"
        yield until("SELECT control_id, status FROM messages WHERE accepted ORDER BY control_id",
                    lambda f: [r.control_id for r in f] == acked
                    and all(r.status == "translated" for r in f), url, timeout=20)
    finally:
        terminate(process)
        yield threads.deferToThread(stop_processes, process)

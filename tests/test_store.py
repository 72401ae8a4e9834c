"""The store: migrations match the schema, SQLite durability settings, the group-commit ingest
writer (duplicates, reused control ids, failures, two nodes), and the read queries."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import hl7msgs
import pytest
from alembic.config import Config as AlembicConfig
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, select, text

from adapters.hl7v2.ack import AckBuilder
from adapters.mllp.client import describe
from gateway.audit.trail import AuditTrail
from gateway.ingest.inspect import IngestPolicy, Inspector, refuse_reused
from gateway.store.database import _ALEMBIC_INI as ALEMBIC_INI, create_gateway_engine, migrate
from gateway.store.ingest_writer import IngestJob, IngestWriter
from gateway.store.queries import MessageFilter, count_messages, get_message, list_messages
from gateway.store.schema import message_payloads, messages, metadata

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def hl7(control_id: str, kind: str = "ADT^A01^ADT_A01", charset: str = "UNICODE UTF-8",
        body: str = "PID|1||P-1^^^CHU^PI||Benali^Karim", application: str = "HIS_TEST",
        facility: str = "FAC_TEST", encoding: str = "utf-8") -> bytes:
    """A small synthetic v2.5 message in original acknowledgement mode."""
    msh = (f"MSH|^~\\&|{application}|{facility}|MA_HIE_GATEWAY|MA_HIE|20250114083512||{kind}|"
           f"{control_id}|P|2.5|||||MAR|{charset}")
    return (msh + "\r" + body + "\r").encode(encoding)


def bad_hl7(control_id: str, reason: str) -> bytes:
    """A synthetic message refused by inspection (unknown message type)."""
    return hl7(control_id, kind="XYZ^A01", body=f"NTE|1||{reason}")


class Outcomes:
    """Collects done(job, error) calls (any thread)."""

    def __init__(self):
        self.calls: list[tuple[IngestJob, Exception | None]] = []
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.expected = 0

    def done(self, job, error):
        with self.lock:
            self.calls.append((job, error))
            if len(self.calls) >= self.expected:
                self.event.set()

    def wait(self, count: int, timeout: float = 30.0) -> list[tuple[IngestJob, Exception | None]]:
        with self.lock:
            self.expected = count
            if len(self.calls) >= count:
                self.event.set()
        assert self.event.wait(timeout), f"only {len(self.calls)} of {count} jobs answered"
        with self.lock:
            self.event.clear()
            return list(self.calls)


def sync_deliver(function, *args):
    function(*args)


class Harness:
    """One engine, one Inspector and one IngestWriter with a synchronous `deliver`."""

    def __init__(self, url: str, migrated: bool = False, node: str = "node-t"):
        self.engine = create_gateway_engine(url)
        if not migrated:
            migrate(self.engine)
        self.builder = AckBuilder()
        self.inspector = Inspector(self.builder, IngestPolicy("t"))
        self.audit = AuditTrail(self.engine, node)  # receipts recorded as the gateway does
        self.writer = IngestWriter(self.engine, sync_deliver,
                                   functools.partial(refuse_reused, self.builder),
                                   audit=self.audit)
        self.outcomes = Outcomes()

    def job(self, raw: bytes) -> IngestJob:
        result = self.inspector.frame(raw)
        return IngestJob(result.items, "t", "127.0.0.1:40000", time.time(), self.outcomes.done)

    def submit(self, raw: bytes) -> IngestJob:
        job = self.job(raw)
        self.writer.submit(job)
        return job

    def rows(self):
        with self.engine.connect() as conn:
            return conn.execute(select(messages.c.control_id, messages.c.status, message_payloads.c.raw,
                                       messages.c.ack, messages.c.duplicate_count)
                                .join(message_payloads, message_payloads.c.message_id == messages.c.id)
                                .order_by(messages.c.id)).all()

    def receipts(self) -> list:
        with self.engine.connect() as conn:
            return list(self.audit.records(conn))

    def close(self):
        self.writer.stop()
        self.engine.dispose()


@pytest.fixture
def harness(db_url):
    h = Harness(db_url)
    yield h
    h.close()


@contextlib.contextmanager
def lock_messages(engine):
    """Hold a lock that makes every INSERT into messages wait until the block ends."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("COMMIT")  # the engine's own BEGIN, replaced by an IMMEDIATE one
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                conn.connection.driver_connection.execute("COMMIT")
        else:
            conn.execute(text("LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE"))
            try:
                yield
            finally:
                conn.commit()


def schema_snapshot(engine) -> dict:
    """Tables, columns (name, nullable) and indexes (name, columns, unique, predicate)."""
    inspector = inspect(engine)
    snapshot = {}
    partitions = set()
    if engine.dialect.name == "postgresql":  # monthly and DEFAULT partitions are not the schema
        with engine.connect() as conn:
            partitions = set(conn.execute(text(
                "SELECT relname FROM pg_class WHERE relispartition AND relkind = 'r'")).scalars())
    for table in sorted(set(inspector.get_table_names()) - partitions):
        columns = [(c["name"], bool(c["nullable"])) for c in inspector.get_columns(table)]
        indexes = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]),
                          _predicate(engine, table, i)) for i in inspector.get_indexes(table))
        snapshot[table] = {"columns": columns, "indexes": indexes,
                           "pk": tuple(inspector.get_pk_constraint(table)["constrained_columns"])}
    return snapshot


def _normalized(where) -> str | None:
    """A partial index's predicate as the database gives it back: 'accepted' for the column
    (PostgreSQL and SQLite both write its name), the text of a text() predicate."""
    if where is None:
        return None
    return _plain_predicate(where.name if hasattr(where, "name") else str(where))


def _plain_predicate(where: str) -> str:
    # PostgreSQL gives back "((status)::text = 'received'::text)": without casts and brackets;
    # and an IN list as "= ANY (ARRAY['a'::character varying, ...]::text[])".
    plain = re.sub(r"::(character varying|\w+)(\[\])?", "", where).replace("(", "").replace(")", "").strip().lower()
    return re.sub(r"= any array\[(.*)\]$", r"in \1", plain)


def _predicate(engine, table, index) -> str | None:
    """The WHERE of a partial index, normalised (reflected on PostgreSQL, read from SQLite)."""
    options = index.get("dialect_options", {})
    where = options.get("postgresql_where") or options.get("sqlite_where")
    if where is None and engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            sql = conn.execute(text("SELECT sql FROM sqlite_master WHERE type='index' AND name=:n"),
                               {"n": index["name"]}).scalar()
        if sql and " WHERE " in sql.upper():
            where = sql[sql.upper().index(" WHERE ") + 7:]
    return None if where is None else _plain_predicate(str(where))


# --------------------------------------------------------------------------------------------
# Migrations and engine settings
# --------------------------------------------------------------------------------------------


def test_migrate_creates_exactly_the_schema_module(db_url):
    """Alembic's migrations produce the tables, columns, nullability and indexes of schema.metadata."""
    engine = create_gateway_engine(db_url)
    migrate(engine)
    migrated = schema_snapshot(engine)
    engine.dispose()

    assert set(migrated) == set(metadata.tables) | {"alembic_version"}
    table = metadata.tables["messages"]
    expected_columns = [(c.name, bool(c.nullable)) for c in table.columns]
    assert migrated["messages"]["columns"] == expected_columns
    assert migrated["messages"]["pk"] == ("id",)
    expected_indexes = sorted(
        (i.name, tuple(c.name for c in i.columns), bool(i.unique),
         _normalized(i.dialect_options[engine.dialect.name]["where"]))
        for i in table.indexes)
    assert migrated["messages"]["indexes"] == expected_indexes
    assert ("ix_messages_untranslated", ("id",), False, "status = 'received'") in migrated["messages"]["indexes"]
    assert ("ux_messages_control", ("sending_application", "sending_facility", "control_id"),
            True, "accepted") in migrated["messages"]["indexes"]
    assert ("ix_messages_received_at", ("received_at",), False, None) in migrated["messages"]["indexes"]


_MIGRATE_AT = """
import sys, time
from gateway.store.database import create_gateway_engine, migrate
engine = create_gateway_engine(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
migrate(engine)
"""


def test_nodes_starting_together_migrate_an_empty_postgresql_once(pg_url):
    """Several nodes started at once on an empty database (the README's N nodes), each a
    process of its own (Alembic's context is one per process): every one migrates or waits
    for the one that does, and all start, instead of all but one failing on Alembic's
    CREATE TABLE alembic_version."""
    import subprocess
    import sys

    at = time.time() + 3  # after every process has imported the gateway
    processes = [subprocess.Popen([sys.executable, "-c", _MIGRATE_AT, pg_url, str(at)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(3)]
    outputs = [process.communicate(timeout=120)[0].decode("utf-8", "replace") for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], "\n".join(outputs)
    engine = create_gateway_engine(pg_url)
    try:
        with engine.connect() as conn:
            [revision] = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
        assert revision == ScriptDirectory.from_config(AlembicConfig(ALEMBIC_INI)).get_current_head()
    finally:
        engine.dispose()


def test_migrate_twice_is_a_no_op(db_url, harness):
    """A second migrate changes neither the schema, the revision, nor the stored rows."""
    harness.writer.start()
    harness.submit(hl7("MIG-1"))
    harness.outcomes.wait(1)
    before = schema_snapshot(harness.engine)
    with harness.engine.connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    migrate(harness.engine)
    assert schema_snapshot(harness.engine) == before
    with harness.engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == revision
        assert count_messages(conn) == 1
    assert revision == [ScriptDirectory.from_config(AlembicConfig(ALEMBIC_INI)).get_current_head()]


def test_migration_0008_moves_payloads_and_bundles_out_of_the_index(db_url):
    """A database at revision 0007 with a message and its translation keeps both through 0008:
    the raw bytes in message_payloads, the bundle in canonical_bundles, both under the
    message's received_at; the old columns are gone."""
    from alembic import command

    engine = create_gateway_engine(db_url)
    config = AlembicConfig(ALEMBIC_INI)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0007")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO messages (id, received_at, listener, sha256, size, truncated, raw, status, "
            "accepted, duplicate_count, format) VALUES (7, :at, 'mllp', :sha, 4, false, :raw, "
            "'translated', true, 0, 'hl7v2')"), {"at": "2026-01-31 23:30:00+00:00", "sha": bytes(32),
                                                 "raw": b"MSH|"})
        connection.execute(text("INSERT INTO translations (message_id, status, translated_at, bundle) "
                                "VALUES (7, 'translated', :at, '{\"resourceType\":\"Bundle\"}')"),
                           {"at": "2026-02-01 00:00:00+00:00"})
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT message_id, raw FROM message_payloads")).all() == [(7, b"MSH|")]
        assert connection.execute(text("SELECT message_id, bundle FROM canonical_bundles")).all() == [
            (7, '{"resourceType":"Bundle"}')]
        same = connection.execute(text(
            "SELECT count(*) FROM messages m JOIN message_payloads p ON p.received_at = m.received_at "
            "JOIN canonical_bundles c ON c.received_at = m.received_at")).scalar()
        if engine.dialect.name == "postgresql":  # copied into its month, not into DEFAULT
            assert connection.execute(text("SELECT count(*) FROM message_payloads_2026_01")).scalar() == 1
            assert connection.execute(text("SELECT count(*) FROM message_payloads_default")).scalar() == 0
    columns = {t: {c["name"] for c in inspect(engine).get_columns(t)} for t in ("messages", "translations")}
    engine.dispose()
    assert same == 1
    assert "raw" not in columns["messages"] and "bundle" not in columns["translations"]


def test_migration_0010_indexes_the_patients_of_the_bundles_already_stored(db_url):
    """A database at 0009 with stored bundles gets each bundle's Patient identifiers in
    patient_identifiers, under the message's received_at (PostgreSQL: in its month)."""
    from alembic import command

    engine = create_gateway_engine(db_url)
    config = AlembicConfig(ALEMBIC_INI)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0009")
    patient = {"resourceType": "Patient", "identifier": [
        {"system": "urn:ma:cnie", "value": "BE123456"}, {"value": "IPP-9"}]}
    bundles = {7: {"resourceType": "Bundle", "entry": [{"resource": patient}]},
               8: {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Observation"}}]}}
    with engine.begin() as connection:
        for message_id, bundle in bundles.items():
            connection.execute(text(
                "INSERT INTO messages (id, received_at, listener, sha256, size, truncated, status, "
                "accepted, duplicate_count, format) VALUES (:id, :at, 'mllp', :sha, 4, false, "
                "'translated', true, 0, 'hl7v2')"), {"id": message_id, "at": "2026-01-31 23:30:00+00:00",
                                                    "sha": bytes(32)})
            connection.execute(text("INSERT INTO canonical_bundles (message_id, received_at, bundle) "
                                    "VALUES (:id, :at, :bundle)"),
                               {"id": message_id, "at": "2026-01-31 23:30:00+00:00", "bundle": json.dumps(bundle)})
    migrate(engine)
    try:
        with engine.connect() as connection:
            found = connection.execute(text("SELECT message_id, system, value FROM patient_identifiers "
                                            "ORDER BY value")).all()
            assert [tuple(row) for row in found] == [(7, "urn:ma:cnie", "BE123456"), (7, "", "IPP-9")]
            if engine.dialect.name == "postgresql":
                assert connection.execute(text("SELECT count(*) FROM patient_identifiers_2026_01")).scalar() == 2
    finally:
        engine.dispose()


def test_patient_identifiers_are_each_patients_identifiers_once():
    """Every identifier of every Patient of a bundle, once, in order, '' for no system; other
    resources' identifiers, values that are not text, values too long to index and texts
    holding a control character (PostgreSQL cannot keep a NUL) left out."""
    from gateway.store.translations import IDENTIFIER_LIMIT, patient_identifiers

    bundle = {"entry": [
        {"resource": {"resourceType": "Patient", "identifier": [
            {"system": "urn:ma:cnie", "value": "BE123456"}, {"value": "IPP-1"},
            {"system": "urn:ma:cnie", "value": "BE123456"}, {"system": "x", "value": 12},
            {"system": "x", "value": "9" * (IDENTIFIER_LIMIT + 1)}, {"system": "x"}, "junk",
            {"system": "x", "value": "P\x00X"}, {"system": "x\ty", "value": "P2"}]}},
        {"resource": {"resourceType": "Observation", "identifier": [{"system": "s", "value": "OBS-1"}]}},
        {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:ma:cnss", "value": "123"}]}},
        {"resource": None}, "junk"]}
    assert patient_identifiers(bundle) == (("urn:ma:cnie", "BE123456"), ("", "IPP-1"), ("urn:ma:cnss", "123"))
    assert patient_identifiers({}) == ()


def test_translations_store_their_patients_identifiers_and_replace_them(db_url):
    """Saving a translation writes its Patients' identifiers (sealed or not, the same); a
    translation of the message again replaces them; a failed one removes them."""
    from gateway.store.translations import Pending, TranslationRecord, save_translations

    engine = create_gateway_engine(db_url)
    migrate(engine)
    at = datetime(2026, 3, 1, 10, tzinfo=timezone.utc)

    def bundle(*values):
        return {"resourceType": "Bundle", "entry": [{"resource": {
            "resourceType": "Patient", "identifier": [{"system": "urn:s", "value": v} for v in values]}}]}

    def stored(connection):
        return sorted(tuple(r) for r in connection.execute(text(
            "SELECT message_id, value FROM patient_identifiers")).all())

    try:
        with engine.begin() as connection:
            ids = [connection.execute(messages.insert().values(
                received_at=at, listener="t", sha256=bytes(32), size=1, truncated=False,
                status="received", accepted=True, control_id=f"PI-{n}")).inserted_primary_key[0]
                for n in range(2)]
        pending = [Pending(message_id, None, b"", "utf-8", "hl7v2", None, at) for message_id in ids]
        sealed = TranslationRecord("translated", "v1", bundle("A1", "A2"))
        sealed.seal()
        with engine.begin() as connection:
            save_translations(connection, [(pending[0], sealed),
                                           (pending[1], TranslationRecord("translated", "v1", bundle("B1")))])
            assert stored(connection) == [(ids[0], "A1"), (ids[0], "A2"), (ids[1], "B1")]
        with engine.begin() as connection:
            save_translations(connection, [(pending[0], TranslationRecord("translated", "v2", bundle("A3"))),
                                           (pending[1], TranslationRecord("failed", "v2", error_code=102,
                                                                          error_location="Bundle.entry" * 10,
                                                                          error_reason="'1985\x0007' is not a date"))])
            assert stored(connection) == [(ids[0], "A3")]
            # A reason quoting a NUL from the input is kept with U+FFFD (PostgreSQL's text has no
            # NUL), a location longer than its column cut to it (PostgreSQL refuses it whole).
            failed = connection.execute(text("SELECT error_location, error_reason FROM translations "
                                             "WHERE message_id = :id"), {"id": ids[1]}).one()
            assert tuple(failed) == (("Bundle.entry" * 10)[:64], "'1985\ufffd07' is not a date")
    finally:
        engine.dispose()


def test_sqlite_engine_is_wal_and_synchronous_full_on_every_connection(tmp_path):
    """Every pooled SQLite connection runs in WAL mode with synchronous=FULL (2)."""
    engine = create_gateway_engine(f"sqlite:///{tmp_path / 'var' / 'durable.sqlite'}", pool_size=2)
    connections = [engine.connect() for _ in range(5)]  # several at once: distinct DBAPI connections
    try:
        assert len({id(c.connection.dbapi_connection) for c in connections}) == 5
        for conn in connections:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    finally:
        for conn in connections:
            conn.close()
        engine.dispose()
    assert (tmp_path / "var" / "durable.sqlite").exists()


# --------------------------------------------------------------------------------------------
# The ingest writer
# --------------------------------------------------------------------------------------------


def test_writer_commits_a_job_then_calls_done(harness):
    """A submitted job is committed before done(job, None) is called, with its ACK stored."""
    raw = hl7("ONE-1")
    seen_in_done = []

    def done(job, error):
        with harness.engine.connect() as conn:  # already committed, visible from elsewhere
            seen_in_done.append(count_messages(conn, "received"))
        harness.outcomes.done(job, error)

    result = harness.inspector.frame(raw)
    job = IngestJob(result.items, "t", "127.0.0.1:40000", time.time(), done)
    harness.writer.start()
    harness.writer.submit(job)
    [(answered, error)] = harness.outcomes.wait(1)
    assert answered is job and error is None
    assert seen_in_done == [1]
    [row] = harness.rows()
    assert row.control_id == "ONE-1" and row.status == "received" and row.raw == raw
    assert row.ack == job.items[0].ack and describe(row.ack)["msa1"] == "AA"
    assert harness.writer.commits == 1 and harness.writer.rows == 1


def test_writer_group_commits_queued_jobs(harness):
    """200 jobs queued before the writer starts are stored in fewer commits than jobs."""
    jobs = [harness.submit(hl7(f"GRP-{i:04d}")) for i in range(200)]
    harness.writer.start()
    answered = harness.outcomes.wait(200)
    assert all(error is None for _, error in answered)
    assert {id(job) for job, _ in answered} == {id(job) for job in jobs}
    assert harness.writer.commits < 200
    assert harness.writer.commits == 1  # all fit in one round (max_batch 512)
    rows = harness.rows()
    assert sorted(r.control_id for r in rows) == [f"GRP-{i:04d}" for i in range(200)]
    assert {r.status for r in rows} == {"received"}


def test_writer_group_commits_while_blocked(db_url, harness):
    """Jobs that arrive while a commit waits on a database lock go together into the next commit."""
    with lock_messages(harness.engine):
        harness.writer.start()
        harness.submit(hl7("BLK-0000"))
        time.sleep(0.3)  # the writer takes this job alone, then waits on the lock
        for i in range(1, 100):
            harness.submit(hl7(f"BLK-{i:04d}"))
        time.sleep(0.3)
        assert harness.outcomes.calls == []  # nothing answered before it is committed
    answered = harness.outcomes.wait(100)
    assert all(error is None for _, error in answered)
    assert harness.writer.commits <= 2
    assert len(harness.rows()) == 100


def test_duplicate_in_one_round_is_stored_once_with_one_ack(harness):
    """The same bytes twice in one round are stored once and both get the same ACK."""
    raw = hl7("DUP-1")
    first, second = harness.submit(raw), harness.submit(raw)
    harness.writer.start()
    answered = harness.outcomes.wait(2)
    assert [error for _, error in answered] == [None, None]
    assert harness.writer.commits == 1
    assert first.items[0].ack == second.items[0].ack
    assert describe(first.items[0].ack) == {"msa1": "AA", "msa2": "DUP-1", "errors": []}
    assert second.items[0].duplicate and not first.items[0].duplicate
    [row] = harness.rows()
    assert row.raw == raw and row.ack == first.items[0].ack and row.status == "received"


def test_reused_control_id_in_one_round_is_rejected(harness):
    """Same sender and control id with other bytes in one round: one received, one CONTROL_ID_REUSED."""
    first = harness.submit(hl7("REUSE-1", body="PID|1||A-1"))
    second = harness.submit(hl7("REUSE-1", body="PID|1||B-2"))
    harness.writer.start()
    assert [error for _, error in harness.outcomes.wait(2)] == [None, None]
    assert describe(first.items[0].ack)["msa1"] == "AA"
    reply = describe(second.items[0].ack)
    assert reply["msa1"] == "AR" and reply["msa2"] == "REUSE-1"
    assert any("CONTROL_ID_REUSED" in line for line in reply["errors"])
    rows = harness.rows()
    assert [(r.control_id, r.status) for r in rows] == [("REUSE-1", "received"), ("REUSE-1", "rejected")]
    assert rows[1].raw == hl7("REUSE-1", body="PID|1||B-2") and rows[1].ack == second.items[0].ack
    with harness.engine.connect() as conn:
        stored = conn.execute(select(messages.c.error_reason, messages.c.accepted)
                              .where(messages.c.status == "rejected")).one()
    assert "control id already used" in stored.error_reason and not stored.accepted


def test_duplicate_across_rounds_replays_the_stored_ack(harness):
    """A re-sent message in a later round gets the stored ACK byte for byte and counts a duplicate."""
    raw = hl7("LATER-1")
    harness.writer.start()
    first = harness.submit(raw)
    harness.outcomes.wait(1)
    again = harness.submit(raw)
    third = harness.submit(raw)
    assert [e for _, e in harness.outcomes.wait(3)] == [None, None, None]
    assert again.items[0].ack is not None
    # Left alone, the Inspector built a new ACK (new MSH-10); the store replaced it.
    assert harness.job(raw).items[0].ack != first.items[0].ack
    assert again.items[0].ack == first.items[0].ack == third.items[0].ack
    [row] = harness.rows()
    assert row.ack == first.items[0].ack and row.duplicate_count == 2


def _stored_ids(harness) -> dict[bytes, int]:
    with harness.engine.connect() as conn:
        return {bytes(raw): message_id for message_id, raw in conn.execute(
            select(message_payloads.c.message_id, message_payloads.c.raw))}


def test_each_stored_message_learns_its_id(harness):
    """The writer gives every item it stored its row's id (translation needs no look-up by
    key): in a round stored at once, and in a round redone message by message because a key
    was taken, where the duplicate (not stored again) gets none."""
    redone = [harness.submit(raw) for raw in (hl7("ID-1"), hl7("ID-2"), hl7("ID-1"), bad_hl7("ID-X", "x"))]
    harness.writer.start()
    harness.outcomes.wait(4)
    assert harness.writer.commits == 1
    at_once = [harness.submit(hl7("ID-3")), harness.submit(hl7("ID-4"))]
    harness.outcomes.wait(6)
    ids = _stored_ids(harness)
    assert len(ids) == 5 and len(set(ids.values())) == 5
    assert redone[2].items[0].duplicate and redone[2].items[0].message_id is None
    for job in redone[:2] + redone[3:] + at_once:
        assert job.items[0].message_id == ids[job.items[0].raw]


def test_a_round_gives_each_message_its_own_row_payload_and_receipt_in_order(harness):
    """80 messages of several sizes in one round (on PostgreSQL one statement over arrays):
    each item's id is the row of its own control id and bytes, ids follow the round's order,
    and each receipt names its own message."""
    raws = [hl7(f"ORD-{i:03d}", body="PID|1||" + "X" * (i * 37)) for i in range(80)]
    jobs = [harness.submit(raw) for raw in raws]
    harness.writer.start()
    assert all(error is None for _, error in harness.outcomes.wait(80))
    assert harness.writer.commits == 1
    ids = [job.items[0].message_id for job in jobs]
    assert ids == sorted(ids) and len(set(ids)) == 80
    assert _stored_ids(harness) == {raw: message_id for raw, message_id in zip(raws, ids)}
    with harness.engine.connect() as conn:
        by_id = dict(conn.execute(select(messages.c.id, messages.c.control_id)).all())
    assert [by_id[message_id] for message_id in ids] == [f"ORD-{i:03d}" for i in range(80)]
    assert [(r.subject, r.detail["control_id"]) for r in harness.receipts()] == [
        (f"message/{message_id}", f"ORD-{i:03d}") for i, message_id in enumerate(ids)]


def test_a_nul_byte_is_refused_and_stored_without_failing_the_round(harness):
    """A message holding a NUL byte (which PostgreSQL's text cannot keep) is refused and stored
    with its bytes exact, in the same round as a good one, which is accepted; a door's record
    with a NUL in a text it read (an ASTM analyzer name) is stored with U+FFFD there."""
    from gateway.ingest.astm import inbound_for

    poisoned = hl7("NUL-2").replace(b"PID|1||", b"PID|1||\x00")
    harness.writer.submit(harness.job(hl7("NUL-1")))
    harness.writer.submit(harness.job(poisoned))
    analyzer = inbound_for(b"H|\\^&|||Analy\x00zer\rL|1\r", "LAB-1")
    harness.writer.submit(IngestJob([analyzer], "astm", "127.0.0.1:40001", time.time(), harness.outcomes.done))
    harness.writer.start()
    calls = harness.outcomes.wait(3)
    assert [error for _, error in calls] == [None, None, None]
    stored = {row.raw: row for row in harness.rows()}
    assert stored[hl7("NUL-1")].status == "received" and stored[poisoned].status == "rejected"
    assert stored[poisoned].control_id == "NUL-2"
    with harness.engine.connect() as conn:
        names = conn.execute(select(messages.c.sending_application).where(messages.c.format == "astm")).scalars().all()
    assert names == ["Analy\ufffdzer"]


def test_a_header_text_too_long_for_its_column_is_refused_and_stored_cut(harness):
    """A control id longer than its column (PostgreSQL refuses the value) is refused (104) and
    stored cut to the column, in the same round as a good message; a door's text too long for
    its column is stored cut."""
    from gateway.ingest.astm import inbound_for

    long_id = "L" * 250
    harness.writer.submit(harness.job(hl7("LEN-1")))
    harness.writer.submit(harness.job(hl7(long_id)))
    analyzer = inbound_for(b"H|\\^&|||" + b"A" * 300 + b"\rL|1\r", "LAB-1")
    analyzer.sending_application = "A" * 300  # as a door that does not cut it would leave it
    harness.writer.submit(IngestJob([analyzer], "astm", "127.0.0.1:40001", time.time(), harness.outcomes.done))
    harness.writer.start()
    assert [error for _, error in harness.outcomes.wait(3)] == [None, None, None]
    assert [(row.control_id, row.status) for row in harness.rows()][:2] == [
        ("LEN-1", "received"), (long_id[:199], "rejected")]
    with harness.engine.connect() as conn:
        names = conn.execute(select(messages.c.sending_application).where(messages.c.format == "astm")).scalars().all()
    assert names == ["A" * 227]


def test_refusals_of_over_long_header_values_are_stored_cut(harness):
    """A message refused for its charset (103), type (200), processing id (202) or version (203)
    keeps what it declared, cut to its column: PostgreSQL refuses a longer value, and that
    failed the round of every other message with it."""
    base = b"MSH|^~\\&|HIS|FAC|GW|MA|20250114083512||%s|%s|%s|%s|||||MAR|%s\rPID|1||P-1\r"
    refused = [base % (b"ADT^A01", b"R-103", b"P", b"2.5", b"Q" * 60),
               base % (b"Y" * 60 + b"^A01", b"R-200", b"P", b"2.5", b"UNICODE UTF-8"),
               base % (b"ADT^A01", b"R-202", b"X" * 20, b"2.5", b"UNICODE UTF-8"),
               base % (b"ADT^A01", b"R-203", b"P", b"9" * 30, b"UNICODE UTF-8")]
    for raw in [hl7("GOOD-1")] + refused:
        harness.writer.submit(harness.job(raw))
    harness.writer.start()
    assert [error for _, error in harness.outcomes.wait(5)] == [None] * 5
    with harness.engine.connect() as conn:
        rows = conn.execute(select(messages.c.control_id, messages.c.status, messages.c.error_code,
                                   messages.c.charset, messages.c.message_type, messages.c.processing_id,
                                   messages.c.version).order_by(messages.c.id)).all()
    assert [(r.control_id, r.status, r.error_code) for r in rows] == [
        ("GOOD-1", "received", None), ("R-103", "rejected", 103), ("R-200", "rejected", 200),
        ("R-202", "rejected", 202), ("R-203", "rejected", 203)]
    assert (rows[1].charset, rows[2].message_type, rows[3].processing_id, rows[4].version) == (
        "Q" * 32, ("Y" * 60 + "^A01")[:32], "X" * 8, "9" * 16)


def test_every_receipt_is_in_the_audit_trail_with_the_message(harness):
    """Each message of a round gets its audit record in the transaction that stores it, in
    the round's order: received (its id, size, SHA-256, the ACK code stored), a duplicate
    (received again, not stored), a refusal (with its reason); the chain verifies."""
    new, again, refused = hl7("AUD-1"), hl7("AUD-1"), bad_hl7("AUD-2", "x")
    jobs = [harness.submit(raw) for raw in (new, again, refused)]
    harness.writer.start()
    assert [e for _, e in harness.outcomes.wait(3)] == [None, None, None]
    assert all(job.audited for job in jobs)
    records = harness.receipts()
    assert [(r.action, r.outcome) for r in records] == [
        ("message.received", "success"), ("message.received", "success"), ("message.refused", "refused")]
    first, duplicate, refusal = records
    assert first.subject == f"message/{jobs[0].items[0].message_id}" and duplicate.subject is None
    assert first.detail == {"control_id": "AUD-1", "size": len(new), "ack_code": "AA",
                            "sha256": hashlib.sha256(new).hexdigest(), "listener": "t",
                            "message_type": "ADT^A01"}
    assert duplicate.detail["duplicate"] is True and "duplicate" not in first.detail
    assert refusal.detail["ack_code"] == "AR" and refusal.detail["reason"] == "unsupported_message_type"
    assert {r.node for r in records} == {"node-t"} and {r.actor for r in records} == {"FAC_TEST"}
    assert {r.source for r in records} == {"127.0.0.1:40000"}
    assert harness.audit.verify().intact


def test_a_receipt_that_cannot_be_recorded_stores_nothing(harness):
    """The audit trail unwritable: the round is rolled back and reported like any store
    failure (the sender is told to send again); nothing is stored without its record."""
    with harness.engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    harness.writer.start()
    lost = harness.submit(hl7("NOAUD-1"))
    [(job, error)] = harness.outcomes.wait(1)
    assert job is lost and error is not None and not job.audited
    assert harness.rows() == []
    with harness.engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    kept = harness.submit(hl7("NOAUD-1"))
    assert harness.outcomes.wait(2)[1] == (kept, None)
    assert [r.control_id for r in harness.rows()] == ["NOAUD-1"]
    assert [r.detail["control_id"] for r in harness.receipts()] == ["NOAUD-1"]


def test_sqlite_writers_of_one_process_queue_on_one_lock(tmp_path):
    """The ingest writer and every write_transaction of the process take one lock around
    BEGIN IMMEDIATE ... COMMIT, so that they wait for each other on it (woken the moment it
    is released) rather than in SQLite's busy handler, which sleeps up to 100 ms between
    looks at the database's own lock."""
    from gateway.store.database import sqlite_write_lock, write_transaction

    harness = Harness(f"sqlite:///{tmp_path / 'lock.sqlite'}")
    try:
        lock = sqlite_write_lock(harness.engine)
        assert lock is sqlite_write_lock(harness.engine)
        harness.writer.start()
        committed = threading.Event()
        job = harness.job(hl7("LOCK-1"))
        job.done = lambda job, error: committed.set()
        with lock:  # no SQLite transaction open: only the process's lock is held
            harness.writer.submit(job)
            assert not committed.wait(0.5)
        assert committed.wait(5) and [r.control_id for r in harness.rows()] == ["LOCK-1"]

        taken = []
        with write_transaction(harness.engine):
            other = threading.Thread(target=lambda: taken.append(lock.acquire(timeout=0.2)))
            other.start()
            other.join()
        assert taken == [False]  # held by the transaction until it committed
    finally:
        harness.close()


def test_refused_messages_may_reuse_a_control_id(harness):
    """Two different refused messages with the same MSH-10 are both stored, each with its own NAK."""
    harness.writer.start()
    one = harness.submit(bad_hl7("BAD-1", "first"))
    two = harness.submit(bad_hl7("BAD-1", "second"))
    harness.outcomes.wait(2)
    three = harness.submit(bad_hl7("BAD-1", "first"))  # even the same bytes, in a later round
    assert [e for _, e in harness.outcomes.wait(3)] == [None, None, None]
    rows = harness.rows()
    assert [(r.control_id, r.status) for r in rows] == [("BAD-1", "rejected")] * 3
    assert [r.raw for r in rows] == [one.items[0].raw, two.items[0].raw, three.items[0].raw]
    assert describe(rows[0].ack)["msa1"] == "AR"
    # A good message may still take the control id the refusals used.
    good = harness.submit(hl7("BAD-1"))
    harness.outcomes.wait(4)
    assert describe(good.items[0].ack)["msa1"] == "AA"
    assert [r.status for r in harness.rows()] == ["rejected"] * 3 + ["received"]


def test_database_failure_reports_the_error_and_the_writer_recovers(harness):
    """With the table gone, done(job, error) gets the exception; once migrated again, jobs are stored."""
    with harness.engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(text(f"DROP TABLE {table.name}"))
        conn.execute(text("DROP TABLE alembic_version"))
    harness.writer.start()
    lost = harness.submit(hl7("FAIL-1"))
    [(job, error)] = harness.outcomes.wait(1)
    assert job is lost and isinstance(error, Exception)
    assert "messages" in str(error).lower()
    assert harness.writer.commits == 0

    migrate(harness.engine)
    for attempt in range(3):  # more than one round, on the same writer thread
        kept = harness.submit(hl7(f"FAIL-OK-{attempt}"))
        job, error = harness.outcomes.wait(2 + attempt)[-1]
        assert job is kept and error is None
    assert [r.control_id for r in harness.rows()] == ["FAIL-OK-0", "FAIL-OK-1", "FAIL-OK-2"]
    assert harness.writer.commits == 3


def test_writer_leaves_pooled_connections_transactional(harness):
    """After the writer fails a round or stops, rolled-back work on its engine is really rolled back."""
    with harness.engine.begin() as conn:
        conn.execute(text("CREATE TABLE probe (x INTEGER)"))
        for table in reversed(metadata.sorted_tables):
            conn.execute(text(f"DROP TABLE {table.name}"))
        conn.execute(text("DROP TABLE alembic_version"))
    harness.writer.start()
    harness.submit(hl7("POOL-1"))
    [(_, error)] = harness.outcomes.wait(1)
    assert error is not None  # the writer gave its connection back after the failure
    migrate(harness.engine)
    harness.submit(hl7("POOL-2"))
    assert harness.outcomes.wait(2)[-1][1] is None
    harness.writer.stop()  # and gives its connection back when it stops

    connections = [harness.engine.connect() for _ in range(4)]  # every pooled one, and new ones
    try:
        for conn in connections:
            conn.execute(text("INSERT INTO probe (x) VALUES (1)"))
            conn.rollback()
    finally:
        for conn in connections:
            conn.close()
    with harness.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM probe")).scalar_one() == 0
        assert count_messages(conn) == 1


def test_sqlite_read_only_database_reports_the_error(tmp_path):
    """A SQLite database that refuses writes (query_only): the job gets the error, nothing is stored."""
    url = f"sqlite:///{tmp_path / 'gw.sqlite'}"
    h = Harness(url)
    h.engine.dispose()
    event.listen(h.engine, "connect", lambda dbapi, _: dbapi.execute("PRAGMA query_only=ON"))
    try:
        h.writer.start()
        job = h.submit(hl7("RO-1"))
        [(answered, error)] = h.outcomes.wait(1)
        assert answered is job and isinstance(error, Exception)
        assert "readonly" in str(error).lower().replace("-", "").replace(" ", "")
        assert h.writer.commits == 0
    finally:
        h.close()
    check = create_gateway_engine(url)
    with check.connect() as conn:
        assert count_messages(conn) == 0
    check.dispose()


# --------------------------------------------------------------------------------------------
# Read queries
# --------------------------------------------------------------------------------------------


def store_all(harness, raws: list[bytes]) -> list[IngestJob]:
    harness.writer.start()
    jobs = []
    for raw in raws:  # one round each: ids follow the order sent
        jobs.append(harness.submit(raw))
        harness.outcomes.wait(len(jobs))
    return jobs


def test_list_messages_order_filters_and_limit(harness):
    """Newest first; filtered by status, control id and before_id; cut at the limit."""
    store_all(harness, [hl7("Q-1"), bad_hl7("Q-2", "x"), hl7("Q-3"), hl7("Q-4"), bad_hl7("Q-5", "y")])
    with harness.engine.connect() as conn:
        everything = list_messages(conn)
        assert [m.control_id for m in everything] == ["Q-5", "Q-4", "Q-3", "Q-2", "Q-1"]
        assert [m.id for m in everything] == sorted((m.id for m in everything), reverse=True)
        assert [m.control_id for m in list_messages(conn, limit=2)] == ["Q-5", "Q-4"]
        assert [m.control_id for m in list_messages(conn, status="received")] == ["Q-4", "Q-3", "Q-1"]
        assert [m.control_id for m in list_messages(conn, status="rejected")] == ["Q-5", "Q-2"]
        assert [m.control_id for m in list_messages(conn, control_id="Q-3")] == ["Q-3"]
        assert list_messages(conn, control_id="nope") == []
        middle = everything[2].id
        assert [m.control_id for m in list_messages(conn, before_id=middle)] == ["Q-2", "Q-1"]
        assert [m.control_id for m in list_messages(conn, limit=1, status="received", before_id=middle)] == ["Q-1"]
    first = everything[-1]
    assert first.status == "received" and first.ack_code == "AA" and first.listener == "t"
    assert first.message_type == "ADT^A01" and first.sending_application == "HIS_TEST"
    assert first.sending_facility == "FAC_TEST" and first.duplicate_count == 0
    assert first.received_at.endswith("+00:00") and first.received_at[:2] == "20"
    assert everything[0].ack_code == "AR" and everything[0].error_code == 200


def test_list_messages_period_in_any_offset(harness):
    """A period given with an offset other than UTC's (the command line's --since
    2026-11-23T10:00+01:00) means that instant: SQLite compared its wall time with the UTC it
    stores, an hour off. One beyond the years a datetime holds in UTC bounds nothing or all."""
    store_all(harness, [hl7("P-1")])
    plus_one, minus_five = timezone(timedelta(hours=1)), timezone(timedelta(hours=-5))
    with harness.engine.connect() as conn:
        received = datetime.fromisoformat(list_messages(conn)[0].received_at)

        def found(**period) -> list[str]:
            return [m.control_id for m in list_messages(conn, search=MessageFilter(**period))]

        assert found(since=(received - timedelta(minutes=30)).astimezone(plus_one)) == ["P-1"]
        assert found(since=(received + timedelta(minutes=30)).astimezone(minus_five)) == []
        assert found(until=(received + timedelta(minutes=30)).astimezone(plus_one)) == ["P-1"]
        assert found(until=(received - timedelta(minutes=30)).astimezone(minus_five)) == []
        earliest, latest = datetime(1, 1, 1, tzinfo=plus_one), datetime(9999, 12, 31, 23, tzinfo=minus_five)
        assert found(since=earliest) == ["P-1"] and found(until=earliest) == []
        assert found(since=latest) == [] and found(until=latest) == ["P-1"]


def test_list_messages_by_facility_is_case_sensitive_on_either_database(harness):
    """MSH-4 by its first component is matched as exactly as MSH-4 whole: SQLite's LIKE
    ignores case, so "chu_rabat" found CHU_RABAT^2.16.504^ISO there and not on PostgreSQL."""
    store_all(harness, [hl7("F-1", facility="CHU_RABAT^2.16.504^ISO"), hl7("F-2", facility="CHU_RABAT")])
    with harness.engine.connect() as conn:

        def found(facility: str) -> list[str]:
            return [m.control_id for m in list_messages(conn, search=MessageFilter(facility=facility))]

        assert found("CHU_RABAT") == ["F-2", "F-1"]
        assert found("chu_rabat") == found("Chu_Rabat^2.16.504^ISO") == found("CHU%") == []


def test_count_messages(harness):
    """count_messages counts all rows or those of one status."""
    store_all(harness, [hl7("C-1"), hl7("C-2"), bad_hl7("C-3", "z"), hl7("C-1")])
    with harness.engine.connect() as conn:
        assert count_messages(conn) == 3  # the re-sent C-1 is not stored again
        assert count_messages(conn, "received") == 2
        assert count_messages(conn, "rejected") == 1
        assert count_messages(conn, "ignored") == 0


def test_get_message_returns_the_bytes_and_the_decoded_text(harness):
    """get_message gives back the raw bytes as sent and the text decoded with the codec."""
    oru = hl7msgs.message("oru", 11).encode("utf-8")
    french_arabic = hl7("TXT-1", body="PID|1||P-9^^^CHU^PI||Lefèvre^Hélène~بن علي^فاطمة|||F\r"
                                      "NTE|1||Œdème, très élevé : «appel» à 08h10")
    arabic_8859 = hl7("TXT-2", charset="8859/6", encoding="iso8859-6",
                      body="PID|1||P-10^^^CHU^PI||الحسيني^يوسف")
    assert "الحسيني".encode("utf-8") not in arabic_8859  # really single-byte Arabic on the wire
    store_all(harness, [oru, french_arabic, arabic_8859])
    with harness.engine.connect() as conn:
        by_control = {m.control_id: m.id for m in list_messages(conn)}
        detail_oru = get_message(conn, by_control["B00000000011"])
        detail_fr = get_message(conn, by_control["TXT-1"])
        detail_ar = get_message(conn, by_control["TXT-2"])
        assert get_message(conn, max(by_control.values()) + 100) is None

    assert type(detail_oru.raw) is bytes and detail_oru.raw == oru
    assert detail_oru.text == hl7msgs.message("oru", 11)
    assert "الحسيني^يوسف" in detail_oru.text and "Hémoglobine" in detail_oru.text
    assert detail_fr.raw == french_arabic and detail_fr.codec == "utf-8"
    assert "Lefèvre^Hélène~بن علي^فاطمة" in detail_fr.text and "Œdème" in detail_fr.text
    assert detail_ar.raw == arabic_8859 and detail_ar.codec == "iso8859-6"
    assert detail_ar.charset == "8859/6"
    assert "الحسيني^يوسف" in detail_ar.text and "\ufffd" not in detail_ar.text
    data = detail_ar.as_dict()
    assert data["text"] == detail_ar.text and data["id"] == by_control["TXT-2"]
    assert data["ack"].startswith("MSH|") and "MSA|AA|TXT-2" in data["ack"]
    import hashlib
    assert detail_fr.sha256 == hashlib.sha256(french_arabic).hexdigest()
    assert detail_fr.summary.size == len(french_arabic) and not detail_fr.truncated


# --------------------------------------------------------------------------------------------
# Two nodes on one PostgreSQL database
# --------------------------------------------------------------------------------------------


@pytest.mark.pg
def test_postgresql_compresses_payloads_with_lz4_where_the_server_can(pg_url):
    """Every connection of the gateway's engine asks for lz4 TOAST compression (much cheaper
    for PostgreSQL than pglz); a stored payload large enough to be compressed is lz4."""
    engine = create_gateway_engine(pg_url)
    try:
        with engine.connect() as conn:
            choices = conn.execute(text("SELECT enumvals FROM pg_settings "
                                        "WHERE name = 'default_toast_compression'")).scalar()
            if "lz4" not in (choices or []):
                pytest.skip("this PostgreSQL was built without lz4")
            assert conn.execute(text("SHOW default_toast_compression")).scalar() == "lz4"
        migrate(engine)
        h = Harness(pg_url, migrated=True)
        h.writer.start()
        job = h.submit(hl7("LZ4-1", body="\r".join(f"NTE|{n}||{'compressible text ' * 20}" for n in range(20))))
        h.outcomes.wait(1)
        h.close()
        with engine.connect() as conn:
            method = conn.execute(text("SELECT pg_column_compression(raw) FROM message_payloads "
                                       "WHERE message_id = :id"), {"id": job.items[0].message_id}).scalar()
        assert method == "lz4"
    finally:
        engine.dispose()


@pytest.mark.pg
def test_a_frame_the_database_refuses_fails_alone(pg_url):
    """A value PostgreSQL refuses (here a peer address longer than its column, which nothing
    lets through: the stand-in for any text it cannot keep) fails its own frame only: the
    frames that shared its round are committed each in a round of their own."""
    harness = Harness(pg_url)
    try:
        jobs = [harness.job(hl7("SOLO-1")), harness.job(hl7("SOLO-2")), harness.job(hl7("SOLO-3"))]
        jobs[1].peer = "p" * 200
        for job in jobs:
            harness.writer.submit(job)
        harness.writer.start()
        answered = {job.items[0].control_id: error for job, error in harness.outcomes.wait(3)}
        assert answered["SOLO-1"] is None and answered["SOLO-3"] is None
        assert "too long" in str(answered["SOLO-2"])
        assert [row.control_id for row in harness.rows()] == ["SOLO-1", "SOLO-3"]
        assert [r.detail["control_id"] for r in harness.receipts()] == ["SOLO-1", "SOLO-3"]
    finally:
        harness.close()


@pytest.mark.pg
def test_two_nodes_store_the_same_message_once(pg_url):
    """Two writers on two engines committing the same messages at once: one row each, identical positive ACKs."""
    node_a, node_b = Harness(pg_url), Harness(pg_url)
    try:
        raws = [hl7msgs.message("oru", 900 + i).encode("utf-8") for i in range(20)]
        jobs_a = [node_a.submit(raw) for raw in raws]
        jobs_b = [node_b.submit(raw) for raw in raws]
        assert jobs_a[0].items[0].ack != jobs_b[0].items[0].ack  # each node built its own ACK
        with lock_messages(node_a.engine):  # both rounds wait, then run at the same moment
            node_a.writer.start()
            node_b.writer.start()
            time.sleep(0.5)
            assert node_a.outcomes.calls == [] and node_b.outcomes.calls == []
        assert all(e is None for _, e in node_a.outcomes.wait(20))
        assert all(e is None for _, e in node_b.outcomes.wait(20))

        for a, b in zip(jobs_a, jobs_b):
            assert describe(a.items[0].ack)["msa1"] == "CA"
            assert b.items[0].ack == a.items[0].ack
            assert a.items[0].duplicate != b.items[0].duplicate  # exactly one of them was stored
        rows = sorted(node_a.rows(), key=lambda r: r.control_id)
        assert [r.control_id for r in rows] == [f"B{900 + i:011d}" for i in range(20)]
        assert {r.duplicate_count for r in rows} == {1}
        assert [r.ack for r in rows] == [a.items[0].ack for a in jobs_a]
        assert {r.status for r in rows} == {"received"}
    finally:
        node_a.close()
        node_b.close()


@pytest.mark.pg
def test_two_nodes_racing_many_rounds(pg_url):
    """Two nodes sending the same 100 messages concurrently, one per round: every id stored once."""
    node_a, node_b = Harness(pg_url), Harness(pg_url)
    try:
        raws = [hl7(f"RACE-{i:03d}") for i in range(100)]
        start = threading.Barrier(2)
        jobs = {"a": [], "b": []}

        def feed(name, node):
            start.wait()
            for raw in raws:
                jobs[name].append(node.submit(raw))

        node_a.writer.start()
        node_b.writer.start()
        threads = [threading.Thread(target=feed, args=("a", node_a)),
                   threading.Thread(target=feed, args=("b", node_b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(e is None for _, e in node_a.outcomes.wait(100))
        assert all(e is None for _, e in node_b.outcomes.wait(100))
        for a, b in zip(jobs["a"], jobs["b"]):
            assert a.items[0].ack == b.items[0].ack
            assert describe(a.items[0].ack)["msa1"] == "AA"
        rows = node_a.rows()
        assert sorted(r.control_id for r in rows) == [f"RACE-{i:03d}" for i in range(100)]
        assert {r.duplicate_count for r in rows} == {1}
        # One chain for both nodes: every receipt once, gapless, intact.
        receipts = node_a.receipts()
        assert len(receipts) == 200 and [r.seq for r in receipts] == list(range(1, 201))
        assert sum(r.detail.get("duplicate", False) for r in receipts) == 100
        assert node_a.audit.verify().intact
    finally:
        node_a.close()
        node_b.close()


def test_deliveries_of_lists_each_destination_with_its_attempts(db_url, harness):
    """`deliveries_of` (messages show, the REST status) gives every delivery of one message,
    with its attempts in order, and nothing of another message."""
    from datetime import datetime, timezone

    from gateway.store.queries import deliveries_of
    from gateway.store.schema import deliveries, delivery_attempts

    harness.writer.start()
    harness.submit(hl7("DLV-1"))
    harness.submit(hl7("DLV-2"))
    harness.outcomes.wait(2)
    at = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)
    with harness.engine.begin() as conn:
        first, second = conn.execute(select(messages.c.id).order_by(messages.c.id)).scalars().all()
        common = dict(patient_key="Patient/p1", bundle_sha256="0" * 64, created_at=at,
                      next_attempt_at=at)
        record = conn.execute(deliveries.insert().values(
            message_id=first, destination="shared-record", status="delivered", attempts=2,
            idempotency_key="k-record", finished_at=at, last_code=200, **common)).inserted_primary_key[0]
        conn.execute(deliveries.insert().values(
            message_id=first, destination="cnss", status="pending", attempts=0,
            idempotency_key="k-cnss", **common))
        conn.execute(deliveries.insert().values(
            message_id=second, destination="cnss", status="dead", attempts=1,
            idempotency_key="k-other", **common))
        conn.execute(delivery_attempts.insert(), [
            dict(delivery_id=record, attempted_at=at, node="n1", outcome="transient",
                 reason="connection refused", code=None, duration_ms=3),
            dict(delivery_id=record, attempted_at=at, node="n2", outcome="delivered",
                 reason="200 OK", code=200, duration_ms=9)])
    with harness.engine.connect() as conn:
        views = deliveries_of(conn, first)
        assert deliveries_of(conn, first + second + 100) == []
    assert [(v.destination, v.status, v.attempts) for v in views] == [
        ("shared-record", "delivered", 2), ("cnss", "pending", 0)]
    assert [(a.node, a.outcome, a.code) for a in views[0].history] == [
        ("n1", "transient", None), ("n2", "delivered", 200)]
    assert views[0].next_attempt_at is None and views[0].finished_at.startswith("2026-11-22T09:00")
    assert views[1].next_attempt_at.startswith("2026-11-22T09:00") and views[1].history == ()


def test_bundle_text_is_compact_utf8_json_whatever_the_encoder():
    """Stored bundles are compact UTF-8 JSON, the same text json.dumps would give (so digests
    and idempotency keys do not change), including what orjson cannot encode."""
    import json

    from gateway.store.translations import bundle_text

    bundle = {"resourceType": "Bundle", "entry": [{"resource": {
        "resourceType": "Patient", "name": [{"family": "بنعلي", "given": ["Élodie"]}],
        "extension": [{"valueDecimal": 0.1}, {"valueInteger": 7}, {"valueBoolean": False}]}}]}
    assert bundle_text(bundle) == json.dumps(bundle, ensure_ascii=False, separators=(",", ":"))
    huge = {"value": 2 ** 70}
    assert bundle_text(huge) == '{"value":1180591620717411303424}'

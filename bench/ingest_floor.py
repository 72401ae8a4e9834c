"""Where the ingest's CPU goes, and the least it can cost: per message, in one thread on one core.

bench/ingest.py measures servers over sockets; this one takes the two halves of the ingest
apart, in process, with the CPU time of the measuring thread (user and system: the system
part is SQLite writing its WAL and fsync), in microseconds per message:

  inspect      the reactor's work on a frame before it is queued for the commit:
                 reference  what srv_durable_twisted.py does: MSH-10 read from the raw bytes
                 sha256     the hash alone, which duplicate detection needs (no gateway does less)
                 gateway    Inspector.frame (MSH, character set, SHA-256, the ACK)
  commit       one round of `--batch` messages, committed (SQLite: WAL, synchronous=FULL):
                 reference  srv_durable_twisted.py's three-column row
                 rows       the gateway's own rows, built beforehand (the message, its payload,
                            its audit receipt, as the writer stores them): what storing them
                            costs at the least, whatever the Python around it
                 writer     IngestWriter as built (rows, audit chain and all)

The gap between `rows` and `writer` is the writer's Python; between the reference's commit and
`rows`, what the gateway stores beyond the raw bytes (the index, the payload table, the audit
record). Only ratios within one run mean anything.

    .venv/bin/python bench/ingest_floor.py [--messages 20000] [--batch 1,4,8,32] [--msg oru]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sqlite3
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "shared" / "bench"))

import hl7msgs  # noqa: E402
from sqlalchemy import text  # noqa: E402

from adapters.hl7v2.ack import AckBuilder  # noqa: E402
from adapters.mllp.protocol import ConnectionInfo  # noqa: E402
from gateway.audit.trail import AuditTrail  # noqa: E402
from gateway.ingest.inspect import Inspector, IngestPolicy  # noqa: E402
from gateway.store.database import create_gateway_engine, migrate  # noqa: E402
from gateway.store.ingest_writer import IngestJob, IngestWriter  # noqa: E402

CONNECTION = ConnectionInfo("bench", "127.0.0.1:40000")


def cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def per_message(before, after, count) -> tuple[float, float]:
    return tuple(1e6 * (b - a) / count for a, b in zip(before, after))


def frames(kind: str, count: int, tag: str) -> list[bytes]:
    wire = hl7msgs.Wire(kind, run_tag=tag)
    return [wire.frame(wire.cid(i))[1:-2] for i in range(count)]  # without the MLLP bytes


# --------------------------------------------------------------------------- inspect

def inspect_reference(payloads: list[bytes]) -> None:
    """srv_durable_twisted.py's per-frame work: MSH-10 found in the raw bytes."""
    for payload in payloads:
        end = payload.find(b"\r")
        payload[:end].split(b"|")[9].decode("ascii", "replace")


def inspect_gateway(inspector: Inspector, payloads: list[bytes]) -> list:
    return [inspector.frame(payload, CONNECTION).items for payload in payloads]


# --------------------------------------------------------------------------- commit

def commit_reference(path: str, payloads: list[bytes], batch: int) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE msg (id INTEGER PRIMARY KEY, received REAL NOT NULL, "
               "control_id TEXT NOT NULL, raw BLOB NOT NULL)")
    sql = "INSERT INTO msg (received, control_id, raw) VALUES (?, ?, ?)"
    rows = [(1.0, f"B{i:011d}", payload) for i, payload in enumerate(payloads)]
    for start in range(0, len(rows), batch):
        db.execute("BEGIN")
        db.executemany(sql, rows[start:start + batch])
        db.execute("COMMIT")
    db.close()


def commit_writer(writer: IngestWriter, engine, items: list, batch: int) -> None:
    with engine.connect() as connection:
        for start in range(0, len(items), batch):
            jobs = [IngestJob(job_items, "bench", CONNECTION.peer, 1_780_000_000.0, None)
                    for job_items in items[start:start + batch]]
            writer._commit(connection, jobs)


def stored_templates(path: str) -> tuple[list[str], tuple, tuple, tuple]:
    """The messages table's column names, and one stored message, payload and audit row of
    the gateway's database."""
    db = sqlite3.connect(path)
    message = db.execute("SELECT * FROM messages ORDER BY id LIMIT 1").fetchone()
    payload = db.execute("SELECT * FROM message_payloads ORDER BY message_id LIMIT 1").fetchone()
    audit = db.execute("SELECT * FROM audit_log ORDER BY seq LIMIT 1").fetchone()
    names = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
    db.close()
    return names, message, payload, audit


def commit_rows(path: str, source: str, payloads: list[bytes], batch: int) -> None:
    """The gateway's rows, copied from `source`'s first message with new keys, in the
    gateway's schema (copied from `source`), inserted as the writer's statements do."""
    names, message, payload_row, audit = stored_templates(source)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA auto_vacuum=INCREMENTAL")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    schema = sqlite3.connect(source)
    for (sql,) in schema.execute("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND tbl_name IN "
                                 "('messages', 'message_payloads', 'audit_log')"):
        db.execute(sql)
    schema.close()
    columns = [n for n in names if n not in ("id", "duplicate_count")]
    keep = [names.index(n) for n in columns]
    control = names.index("control_id")
    insert_message = (f"INSERT INTO messages ({', '.join(columns)}) "
                      f"VALUES ({', '.join('?' * len(columns))})")
    insert_payload = "INSERT INTO message_payloads (message_id, received_at, raw) VALUES (?, ?, ?)"
    insert_audit = f"INSERT INTO audit_log VALUES ({', '.join('?' * len(audit))})"
    messages, seq = [], 0
    for i in range(len(payloads)):
        row = list(message)
        row[control] = f"B{i:011d}"
        messages.append(tuple(row[k] for k in keep))
    for start in range(0, len(payloads), batch):
        db.execute("BEGIN IMMEDIATE")
        db.executemany(insert_message, messages[start:start + batch])
        last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
        count = len(messages[start:start + batch])
        db.executemany(insert_payload, [(last - count + 1 + n, payload_row[1], payloads[start + n])
                                        for n in range(count)])
        rows = []
        for _ in range(count):
            seq += 1
            rows.append((seq,) + audit[1:])
        db.executemany(insert_audit, rows)
        db.execute("COMMIT")
    db.close()


# --------------------------------------------------------------------------- run

def gateway_database(tmp: Path, name: str):
    engine = create_gateway_engine(f"sqlite:///{tmp / name}")
    migrate(engine)
    with engine.begin() as connection:  # the migrations' own audit records: the chain starts empty
        connection.execute(text("DELETE FROM audit_log"))
    return engine


def measure(args, tmp: Path) -> list[tuple[str, str, float, float]]:
    inspector = Inspector(AckBuilder(), IngestPolicy("bench"))
    results = []
    payloads = frames(args.msg, args.messages, "F")

    before = cpu()
    inspect_reference(payloads)
    results.append(("inspect", "reference", *per_message(before, cpu(), len(payloads))))
    before = cpu()
    for payload in payloads:
        hashlib.sha256(payload).digest()
    results.append(("inspect", "sha256", *per_message(before, cpu(), len(payloads))))
    before = cpu()
    inspect_gateway(inspector, payloads)
    results.append(("inspect", "gateway", *per_message(before, cpu(), len(payloads))))

    for batch in args.batch:
        before = cpu()
        commit_reference(str(tmp / f"ref-{batch}.sqlite"), payloads, batch)
        results.append((f"commit, rounds of {batch}", "reference", *per_message(before, cpu(), len(payloads))))

        name = f"gw-{batch}.sqlite"
        engine = gateway_database(tmp, name)
        writer = IngestWriter(engine, deliver=None, on_reused=lambda item: None,
                              audit=AuditTrail(engine, "bench"))
        fresh = inspect_gateway(inspector, payloads)  # the writer gives items their ids
        before = cpu()
        commit_writer(writer, engine, fresh, batch)
        after = cpu()
        engine.dispose()

        before_rows = cpu()
        commit_rows(str(tmp / f"rows-{batch}.sqlite"), str(tmp / name), payloads, batch)
        results.append((f"commit, rounds of {batch}", "rows", *per_message(before_rows, cpu(), len(payloads))))
        results.append((f"commit, rounds of {batch}", "writer", *per_message(before, after, len(payloads))))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", default="1,4,8,32", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--msg", choices=("adt", "oru"), default="oru")
    parser.add_argument("--cpu", type=int, default=0, help="the core to run on")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    with tempfile.TemporaryDirectory(prefix="ingest-floor-") as tmp:
        results = measure(args, Path(tmp))
    print(f"\n### ingest CPU per message, {args.msg.upper()}, SQLite, one thread on one core "
          f"({args.messages} messages)\n")
    print("| step | what | user µs | system µs | total µs |")
    print("|---|---|---:|---:|---:|")
    for step, what, user, system in results:
        print(f"| {step} | {what} | {user:.1f} | {system:.1f} | {user + system:.1f} |")
    by = {(step, what): user + system for step, what, user, system in results}
    print()
    for batch in args.batch:
        step = f"commit, rounds of {batch}"
        floor = by[("inspect", "gateway")] + by[(step, "rows")]
        reference = by[("inspect", "reference")] + by[(step, "reference")]
        print(f"rounds of {batch}: the reference's inspect + commit {reference:.0f} µs; the gateway's "
              f"inspect + its rows at the least {floor:.0f} µs ({floor / reference:.2f}x), as built "
              f"{by[('inspect', 'gateway')] + by[(step, 'writer')]:.0f} µs")


if __name__ == "__main__":
    main()

"""How fast the audit trail appends: records per second by batch size, on SQLite and PostgreSQL.

    python bench/audit_append.py [--url URL] [--records 40000] [--batches 200,1000,4000]

At several thousand messages per second the gateway makes about 3 records per message: the
receipt (with its ACK code), which the ingest writer appends in the transaction that stores
the message, a batch per group commit; the translation, appended with it by the translation
worker, a batch of up to 64; the delivery attempt, appended with its settlement. Each run starts
from an empty audit_log (the database is migrated, the table emptied). Prints, per batch size,
records/s of whole appends and the share of that time spent hashing (chain.chain, pure CPU).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sqlalchemy import text  # noqa: E402

from gateway.audit.chain import GENESIS, AuditEvent, chain  # noqa: E402
from gateway.audit.trail import AuditTrail  # noqa: E402
from gateway.store.database import create_gateway_engine, migrate  # noqa: E402

KINDS = ("message.received", "message.translated", "delivery.attempted")


def events(count: int, start: int = 0) -> list[AuditEvent]:
    """Records as the gateway makes them for a message's three steps."""
    made = []
    for n in range(start, start + count):
        message = n // len(KINDS)
        kind = KINDS[n % len(KINDS)]
        detail = {"control_id": f"B{message:011d}", "facility": "INPE-100001",
                  "message_type": "ORU^R01", "listener": "mllp-tls"}
        if kind == "message.received":
            detail.update(size=1800 + message % 500, ack_code="CA",
                          sha256=hashlib.sha256(str(message).encode()).hexdigest())
        elif kind == "message.translated":
            detail.update(mapping_version="2026.11-3f9c2a1", resources=7)
        else:
            detail.update(destination="shared-record", code=200, attempt=1, duration=0.034)
        made.append(AuditEvent(kind, "INPE-100001", subject=f"message/{message}",
                               source="10.20.0.5:40000", detail=detail))
    return made


def run(url: str, records: int, batch: int) -> tuple[float, float]:
    engine = create_gateway_engine(url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_log"))
    trail = AuditTrail(engine, "bench-node")
    work = [events(batch, start) for start in range(0, records, batch)]
    started = time.perf_counter()
    for chunk in work:
        trail.append(chunk)
    elapsed = time.perf_counter() - started
    now = datetime.now(timezone.utc)
    hashing_started = time.perf_counter()
    for chunk in work:
        chain(0, GENESIS, "bench-node", chunk, now)
    hashing = time.perf_counter() - hashing_started
    assert trail.verify().count == len(work) * batch
    engine.dispose()
    return len(work) * batch / elapsed, hashing / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", action="append", help="database URL (repeatable); default: a "
                        "temporary SQLite file")
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--batches", default="200,1000,4000")
    args = parser.parse_args()
    urls = args.url or [f"sqlite:///{tempfile.mkdtemp()}/audit.sqlite"]
    for url in urls:
        backend = url.split(":", 1)[0]
        for batch in (int(b) for b in args.batches.split(",")):
            rate, hashing = run(url, args.records, batch)
            print(f"{backend:<22} batch {batch:>6}: {rate:>9,.0f} records/s "
                  f"(hashing {hashing:.0%} of the time)")


if __name__ == "__main__":
    main()

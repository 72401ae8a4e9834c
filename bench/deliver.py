"""End-to-end delivery benchmark: MLLP in -> stored -> translated -> delivered to the reference
shared record over mutual TLS and confirmed, on PostgreSQL, ORU^R01 at 8 connections.

Starts the sandbox peers (`gateway sandbox`, the record's input validation off: its cost is not
the gateway's) and a gateway (`gateway run`) with a temporary configuration and a fresh
database, loads it with shared/bench/loadclient.py, then waits until every message is
delivered. Prints the ingest rate (the load client's), the end-to-end rate (messages / time
from the first receipt to the last confirmed delivery) and the outbox lag (receipt to confirmed
delivery) p50/p99/max. Targets (issue 4): >= 1,000 msgs/s end to end, lag p99 < 2 s.

    .venv/bin/python bench/deliver.py [--count 3000] [--conns 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (the servers, load client and PostgreSQL helpers)

DB = "gateway_bench_deliver"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB}"
TARGET_RATE = 1000.0
TARGET_P99 = 2.0


def write_configs(tmp: Path, mllp_port: int, record_port: int) -> Path:
    import yaml

    dev = ingest.ROOT / "certs" / "dev"
    conf = tmp / "conf"
    conf.mkdir()
    (conf / "routes.yaml").write_text(
        "routes:\n  - name: results\n    when: {resources: [Observation]}\n    to: [shared-record]\n")
    config = {
        "node": {"name": "bench"},
        "log_level": "warn",
        "database": {"url": URL, "pool_size": 4, "ingest_max_batch": 512},
        "pki": {"ca": str(dev / "ca.crt"), "cert": str(dev / "gateway.crt"), "key": str(dev / "gateway.key"),
                "dev_dir": str(dev)},
        "listeners": {"mllp": [{"name": "bench", "port": mllp_port, "interface": "127.0.0.1",
                                "accept_unknown_senders": True}]},
        "facilities": str(ingest.ROOT / "conf" / "facilities.yaml"),
        "mappings": {"directory": str(ingest.ROOT / "mappings")},
        "destinations": [{"name": "shared-record", "kind": "fhir-record",
                          "url": f"https://127.0.0.1:{record_port}/fhir", "concurrency": 32}],
        "routes": "conf/routes.yaml",
        "delivery": {"poll_interval": 0.05},
        "sandbox": {"record": {"port": record_port, "store": str(tmp / "record.sqlite"), "validate": False}},
    }
    path = conf / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def delivered(count: int, timeout: float) -> dict:
    """Wait until `count` deliveries are settled; the timing figures."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={DB}", autocommit=True) as db:
        while True:
            done = db.execute("SELECT count(*) FROM deliveries WHERE status <> 'pending'").fetchone()[0]
            if done >= count or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        row = db.execute("""
            SELECT count(*) FILTER (WHERE d.status = 'delivered'),
                   count(*) FILTER (WHERE d.status = 'dead'),
                   EXTRACT(EPOCH FROM max(d.finished_at) - min(m.received_at)),
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM d.finished_at - m.received_at)),
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM d.finished_at - m.received_at)),
                   max(EXTRACT(EPOCH FROM d.finished_at - m.received_at))
            FROM deliveries d JOIN messages m ON m.id = d.message_id WHERE d.finished_at IS NOT NULL""").fetchone()
    ok, dead, span, p50, p99, worst = row
    return {"delivered": ok, "dead": dead, "span_s": float(span or 0), "lag_p50_s": float(p50 or 0),
            "lag_p99_s": float(p99 or 0), "lag_max_s": float(worst or 0)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--conns", type=int, default=8)
    args = parser.parse_args(argv)
    py = ingest.python_exe()
    ingest.ensure_dev_certs(py)
    ingest.recreate_pg_db(DB)
    with tempfile.TemporaryDirectory(prefix="bench-deliver-") as name:
        tmp = Path(name)
        mllp_port, record_port = ingest.free_port(), ingest.free_port()
        config = write_configs(tmp, mllp_port, record_port)
        sandbox = [py, "-m", "gateway", "sandbox", "-c", str(config)]
        gateway = [py, "-m", "gateway", "run", "-c", str(config)]
        with ingest.running(sandbox, record_port, "sandbox", tmp / "sandbox.log"), \
                ingest.running(gateway, mllp_port, "gateway", tmp / "gateway.log") as proc:
            report = ingest.run_load([], py, mllp_port, proc.pid, "oru", args.conns, args.count, 0,
                                     "id", watch_pg=False)
            figures = delivered(args.count, timeout=max(120.0, args.count / 50))
    rate = figures["delivered"] / figures["span_s"] if figures["span_s"] else 0.0
    result = {"conns": args.conns, "count": args.count, "ingest_msgs_s": report.get("msgs_per_s"),
              "end_to_end_msgs_s": round(rate, 1), **figures}
    print(json.dumps(result))
    print(f"ORU^R01, {args.conns} connections, PostgreSQL: ingest {report.get('msgs_per_s')} msgs/s; "
          f"delivered {figures['delivered']}/{args.count} (dead {figures['dead']}) at {rate:.0f} msgs/s end to "
          f"end; lag p50 {figures['lag_p50_s']:.2f} s, p99 {figures['lag_p99_s']:.2f} s, "
          f"max {figures['lag_max_s']:.2f} s")
    met = rate >= TARGET_RATE and figures["lag_p99_s"] < TARGET_P99 and figures["delivered"] == args.count
    print(f"target >= {TARGET_RATE:.0f} msgs/s with lag p99 < {TARGET_P99:.0f} s: {'PASS' if met else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

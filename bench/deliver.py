"""End-to-end delivery benchmark: MLLP in -> stored -> translated -> delivered to the reference
shared record over mutual TLS and confirmed, on PostgreSQL, ORU^R01 at 8 connections, with the
ingest-only figure of the same run.

Four runs, each on a fresh database, everything on this machine (no pinning: the gateway,
the record, PostgreSQL and the load client share its cores):

  ingest   the gateway without mappings or routes (ingest only), loaded by the shared load
           client (../shared/bench/loadclient.py): the ACK rate of the same gateway, settings
           and load when it has nothing else to do;
  translate  the gateway with mappings but no routes (ingest and translation, nothing to
           deliver): the sustained rate without delivery, and what translation costs;
  one      the whole path with the shared load client, whose messages are all about one
           patient: per-patient order makes every delivery wait for the previous one, so they
           go one request (batch) at a time;
  many     the whole path with bench/patient_load.py: the same ORU^R01 for `--patients`
           patients in turn, each message a lab order of its own.

The record (`gateway sandbox`) runs with its input validation off (its cost is not the
gateway's) and stores every resource. For `one` and `many` it prints: the ACK rate under
load, the end-to-end rate (messages / time from the first receipt to the last confirmed
delivery), the outbox lag (receipt to confirmed delivery) p50/p95/p99/max and the part of it
spent waiting for translation, the number of requests the record received (batching), CPU
milliseconds per message of each process (gateway, record, PostgreSQL, load client), and a
check that every message reached the record exactly once: each delivery delivered with one
delivered attempt, the record applied no more entries than the messages' bundles hold and
at least one per distinct resource (a request carries a resource that several of its messages
hold once), and it holds one Provenance per message naming its control id.

Targets (issue 4): >= 1,000 msgs/s end to end with lag p99 < 2 s.

    .venv/bin/python bench/deliver.py [--count 3000] [--conns 8] [--patients 200] [--runs ingest,one,many]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest  # noqa: E402  (servers, load client, PostgreSQL helpers)

DB = "gateway_bench_deliver"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB}"
RUNS = ("ingest", "translate", "one", "many")
TARGET_RATE = 1000.0
TARGET_P99 = 2.0
CONCURRENCY = 4  # requests in flight to the record: batches of up to 64 messages each
TICK = os.sysconf("SC_CLK_TCK")


def write_config(tmp: Path, mllp_port: int, record_port: int, deliver: bool, translate: bool = True) -> Path:
    """The gateway's (and the sandbox's) temporary configuration: ingest only, ingest and
    translation (`translate` without `deliver`: no routes), or the whole path."""
    import yaml

    dev = ingest.ROOT / "certs" / "dev"
    conf = tmp / "conf"
    conf.mkdir(exist_ok=True)
    config = {
        "node": {"name": "bench"},
        "log_level": "warn",
        "database": {"url": URL, "pool_size": 4, "ingest_max_batch": 512},
        "pki": {"ca": str(dev / "ca.crt"), "cert": str(dev / "gateway.crt"), "key": str(dev / "gateway.key"),
                "dev_dir": str(dev), "prescription_key": str(dev / "prescription-signing.key")},
        "listeners": {"mllp": [{"name": "bench", "port": mllp_port, "interface": "127.0.0.1",
                                "accept_unknown_senders": True}]},
        "facilities": str(ingest.ROOT / "conf" / "facilities.yaml"),
    }
    if translate and not deliver:
        config["mappings"] = {"directory": str(ingest.ROOT / "mappings")}
    if deliver:
        (conf / "routes.yaml").write_text(
            "routes:\n  - name: results\n    when: {resources: [Observation]}\n    to: [shared-record]\n")
        config.update({
            "mappings": {"directory": str(ingest.ROOT / "mappings")},
            "destinations": [{"name": "shared-record", "kind": "fhir-record",
                              "url": f"https://127.0.0.1:{record_port}/fhir", "concurrency": CONCURRENCY}],
            "routes": "conf/routes.yaml",
            "delivery": {"poll_interval": 0.05},
            "sandbox": {"record": {"port": record_port, "store": str(tmp / "record.sqlite"),
                                   "validate": False}},
        })
    path = conf / ("gateway.yaml" if deliver else "translate.yaml" if translate else "ingest.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# -- CPU --------------------------------------------------------------------------------------

def ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])
    except (OSError, IndexError, ValueError):
        return 0


def postgres_ticks() -> int:
    """The server's own processes and the backends of the bench's database: not the backends
    of other databases (tests running meanwhile), whose end would make the sum go back."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if not f.read().startswith("postgres"):
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if _postgres_counts(title):
                total += ticks(int(entry))
    return total


def _postgres_counts(title: str) -> bool:
    """Whether a postgres process (by its title: "postgres: 15/main: USER DB HOST(PORT) ...",
    "... autovacuum worker DB", "... walwriter") is the server's or one of DB's."""
    words = title.split(": ", 2)[-1].split()
    if "autovacuum" in words[:1] and "worker" in words[1:2]:
        return DB in words[2:3]
    if len(words) >= 3 and "(" in words[2]:  # a backend: user, database, client address
        return words[1] == DB
    return True


def cpu_snapshot(gateway_pid: int, record_pid: int) -> dict[str, int]:
    return {"gateway": ticks(gateway_pid), "record": ticks(record_pid), "postgres": postgres_ticks()}


# -- load -------------------------------------------------------------------------------------

def patient_load(py: str, port: int, conns: int, count: int, patients: int) -> dict:
    r = subprocess.run([py, str(Path(__file__).resolve().parent / "patient_load.py"), "--port", str(port),
                        "--conns", str(conns), "--count", str(count), "--patients", str(patients)],
                       capture_output=True, text=True, timeout=600)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise ingest.BenchError(f"patient_load.py failed (code {r.returncode}):\n{r.stderr.strip()[-3000:]}")
    return json.loads(lines[-1])


# -- what the gateway and the record say ------------------------------------------------------

def wait_settled(count: int, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={DB}", autocommit=True) as db:
        while time.monotonic() < deadline:
            if db.execute("SELECT count(*) FROM deliveries WHERE status <> 'pending'").fetchone()[0] >= count:
                return
            time.sleep(0.1)


def outbox_figures() -> dict:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={DB}", autocommit=True) as db:
        row = db.execute("""
            SELECT count(*) FILTER (WHERE d.status = 'delivered'),
                   count(*) FILTER (WHERE d.status = 'dead'),
                   count(*) FILTER (WHERE d.status = 'pending'),
                   EXTRACT(EPOCH FROM max(d.finished_at) - min(m.received_at)),
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP
                       (ORDER BY EXTRACT(EPOCH FROM d.finished_at - m.received_at)),
                   max(EXTRACT(EPOCH FROM d.finished_at - m.received_at)),
                   percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP
                       (ORDER BY EXTRACT(EPOCH FROM t.translated_at - m.received_at))
            FROM deliveries d JOIN messages m ON m.id = d.message_id
            JOIN translations t ON t.message_id = d.message_id""").fetchone()
        once = db.execute("""
            SELECT count(*) FROM deliveries d
            WHERE (SELECT count(*) FROM delivery_attempts a
                   WHERE a.delivery_id = d.id AND a.outcome = 'delivered') <> 1""").fetchone()[0]
        attempts = db.execute("SELECT count(*) FROM delivery_attempts").fetchone()[0]
        control_ids = {r[0] for r in db.execute("SELECT control_id FROM messages WHERE accepted")}
        entries, distinct = db.execute(
            "SELECT count(*), count(DISTINCT e ->> 'fullUrl') FROM canonical_bundles b "
            "JOIN deliveries d ON d.message_id = b.message_id, json_array_elements(b.bundle::json -> 'entry') e"
        ).fetchone()
    ok, dead, pending, span, lags, worst, translate_lags = row
    lags, translate_lags = lags or [0, 0, 0], translate_lags or [0, 0]
    return {"delivered": ok, "dead": dead, "pending": pending, "span_s": float(span or 0),
            "lag_p50_s": float(lags[0]), "lag_p95_s": float(lags[1]), "lag_p99_s": float(lags[2]),
            "lag_max_s": float(worst or 0), "translate_lag_p50_s": float(translate_lags[0]),
            "translate_lag_p99_s": float(translate_lags[1]), "attempts": attempts,
            "not_delivered_exactly_once": once, "_control_ids": control_ids, "_entries": int(entries),
            "_distinct": int(distinct)}


def record_stats(port: int) -> dict:
    dev = ingest.ROOT / "certs" / "dev"
    context = ssl.create_default_context(cafile=str(dev / "ca.crt"))
    context.load_cert_chain(str(dev / "gateway.crt"), str(dev / "gateway.key"))
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/_sandbox/stats", context=context, timeout=10) as r:
        return json.loads(r.read())


def record_provenance(path: Path) -> list[str]:
    """The source control id of every Provenance the record holds (read once it has stopped)."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version, content FROM resources WHERE type = 'Provenance'").fetchall()
    found = []
    for version, content in rows:
        what = json.loads(content)["entity"][0]["what"]["identifier"]["value"]
        found.append(what if version == 1 else f"{what} (version {version})")
    return found


# -- runs -------------------------------------------------------------------------------------

def run_ingest(py: str, args, tmp: Path, translate: bool = False) -> dict:
    """The gateway without delivery: ingest only, or ingest and translation (then the
    sustained rate: messages / time from the first receipt to the last translation)."""
    ingest.recreate_pg_db(DB)
    port = ingest.free_port()
    config = write_config(tmp, port, 0, deliver=False, translate=translate)
    run = "translate" if translate else "ingest"
    with ingest.running([py, "-m", "gateway", "run", "-c", str(config)], port, "gateway",
                        tmp / f"{run}.log") as proc:
        before = cpu_snapshot(proc.pid, 0)
        report = ingest.run_load([], py, port, proc.pid, "oru", args.conns, args.count, 0, "id", watch_pg=False)
        acked = report.get("acked") or 0
        sustained = wait_translated(acked, timeout=max(120.0, acked / 20)) if translate else None
        after = cpu_snapshot(proc.pid, 0)
    result = {"run": run, "ack_msgs_s": report.get("msgs_per_s"), "ack_p99_ms": report.get("p99_ms"),
              "acked": acked, "bad_acks": report.get("bad_acks"),
              "cpu_ms_per_msg": {name: round((after[name] - before[name]) / TICK * 1000 / acked, 3)
                                 if acked else None for name in ("gateway", "postgres")}}
    if translate:
        result["sustained_msgs_s"] = sustained
    return result


def wait_translated(count: int, timeout: float) -> float:
    """Wait until `count` messages are translated; messages / (last translation - first receipt)."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={DB}", autocommit=True) as db:
        while time.monotonic() < deadline:
            if db.execute("SELECT count(*) FROM translations").fetchone()[0] >= count:
                break
            time.sleep(0.1)
        done, span = db.execute("""SELECT count(*), EXTRACT(EPOCH FROM max(t.translated_at) - min(m.received_at))
                                   FROM translations t JOIN messages m ON m.id = t.message_id""").fetchone()
    return round(done / float(span), 1) if span else 0.0


def run_delivery(py: str, args, tmp: Path, run: str) -> dict:
    ingest.recreate_pg_db(DB)
    record_store = tmp / "record.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{record_store}{suffix}").unlink(missing_ok=True)
    mllp_port, record_port = ingest.free_port(), ingest.free_port()
    config = write_config(tmp, mllp_port, record_port, deliver=True)
    with ingest.running([py, "-m", "gateway", "sandbox", "-c", str(config)], record_port, "sandbox",
                        tmp / f"sandbox-{run}.log") as record, \
            ingest.running([py, "-m", "gateway", "run", "-c", str(config)], mllp_port, "gateway",
                           tmp / f"gateway-{run}.log") as gateway:
        before = cpu_snapshot(gateway.pid, record.pid)
        if run == "one":
            report = ingest.run_load([], py, mllp_port, gateway.pid, "oru", args.conns, args.count, 0, "id",
                                     watch_pg=False)
        else:
            report = patient_load(py, mllp_port, args.conns, args.count, args.patients)
        acked = report.get("acked") or 0
        wait_settled(acked, timeout=max(120.0, acked / 20))
        after = cpu_snapshot(gateway.pid, record.pid)
        stats = record_stats(record_port)
    figures = outbox_figures()
    control_ids, entries, distinct = figures.pop("_control_ids"), figures.pop("_entries"), figures.pop("_distinct")
    provenance = record_provenance(record_store)
    cpu = {name: round((after[name] - before[name]) / TICK * 1000 / acked, 3) if acked else None
           for name in before}
    cpu["client"] = round(report["client_cpu"] * report["wall_s"] * 1000 / acked, 3) if acked else None
    once = (figures["delivered"] == acked and figures["not_delivered_exactly_once"] == 0
            and distinct <= stats["entries"] <= entries and sorted(provenance) == sorted(control_ids))
    return {"run": run, "patients": 1 if run == "one" else args.patients, "acked": acked,
            "bad_acks": report.get("bad_acks"), "ack_msgs_s": report.get("msgs_per_s"),
            "ack_p99_ms": report.get("p99_ms"),
            "end_to_end_msgs_s": round(figures["delivered"] / figures["span_s"], 1) if figures["span_s"] else 0.0,
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
            "record_requests": stats["requests"], "record_applied": stats["applied"],
            "record_entries": stats["entries"], "bundle_entries": entries, "distinct_entries": distinct,
            "record_provenance": len(provenance),
            "msgs_per_request": round(figures["delivered"] / stats["requests"], 1) if stats["requests"] else None,
            "cpu_ms_per_msg": cpu, "exactly_once": once}


def show(result: dict, ingest_rate) -> None:
    if result["run"] == "ingest":
        print(f"ingest only: {result['ack_msgs_s']} msgs/s acknowledged (p99 {result['ack_p99_ms']} ms); "
              f"CPU ms per message: {result['cpu_ms_per_msg']}")
        return
    if result["run"] == "translate":
        print(f"ingest and translation (no delivery): {result['ack_msgs_s']} msgs/s acknowledged, "
              f"{result['sustained_msgs_s']} msgs/s translated (sustained); "
              f"CPU ms per message: {result['cpu_ms_per_msg']}")
        return
    r = result
    cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_msg"].items())
    met = (r["end_to_end_msgs_s"] >= TARGET_RATE and r["lag_p99_s"] < TARGET_P99 and r["exactly_once"])
    print(f"{r['run']} ({r['patients']} patient{'s' if r['patients'] > 1 else ''}): "
          f"{r['ack_msgs_s']} msgs/s acknowledged under load (ingest only: {ingest_rate}); "
          f"{r['delivered']}/{r['acked']} delivered (dead {r['dead']}) at {r['end_to_end_msgs_s']:.0f} msgs/s "
          f"end to end; lag p50 {r['lag_p50_s']:.2f} s, p95 {r['lag_p95_s']:.2f} s, p99 {r['lag_p99_s']:.2f} s, "
          f"max {r['lag_max_s']:.2f} s (of which waiting for translation: p50 {r['translate_lag_p50_s']:.2f} s, "
          f"p99 {r['translate_lag_p99_s']:.2f} s)")
    print(f"  record: {r['record_requests']} requests ({r['msgs_per_request']} messages each), "
          f"{r['record_entries']} entries applied for {r['bundle_entries']} in the bundles "
          f"({r['distinct_entries']} distinct), "
          f"{r['record_provenance']} Provenance; exactly once: {'yes' if r['exactly_once'] else 'NO'}")
    print(f"  CPU ms per message: {cpu}")
    print(f"  target >= {TARGET_RATE:.0f} msgs/s with lag p99 < {TARGET_P99:.0f} s: {'PASS' if met else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--patients", type=int, default=200, help="patients of the `many` run")
    parser.add_argument("--runs", type=ingest.csv_of(RUNS), default=RUNS,
                        help="ingest,translate,one,many (default: all four)")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="default var/bench/deliver-<timestamp>.json")
    args = parser.parse_args(argv)
    py = ingest.python_exe()
    ingest.ensure_dev_certs(py)
    if not (ingest.ROOT / "certs" / "dev" / "prescription-signing.key").exists():
        # A development PKI made before prescriptions existed: `pki init` adds what is missing.
        subprocess.run([py, "-m", "gateway", "pki", "init"], cwd=ingest.ROOT, check=True, capture_output=True)
    results = []
    ingest_rate = None
    with tempfile.TemporaryDirectory(prefix="bench-deliver-") as name:
        for run in args.runs:
            if run in ("ingest", "translate"):
                result = run_ingest(py, args, Path(name), translate=(run == "translate"))
            else:
                result = run_delivery(py, args, Path(name), run)
            if run == "ingest":
                ingest_rate = result["ack_msgs_s"]
            results.append(result)
            print(json.dumps(result), flush=True)
            show(result, ingest_rate)
    out = args.json_out or ingest.ROOT / "var" / "bench" / \
        f"deliver-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
                               "cpus": os.cpu_count(), "results": results}, indent=1, default=list))
    print(f"(figures kept in {out})")
    return 0 if all(r.get("exactly_once", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Ingest benchmark: the gateway's MLLP listener against two references measured in the same run.

For each store (sqlite, pg), message type (adt, oru) and connection count (8 and 64 by default;
1 with --conns 1,8,64) it loads:

  ref      shared/bench/srv_ref_twisted.py: frame + fixed ACK, the physical limit of Twisted
           (store-independent, measured once per message type and connection count);
  durable  shared/bench/srv_durable_twisted.py: raw message committed (group commit) before the
           ACK, the floor for any gateway that commits before it acknowledges;
  gateway  `python -m gateway run` with a temporary configuration and a fresh database;
  translating  the same gateway with `mappings:` (every message translated after its commit,
           on the same core), at the connection counts of --translation-conns: after the
           load, the backlog (messages still `received`) and the time it takes to drain.

Each server runs on one core (taskset -c 0), the load client (shared/bench/loadclient.py) on
another (taskset -c 1). Figures are only meaningful as ratios to the references of the same run.
The translation table compares `translating` with `gateway` (ingest only) of the same run:
msgs/s acknowledged, and sustained msgs/s = messages / (load time + drain time), whose
difference from ingest only, per message, is what translation costs the gateway's core
(warm-up messages included on both sides, as their backlog drains with the rest).

    .venv/bin/python bench/ingest.py                       # the default run (~2 min on 2 cores)
    .venv/bin/python bench/ingest.py --conns 1,8,64 --translation-conns 8,64   # everything
    .venv/bin/python bench/ingest.py --quick --stores sqlite --servers ref,durable
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"

STORES = ("sqlite", "pg")
MSGS = ("adt", "oru")
CONNS = (8, 64)            # default; 1 connection (latency-bound, no target) with --conns 1,8,64
SERVERS = ("ref", "durable", "gateway", "translating")
TRANSLATION_CONNS = (8,)   # default connection counts of the `translating` runs

PG_ADMIN_DSN = "host=127.0.0.1 user=postgres dbname=postgres"
PG_REF_DB = "gateway_bench_ref"
PG_GW_DB = "gateway_bench"
PG_REF_DSN = f"host=127.0.0.1 user=postgres dbname={PG_REF_DB}"
PG_GW_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{PG_GW_DB}"

COUNT_ONE_CONN = 3000      # measured messages at 1 connection (latency-bound, slow)
COUNT_MANY_CONNS = 20000   # measured messages at 8 and 64 connections
TRANSLATION_COUNT = 3000   # measured messages of a `translating` run (then its backlog drains)
WARMUP = 500
QUICK_DIVISOR = 5
MAX_SECONDS = 20           # loadclient's hard stop per phase: bounds the run if a server is slow

START_TIMEOUT = 30.0       # seconds for a server to accept TCP connections
DRAIN_TIMEOUT = 120.0      # seconds the translation backlog may take to drain after the load
DRAIN_POLL = 0.1           # seconds between two counts of the backlog
STOP_TIMEOUT = 5.0         # seconds between SIGTERM and SIGKILL

TARGET_CONNS = (8, 64)     # rows where the throughput target applies
TARGET_RATIO = 0.8         # gateway msgs/s >= 0.8 x durable msgs/s
P99_CONNS = 64             # row where the latency target applies
TARGET_P99_MS = 10.0


class BenchError(RuntimeError):
    """A server or the load client failed: the run cannot go on."""


# --------------------------------------------------------------------------- options

def csv_of(choices, convert=str):
    """argparse type: a comma-separated list whose items are all in `choices`."""
    def parse(text):
        items = [convert(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(choices)}")
        return items
    return parse


def positive_csv(text):
    """argparse type: comma-separated positive integers (connection counts)."""
    try:
        items = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        items = []
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError("expected comma-separated positive integers")
    return items


def parse_args(argv=None):
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stores", type=csv_of(STORES), default=list(STORES), help="default: sqlite,pg")
    ap.add_argument("--msgs", type=csv_of(MSGS), default=list(MSGS), help="default: adt,oru")
    ap.add_argument("--conns", type=positive_csv, default=list(CONNS), help="default: 8,64")
    ap.add_argument("--servers", type=csv_of(SERVERS), default=list(SERVERS),
                    help="default: ref,durable,gateway,translating")
    ap.add_argument("--translation-conns", type=positive_csv, default=list(TRANSLATION_CONNS),
                    help="connection counts of the `translating` runs (default: 8)")
    ap.add_argument("--translation-count", type=int, default=TRANSLATION_COUNT,
                    help=f"measured messages of a `translating` run (default {TRANSLATION_COUNT}; "
                         f"translation runs at a few hundred to a few thousand messages/s)")
    ap.add_argument("--quick", action="store_true", help=f"divide message counts by {QUICK_DIVISOR}")
    ap.add_argument("--count", type=int, default=None,
                    help=f"measured messages per run, any connection count "
                         f"(default {COUNT_ONE_CONN} at 1 connection, {COUNT_MANY_CONNS} otherwise)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each durable/gateway pair this many times, alternately, and "
                         "report the median run of each (a machine whose speed drifts within "
                         "minutes: the ratio of medians is steadier than one pair)")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="raw results (default var/bench/ingest-<timestamp>.json)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be 1 or more")
    return args


def counts_for(conns, args, server="gateway"):
    """(measured count, warmup) for one run."""
    div = QUICK_DIVISOR if args.quick else 1
    if server == "translating" and not args.count:
        count = args.translation_count
    else:
        count = args.count or (COUNT_ONE_CONN if conns == 1 else COUNT_MANY_CONNS)
    return max(1, count // div), WARMUP // div


# --------------------------------------------------------------------------- machine

def python_exe():
    """The project's virtualenv interpreter (servers and client need Twisted, psycopg, uvloop)."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def pinning():
    """(server prefix, client prefix): taskset on two distinct CPUs, or nothing if impossible."""
    cpus = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cpus) < 2:
        print("note: taskset missing or fewer than 2 CPUs: server and client are not pinned")
        return [], []
    return ["taskset", "-c", str(cpus[0])], ["taskset", "-c", str(cpus[1])]


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- stores

def pg_error():
    """None if the local PostgreSQL accepts connections, else the reason."""
    try:
        import psycopg
        psycopg.connect(PG_ADMIN_DSN, connect_timeout=3).close()
    except Exception as e:  # noqa: BLE001 - any failure means "skip pg"
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def pg_admin(*statements):
    """Run statements on the maintenance database in autocommit (CREATE/DROP DATABASE)."""
    import psycopg
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as db:
        for sql in statements:
            db.execute(sql)


def recreate_pg_db(name):
    """Drop (closing any leftover session) and create database `name`: a fresh store."""
    pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')


def remove_sqlite(path):
    """Delete a SQLite database and its WAL/SHM companions."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def fresh_store(server, store, tmp):
    """Give `server` an empty store for `store` before it starts."""
    if server == "ref":
        return
    if store == "sqlite":
        remove_sqlite(tmp / ("ref.sqlite" if server == "durable" else "gw.sqlite"))
    else:
        recreate_pg_db(PG_REF_DB if server == "durable" else PG_GW_DB)


def message_counts(store, tmp):
    """{status: count} of the gateway's messages table, read while the gateway runs."""
    sql = "SELECT status, count(*) FROM messages GROUP BY status"
    if store == "sqlite":
        import sqlite3
        db = sqlite3.connect(f"file:{tmp / 'gw.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return dict(db.execute(sql).fetchall())
        finally:
            db.close()
    import psycopg
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={PG_GW_DB}", connect_timeout=5) as db:
        return dict(db.execute(sql).fetchall())


def drain(store, tmp, proc):
    """After the load: the translation backlog (messages still `received`), then the seconds
    until there is none (None if it does not drain within DRAIN_TIMEOUT), and the counts."""
    started = time.monotonic()
    counts = message_counts(store, tmp)
    backlog = counts.get("received", 0)
    left = backlog
    while left and time.monotonic() - started < DRAIN_TIMEOUT and proc.poll() is None:
        time.sleep(DRAIN_POLL)
        counts = message_counts(store, tmp)
        left = counts.get("received", 0)
    return {"backlog_at_end": backlog, "drain_s": round(time.monotonic() - started, 2) if not left else None,
            "received_left": left, "translated": counts.get("translated", 0), "failed": counts.get("failed", 0)}


# --------------------------------------------------------------------------- gateway

def write_gateway_config(path, store, tmp, port, translate=False):
    """The gateway's temporary YAML configuration: one plain MLLP listener on `port`; with
    `translate`, the project's mapping set (every message translated after its commit)."""
    import yaml
    url = f"sqlite:///{tmp / 'gw.sqlite'}" if store == "sqlite" else PG_GW_URL
    dev = ROOT / "certs" / "dev"
    cfg = {
        "node": {"name": "bench"},
        "log_level": "warn",
        "database": {"url": url, "pool_size": 2, "ingest_max_batch": 512},
        "pki": {"ca": str(dev / "ca.crt"), "cert": str(dev / "gateway.crt"), "key": str(dev / "gateway.key")},
        "identity": {"application": "MA_HIE_GATEWAY", "facility": "MA_HIE"},
        "listeners": {"mllp": [{
            "name": "bench", "port": port, "interface": "127.0.0.1", "tls": False,
            "accept_unknown_senders": True, "allow_sources": ["127.0.0.0/8"],
        }]},
        "facilities": str(ROOT / "conf" / "facilities.yaml"),
    }
    if translate:
        cfg["mappings"] = {"directory": str(ROOT / "mappings")}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")


def ensure_dev_certs(py):
    """Create the development PKI (as `make pki` does) if the gateway's certificates are missing."""
    if (ROOT / "certs" / "dev" / "ca.crt").exists():
        return
    print("note: certs/dev missing, running `gateway pki init`")
    r = subprocess.run([py, "-m", "gateway", "pki", "init"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"`gateway pki init` failed:\n{r.stderr.strip()}")


# --------------------------------------------------------------------------- servers

def server_command(server, store, port, tmp, py):
    """Command line (without pinning) that starts `server` on `port`."""
    if server == "ref":
        return [py, str(SHARED / "srv_ref_twisted.py"), "--port", str(port)]
    if server == "durable":
        cmd = [py, str(SHARED / "srv_durable_twisted.py"), "--port", str(port),
               "--store", store, "--commit", "group"]
        if store == "sqlite":
            return cmd + ["--sync", "FULL", "--db", str(tmp / "ref.sqlite")]
        return cmd + ["--dsn", PG_REF_DSN]
    config = tmp / "gateway.yaml"
    write_gateway_config(config, store, tmp, port, translate=(server == "translating"))
    return [py, "-m", "gateway", "run", "-c", str(config)]


def log_tail(path, lines=30):
    """The last lines of a server's log, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def wait_for_port(proc, port, name, log):
    """Return once `port` accepts TCP connections; raise if the server dies or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with code {proc.returncode} before listening:\n{log_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"{name} did not accept connections on port {port} within {START_TIMEOUT:.0f} s:\n"
                     f"{log_tail(log)}")


def stop(proc):
    """SIGTERM, then SIGKILL if the server is still there after STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running(cmd, port, name, log):
    """Start a server (output to `log`), wait until it listens, yield its process, stop it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(proc, port, name, log)
        yield proc
    finally:
        stop(proc)


# --------------------------------------------------------------------------- load

def run_load(client_prefix, py, port, pid, msg, conns, count, warmup, verify, watch_pg):
    """Run loadclient.py once against `port`; return its JSON report."""
    cmd = client_prefix + [
        py, str(SHARED / "loadclient.py"), "--port", str(port), "--msg", msg, "--conns", str(conns),
        "--count", str(count), "--warmup", str(warmup), "--uvloop", "--verify", verify,
        "--max-seconds", str(MAX_SECONDS), "--server-pid", str(pid),
    ] + (["--watch-pg"] if watch_pg else [])
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=4 * MAX_SECONDS + 60)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise BenchError(f"load client failed (code {r.returncode}):\n{r.stderr.strip()[-3000:]}")
    return json.loads(lines[-1])


def measure(server, store, msg, conns, ctx):
    """Start one server with a fresh store, load it, stop it; return the result record."""
    count, warmup = counts_for(conns, ctx["args"], server)
    port = free_port()
    fresh_store(server, store, ctx["tmp"])
    cmd = ctx["server_prefix"] + server_command(server, store, port, ctx["tmp"], ctx["py"])
    log = ctx["tmp"] / f"{server}.log"
    with running(cmd, port, server, log) as proc:
        report = run_load(ctx["client_prefix"], ctx["py"], port, proc.pid, msg, conns, count, warmup,
                          "code" if server == "ref" else "id", watch_pg=(store == "pg"))
        if server == "translating":
            report.update(drain(store, ctx["tmp"], proc))
    report.pop("label", None)
    report.update(server=server, store=store, warmup=warmup, ok=load_ok(report))
    if not report["ok"]:
        report["server_log_tail"] = log_tail(log, 10)
    return report


def load_ok(report):
    """True if every measured message got a matching ACK on an open connection."""
    return bool(report.get("acked")) and not report.get("bad_acks") and not report.get("closed_early")


def show(r):
    """One progress line per measurement."""
    store = r["store"] or "-"
    cpu = f"srv cpu {r['server_cpu']:.2f}" if r.get("server_cpu") is not None else ""
    pg = f" pg cpu {r['pg_cpu']:.2f}" if r.get("pg_cpu") is not None else ""
    flag = "" if r["ok"] else (f"  !! bad_acks={r['bad_acks']} closed_early={r['closed_early']}"
                               f" {r.get('bad_ack_sample', '')[:120]!r}")
    backlog = ""
    if r["server"] == "translating":
        backlog = (f"  backlog {r['backlog_at_end']} drained in {fmt(r['drain_s'], '.1f')} s"
                   f" ({r['translated']} translated, {r['failed']} failed, {r['received_left']} left)")
    print(f"{r['msg']:<4} conns={r['conns']:<3} {store:<6} {r['server']:<11} "
          f"{fmt(r['msgs_per_s'], '>9.1f')} msgs/s  p50 {fmt(r['p50_ms'], '7.3f')} ms  "
          f"p99 {fmt(r['p99_ms'], '7.3f')} ms  "
          f"{cpu}{pg}  ({r['acked']}/{r['requested']} acked){flag}{backlog}", flush=True)


def plan(args):
    """The (server, store, msg, conns) runs, references next to what they are compared with."""
    runs = []
    for msg in args.msgs:
        for conns in args.conns:
            if "ref" in args.servers:
                runs.append(("ref", None, msg, conns))
            for store in args.stores:
                for _ in range(args.rounds):  # the pair alternately, so that drift hits both
                    runs += [(s, store, msg, conns) for s in ("durable", "gateway") if s in args.servers]
                if "translating" in args.servers and conns in args.translation_conns:
                    runs.append(("translating", store, msg, conns))
    return runs


# --------------------------------------------------------------------------- report

def medians(results):
    """One result per (server, store, msg, conns): with several rounds, the run of median
    throughput (the lower middle one for an even count), with every round's msgs/s in
    `rounds_msgs_per_s`."""
    groups = {}
    for r in results:
        groups.setdefault((r["server"], r["store"], r["msg"], r["conns"]), []).append(r)
    picked = []
    for runs in groups.values():
        if len(runs) == 1:
            picked.append(runs[0])
            continue
        ordered = sorted(runs, key=lambda r: r.get("msgs_per_s") or 0.0)
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["rounds_msgs_per_s"] = [r.get("msgs_per_s") for r in runs]
        median["ok"] = all(r.get("ok") for r in runs)
        picked.append(median)
    return picked


def find(results, server, store, msg, conns):
    """The result of one run, or None."""
    for r in results:
        if (r["server"], r["msg"], r["conns"]) == (server, msg, conns) and r["store"] in (store, None):
            return r
    return None


def row_verdict(gw, durable, conns):
    """PASS/FAIL of the target for one (msg, conns) row; 'n/a' where no target or no data."""
    if conns not in TARGET_CONNS or gw is None or durable is None:
        return "n/a"
    if not gw["ok"]:
        return "FAIL (ACKs)"
    why = []
    if gw["msgs_per_s"] < TARGET_RATIO * durable["msgs_per_s"]:
        why.append("throughput")
    if conns == P99_CONNS and gw["p99_ms"] >= TARGET_P99_MS:
        why.append("p99")
    return f"FAIL ({', '.join(why)})" if why else "PASS"


def field(result, key):
    """A figure of a result, or None when the run is missing."""
    return result[key] if result else None


def fmt(value, spec):
    """Format a number, or an en dash when it is missing."""
    return "–" if value is None else format(value, spec)


def store_table(results, store, msgs, conns_list):
    """Markdown table for one store, and the verdicts per (msg, conns) row."""
    lines = [f"### store: {store}, ingest", "",
             "| msg | conns | ref msgs/s | durable msgs/s | gateway msgs/s | gateway/durable "
             "| gateway p50 ms | gateway p99 ms | durable p99 ms | durable cpu µs/msg "
             "| gateway cpu µs/msg | 0.8x budget µs/msg | target |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    verdicts = {}
    for msg in msgs:
        for conns in conns_list:
            ref, dur, gw = (find(results, s, store, msg, conns) for s in ("ref", "durable", "gateway"))
            ratio = gw["msgs_per_s"] / dur["msgs_per_s"] if gw and dur and dur["msgs_per_s"] else None
            verdict = verdicts[(msg, conns)] = row_verdict(gw, dur, conns)
            lines.append(f"| {msg} | {conns} | {fmt(field(ref, 'msgs_per_s'), '.0f')} "
                         f"| {fmt(field(dur, 'msgs_per_s'), '.0f')} | {fmt(field(gw, 'msgs_per_s'), '.0f')} "
                         f"| {fmt(ratio, '.2f')} | {fmt(field(gw, 'p50_ms'), '.2f')} "
                         f"| {fmt(field(gw, 'p99_ms'), '.2f')} | {fmt(field(dur, 'p99_ms'), '.2f')} "
                         f"| {fmt(cpu_per_message(dur), '.0f')} | {fmt(cpu_per_message(gw), '.0f')} "
                         f"| {fmt(budget(dur), '.0f')} | {verdict} |")
    lines += ["", "cpu µs/msg: the server's CPU (all its threads, on its one core) per message acknowledged; "
              "0.8x budget: the time per message at 0.8x the durable reference's rate, the most CPU the "
              "gateway can spend per message to meet the target (bench/ingest_floor.py: what its steps "
              "cost at the least)."]
    return lines, verdicts


def cpu_per_message(result):
    """µs of the server's CPU per message acknowledged."""
    if not result or result.get("server_cpu") is None or not result["msgs_per_s"]:
        return None
    return 1e6 * result["server_cpu"] / result["msgs_per_s"]


def budget(durable):
    """µs per message at TARGET_RATIO of the durable reference's rate."""
    if not durable or not durable["msgs_per_s"]:
        return None
    return 1e6 / (TARGET_RATIO * durable["msgs_per_s"])


def translation_alone(msgs, tmp, py):
    """µs per message of translation alone (bench/translate.py: read_input + the mapping set,
    one core, best of three rounds), for each message type, measured now; {} if it fails."""
    out = tmp / "translate.json"
    r = subprocess.run([py, str(ROOT / "bench" / "translate.py"), "--msgs", ",".join(msgs),
                        "--no-profile", "--json-out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0 or not out.exists():
        print(f"note: translation alone not measured: {r.stderr.strip()[-500:]}")
        return {}
    measured = json.loads(out.read_text(encoding="utf-8"))["results"]
    return {msg: record["gateway_us"] for msg, record in measured.items() if record.get("gateway_us")}


def sustained(result):
    """Messages per second ingested and translated: every message handled (warm-up included,
    as its backlog is part of the drain) over the load, at the measured rate, and the drain of
    the backlog; None when the backlog did not drain."""
    if result is None or result["drain_s"] is None or not result["msgs_per_s"]:
        return None
    handled = result["translated"] + result["failed"]
    return handled / (handled / result["msgs_per_s"] + result["drain_s"])


def translation_table(results, store, msgs, conns_list, alone=None):
    """Markdown table for one store: ingest only against ingest with translation, same run,
    and the verdict lines of the requirement that translation costs the gateway no more than
    translation alone (`alone`: µs per message, by message type)."""
    alone = alone or {}
    lines = [f"### store: {store}, translation on (`translating`) against ingest only (`gateway`)", "",
             "| msg | conns | ingest only msgs/s | with translation msgs/s | ratio | p99 ms "
             "| backlog at end | drain s | sustained msgs/s | sustained / ingest only "
             "| translation cost µs/msg | translation alone µs/msg | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    verdicts = []
    for msg in msgs:
        for conns in conns_list:
            gw, tr = (find(results, s, store, msg, conns) for s in ("gateway", "translating"))
            if tr is None:
                continue
            ingest = field(gw, "msgs_per_s")
            ratio = tr["msgs_per_s"] / ingest if ingest and tr["msgs_per_s"] else None
            steady = sustained(tr)
            cost = 1e6 / steady - 1e6 / ingest if steady and ingest else None
            backlog = f"{tr['backlog_at_end']}" + (f" ({tr['received_left']} left)" if tr["received_left"] else "")
            lines.append(f"| {msg} | {conns} | {fmt(ingest, '.0f')} | {fmt(tr['msgs_per_s'], '.0f')} "
                         f"| {fmt(ratio, '.2f')} | {fmt(tr['p99_ms'], '.2f')} | {backlog} "
                         f"| {fmt(tr['drain_s'], '.1f')} | {fmt(steady, '.0f')} "
                         f"| {fmt(steady / ingest if steady and ingest else None, '.2f')} "
                         f"| {fmt(cost, '.0f')} | {fmt(alone.get(msg), '.0f')} | {tr['failed']} |")
            if cost is not None and alone.get(msg):
                verdict = "PASS" if cost <= alone[msg] else "FAIL"
                verdicts.append(f"verdict {store}/{msg} with translation, {conns} conns: {verdict} "
                                f"(costs the gateway {cost:.0f} µs/msg over ingest only; translation "
                                f"alone {alone[msg]:.0f} µs/msg, {cost / alone[msg]:.2f}x)")
    if len(lines) == 4:
        return []
    return lines + ([""] + verdicts if verdicts else [])


def verdict_lines(store, msgs, verdicts):
    """One verdict per (store, msg) over the rows where the target applies."""
    out = []
    for msg in msgs:
        rows = {c: v for (m, c), v in verdicts.items() if m == msg and v != "n/a"}
        overall = "n/a (no gateway/durable pair at 8 or 64 connections)" if not rows else \
            ("PASS" if all(v == "PASS" for v in rows.values()) else "FAIL")
        detail = ", ".join(f"{c} conns {v}" for c, v in sorted(rows.items()))
        out.append(f"verdict {store}/{msg}: {overall}" + (f" ({detail})" if detail else ""))
    return out


def print_report(results, args, alone=None):
    """Markdown tables and verdict lines for every store measured (`alone`: translation alone,
    µs per message, for the translation tables)."""
    print(f"\ntarget: at {' and '.join(map(str, TARGET_CONNS))} connections the gateway reaches at least "
          f"{TARGET_RATIO}x the durable reference, p99 ACK latency < {TARGET_P99_MS:g} ms at {P99_CONNS} "
          f"connections\n")
    if args.rounds > 1:
        print(f"durable and gateway: the median of {args.rounds} alternate runs each "
              f"(every run's msgs/s in the JSON, rounds_msgs_per_s)\n")
    all_verdicts = {}
    for store in args.stores:
        lines, verdicts = store_table(results, store, args.msgs, args.conns)
        lines += [""] + verdict_lines(store, args.msgs, verdicts)
        translated = translation_table(results, store, args.msgs, args.conns, alone)
        if translated:
            lines += [""] + translated
        print("\n".join(lines) + "\n")
        all_verdicts[store] = {f"{m}/{c}": v for (m, c), v in verdicts.items()}
    return all_verdicts


def write_json(path, meta, results, verdicts):
    """Raw results, for comparisons across runs (ratios only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "results": results, "verdicts": verdicts}, indent=2,
                               ensure_ascii=False), encoding="utf-8")
    print(f"raw results: {path}")


# --------------------------------------------------------------------------- main

def check_stores(args):
    """Drop the pg store (with a message) if PostgreSQL is unreachable; create the bench databases."""
    if "pg" not in args.stores:
        return
    err = pg_error()
    if err:
        print(f"skipping store pg: PostgreSQL unreachable ({PG_ADMIN_DSN}): {err}")
        args.stores.remove("pg")
        return
    import psycopg
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as db:
        have = {r[0] for r in db.execute("SELECT datname FROM pg_database")}
        for name in (PG_REF_DB, PG_GW_DB):
            if name not in have:
                db.execute(f'CREATE DATABASE "{name}"')


def main(argv=None):
    """Run every measurement, print the tables, write the JSON; exit 1 on a failed run."""
    args = parse_args(argv)
    if not (SHARED / "loadclient.py").exists():
        sys.exit(f"measuring instruments not found in {SHARED}")
    check_stores(args)
    if not args.stores and args.servers != ["ref"]:
        sys.exit("no store left to measure")
    py = python_exe()
    if "gateway" in args.servers or "translating" in args.servers:
        try:
            ensure_dev_certs(py)
        except BenchError as e:
            sys.exit(f"benchmark aborted: {e}")
    server_prefix, client_prefix = pinning()
    started = datetime.datetime.now()
    meta = {"started": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "server_pinning": server_prefix, "client_pinning": client_prefix,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    out = args.json_out or ROOT / "var" / "bench" / f"ingest-{started:%Y%m%d-%H%M%S}.json"
    results, failure = [], None
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        ctx = {"args": args, "py": py, "tmp": Path(tmp),
               "server_prefix": server_prefix, "client_prefix": client_prefix}
        try:
            for server, store, msg, conns in plan(args):
                results.append(measure(server, store, msg, conns, ctx))
                show(results[-1])
        except BenchError as e:
            failure = str(e)
            print(f"\nbenchmark aborted: {failure}", file=sys.stderr)
        translating = sorted({r["msg"] for r in results if r["server"] == "translating"})
        alone = translation_alone(translating, Path(tmp), py) if translating else {}
    verdicts = print_report(medians(results), args, alone)
    write_json(out, {**meta, "aborted": failure, "translation_alone_us": alone}, results, verdicts)
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())

"""The ingest benchmark's translation run (bench/ingest.py): which runs are planned, how the
backlog left by a load is counted and waited for on a real SQLite store, and the figures of
the translation table (sustained throughput, translation cost per message)."""
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import ingest  # noqa: E402


def test_translating_runs_only_at_their_connection_counts_next_to_ingest_only():
    args = ingest.parse_args(["--stores", "sqlite", "--msgs", "oru"])
    assert args.conns == [8, 64] and args.translation_conns == [8]
    assert ingest.plan(args) == [
        ("ref", None, "oru", 8), ("durable", "sqlite", "oru", 8), ("gateway", "sqlite", "oru", 8),
        ("translating", "sqlite", "oru", 8),
        ("ref", None, "oru", 64), ("durable", "sqlite", "oru", 64), ("gateway", "sqlite", "oru", 64)]
    assert ingest.counts_for(8, args, "translating") == (ingest.TRANSLATION_COUNT, ingest.WARMUP)
    assert ingest.counts_for(8, args, "gateway") == (ingest.COUNT_MANY_CONNS, ingest.WARMUP)
    quick = ingest.parse_args(["--quick", "--servers", "translating", "--translation-conns", "64"])
    assert [run[0] for run in ingest.plan(quick)] == ["translating"] * 4
    assert ingest.counts_for(64, quick, "translating") == (
        ingest.TRANSLATION_COUNT // ingest.QUICK_DIVISOR, ingest.WARMUP // ingest.QUICK_DIVISOR)


def test_rounds_alternate_the_pair_and_the_report_takes_the_median_run():
    """--rounds N measures durable and gateway alternately N times (drift hits both alike);
    the report takes each one's run of median throughput, and flags a bad run in any round."""
    args = ingest.parse_args(["--stores", "sqlite", "--msgs", "oru", "--conns", "8",
                              "--servers", "durable,gateway", "--rounds", "3"])
    assert ingest.plan(args) == [("durable", "sqlite", "oru", 8), ("gateway", "sqlite", "oru", 8)] * 3

    def run(server, msgs_per_s, p99, ok=True):
        return {"server": server, "store": "sqlite", "msg": "oru", "conns": 8,
                "msgs_per_s": msgs_per_s, "p99_ms": p99, "ok": ok}

    results = [run("durable", 5000, 9), run("gateway", 2000, 30), run("durable", 3000, 12),
               run("gateway", 2600, 20), run("durable", 4000, 10), run("gateway", 2300, 25, ok=False)]
    durable, gateway = sorted(ingest.medians(results), key=lambda r: r["server"])
    assert (durable["msgs_per_s"], durable["p99_ms"], durable["ok"]) == (4000, 10, True)
    assert (gateway["msgs_per_s"], gateway["p99_ms"], gateway["ok"]) == (2300, 25, False)
    assert gateway["rounds_msgs_per_s"] == [2000, 2600, 2300]
    assert ingest.medians(results[:2]) == results[:2]  # one round: the runs themselves
    with pytest.raises(SystemExit):
        ingest.parse_args(["--rounds", "0"])


def test_the_gateway_configuration_names_the_mappings_only_when_translating(tmp_path):
    import yaml
    ingest.write_gateway_config(tmp_path / "a.yaml", "sqlite", tmp_path, 2575)
    ingest.write_gateway_config(tmp_path / "b.yaml", "sqlite", tmp_path, 2575, translate=True)
    plain, translating = (yaml.safe_load((tmp_path / name).read_text()) for name in ("a.yaml", "b.yaml"))
    assert "mappings" not in plain
    assert translating["mappings"] == {"directory": str(ingest.ROOT / "mappings")}
    assert {k: v for k, v in translating.items() if k != "mappings"} == plain


def _store(tmp_path, statuses):
    db = sqlite3.connect(tmp_path / "gw.sqlite")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, status TEXT NOT NULL)")
    db.executemany("INSERT INTO messages (status) VALUES (?)", [(s,) for s in statuses])
    db.commit()
    return db


@pytest.fixture
def server():
    """A real process standing in for the gateway (drain stops waiting if it dies)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc
    proc.kill()
    proc.wait()


def test_drain_counts_the_backlog_and_waits_until_it_is_translated(tmp_path, server):
    db = _store(tmp_path, ["translated"] * 3 + ["received"] * 5 + ["rejected"])
    db.close()

    def translate_later():
        writer = sqlite3.connect(tmp_path / "gw.sqlite")
        threading.Event().wait(0.3)
        writer.execute("UPDATE messages SET status = 'translated' WHERE status = 'received' AND id < 8")
        writer.execute("UPDATE messages SET status = 'failed' WHERE status = 'received'")
        writer.commit()
        writer.close()
    worker = threading.Thread(target=translate_later)
    worker.start()
    found = ingest.drain("sqlite", tmp_path, server)
    worker.join()
    assert found["backlog_at_end"] == 5 and found["received_left"] == 0
    assert 0.25 <= found["drain_s"] < 5
    assert (found["translated"], found["failed"]) == (7, 1)


def test_a_backlog_that_does_not_drain_is_reported_as_left(tmp_path, server, monkeypatch):
    _store(tmp_path, ["received"] * 2).close()
    monkeypatch.setattr(ingest, "DRAIN_TIMEOUT", 0.3)
    found = ingest.drain("sqlite", tmp_path, server)
    assert found["backlog_at_end"] == 2 and found["received_left"] == 2 and found["drain_s"] is None


def _result(server, msgs_per_s, **extra):
    return {"server": server, "store": "sqlite", "msg": "oru", "conns": 8, "msgs_per_s": msgs_per_s,
            "p99_ms": 3.0, "acked": 3000, **extra}


def test_translation_table_compares_with_ingest_only_of_the_same_run():
    results = [_result("gateway", 6000.0),
               _result("translating", 1500.0, backlog_at_end=1200, drain_s=1.0, received_left=0,
                       translated=2990, failed=10)]
    # 3000 messages in 2 s of load, then 1 s to drain: 1000/s sustained; 1000 - 167 µs a message.
    assert ingest.sustained(results[1]) == pytest.approx(1000.0)
    table = ingest.translation_table(results, "sqlite", ["oru", "adt"], [8, 64])
    assert table[-1] == "| oru | 8 | 6000 | 1500 | 0.25 | 3.00 | 1200 | 1.0 | 1000 | 0.17 | 833 | – | 10 |"
    assert len(table) == 5  # no row where nothing was translated, no verdict without translation alone
    assert ingest.translation_table(results[:1], "sqlite", ["oru"], [8]) == []
    stuck = [_result("translating", 1500.0, backlog_at_end=1200, drain_s=None, received_left=40,
                     translated=3460, failed=0)]
    assert ingest.sustained(stuck[0]) is None
    assert "| 1200 (40 left) | – | – |" in ingest.translation_table(stuck, "sqlite", ["oru"], [8])[-1]
    # With translation alone measured in the same run: its column, and the requirement's verdict
    # (translation may cost the gateway no more than translation alone).
    table = ingest.translation_table(results, "sqlite", ["oru"], [8], {"oru": 400.0})
    assert table[4].endswith("| 833 | 400 | 10 |")
    assert table[-1] == ("verdict sqlite/oru with translation, 8 conns: FAIL (costs the gateway 833 µs/msg "
                         "over ingest only; translation alone 400 µs/msg, 2.08x)")
    assert ingest.translation_table(results, "sqlite", ["oru"], [8], {"oru": 900.0})[-1].startswith(
        "verdict sqlite/oru with translation, 8 conns: PASS")


def test_the_floor_benchmark_stores_what_the_gateway_stores(tmp_path):
    """bench/ingest_floor.py: the real writer stores each message with its payload and receipt,
    and the prebuilt rows copy them (one of each per message, keys all distinct), so that the
    floor it reports is that of the gateway's schema as it is."""
    import argparse

    import ingest_floor

    results = ingest_floor.measure(argparse.Namespace(msg="adt", messages=24, batch=[8]), tmp_path)
    assert [(step, what) for step, what, *_ in results] == [
        ("inspect", "reference"), ("inspect", "sha256"), ("inspect", "gateway"),
        ("commit, rounds of 8", "reference"), ("commit, rounds of 8", "rows"),
        ("commit, rounds of 8", "writer")]
    assert all(user >= 0 and system >= 0 for *_, user, system in results)
    for name, receipts in (("gw-8.sqlite", "message.received"), ("rows-8.sqlite", "message.received")):
        db = sqlite3.connect(tmp_path / name)
        assert db.execute("SELECT count(DISTINCT control_id), count(*) FROM messages").fetchone() == (24, 24)
        assert db.execute("SELECT count(*) FROM message_payloads").fetchone() == (24,)
        assert db.execute("SELECT count(*) FROM audit_log WHERE action = ?", (receipts,)).fetchone() == (24,)
        db.close()

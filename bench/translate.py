"""Translation benchmark: HL7 v2 into the canonical FHIR bundle, on one core, against python-hl7's
parser measured in the same run.

For each message of ../shared/bench/hl7msgs.py (ORU^R01 with 20 OBX, 3.3 KB; ADT^A01, 1.2 KB),
each copy with its own MSH-10, it measures in one process pinned to one CPU:

  gateway     read_input (header, character set, tokenizer) + MappingSet.translate (the
              mapping engine down to the Bundle dict): what the gateway does per message
  read_input  the decode + tokenize part alone
  python-hl7  hl7.parse of the same bytes decoded as UTF-8 (python-hl7 builds its whole tree
              eagerly): the reference
  hl7apy      hl7apy.parser.parse_message on a few messages, for context (it is ~100x slower)

Each figure is the best of ROUNDS rounds of at least MIN_SECONDS of CPU time (time.process_time,
so that other processes on a shared machine slow the wall clock, not the figure), in messages/s
and microseconds per message; the rounds of the gateway and of python-hl7 alternate, so that a
busy spell weighs on both. Targets: ORU >= 2,000/s and ADT >= 5,000/s for `gateway`. As with
the ingest benchmark, absolute figures only compare within one run: the ratio gateway /
python-hl7 is the one to follow across machines (the targets were set when python-hl7 did
about 460 ORU/s and 1,240 ADT/s here: ratios of about 4.3 and 4.0; each verdict is followed by
the figure scaled to that machine, times 460 or 1,240 over python-hl7's rate). A cProfile of the ORU
translation (top functions by own time) is printed after the table and kept in the JSON.

    .venv/bin/python bench/translate.py                 # ~30 s; var/bench/translate-<time>.json
    .venv/bin/python bench/translate.py --quick --no-profile
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "bench"

MSGS = ("oru", "adt")
TARGETS = {"oru": 2000.0, "adt": 5000.0}  # gateway translations per second, one core
# python-hl7's rates on the machine the targets were set on: a run's figures scaled by them
# read as if measured there (this machine's speed varies twofold from day to day).
TARGET_MACHINE_PYTHON_HL7 = {"oru": 460.0, "adt": 1240.0}
DISTINCT = 500  # distinct control ids cycled through
ROUNDS = 3
MIN_SECONDS = 1.0
HL7APY_COUNT = 20
PROFILE_COUNT = 2000
RECEIVED_AT = dt.datetime(2026, 1, 15, 9, 30, tzinfo=dt.timezone.utc)
TIMEZONE = ZoneInfo("Africa/Casablanca")


def pin() -> list[int]:
    """Pin this process to one CPU (the first allowed); returns the affinity now in force."""
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
        return sorted(os.sched_getaffinity(0))
    return []


def messages(kind: str, count: int) -> list[bytes]:
    sys.path.insert(0, str(SHARED))
    import hl7msgs
    template = hl7msgs.oru_r01() if kind == "oru" else hl7msgs.adt_a01()
    return [template.replace("{cid}", f"T{kind.upper()}{n:09d}").encode("utf-8") for n in range(count)]


def one_round(function, payloads: list[bytes], min_seconds: float) -> tuple[float, int]:
    """Messages per CPU second over at least `min_seconds` of CPU time; (rate, messages run)."""
    gc.collect()
    done, started = 0, time.process_time()
    while True:
        for payload in payloads:
            function(payload)
        done += len(payloads)
        elapsed = time.process_time() - started
        if elapsed >= min_seconds:
            return done / elapsed, done


def rate(function, payloads: list[bytes], rounds: int, min_seconds: float) -> tuple[float, int]:
    """Best messages/s over `rounds` rounds of at least `min_seconds` each; (rate, messages run)."""
    best, total = 0.0, 0
    for _ in range(rounds):
        found, done = one_round(function, payloads, min_seconds)
        best, total = max(best, found), total + done
    return best, total


def rates(functions: dict, payloads: list[bytes], rounds: int, min_seconds: float) -> dict[str, tuple[float, int]]:
    """`rate` for several functions, their rounds interleaved (a, b, a, b...)."""
    results = {name: (0.0, 0) for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            found, done = one_round(function, payloads, min_seconds)
            best, total = results[name]
            results[name] = (max(best, found), total + done)
    return results


def gateway_functions(mapping_set):
    from gateway.mapping.runtime import TranslationContext
    from gateway.translation.inputs import read_input

    def translate(payload: bytes):
        parsed = read_input(payload)
        context = TranslationContext(sender_id="", timezone=TIMEZONE, received_at=RECEIVED_AT,
                                     message_key=f"{parsed.sending_facility}|{parsed.control_id}",
                                     control_id=parsed.control_id)
        return mapping_set.translate(parsed.message, context, parsed.message_type)
    return translate, read_input


def python_hl7_parse(payload: bytes):
    import hl7
    return hl7.parse(payload.decode("utf-8"))


def hl7apy_parse(payload: bytes):
    from hl7apy.parser import parse_message
    return parse_message(payload.decode("utf-8").replace("\n", "\r"))


def check_output(translate, payload: bytes) -> dict:
    """What one translation gives: resource counts, FHIR problems (or why there is none)."""
    from gateway.mapping.runtime import TranslationError
    from gateway.mapping.validation import bundle_problems
    from gateway.translation.inputs import InputError
    try:
        bundle = translate(payload).bundle
    except (InputError, TranslationError) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    kinds: dict[str, int] = {}
    for entry in bundle.get("entry", ()):
        kind = entry.get("resource", {}).get("resourceType", "?")
        kinds[kind] = kinds.get(kind, 0) + 1
    problems = bundle_problems(bundle)
    return {"resources": kinds, "fhir_problems": len(problems), "first_problem": problems[0] if problems else ""}


def profile(translate, payloads: list[bytes], count: int, top: int) -> tuple[str, list[dict]]:
    profiler = cProfile.Profile()
    chosen = (payloads * (count // len(payloads) + 1))[:count]
    profiler.enable()
    for payload in chosen:
        translate(payload)
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    rows = []
    for (file, line, name), (calls, _, own, cumulative, _) in sorted(
            stats.stats.items(), key=lambda item: -item[1][2])[:top]:
        rows.append({"function": f"{file}:{line}({name})", "calls": calls,
                     "own_s": round(own, 4), "cumulative_s": round(cumulative, 4),
                     "own_share": round(own / stats.total_tt, 3) if stats.total_tt else 0})
    return stream.getvalue(), rows


def fmt(value, spec: str = ",.0f") -> str:
    return "–" if value is None else format(value, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--msgs", default=",".join(MSGS), help="default: oru,adt")
    ap.add_argument("--quick", action="store_true", help="one round of 0.3 s")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--top", type=int, default=20, help="profile lines shown")
    ap.add_argument("--mappings", type=Path, default=ROOT / "mappings")
    ap.add_argument("--json-out", type=Path, default=None,
                    help="default var/bench/translate-<timestamp>.json")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.msgs.split(",") if k.strip() in MSGS]
    rounds, min_seconds = (1, 0.3) if args.quick else (ROUNDS, MIN_SECONDS)

    from gateway.mapping.mapping_set import MappingSet
    from gateway.mapping.runtime import TranslationError

    cpus = pin()
    started = dt.datetime.now()
    mapping_set = MappingSet.load(args.mappings)
    translate, read_input = gateway_functions(mapping_set)
    print(f"pinned to CPU {cpus}; mapping set {mapping_set.version}; "
          f"best of {rounds} round(s) of >= {min_seconds:g} s\n", flush=True)
    results = {}
    for kind in kinds:
        payloads = messages(kind, DISTINCT)
        output = check_output(translate, payloads[0])
        record = {"bytes": len(payloads[0]), "output": output}
        record["read_input"], _ = rate(read_input, payloads, rounds, min_seconds)
        try:
            translate(payloads[0])
            measured = rates({"gateway": translate, "python_hl7": python_hl7_parse}, payloads, rounds, min_seconds)
            record["gateway"], record["gateway_messages"] = measured["gateway"]
            record["python_hl7"], _ = measured["python_hl7"]
        except TranslationError as error:
            record["gateway"], record["gateway_error"] = None, str(error)
            record["python_hl7"], _ = rate(python_hl7_parse, payloads, rounds, min_seconds)
        few = payloads[:HL7APY_COUNT]
        t0 = time.perf_counter()
        for payload in few:
            hl7apy_parse(payload)
        record["hl7apy"] = len(few) / (time.perf_counter() - t0)
        gw = record["gateway"]
        record["ratio_python_hl7"] = gw / record["python_hl7"] if gw else None
        record["gateway_us"] = 1e6 / gw if gw else None
        record["python_hl7_us"] = 1e6 / record["python_hl7"]
        record["target"] = TARGETS[kind]
        record["verdict"] = "n/a (no translation)" if gw is None else ("PASS" if gw >= TARGETS[kind] else "FAIL")
        record["scaled"] = gw * TARGET_MACHINE_PYTHON_HL7[kind] / record["python_hl7"] if gw else None
        results[kind] = record
        print(f"{kind}: gateway {fmt(gw)} msgs/s, read_input {fmt(record['read_input'])}, "
              f"python-hl7 {fmt(record['python_hl7'])}, hl7apy {fmt(record['hl7apy'], ',.1f')}  "
              f"output {output}", flush=True)

    print("\n| msg | bytes | gateway translate msgs/s | gateway µs/msg | read_input only msgs/s "
          "| python-hl7 parse msgs/s | python-hl7 µs/msg | gateway / python-hl7 | hl7apy parse msgs/s "
          "| target | verdict |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for kind, r in results.items():
        print(f"| {kind} | {r['bytes']:,} | {fmt(r['gateway'])} | {fmt(r['gateway_us'], ',.0f')} "
              f"| {fmt(r['read_input'])} | {fmt(r['python_hl7'])} | {fmt(r['python_hl7_us'], ',.0f')} "
              f"| {fmt(r['ratio_python_hl7'], '.2f')}{'x' if r['ratio_python_hl7'] else ''} | {fmt(r['hl7apy'], ',.1f')} "
              f"| >= {r['target']:,.0f} | {r['verdict']} |")
    for kind, r in results.items():
        if r.get("gateway_error"):
            print(f"note {kind}: not translated: {r['gateway_error']}")
        elif r["output"].get("fhir_problems"):
            print(f"note {kind}: the bundle has {r['output']['fhir_problems']} FHIR problems: "
                  f"{r['output']['first_problem']}")
    print()
    for kind, r in results.items():
        print(f"verdict {kind}: {r['verdict']} ({fmt(r['gateway'])} msgs/s, {fmt(r['gateway_us'], ',.0f')} µs/msg, "
              f"target >= {r['target']:,.0f}; python-hl7 {fmt(r['python_hl7'])} msgs/s in this run, "
              f"ratio {fmt(r['ratio_python_hl7'], '.2f')})")
        if r["scaled"]:
            print(f"  scaled to the targets' machine (python-hl7 {TARGET_MACHINE_PYTHON_HL7[kind]:,.0f} {kind}/s): "
                  f"{fmt(r['scaled'])} msgs/s, {'PASS' if r['scaled'] >= r['target'] else 'FAIL'}")

    profile_rows: list[dict] = []
    profiled = next((k for k in ("oru", "adt") if k in results and results[k]["gateway"]), None)
    if not args.no_profile and profiled:
        text, profile_rows = profile(translate, messages(profiled, DISTINCT), PROFILE_COUNT, args.top)
        label = {"oru": "ORU^R01", "adt": "ADT^A01 (ORU^R01 is not translated)"}[profiled]
        print(f"\ncProfile of {PROFILE_COUNT} {label} translations (read_input + translate), by own time:")
        print(text.strip().split("\n", 3)[-1] if text else "")

    out = args.json_out or ROOT / "var" / "bench" / f"translate-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(), "pinned": cpus,
        "python": sys.version.split()[0], "mapping_version": mapping_set.version,
        "rounds": rounds, "min_seconds": min_seconds, "results": results, "profiled": profiled, "profile": profile_rows,
    }, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

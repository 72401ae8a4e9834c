"""The shared-record peer's CPU per message, in process: the transactions the gateway sends
for the end-to-end benchmark (bench/deliver.py), applied through `RecordApi.transaction` on a
fresh `RecordStore` with validation off, as the benchmark runs the peer.

The benchmark's ORU^R01 (../shared/bench/hl7msgs.py, 20 OBX) for `--patients` patients in
turn, each a lab order of its own (bench/patient_load.py), is translated with the repository's
mappings and stored as the outbox stores it (fhir_json text); the requests are built by
`transaction_request_for_texts`, `--batch` messages each (23 entries a message: Patient,
DiagnosticReport, 20 Observations, Provenance). Three phases, each measured in process CPU
time (time.process_time: other work on a shared machine slows the wall clock, not this):

  first      the requests on a fresh store (creates; a patient's later messages update it)
  replay     the same requests under the same Idempotency-Keys: the stored answers
  redeliver  the same requests under new keys: conditional updates that change nothing

Each figure is the best of `--rounds` rounds (a fresh store in a temporary directory each),
with the garbage collector as `gateway sandbox` sets it (frozen after loading, paced).
`--profile` prints a cProfile of one round (first + redeliver) by own time.

    .venv/bin/python bench/record_apply.py [--messages 1160] [--patients 200] [--rounds 5] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHARED = ROOT.parent / "shared" / "bench"

import patient_load  # noqa: E402  (the many-patients message generator)

RECEIVED_AT = dt.datetime(2026, 1, 15, 9, 30, tzinfo=dt.timezone.utc)
TIMEZONE = ZoneInfo("Africa/Casablanca")
BASE_URL = "https://127.0.0.1:9444/fhir"


def bundle_texts(count: int, patients: int) -> list[bytes]:
    """The stored canonical bundles (outbox text) of `count` benchmark messages."""
    from gateway import fhir_json
    from gateway.mapping.mapping_set import MappingSet
    from gateway.mapping.runtime import TranslationContext
    from gateway.translation.inputs import read_input

    sys.path.insert(0, str(SHARED))
    import hl7msgs
    template = hl7msgs.oru_r01()
    mapping_set = MappingSet.load(ROOT / "mappings")
    texts = []
    for number in range(count):
        frame, _ = patient_load.patient_message(template, number, patients, "R")
        parsed = read_input(frame[1:-2])
        context = TranslationContext(sender_id="", timezone=TIMEZONE, received_at=RECEIVED_AT,
                                     message_key=f"{parsed.sending_facility}|{parsed.control_id}",
                                     control_id=parsed.control_id)
        bundle = mapping_set.translate(parsed.message, context, parsed.message_type).bundle
        texts.append(fhir_json.dumps(bundle))
    return texts


def requests(texts: list[bytes], batch: int, tag: str) -> list[tuple[bytes, str]]:
    from gateway.delivery.fhir_record import transaction_request_for_texts
    built = []
    for start in range(0, len(texts), batch):
        key = f"{tag}-{start // batch}"
        request = transaction_request_for_texts(texts[start:start + batch], base_url=BASE_URL,
                                                idempotency_key=key)
        built.append((request.body, key))
    return built


def one_round(first: list, redeliver: list, profiler: cProfile.Profile | None = None) -> dict[str, float]:
    """CPU seconds of each phase on a fresh store; checks every answer."""
    from gateway.sandbox.record.api import RecordApi
    from gateway.sandbox.record.store import RecordStore

    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = RecordStore(f"{tmp}/record.sqlite")
        api = RecordApi(store, validate=False)
        for phase, batch in (("first", first), ("replay", first), ("redeliver", redeliver)):
            gc.collect()
            if profiler is not None and phase != "replay":
                profiler.enable()
            started = time.process_time()
            answers = [api.transaction(body, key) for body, key in batch]
            seconds[phase] = time.process_time() - started
            if profiler is not None:
                profiler.disable()
            bad = [answer.status for answer in answers if answer.status != 200]
            if bad:
                raise SystemExit(f"{phase}: {len(bad)} requests refused ({bad[0]})")
            if (phase == "replay") != all(answer.replayed for answer in answers):
                raise SystemExit(f"{phase}: replayed answers where none were expected, or the reverse")
        store.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1160)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--batch", type=int, default=58)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()

    texts = bundle_texts(args.messages, args.patients)
    first = requests(texts, args.batch, "first")
    redeliver = requests(texts, args.batch, "again")
    entries = sum(body.count(b'"request":{"method"') for body, _ in first)
    from gateway.runner import pace_collector
    gc.collect()
    gc.freeze()  # as the peer does once loaded (peer.py)
    pace_collector()  # and the collector's pace of `gateway sandbox` (runner.py)

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for phase, seconds in one_round(first, redeliver).items():
            best[phase] = min(best.get(phase, seconds), seconds)
    per_message = {phase: round(seconds / args.messages * 1e6, 1) for phase, seconds in best.items()}
    print(json.dumps({"messages": args.messages, "patients": args.patients, "batch": args.batch,
                      "entries_per_message": entries / args.messages, "rounds": args.rounds,
                      "us_per_message": per_message,
                      "first_plus_redeliver_us": round(per_message["first"] + per_message["redeliver"], 1)}))

    if args.profile:
        profiler = cProfile.Profile()
        one_round(first, redeliver, profiler)
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()

"""MLLP load with many patients: the shared load client's ORU^R01 (../shared/bench/hl7msgs.py),
each message for one of `--patients` patients in turn (its own PID-3 and visit number) and a
lab order of its own (ORC/OBR placer and filler numbers), under a unique MSH-10.

The shared load client (loadclient.py) sends one patient's results over and over; this one
exists for what that cannot show: deliveries of many patients, whose order constraints do not
chain them all together. It behaves the same way otherwise: N persistent connections, one
message in flight per connection, every ACK checked (MSA-1 AA or CA, MSA-2 = the MSH-10
sent), loopback only. Prints one JSON line with the same keys as loadclient.py (msgs/s,
latency p50/p99/max in ms, the client's CPU use) and the control ids' prefix.

    .venv/bin/python bench/patient_load.py --port 2575 --conns 8 --count 3000 --patients 200
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "bench"
START, END = b"\x0b", b"\x1c\r"
PATIENT_ID = "4500987654"  # PID-3 of the template, also the start of its PV1-19 visit number
ORDERS = ("LAB-25014-0042", "CMD-778812")  # filler and placer order numbers of the template


def patient_message(template: str, number: int, patients: int, tag: str) -> tuple[bytes, bytes]:
    """(MLLP frame, control id) of message `number`: patient `number % patients`, its own order."""
    control_id = f"{tag}{number:011d}"
    text = (template.replace("{cid}", control_id)
            .replace(PATIENT_ID, f"77{number % patients:08d}")
            .replace(ORDERS[0], f"LAB-{tag}{number:09d}")
            .replace(ORDERS[1], f"CMD-{tag}{number:09d}"))
    return START + text.encode("utf-8") + END, control_id.encode("ascii")


class Load:
    def __init__(self, frames: list[tuple[bytes, bytes]], conns: int):
        self.frames = frames
        self.conns = conns
        self.next = 0
        self.latencies: list[int] = []
        self.bad = 0
        self.closed_early = 0
        self.done = asyncio.get_running_loop().create_future()
        self.closed = 0

    def take(self):
        if self.next >= len(self.frames):
            return None
        frame = self.frames[self.next]
        self.next += 1
        return frame

    def connection_closed(self):
        self.closed += 1
        if self.closed == self.conns and not self.done.done():
            self.done.set_result(None)


class Connection(asyncio.Protocol):
    def __init__(self, load: Load):
        self.load = load
        self.buffer = b""
        self.control_id = b""
        self.started = 0
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.send_next()

    def send_next(self):
        item = self.load.take()
        if item is None:
            self.transport.close()
            return
        frame, self.control_id = item
        self.started = time.perf_counter_ns()
        self.transport.write(frame)

    def data_received(self, data):
        self.buffer += data
        end = self.buffer.find(END)
        if end < 0:
            return
        ack, self.buffer = self.buffer[:end], self.buffer[end + 2:]
        self.load.latencies.append(time.perf_counter_ns() - self.started)
        if b"MSA|AA|" + self.control_id not in ack and b"MSA|CA|" + self.control_id not in ack:
            self.load.bad += 1
        self.control_id = b""
        self.send_next()

    def connection_lost(self, exc):
        if self.control_id:
            self.load.closed_early += 1
        self.load.connection_closed()


async def run(port: int, conns: int, frames) -> tuple[Load, float, float]:
    loop = asyncio.get_running_loop()
    load = Load(frames, conns)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(conns):
        await loop.create_connection(lambda: Connection(load), "127.0.0.1", port)
    await load.done
    return load, time.perf_counter() - wall, time.process_time() - cpu


def percentile(values: list[int], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))] / 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--conns", type=int, default=8)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--tag", default="P", help="control id prefix (one letter)")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        sys.exit("refusing: --host must be a loopback address")
    if min(args.conns, args.count, args.patients) < 1:
        sys.exit("--conns, --count and --patients must be at least 1")
    sys.path.insert(0, str(SHARED))
    import hl7msgs

    template = hl7msgs.TEMPLATES["oru"]
    frames = [patient_message(template, n, args.patients, args.tag) for n in range(args.count)]
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    load, wall, cpu = asyncio.run(run(args.port, args.conns, frames))
    acked = len(load.latencies)
    print(json.dumps({
        "msg": "oru", "conns": args.conns, "patients": args.patients, "requested": args.count,
        "acked": acked, "bad_acks": load.bad, "closed_early": load.closed_early,
        "wall_s": round(wall, 4), "msgs_per_s": round(acked / wall, 1) if wall else None,
        "p50_ms": percentile(load.latencies, 50), "p99_ms": percentile(load.latencies, 99),
        "max_ms": max(load.latencies) / 1e6 if load.latencies else None,
        "client_cpu": round(cpu / wall, 3) if wall else None, "tag": args.tag,
        "pid": os.getpid(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())

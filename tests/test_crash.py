"""The crash test: a gateway process under load is killed with SIGKILL; after a restart, every
message that got a positive ACK is in the store exactly once, and re-sending it replays the
stored ACK. Run on SQLite and on PostgreSQL."""
from __future__ import annotations

import signal
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import hl7msgs
import pytest
from sqlalchemy import func, select

from adapters.mllp.client import MllpClient, describe
from gateway.store.database import create_gateway_engine
from gateway.store.schema import message_payloads, messages
from process_support import free_port, start_gateway

THREADS = 6
LOAD_SECONDS = 1.0


def write_config(root, dev_pki: str, db_url: str, port: int) -> str:
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "facilities.yaml").write_text("facilities: []\n", encoding="utf-8")
    path = conf / "gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        node: {{name: crash-test}}
        log_level: warn
        database:
          url: {db_url}
        pki:
          ca: {dev_pki}/ca.crt
          cert: {dev_pki}/gateway.crt
          key: {dev_pki}/gateway.key
        listeners:
          mllp:
            - name: mllp-plain
              port: {port}
              interface: 127.0.0.1
              accept_unknown_senders: true
        facilities: conf/facilities.yaml
        """), encoding="utf-8")
    return str(path)


def message(kind: str, control_id: str) -> bytes:
    return hl7msgs.TEMPLATES[kind].replace(hl7msgs.CID, control_id).encode("utf-8")


@dataclass
class Sender:
    """One connection's view: what was acknowledged positively, and what was left unanswered."""

    number: int
    acked: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # id: (message, ACK)
    unanswered: dict[str, bytes] = field(default_factory=dict)  # sent, no (positive) answer seen
    negative: list[str] = field(default_factory=list)
    error: str | None = None

    def run(self, port: int, stop: threading.Event) -> None:
        try:
            client = MllpClient("127.0.0.1", port, timeout=10)
        except OSError as error:
            self.error = repr(error)
            return
        with client:
            i = 0
            while not stop.is_set():
                i += 1
                control_id = f"K{self.number}{i:010d}"
                raw = message("oru" if i % 2 else "adt", control_id)
                try:
                    reply = client.send(raw)
                except Exception as error:  # the gateway was killed: reset, closed, timed out
                    self.unanswered[control_id] = raw
                    self.error = repr(error)
                    return
                code = describe(reply.response)["msa1"]
                if code in ("CA", "AA"):
                    self.acked[control_id] = (raw, reply.response)
                else:
                    self.unanswered[control_id] = raw
                    if reply.response is None:
                        self.error = "connection closed"
                        return
                    self.negative.append(control_id)


@pytest.mark.slow
def test_positive_acks_survive_sigkill(db_url, dev_pki, tmp_path):
    """Every positively acknowledged message is stored exactly once after a SIGKILL and a restart, and replays its ACK."""
    started = time.monotonic()
    port = free_port()
    config = write_config(tmp_path, dev_pki, db_url, port)
    gateway = start_gateway(config, tmp_path, port, "gateway-1.log")
    stop = threading.Event()
    senders = [Sender(n) for n in range(THREADS)]
    threads = [threading.Thread(target=s.run, args=(port, stop)) for s in senders]
    # mid-run: frames in flight, commits in progress
    _signal_under_load(gateway, threads, signal.SIGKILL, -signal.SIGKILL, stop)

    acked = {cid: pair for s in senders for cid, pair in s.acked.items()}
    unanswered = {cid: raw for s in senders for cid, raw in s.unanswered.items()}
    assert len(acked) >= 50, f"too little load before the kill: {len(acked)} positive ACKs"
    assert not any(s.negative for s in senders), "negative answers before the kill"
    assert all(s.error for s in senders), "a connection outlived the gateway"

    restarted = start_gateway(config, tmp_path, port, "gateway-2.log")
    engine = create_gateway_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(messages.c.control_id, messages.c.status, message_payloads.c.raw,
                                       messages.c.ack)
                                .join(message_payloads, message_payloads.c.message_id == messages.c.id)).all()
        per_id = Counter(r.control_id for r in rows)
        stored = {r.control_id: r for r in rows}

        assert [cid for cid, n in per_id.items() if n > 1] == []  # nothing stored twice
        missing = sorted(set(acked) - set(stored))
        assert missing == [], f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
        for cid, (raw, ack) in acked.items():
            row = stored[cid]
            assert row.status == "received" and bytes(row.raw) == raw and bytes(row.ack) == ack
        # Unanswered messages may or may not have been committed, but never twice, never altered.
        assert set(stored) <= set(acked) | set(unanswered)
        for cid in set(unanswered) & set(stored):
            assert stored[cid].status == "received" and bytes(stored[cid].raw) == unanswered[cid]

        # Re-sending an acknowledged message to the restarted gateway replays the stored ACK.
        cid, (raw, ack) = sorted(acked.items())[len(acked) // 2]
        with MllpClient("127.0.0.1", port, timeout=10) as client:
            replay = client.send(raw).response
        assert replay == ack
        with engine.connect() as conn:
            count, duplicates = conn.execute(
                select(func.count(), func.max(messages.c.duplicate_count))
                .where(messages.c.control_id == cid)).one()
            total = conn.execute(select(func.count()).select_from(messages)).scalar_one()
        assert (count, duplicates) == (1, 1)
        assert total == len(rows)
    finally:
        engine.dispose()
        restarted.send_signal(signal.SIGTERM)
        try:
            assert restarted.wait(10) == 0
        finally:
            if restarted.poll() is None:
                restarted.kill()
                restarted.wait(10)
    assert time.monotonic() - started < 20


@pytest.mark.slow
def test_sigterm_under_load_answers_every_message_it_committed(db_url, dev_pki, tmp_path):
    """An orderly stop (SIGTERM) while senders keep sending: every message committed is
    answered with its stored ACK before the connections close; a frame that comes once the
    stop began is answered AE "not stored, send again" (ERR-3 207) and is not stored."""
    port = free_port()
    gateway = start_gateway(write_config(tmp_path, dev_pki, db_url, port), tmp_path, port, "gateway.log")
    answers: dict[str, bytes] = {}

    def send(number: int) -> None:
        with MllpClient("127.0.0.1", port, timeout=10) as client:
            for i in range(1, 100_000):
                control_id = f"T{number}{i:010d}"
                try:
                    reply = client.send(message("adt", control_id))
                except Exception:  # the gateway closed the connection
                    return
                if reply.response is None:
                    return
                answers[control_id] = reply.response

    threads = [threading.Thread(target=send, args=(n,)) for n in range(THREADS)]
    _signal_under_load(gateway, threads, signal.SIGTERM, 0)  # frames in flight on every connection

    engine = create_gateway_engine(db_url)
    try:
        with engine.connect() as conn:
            stored = {r.control_id: bytes(r.ack) for r in conn.execute(select(messages.c.control_id, messages.c.ack))}
    finally:
        engine.dispose()
    codes = Counter(describe(ack)["msa1"] for ack in answers.values())
    assert codes["CA"] >= 50, codes  # the templates ask for enhanced mode
    assert [cid for cid in stored if cid not in answers] == []  # committed, never answered
    for cid, ack in answers.items():
        if cid in stored:
            assert ack == stored[cid]
        else:
            assert describe(ack)["msa1"] == "CE" and b"|207^" in ack


def _signal_under_load(gateway, threads, sig: int, exit_code: int, stop=None) -> None:
    """Start the senders, signal the gateway after LOAD_SECONDS, check how it exited, and
    wait for the senders (`stop` tells them to end); the gateway is killed if still there."""
    try:
        for t in threads:
            t.start()
        time.sleep(LOAD_SECONDS)
        gateway.send_signal(sig)
        assert gateway.wait(20) == exit_code
        if stop is not None:
            stop.set()
        for t in threads:
            t.join(15)
            assert not t.is_alive()
    finally:
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait(10)

"""Several gateway nodes on one PostgreSQL share the outbox. Two gateway processes take
messages on their own MLLP ports and deliver to the reference shared record (in this test's
process, answering slowly so that deliveries are in flight); one node is killed with SIGKILL
mid-run and started again. At the end every message is in the shared record exactly once."""
from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import threads

import hl7msgs
from adapters.mllp.client import MllpClient, describe
from delivery_support import until
from process_support import (free_port, launch_gateway, start_gateway, stop_processes, wait_for_port,
                             write_record_node_config)

PATIENTS = 24  # one ORU each, 12 through each node
pytestmark = pytest.mark.slow


def oru(i: int) -> bytes:
    """The benchmark's ORU^R01 for patient number i (its own PID-3 and control id)."""
    text = hl7msgs.message("oru", i).replace("4500987654", f"77{i:08d}")
    return text.encode("utf-8")


def send_all(port: int, numbers) -> None:
    with MllpClient("127.0.0.1", port, timeout=30) as client:
        for i in numbers:
            assert describe(client.send(oru(i)).response)["msa1"] in ("AA", "CA")


@pytest_twisted.inlineCallbacks
def test_two_nodes_one_killed_every_message_delivered_exactly_once(pg_url, dev_pki, peers, tmp_path):
    yield peers.faults("record", "slow", delay=0.4)
    nodes = {}
    for name in ("node-a", "node-b"):  # started side by side
        port = free_port()
        config = write_record_node_config(tmp_path / name / "conf", name, pg_url, port, dev_pki, peers.url("record"))
        nodes[name] = (config, port, launch_gateway(config, tmp_path / name, "gateway.log"))
    try:
        for name, (_config, port, process) in nodes.items():
            yield threads.deferToThread(wait_for_port, port, process, log=tmp_path / name / "gateway.log")
        yield threads.deferToThread(send_all, nodes["node-a"][1], range(0, PATIENTS, 2))
        yield threads.deferToThread(send_all, nodes["node-b"][1], range(1, PATIENTS, 2))
        # Node A dies while it holds deliveries in flight (the record answers in 0.4 s).
        yield until("SELECT id FROM delivery_attempts WHERE node = 'node-a'", lambda f: len(f) >= 1,
                    pg_url, timeout=30)
        config, port, process = nodes["node-a"]
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        yield peers.faults("record", "none")
        # Restarted, as its supervisor would: it sweeps what it had not translated.
        process = yield threads.deferToThread(start_gateway, config, tmp_path / "node-a", port, "restart.log")
        nodes["node-a"] = (config, port, process)
        found = yield until("SELECT status FROM deliveries",
                            lambda f: len(f) == PATIENTS and all(r.status == "delivered" for r in f),
                            pg_url, timeout=60)
        assert len(found) == PATIENTS
        nodes_used = yield threads.deferToThread(_rows, pg_url,
                                                 "SELECT DISTINCT node FROM delivery_attempts ORDER BY node")
        assert [r.node for r in nodes_used] == ["node-a", "node-b"]
        for i in range(PATIENTS):
            patients = yield peers.search(f"/Patient?identifier=77{i:08d}")
            assert patients["total"] == 1, f"patient {i}: {patients['total']}"
            (patient,) = [e["resource"] for e in patients["entry"]]
            assert patient["meta"]["versionId"] == "1"  # written once, never again
            observations = yield peers.search(f"/Observation?subject=Patient/{patient['id']}")
            assert observations["total"] == len(hl7msgs.LAB), f"patient {i}"
    finally:
        stop_processes(*(process for _config, _port, process in nodes.values()))


def _rows(db_url: str, sql: str):
    from translation_support import rows

    return rows(db_url, sql)

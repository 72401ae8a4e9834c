"""The delivery benchmark's many-patient load (bench/patient_load.py): each message is a
well-formed ORU^R01 of its patient with an order of its own, and the client really sends and
checks ACKs against an MLLP server."""
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import hl7msgs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import patient_load  # noqa: E402


def test_messages_cycle_through_patients_each_with_its_own_order_and_control_id():
    """Message n is about patient n % patients (PID-3 and visit number), with placer and
    filler numbers and MSH-10 of its own; the rest of the template is untouched."""
    template = hl7msgs.TEMPLATES["oru"]
    frames = [patient_load.patient_message(template, n, 3, "P") for n in range(6)]
    texts = [frame[1:-2].decode("utf-8") for frame, _ in frames]
    pids = [next(s for s in t.split("\r") if s.startswith("PID|")).split("|")[3] for t in texts]
    assert pids == ["7700000000^^^CHU_LYON^PI", "7700000001^^^CHU_LYON^PI", "7700000002^^^CHU_LYON^PI"] * 2
    assert len({control for _, control in frames}) == 6
    assert len({next(s for s in t.split("\r") if s.startswith("OBR|")) for t in texts}) == 6
    assert all("4500987654" not in t and "LAB-25014-0042" not in t for t in texts)
    assert all(t.count("\r") == hl7msgs.message("oru").count("\r") for t in texts)
    assert frames[0][0].startswith(b"\x0b") and frames[0][0].endswith(b"\x1c\r")


def test_the_client_sends_every_message_and_checks_each_ack(tmp_path):
    """Against a server that acknowledges every frame with its MSH-10 but one with AE, the
    client reports every message acknowledged and one bad ACK."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    seen = []

    def serve():
        connections = []
        server.settimeout(10)
        for _ in range(2):
            connection, _ = server.accept()
            connections.append(connection)
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    def answer(connection):
        buffer = b""
        with connection:
            while True:
                data = connection.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\x1c\r" in buffer:
                    frame, buffer = buffer.split(b"\x1c\r", 1)
                    control = frame.split(b"\r", 1)[0].split(b"|")[9]
                    seen.append(control)
                    code = b"AE" if control.endswith(b"03") else b"AA"
                    connection.sendall(b"\x0bMSH|^~\\&|||||||ACK|1|P|2.5\rMSA|" + code + b"|" + control + b"\r\x1c\r")

    threading.Thread(target=serve, daemon=True).start()
    try:
        result = subprocess.run([sys.executable, str(Path(patient_load.__file__)), "--port", str(port),
                                 "--conns", "2", "--count", "5", "--patients", "2"],
                                capture_output=True, text=True, timeout=30)
    finally:
        server.close()
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["acked"], report["bad_acks"], report["closed_early"]) == (5, 1, 0)
    assert sorted(seen) == [f"P{n:011d}".encode() for n in range(5)]

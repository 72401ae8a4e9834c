"""Real gateway processes for the e-prescription flow under concurrency: one or two `gateway
run` nodes (one PostgreSQL, or one SQLite for a single node) with their HTTPS door, the
shipped facility types and routes, a second pharmacy, the sandbox peers (shared record, CNSS:
eligibility and care sheets) in the test's process; and blocking HTTPS clients over real
mutual TLS, so that requests can be fired at the same instant from threads."""
from __future__ import annotations

import http.client
import json
import os
import sqlite3
import ssl
import textwrap
import threading

from gateway.pki import init_dev_pki
from gateway.prescriptions import qr
from process_support import free_port, launch_gateway, stop_processes, wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCTOR_ID, PHARMACY_ID, PHARMACY_2_ID, LAB_ID = "INPE-200001", "INPE-100004", "INPE-100005", "INPE-100002"
# The second pharmacy's MSH-3/MSH-4 and INPE, as prescription_support.PHARMACY gives the first's
SECOND_PHARMACY = ("PHARMA_SOUISSI", "PHARM_SOUISSI", "INPE-100005")

FACILITIES = textwrap.dedent("""\
    facilities:
      - {id: "INPE-100002", name: "Laboratoire Al Amal", type: laboratory,
         applications: [LIS_ALAMAL], facilities: [LAB_ALAMAL_RABAT]}
      - {id: "INPE-100004", name: "Pharmacie Agdal", type: pharmacy,
         applications: [PHARMA_AGDAL], facilities: [PHARM_AGDAL]}
      - {id: "INPE-100005", name: "Pharmacie Souissi", type: pharmacy,
         applications: [PHARMA_SOUISSI], facilities: [PHARM_SOUISSI]}
      - {id: "INPE-200001", name: "Cabinet du Dr Benali", type: doctor,
         applications: [CABINET_BENALI], facilities: [CAB_BENALI_KENITRA]}
    """)


def write_node(root, name: str, db_url: str, port: int, pki: str, peers, key: str) -> str:
    """A node's configuration (its own folder); the path of its gateway.yaml."""
    conf = root / name / "conf"
    conf.mkdir(parents=True)
    (conf / "facilities.yaml").write_text(FACILITIES, encoding="utf-8")
    path = conf / "gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        node: {{name: {name}}}
        log_level: info
        database: {{url: "{db_url}"}}
        pki: {{ca: {pki}/ca.crt, cert: {pki}/gateway.crt, key: {pki}/gateway.key,
               prescription_key: {key}}}
        listeners:
          https:
            - {{name: https, port: {port}, interface: 127.0.0.1}}
        facilities: conf/facilities.yaml
        mappings: {{directory: {ROOT}/mappings}}
        destinations:
          - {{name: shared-record, kind: fhir-record, url: "{peers.url('record')}",
              response_timeout: 5, retry: {{base: 0.2, cap: 0.5}}}}
          - {{name: cnss, kind: cnss, url: "{peers.url('cnss')}/", response_timeout: 5,
              retry: {{base: 0.2, cap: 0.5}}}}
        routes: {ROOT}/conf/routes.yaml
        prescriptions: {{validity_days: 90, eligibility: cnss, eligibility_timeout: 5}}
        delivery: {{lease: 15, poll_interval: 0.1}}
        """), encoding="utf-8")
    return str(path)


class Nodes:
    """`count` gateway processes on `db_url`; `port(i)` is node i's HTTPS door."""

    def __init__(self, root, db_url: str, pki: str, peers, count: int):
        init_dev_pki(pki, [DOCTOR_ID, PHARMACY_ID, PHARMACY_2_ID, LAB_ID])
        key = str(root / "prescription-signing.key")
        qr.ensure_signing_key(key)
        self.pki = pki
        self.processes = []
        self.ports = []
        for i in range(count):
            port = free_port()
            config = write_node(root, f"node-{i}", db_url, port, pki, peers, key)
            self.processes.append(launch_gateway(config, root / f"node-{i}", "gateway.log"))
            self.ports.append(port)
        try:
            for i, (process, port) in enumerate(zip(self.processes, self.ports)):
                wait_for_port(port, process, log=root / f"node-{i}" / "gateway.log")
        except BaseException:
            self.stop()  # no fixture will: it never got its nodes
            raise

    def client(self, who: str, node: int = 0) -> "HttpsClient":
        return HttpsClient(self.ports[node], self.pki, who)

    def stop(self) -> None:
        stop_processes(*self.processes)


class HttpsClient:
    """Blocking requests to one node's door with a facility's certificate (a new connection
    each time, so that threads can use one client at once)."""

    def __init__(self, port: int, pki: str, who: str):
        self.port = port
        self.context = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.context.load_cert_chain(os.path.join(pki, f"{who}.crt"), os.path.join(pki, f"{who}.key"))

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        connection = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else None
        finally:
            connection.close()

    def hl7(self, raw: bytes, key: str | None = None):
        headers = {"Content-Type": "application/hl7-v2; charset=utf-8"}
        if key:
            headers["Idempotency-Key"] = key
        return self.request("POST", "/v1/hl7v2", raw, headers)

    def lookup(self, prescription_id: str):
        return self.request("GET", f"/v1/prescriptions/{prescription_id}")


def at_once(*calls):
    """Run the calls in threads released together; their results in order (an exception is
    raised again)."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = ("ok", call())
        except BaseException as error:  # noqa: BLE001 - handed back to the test
            results[i] = ("error", error)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for kind, value in results:
        if kind == "error":
            raise value
    return [value for _, value in results]


def ack_code(answer) -> str:
    """The HL7 answer's MSA-1 and ERR-5 code (or '') of a POST /v1/hl7v2 answer body."""
    ack = answer.get("ack") or ""
    segments = {s.split("|")[0]: s.split("|") for s in ack.replace("\n", "\r").split("\r") if s}
    err = segments.get("ERR")
    return answer.get("ack_code"), (err[5].split("^")[0] if err and len(err) > 5 else "")


def care_sheet_lines(peers_root, prescription_id: str) -> list[tuple]:
    """The sandbox CNSS's billed prescription lines of a prescription."""
    with sqlite3.connect(str(peers_root / "peers" / "cnss.sqlite")) as db:
        names = [r[1] for r in db.execute("PRAGMA table_info(lignes_prescription)")]
        rows = db.execute("SELECT * FROM lignes_prescription").fetchall()
    return [dict(zip(names, row)) for row in rows if prescription_id in row]

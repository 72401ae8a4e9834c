"""The e-prescription flow end to end, in one process with real sockets, real TLS and the
sandbox peers: a doctor's RDE^O11 over MLLP gets an RRE^O12 with the prescription id in ORC-3;
a pharmacy's RDS^O13 is accepted (AA) after an AMO eligibility check at the CNSS peer, then an
over-dispensing one is refused (AE with the reason); a paper dispensation is accepted and
flagged; CNSS holds the care-sheet lines with the prescription id and line, the shared record
one MedicationRequest per line and the MedicationDispenses."""
from __future__ import annotations

import dataclasses
import os
from urllib.parse import quote

import pytest_twisted
from twisted.internet import reactor, threads

from adapters.mllp.client import MllpClient
from gateway.config import (DeliveryConfig, DestinationConfig, MappingsConfig, RetryConfig,
                            load_config)
from gateway.prescriptions import qr
from gateway.service import build_service
from delivery_support import until
from prescription_support import AMOXIL, DOLIPRANE, omp, rde, rds
from process_support import listening_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_RETRY = RetryConfig(base=0.2, factor=2.0, cap=0.5, max_age=600)
DELIVERIES = ("SELECT m.control_id, d.destination, d.status, d.last_reason FROM deliveries d "
              "JOIN messages m ON m.id = d.message_id ORDER BY d.id")


def send(port: int, *messages: bytes) -> list[bytes]:
    with MllpClient("127.0.0.1", port, timeout=20) as client:
        return [client.send(message).response for message in messages]


def fields(ack: bytes, segment: str) -> list[list[str]]:
    return [s.split("|") for s in ack.decode().strip("\r").split("\r") if s.startswith(segment + "|")]


def gateway_config(make_config, db_url, peers, tmp_path):
    """The shipped registry and routes, the sandbox peers as destinations, eligibility at CNSS."""
    shipped = load_config(os.path.join(ROOT, "conf", "gateway.yaml"), environ={})
    base = make_config(db_url)
    key = str(tmp_path / "prescription-signing.key")
    qr.ensure_signing_key(key)
    record = DestinationConfig("shared-record", "fhir-record", peers.url("record"), response_timeout=5,
                               retry=FAST_RETRY)
    cnss = DestinationConfig("cnss", "cnss", peers.url("cnss") + "/", response_timeout=5, retry=FAST_RETRY)
    return dataclasses.replace(
        base, senders=shipped.senders, facility_types=shipped.facility_types,
        mappings=MappingsConfig(os.path.join(ROOT, "mappings")), destinations=(record, cnss),
        routes=shipped.routes, delivery=DeliveryConfig(lease=5, poll_interval=0.1),
        pki=dataclasses.replace(base.pki, prescription_key=key),
        prescriptions=dataclasses.replace(shipped.prescriptions, eligibility="cnss", eligibility_timeout=5))


@pytest_twisted.inlineCallbacks
def start(config):
    """The gateway's service tree (gateway/service.py wires the prescription service in)."""
    root = build_service(config, reactor)
    prescriptions = root.getServiceNamed("prescriptions")
    root.startService()
    port = yield listening_port(root.getServiceNamed("mllp-test"))
    return root, prescriptions, port.getHost().port


@pytest_twisted.inlineCallbacks
def test_prescribe_dispense_over_dispense_and_paper_through_the_peers(make_config, peers, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    root, prescriptions, port = yield start(gateway_config(make_config, db_url, peers, tmp_path))
    try:
        # The doctor prescribes two drugs: RRE^O12, ORC-3 = the id, the QR payload in NTE.
        [answer] = yield threads.deferToThread(send, port, rde("RDE-E2E-1"))
        assert fields(answer, "MSH")[0][8] == "RRE^O12^RRE_O12"
        assert fields(answer, "MSA")[0][1:3] == ["AA", "RDE-E2E-1"]
        prescription_id = fields(answer, "ORC")[0][3].split("^")[0]
        claims = qr.verify(fields(answer, "NTE")[0][3], {prescriptions.key.key_id: prescriptions.key.public})
        assert claims.prescription_id == prescription_id

        # The pharmacy dispenses part, the rest, then tries once more; then a paper prescription.
        answers = yield threads.deferToThread(
            send, port,
            rds("RDS-E2E-1", prescription_id, ((DOLIPRANE, 1),)),
            rds("RDS-E2E-2", prescription_id, ((DOLIPRANE, 1), (AMOXIL, 1))),
            rds("RDS-E2E-3", prescription_id, ((AMOXIL, 1),)),
            rds("RDS-E2E-4", None, paper=True))
        assert [fields(a, "MSA")[0][1] for a in answers] == ["AA", "AA", "AE", "AA"]
        [err] = fields(answers[2], "ERR")
        assert err[5].startswith("PRESCRIPTION_COMPLETED^")
        assert err[7] == f"over-dispensing: prescription {prescription_id} was already fully dispensed"
        # A re-sent copy gets the stored answer, byte for byte, and is not processed again.
        [resent] = yield threads.deferToThread(send, port, rds("RDS-E2E-3", prescription_id, ((AMOXIL, 1),)))
        assert resent == answers[2]
        assert prescriptions.eligibility.requests >= 1  # asked the CNSS peer (then from its cache)

        found = yield until(DELIVERIES, lambda rows: len(rows) == 7 and all(r.status == "delivered" for r in rows),
                            db_url, timeout=30)
        assert sorted((r.control_id, r.destination) for r in found) == sorted(
            [("RDE-E2E-1", "shared-record")] + [(f"RDS-E2E-{n}", d) for n in (1, 2, 4)
                                                for d in ("shared-record", "cnss")])

        cnss = peers.service.peers["cnss"]
        lines = yield cnss.run(cnss.store.prescription_lines, prescription_id)
        assert sorted((l.prescription, l.line) for l in lines) == [(prescription_id, 1), (prescription_id, 1),
                                                                    (prescription_id, 2)]
        assert all(l.key.startswith(f"{prescription_id}.{l.line}.") for l in lines)
        assert len({l.care_sheet for l in lines}) == 2  # one care sheet per dispensation
        paper = yield cnss.run(cnss.store.paper_sheets)
        assert len(paper) == 1

        for line in (1, 2):
            requests = yield peers.search("/MedicationRequest?identifier="
                                          + quote(f"urn:ma:hie:prescription-line|{prescription_id}/{line}"))
            assert requests["total"] == 1
            assert requests["entry"][0]["resource"]["groupIdentifier"]["value"] == prescription_id
        all_requests = yield peers.search("/MedicationRequest?_count=50")
        assert all_requests["total"] == 2  # the dispensations' copies of the order did not add any
        everything = yield peers.search("/MedicationDispense?_count=50")
        assert everything["total"] == 4  # 1 + 2 of the e-prescription, 1 paper
    finally:
        yield root.stopService()


@pytest_twisted.inlineCallbacks
def test_omp_o09_and_a_laboratory_cannot_dispense(make_config, peers, tmp_path):
    """OMP^O09 gets ORP^O10 with the id; a laboratory's RDS^O13 is refused (its type may not
    dispense) with AE, and nothing of it is routed."""
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    root, _, port = yield start(gateway_config(make_config, db_url, peers, tmp_path))
    try:
        [answer] = yield threads.deferToThread(send, port, omp("OMP-E2E-1"))
        assert fields(answer, "MSH")[0][8] == "ORP^O10^ORP_O10" and fields(answer, "MSA")[0][1] == "AA"
        prescription_id = fields(answer, "ORC")[0][3].split("^")[0]
        [refused] = yield threads.deferToThread(
            send, port, rds("RDS-LAB-1", prescription_id, sender=("LIS_ALAMAL", "LAB_ALAMAL_RABAT", "INPE-100002")))
        # Refused at the door (AR: its type may not send RDS^O13) or, where the registry lets it
        # send RDS^O13, by the flow (AE: its type may not dispense).
        code = fields(refused, "ERR")[0][5].split("^")[0]
        assert (fields(refused, "MSA")[0][1], code) in {("AR", "MESSAGE_TYPE_NOT_ALLOWED"),
                                                        ("AE", "OPERATION_NOT_ALLOWED")}
        found = yield until(DELIVERIES, lambda rows: len(rows) == 1 and rows[0].status == "delivered", db_url)
        assert [r.control_id for r in found] == ["OMP-E2E-1"]
    finally:
        yield root.stopService()

"""Acts of an e-prescription end to end, in one process with real sockets, real TLS and the
sandbox peers: a doctor's OML^O21 for two tests over MLLP gets an ORL^O22 with the id; the
laboratory's ORU^R01 for one test (ORC-4 = the id) is accepted after an AMO check at the CNSS
peer, and CNSS receives a care-sheet line with the NABM act code, the prescription and line;
the same ORU again gets its stored answer; a corrected result is accepted and bills nothing;
a test not prescribed is refused with the reason; a pharmacy cannot send results; an ordinary
ORU is answered and delivered as before."""
from __future__ import annotations

from urllib.parse import quote

import pytest_twisted
from twisted.internet import threads

from delivery_support import until
from acts_support import CHOLESTEROL, PHARMACY, oml, oru
from test_prescription_e2e import DELIVERIES, fields, gateway_config, send, start


@pytest_twisted.inlineCallbacks
def test_lab_order_result_correction_and_refusals_through_the_peers(make_config, peers, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    root, prescriptions, port = yield start(gateway_config(make_config, db_url, peers, tmp_path))
    try:
        [ordered] = yield threads.deferToThread(send, port, oml("OML-E2E-1"))
        assert fields(ordered, "MSH")[0][8] == "ORL^O22^ORL_O22" and fields(ordered, "MSA")[0][1] == "AA"
        prescription_id = fields(ordered, "ORC")[0][3].split("^")[0]

        result = oru("ORU-E2E-1", prescription_id)
        answers = yield threads.deferToThread(
            send, port, result,
            oru("ORU-E2E-2", prescription_id, status="C"),            # the same report, corrected
            oru("ORU-E2E-3", prescription_id, tests=(CHOLESTEROL,)),  # not prescribed
            oru("ORU-E2E-4", prescription_id, sender=PHARMACY),       # a pharmacy's type
            oru("ORU-E2E-5", None, accession="ACC-5"),                # an ordinary result
            result)                                                   # the same bytes again
        codes = [(fields(a, "MSA")[0][1], (fields(a, "ERR") or [[""] * 6])[0][5].split("^")[0]) for a in answers]
        assert codes == [("AA", ""), ("AA", ""), ("AE", "NOT_PRESCRIBED"), ("AR", "MESSAGE_TYPE_NOT_ALLOWED"),
                         ("AA", ""), ("AA", "")]
        assert fields(answers[2], "ERR")[0][7] == f"result 1: act 2093-3 is not prescribed on {prescription_id}"
        assert answers[5] == answers[0]  # the stored answer, byte for byte
        assert prescriptions.eligibility.requests >= 1  # asked the CNSS peer

        found = yield until(DELIVERIES, lambda rows: len(rows) == 5 and all(r.status == "delivered" for r in rows),
                            db_url, timeout=30)
        assert sorted((r.control_id, r.destination) for r in found) == [
            ("OML-E2E-1", "shared-record"), ("ORU-E2E-1", "cnss"), ("ORU-E2E-1", "shared-record"),
            ("ORU-E2E-2", "shared-record"), ("ORU-E2E-5", "shared-record")]

        cnss = peers.service.peers["cnss"]
        [billed] = yield cnss.run(cnss.store.prescription_lines, prescription_id)
        assert (billed.prescription, billed.line) == (prescription_id, 1)
        assert billed.key.startswith(f"{prescription_id}.1.")
        sheet = yield cnss.run(cnss.store.request_xml, billed.care_sheet)
        assert b">NABM<" in sheet and b">B0412<" in sheet and f">{prescription_id}<".encode() in sheet
        assert b"montant" not in sheet  # CNSS values a prescribed act at its tariff

        requests = yield peers.search("/ServiceRequest?identifier="
                                      + quote(f"urn:ma:hie:prescription-line|{prescription_id}/1"))
        assert requests["total"] == 1 and requests["entry"][0]["resource"]["status"] == "completed"
        reports = yield peers.search("/DiagnosticReport?_count=50")
        assert reports["total"] == 2  # the prescribed test (corrected in place) and the ordinary one
    finally:
        yield root.stopService()

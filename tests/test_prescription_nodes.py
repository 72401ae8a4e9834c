"""The e-prescription flow under concurrency, through real gateway processes: two HTTPS
clients at the same instant against one node, or against two nodes on one PostgreSQL (as
production runs it). A pharmacist's and a laboratory's view: two pharmacies dispensing the
same line, a dispensation racing a cancellation, the same dispensation sent twice (with and
without an Idempotency-Key), a result racing a cancellation, look-ups racing dispensations.
Whatever the interleaving, what is dispensed never exceeds what was prescribed and CNSS
bills each dispensation once."""
from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import threads

from prescription_nodes_support import DOCTOR_ID, PHARMACY_ID, Nodes, ack_code, at_once
from prescription_support import AMOXIL, DOLIPRANE, rde, rds
from translation_support import rows

pytestmark = pytest.mark.slow


def stop(nodes):
    # Off the reactor thread: the peers answer in it, and a node stopping may be talking to them.
    pytest_twisted.blockon(threads.deferToThread(nodes.stop))


@pytest.fixture
def two_nodes(pg_url, dev_pki, peers, tmp_path):
    nodes = Nodes(tmp_path, pg_url, dev_pki, peers, 2)
    yield nodes, pg_url
    stop(nodes)


@pytest.fixture
def one_node(dev_pki, peers, tmp_path):
    db_url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    nodes = Nodes(tmp_path, db_url, dev_pki, peers, 1)
    yield nodes, db_url
    stop(nodes)


def prescribe(client, control_id: str, lines=((DOLIPRANE, 2), (AMOXIL, 1))) -> str:
    status, answer = client.hl7(rde(control_id, lines))
    assert status == 200, answer
    [issued] = answer["prescriptions"]
    return issued["id"]


def dispensed(db_url: str, prescription_id: str) -> list:
    return rows(db_url, "SELECT line, dispensing_facility, quantity_milli FROM dispensations "
                        "WHERE prescription_id = :p ORDER BY id", p=prescription_id)


@pytest_twisted.inlineCallbacks
def test_the_same_dispensation_again_while_the_first_is_processed_is_told_to_wait(one_node, peers):
    """A pharmacy's software that sends its dispensation again (its first request timed out)
    while the gateway still checks the first must not be told that it was refused: 409, send
    it again later (then it gets the first's answer); and that 409 is not kept under its key."""
    nodes, db_url = one_node
    doctor, pharmacy = nodes.client(DOCTOR_ID), nodes.client(PHARMACY_ID)
    prescription_id = yield threads.deferToThread(prescribe, doctor, "RDE-WAIT")
    yield peers.faults("cnss", "slow", delay=3, count=1)  # the first's AMO check takes 3 s
    message = rds("RDS-WAIT", prescription_id)

    def again_meanwhile():
        import time

        time.sleep(1)
        return pharmacy.hl7(message), pharmacy.hl7(message, key="retry-1")

    first, (plain, keyed) = yield threads.deferToThread(at_once, lambda: pharmacy.hl7(message),
                                                        again_meanwhile)
    assert first[0] == 200 and ack_code(first[1]) == ("AA", ""), first
    for status, answer in (plain, keyed):
        assert status == 409 and answer["type"].endswith("/message-in-progress"), answer
        assert ack_code(answer) == ("AE", "PRESCRIPTION_NOT_PROCESSED")
    # Sent again later, with or without its key: the first's answer.
    for key in (None, "retry-1"):
        status, answer = yield threads.deferToThread(pharmacy.hl7, message, key)
        assert status == 200 and ack_code(answer) == ("AA", ""), answer
    found = yield threads.deferToThread(dispensed, db_url, prescription_id)
    assert [(r.line, r.quantity_milli) for r in found] == [(1, 1000)]


@pytest_twisted.inlineCallbacks
def test_a_prescription_of_acts_over_rest_is_answered_with_its_id_like_drugs(one_node):
    """POST /v1/hl7v2 of a doctor's OML^O21 / ORM^O01: the ORL^O22 / ORR^O02 and, as for RDE^O11,
    the prescriptions issued (id, QR payload); an ordinary order gets no such list."""
    from acts_support import oml, orm

    nodes, _ = one_node
    doctor = nodes.client(DOCTOR_ID)
    for message in (oml("OML-REST"), orm("ORM-REST")):
        status, answer = yield threads.deferToThread(doctor.hl7, message)
        assert status == 200, answer
        [issued] = answer["prescriptions"]
        assert f"|{issued['id']}^HIE|" in answer["ack"] and issued["qr_payload"].startswith("HIE1.")
    status, answer = yield threads.deferToThread(doctor.hl7, oml("OML-NOT-NEW", control="SC"))
    assert status == 200 and "prescriptions" not in answer, answer

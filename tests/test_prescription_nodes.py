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

from delivery_support import until
from prescription_nodes_support import (DOCTOR_ID, LAB_ID, PHARMACY_2_ID, PHARMACY_ID, SECOND_PHARMACY,
                                        Nodes, ack_code, at_once, care_sheet_lines)
from prescription_support import AMOXIL, DOLIPRANE, cancel, rde, rds
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
def test_two_pharmacies_on_two_nodes_dispense_the_same_line_at_once(two_nodes, tmp_path):
    nodes, db_url = two_nodes
    doctor = nodes.client(DOCTOR_ID)
    agdal, souissi = nodes.client(PHARMACY_ID, 0), nodes.client(PHARMACY_2_ID, 1)
    prescription_ids = []
    for round_ in range(4):
        prescription_id = yield threads.deferToThread(prescribe, doctor, f"RDE-RACE-{round_}")
        prescription_ids.append(prescription_id)
        # Both take the whole line (2 boxes) at the same instant, each through its own node.
        first, second = yield threads.deferToThread(
            at_once,
            lambda: agdal.hl7(rds(f"RDS-A-{round_}", prescription_id, ((DOLIPRANE, 2),))),
            lambda: souissi.hl7(rds(f"RDS-S-{round_}", prescription_id, ((DOLIPRANE, 2),),
                                    sender=SECOND_PHARMACY)))
        codes = sorted(ack_code(answer) for _, answer in (first, second))
        assert codes == [("AA", ""), ("AE", "OVER_DISPENSING")], (first, second)
        assert sorted(status for status, _ in (first, second)) == [200, 422]
        found = yield threads.deferToThread(dispensed, db_url, prescription_id)
        assert [(r.line, r.quantity_milli) for r in found] == [(1, 2000)]
    # CNSS bills line 1 of each prescription once, and nothing else.
    for prescription_id in prescription_ids:
        yield until("SELECT status FROM deliveries WHERE destination = 'cnss'",
                    lambda f: len(f) == len(prescription_ids) and all(r.status == "delivered" for r in f),
                    db_url, timeout=30)
        billed = care_sheet_lines(tmp_path, prescription_id)
        assert [line["ligne"] for line in billed] == [1], billed


def status_of(db_url: str, prescription_id: str) -> str:
    [row] = rows(db_url, "SELECT status FROM prescriptions WHERE id = :p", p=prescription_id)
    return row.status


@pytest_twisted.inlineCallbacks
def test_a_dispensation_racing_the_cancellation_on_two_nodes(two_nodes, tmp_path):
    nodes, db_url = two_nodes
    doctor, pharmacy = nodes.client(DOCTOR_ID, 0), nodes.client(PHARMACY_ID, 1)
    outcomes = set()
    for round_ in range(4):
        prescription_id = yield threads.deferToThread(prescribe, doctor, f"RDE-CA-{round_}")
        (cancel_status, cancelled), (_, dispensation) = yield threads.deferToThread(
            at_once, lambda: doctor.hl7(cancel(f"CA-{round_}", prescription_id)),
            lambda: pharmacy.hl7(rds(f"RDS-CA-{round_}", prescription_id)))
        found = yield threads.deferToThread(dispensed, db_url, prescription_id)
        status = yield threads.deferToThread(status_of, db_url, prescription_id)
        if cancel_status == 200:  # cancelled first: the dispensation met a cancelled prescription
            assert ack_code(dispensation) == ("AE", "PRESCRIPTION_CANCELLED"), dispensation
            assert (status, found) == ("cancelled", [])
            outcomes.add("cancelled")
        else:  # dispensed first: no longer cancellable
            assert ack_code(dispensation) == ("AA", ""), dispensation
            assert ack_code(cancelled)[0] == "AE", cancelled
            assert status == "active" and [(r.line, r.quantity_milli) for r in found] == [(1, 1000)]
            outcomes.add("dispensed")
    yield until("SELECT status FROM deliveries", lambda f: all(r.status == "delivered" for r in f),
                db_url, timeout=30)


@pytest_twisted.inlineCallbacks
def test_the_same_dispensation_sent_twice_at_once_is_recorded_and_billed_once(two_nodes, tmp_path):
    nodes, db_url = two_nodes
    doctor = nodes.client(DOCTOR_ID)
    on_a, on_b = nodes.client(PHARMACY_ID, 0), nodes.client(PHARMACY_ID, 1)
    ids = []
    # 1. With one Idempotency-Key, to both nodes at once, then again: one dispensation.
    prescription_id = yield threads.deferToThread(prescribe, doctor, "RDE-KEY")
    ids.append(prescription_id)
    message = rds("RDS-KEY", prescription_id)
    answers = yield threads.deferToThread(at_once, lambda: on_a.hl7(message, key="k-1"),
                                          lambda: on_b.hl7(message, key="k-1"))
    assert sorted(status for status, _ in answers) in ([200, 200], [200, 409]), answers
    again = yield threads.deferToThread(on_b.hl7, message, "k-1")
    assert again[0] == 200 and ack_code(again[1]) == ("AA", ""), again
    # 2. Without a key, the same message (same MSH-10) to both nodes at once: one dispensation;
    # each copy is told it was accepted, or (the first still processed) to send it again later,
    # never that it was refused.
    prescription_id = yield threads.deferToThread(prescribe, doctor, "RDE-SAME")
    ids.append(prescription_id)
    message = rds("RDS-SAME", prescription_id)
    answers = yield threads.deferToThread(at_once, lambda: on_a.hl7(message), lambda: on_b.hl7(message))
    assert sorted(status for status, _ in answers) in ([200, 200], [200, 409]), answers
    for status, answer in answers:
        assert ack_code(answer) == (("AA", "") if status == 200 else ("AE", "PRESCRIPTION_NOT_PROCESSED"))
    again = yield threads.deferToThread(on_b.hl7, message)
    assert again[0] == 200 and ack_code(again[1]) == ("AA", ""), again
    # 3. Without a key, the same dispensation (ORC-3) under two control ids: one recorded, the
    # other refused as a duplicate.
    prescription_id = yield threads.deferToThread(prescribe, doctor, "RDE-DUP")
    ids.append(prescription_id)
    answers = yield threads.deferToThread(
        at_once, lambda: on_a.hl7(rds("RDS-DUP-1", prescription_id, dispensation="D-77")),
        lambda: on_b.hl7(rds("RDS-DUP-2", prescription_id, dispensation="D-77")))
    assert sorted(ack_code(answer) for _, answer in answers) == [("AA", ""), ("AE", "DISPENSATION_DUPLICATE")], \
        answers
    for prescription_id in ids:
        found = yield threads.deferToThread(dispensed, db_url, prescription_id)
        assert [(r.line, r.quantity_milli) for r in found] == [(1, 1000)], prescription_id
    yield until("SELECT status FROM deliveries WHERE destination = 'cnss'",
                lambda f: len(f) == 3 and all(r.status == "delivered" for r in f), db_url, timeout=30)
    for prescription_id in ids:
        assert [line["ligne"] for line in care_sheet_lines(tmp_path, prescription_id)] == [1]


def watch(client, prescription_id: str, stop) -> list:
    """Look the prescription up again and again until it is gone (410) or `stop` is set."""
    seen = []
    while not stop.is_set():
        status, view = client.lookup(prescription_id)
        seen.append((status, view))
        if status != 200:
            break
    return seen


@pytest_twisted.inlineCallbacks
def test_look_ups_racing_dispensations_never_show_what_is_not_true(two_nodes):
    import threading

    nodes, db_url = two_nodes
    doctor, pharmacy, looker = (nodes.client(DOCTOR_ID, 0), nodes.client(PHARMACY_ID, 0),
                                nodes.client(PHARMACY_2_ID, 1))
    prescription_id = yield threads.deferToThread(prescribe, doctor, "RDE-LOOK", ((DOLIPRANE, 6),))
    stop = threading.Event()

    def dispense_all():
        try:
            return [ack_code(pharmacy.hl7(rds(f"RDS-LOOK-{n}", prescription_id))[1]) for n in range(6)]
        finally:
            stop.set()

    codes, seen = yield threads.deferToThread(at_once, dispense_all,
                                              lambda: watch(looker, prescription_id, stop))
    assert codes == [("AA", "")] * 6
    remaining = [view["lines"][0]["remaining"] for status, view in seen if status == 200]
    assert remaining == sorted(remaining, reverse=True), remaining  # never goes back up
    for status, view in seen:
        if status == 200:  # shown as dispensable: something remains, and it is active
            assert view["status"] == "active" and view["lines"][0]["remaining"] > 0, view
            assert view["lines"][0]["dispensed"] + view["lines"][0]["remaining"] == 6, view
        else:
            assert (status, view["type"].rsplit("/", 1)[-1]) == (410, "prescription-completed"), view
    status, view = yield threads.deferToThread(looker.lookup, prescription_id)
    assert status == 410 and view["type"].endswith("prescription-completed"), view


@pytest_twisted.inlineCallbacks
def test_the_same_dispensation_again_while_the_first_is_processed(two_nodes, peers):
    """A pharmacy's software that sends its dispensation again (its first request timed out)
    while the gateway still checks the first must not be told that it was refused. Through the
    node that processes the first, the copy waits for it and gets its answer; through another
    node, 409 at once (send it again later: then it gets the first's answer), and that 409 is
    not kept under its key."""
    import time

    nodes, db_url = two_nodes
    doctor = nodes.client(DOCTOR_ID)
    here, there = nodes.client(PHARMACY_ID, 0), nodes.client(PHARMACY_ID, 1)
    prescription_id = yield threads.deferToThread(prescribe, doctor, "RDE-WAIT")
    yield peers.faults("cnss", "slow", delay=3, count=1)  # the first's AMO check takes 3 s
    message = rds("RDS-WAIT", prescription_id)

    def again_meanwhile():
        # Once the first is stored (its AMO check then takes 3 s), not after a fixed delay: on
        # a busy machine the first may reach its node after a copy sent a second later.
        deadline = time.monotonic() + 20
        while not rows(db_url, "SELECT id FROM messages WHERE control_id = 'RDS-WAIT'"):
            assert time.monotonic() < deadline, "the first dispensation was never stored"
            time.sleep(0.05)
        return there.hl7(message), there.hl7(message, key="retry-1"), here.hl7(message)

    first, (plain, keyed, waited) = yield threads.deferToThread(at_once, lambda: here.hl7(message),
                                                                again_meanwhile)
    assert first[0] == 200 and ack_code(first[1]) == ("AA", ""), first
    assert waited[0] == 200 and waited[1]["ack"] == first[1]["ack"], waited
    for status, answer in (plain, keyed):
        assert status == 409 and answer["type"].endswith("/message-in-progress"), answer
        assert ack_code(answer) == ("AE", "PRESCRIPTION_NOT_PROCESSED")
    # Sent again later, with or without its key: the first's answer.
    for key in (None, "retry-1"):
        status, answer = yield threads.deferToThread(there.hl7, message, key)
        assert status == 200 and ack_code(answer) == ("AA", ""), answer
    found = yield threads.deferToThread(dispensed, db_url, prescription_id)
    assert [(r.line, r.quantity_milli) for r in found] == [(1, 1000)]


@pytest_twisted.inlineCallbacks
def test_a_laboratory_result_racing_the_cancellation_on_two_nodes(two_nodes, tmp_path):
    from acts_support import oml, oru

    nodes, db_url = two_nodes
    doctor, lab = nodes.client(DOCTOR_ID, 0), nodes.client(LAB_ID, 1)
    for round_ in range(4):
        status, answer = yield threads.deferToThread(doctor.hl7, oml(f"OML-{round_}"))
        assert status == 200, answer
        [issued] = answer["prescriptions"]
        prescription_id = issued["id"]
        (cancel_status, cancelled), (_, result) = yield threads.deferToThread(
            at_once,
            lambda: doctor.hl7(oml(f"OML-CA-{round_}", control="CA", filler=f"{prescription_id}^HIE")),
            lambda: lab.hl7(oru(f"ORU-{round_}", prescription_id, accession=f"ACC-{round_}")))
        performed = yield threads.deferToThread(dispensed, db_url, prescription_id)
        status = yield threads.deferToThread(status_of, db_url, prescription_id)
        if cancel_status == 200:
            assert ack_code(result) == ("AE", "PRESCRIPTION_CANCELLED"), result
            assert (status, performed) == ("cancelled", [])
        else:
            assert ack_code(result) == ("AA", ""), result
            assert ack_code(cancelled)[0] == "AE", cancelled
            assert status == "active" and [r.line for r in performed] == [1]
    yield until("SELECT status FROM deliveries", lambda f: all(r.status == "delivered" for r in f),
                db_url, timeout=30)
    performed = yield threads.deferToThread(
        rows, db_url, "SELECT prescription_id, line FROM dispensations ORDER BY id")
    billed = [(line["numero"], line["ligne"]) for p, _ in performed for line in care_sheet_lines(tmp_path, p)]
    assert sorted(billed) == sorted((p, line) for p, line in performed)


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


@pytest_twisted.inlineCallbacks
def test_the_same_paper_dispensation_under_two_control_ids_at_once(two_nodes):
    """A paper prescription has no row to lock: the same dispensation (ORC-3) sent at once to
    both nodes under two control ids is recorded once, the other refused as a duplicate."""
    nodes, db_url = two_nodes
    on_a, on_b = nodes.client(PHARMACY_ID, 0), nodes.client(PHARMACY_ID, 1)
    for round_ in range(4):
        answers = yield threads.deferToThread(
            at_once, lambda: on_a.hl7(rds(f"PAP-A-{round_}", None, paper=True, dispensation=f"P-{round_}")),
            lambda: on_b.hl7(rds(f"PAP-B-{round_}", None, paper=True, dispensation=f"P-{round_}")))
        assert sorted(ack_code(answer) for _, answer in answers) == \
            [("AA", ""), ("AE", "DISPENSATION_DUPLICATE")], answers
    found = yield threads.deferToThread(rows, db_url, "SELECT count(*) AS n FROM dispensations WHERE paper")
    assert found[0].n == 4

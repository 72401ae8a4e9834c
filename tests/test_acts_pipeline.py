"""Ingest of orders of acts and of results: only what names a prescription waits for the
prescription step before its answer; ordinary results from laboratories are answered at commit,
even when the translation worker is not running at all. And the REST look-up shows acts."""
from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from sqlalchemy import text
from twisted.internet import defer, reactor

from adapters.hl7v2.ack import AckBuilder
from gateway.config import load_config
from gateway.doors.api import ApiRequest, Problem
from gateway.prescriptions.api import prescription_routes
from gateway.store.database import Database
from acts_support import GLUCOSE, HBA1C, oml, oru
from prescription_support import ROOT
from test_prescription_pipeline import msa, receive, setup  # noqa: F401 (the fixture)


def test_ordinary_result_is_answered_at_commit_without_waiting(setup):
    """The worker is stopped: an ORU naming no prescription (and one whose ORC-4 is another
    system's placer group) still gets AA at commit, stored as such; it is translated later."""
    harness, translation, pipeline = setup
    for message in (oru("ORU-N1", None), oru("ORU-N2", "GRP-7", namespace="CAB")):
        answer = receive(pipeline, message)
        assert answer.stored and msa(answer)[1] == "AA"
    with harness.engine.connect() as connection:
        rows = connection.execute(text("SELECT ack_code, status FROM messages ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("AA", "received"), ("AA", "received")]


def test_result_naming_a_prescription_waits_for_the_step(setup):
    """Worker stopped: a result naming a prescription gets the provisional AE (never an AA the
    step could contradict); worker running: the prescriber's OML^O21 gets its ORL^O22, then the
    laboratory's result AA once recorded, and the stored answer is the step's."""
    harness, translation, pipeline = setup
    waiting = receive(pipeline, oru("ORU-W0", "RX-ABCD-EFGH-F"))
    assert msa(waiting)[1] == "AE" and b"PRESCRIPTION_NOT_PROCESSED" in waiting.response
    translation.worker.start(sweep=False)
    ordered = receive(pipeline, oml("OML-P1"))
    assert b"ORL^O22" in ordered.response and msa(ordered)[1] == "AA"
    prescription_id = [s for s in ordered.response.decode().split("\r") if s.startswith("ORC|")][0] \
        .split("|")[3].split("^")[0]
    performed = receive(pipeline, oru("ORU-W1", prescription_id))
    assert msa(performed)[1] == "AA"
    refused = receive(pipeline, oru("ORU-W2", prescription_id, accession="ACC-2"))
    assert msa(refused)[1] == "AE" and b"ACT_ALREADY_PERFORMED" in refused.response
    with harness.engine.connect() as connection:
        stored = connection.execute(text("SELECT ack FROM messages WHERE control_id = 'ORU-W2'")).scalar()
    assert bytes(stored) == refused.response
    assert translation.answers_after_translation("ORU^R01", oru("X", prescription_id), "INPE-100002")
    assert not translation.answers_after_translation("ORU^R01", oru("X", None), "INPE-100002")


# -- the REST look-up ----------------------------------------------------------------------------

FACILITIES = {s.id: s for s in load_config(os.path.join(ROOT, "conf", "gateway.yaml"), environ={}).senders}


@pytest_twisted.inlineCallbacks
def test_lookup_shows_the_acts_that_remain(tmp_path, repo_mappings):
    """GET /v1/prescriptions/{id} by the laboratory: each act line with its kind, code and what
    remains; once every act is performed, 410 Gone."""
    from prescription_support import FakeEligibility, Harness, config_for

    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    harness = Harness(url, repo_mappings, config_for(url, tmp_path), FakeEligibility(), AckBuilder())
    [record] = harness.translate(oml("OML-1"))
    prescription_id = [s for s in record.ack.decode().split("\r") if s.startswith("ORC|")][0].split("|")[3].split("^")[0]
    harness.translate(oru("ORU-1", prescription_id, tests=(GLUCOSE,)))

    class Service:
        database = Database(harness.engine, reactor, 2, name="acts-test")
        key = harness.key

    Service.database.start()
    try:
        route = {(r.method, r.template): r for r in prescription_routes(Service())}[("GET", "/v1/prescriptions/{id}")]
        request = ApiRequest("GET", "/v1/prescriptions/x", {"id": prescription_id}, {}, {}, b"",
                             FACILITIES["INPE-100002"], "127.0.0.1:1", "req-1")
        response = yield defer.maybeDeferred(route.handler, request)
        lines = json.loads(response.body)["lines"]
        assert [(l["line"], l["kind"], l["act"]["code"], l["quantity"], l["dispensed"], l["remaining"])
                for l in lines] == [(1, "act", "B0412", 1, 1, 0), (2, "act", "B1104", 1, 0, 1)]
        harness.translate(oru("ORU-2", prescription_id, tests=(HBA1C,), accession="ACC-2"))
        with pytest.raises(Problem) as gone:
            yield defer.maybeDeferred(route.handler, request)
        assert gone.value.status == 410 and "performed" in gone.value.detail
    finally:
        Service.database.stop()
        harness.close()

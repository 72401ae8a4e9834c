"""Two nodes on one PostgreSQL translating the same stored messages (a node's stale sweep
taking what another still holds, or sweeping what another stored a moment before): each
message is stored, audited, announced, routed and run through the prescription step once,
by whichever node stores it first; the other answers with what was stored. Each node here is
a worker on its own engine (its own connections), as in its own process."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from gateway.audit.trail import AuditTrail
from gateway.events import EventBus
from gateway.mapping.mapping_set import MappingSet
from gateway.store.database import create_gateway_engine, migrate
from gateway.translation.service import TranslationJob, TranslationWorker
from gateway.translation.translator import Translator
from prescription_support import FakeEligibility, rde, segments, standard_harness
from test_translation_service import _stored
from translation_support import hl7, write_mappings

pytestmark = pytest.mark.pg


class Node:
    """A translation worker on its own engine, with its own audit trail and events."""

    def __init__(self, url: str, name: str, mappings: MappingSet):
        self.engine = create_gateway_engine(url)
        self.events, self.heard = EventBus(), []
        self.events.subscribe(self.heard.append)
        translator = Translator(mappings)
        original = translator.translate

        def routed(item):  # every translation goes to one destination
            record = original(item)
            if not record.failed:
                record.destinations = ("shared-record",)
            return record

        translator.translate = routed
        self.translator = translator
        self.worker = TranslationWorker(self.engine, translator, lambda f, *a: f(*a), events=self.events,
                                        audit=AuditTrail(self.engine, name), linger=0)

    def process(self, items) -> TranslationJob:
        job = TranslationJob(list(items), lambda job: None)
        self.worker._process([job])
        assert job.error is None, job.error
        return job


def _nodes(url, tmp_path):
    engine = create_gateway_engine(url)
    migrate(engine)
    mappings = MappingSet.load(write_mappings(tmp_path / "mappings"))
    return engine, Node(url, "node-a", mappings), Node(url, "node-b", mappings)


def _audited(engine) -> list[tuple[str, str]]:
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(
            "SELECT action, subject FROM audit_log WHERE action LIKE 'message.transl%' ORDER BY seq"))]


def test_a_message_stored_by_one_node_is_not_stored_again_by_another(pg_url, tmp_path):
    """Node B translates messages node A stored a moment before (B's sweep read them while
    they were still 'received'): B stores nothing, records nothing, announces nothing, and
    reopens no dead letter; its caller gets A's outcome."""
    engine, a, b = _nodes(pg_url, tmp_path)
    try:
        items = _stored(engine, [hl7("N-1"), hl7("N-2", birth="1985XX")])
        a.process(items)
        with engine.begin() as connection:  # the shared record refused it: a dead letter
            connection.execute(text("UPDATE deliveries SET status = 'dead'"))
            translated_at = connection.execute(text("SELECT array_agg(translated_at ORDER BY message_id) "
                                                    "FROM translations")).scalar()
        late = b.process(_stored_again(items))
        ids = [item.message_id for item in items]
        assert _audited(engine) == [("message.translated", f"message/{ids[0]}"),
                                    ("message.translation_failed", f"message/{ids[1]}")]
        assert len(a.heard) == 2 and b.heard == []
        with engine.connect() as connection:
            assert connection.execute(text("SELECT status, attempts FROM deliveries")).all() == [("dead", 0)]
            assert connection.execute(text("SELECT array_agg(translated_at ORDER BY message_id) "
                                           "FROM translations")).scalar() == translated_at
        assert [record.status for record in late.results] == ["translated", "failed"]
        assert late.results[0].bundle_dict()["entry"][0]["resource"]["resourceType"] == "Patient"
        assert AuditTrail(engine, "check").verify().intact
    finally:
        for node in (a, b):
            node.engine.dispose()
        engine.dispose()


def test_two_nodes_storing_the_same_messages_at_once_store_each_once(pg_url, tmp_path):
    """Two nodes translate the same messages and store them at the same moment: one
    audit record, one event and one delivery per message, whichever node wins each."""
    engine, a, b = _nodes(pg_url, tmp_path)
    try:
        items = _stored(engine, [hl7(f"C-{n}") for n in range(20)])
        both = threading.Barrier(2, timeout=20)
        for node in (a, b):
            translate = node.translator.translate

            def held(item, translate=translate, last=items[-1].message_id):
                record = translate(item)
                if item.message_id == last:
                    both.wait()  # both nodes have translated the batch: store at once
                return record

            node.translator.translate = held
        jobs = {}
        threads = [threading.Thread(target=lambda node=node: jobs.setdefault(node, node.process(
            _stored_again(items)))) for node in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(jobs) == 2
        audited = _audited(engine)
        assert sorted(audited) == sorted(("message.translated", f"message/{item.message_id}") for item in items)
        assert len(a.heard) + len(b.heard) == len(items)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM deliveries")).scalar() == len(items)
            assert connection.execute(text("SELECT DISTINCT status FROM messages")).scalars().all() == ["translated"]
        assert all(record.status == "translated" for job in jobs.values() for record in job.results)
        assert AuditTrail(engine, "check").verify().intact
    finally:
        for node in (a, b):
            node.engine.dispose()
        engine.dispose()


def test_a_prescription_translated_by_two_nodes_at_once_is_issued_once(pg_url, tmp_path, repo_mappings):
    """Two nodes run the prescription step on the same RDE^O11 at the same moment: one
    prescription is issued, the message stays translated (the loser's step used to fail on the
    unique message id and store it 'failed' over the winner's translation), one audit record,
    and both answer with the same id."""
    first = standard_harness(pg_url, tmp_path, repo_mappings, FakeEligibility())
    second = standard_harness(pg_url, tmp_path, repo_mappings, FakeEligibility())
    try:
        for harness, name in ((first, "node-a"), (second, "node-b")):
            harness.worker.audit = AuditTrail(harness.engine, name)
        pending = first.store(rde("RX-RACE"))
        both = threading.Barrier(2, timeout=20)
        for harness in (first, second):
            prepare = harness.flow.prepare

            def held(results, prepare=prepare):
                prepared = prepare(results)
                both.wait()  # translated and prepared on both: open the transactions at once
                return prepared

            harness.flow.prepare = held
        jobs = {}
        threads = [threading.Thread(target=lambda h=harness: jobs.setdefault(h, _process(h, pending)))
                   for harness in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(jobs) == 2
        with first.engine.connect() as connection:
            assert connection.execute(text("SELECT count(*) FROM prescriptions")).scalar() == 1
            issued = connection.execute(text("SELECT id FROM prescriptions")).scalar()
            assert connection.execute(text("SELECT status FROM messages")).scalar() == "translated"
            assert connection.execute(text("SELECT status FROM translations")).scalar() == "translated"
        assert _audited(first.engine) == [("message.translated", f"message/{pending.message_id}")]
        for job in jobs.values():
            [record] = job.results
            assert segments(record.ack)["MSA"][0][1] == "AA"
            assert segments(record.ack)["ORC"][0][3].split("^")[0] == issued
    finally:
        first.close()
        second.close()


def _process(harness, pending) -> TranslationJob:
    job = TranslationJob([_copy(pending)], lambda job: None)
    harness.worker._process([job])
    assert job.error is None, job.error
    return job


def _copy(pending):
    import dataclasses

    return dataclasses.replace(pending)


def _stored_again(items):
    """The same messages as another node reads them (its own Pending objects)."""
    return [_copy(item) for item in items]

"""Ingest of prescription messages: answered once the prescription step has run, whatever the
listener's ack_after; until then, and when the step could not run, the stored answer is a
provisional AE (never an AA without a prescription id)."""
from __future__ import annotations

import queue
import threading
import time

import pytest
from sqlalchemy import text

from adapters.hl7v2.ack import AckBuilder
from adapters.mllp.protocol import ConnectionInfo
from gateway.facilities import FacilityRegistry
from gateway.ingest.inspect import IngestPolicy, Inspector
from gateway.ingest.pipeline import IngestPipeline
from gateway.store.ingest_writer import IngestWriter
from gateway.translation.service import TranslationService, TranslationWorker
from gateway.translation.translator import Translator
from prescription_support import FakeEligibility, Harness, config_for, rde, rds


class Replies:
    def __init__(self):
        self.answers: queue.SimpleQueue = queue.SimpleQueue()

    def __call__(self, answer):
        self.answers.put(answer)

    def get(self):
        return self.answers.get(timeout=10)


@pytest.fixture
def setup(tmp_path, repo_mappings):
    url = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    config = config_for(url, tmp_path)
    builder = AckBuilder()
    harness = Harness(url, repo_mappings, config, FakeEligibility(), builder)
    writer = IngestWriter(harness.engine, lambda f, *a: f(*a), lambda item: None)
    writer.start()
    translation = TranslationService(config, harness.engine, None, step=harness.flow)
    translation.worker = TranslationWorker(harness.engine, Translator(repo_mappings, config.senders),
                                           lambda f, *a: f(*a), step=harness.flow)
    inspector = Inspector(builder, IngestPolicy("mllp-test", registry=FacilityRegistry.from_config(config)))
    pipeline = IngestPipeline(inspector, writer, translation=translation, ack_after_translation=False)
    yield harness, translation, pipeline
    translation.worker.stop()
    writer.stop()
    harness.close()


def receive(pipeline, raw: bytes):
    replies = Replies()
    pipeline.frame_received(raw, ConnectionInfo("mllp-test", "127.0.0.1:5000"), replies)
    return replies.get()


def msa(answer) -> list[str]:
    return [s for s in answer.response.decode().split("\r") if s.startswith("MSA|")][0].split("|")


def test_prescription_answered_after_the_step_even_with_ack_after_commit(setup):
    """ack_after: commit, yet the RDE^O11 gets its RRE^O12 with the id (stored in place of the
    provisional answer); an ADT on the same listener is answered AA at commit."""
    harness, translation, pipeline = setup
    translation.worker.start(sweep=False)
    answer = receive(pipeline, rde("RDE-P1"))
    assert answer.stored and b"RRE^O12" in answer.response and msa(answer)[1] == "AA"
    with harness.engine.connect() as connection:
        stored = connection.execute(text("SELECT ack, ack_code FROM messages")).one()
    assert bytes(stored.ack) == answer.response and stored.ack_code == "AA"
    assert translation.answers_after_translation("RDS^O13") and not translation.answers_after_translation("ADT^A01")


def test_without_the_step_the_answer_is_the_provisional_ae(setup):
    """The translation worker is not running: the prescription cannot be issued now; the sender
    gets (and a re-sent copy would get) AE 'not processed yet', never AA."""
    harness, _, pipeline = setup
    answer = receive(pipeline, rde("RDE-P2"))
    assert msa(answer)[1] == "AE"
    err = [s for s in answer.response.decode().split("\r") if s.startswith("ERR|")][0].split("|")
    assert err[5].startswith("PRESCRIPTION_NOT_PROCESSED^") and "send the message again later" in err[7]
    with harness.engine.connect() as connection:
        stored = connection.execute(text("SELECT ack, ack_code, status FROM messages")).one()
    assert (stored.ack_code, stored.status) == ("AE", "received") and bytes(stored.ack) == answer.response


def test_refused_dispensation_answered_ae_on_a_commit_listener(setup):
    harness, translation, pipeline = setup
    translation.worker.start(sweep=False)
    answer = receive(pipeline, rds("RDS-P1", "RX-ABCD-EFGH-F"))
    assert msa(answer)[1] == "AE" and b"PRESCRIPTION_UNKNOWN" in answer.response


def test_enhanced_mode_answers_only_what_the_sender_asked_for(setup):
    """MSH-15 AL: RRE^O12 with CA; MSH-15 ER: nothing for an issued prescription, CE for a
    refused dispensation (never a provisional answer the sender did not ask for)."""
    harness, translation, pipeline = setup
    translation.worker.start(sweep=False)
    always = receive(pipeline, rde("RDE-E1", modes="AL|NE"))
    assert msa(always)[1] == "CA" and b"RRE^O12" in always.response and b"ORC|OK|" in always.response
    errors_only = receive(pipeline, rde("RDE-E2", modes="ER|NE"))
    assert errors_only.stored and errors_only.response is None
    refused = receive(pipeline, rds("RDS-E3", "RX-ABCD-EFGH-F", modes="ER|NE"))
    assert msa(refused)[1] == "CE"


class HeldEligibility(FakeEligibility):
    """CNSS answering only when the test lets it: the dispensation stays in its step."""

    def __init__(self):
        super().__init__()
        self.asking = threading.Event()
        self.release = threading.Event()

    def check_many(self, queries):
        self.asking.set()
        assert self.release.wait(10), "never released"
        return super().check_many(queries)


def test_a_copy_sent_while_the_first_is_processed_gets_the_firsts_answer(setup):
    """A pharmacy's software timed out and sent its RDS^O13 again while the first was waiting
    for CNSS: the copy got the provisional AE ('not processed yet'), which the software may
    show as a failure of a dispensation that is in fact recorded. It now waits for the first
    and gets its answer, byte for byte; once nothing is in flight, a copy gets the stored one."""
    harness, translation, pipeline = setup
    translation.worker.start(sweep=False)
    issued = receive(pipeline, rde("RDE-W1"))
    prescription_id = [s for s in issued.response.decode().split("\r") if s.startswith("ORC|")][0].split("|")[3]
    held = HeldEligibility()
    harness.flow.eligibility = held
    dispensation = rds("RDS-W1", prescription_id.split("^")[0])
    first, copy = Replies(), Replies()
    connection = ConnectionInfo("mllp-test", "127.0.0.1:5000")
    pipeline.frame_received(dispensation, connection, first)
    assert held.asking.wait(10)
    pipeline.frame_received(dispensation, ConnectionInfo("mllp-test", "127.0.0.1:5001"), copy)
    with harness.engine.connect() as connection_:
        for _ in range(100):  # the copy is stored (counted) and waits
            if connection_.execute(text("SELECT duplicate_count FROM messages WHERE control_id = 'RDS-W1'")).scalar():
                break
            time.sleep(0.05)
    time.sleep(0.2)
    assert copy.answers.empty()
    held.release.set()
    answered, again = first.get(), copy.get()
    assert msa(answered)[1] == "AA" and again.response == answered.response
    assert b"NOT_PROCESSED" not in again.response
    later = receive(pipeline, dispensation)
    assert later.response == answered.response


def test_a_copy_of_a_message_the_step_could_not_process_gets_the_provisional_ae_at_once(setup):
    """Nothing in flight (the worker is not running; or a crash, or another node): no wait."""
    _, _, pipeline = setup
    first = receive(pipeline, rde("RDE-P3"))
    again = receive(pipeline, rde("RDE-P3"))
    assert msa(again)[1] == "AE" and b"PRESCRIPTION_NOT_PROCESSED" in again.response
    assert again.response == first.response

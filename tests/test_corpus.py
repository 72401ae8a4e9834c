"""Every HL7 v2 (ER7) message of the third-party corpus through one running gateway over a
real socket: each gets its answer (or none, exactly when none is due), every answer is
positive or a negative ACK with an ERR segment, and every message is stored: nothing lost.

The listener uses MLLP release 2 commit blocks: every frame gets one once stored, so the
answers on the wire can be matched to the frames without guessing which ones are silent.
"""
from __future__ import annotations

import collections
import csv
import fnmatch
import os
import re
import socket

import pytest_twisted
from conftest import CORPUS, corpus_path
from twisted.internet import threads

from adapters.hl7v2.ack import AckBuilder
from adapters.mllp.client import split_messages
from adapters.mllp.framing import CommitAcknowledged, CommitRejected, FrameReceived, MllpFramer, frame
from gateway.ingest.inspect import IngestPolicy, Inspector, SenderDirectory
from gateway.store.database import create_gateway_engine
from gateway.store.queries import get_message, list_messages

NOT_ER7 = (".xml", ".json", ".ccda", ".fhir", ".expected")
NOT_HL7_TYPES = ("ASTM", "XDS", "CDA")

# Files whose every frame must be refused (negative ACK, stored as rejected).
MUST_BE_REFUSED = [
    "python-hl7/sample_bad_*.hl7",  # broken batch and file envelopes
    "ruby-hl7/empty-batch.hl7",  # BTS claims 2 messages, holds none
    "nhapi/bad-inputs/*",  # fuzzer output: broken MSH-1/MSH-2, empty required fields
]
SENTINEL = (b"MSH|^~\\&|CORPUS_TEST|CORPUS|GW|MA|20250101000000||ADT^A01^ADT_A01|CORPUS-END|P|2.5\r"
            b"PID|1||1^^^CORPUS^PI||END^OF^CORPUS\r")


def er7_files() -> list[tuple[str, str]]:
    """(path, notes) of the corpus files holding HL7 v2 ER7 text, from INDEX.tsv."""
    with open(os.path.join(CORPUS, "INDEX.tsv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [(row["path"], row["notes"]) for row in rows
            if not row["message_type"].startswith(NOT_HL7_TYPES) and not row["path"].endswith(NOT_ER7)]


def frames_of(path: str, notes: str) -> list[bytes]:
    with open(corpus_path(path), "rb") as f:
        data = f.read()
    if "MLLP framing bytes present" in notes:  # a capture's framing, not content: a sender strips it
        data = data.replace(b"\x0b", b"").replace(b"\x1c", b"")
    return split_messages(data)


def first_fields(payload: bytes) -> list[bytes]:
    """The fields of the first segment (read leniently, for the test's own checks)."""
    line = re.split(rb"[\r\n]", payload.lstrip(b"\xef\xbb\xbf\r\n\t "), maxsplit=1)[0]
    return line.split(line[3:4]) if len(line) > 3 else [line]


def must_not_be_answered(payload: bytes) -> bool:
    """An acknowledgement, or enhanced mode with MSH-15 saying no ACK (or none of this kind)."""
    fields = first_fields(payload)
    if fields[0] != b"MSH":
        return False
    msh9 = fields[8] if len(fields) > 8 else b""
    msh15 = fields[14] if len(fields) > 14 else b""
    return msh9.startswith(b"ACK") or msh15 in (b"NE", b"ER", b"SU")


def acks_in(answer: bytes) -> list[bytes]:
    """The ACK messages of an answer: itself, or each one inside a batch of ACKs."""
    segments = answer.rstrip(b"\r").split(b"\r")
    acks: list[list[bytes]] = []
    for segment in segments:
        if segment.startswith(b"MSH"):
            acks.append([segment])
        elif acks and segment[:3] not in (b"BTS", b"FTS", b"BHS", b"FHS"):
            acks[-1].append(segment)
    return [b"\r".join(a) for a in acks]


def msa(ack: bytes) -> list[bytes]:
    line = next((s for s in ack.split(b"\r") if s.startswith(b"MSA")), b"")
    return line.split(line[3:4]) if line else []


def _refusal(ack: bytes) -> bool:
    return msa(ack)[1:2] in ([b"AE"], [b"AR"], [b"CE"], [b"CR"])


def is_batch_answer(answer: bytes | None) -> bool:
    return answer is not None and answer[:3] in (b"BHS", b"FHS")


def message_count(payload: bytes) -> int:
    return sum(1 for s in re.split(rb"[\r\n]+", payload) if s.startswith(b"MSH"))


class Exchange:
    """One connection: send frames one by one; the answers between two commit blocks belong
    to the frame of the first."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.framer = MllpFramer()
        self.commits: list[bool] = []
        self.answers: list[list[bytes]] = []

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the gateway closed the connection"
        for event in self.framer.receive_data(data):
            if isinstance(event, (CommitAcknowledged, CommitRejected)):
                self.commits.append(isinstance(event, CommitAcknowledged))
                self.answers.append([])
            elif isinstance(event, FrameReceived):
                assert self.answers, "an answer before any commit block"
                self.answers[-1].append(event.payload)

    def run(self, payloads: list[bytes]) -> None:
        for index, payload in enumerate(payloads):
            self.sock.sendall(frame(payload))
            while len(self.commits) <= index:
                self._read()
        while not self.answers[-1]:  # the last payload is the sentinel: it is always answered
            self._read()
        self.sock.close()


@pytest_twisted.inlineCallbacks
def test_every_corpus_message_is_answered_and_stored(tmp_path, make_config, running_gateway):
    """Every ER7 message of the corpus gets AA/CA or a negative ACK with ERR (or no answer exactly when none is due), and is stored."""
    db_url = f"sqlite:///{tmp_path / 'corpus.sqlite'}"
    config = make_config(db_url, mllp=[dict(name="mllp-corpus", commit_blocks=True, accept_unknown_senders=True)])
    listener = config.mllp[0]
    inspector = Inspector(AckBuilder(), IngestPolicy(
        listener.name, frozenset(p.encode("ascii") for p in listener.processing_ids),
        listener.accept_unknown_senders, SenderDirectory(config.senders)))

    sent: list[tuple[str, bytes]] = []  # (file, payload)
    files = er7_files()
    assert len(files) > 300 and any(p.startswith("nhapi/bad-inputs/") for p, _ in files)
    assert "ruby-hl7/empty.hl7" in dict(files)
    for path, notes in files:
        sent += [(path, payload) for payload in frames_of(path, notes)]
    assert not frames_of("ruby-hl7/empty.hl7", "")  # 0 bytes: nothing to send
    assert all(p for _, p in sent)

    ports = yield running_gateway(config)
    exchange = Exchange(ports["mllp-corpus"])
    yield threads.deferToThread(exchange.run, [p for _, p in sent] + [SENTINEL])

    assert len(exchange.commits) == len(sent) + 1 and all(exchange.commits), "a frame was not stored"
    assert [msa(a)[1] for a in exchange.answers[-1]] == [b"AA"]
    tally = collections.Counter()
    problems = []
    first_answer: dict[bytes, bytes] = {}
    expected_rows = 1  # the sentinel
    for (path, payload), answers in zip(sent, exchange.answers):
        predicted = inspector.frame(payload).response(inspector.builder)
        if len(answers) > 1:
            problems.append((path, "several answers", answers))
            continue
        answer = answers[0] if answers else None
        expected_rows += message_count(payload) if is_batch_answer(answer) else 1
        if answer is None:
            tally["no answer"] += 1
            if predicted is not None or not must_not_be_answered(payload):
                problems.append((path, "not answered", payload[:120]))
            continue
        acks = acks_in(answer)
        if not is_batch_answer(answer) and len(acks) != 1:
            problems.append((path, "not one ACK", answer))
        for ack in acks:
            code = msa(ack)[1:2]
            if code in ([b"AA"], [b"CA"]):
                tally["positive"] += 1
            elif _refusal(ack) and b"\rERR|" in ack:
                tally["negative"] += 1
            else:
                problems.append((path, "not a valid ACK", ack))
        # Only the store can tell a reused control id (207): the one refusal the Inspector cannot
        # foresee, answered even under MSH-15 ER. Otherwise the verdict is the Inspector's.
        reused = _refusal(answer) and re.search(rb"\rERR\|[^\r]*\b207\b", answer) is not None
        if predicted is None and not reused:
            problems.append((path, "answered though no answer was due", answer))
        elif predicted is not None and not is_batch_answer(answer):
            if _refusal(answer) != _refusal(predicted) and not reused:
                problems.append((path, f"answered {msa(answer)[1:2]}, expected {msa(predicted)[1:2]}", answer))
            tally["refused: control id reused"] += reused and not _refusal(predicted)
        if not is_batch_answer(answer):  # accepted bytes sent again: the stored ACK, byte for byte
            if payload in first_answer and first_answer[payload] != answer:
                problems.append((path, "duplicate not answered with the stored ACK", answer))
            elif not _refusal(answer):
                first_answer[payload] = answer  # (refusals are not deduplicated: answered afresh)
    assert not problems, "\n".join(repr(p)[:400] for p in problems[:20])

    engine = create_gateway_engine(db_url)
    with engine.connect() as conn:
        rows = list_messages(conn, limit=100_000)
        raw = {row.id: get_message(conn, row.id).raw for row in rows}
    engine.dispose()
    duplicates = sum(row.duplicate_count for row in rows)
    assert len(rows) + duplicates == expected_rows, "stored rows do not match the messages sent"

    # The deliberately bad files: every frame refused, its raw bytes stored as rejected.
    status_of_raw = collections.defaultdict(set)
    for row in rows:
        status_of_raw[raw[row.id]].add(row.status)
    refused_files = {path for path, _ in files if any(fnmatch.fnmatch(path, p) for p in MUST_BE_REFUSED)}
    assert len(refused_files) >= 25
    checked = 0
    for (path, payload), answers in zip(sent, exchange.answers):
        if path in refused_files:
            checked += 1
            assert answers and msa(answers[0])[1] in (b"AR", b"AE", b"CR", b"CE"), (path, answers)
            assert status_of_raw[payload] == {"rejected"}, path
    assert checked >= len(refused_files) - 1  # every file but possibly an empty one sends a frame

    print(f"\ncorpus: {len(files)} files, {len(sent)} frames, {expected_rows - 1} messages; "
          f"ACKs positive {tally['positive']}, negative {tally['negative']}, "
          f"(of which control id reused {tally['refused: control id reused']}), "
          f"no answer due {tally['no answer']}; stored rows {len(rows)}, duplicates {duplicates}")

"""Ingest: inspect a frame, store it with group commit, then answer. In that order: a positive
ACK leaves only after the raw bytes and their metadata are committed.

After the commit, the accepted messages go to translation. By default the answer does not wait
for it; a listener with `ack_after: translation` answers once the translation is stored, with
AE/CE and an ERR when it failed (that ACK is stored in place of the first, so a re-sent
message gets the same answer).

Whatever the listener says, a message whose answer depends on the translation step (the
e-prescription flow: RDE^O11, OMP^O09, RDS^O13; a prescriber's ORM^O01 / OML^O21; a result
whose ORC-4 names a prescription) is answered once it has run: with the prescription's
RRE^O12 / ORP^O10 / ORR^O02 / ORL^O22, or the dispensation's or the acts' AA or AE. The step
decides from the type, the sender and a byte search of the raw message, before the commit;
ordinary results are answered at commit as before. Until then the ACK stored
with it is a provisional AE ("not processed yet; send again later"), so that a re-sent copy
never gets an AA that carries no prescription id; the step's answer replaces it in the same
transaction as the translation.

If the store fails, nothing was stored and the sender is told to send again (AE/CE, ERR-3
207, ERR-5 STORE_UNAVAILABLE); the frame is logged by size and hash, never by content.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from adapters.hl7v2.ack import ErrorDetail
from adapters.hl7v2.codes import AppErrorCode, ErrorCondition, Outcome
from adapters.hl7v2.header import Location, enhanced_mode
from adapters.mllp.protocol import Answer, ConnectionInfo
from gateway.events import EventBus
from gateway.ingest import telemetry
from gateway.ingest.inspect import FieldView, FrameResult, Inspector
from gateway.ingest.model import Inbound
from gateway.prescriptions.codes import PrescriptionError
from gateway.store.database import during_outage
from gateway.store.ingest_writer import IngestJob, IngestWriter
from gateway.store.translations import Pending, TranslationRecord

if TYPE_CHECKING:
    from gateway.translation.service import TranslationService

log = logging.getLogger(__name__)


class IngestPipeline:
    """The frame handler of one listener (its own Inspector, the shared writer)."""

    def __init__(self, inspector: Inspector, writer: IngestWriter, now: Callable[[], float] = time.time,
                 translation: "TranslationService | None" = None, ack_after_translation: bool = False,
                 events: EventBus | None = None):
        self.inspector = inspector
        self.events = events if events is not None else EventBus()
        self.writer = writer
        self.now = now
        self.translation = translation
        self.ack_after_translation = ack_after_translation and translation is not None
        # The gateway stopping (gateway.service): the frames in hand are committed and
        # answered, those received from then on answered "not stored, send again" at once.
        self.in_flight = 0
        self.refusing = False

    def frame_received(self, payload: bytes, connection: ConnectionInfo,
                       reply: Callable[[Answer], None]) -> None:
        if self.refusing:
            self._refuse(payload, connection, reply)
            return
        self._store(payload, self.inspector.frame(payload, connection), connection, reply)

    def frame_too_large(self, prefix: bytes, size: int, limit: int, connection: ConnectionInfo,
                        reply: Callable[[Answer], None]) -> None:
        if self.refusing:
            self._refuse(prefix, connection, reply)
            return
        self._store(prefix, self.inspector.oversize(prefix, size, limit), connection, reply)

    def _refuse(self, payload: bytes, connection: ConnectionInfo, reply: Callable[[Answer], None]) -> None:
        log.debug("frame of %d bytes from %s not stored: the gateway is stopping; answered AE/CE",
                 len(payload), connection.peer)
        # Through `deliver`, not from inside the caller's frame: a connection's queued frames
        # would otherwise be answered by recursion.
        self.writer.deliver(reply, Answer(False, self._not_stored(payload)))
        telemetry.not_stored(self.events, payload, len(payload), connection.listener, connection.peer)

    def _store(self, payload: bytes, result: FrameResult, connection: ConnectionInfo,
               reply: Callable[[Answer], None]) -> None:
        builder = self.inspector.builder
        waiting = self._provisional(result)
        self.in_flight += 1

        def send_answer(answer: Answer) -> None:  # the frame's one answer: no longer in hand
            self.in_flight -= 1
            reply(answer)

        def done(job: IngestJob, error: Exception | None) -> None:
            if error is None:
                telemetry.stored(self.events, job)
                pending = self._to_translate(job)

                def answer() -> None:  # with the items' ACKs as they are then
                    self._reply(send_answer, job, Answer(True, result.response(builder)))

                if not pending:
                    self._answer_after_originals(job, answer)
                elif self.ack_after_translation or waiting:
                    # Whatever the translation's fate, the items' ACKs are then the stored ones.
                    # Copies sent meanwhile wait for them: the ACK stored at commit is not the
                    # answer yet (ack_after: translation, or the provisional AE of the step).
                    opened = [p.key for p in pending
                              if self.ack_after_translation or id(p.context) in waiting]
                    for key in opened:
                        self.translation.awaited.opened(key)
                    # The frame's own copies wait from now: their originals may be answered
                    # before this frame's translation is done.
                    translated = self._answer_after_originals(job, answer, also=1)
                    self._translate(pending, lambda tjob: self._answered(tjob, translated, opened),
                                    self._failure_ack)
                else:
                    self._answer_after_originals(job, answer)
                    self._translate(pending)
            else:
                # In an outage the database's own line tells it, once (and the metrics count
                # each AE); a frame refused otherwise is told here.
                log.log(logging.DEBUG if during_outage(error) else logging.ERROR,
                        "frame of %d bytes (sha256 %s) from %s not stored; answered AE/CE",
                        len(payload), hashlib.sha256(payload).hexdigest()[:16], connection.peer)
                send_answer(Answer(False, self._not_stored(payload)))
                telemetry.not_stored(self.events, payload, len(payload), connection.listener,
                                     connection.peer)

        self.writer.submit(IngestJob(result.items, connection.listener, connection.peer, self.now(), done))

    def _provisional(self, result: FrameResult) -> set[int]:
        """Give the messages answered after the translation step their provisional AE (see
        the module docstring); the id() of each of those items."""
        waiting: set[int] = set()
        if self.translation is None:
            return waiting
        for item in result.items:
            if not (item.deduplicated and self.translation.answers_after_translation(
                    item.message_type, item.raw, item.sender_id)):
                continue
            waiting.add(id(item))
            header = item.header
            # Only where the sender wants every answer: with MSH-15 ER or SU (enhanced mode) the
            # commit-time answer stands (none, or CA: committed), and the step answers only the
            # outcome the sender asked for.
            if header is None or item.ack is None or not Inspector._wants_ack(header, False):
                continue
            item.ack = self.inspector.builder.build(header, Outcome.ERROR, header.enhanced_mode, ErrorDetail(
                ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1),
                "received but not processed yet: send the message again later",
                PrescriptionError.PRESCRIPTION_NOT_PROCESSED))
        return waiting

    def _reply(self, reply: Callable[[Answer], None], job: IngestJob, answer: Answer) -> None:
        """Send the answer, then tell that each message was answered (and how fast)."""
        reply(answer)
        telemetry.answered(self.events, job, self.now())

    def _answered(self, tjob, translated: Callable[[], None], opened: list = ()) -> None:
        """Answer once translated (`translated()`, once the frame's copies are answered too):
        with the answers stored with the translations (the step's), or, when storing failed,
        with what the items hold (the provisional AE); then the copies sent meanwhile that wait
        for them (`opened`: the keys they may wait on)."""
        if tjob.error is None:
            for pending, record in zip(tjob.items, tjob.results):
                if record.ack is not None and pending.context is not None:
                    pending.context.ack = record.ack
        translated()
        answers = {p.key: p.context.ack for p in tjob.items if p.context is not None}
        for key in opened:
            self.translation.awaited.answered(key, answers.get(key))

    def _answer_after_originals(self, job: IngestJob, answer: Callable[[], None],
                                also: int = 0) -> Callable[[], None]:
        """Answer a frame at once, unless it holds copies of messages still waiting for the
        e-prescription step or for an `ack_after: translation` answer on this node
        (gateway.ingest.awaited): then once their originals are answered, each copy with its
        original's answer, as a duplicate gets the stored one. The answer also waits for
        `also` calls of the function returned."""
        awaited = self.translation.awaited if self.translation is not None else None
        # Any copy: under ack_after: translation the stored AA of a message still being
        # translated is not its answer yet either (awaited.wait says which are in flight).
        copies = [item for item in job.items if item.duplicate and item.ack is not None
                  ] if awaited is not None else []
        if not copies and not also:
            answer()
            return lambda: None
        lock, left = threading.Lock(), [len(copies) + also + 1]  # + 1 until every copy is registered

        def settle() -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                answer()

        def answered(item: Inbound, ack: bytes | None) -> None:
            if ack is not None:
                item.ack = ack
            settle()

        for item in copies:
            key = (item.sending_application, item.sending_facility, item.control_id)
            if not awaited.wait(key, functools.partial(answered, item)):
                settle()  # not in flight here: the stored ACK stands
        settle()
        return settle

    def _to_translate(self, job: IngestJob) -> list[Pending]:
        return pending_translations(job) if self.translation is not None else []

    def _translate(self, pending: list[Pending], done=None, on_failure=None) -> None:
        from gateway.translation.service import TranslationJob

        self.translation.submit(TranslationJob(pending, done, on_failure))

    def _failure_ack(self, pending: Pending, record: TranslationRecord) -> bytes | None:
        """The AE/CE answering a failed translation (in the worker thread, before the commit
        that stores it); None when MSH-15 wants no negative ACK."""
        from gateway.translation.translator import error_detail

        item: Inbound = pending.context
        header = item.header
        if header is None or not Inspector._wants_ack(header, False):
            item.ack = None
            return None
        item.ack = self.inspector.builder.build(header, Outcome.ERROR, header.enhanced_mode,
                                                error_detail(record))
        return item.ack

    def _not_stored(self, payload: bytes) -> bytes:
        view = FieldView.of(payload)
        detail = ErrorDetail(ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1),
                             "the message could not be stored; nothing was kept, send it again",
                             AppErrorCode.STORE_UNAVAILABLE)
        return self.inspector.builder.build(view, Outcome.ERROR, enhanced_mode(view), detail)


def is_provisional(ack: bytes) -> bool:
    """Whether `ack` is the provisional AE of a message still waiting for the e-prescription
    step (ERR-5 PRESCRIPTION_NOT_PROCESSED): a copy sent meanwhile gets it, and so does one a
    crash left stored but unprocessed."""
    if not ack.startswith(b"MSH") or len(ack) < 5:
        return False
    separator, component = ack[3:4], ack[4:5]
    code = PrescriptionError.PRESCRIPTION_NOT_PROCESSED.value.encode("ascii")
    for segment in ack.replace(b"\n", b"\r").split(b"\r"):
        fields = segment.split(separator)
        if fields[0] == b"ERR" and len(fields) > 5 and fields[5].split(component)[0] == code:
            return True
    return False


def pending_translations(job: IngestJob) -> list[Pending]:
    """The newly stored accepted messages of a committed job (not duplicates, not refusals)."""
    received_at = None
    pending = []
    for item in job.items:
        if item.deduplicated and not item.duplicate:
            received_at = received_at or datetime.fromtimestamp(job.received_at, timezone.utc)
            pending.append(Pending(item.message_id, (item.sending_application, item.sending_facility,
                                          item.control_id), item.raw, item.codec, item.format,
                                   item.sender_id, received_at, item.message_type, item))
    return pending

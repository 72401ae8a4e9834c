"""What the HTTPS door hands to ingest, and what it gets back.

- `submit_er7`: an HL7 v2 message through the door's frame handler (the same Inspector,
  writer and translation as MLLP), with a ConnectionInfo naming the certificate's facility,
  so that the same authorization applies (MSH-4 must be that facility, its type must allow
  the message type: else AR); answered with the handler's answer (ACK, or RRE^O12 for a
  prescription) and the stored message's id.
- `submit_document`: a FHIR Bundle or a SOAP report, stored as a message of its own format
  through the ingest writer (group commit, the same durability), then translated, the answer
  waiting for the translation so that its failure can be reported.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from sqlalchemy import select
from twisted.internet import defer

from adapters.hl7v2.ack import ack_code_of
from adapters.hl7v2.charsets import CharsetError, codec_for
from adapters.hl7v2.header import HeaderError, parse_header
from adapters.mllp.protocol import Answer, ConnectionInfo
from gateway.events import EventBus
from gateway.ingest import telemetry
from gateway.ingest.model import Inbound, MessageStatus
from gateway.ingest.pipeline import pending_translations
from gateway.store.ingest_writer import IngestJob, IngestWriter
from gateway.store.schema import messages
from gateway.store.texts import is_storable
from gateway.store.translations import StoredTranslation, TranslationRecord, get_translation


class KeyReused(Exception):
    """The document's control id (a FHIR Bundle's Idempotency-Key) is another stored
    document's: this one was stored as that refusal."""


class StoreUnavailable(Exception):
    """The message could not be stored (nothing was kept): the caller should send it again."""


@dataclass(frozen=True)
class Er7Outcome:
    stored: bool  # False: the store failed, nothing kept (the answer is an AE/CE saying so)
    answer: bytes | None  # the HL7 answer (ACK, RRE^O12...), None when none is due
    ack_code: str | None  # MSA-1 of the answer
    message_id: int | None
    codec: str  # to turn the answer into text


@dataclass(frozen=True)
class DocumentOutcome:
    message_id: int | None
    duplicate: bool  # the same document was stored before (same key, same bytes)
    status: str  # the message's status: received, translated, failed
    translation: TranslationRecord | StoredTranslation | None


class IngestBridge:
    def __init__(self, listener: str, frame_handler, writer: IngestWriter, database,
                 translation=None, now: Callable[[], float] = time.time,
                 events: EventBus | None = None):
        self.listener = listener
        self.events = events if events is not None else EventBus()
        self.frame_handler = frame_handler
        self.writer = writer
        self.database = database
        self.translation = translation
        self.now = now

    @defer.inlineCallbacks
    def submit_er7(self, payload: bytes, connection: ConnectionInfo):
        """Er7Outcome of one message (any answer the frame handler gives, passed through)."""
        started = self.now()
        answered: defer.Deferred = defer.Deferred()
        self.frame_handler.frame_received(payload, connection, answered.callback)
        answer: Answer = yield answered
        codec = _answer_codec(payload)
        code = ack_code_of(answer.response) if answer.response else None
        message_id = None
        if answer.stored:
            message_id = yield self.database.run(find_er7_message, payload, self.listener, started)
        return Er7Outcome(answer.stored, answer.response, code.value if code else None, message_id, codec)

    @defer.inlineCallbacks
    def submit_document(self, item: Inbound, peer: str):
        """Store `item` (an accepted document) and, when translation runs, wait for it."""
        job_done: defer.Deferred = defer.Deferred()
        job = IngestJob([item], self.listener, peer, self.now(),
                        lambda job, error: job_done.callback(error))
        self.writer.submit(job)
        error = yield job_done
        if error is not None:
            telemetry.not_stored(self.events, item.raw, item.size, self.listener, peer)
            raise StoreUnavailable(str(error))
        telemetry.stored(self.events, job)
        if item.status is MessageStatus.REJECTED:  # the writer found its key taken by other bytes
            raise KeyReused(item.control_id)
        key = (item.sending_application, item.sending_facility, item.control_id)
        if item.duplicate or self.translation is None:
            found = yield self.database.run(find_document, key)
            message_id, status, stored = found
            return DocumentOutcome(message_id, item.duplicate, status, stored)
        from gateway.translation.service import TranslationJob

        translated: defer.Deferred = defer.Deferred()
        self.translation.submit(TranslationJob(pending_translations(job), translated.callback,
                                               keep_bundles=True))
        tjob = yield translated
        pending, record = tjob.items[0], (tjob.results[0] if tjob.results else None)
        if tjob.error is not None or pending.message_id is None:
            # Stored, not translated now (the store failed meanwhile): the sweep will.
            found = yield self.database.run(find_document, key)
            return DocumentOutcome(found[0], False, found[1], None)
        return DocumentOutcome(pending.message_id, False, record.status, record)


def find_er7_message(connection, payload: bytes, listener: str, started: float) -> int | None:
    """The id of the row a message just submitted was stored as (or, re-sent, the original's):
    the accepted message under its (MSH-3, MSH-4, MSH-10) with the same bytes, else the
    refusal this listener stored for these bytes since `started`."""
    digest = hashlib.sha256(payload).digest()
    key = _stored_key(payload)
    if key is not None:
        row = connection.execute(select(messages.c.id, messages.c.sha256).where(
            messages.c.accepted, messages.c.sending_application == key[0],
            messages.c.sending_facility == key[1], messages.c.control_id == key[2])).first()
        if row is not None and bytes(row.sha256) == digest:
            return row.id
    since = datetime.fromtimestamp(started, timezone.utc) - timedelta(seconds=1)
    return connection.execute(select(messages.c.id).where(
        messages.c.received_at >= since, messages.c.listener == listener,
        messages.c.sha256 == digest).order_by(messages.c.id.desc()).limit(1)).scalar()


def find_document(connection, key: tuple[str, str, str]):
    """(id, status, stored translation or None) of an accepted document by its key."""
    row = connection.execute(select(messages.c.id, messages.c.status).where(
        messages.c.accepted, messages.c.sending_application == key[0],
        messages.c.sending_facility == key[1], messages.c.control_id == key[2])).first()
    if row is None:
        return None, "received", None
    return row.id, row.status, get_translation(connection, row.id)


def _stored_key(payload: bytes) -> tuple[str, str, str] | None:
    """(MSH-3, MSH-4, MSH-10) as the inspector stores them (decoded with MSH-18's codec)."""
    try:
        header = parse_header(payload)
        codec = codec_for(header.charset)
    except (HeaderError, CharsetError):
        return None
    fields = header.fields
    key = (fields[2].decode(codec, "replace"), fields[3].decode(codec, "replace"),
           fields[9].decode(codec, "replace"))
    # A NUL in MSH-10 (say): PostgreSQL refuses it even in a look-up, and the door answered
    # 500 for a message stored and refused AE. The inspector accepts no such header.
    return key if all(is_storable(text) for text in key) else None


def _answer_codec(payload: bytes) -> str:
    """How to read the answer as text: the ACK is written in the message's character set."""
    try:
        return codec_for(parse_header(payload).charset)
    except (HeaderError, CharsetError):
        return "iso8859-1"

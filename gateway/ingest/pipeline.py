"""Ingest: inspect a frame, store it with group commit, then answer. In that order: a positive
ACK leaves only after the raw bytes and their metadata are committed.

If the store fails, nothing was stored and the sender is told to send again (AE/CE, ERR-3
207, ERR-5 STORE_UNAVAILABLE); the frame is logged by size and hash, never by content.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

from adapters.hl7v2.ack import ErrorDetail
from adapters.hl7v2.codes import AppErrorCode, ErrorCondition, Outcome
from adapters.hl7v2.header import Location, enhanced_mode
from adapters.mllp.protocol import Answer, ConnectionInfo
from gateway.ingest.inspect import FieldView, FrameResult, Inspector
from gateway.store.ingest_writer import IngestJob, IngestWriter

log = logging.getLogger(__name__)


class IngestPipeline:
    """The frame handler of one listener (its own Inspector, the shared writer)."""

    def __init__(self, inspector: Inspector, writer: IngestWriter, now: Callable[[], float] = time.time):
        self.inspector = inspector
        self.writer = writer
        self.now = now

    def frame_received(self, payload: bytes, connection: ConnectionInfo,
                       reply: Callable[[Answer], None]) -> None:
        self._store(payload, self.inspector.frame(payload), connection, reply)

    def frame_too_large(self, prefix: bytes, size: int, limit: int, connection: ConnectionInfo,
                        reply: Callable[[Answer], None]) -> None:
        self._store(prefix, self.inspector.oversize(prefix, size, limit), connection, reply)

    def _store(self, payload: bytes, result: FrameResult, connection: ConnectionInfo,
               reply: Callable[[Answer], None]) -> None:
        builder = self.inspector.builder

        def done(_job: IngestJob, error: Exception | None) -> None:
            if error is None:
                reply(Answer(True, result.response(builder)))
            else:
                log.error("frame of %d bytes (sha256 %s) from %s not stored; answered AE/CE",
                          len(payload), hashlib.sha256(payload).hexdigest()[:16], connection.peer)
                reply(Answer(False, self._not_stored(payload)))

        self.writer.submit(IngestJob(result.items, connection.listener, connection.peer, self.now(), done))

    def _not_stored(self, payload: bytes) -> bytes:
        view = FieldView.of(payload)
        detail = ErrorDetail(ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1),
                             "the message could not be stored; nothing was kept, send it again",
                             AppErrorCode.STORE_UNAVAILABLE)
        return self.inspector.builder.build(view, Outcome.ERROR, enhanced_mode(view), detail)

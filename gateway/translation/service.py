"""Translation after ingest: a dedicated worker thread turns stored messages into canonical
FHIR bundles and stores them, off the ACK path unless a listener asks for `ack_after:
translation`.

    ingest commit --(accepted messages)--> queue --> worker: translate a batch, then one
    transaction: upsert translations rows, messages.status received -> translated | failed

- The live path hands over messages already in memory (no read), with the ids the ingest
  writer's insert gave them.
- A batch nobody waits for (no ACK depends on it) waits up to LINGER for company until it holds
  LINGER_BATCH messages: storing costs per batch (a transaction of a few statements), and a
  worker that keeps up would otherwise store every few messages on their own.
- The sweep reads messages still 'received' (a crash, a full queue, a database outage) and
  translates them (one whose payload retention removed first is stored as failed): at start,
  and whenever the live path lost something. Live jobs go first, between the sweep's batches,
  so that an ACK waiting for translation is not held behind a backlog; but while such a
  sweep is under way, a live job no ACK waits for is left to it (its
  messages are stored, the sweep takes them in id order): translated at once, it would go
  ahead of earlier messages of its patients still waiting for the sweep, and so would its
  deliveries, older data reaching the shared record after newer.
- Every STALE_AFTER seconds a worker with no live work waiting also looks for messages still
  'received' that long after their receipt: what a node that died left behind (on one
  PostgreSQL, another node takes them without waiting for it to come back), or a job lost
  without trace. It sweeps those, and only those: younger ones are in some node's hands.
- A message may be translated twice (two nodes on one PostgreSQL, a stale sweep and the live
  path, the start sweep and a live job): only the first to store it does, in a transaction
  that locks the message and finds it still 'received' (claim_messages). The other stores
  nothing of it: no step, no audit record, no event, no delivery; its caller gets what was
  stored (the first one's ACK and bundle; but a failure a sweep stored with the commit's AA
  gets the AE of ack_after: translation, see _take_stored). A replay translates and stores
  again whatever the status.
- Reload (SIGHUP, `gateway mappings reload`) reads the set in a thread and swaps it whole; a
  broken set is refused, every problem logged, the old set kept.

A `step` (gateway.prescriptions.flow.PrescriptionFlow) may run between translation and
storage: `prepare(results)` first, with no transaction open (it may ask a peer, bounded by its
own timeout), then `apply(connection, results, prepared, now)` inside the write transaction,
before the translations and their deliveries are saved: what it records commits with them or
not at all. It may change a record (its bundle, status, ACK, destinations).

The worker never touches the reactor: `deliver(function, *args)` (callFromThread) is given.
"""
from __future__ import annotations

import copy
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

import psycopg
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from twisted.application.service import Service

from adapters.hl7v2.ack import ack_code_of
from adapters.hl7v2.codes import ErrorCondition
from gateway.audit.recorder import audit_event
from gateway.audit.trail import AuditTrail
from gateway.config import GatewayConfig
from gateway.delivery.routes import Router
from gateway.events import Event, EventBus
from gateway.ingest.awaited import AwaitedAnswers
from gateway.ingest.model import MessageStatus
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.source import MappingErrors
from gateway.store.database import availability, shared_clock, value_refused, write_transaction
from gateway.store.translations import (Pending, TranslationRecord, claim_messages,
                                        oldest_untranslated, pending_messages, replace_ack,
                                        save_translations, stored_outcome)
from gateway.translation.translator import Translator

log = logging.getLogger(__name__)

_STOP = object()
IDLE_CHECK = 5.0  # seconds: how often an idle worker retries a sweep the live path asked for
STALE_AFTER = 60.0  # seconds: a message still 'received' this long after its receipt is swept
# A live batch that no ACK waits for is stored once it holds LINGER_BATCH messages or has
# waited LINGER seconds for them. Measured in-process on PostgreSQL (ORU^R01): stored 16 at a
# time, 0.28 ms of the gateway's CPU and 0.18 ms of PostgreSQL's per message; 64 at a time,
# 0.19 and 0.12 ms. In bench-deliver the worker had been storing 18 at a time.
LINGER = 0.05
LINGER_BATCH = 64


class TranslationStep(Protocol):
    """Work on translated messages before they are stored (see the module docstring)."""

    def waits_for(self, message_type: str | None, raw: bytes = b"", sender_id: str | None = None) -> bool:
        """Whether this message is answered only after the step has run. Asked by ingest for
        every message before its commit: must be cheap (the type, a byte search in `raw`,
        the sender), never a parse."""

    def involves(self, pending: Pending, record: TranslationRecord) -> bool:
        """Whether the step works on this translation (its bundle then stays a dict until
        stored; any other is sealed at once, see TranslationRecord.seal)."""

    def prepare(self, results: list[tuple[Pending, TranslationRecord]]) -> Any: ...

    def apply(self, connection, results: list[tuple[Pending, TranslationRecord]], prepared: Any,
              now: datetime) -> None: ...


@dataclass(slots=True)
class TranslationJob:
    """Messages to translate together; `done(job)` runs on the reactor thread once they are
    stored (or, with `error` set, could not be)."""

    items: list[Pending]
    done: Callable[["TranslationJob"], None] | None = None
    # Called in the worker for each failed translation, before the commit: a new ACK to
    # store with it (ack_after: translation), or None to keep the stored one.
    on_failure: Callable[[Pending, TranslationRecord], bytes | None] | None = None
    # Whether `done` reads the bundles (a door answers with them): else they are sealed.
    keep_bundles: bool = False
    results: list[TranslationRecord] = field(default_factory=list)
    error: Exception | None = None


class TranslationWorker:
    def __init__(self, engine: Engine, translator: Translator, deliver: Callable,
                 max_batch: int = 256, max_queued: int = 10_000,
                 on_enqueued: Callable[[], None] | None = None, step: TranslationStep | None = None,
                 events: EventBus | None = None, linger: float = LINGER, linger_batch: int = LINGER_BATCH,
                 stale_after: float = STALE_AFTER, audit: AuditTrail | None = None):
        self.engine = engine
        self.availability = availability(engine)  # an outage is logged once, there
        self.audit = audit  # the translations' records go to it in the transaction storing them
        self.stale_after = stale_after
        self._stale_check_at = time.monotonic() + stale_after
        self._sweep_before: datetime | None = None  # a sweep of stale messages only: their cutoff
        self._after_id = 0  # where the sweep under way has got to (the worker thread's)
        self.linger = linger
        self.linger_batch = linger_batch
        self.events = events if events is not None else EventBus()
        self.step = step
        self.on_enqueued = on_enqueued  # called (through `deliver`) when deliveries were queued
        self.translator = translator
        self.deliver = deliver
        self.max_batch = max_batch
        self.max_queued = max_queued  # jobs nobody waits for; beyond, left to the sweep
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._sweep = threading.Event()
        self.translated = 0
        self.failed = 0
        self.commits = 0
        self._refused = value_refused(engine)

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, sweep: bool = True) -> None:
        if sweep:
            self._sweep.set()
        self._thread = threading.Thread(target=self._run, name="translation-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Translate and store what is queued, then stop (a sweep in progress is left, with
        the jobs left to it: their messages wait, stored, for the next sweep)."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: TranslationJob) -> None:
        """Queue a job (any thread). A job nobody waits for is dropped when the queue is full:
        its messages stay 'received' and the sweep takes them."""
        if self._thread is None:
            self.request_sweep()
            if job.done is not None:
                job.error = RuntimeError("translation is stopped")
                self.deliver(job.done, job)
            return
        if job.done is None and self._queue.qsize() >= self.max_queued:
            self.request_sweep()
            return
        self._queue.put(job)

    def translate_now(self, items: list[Pending]) -> TranslationJob:
        """Translate and store `items` in the calling thread as the worker would (the step, the
        audit records, a value the database refuses kept to its own message): a replay. The
        job's results and error tell how it went."""
        job = TranslationJob(items)
        self._process([job], replay=True)
        return job

    def request_sweep(self) -> None:
        self._sweep_before = None  # everything 'received', whatever a stale sweep was doing
        self._sweep.set()

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        self._after_id = 0
        while True:
            if time.monotonic() >= self._stale_check_at:
                self._check_stale()
            sweeping = self._sweep.is_set()
            try:
                job = self._queue.get_nowait() if sweeping else self._queue.get(timeout=IDLE_CHECK)
            except queue.Empty:
                job = None
            if job is _STOP:
                break
            if job is not None:
                if self._left_to_sweep(job):
                    continue
                jobs, stop = self._gather(job)
                self._process([queued for queued in jobs if not self._left_to_sweep(queued)])
                if stop:
                    break
                continue
            if sweeping:
                # Cleared before the read, so that a sweep asked for during it is not lost.
                self._sweep.clear()
                last = self._sweep_batch(self._after_id)
                if last is None:
                    self._after_id = 0
                    self._sweep_before = None
                else:
                    self._after_id = last
                    self._sweep.set()

    def _left_to_sweep(self, job: TranslationJob) -> bool:
        """Whether `job` is left to the sweep of everything 'received' under way (see the
        module docstring): nobody waits for it, and the sweep is not one of stale messages
        only. The sweep is taken back to before its messages, should it be past them."""
        if job.done is not None or not self._sweep.is_set() or self._sweep_before is not None:
            return False
        ids = [item.message_id for item in job.items]
        first = min(ids) - 1 if ids and None not in ids else 0
        self._after_id = min(self._after_id, max(first, 0))
        return True

    def _gather(self, job: TranslationJob) -> tuple[list[TranslationJob], bool]:
        """The jobs to process together: what is queued, and, while the batch is small and no
        ACK waits for it, what arrives within LINGER."""
        jobs, count = [job], len(job.items)
        awaited = job.done is not None
        deadline = None
        while count < self.max_batch:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                if awaited or count >= self.linger_batch or self.linger <= 0:
                    break
                now = time.monotonic()
                deadline = deadline or now + self.linger
                try:
                    more = self._queue.get(timeout=deadline - now) if deadline > now else None
                except queue.Empty:
                    more = None
                if more is None:
                    break
            if more is _STOP:
                return jobs, True
            jobs.append(more)
            count += len(more.items)
            awaited = awaited or more.done is not None
        return jobs, False

    def _process(self, jobs: list[TranslationJob], replay: bool = False) -> None:
        results = []
        for job in jobs:
            job.results = [self._translate(item, keep=job.keep_bundles) for item in job.items]
            for item, record in zip(job.items, job.results):
                if record.failed and job.on_failure is not None:
                    record.ack = job.on_failure(item, record)
                results.append((item, record))
        try:
            self._store(results, replay)
        except Exception as error:  # the database is down: the sweep retries later
            self._log_failure(error, "storing %d translations failed: %s", len(results), error)
            self.request_sweep()
            for job in jobs:
                job.error = error
        for job in jobs:
            if job.done is not None:
                self.deliver(job.done, job)

    def _check_stale(self) -> None:
        """Sweep the messages still 'received' STALE_AFTER seconds after their receipt, if
        there are any (the oldest one tells, read from the partial index)."""
        self._stale_check_at = time.monotonic() + self.stale_after
        if self._sweep.is_set():
            return  # a sweep is under way: it takes them
        if not self._queue.empty():
            # Live work waiting: this node is behind, and what is old may be in its own queue
            # (translating it twice would put it further behind). Looked at again once idle.
            return
        try:
            with self.engine.connect() as connection:
                oldest = oldest_untranslated(connection)
        except Exception as error:
            self._log_failure(error, "looking for messages left untranslated failed: %s", error)
            return
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.stale_after)
        if oldest is not None and oldest < cutoff:
            log.warning("messages received since %s are still untranslated (a node stopped?): "
                        "sweeping those received before %s", oldest.isoformat(), cutoff.isoformat())
            self._sweep_before = cutoff
            self._sweep.set()

    def _sweep_batch(self, after_id: int) -> int | None:
        """Translate the next batch of 'received' messages; the id to go on after (`after_id`
        again when it failed: it is retried), or None when there are no more."""
        try:
            with self.engine.connect() as connection:
                batch = pending_messages(connection, after_id, self.max_batch,
                                         received_before=self._sweep_before)
            if not batch:
                return None
            self._store([(item, self._translate(item)) for item in batch])
            log.info("sweep: translated %d stored messages (ids %d to %d)", len(batch),
                     batch[0].message_id, batch[-1].message_id)
            return batch[-1].message_id
        except Exception as error:
            self._log_failure(error, "sweep of untranslated messages failed: %s; retrying in %.0f s",
                              error, IDLE_CHECK)
            self._queue_wait(IDLE_CHECK)
            return after_id

    def _log_failure(self, error: Exception, text: str, *args) -> None:
        """A failure of the database, at error level unless an outage it belongs to was told."""
        log.log(logging.DEBUG if self.availability.failed(error) else logging.ERROR, text, *args)

    def _queue_wait(self, seconds: float) -> None:
        """Sleep, but wake for a live job (put back for the main loop)."""
        try:
            job = self._queue.get(timeout=seconds)
        except queue.Empty:
            return
        self._queue.put(job)

    def _translate(self, item: Pending, keep: bool = False) -> TranslationRecord:
        """Translate one message; its bundle sealed unless `keep` or the step works on it."""
        record = self.translator.translate(item)
        if record.failed:
            self.failed += 1
            log.info("message %s (%s) not translated: %s at %s", _name(item), item.message_type,
                     _condition_text(record), record.error_location or "-")
            return record
        self.translated += 1
        if not keep and (self.step is None or not self.step.involves(item, record)):
            record.seal()
        return record

    def _store(self, results: list[tuple[Pending, TranslationRecord]], replay: bool = False) -> None:
        """Store a batch in one transaction (see _store_batch; `replay`: whatever the status).
        When the database refuses a value of it (a DataError), or the step fails on one of its
        messages with an error that is not the database's (a fault of ours: an exception the
        prescription flow did not expect), each translation is stored on its own, and one
        still refused is stored as failed: otherwise its batch, and each sweep after it, would
        fail again forever, holding back every message received after it."""
        before = _before_step(results, self.step)
        try:
            self._store_batch(results, replay)
            self.availability.answered()
            return
        except self._refused as error:
            refused = error
        except Exception as error:
            if isinstance(error, _DATABASE_ERRORS):
                raise  # the database is away: the batch is retried once it is back
            refused = error
        # The step changed its records in the transaction that was rolled back (a prescription
        # id, its ACK): each goes again as it was translated, or it would keep what never was.
        for record, saved in before:
            _restore(record, saved)
        database = isinstance(refused, self._refused)
        if len(results) > 1:
            log.error("storing %d translations: %s (%s); storing them one by one", len(results),
                      "the database refused a value" if database else "internal error",
                      type(refused).__name__)
            for result in results:
                self._store([result], replay)
            return
        pending, record = results[0]
        log.error("translation of message %s %s (%s): stored as failed", _name(pending),
                  "refused by the database" if database else "could not be stored: internal error",
                  type(refused).__name__, exc_info=not database and log.isEnabledFor(logging.DEBUG))
        _unstorable(record, refused, database)
        self._store_batch(results, replay)

    def _store_batch(self, results: list[tuple[Pending, TranslationRecord]], replay: bool = False) -> None:
        """Store the translations of the messages still waiting for one (`replay`: of every
        translatable one); the others, stored meanwhile by another node or path, get the
        stored outcome instead and have no effect (see the module docstring)."""
        if not results:
            return
        prepared = self.step.prepare(_for_step(results)) if self.step is not None else None
        now = datetime.now(timezone.utc)
        with write_transaction(self.engine) as connection:
            mine = claim_messages(connection, [item for item, _ in results], waiting_only=not replay)
            if len(mine) < len(results):
                for item, record in results:
                    if item.message_id is not None and item.message_id not in mine:
                        _take_stored(connection, item, record)
                results = [(item, record) for item, record in results if item.message_id in mine]
            if self.step is not None:
                self.step.apply(connection, _for_step(results), prepared, now)
            save_translations(connection, results, now, again=replay, due=shared_clock(connection))
            events = [_translation_event(item, record, self.audit is not None)
                      for item, record in results]
            if self.audit is not None:
                # Committed with the translations: none is stored without its record.
                self.audit.append_in(connection, [audit_event(event, now) for event in events])
        self.commits += 1
        for event in events:
            self.events.emit(event)
        if self.on_enqueued is not None and any(record.destinations for _, record in results):
            self.deliver(self.on_enqueued)


def _take_stored(connection, item: Pending, record: TranslationRecord) -> None:
    """Make `record` what is stored for `item` (translated and stored by another node or path
    first): its caller answers with the stored ACK and bundle, and nothing more is done.
    Except one thing: a sweep stores a failure with the ACK of the commit, so the AE/CE its
    caller made of the same failure (ack_after: translation) replaces a positive one, which
    would otherwise accept what failed, for this answer and every re-sent copy."""
    own = record.ack  # an ACK the caller made of its own failed translation (on_failure)
    stored, ack = stored_outcome(connection, item.message_id)
    log.info("message %s was translated meanwhile by another node or path: its stored "
             "translation stands", _name(item))
    record.ack = ack
    record.destinations = ()
    if stored is None:  # not translatable any more (expired, refused): nothing to answer with
        return
    code = ack_code_of(ack) if ack is not None else None
    if own is not None and stored.status == MessageStatus.FAILED.value and code is not None and code.positive:
        replace_ack(connection, item.message_id, own)
        record.ack = own
    record.status, record.mapping_version = stored.status, stored.mapping_version
    record.error_code, record.error_location = stored.error_code, stored.error_location
    record.error_reason, record.warnings = stored.error_reason, list(stored.warnings)
    record.bundle, record.encoded = stored.bundle, None
    record.entries = len((stored.bundle or {}).get("entry") or ())
    record.identifiers = ()


def _before_step(results: list[tuple[Pending, TranslationRecord]],
                 step: TranslationStep | None) -> list[tuple[TranslationRecord, TranslationRecord]]:
    """A copy of each record the step works on, as it is before the step changes it."""
    if step is None:
        return []
    return [(record, _copied(record)) for pending, record in _for_step(results)
            if step.involves(pending, record)]


def _for_step(results: list[tuple[Pending, TranslationRecord]]) -> list[tuple[Pending, TranslationRecord]]:
    """What the step may work on: it reads the bytes, which a message whose payload expired
    (retention) before its translation no longer has."""
    return [(pending, record) for pending, record in results if pending.raw is not None]


def _copied(record: TranslationRecord) -> TranslationRecord:
    saved = copy.copy(record)
    saved.bundle = copy.deepcopy(record.bundle)
    saved.warnings = list(record.warnings)
    return saved


def _restore(record: TranslationRecord, saved: TranslationRecord) -> None:
    for name in TranslationRecord.__slots__:
        setattr(record, name, getattr(saved, name))


def _unstorable(record: TranslationRecord, error: Exception, database: bool = True) -> None:
    """Turn a translation the database refused (or one the step failed on: `database` False)
    into a failure that can be stored, and replayed once the mapping, the input or the
    gateway is fixed."""
    record.status = MessageStatus.FAILED.value
    record.bundle = record.encoded = None
    record.identifiers = record.destinations = ()
    record.patient_key = None
    record.error_code = int(ErrorCondition.APPLICATION_INTERNAL_ERROR)
    record.error_location = None
    record.error_reason = (
        f"the translation could not be stored ({type(error).__name__}: a value the database "
        "refuses); fix the mapping or the input, then replay" if database else
        f"the translation could not be stored: internal error in the gateway ({type(error).__name__}); "
        "report it, then replay once the gateway is fixed")


# What the database (or its driver) raises: an outage or a refusal, never a fault of ours.
_DATABASE_ERRORS = (SQLAlchemyError, sqlite3.Error, psycopg.Error)


def _name(item: Pending) -> str:
    """How a message is named in logs: its id and control id (never content)."""
    control = f"control id {item.key[2]!r}" if item.key else None
    if item.message_id is not None:
        return f"#{item.message_id} ({control})" if control else f"#{item.message_id}"
    return control or "?"


def _translation_event(item: Pending, record: TranslationRecord, recorded: bool = False) -> Event:
    """message.translated or message.translation_failed: ids, codes and counts only
    (`recorded`: its audit record is stored with the translation)."""
    actor = item.sender_id or (item.key[1] if item.key else None) or "unknown"
    subject = f"message/{item.message_id}" if item.message_id is not None else None
    common = dict(subject=subject, facility=item.sender_id, message_type=item.message_type,
                  recorded=recorded)
    control_id = item.key[2] if item.key else None
    if record.failed:
        return Event("message.translation_failed", actor, outcome="failure", **common,
                     detail={"control_id": control_id, "error_code": record.error_code,
                             "error_location": record.error_location,
                             "mapping_version": record.mapping_version})
    return Event("message.translated", actor, **common,
                 detail={"control_id": control_id, "mapping_version": record.mapping_version,
                         "resources": record.resources, "destinations": list(record.destinations)})


def _condition_text(record: TranslationRecord) -> str:
    return f"error {record.error_code}"


class TranslationService(Service):
    """The mapping set, the translator and its worker; started after the store, before the
    listeners, so that the first message has a translator."""

    name = "translation"

    def __init__(self, config: GatewayConfig, engine: Engine, reactor, max_batch: int = 256,
                 on_enqueued: Callable[[], None] | None = None, step: TranslationStep | None = None,
                 events: EventBus | None = None, audit: AuditTrail | None = None):
        self.config = config
        self.audit = audit
        self.events = events if events is not None else EventBus()
        self.step = step
        self.on_enqueued = on_enqueued
        self.engine = engine
        self.reactor = reactor
        self.directory = Path(config.resolve(config.mappings.directory))
        self._reloads = 0  # reloads begun: only the latest may replace the set
        self.max_batch = max_batch
        self.translator: Translator | None = None
        self.worker: TranslationWorker | None = None
        self.awaited = AwaitedAnswers()  # answers the listeners' copies of a message wait for

    @property
    def mappings(self) -> MappingSet | None:
        return self.translator.mappings if self.translator else None

    def startService(self) -> None:
        # A broken set stops the start (MappingErrors lists every problem).
        mappings = MappingSet.load(self.directory)
        log.info("mapping set %s loaded from %s (%d files)", mappings.version, self.directory,
                 mappings.files)
        router = Router(self.config.routes, self.config.senders) if self.config.routes else None
        self.translator = Translator(mappings, self.config.senders, router)
        self.worker = TranslationWorker(self.engine, self.translator, self.reactor.callFromThread,
                                        self.max_batch, on_enqueued=self.on_enqueued, step=self.step,
                                        events=self.events, audit=self.audit)
        self.worker.start(sweep=True)
        super().startService()

    def stopService(self):
        super().stopService()
        if self.worker is not None:
            self.worker.stop()

    def submit(self, job: TranslationJob) -> None:
        self.worker.submit(job)

    def answers_after_translation(self, message_type: str | None, raw: bytes = b"",
                                  sender_id: str | None = None) -> bool:
        """Whether a message must be answered once translated (its answer depends on the
        step: a prescription id, a dispensation's or an act's refusal). Ordinary traffic
        (results naming no prescription, ADT...) is answered at commit."""
        return self.step is not None and self.step.waits_for(message_type, raw, sender_id)

    def reload(self):
        """Read the mapping set again (in a thread) and use it if valid; a Deferred firing
        with True when it was replaced, False when refused, or when a later reload began
        before this one was read (two signals a second apart: the later read decides, though
        the earlier may finish last)."""
        from twisted.internet.threads import deferToThreadPool

        self._reloads += 1
        this = self._reloads
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), MappingSet.load, self.directory)

        def loaded(mappings: MappingSet) -> bool:
            if this != self._reloads:
                log.info("mapping set %s read by an earlier reload: a later one decides", mappings.version)
                return False
            old = self.translator.mappings
            self.translator.mappings = mappings
            log.info("mapping set reloaded: %s -> %s (%d files)", old.version, mappings.version,
                     mappings.files)
            return True

        def refused(failure) -> bool:
            error = failure.value
            problems = getattr(error, "problems", None)
            if isinstance(error, MappingErrors) and problems:
                log.error("mapping set in %s refused (%d problems); keeping %s", self.directory,
                          len(problems), self.translator.mappings.version)
                for problem in problems:
                    log.error("  %s", problem)
            else:
                log.error("mapping set in %s refused: %s; keeping %s", self.directory, error,
                          self.translator.mappings.version)
            return False

        d.addCallbacks(loaded, refused)
        return d

"""AMO eligibility for the dispensing flow: VerifierDroits at the CNSS destination, asked from
the translation worker's thread, answered on the reactor.

`EligibilityChecker.check_many(queries)` runs in the worker, outside any transaction (no
network call while a database transaction is open): it hands every query of a batch to the
reactor at once (the CNSS requests run concurrently over the gateway's mutual-TLS transport),
then waits at most `timeout` + a margin. It never waits on a blocked reactor for ever: if the
reactor does not run the call in time (the gateway is stopping, the reactor is busy joining the
worker), the queries are answered "unavailable" instead of deadlocking.

An answer that contradicts itself or the question (rights open with a closed motive, another
day, another insured) is no answer: the dispensation is refused, ELIGIBILITY_UNAVAILABLE.

Positive answers are kept for `cache_seconds` (a pharmacy dispensing twice to the same patient
in a morning asks once); closed rights are not kept, so a renewal is seen at once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from twisted.internet import defer

from gateway.delivery.care_sheet import (Eligibility, EligibilityUnavailable, eligibility_request,
                                         read_eligibility)

log = logging.getLogger(__name__)

MARGIN = 2.0  # seconds beyond the request timeout before the worker stops waiting


@dataclass(frozen=True)
class EligibilityQuery:
    kind: str  # immatriculation | cnie
    value: str
    on: date


@dataclass(frozen=True)
class EligibilityAnswer:
    query: EligibilityQuery
    eligibility: Eligibility | None  # None: no answer
    problem: str | None = None  # why there is no answer (short, no patient data)
    # The question itself is not one the contract takes (a number CNSS does not issue): asking
    # again will not help, the message must be corrected.
    unaskable: bool = False

    @property
    def covered(self) -> bool:
        return self.eligibility is not None and self.eligibility.rights_open


OPEN = "DROITS_OUVERTS"


def contradiction(query: EligibilityQuery, eligibility: Eligibility) -> str | None:
    """Why an answer cannot be trusted to bill on, or None: it is about another day, or another
    insured than the one asked (who may be a dependant of the insured named), or says rights
    are open with a motive that says they are not (or the reverse). Never patient data."""
    if eligibility.on != query.on:
        return "CNSS answered about another day than the one asked"
    if eligibility.rights_open != (eligibility.motive == OPEN):
        return f"CNSS answered droitsOuverts {str(eligibility.rights_open).lower()} with motif {eligibility.motive}"
    asked = _same(query.value)
    if query.kind == "immatriculation" and eligibility.immatriculation is not None:
        named = {_same(eligibility.immatriculation)}
    elif query.kind == "cnie" and eligibility.cnie is not None:
        named = {_same(eligibility.cnie)} | {_same(d.cnie) for d in eligibility.dependants if d.cnie}
    else:
        return None  # the answer names nobody (ASSURE_INCONNU), or not by what was asked
    return None if asked in named else "CNSS answered about another insured than the one asked"


def _same(value: str) -> str:
    return "".join(value.split()).upper()


class EligibilityChecker:
    def __init__(self, reactor, url: str, transport_factory: Callable[[], object], timeout: float,
                 cache_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.reactor = reactor
        self.url = url
        self.transport_factory = transport_factory  # called on the reactor thread, once
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.clock = clock
        self._transport = None
        self._cache: dict[EligibilityQuery, tuple[float, EligibilityAnswer]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._in_flight: set[defer.Deferred] = set()
        self.requests = 0  # sent to CNSS (for tests and metrics)

    # -- the worker's side -----------------------------------------------------------------

    def check_many(self, queries: list[EligibilityQuery]) -> dict[EligibilityQuery, EligibilityAnswer]:
        """Answers for `queries` (worker thread; blocks at most timeout + MARGIN)."""
        answers: dict[EligibilityQuery, EligibilityAnswer] = {}
        missing = []
        now = self.clock()
        with self._lock:
            for query in dict.fromkeys(queries):
                cached = self._cache.get(query)
                if cached is not None and cached[0] > now:
                    answers[query] = cached[1]
                else:
                    missing.append(query)
        if not missing:
            return answers
        if self._stopping.is_set():
            return {**answers, **{q: EligibilityAnswer(q, None, "the gateway is stopping") for q in missing}}
        results: queue.SimpleQueue = queue.SimpleQueue()
        self.reactor.callFromThread(self._start, missing, results)
        try:
            fetched = results.get(timeout=self.timeout + MARGIN)
        except queue.Empty:
            fetched = {q: EligibilityAnswer(q, None, f"no answer within {self.timeout:g} s") for q in missing}
        expires = self.clock() + self.cache_seconds
        with self._lock:
            for query, answer in fetched.items():
                if answer.covered:
                    self._cache[query] = (expires, answer)
            if len(self._cache) > 10_000:
                self._cache.clear()
        return {**answers, **fetched}

    # -- the reactor's side ----------------------------------------------------------------

    def _start(self, queries: list[EligibilityQuery], results: queue.SimpleQueue) -> None:
        if self._stopping.is_set():
            results.put({q: EligibilityAnswer(q, None, "the gateway is stopping") for q in queries})
            return
        if self._transport is None:
            self._transport = self.transport_factory()
        calls = [self._one(query) for query in queries]
        d = defer.gatherResults(calls)
        d.addCallback(lambda answers: results.put({a.query: a for a in answers}))
        d.addErrback(lambda failure: results.put(
            {q: EligibilityAnswer(q, None, f"internal error: {failure.getErrorMessage()}") for q in queries}))

    def _one(self, query: EligibilityQuery) -> defer.Deferred:
        try:
            request = eligibility_request(url=self.url, on=query.on, **{query.kind: query.value})
        except Exception as error:  # a value the contract refuses (CareSheetError): not coverable
            return defer.succeed(EligibilityAnswer(query, None, f"cannot ask CNSS: {error}", unaskable=True))
        self.requests += 1
        d = self._transport.request(request)
        self._in_flight.add(d)

        def answered(response) -> EligibilityAnswer:
            try:
                eligibility = read_eligibility(response)
            except EligibilityUnavailable as error:
                return EligibilityAnswer(query, None, error.outcome.reason)
            problem = contradiction(query, eligibility)
            if problem is not None:
                return EligibilityAnswer(query, None, problem)
            return EligibilityAnswer(query, eligibility)

        def failed(failure) -> EligibilityAnswer:
            return EligibilityAnswer(query, None, failure.getErrorMessage()[:200])

        d.addCallbacks(answered, failed)
        d.addBoth(self._settled, d)
        return d

    def _settled(self, result, d):
        self._in_flight.discard(d)
        return result

    @defer.inlineCallbacks
    def close(self):
        """Stop asking (later queries are answered 'unavailable'), let requests in flight end,
        close the transport. On the reactor thread."""
        self._stopping.set()
        if self._in_flight:
            yield defer.DeferredList(list(self._in_flight))
        if self._transport is not None:
            yield self._transport.close()
            self._transport = None

"""AMO eligibility for dispensations, asked from a worker thread of the sandbox CNSS peer over
mutual TLS: open, closed and unknown rights in one batch, answers kept only when open, a slow
or failing peer answered 'unavailable' within the timeout, nothing asked once stopping."""
from __future__ import annotations

import os
import time
from datetime import date

import pytest_twisted
from twisted.internet import reactor, threads

from gateway.delivery.transport import HttpsTransport
from gateway.prescriptions.eligibility import EligibilityChecker, EligibilityQuery

DAY = date(2026, 1, 16)


def checker(peers, dev_pki, timeout=10.0) -> EligibilityChecker:  # TLS on a busy machine
    def transport():
        return HttpsTransport(reactor, os.path.join(dev_pki, "ca.crt"), os.path.join(dev_pki, "gateway.crt"),
                              os.path.join(dev_pki, "gateway.key"), connect_timeout=timeout,
                              response_timeout=timeout)

    return EligibilityChecker(reactor, peers.url("cnss") + "/", transport, timeout)


@pytest_twisted.inlineCallbacks
def test_rights_open_closed_and_unknown_in_one_batch(peers, dev_pki):
    made = checker(peers, dev_pki)
    try:
        queries = [EligibilityQuery("immatriculation", "112233445", DAY),   # open (seed)
                   EligibilityQuery("immatriculation", "445566778", DAY),   # closed since 2025-06-30
                   EligibilityQuery("cnie", "ZZ999999", DAY)]               # unknown
        answers = yield threads.deferToThread(made.check_many, queries)
        assert [(answers[q].covered, answers[q].eligibility.motive) for q in queries] == [
            (True, "DROITS_OUVERTS"), (False, "DROITS_FERMES"), (False, "ASSURE_INCONNU")]
        assert made.requests == 3
        again = yield threads.deferToThread(made.check_many, queries)
        assert made.requests == 5  # the open answer came from the cache; the others were asked again
        assert again[queries[0]] == answers[queries[0]]
    finally:
        yield made.close()


@pytest_twisted.inlineCallbacks
def test_slow_or_failing_peer_is_unavailable_within_the_timeout(peers, dev_pki):
    made = checker(peers, dev_pki, timeout=0.5)
    query = EligibilityQuery("immatriculation", "112233445", DAY)
    try:
        yield peers.faults("cnss", "slow", delay=3)
        started = time.monotonic()
        answers = yield threads.deferToThread(made.check_many, [query])
        assert answers[query].eligibility is None and answers[query].problem
        assert time.monotonic() - started < 2.5
        yield peers.faults("cnss", "soap_fault")
        answers = yield threads.deferToThread(made.check_many, [query])
        assert answers[query].eligibility is None and "Server fault" in answers[query].problem
    finally:
        yield peers.faults("cnss", "none")
        yield made.close()


@pytest_twisted.inlineCallbacks
def test_nothing_is_asked_once_stopping(peers, dev_pki):
    made = checker(peers, dev_pki)
    yield made.close()
    query = EligibilityQuery("immatriculation", "112233445", DAY)
    answers = yield threads.deferToThread(made.check_many, [query])
    assert answers[query].problem == "the gateway is stopping" and made.requests == 0


def test_a_blocked_reactor_is_not_waited_on_for_ever():
    """When the reactor never runs the call (it is blocked joining the worker), the worker gets
    'unavailable' after timeout + margin instead of a deadlock."""
    class Stuck:
        def callFromThread(self, *args):
            pass  # never run

    made = EligibilityChecker(Stuck(), "https://127.0.0.1:1/", lambda: None, timeout=0.1)
    import gateway.prescriptions.eligibility as module

    margin, module.MARGIN = module.MARGIN, 0.1
    try:
        query = EligibilityQuery("cnie", "BE123456", DAY)
        started = time.monotonic()
        answers = made.check_many([query])
        assert answers[query].eligibility is None and "no answer within" in answers[query].problem
        assert time.monotonic() - started < 1
    finally:
        module.MARGIN = margin

"""The messages of this process whose answer waits for the e-prescription step, by key
(MSH-3, MSH-4, MSH-10). A sender that timed out, or lost its connection, and sent the same
message again while the first was still being processed got the provisional AE ("not processed
yet; send again later"), which prescribers' software may show as a failure of a prescription
that was in fact issued. The copy is now answered with the first's answer once it is known:
the stored ACK, byte for byte, as for any duplicate. A copy whose first is not in flight here
(another node's, or one a crash left for the sweep) still gets the provisional AE at once.

Thread-safe: the ingest writer's and the translation worker's callbacks reach it on the
reactor thread in the gateway, on their own threads in some tests.
"""
from __future__ import annotations

import threading
from typing import Callable

Key = tuple[str, str, str]


class AwaitedAnswers:
    def __init__(self):
        self._lock = threading.Lock()
        self._waiters: dict[Key, list[Callable[[bytes | None], None]]] = {}

    def opened(self, key: Key) -> None:
        """The message under `key` waits for the step: copies may wait for its answer."""
        with self._lock:
            self._waiters.setdefault(key, [])

    def wait(self, key: Key, then: Callable[[bytes | None], None]) -> bool:
        """Call `then(answer)` when the message under `key` is answered; False (and `then`
        never called) when it is not waiting here."""
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is None:
                return False
            waiters.append(then)
            return True

    def answered(self, key: Key, answer: bytes | None) -> None:
        with self._lock:
            waiters = self._waiters.pop(key, ())
        for then in waiters:
            then(answer)

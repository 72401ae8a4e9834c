"""Login throttling: after `attempts` failed logins for one account name from one address,
every login for that pair is refused for `pause` seconds, whatever the password. Kept in
memory (per node; a restart forgets it); bounded in size so that a flood of invented names
cannot grow it without limit. Pure code: the clock is given."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Record:
    failures: int = 0
    paused_until: float = 0.0


class LoginThrottle:
    def __init__(self, attempts: int, pause: float, max_entries: int = 10_000):
        self.attempts = attempts
        self.pause = pause
        self.max_entries = max_entries
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def paused(self, account: str, address: str, now: float) -> bool:
        """Whether logins of this pair are refused now."""
        record = self._records.get((account, address))
        if record is None:
            return False
        if record.paused_until and now >= record.paused_until:
            del self._records[(account, address)]  # the pause is over: a fresh count
            return False
        return record.paused_until > now

    def attempt(self, account: str, address: str, now: float) -> bool:
        """Whether a login of this pair may be checked now. One let through counts as failed
        until `succeeded` clears it: concurrent guesses would otherwise all pass `paused`
        while the first ones are still being checked (scrypt takes a tenth of a second)."""
        if self.paused(account, address, now):
            return False
        self.failed(account, address, now)
        return True

    def failed(self, account: str, address: str, now: float) -> None:
        key = (account, address)
        record = self._records.pop(key, None) or _Record()
        record.failures += 1
        if record.failures >= self.attempts:
            record.paused_until = now + self.pause
        self._records[key] = record  # most recent last
        while len(self._records) > self.max_entries:
            self._records.popitem(last=False)

    def succeeded(self, account: str, address: str) -> None:
        self._records.pop((account, address), None)

"""A deadline on each HTTP request: whole within `read_timeout` seconds of its first byte.

The idle timeout alone does not bound a request: a client that trickles a byte of its head
every few seconds resets it forever, and a few hundred such clients hold every connection a
listener can take. Mixed into an `http.HTTPChannel` (before it), whose site's reactor runs
the deadline (`callLater`, as the channel's own timeouts do)."""
from __future__ import annotations


class RequestDeadline:
    read_timeout: float = 30.0  # set from the listener by the channel or its site
    _read_deadline = None  # the pending call of the request being read
    _too_slow_told = False

    def too_slow(self) -> None:
        """Answer a request not arrived in time and close (the channel's own refusal)."""
        raise NotImplementedError

    def dataReceived(self, data):
        # A request's first byte starts its deadline (bytes that come while one is handled
        # are buffered for the next, which starts its own once the answer is written).
        if self._read_deadline is None and not self._handlingRequest and not self._too_slow_told:
            self._read_deadline = self.callLater(self.read_timeout, self._deadline_passed)
        super().dataReceived(data)

    def allContentReceived(self):
        self._cancel_read_deadline()
        super().allContentReceived()

    def connectionLost(self, reason):
        self._cancel_read_deadline()
        super().connectionLost(reason)

    def _deadline_passed(self) -> None:
        self._read_deadline = None
        self._too_slow_told = True
        self.too_slow()

    def _cancel_read_deadline(self) -> None:
        if self._read_deadline is not None:
            if self._read_deadline.active():
                self._read_deadline.cancel()
            self._read_deadline = None

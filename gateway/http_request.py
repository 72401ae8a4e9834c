"""The base of the gateway's HTTP requests (the doors, the console and the admin listener):
answers name the server without Twisted's version (`TwistedWeb/26.10.0` is what a scanner
looks vulnerabilities up by, and security audits flag it), and carry a reason phrase for
every status."""
from __future__ import annotations

from http import HTTPStatus

from twisted.web import http, server

SERVER = b"ma-hie-gateway"


class Request(server.Request):
    def render(self, resrc):
        self.setHeader(b"server", SERVER)  # Twisted set its own, with its version, just before
        super().render(resrc)

    def _handleStar(self):
        # The request-target `*` (OPTIONS *) is answered by Twisted without render(): with its
        # own Server header, version included, unless replaced here too.
        self.setHeader(b"server", SERVER)
        super()._handleStar()

    def setResponseCode(self, code, message=None):
        # Twisted knows no phrase for 421, 422 or 429 and sends "422 Unknown Status".
        if message is None and code not in http.RESPONSES:
            try:
                message = HTTPStatus(code).phrase.encode("ascii")
            except ValueError:
                pass
        super().setResponseCode(code, message)

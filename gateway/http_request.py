"""The base of the gateway's HTTP requests (the doors, the console and the admin listener):
answers name the server without Twisted's version (`TwistedWeb/26.10.0` is what a scanner
looks vulnerabilities up by, and security audits flag it)."""
from __future__ import annotations

from twisted.web import server

SERVER = b"ma-hie-gateway"


class Request(server.Request):
    def render(self, resrc):
        self.setHeader(b"server", SERVER)  # Twisted set its own, with its version, just before
        super().render(resrc)

"""The reference CNSS peer: SOAP 1.1 over mutual TLS, the contract in `adapters/soap/cnss/`.

Entry points (for `gateway sandbox` and `make run`, port 9443 in dev):

    from gateway.sandbox.cnss import CnssPeer, listen_cnss_peer, peer_tls_options

    peer = CnssPeer("var/sandbox-cnss.sqlite", reactor=reactor,
                    allowed_clients=frozenset({"gateway"}))
    port = await listen_cnss_peer(reactor, peer, 9443, "127.0.0.1",
                                  peer_tls_options("certs/dev"))
    ...
    await port.stopListening()
    await peer.stop()

`CnssPeer.site()` is the twisted.web Site, for callers that listen themselves (then call
`peer.start()` first). Operations: `VerifierDroits` (from a synthetic seed table, seed.py),
`SoumettreFeuilleDeSoins` (kept in a SQLite file, one care sheet per idempotency key) and
`ConsulterStatutFeuille`; `GET /?wsdl` serves the WSDL; `/_sandbox/faults` sets the fault
plan. Layout: soap.py (envelopes, hardened parsing), service.py (the operations and their
rules), store.py (SQLite), peer.py (Twisted).
"""
from gateway.sandbox.cnss.peer import CnssPeer, listen_cnss_peer, peer_tls_options

__all__ = ["CnssPeer", "listen_cnss_peer", "peer_tls_options"]

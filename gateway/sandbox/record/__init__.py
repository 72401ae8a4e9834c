"""The reference national shared health record: a FHIR R4 REST subset over mutual TLS.

Base `/fhir` (port 9444 in the dev configuration). Transactions with conditional create and
update on identifiers and `urn:uuid:` resolution, read, search by `identifier`, `patient`,
`subject`, `code` and `_id`, idempotent re-delivery by `Idempotency-Key`, input checked with
the fhir.resources R4B models, every error as an OperationOutcome, fault injection at
`/_sandbox/faults`, and its own SQLite store. Only clients whose certificate CN is allowed
(`gateway` by default) are served.

Wiring it (what `gateway sandbox` and `make run` do)::

    from gateway.sandbox.record import RecordPeer, listen_record_peer
    from gateway.tls import server_tls_options

    peer = RecordPeer("var/sandbox-record.sqlite", reactor=reactor)
    tls = server_tls_options("certs/dev/sandbox-record.crt", "certs/dev/sandbox-record.key",
                             "certs/dev/ca.crt", require_client_cert=True)
    port = listen_record_peer(reactor, peer, 9444, "127.0.0.1", tls)
    ...
    yield port.stopListening()
    yield peer.close()

`RecordPeer(store_path, *, reactor, allowed_clients=frozenset({"gateway"}), validate=True,
max_request_bytes=32 MiB)`: `validate=False` skips the R4B validation (benchmarks).
`peer.site()` is the twisted.web Site, `peer.resource()` its resource tree, `peer.faults` the
fault plan, `peer.close()` a Deferred.

Modules: api.py (the interactions), transaction.py (reading a transaction Bundle),
search.py (search parameters), store.py (SQLite), indexes.py (what searches look at),
validation.py (R4B checks), operation_outcome.py, peer.py (Twisted web).
"""
from gateway.sandbox.record.peer import MAX_REQUEST_BYTES, RecordPeer, listen_record_peer

__all__ = ["MAX_REQUEST_BYTES", "RecordPeer", "listen_record_peer"]

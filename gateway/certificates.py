"""The client certificates the doors have seen, per facility (table facility_certificates):
the console shows each facility's certificates and when they expire.

`CertificateSightings.seen(facility_id, cert, door)` is called on the reactor thread when a
door identifies a facility by its certificate (once per connection). It remembers, per node,
when it last wrote each certificate, and writes again (an upsert, in the database's thread
pool) at most every ten minutes: a busy sender costs a dictionary lookup per connection.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

log = logging.getLogger(__name__)

EVERY = 600.0  # seconds between two writes of the same certificate by one node


def certificate_row(facility_id: str, cert: x509.Certificate, door: str, at: datetime) -> dict:
    return {"facility_id": facility_id,
            "sha256": hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest(),
            "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "not_after": cert.not_valid_after_utc, "first_seen_at": at, "last_seen_at": at,
            "door": door}


def upsert_certificate(conn, row: dict) -> None:
    """Insert the sighting, or move an existing one's last_seen_at (and door) forward."""
    from gateway.store.schema import facility_certificates as table

    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    statement = insert(table).values(**row)
    conn.execute(statement.on_conflict_do_update(
        index_elements=[table.c.facility_id, table.c.sha256],
        set_={"last_seen_at": statement.excluded.last_seen_at, "door": statement.excluded.door,
              "not_after": statement.excluded.not_after}))


class CertificateSightings:
    def __init__(self, database, every: float = EVERY, clock: Callable[[], float] = time.monotonic):
        self._database = database
        self._every = every
        self._clock = clock
        self._written: dict[tuple[str, bytes], float] = {}

    def seen(self, facility_id: str, cert: x509.Certificate | None, door: str) -> None:
        if cert is None:
            return
        key = (facility_id, cert.fingerprint(hashes.SHA256()))
        now = self._clock()
        last = self._written.get(key)
        if last is not None and now - last < self._every:
            return
        self._written[key] = now
        row = certificate_row(facility_id, cert, door, datetime.now(timezone.utc))
        self._database.run_write(upsert_certificate, row).addErrback(self._failed, key)

    def _failed(self, failure, key) -> None:
        self._written.pop(key, None)  # try again at the next connection
        log.log(self._database.availability.level(failure, logging.WARNING), "certificate sighting not stored: %s",
                failure.getErrorMessage())

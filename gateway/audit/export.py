"""IHE ATNA export: the audit trail sent to a collector as RFC 5424 syslog over TLS (RFC 5425).

Durable: what was sent is `audit_exports.last_seq` for the collector (host:port); the export
reads the trail after it, in seq order and in bounded batches, and sends each record as one
octet-counted frame (gateway.audit.atna). The collector never answers (RFC 5425 has no
acknowledgement), so a batch counts as received once the connection has stayed up `settle`
seconds after it was written and nothing written is left in the gateway's buffers or
unacknowledged by the collector's TCP (a collector that reads slowly, or not at all): only
then does last_seq move. A connection lost before that sends the batch again on the next one:
a collector may see a record twice (its seq and hash are in the message: audit/N), never miss
one the gateway still held. (What the collector's own TCP took and it never read is beyond
what RFC 5425 can tell.) Reconnects back off up to a minute; a TCP connection is given
CONNECT_TIMEOUT seconds, and its TLS handshake HANDSHAKE_TIMEOUT more (a collector that accepts
TCP and never answers, or stops in the middle of the handshake, is left and tried again), and
a collector that reads nothing of what is written for STALL_TIMEOUT seconds (hung, its TCP
still up) is left too and tried again, what it was not confirmed to have sent again; a
stop waits STOP_GRACE seconds for the collector to close the connection, then cuts it.

Several nodes append to one trail; one of them exports it to a collector: on PostgreSQL the
node that holds a session advisory lock on the collector's name (kept on a connection of its
own while the service runs); the others try again every `claim_interval`. The holder checks
its session as often: a session that ended under it (a PostgreSQL restart, a killed backend)
took the lock with it, and another node may now hold it, so the holder stops sending (its
connection to the collector is cut) and goes back to trying, rather than both sending
every record.

A backlog beyond `queue_limit` records (a collector away for long) is not sent: the export
skips ahead to the newest `queue_limit`, logging and counting what it skipped (`skipped`).
"""
from __future__ import annotations

import hashlib
import logging
import socket
from datetime import datetime, timezone

from sqlalchemy import func, select, text, update
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from gateway.audit import atna
from gateway.audit.trail import AuditTrail
from gateway.store.database import write_transaction
from gateway.store.schema import audit_exports, audit_log

log = logging.getLogger(__name__)

STOP_GRACE = 5.0  # seconds a stopping export waits for the collector to close the connection
CONNECT_TIMEOUT = 10.0  # seconds for the TCP connection to the collector
HANDSHAKE_TIMEOUT = 10.0  # seconds for the TLS handshake once TCP is connected
STALL_TIMEOUT = 120.0  # seconds a collector may read nothing of what waits for it


def collector_name(host: str, port: int) -> str:
    return f"{host}:{port}"


def last_sent(conn, collector: str) -> int:
    """The last seq the collector has been sent (0: none), creating its row when missing."""
    seq = conn.execute(select(audit_exports.c.last_seq)
                       .where(audit_exports.c.collector == collector)).scalar()
    if seq is None:
        conn.execute(audit_exports.insert().values(collector=collector, last_seq=0,
                                                   updated_at=datetime.now(timezone.utc)))
        return 0
    return seq


def mark_sent(conn, collector: str, seq: int) -> None:
    """Move the collector's last_seq forward to `seq` (never back: saves may finish out of order)."""
    conn.execute(update(audit_exports)
                 .where(audit_exports.c.collector == collector, audit_exports.c.last_seq < seq)
                 .values(last_seq=seq, updated_at=datetime.now(timezone.utc)))


def read_frames(conn, trail: AuditTrail, after: int, limit: int, queue_limit: int,
                source: atna.Source, hostname: str) -> tuple[bytes, int, int, int]:
    """The frames of the records after `after` (at most `limit`): (bytes, last seq, count,
    records skipped because the backlog was beyond `queue_limit`)."""
    skipped = 0
    head = conn.execute(select(func.max(audit_log.c.seq))).scalar() or 0
    if head - after > queue_limit:
        skipped = conn.execute(select(func.count()).select_from(audit_log).where(
            audit_log.c.seq > after, audit_log.c.seq <= head - queue_limit)).scalar()
        after = head - queue_limit
    frames, last = [], after
    for record in trail.records(conn, after_seq=after, limit=limit, batch=limit):
        frames.append(atna.frame(atna.syslog_message(record, source, hostname)))
        last = record.seq
    return b"".join(frames), last, len(frames), skipped


@implementer(IHandshakeListener, IPushProducer)
class _SyslogSender(Protocol):
    """One TLS connection to the collector: tells the export when it can send, and pauses it
    when the collector reads slower than it is written to."""

    def __init__(self, export: "AuditExportService"):
        self.export = export
        self.paused = False
        self.up = False
        self.handshake_timed_out = False
        self.stalled = False
        self._handshake_timer = None
        self._watch: tuple[int, float] | None = None  # (bytes unacknowledged, since when)
        self._resumed = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        # TLS waits for the collector's answer without a limit of its own: one that accepted
        # TCP and says nothing would hold the export on this connection for ever.
        self._handshake_timer = self.export.reactor.callLater(HANDSHAKE_TIMEOUT,
                                                              self._handshake_expired)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        self.handshake_timed_out = True
        self.transport.abortConnection()

    def _stop_handshake_timer(self) -> None:
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None

    def handshakeCompleted(self) -> None:
        self._stop_handshake_timer()
        self.up = True
        self.export._connected(self)

    def dataReceived(self, data: bytes) -> None:
        pass  # a syslog collector says nothing

    def connectionLost(self, reason=None) -> None:
        self._stop_handshake_timer()
        was_up, self.up = self.up, False
        self.export._disconnected(self, reason, was_up)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._resumed = True
        self.export._pump()

    def stopProducing(self) -> None:
        self.paused = True

    def stalled_for(self, now: float) -> float:
        """Seconds since the collector last took anything of what waits for it: its TCP
        acknowledged more bytes, or the gateway's buffers drained enough to write again."""
        pending = _unacknowledged(self.transport)
        if self._watch is None or pending != self._watch[0] or self._resumed:
            self._watch, self._resumed = (pending, now), False
        return now - self._watch[1]


class AuditExportService(Service):
    """Sends the trail to config.audit.export's collector, from `database`'s thread pool."""

    name = "audit-export"

    def __init__(self, config, trail: AuditTrail, database, *, batch: int = 500,
                 poll_interval: float = 1.0, settle: float = 1.0, claim_interval: float = 10.0,
                 hostname: str | None = None):
        from gateway.tls import client_tls_options

        export = config.audit.export
        self.collector = collector_name(export.host, export.port)
        self.trail = trail
        self.database = database
        self.reactor = database.reactor
        self.batch = batch
        self.queue_limit = export.queue_limit
        self.poll_interval = poll_interval
        self.settle = settle
        self.claim_interval = claim_interval
        self.source = atna.Source(export.source_id, export.enterprise_site)
        self.hostname = hostname or socket.gethostname()
        tls = client_tls_options(export.ca or config.pki.ca, export.host, config.pki.cert,
                                 config.pki.key)
        self.endpoint = wrapClientTLS(tls, HostnameEndpoint(self.reactor, export.host, export.port,
                                                            timeout=CONNECT_TIMEOUT))
        self.sent = 0  # records written since the start (a few may be written twice)
        self.skipped = 0  # records not sent: the backlog was beyond queue_limit
        self._client: ClientService | None = None
        self._protocol: _SyslogSender | None = None
        self._next: int | None = None  # the seq after which to send on this connection
        self._reading = False
        self._poll = None  # the delayed call of the next look for new records
        self._lease = None  # PostgreSQL: the connection that holds the collector's lock
        self._claim: task.LoopingCall | None = None

    # -- the lease and the connection -----------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.trail.postgresql:
            self._claim = task.LoopingCall(self._hold_or_claim)
            self._claim.clock = self.reactor
            self._claim.start(self.claim_interval, now=True)
        else:
            self._connect()

    def _hold_or_claim(self) -> defer.Deferred:
        """Claim the lease; once held, check that its session (and so the lock) is still there."""
        lease = self._lease
        if lease is None:
            return self._try_claim()
        return self._run(self._check_lease, lease).addErrback(self._lease_lost, lease)

    @staticmethod
    def _check_lease(lease) -> None:
        connection, _ = lease
        connection.execute(text("SELECT 1"))  # a session lock lives as long as its session
        connection.commit()

    def _lease_lost(self, failure, lease) -> None:
        if lease is not self._lease:
            return
        log.error("audit export: the lease on %s was lost (%s): this node stops sending to it",
                  self.collector, failure.value)
        self._lease = None
        self._run(self._close_quietly, lease[0])
        # What was written and not confirmed is sent again by whoever holds the lease next.
        client, self._client = self._client, None
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()
        if client is not None:
            client.stopService()

    @staticmethod
    def _close_quietly(connection) -> None:
        try:
            connection.close()
        except Exception:  # the session is gone already
            pass

    def _try_claim(self) -> defer.Deferred:
        return self._run(self._claim_lock).addCallback(self._claimed).addErrback(
            lambda failure: log.log(self.database.availability.level(failure),
                                    "audit export: lease on %s: %s", self.collector, failure.value))

    def _claim_lock(self):
        key = int.from_bytes(hashlib.sha256(f"audit-export {self.collector}".encode()).digest()[:8],
                             "big", signed=True)
        connection = self.trail.engine.connect()
        try:
            held = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
            connection.commit()  # a session lock outlives the transaction
        except Exception:
            connection.close()
            raise
        if not held:
            connection.close()
            return None
        return connection, key

    def _claimed(self, lease) -> None:
        if lease is None:
            return  # another node exports to this collector
        if not self.running:
            self._run(self._release, lease)
            return
        self._lease = lease  # checked every claim_interval from now on
        log.info("audit export: this node sends the trail to %s", self.collector)
        self._connect()

    @staticmethod
    def _release(lease) -> None:
        connection, key = lease
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            connection.commit()
        except Exception as error:  # the session ended: its lock went with it
            log.info("audit export: lease already gone at release: %s", type(error).__name__)
        finally:
            AuditExportService._close_quietly(connection)

    def _connect(self) -> None:
        factory = Factory.forProtocol(lambda: _SyslogSender(self))
        self._client = ClientService(self.endpoint, factory, retryPolicy=backoffPolicy(
            initialDelay=0.5, maxDelay=60.0), clock=self.reactor)
        self._client.startService()

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._claim is not None and self._claim.running:
            self._claim.stop()
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        cut = None
        if self._protocol is not None and self._protocol.transport is not None:
            transport = self._protocol.transport
            # A registered producer holds a TLS connection open until it is unregistered.
            transport.unregisterProducer()
            # The TLS close waits for the collector's answer, behind all it has not read yet:
            # one that reads nothing more would hold the gateway's stop (and the database's
            # close) forever. Cut after STOP_GRACE: what it was not confirmed to have is sent
            # again at the next start.
            cut = self.reactor.callLater(STOP_GRACE, transport.abortConnection)
        if self._client is not None:
            yield self._client.stopService()
        if cut is not None and cut.active():
            cut.cancel()
        if self._lease is not None:
            lease, self._lease = self._lease, None
            yield self._run(self._release, lease)

    def _connected(self, protocol: _SyslogSender) -> None:
        self._protocol = protocol
        self._next = None  # read from the database: what the last connection confirmed
        log.info("audit export: connected to %s", self.collector)
        self._pump()

    def _disconnected(self, protocol: _SyslogSender, reason, was_up: bool) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._next = None
        if was_up and self.running and protocol.stalled:
            log.warning("audit export: %s read nothing for %g s: connection dropped, tried again",
                        self.collector, STALL_TIMEOUT)
        elif was_up and self.running:
            log.warning("audit export: connection to %s lost: %s", self.collector,
                        getattr(reason, "value", reason))
        elif self.running and protocol.handshake_timed_out:
            log.warning("audit export: no TLS session with %s: TLS handshake not complete "
                        "within %g s", self.collector, HANDSHAKE_TIMEOUT)
        elif self.running:
            log.warning("audit export: no TLS session with %s: %s", self.collector,
                        getattr(reason, "value", reason))

    # -- sending -------------------------------------------------------------------------

    def _pump(self) -> None:
        """Read and send the next batch if the connection can take it."""
        protocol = self._protocol
        if self._reading or protocol is None or not protocol.up or protocol.paused or not self.running:
            return
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._reading = True
        d = self._run(self._read, self._next)
        d.addCallback(self._send, protocol)
        d.addErrback(self._read_failed)
        d.addBoth(self._read_done)

    def _read(self, after: int | None):
        # The first read of a connection may create the collector's row: a write transaction.
        begin = write_transaction(self.trail.engine) if after is None else self.trail.engine.begin()
        with begin as conn:
            if after is None:
                after = last_sent(conn, self.collector)
            return read_frames(conn, self.trail, after, self.batch, self.queue_limit, self.source,
                               self.hostname)

    def _send(self, result, protocol: _SyslogSender) -> None:
        frames, last, count, skipped = result
        if skipped:
            self.skipped += skipped
            log.error("audit export to %s: %d record(s) beyond the queue limit (%d) not sent",
                      self.collector, skipped, self.queue_limit)
        if protocol is not self._protocol or not protocol.up:
            return  # lost while reading: the next connection starts from the database
        if count:
            protocol.transport.write(frames)
            self.sent += count
            log.debug("audit export: %d record(s) through seq %d written to %s", count, last,
                      self.collector)
        if count or skipped:
            self._next = last
            self.reactor.callLater(self.settle, self._confirm, protocol, last)
        full = count == self.batch
        self._schedule(0 if full else self.poll_interval)

    def _confirm(self, protocol: _SyslogSender, seq: int) -> None:
        if protocol is not self._protocol or not protocol.up:
            return
        if not _delivered(protocol):
            # A collector that reads slowly (or not at all) leaves what was written in the
            # gateway's buffers: counted as received, it would be lost with the connection.
            # Asked again later; the confirm of a later batch covers this one.
            if protocol.stalled_for(self.reactor.seconds()) >= STALL_TIMEOUT:
                # Hung, its TCP still up: waiting would hold the export for ever. The next
                # connection sends again what this one was not confirmed to have delivered.
                protocol.stalled = True
                protocol.transport.abortConnection()
            elif seq == self._next:
                self.reactor.callLater(self.settle, self._confirm, protocol, seq)
            return
        self._run(self._mark, seq).addErrback(
            lambda failure: log.log(self.database.availability.level(failure), "audit export: last_seq not saved: %s",
                                    failure.value))

    def _mark(self, seq: int) -> None:
        with write_transaction(self.trail.engine) as conn:
            mark_sent(conn, self.collector, seq)

    def _read_failed(self, failure) -> None:
        log.log(self.database.availability.level(failure), "audit export: reading the trail failed: %s", failure.value)
        self._schedule(self.poll_interval)

    def _read_done(self, _):
        self._reading = False

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        self._poll = self.reactor.callLater(delay, self._pump)

    def _run(self, work, *args):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.database.pool, work, *args)


def _delivered(protocol: _SyslogSender) -> bool:
    """Whether everything written on the connection has left the gateway: no write held
    back (the producer is not paused) and, where the system tells (Linux), no byte in the
    socket's send queue that the collector's TCP has not acknowledged."""
    return not protocol.paused and _unacknowledged(protocol.transport) == 0


def _unacknowledged(transport) -> int:
    """The bytes of the socket under `transport` (TLS over TCP) its peer has not acknowledged
    (SIOCOUTQ), or 0 when that cannot be asked."""
    while getattr(transport, "transport", None) is not None:  # down to TCP (TLS has a handle too)
        transport = transport.transport
    try:
        import fcntl
        import struct
        import termios

        queued = fcntl.ioctl(transport.getHandle().fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        return struct.unpack("i", queued)[0]
    except (AttributeError, ImportError, OSError, ValueError):
        return 0


__all__ = ["AuditExportService", "collector_name", "last_sent", "mark_sent", "read_frames"]

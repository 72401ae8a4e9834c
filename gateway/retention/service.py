"""Retention in the running gateway: the months ahead created at start (before any listener
opens, so that the first rows land in their month) and a run every day at `run_at`, local
time. The run and the partitions are database work, done in the database thread pool; a run
that fails is logged and tried again the next day. Stopping cancels the next run and ends the
batches of one in progress early (the next run goes on from there).
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from gateway.config import GatewayConfig
from gateway.retention.partitions import ensure_partitions
from gateway.retention.run import run_retention
from gateway.retention.schedule import local_zone, next_run

log = logging.getLogger(__name__)


class RetentionService(Service):
    name = "retention"

    def __init__(self, config: GatewayConfig, database, reactor, trail=None, zone=None,
                 clock=None):
        self.config = config.retention
        self.exports = audit_exports_of(config)  # whose collector the audit expiry waits for
        self.database = database  # gateway.store.database.Database (its engine and pool)
        self.reactor = reactor
        if trail is None:
            from gateway.audit.trail import AuditTrail

            trail = AuditTrail(database.engine, config.node_name)
        self.trail = trail
        self.zone = zone or local_zone()
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.stopping = threading.Event()
        self.call = None  # the pending daily run (IDelayedCall)
        self.in_progress: defer.Deferred | None = None
        self.last_report = None

    def startService(self) -> None:
        super().startService()
        self.stopping.clear()
        # In the reactor thread, before the listeners start: a few catalogue statements.
        try:
            with self.database.engine.connect() as connection:
                created = ensure_partitions(connection, self.clock())
            if created:
                log.info("partitions created: %s", ", ".join(created))
        except Exception as error:  # rows go to the DEFAULT partition meanwhile: keep going
            log.error("partitions ahead not created: %s", error)
        self._schedule()

    def stopService(self):
        super().stopService()
        self.stopping.set()
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        if self.in_progress is not None:  # the database closes after this has finished
            waiting = defer.Deferred()
            self.in_progress.addBoth(lambda result: (waiting.callback(None), result)[1])
            return waiting
        return None

    def _schedule(self) -> None:
        now = self.clock()
        when = next_run(now, self.config.run_at, self.zone)
        self.call = self.reactor.callLater(max((when - now).total_seconds(), 0), self.run_now)
        log.info("next retention run at %s (%s local time)", when.isoformat(),
                 when.astimezone(self.zone).strftime("%Y-%m-%d %H:%M %Z"))

    def run_now(self) -> defer.Deferred:
        """One run in the database pool (the daily one, or on demand); fires with its report,
        or None when it failed (logged) or one was already running. The next daily run is
        scheduled once it is over."""
        if self.in_progress is not None:
            log.info("retention run already in progress")
            return defer.succeed(None)
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        self.in_progress = deferToThreadPool(self.reactor, self.database.pool, run_retention,
                                         self.database.engine, self.config, self.clock(),
                                         self.trail, self.stopping, self.exports)

        def done(report):
            self.last_report = report
            return report

        def failed(failure):
            log.error("retention run failed, tried again tomorrow: %s", failure.getErrorMessage())
            return None

        def over(result):
            self.in_progress = None
            if not self.stopping.is_set():
                self._schedule()
            return result

        return self.in_progress.addCallbacks(done, failed).addBoth(over)


def audit_exports_of(config: GatewayConfig) -> tuple[str, ...]:
    """The ATNA collectors the audit trail is exported to (retention keeps what they lack)."""
    export = config.audit.export
    if export is None:
        return ()
    from gateway.audit.export import collector_name

    return (collector_name(export.host, export.port),)


__all__ = ["RetentionService", "audit_exports_of"]

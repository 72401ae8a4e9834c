"""`gateway run`: logging, the reactor, the service tree, and an orderly stop on SIGTERM/SIGINT."""
from __future__ import annotations

import logging
import sys

from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            globalLogBeginner, textFileLogObserver)

from gateway.config import GatewayConfig

# log_level -> (Twisted's level, the standard library's level)
_LEVELS = {"debug": (LogLevel.debug, logging.DEBUG), "info": (LogLevel.info, logging.INFO),
           "warn": (LogLevel.warn, logging.WARNING), "error": (LogLevel.error, logging.ERROR)}


def setup_logging(level: str) -> None:
    """Twisted's log and the standard library's (SQLAlchemy, Alembic, ours) to stdout."""
    twisted_level, stdlib_level = _LEVELS.get(level, _LEVELS["info"])
    predicate = LogLevelFilterPredicate(defaultLogLevel=twisted_level)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stdout), [predicate])],
        redirectStandardIO=False)
    logging.basicConfig(level=stdlib_level, stream=sys.stdout,
                        format="%(asctime)s [%(name)s] %(levelname)s %(message)s")


def run(config: GatewayConfig) -> int:
    from twisted.internet import reactor
    from twisted.logger import Logger

    from gateway.service import build_service

    setup_logging(config.log_level)
    log = Logger(namespace="gateway")
    service = build_service(config, reactor)
    try:
        service.startService()
    except Exception as error:  # a port in use, an unreadable certificate, an unreachable database
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    listeners = ", ".join(f"{l.name} {l.interface}:{l.port}{' (TLS)' if l.tls else ''}" for l in config.mllp)
    log.info("gateway {node} ready: {listeners}", node=config.node_name, listeners=listeners)
    reactor.run()
    return 0

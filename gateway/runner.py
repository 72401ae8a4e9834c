"""`gateway run`: logging, the reactor, the service tree, an orderly stop on SIGTERM/SIGINT,
the pid file, and a reload on SIGHUP (`gateway mappings reload` sends it): the facility
registry, the CRL and the mapping set."""
from __future__ import annotations

import gc
import os
import signal
import sys

from gateway.config import GatewayConfig
from gateway.logs import setup_logging as _setup_logging


def setup_logging(config: GatewayConfig) -> None:
    """Twisted's log and the standard library's (SQLAlchemy, Alembic, ours) to stdout, as JSON
    lines or text (log_format), at log_level, each line naming the node (gateway.logs)."""
    _setup_logging(config.log_level, config.log_format, config.node_name, sys.stdout)


def run(config: GatewayConfig, sandbox: bool = False) -> int:
    from twisted.internet import reactor
    from twisted.logger import Logger

    from gateway.service import OrderedServices, build_service, reload_service

    setup_logging(config)
    log = Logger(namespace="gateway")
    try:
        gateway = build_service(config, reactor)
    except Exception as error:  # a registry that does not fit the listeners, an unusable
        # certificate or CRL
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        return 1
    peers = _sandbox_service(config, reactor) if sandbox else None
    if sandbox and peers is None:
        log.warn("--sandbox: no sandbox peers configured (sandbox: record/cnss); running without")
    if peers is not None:
        # The peers first (deliveries find them up), stopped last (deliveries in flight end).
        service = OrderedServices()
        peers.setServiceParent(service)
        gateway.setName("gateway")
        gateway.setServiceParent(service)
    else:
        service = gateway
    # Listeners open before reactor.run() installs its signal handlers: a SIGTERM or SIGINT in
    # between must still mean an orderly stop, once the reactor runs.
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: reactor.callFromThread(reactor.stop))
    pid_file = config.resolve(config.pid_file)
    try:
        service.startService()
        write_pid_file(pid_file)
    except Exception as error:  # a port in use, an unreadable certificate, an unreachable
        # database, a broken mapping set (MappingErrors lists every problem), a pid file that
        # cannot be written (a folder, a path under a file: `gateway stop` could not find us)
        print(f"gateway: cannot start: {error}", file=sys.stderr)
        # What did start is stopped with the reactor running: the peers' and the stores'
        # threads end through Deferreds that only a running reactor fires.
        reactor.addSystemEventTrigger("before", "shutdown", _stop_started, service, reactor)
        reactor.callWhenRunning(reactor.stop)
        reactor.run()
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    peers_failed = []
    if peers is not None:
        def peers_not_started(failure) -> None:  # a port in use, an unreadable store
            peers_failed.append(failure)
            print(f"gateway: cannot start the sandbox: {failure.getErrorMessage()}", file=sys.stderr)
            reactor.callWhenRunning(reactor.stop)

        peers.ready.addErrback(peers_not_started)
    reactor.addSystemEventTrigger("after", "shutdown", remove_pid_file, pid_file)
    # The handler runs between bytecodes of the reactor thread: hand the work to the reactor.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload_service, gateway))
    if config.mappings is None:
        log.warn("no mappings configured: messages are stored and acknowledged, not translated")
    listeners = ", ".join([f"{l.name} {l.interface}:{l.port}{' (TLS)' if l.tls else ''}" for l in config.mllp]
                          + [f"{l.name} {l.interface}:{l.port} (ASTM, {l.facility})" for l in config.astm]
                          + [f"{l.name} {l.interface}:{l.port} (HTTPS)" for l in config.https]
                          + [f"{l.name} {l.interface}:{l.port} (console{', TLS' if l.tls else ''})"
                             for l in config.admin])
    if not peers_failed:
        log.info("gateway {node} ready: {listeners}", node=config.node_name, listeners=listeners)
    # What start-up built (the mapping set's generated code, the FHIR and HL7 definitions)
    # lives as long as the process: keep it out of the garbage collector's full passes, which
    # otherwise walk it again and again under load (measured: about a tenth of the CPU).
    gc.collect()
    gc.freeze()
    pace_collector()
    reactor.run()
    return 1 if peers_failed else 0


# Young objects the collector looks at once this many more were allocated than freed (Python's
# default: 700), and the older generations after 20 and 10 such passes. Under load nearly
# everything allocated is freed by reference counting within milliseconds, but a batch of
# translated bundles (a few hundred thousand dicts and lists until it is stored) or a batched
# transaction at the record peer outlives many 700-object passes and was walked again and
# again, young then old. Measured in bench-deliver (3,000 ORU^R01): the gateway's collections
# took 0.68 s of CPU at the default pace, 0.21 s at this one (mostly the collection at start);
# the record peer's 0.32 s, 0.05 s. Cyclic garbage waits at most 100,000 allocations.
COLLECTOR_THRESHOLDS = (100_000, 20, 10)


def pace_collector() -> None:
    """Set the collector's pace for a long-running server process (see above)."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)


def run_sandbox(config: GatewayConfig) -> int:
    """`gateway sandbox`: the reference peers alone, until SIGTERM/SIGINT."""
    from twisted.internet import reactor
    from twisted.logger import Logger

    setup_logging(config)
    service = _sandbox_service(config, reactor)
    if service is None:
        print("gateway: no sandbox peers configured (sandbox: record/cnss)", file=sys.stderr)
        return 1
    failures = []

    def failed(failure) -> None:  # a port in use, an unreadable certificate or store
        failures.append(failure)
        print(f"gateway: cannot start the sandbox: {failure.getErrorMessage()}", file=sys.stderr)
        # Stop through the reactor, even before it runs: the peer that did start has threads
        # that only an orderly stop ends.
        reactor.callWhenRunning(reactor.stop)

    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    service.startService().addErrback(failed)
    peers = ", ".join(f"{kind} {peer.interface}:{peer.port}"
                      for kind, peer in (("record", config.sandbox.record), ("cnss", config.sandbox.cnss))
                      if peer is not None)
    if not failures:
        Logger(namespace="sandbox").info("sandbox peers ready: {peers}", peers=peers)
    pace_collector()
    reactor.run()
    return 1 if failures else 0


def _sandbox_service(config: GatewayConfig, reactor):
    from gateway.sandbox.service import SandboxService

    if config.sandbox.record is None and config.sandbox.cnss is None:
        return None
    return SandboxService(config, reactor)


def _stop_started(service, reactor):
    """Stop the children that did start (their threads would keep the process alive), all at
    once, since the tree is incomplete (a MultiService's children are stopped here rather than
    by its own stopService, which would also stop those that never started); a Deferred, given
    up after STOP_TIMEOUT seconds."""
    from twisted.application.service import MultiService, Service
    from twisted.internet import defer

    def stopping(node):
        for child in reversed(list(node)):
            if not child.running:
                continue
            if isinstance(child, MultiService):
                yield from stopping(child)
                Service.stopService(child)
            else:  # an error here is logged by the DeferredList; the first one was reported
                yield defer.maybeDeferred(child.stopService)

    done = defer.DeferredList(list(stopping(service)), consumeErrors=True)
    return done.addTimeout(STOP_TIMEOUT, reactor).addErrback(lambda _: None)


STOP_TIMEOUT = 10


def write_pid_file(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="ascii") as handle:
            handle.write(f"{os.getpid()}\n")
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise OSError(f"cannot write the pid file {path}: {reason}") from None


def remove_pid_file(path: str) -> None:
    """Remove the pid file if it is still ours (another process may have replaced it)."""
    try:
        with open(path, encoding="ascii") as handle:
            if handle.read().strip() != str(os.getpid()):
                return
        os.remove(path)
    except OSError:
        pass

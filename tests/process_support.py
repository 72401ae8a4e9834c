"""Gateway processes for the tests that need real ones: a free port, the child environment,
waiting until a port listens, and starting `gateway run` with its output in a log file."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment() -> dict[str, str]:
    """The environment of the processes: no configuration taken from the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_DB_URL", "GATEWAY_CONFIG")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 20.0, log=None) -> None:
    """Return once `port` accepts connections; fail (with the end of `log`, if given) when the
    process exits first or nothing listens within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text("utf-8", "replace")[-2000:] if log is not None else ""
            raise AssertionError(f"gateway exited with {process.returncode} before listening\n{tail}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def start_gateway(config: str, root, port: int, log_name: str) -> subprocess.Popen:
    """`python -m gateway run -c config` in `root`, output to root/log_name, listening on `port`."""
    log = open(root / log_name, "wb")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", config], cwd=root,
                               env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child has its own descriptor
    wait_for_port(port, process, log=root / log_name)
    return process


def listening_port(service):
    """A Deferred of the port a StreamServerEndpointService listens on. Yielding its own
    `_waitingForPort` would consume the port (the Deferred's result becomes None), and its
    stopService would then leave the port open for the rest of the test run."""
    from twisted.internet import defer

    port = defer.Deferred()

    def tell(result):
        port.callback(result)
        return result

    service._waitingForPort.addBoth(tell)
    return port

"""Gateway processes for the tests that need real ones: a free port, the child environment,
waiting until a port listens, and starting `gateway run` with its output in a log file."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
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


def launch_gateway(config: str, root, log_name: str) -> subprocess.Popen:
    """`python -m gateway run -c config` in `root`, output to root/log_name, not waited for:
    several nodes start side by side (a start takes seconds)."""
    log = open(root / log_name, "wb")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", config], cwd=root,
                               env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child has its own descriptor
    return process


def start_gateway(config: str, root, port: int, log_name: str) -> subprocess.Popen:
    """`python -m gateway run -c config` in `root`, output to root/log_name, listening on `port`."""
    process = launch_gateway(config, root, log_name)
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


def write_record_node_config(conf, name: str, pg_url: str, mllp_port: int, dev_pki: str, record_url: str,
                             *, admin_port: int | None = None, more: str = "") -> str:
    """A node's configuration in the folder `conf` (made): on `pg_url`, a plain MLLP listener,
    the repository's mappings, every message with a Patient routed to the shared record at
    `record_url` with short timeouts and leases; `admin_port`: an admin listener too; `more`:
    top-level YAML lines appended. Its gateway.yaml's path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    conf.mkdir(parents=True)
    (conf / "facilities.yaml").write_text("facilities: []\n", encoding="utf-8")
    (conf / "routes.yaml").write_text(textwrap.dedent("""\
        routes:
          - name: clinical
            when: {resources: [Patient]}
            to: [shared-record]
        """), encoding="utf-8")
    admin = (f"\n  admin:\n    - {{name: admin, port: {admin_port}, interface: 127.0.0.1}}"
             if admin_port is not None else "")
    path = conf / "gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        node: {{name: {name}}}
        log_level: info
        database: {{url: "{pg_url}"}}
        pki: {{ca: {dev_pki}/ca.crt, cert: {dev_pki}/gateway.crt, key: {dev_pki}/gateway.key}}
        listeners:
          mllp:
            - {{name: mllp-plain, port: {mllp_port}, interface: 127.0.0.1, accept_unknown_senders: true}}""")
                    + admin + textwrap.dedent(f"""
        facilities: conf/facilities.yaml
        mappings: {{directory: {root}/mappings}}
        destinations:
          - name: shared-record
            kind: fhir-record
            url: {record_url}
            connect_timeout: 1
            response_timeout: 4
            retry: {{base: 0.2, cap: 1}}
        routes: conf/routes.yaml
        delivery: {{lease: 6, poll_interval: 0.1}}
        """) + textwrap.dedent(more), encoding="utf-8")
    return str(path)


def terminate(*processes: subprocess.Popen) -> None:
    """SIGTERM to each process still running (at once: a test on the reactor thread sends it
    before it waits in another thread, which a failing test may never get to run)."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


def stop_processes(*processes: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to each process still running, all at once; then each one that has not exited
    within `timeout` is killed. Blocking: from a thread, not the reactor's."""
    terminate(*processes)
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

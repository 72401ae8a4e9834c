"""The `gateway` console script run as a real process, in a project folder of its own: its
configuration, the command runner and the running gateway (fixtures `project`, `gateway`)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from process_support import child_environment, free_port, wait_for_port
from translation_support import write_mappings

GATEWAY = os.path.join(sys.prefix, "bin", "gateway")

FACILITIES = """\
facilities:
  - id: "INPE-100001"
    name: "CHU Ibn Rochd Casablanca"
    type: hospital
    applications: [HIS_CHU]
    facilities: [CHU_IBN_ROCHD]
    charset_fallback: cp1256
  - id: "INPE-100002"
    name: "Laboratoire d'Analyses Médicales Al Amal, Rabat"
    type: laboratory
    applications: [LIS_ALAMAL]
    facilities: [LAB_ALAMAL_RABAT]
"""

def write_project(root: Path, dev_pki: str, db_url: str, port: int) -> Path:
    """conf/gateway.yaml and conf/facilities.yaml under `root`; returns the config path."""
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "facilities.yaml").write_text(FACILITIES, encoding="utf-8")
    config = conf / "gateway.yaml"
    config.write_text(textwrap.dedent(f"""\
        node:
          name: cli-test
        log_level: info
        database:
          url: {db_url}
          pool_size: 2
        pki:
          ca: {dev_pki}/ca.crt
          cert: {dev_pki}/gateway.crt
          key: {dev_pki}/gateway.key
          dev_dir: certs/dev
        identity:
          application: MA_HIE_GATEWAY
          facility: MA_HIE
        listeners:
          mllp:
            - name: mllp-plain
              port: {port}
              interface: 127.0.0.1
              accept_unknown_senders: true
              allow_sources: [127.0.0.0/8]
        facilities: conf/facilities.yaml
        mappings:
          directory: mappings
        """), encoding="utf-8")
    write_mappings(root / "mappings")
    return config


@pytest.fixture
def project(tmp_path, dev_pki):
    port = free_port()
    database = tmp_path / "var" / "gateway.sqlite"
    config = write_project(tmp_path, dev_pki, f"sqlite:///{database}", port)
    return SimpleNamespace(root=tmp_path, config=str(config), port=port, database=database)


def cli(project, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `gateway ARGS` in the project folder; stdout and stderr decoded as UTF-8."""
    done = subprocess.run([GATEWAY, *args], cwd=project.root, env=child_environment(),
                          capture_output=True, timeout=timeout)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8"),
                                       done.stderr.decode("utf-8"))


@pytest.fixture
def gateway(project):
    """`gateway run -c conf/gateway.yaml` as a process, listening; killed after the test if still up."""
    log = open(project.root / "gateway.log", "wb")
    process = subprocess.Popen([GATEWAY, "run", "-c", project.config], cwd=project.root,
                               env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(project.port, process)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def stop(process: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then the exit code (fails if the process does not exit within `timeout`)."""
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout)


def write_file(project, name: str, data: bytes) -> str:
    path = project.root / name
    path.write_bytes(data)
    return str(path)

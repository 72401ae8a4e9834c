"""The console in a real browser: a `gateway run --sandbox` process whose admin listener serves
the console, Debian's Chromium driven by Playwright's sync API, and the HL7 message the tests
send over MLLP.

Playwright drives /usr/bin/chromium (installed by `make browser`, a prerequisite of `make
install` and `make test`), never a browser of its own. The gateway is a child process, so the
tests need no reactor: they use Playwright's sync API in plain test functions.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from adapters.mllp.client import MllpClient, describe
from process_support import child_environment, free_port, stop_processes, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "var" / "test-artifacts"  # screenshots; var/ is not committed
PASSWORDS = {"admin": "admin-dev", "operator": "operator-dev", "viewer": "viewer-dev"}
# The shipped admission: a patient named twice in PID-5, in Latin and in Arabic script.
ADMISSION = ROOT / "mappings" / "tests" / "adt" / "a01-admission.hl7"
ARABIC_FAMILY_NAME = "بنعلي"


@dataclass
class ConsoleGateway:
    process: subprocess.Popen
    root: Path
    url: str  # the console, e.g. http://127.0.0.1:PORT
    mllp_port: int
    db_url: str

    def log_tail(self, size: int = 3000) -> str:
        return (self.root / "gateway.log").read_text("utf-8", "replace")[-size:]


def write_config(root: Path, dev_pki: str, db_url: str, mllp_port: int, admin_port: int,
                 record_port: int) -> Path:
    """A gateway configuration in root/conf: MLLP in, the sandbox shared record as its one
    destination (fast retries), the console's development accounts on the admin listener."""
    shipped = yaml.safe_load((ROOT / "conf" / "gateway.yaml").read_text("utf-8"))
    conf = root / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    (conf / "facilities.yaml").write_text("facilities: []\n", encoding="utf-8")
    (conf / "routes.yaml").write_text(yaml.safe_dump({"routes": [
        {"name": "clinical", "when": {"resources": ["Patient"]}, "to": ["shared-record"]}]}),
        encoding="utf-8")
    config = {
        "node": {"name": "browser-1"},
        "log_level": "info",
        "database": {"url": db_url},
        "pki": {"ca": f"{dev_pki}/ca.crt", "cert": f"{dev_pki}/gateway.crt",
                "key": f"{dev_pki}/gateway.key", "dev_dir": dev_pki,
                "prescription_key": f"{dev_pki}/prescription-signing.key"},
        "listeners": {
            "mllp": [{"name": "mllp-plain", "port": mllp_port, "interface": "127.0.0.1",
                      "accept_unknown_senders": True}],
            "admin": [{"name": "admin", "port": admin_port, "interface": "127.0.0.1"}],
        },
        "facilities": "conf/facilities.yaml",
        "mappings": {"directory": str(ROOT / "mappings")},
        "destinations": [{"name": "shared-record", "kind": "fhir-record",
                          "url": f"https://127.0.0.1:{record_port}/fhir",
                          "connect_timeout": 1, "response_timeout": 3,  # within the lease
                          "retry": {"base": 0.2, "cap": 1}}],
        "routes": "conf/routes.yaml",
        "delivery": {"lease": 5, "poll_interval": 0.1},
        "console": shipped["console"],  # admin/operator/viewer, passwords in PASSWORDS
        "sandbox": {"record": {"port": record_port, "store": str(root / "sandbox-record.sqlite")}},
    }
    path = conf / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def start_console_gateway(root: Path, dev_pki: str, db_url: str | None = None) -> ConsoleGateway:
    """`gateway run --sandbox` in `root` on free ports; returns once MLLP and the console listen."""
    root.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{root / 'gateway.sqlite'}"
    mllp_port, admin_port, record_port = free_port(), free_port(), free_port()
    config = write_config(root, dev_pki, db_url, mllp_port, admin_port, record_port)
    log = open(root / "gateway.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--sandbox", "-c", str(config)], cwd=root,
        env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child has its own descriptor
    try:
        for port in (mllp_port, admin_port, record_port):
            wait_for_port(port, process, log=root / "gateway.log")
    except BaseException:
        stop_gateway(process)
        raise
    return ConsoleGateway(process, root, f"http://127.0.0.1:{admin_port}", mllp_port, db_url)


def stop_gateway(process: subprocess.Popen) -> None:
    stop_processes(process)


def admission(control_id: str, patient_id: str) -> bytes:
    """The shipped ADT^A01 (UTF-8, Arabic second name) with its own control id and patient."""
    text = ADMISSION.read_text("utf-8").replace("\n", "\r").rstrip("\r") + "\r"
    assert "|ADT0001|" in text and "|123456^^^CHUIR^MR" in text
    text = text.replace("|ADT0001|", f"|{control_id}|").replace(
        "|123456^^^CHUIR^MR", f"|{patient_id}^^^CHUIR^MR")
    return text.encode("utf-8")


def send(port: int, message: bytes) -> str:
    """Send one message over MLLP; its MSA-1."""
    with MllpClient("127.0.0.1", port, timeout=20) as client:
        return describe(client.send(message).response)["msa1"]


def launch_chromium(playwright):
    """Debian's Chromium, headless, as Playwright's browser."""
    if not os.access(CHROMIUM, os.X_OK):
        raise AssertionError(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """A PNG of the page in var/test-artifacts/ (for a person to look at; never committed)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def screenshot_of(locator, name: str) -> Path:
    """A PNG of one element (a segment, a section) at full scale, beside the page's."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    locator.screenshot(path=str(path))
    return path


def until(check, timeout: float = 10.0, interval: float = 0.2, what: str = "condition"):
    """Call `check()` until it returns something true; that value, or AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:g} s (last: {value!r})")
        time.sleep(interval)

"""The log: JSON lines (time, level, namespace, node, message, safe fields) for Twisted's log
and the standard library's in one stream, or readable text; and no patient data above debug:
real messages naming a patient go through a running gateway at info level, and the log names
them by control id only."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import pytest_twisted
from twisted.logger import Logger, globalLogPublisher

from gateway.logs import Capture, StdlibBridge, json_line
from observability_support import (PATIENT_GIVEN, PATIENT_ID, PATIENT_NAME, facility_tls, hl7, in_thread,
                                   observed_config, send_mllp, until)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_a_twisted_event_as_one_json_line():
    capture = Capture(node="node-7")
    log = Logger(namespace="gateway.test", observer=capture)
    log.info("mllp {listener} {peer}: idle for {timeout}s", listener="mllp-1", peer="10.0.0.1:5000",
             timeout=300, ignored=object())
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("answering {path} failed", path="/v1/x")
    log.debug("hidden below the capture's level? no: the capture takes debug")
    info, failure, debug = capture.lines()
    assert ISO_UTC.match(info["time"])
    assert {k: info[k] for k in ("level", "namespace", "node", "message", "listener", "peer", "timeout")} == {
        "level": "info", "namespace": "gateway.test", "node": "node-7",
        "message": "mllp mllp-1 10.0.0.1:5000: idle for 300s", "listener": "mllp-1",
        "peer": "10.0.0.1:5000", "timeout": 300}
    assert "ignored" not in info  # not a plain value
    assert failure["level"] == "critical" and failure["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in failure["traceback"] and failure["path"] == "/v1/x"
    assert debug["level"] == "debug"
    assert all(line.endswith("\n") and line.count("\n") == 1
               for line in [json_line({"log_format": "a\nb", "log_time": 0.0}, "n")])


def test_the_standard_library_joins_the_same_stream():
    capture = Capture(node="n", level="info")
    bridge = StdlibBridge(capture)
    logger = logging.getLogger("gateway.test.bridge")
    logger.addHandler(bridge)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        logger.warning("deliveries %s to %s: {not a field}", "1-3", "cnss")
        logger.debug("below info: dropped")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it failed")
    finally:
        logger.removeHandler(bridge)
        logger.propagate = True
    warning, error = capture.lines()
    assert (warning["level"], warning["namespace"], warning["message"]) == (
        "warn", "gateway.test.bridge", "deliveries 1-3 to cnss: {not a field}")
    assert error["level"] == "error" and "ValueError: boom" in error["traceback"]


def run_python(code: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


SETUP = """
import logging
from twisted.logger import Logger
from gateway.config import GatewayConfig, DatabaseConfig, PkiConfig
from gateway.runner import setup_logging
config = GatewayConfig(path="x", root=".", database=DatabaseConfig(url="sqlite://"),
                       pki=PkiConfig(ca="", cert="", key=""), node_name="node-x", log_level="info",
                       log_format=FORMAT)
setup_logging(config)
logging.getLogger("alembic.runtime.migration").info("from the standard library %s", 42)
logging.getLogger("gateway.x").debug("not shown")
Logger(namespace="gateway.y").info("from twisted {n}", n=7)
Logger(namespace="gateway.y").debug("not shown either")
"""


def test_gateway_run_logging_writes_json_lines_to_stdout():
    """`gateway run`'s setup: every line of stdout is one JSON object naming the node."""
    lines = run_python(SETUP.replace("FORMAT", repr("json")))
    records = [json.loads(line) for line in lines]
    assert [(r["level"], r["namespace"], r["node"], r["message"]) for r in records] == [
        ("info", "alembic.runtime.migration", "node-x", "from the standard library 42"),
        ("info", "gateway.y", "node-x", "from twisted 7")]


def test_text_format_stays_readable():
    lines = run_python(SETUP.replace("FORMAT", repr("text")))
    assert len(lines) == 2 and not lines[0].startswith("{")
    assert "[alembic.runtime.migration#info] from the standard library 42" in lines[0]
    assert "[gateway.y#info] from twisted 7" in lines[1]


@pytest.fixture
def info_log():
    """Everything logged (Twisted and the standard library) at info and above, as JSON."""
    capture = Capture(node="test", level="info")
    bridge = StdlibBridge()
    root = logging.getLogger()
    level = root.level
    root.addHandler(bridge)
    root.setLevel(logging.INFO)
    globalLogPublisher.addObserver(capture)
    yield capture
    globalLogPublisher.removeObserver(capture)
    root.removeHandler(bridge)
    root.setLevel(level)



@pytest_twisted.inlineCallbacks
def test_no_patient_data_in_the_log_above_debug(make_config, tmp_path, dev_pki, info_log, observe):
    """A translated ADT whose delivery fails, an ORU the mappings cannot translate, a sender
    refused for its MSH-4 on TLS, bytes in a charset they do not match, a frame that is not
    HL7: the log says what happened by control id, never with the patient's name or id."""
    observed = yield observe(observed_config(make_config, f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path))
    plain, tls = observed.ports["mllp-test"], observed.ports["mllp-tls"]
    bad_charset = hl7("LG-CHARSET-1").replace(b"UNICODE UTF-8", b"ASCII").replace(
        PATIENT_NAME.encode(), "Él".encode("utf-8") + PATIENT_NAME.encode())
    yield in_thread(send_mllp, plain, hl7("LG-ADT-1"), hl7("LG-ORU-1", "ORU^R01^ORU_R01"), bad_charset,
                    f"{PATIENT_NAME} {PATIENT_ID} not hl7\r".encode())
    yield in_thread(lambda: send_mllp(tls, hl7("LG-REFUSED-1", facility="OTHER_FAC"),
                                      tls=facility_tls(dev_pki, "INPE-100001")))
    yield until(lambda: observed.kinds("delivery.attempted") and observed.kinds("message.translation_failed"))
    text = info_log.text()
    assert "LG-ORU-1" in text and "LG-REFUSED-1" in text  # named by control id
    assert "deliveries" in text and "record-down" in text  # the failed attempt is logged
    for secret in (PATIENT_NAME, PATIENT_GIVEN, PATIENT_ID, "19850714"):
        assert secret not in text, [line for line in text.splitlines() if secret in line]
    assert all(record["level"] != "debug" for record in info_log.lines())


def test_a_line_with_a_lone_surrogate_is_written_not_lost():
    """A lone surrogate in logged text (JSON input's "\\udc80", bytes decoded with
    surrogateescape) cannot be encoded to stdout's UTF-8: the line comes out with "?" in its
    place, instead of vanishing with nobody told (the observer raising on its one stream)."""
    import io

    from twisted.logger import LogPublisher

    from gateway.logs import json_observer

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as sys.stdout is
    log = Logger(namespace="gateway.test", observer=LogPublisher(json_observer(stdout, "n")))
    log.warn("request refused: {reason}", reason="key a\udc80b")
    log.info("next")
    stdout.flush()
    lines = [json.loads(line) for line in stdout.buffer.getvalue().decode("utf-8").splitlines()]
    assert [line["message"] for line in lines] == ["request refused: key a?b", "next"]
    assert lines[0]["reason"] == "key a?b"


def test_text_format_shows_a_senders_control_characters_escaped():
    """In the terminal format, a CR or an ESC in logged text (an MSH-4, a peer's fault code)
    would move the cursor back over the line or recolour it: shown as \\r, \\x1b instead."""
    import io

    from twisted.logger import LogPublisher

    from gateway.logs import text_observer

    terminal = io.StringIO()
    log = Logger(namespace="gateway.test", observer=LogPublisher(text_observer(terminal)))
    log.warn("refused {facility}", facility="CHU\r2026-01-01T00:00:00+0000 [gateway#info] \x1b[32mok\x9b")
    assert terminal.getvalue().endswith(
        "[gateway.test#warn] refused CHU\\r2026-01-01T00:00:00+0000 [gateway#info] \\x1b[32mok\\x9b\n")

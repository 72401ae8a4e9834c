"""The `gateway` console script, run as a real process: run, send, messages, pki, and config errors."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import hl7msgs
import pytest
from cli_support import GATEWAY, cli, gateway, project, stop, write_file  # noqa: F401 (fixtures)
from process_support import child_environment, free_port, wait_for_port

BAD_MESSAGE = (b"MSH|^~\\&|HIS_TEST|FAC_TEST|MA_HIE_GATEWAY|MA_HIE|20250114083512||XYZ^A01|BAD-CLI-1|P|2.5\r"
               b"PID|1||P-1^^^CHU^PI||Test^Patient\r")


def test_run_listens_then_stops_on_sigterm(project, gateway):
    """`gateway run` listens on the configured port and exits 0 within seconds of SIGTERM."""
    with socket.create_connection(("127.0.0.1", project.port), timeout=2):
        pass
    started = time.monotonic()
    assert stop(gateway) == 0
    assert time.monotonic() - started < 5
    log = (project.root / "gateway.log").read_text("utf-8")
    assert "gateway cli-test ready" in log and f"mllp-plain 127.0.0.1:{project.port}" in log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", project.port), timeout=1).close()
    assert project.database.exists()


def test_run_names_its_astm_listeners_when_ready(project):
    """The "ready" line lists every listener, the ASTM ones (with their laboratory) included."""
    astm_port = free_port()
    config = Path(project.config)
    config.write_text(config.read_text("utf-8").replace("facilities: conf/facilities.yaml", (
        f"  astm:\n    - {{name: astm-lab, port: {astm_port}, interface: 127.0.0.1, "
        "facility: INPE-100002}\nfacilities: conf/facilities.yaml")), encoding="utf-8")
    with open(project.root / "gateway.log", "wb") as log:
        process = subprocess.Popen([GATEWAY, "run", "-c", project.config], cwd=project.root,
                                   env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(astm_port, process)
            deadline = time.monotonic() + 30
            while " ready: " not in (project.root / "gateway.log").read_text("utf-8"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert stop(process) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    [ready] = [line for line in (project.root / "gateway.log").read_text("utf-8").splitlines()
               if " ready: " in line]
    assert f"mllp-plain 127.0.0.1:{project.port}" in ready
    assert f"astm-lab 127.0.0.1:{astm_port} (ASTM, INPE-100002)" in ready


def _run_sandbox_holding(project, dev_pki, held: str) -> tuple[int, str, dict]:
    """`gateway run --sandbox` while another socket holds the port named `held` (mllp or
    record); its exit code (or a failure if it does not exit) and output."""
    import shutil

    shutil.copytree(dev_pki, project.root / "certs" / "dev")  # the peers' certificates
    ports = {"mllp": project.port, "record": free_port(), "cnss": free_port()}
    config = Path(project.config)
    config.write_text(config.read_text("utf-8") + textwrap.dedent(f"""\
        sandbox:
          record: {{port: {ports['record']}, store: var/sandbox/record.sqlite}}
          cnss: {{port: {ports['cnss']}, store: var/sandbox/cnss.sqlite}}
        """), encoding="utf-8")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ports[held]))
        holder.listen()
        code, output = _run_to_its_end(project, "--sandbox")
    return code, output, ports


def _run_to_its_end(project, *options: str) -> tuple[int, str]:
    """`gateway run` that must stop by itself: its exit code and output (a failure if it runs on)."""
    process = subprocess.Popen([GATEWAY, "run", *options, "-c", project.config], cwd=project.root,
                               env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError("gateway run did not exit:\n" + output.decode()[-2000:])
    return process.returncode, output.decode()


def test_run_with_sandbox_exits_when_its_port_is_taken(project, dev_pki):
    """`gateway run --sandbox` (`make run`) whose MLLP port another process holds says so and
    exits 1, rather than hanging after the message with its threads alive (and deaf to
    SIGTERM, since the reactor never ran)."""
    code, output, ports = _run_sandbox_holding(project, dev_pki, "mllp")
    assert code == 1
    assert f"gateway: cannot start: Couldn't listen on 127.0.0.1:{ports['mllp']}" in output


def test_run_with_sandbox_exits_when_a_peer_port_is_taken(project, dev_pki):
    """A sandbox peer that cannot listen (`make run` while another sandbox runs) stops the
    start with its reason, rather than a gateway "ready" whose deliveries find no peer."""
    code, output, ports = _run_sandbox_holding(project, dev_pki, "record")
    assert code == 1
    assert f"gateway: cannot start the sandbox: Couldn't listen on 127.0.0.1:{ports['record']}" in output
    assert " ready: " not in output


def test_run_exits_when_its_pid_file_cannot_be_written(project):
    """A pid_file that is a folder: `gateway run` said nothing of it to the operator and ran on
    with a traceback in its log, where `gateway stop` and `reload` could never find it. It
    stops what it started and exits 1, naming the file."""
    (project.root / "var" / "gateway.pid").mkdir(parents=True)
    code, output = _run_to_its_end(project)
    assert code == 1 and "gateway: cannot start: cannot write the pid file" in output


def test_send_prints_msa_of_a_stored_message(project, gateway):
    """`gateway send` prints FILE#1: CA <control id> for the benchmark ORU and exits 0."""
    path = write_file(project, "oru.hl7", hl7msgs.message("oru", 3).encode("utf-8"))
    done = cli(project, "send", "--to", f"127.0.0.1:{project.port}", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}#1: CA B00000000003"
    listed = cli(project, "messages", "list", "--json", "-c", project.config)
    assert [json.loads(line)["control_id"] for line in listed.stdout.splitlines()] == ["B00000000003"]
    assert stop(gateway) == 0


def test_send_raw_sends_the_files_bytes_untouched(project, gateway):
    """--raw (to see what the gateway makes of a file) sent the bytes without their BOM, the
    blanks around them and with a CR added: a BOM before MSH was never seen by the gateway."""
    path = write_file(project, "bom.hl7", b"\xef\xbb\xbf" + hl7msgs.message("oru", 4).encode("utf-8"))
    done = cli(project, "send", "--raw", "--to", f"127.0.0.1:{project.port}", path)
    assert done.returncode == 0, done.stderr  # the gateway reads past a BOM, and says so below
    shown = cli(project, "messages", "show", "1", "--json", "-c", project.config)
    assert json.loads(shown.stdout)["size"] == len(open(path, "rb").read())
    assert stop(gateway) == 0


def test_send_prints_err_and_fails_for_a_refused_message(project, gateway):
    """A message the gateway refuses: the MSA line, its ERR segment indented, exit code 1."""
    path = write_file(project, "bad.hl7", BAD_MESSAGE)
    done = cli(project, "send", "--to", f"127.0.0.1:{project.port}", path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == f"{path}#1: AR BAD-CLI-1"
    assert lines[1].startswith("    ERR|") and "XYZ" in lines[1]
    assert stop(gateway) == 0


def test_send_to_a_closed_port_fails(project):
    """`gateway send` to a port where nothing listens says so on stderr and exits 1."""
    path = write_file(project, "oru.hl7", hl7msgs.message("oru", 4).encode("utf-8"))
    done = cli(project, "send", "--to", f"127.0.0.1:{project.port}", path)
    assert done.returncode == 1
    assert f"cannot connect to 127.0.0.1:{project.port}" in done.stderr and done.stdout == ""


def test_send_of_a_missing_file_says_so_and_sends_nothing(project, gateway):
    """A FILE that cannot be read: one line naming it on stderr, exit 1, no traceback, and
    nothing sent (the files are read before the first message goes)."""
    good = write_file(project, "oru.hl7", hl7msgs.message("oru", 6).encode("utf-8"))
    missing = str(project.root / "missing.hl7")
    done = cli(project, "send", "--to", f"127.0.0.1:{project.port}", good, missing)
    assert done.returncode == 1
    assert done.stderr.strip() == f"cannot read {missing}: No such file or directory"
    assert done.stdout == ""
    listed = cli(project, "messages", "list", "--json", "-c", project.config)
    assert listed.stdout == ""
    assert stop(gateway) == 0


def test_send_tls_option_problems_are_named(project, dev_pki):
    """--tls with a CA file that is not there, or a certificate without its key: one line that
    names the option and the file, exit 1, no traceback."""
    path = write_file(project, "oru.hl7", hl7msgs.message("oru", 7).encode("utf-8"))
    to = ("--to", f"127.0.0.1:{project.port}", "--tls")
    missing = str(project.root / "nope.crt")
    done = cli(project, "send", *to, "--ca", missing, path)
    assert (done.returncode, done.stderr.strip()) == (1, f"cannot read --ca {missing}: no such file")
    cert = f"{dev_pki}/INPE-100001.crt"
    done = cli(project, "send", *to, "--ca", f"{dev_pki}/ca.crt", "--cert", cert, path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"cannot load --ca {dev_pki}/ca.crt --cert {cert}: ")
    assert "without --key, the key must be in the --cert file" in done.stderr


def test_send_tls_without_a_client_certificate_says_one_is_required(project, dev_pki):
    """A TLS listener requires a client certificate; `send --tls --ca` alone fails with the
    handshake's error and says to give --cert and --key."""
    tls_port = free_port()
    config = Path(project.config)
    config.write_text(config.read_text("utf-8").replace("facilities: conf/facilities.yaml", (
        f"    - {{name: mllp-tls, port: {tls_port}, interface: 127.0.0.1, tls: true}}\n"
        "facilities: conf/facilities.yaml")), encoding="utf-8")
    process = subprocess.Popen([GATEWAY, "run", "-c", project.config], cwd=project.root,
                               env=child_environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_port(tls_port, process)
        path = write_file(project, "oru.hl7", hl7msgs.message("oru", 8).encode("utf-8"))
        done = cli(project, "send", "--to", f"127.0.0.1:{tls_port}", "--tls",
                   "--ca", f"{dev_pki}/ca.crt", path)
        assert done.returncode == 1, done.stdout
        assert done.stderr.startswith(f"{path}#1: ")
        assert done.stderr.rstrip().endswith(
            "(the server requires a client certificate: give --cert and --key)"), done.stderr
        assert stop(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


class _MllpPeer:
    """A misbehaving MLLP server in a thread, on a port of its own: `answer(frame)` gives the
    bytes sent back for each frame received (b"" for none)."""

    def __init__(self, answer):
        self.answer, self.frames = answer, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        with connection:
            data = b""
            try:
                while chunk := connection.recv(65536):
                    data += chunk
                    while b"\x1c\r" in data:
                        payload, _, data = data.partition(b"\x1c\r")
                        self.frames.append(payload.lstrip(b"\x0b"))
                        connection.sendall(self.answer(self.frames[-1]))
            except OSError:  # the client hung up with answers unread (a reset): its choice
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def _ack(control_id: bytes, code: bytes = b"AA", charset: bytes = b"", more: bytes = b"") -> bytes:
    return (b"\x0bMSH|^~\\&|PEER|PEER|HIS|CHU|20250114083512||ACK|ACK-1|P|2.5|||||MA|" + charset
            + b"\rMSA|" + code + b"|" + control_id + b"\r" + more + b"\x1c\r")


def _control_id(frame: bytes) -> bytes:
    return frame.split(b"\r")[0].split(b"|")[9]


def _send_to_peer(project, answer, *arguments: str):
    """`gateway send ARGUMENTS` to an _MllpPeer that answers each frame with `answer(frame)`."""
    peer = _MllpPeer(answer)
    try:
        return cli(project, "send", "--to", f"127.0.0.1:{peer.port}", *arguments)
    finally:
        peer.close()


def test_send_stops_at_an_ack_for_another_message(project):
    """A server that acknowledges each message twice: the second ACK was read as the answer to
    the next message, which `send` printed as accepted, exit 0, although its own ACK never came.
    An ACK whose MSA-2 is not the message's MSH-10 fails the send and stops it."""
    first, second = hl7msgs.message("adt", 21), hl7msgs.message("adt", 22)
    path = write_file(project, "two.hl7", (first + second).encode("utf-8"))
    done = _send_to_peer(project, lambda frame: _ack(_control_id(frame)) * 2, "--timeout", "5", path)
    assert done.returncode == 1
    assert done.stdout.splitlines()[0] == f"{path}#1: AA B00000000021"
    assert done.stderr.strip() == (f"{path}#2: the answer is for control id 'B00000000021', "
                                   "not 'B00000000022'; nothing more sent")


def test_send_reads_the_answer_in_its_own_character_set(project):
    """MSA-2 and ERR are decoded as the answer's MSH-18 says (here Arabic in 8859/6), not as
    UTF-8, which turned every Arabic letter into U+FFFD."""
    reason = "رمز غير معروف"
    path = write_file(project, "adt.hl7", hl7msgs.message("adt", 23).encode("utf-8"))
    done = _send_to_peer(project, lambda frame: _ack(_control_id(frame), b"AE", b"8859/6",
                                                     b"ERR||PID^1|103|E||||" + reason.encode("iso8859-6") + b"\r"),
                         "--timeout", "5", path)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [f"{path}#1: AE B00000000023", f"    ERR||PID^1|103|E||||{reason}"]


def test_send_counts_a_release_2_commit_nak_as_a_failure(project):
    """MLLP release 2: a commit NAK says the message was not stored. With an AA after it,
    `send` printed AA and exited 0; with the NAK alone it waited out its whole timeout and
    said no answer came. Both are failures, named as such; a commit ACK changes nothing."""
    from adapters.mllp.framing import COMMIT_ACK_BLOCK, COMMIT_NAK_BLOCK

    path = write_file(project, "adt.hl7", hl7msgs.message("adt", 26).encode("utf-8"))
    for answer, code, line in (
            (lambda frame: COMMIT_NAK_BLOCK + _ack(_control_id(frame)), 1,
             f"{path}#1: commit NAK (not stored), AA B00000000026"),
            (lambda frame: COMMIT_NAK_BLOCK, 1, f"{path}#1: commit NAK (not stored), no answer"),
            (lambda frame: COMMIT_ACK_BLOCK + _ack(_control_id(frame)), 0, f"{path}#1: AA B00000000026")):
        started = time.monotonic()
        done = _send_to_peer(project, answer, "--timeout", "20", path)
        assert (done.returncode, done.stdout.splitlines()) == (code, [line]), done.stderr
        assert time.monotonic() - started < 15  # not the 20 s timeout
    done = _send_to_peer(project, lambda frame: COMMIT_NAK_BLOCK + _ack(_control_id(frame)), "--json", path)
    assert done.returncode == 1 and json.loads(done.stdout)["commit"] == "NAK"


def test_send_refuses_what_it_cannot_send_without_a_traceback(project, tmp_path):
    """A port out of range (70000 went to port 4464), a timeout a socket cannot take (0, NaN,
    inf), a directory as --ca, a host name IDNA cannot encode, an empty file (nothing was sent,
    exit 0): one line each, with exit 2 for usage and 1 otherwise."""
    path = write_file(project, "adt.hl7", hl7msgs.message("adt", 24).encode("utf-8"))
    empty = write_file(project, "empty.hl7", b"\r\n\n")
    for options, code, error in (
            (("--to", "127.0.0.1:70000", path), 2, "--to must be HOST:PORT"),
            (("--to", "127.0.0.1:99999999999999999999", path), 2, "--to must be HOST:PORT"),
            (("--to", "127.0.0.1:1", "--timeout", "0", path), 2, "argument --timeout: not a number"),
            (("--to", "127.0.0.1:1", "--timeout", "nan", path), 2, "argument --timeout: not a number"),
            (("--to", "127.0.0.1:1", "--timeout", "inf", path), 2, "argument --timeout: not a number"),
            (("--to", "127.0.0.1:1", "--tls", "--ca", str(tmp_path), path), 1,
             f"cannot read --ca {tmp_path}: a directory"),
            (("--to", "hôpital..:1", path), 1, "cannot connect to hôpital..:1: "),
            (("--to", f"127.0.0.1:{free_port()}", path, empty), 1, f"cannot send {empty}: no message in it")):
        done = cli(project, "send", *options)
        assert (done.returncode, done.stdout) == (code, ""), (options, done.stderr)
        assert error in done.stderr and "Traceback" not in done.stderr, (options, done.stderr)


def test_send_interrupted_by_ctrl_c_ends_quietly(project):
    """Ctrl-C while `send` waits for an ACK that never comes: exit 130, no traceback."""
    peer = _MllpPeer(lambda frame: b"")
    path = write_file(project, "adt.hl7", hl7msgs.message("adt", 25).encode("utf-8"))
    process = subprocess.Popen([GATEWAY, "send", "--to", f"127.0.0.1:{peer.port}", path],
                               cwd=project.root, env=child_environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 20
        while not peer.frames:  # the message is out: `send` waits for its answer
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, error = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        peer.close()
    assert process.returncode == 130
    assert b"Traceback" not in error and b"KeyboardInterrupt" not in error


def test_messages_list_json(project, gateway):
    """`messages list --json` prints one JSON object per stored message, newest first."""
    oru = write_file(project, "oru.hl7", hl7msgs.message("oru", 3).encode("utf-8"))
    adt = write_file(project, "adt.hl7", hl7msgs.message("adt", 5).encode("utf-8"))
    bad = write_file(project, "bad.hl7", BAD_MESSAGE)
    cli(project, "send", "--to", f"127.0.0.1:{project.port}", oru, adt, bad)
    done = cli(project, "messages", "list", "--json", "-c", project.config)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["control_id"] for r in rows] == ["BAD-CLI-1", "B00000000005", "B00000000003"]
    for row in rows:
        assert {"id", "control_id", "sending_application", "sending_facility", "message_type",
                "status", "received_at"} <= set(row)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?\+00:00", row["received_at"])
    # The ORU has no map in the test mapping set; the ADT translates (soon after its ACK).
    assert rows[0]["status"] == "rejected"
    assert rows[1]["status"] in ("received", "translated") and rows[2]["status"] in ("received", "failed")
    assert [r["message_type"] for r in rows] == ["XYZ^A01", "ADT^A01", "ORU^R01"]
    assert rows[2]["sending_application"] == "SIH_LABO" and rows[2]["sending_facility"] == "CHU_LYON"
    assert rows[0]["id"] > rows[1]["id"] > rows[2]["id"]
    filtered = cli(project, "messages", "list", "--json", "--status", "rejected", "--limit", "1",
                   "-c", project.config)
    assert [json.loads(line)["control_id"] for line in filtered.stdout.splitlines()] == ["BAD-CLI-1"]

    def listed(*options: str) -> list[str]:
        done = cli(project, "messages", "list", "--json", *options, "-c", project.config)
        assert done.returncode == 0, done.stderr
        return [json.loads(line)["control_id"] for line in done.stdout.splitlines()]

    # The console's search: a patient by its bundle (the ADT, once translated) or its payload.
    assert listed("--patient", "4500123456") == ["B00000000005"]
    assert listed("--patient", "4500987654") == ["B00000000003"]
    assert listed("--patient", "450098765") == []
    assert listed("--type", "oru") == ["B00000000003"]
    assert listed("--facility", "CHU_LYON", "--type", "ADT^A01") == ["B00000000005"]
    assert listed("--since", "2999-01-01") == [] and len(listed("--until", "2999-01-01T00:00+01:00")) == 3
    refused = cli(project, "messages", "list", "--since", "yesterday", "-c", project.config)
    assert refused.returncode == 2 and "not an ISO 8601 date or date-time: 'yesterday'" in refused.stderr
    # A bar without a value after it matched every payload holding an empty field.
    for identifier in ("|", "urn:ma:cnie|"):
        refused = cli(project, "messages", "list", "--patient", identifier, "-c", project.config)
        assert (refused.returncode, refused.stdout) == (2, "")
        assert "--patient is VALUE or SYSTEM|VALUE, with a value after the bar" in refused.stderr
    assert listed("--patient", "|4500987654") == ["B00000000003"]
    assert stop(gateway) == 0


def test_messages_list_text_columns_line_up(project, gateway):
    """The text table: a `translated` row (the longest status) keeps its ACK code, type and
    sender under their headings."""
    adt = write_file(project, "adt.hl7", hl7msgs.message("adt", 5).encode("utf-8"))
    assert cli(project, "send", "--to", f"127.0.0.1:{project.port}", adt).returncode == 0
    deadline = time.monotonic() + 20
    while json.loads(cli(project, "messages", "list", "--json", "-c", project.config)
                     .stdout)["status"] != "translated":
        assert time.monotonic() < deadline, "the ADT was not translated"
        time.sleep(0.2)
    header, row = cli(project, "messages", "list", "-c", project.config).stdout.splitlines()
    for heading in ("ack", "type", "sender"):
        column = header.index(f" {heading}") + 1
        assert row[column - 1] == " " and row[column] != " ", (header, row)
    assert row.split()[2:5] == ["translated", "CA", "ADT^A01"]
    assert stop(gateway) == 0


def test_output_into_a_closed_pipe_ends_quietly(project):
    """`gateway mappings export | head -1`: the command stops when the reader does, with no
    traceback on stderr. (The project's mapping set exports about 90 KB, more than a pipe holds.)"""
    mappings = Path(__file__).resolve().parent.parent / "mappings"
    process = subprocess.Popen([GATEWAY, "mappings", "export", "--format", "csv", "--mappings",
                                str(mappings), "-c", project.config], cwd=project.root,
                               env=child_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b'"map","source"')
    process.stdout.close()
    assert process.wait(60) == 141
    assert process.stderr.read() == b""


def test_messages_show(project, gateway):
    """`messages show ID` gives the text and the ACK: as JSON, and as text with French and Arabic intact."""
    message = hl7msgs.message("oru", 3)
    path = write_file(project, "oru.hl7", message.encode("utf-8"))
    sent = cli(project, "send", "--to", f"127.0.0.1:{project.port}", path)
    assert sent.returncode == 0
    [row] = [json.loads(line) for line in
             cli(project, "messages", "list", "--json", "-c", project.config).stdout.splitlines()]

    as_json = cli(project, "messages", "show", str(row["id"]), "--json", "-c", project.config)
    assert as_json.returncode == 0, as_json.stderr
    detail = json.loads(as_json.stdout)
    assert detail["text"] == message
    assert detail["ack"].startswith("MSH|^~\\&|MA_HIE_GATEWAY|MA_HIE|SIH_LABO|CHU_LYON|")
    assert "\rMSA|CA|B00000000003" in detail["ack"]
    assert detail["control_id"] == "B00000000003" and detail["codec"] == "utf-8"

    as_text = cli(project, "messages", "show", str(row["id"]), "-c", project.config)
    assert as_text.returncode == 0, as_text.stderr
    assert "PID|1||4500987654^^^CHU_LYON^PI||الحسيني^يوسف^^^^^L~El Husseini^Youssef" in as_text.stdout
    assert "OBX|1|NM|718-7^Hémoglobine [Masse/Volume] Sang^LN|" in as_text.stdout
    assert "Troponine très élevée" in as_text.stdout
    assert "\r" not in as_text.stdout  # segments shown one per line
    assert "--- ACK sent ---\nMSH|^~\\&|MA_HIE_GATEWAY" in as_text.stdout
    assert "MSA|CA|B00000000003" in as_text.stdout

    missing = cli(project, "messages", "show", str(row["id"] + 1000), "-c", project.config)
    assert missing.returncode == 1 and f"no message {row['id'] + 1000}" in missing.stderr
    assert stop(gateway) == 0


def test_numbers_beyond_a_database_integer_are_answered_without_a_traceback(project):
    """An id or a limit past 2**63-1 reached the database, whose driver raised OverflowError
    as a traceback: such an id is a usage error, such a limit or sequence means "all"."""
    huge = "99999999999999999999"
    for command in (("messages", "show", huge), ("messages", "replay", "1", huge)):
        done = cli(project, *command, "-c", project.config)
        assert done.returncode == 2 and f"not a message id: '{huge}'" in done.stderr, done.stderr
    for command in (("messages", "list", "--limit", huge), ("audit", "show", "--after", huge),
                    ("audit", "show", "--limit", huge)):
        done = cli(project, *command, "-c", project.config)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (command, done.stderr)


def test_invalid_config_makes_run_exit_2_with_located_errors(project):
    """`gateway run` on a wrong config exits 2 and lists every problem as file:line: key."""
    Path(project.config).write_text(textwrap.dedent("""\
        database:
          url: mysql://gateway@db/gateway
          pool_size: 0
        pki: {ca: certs/ca.crt, cert: certs/gw.crt, key: certs/gw.key}
        listeners:
          mllp:
            - name: mllp-plain
              port: 70000
              tls: maybe
        colour: blue
        facilities: conf/facilities.yaml
        """), encoding="utf-8")
    done = cli(project, "run", "-c", project.config, timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    errors = done.stderr
    assert "conf/gateway.yaml:2: database.url: must be a sqlite or postgresql URL" in errors
    assert "conf/gateway.yaml:3: database.pool_size: must be an integer between 1 and 256" in errors
    assert "conf/gateway.yaml:8: listeners.mllp[0].port: must be an integer between 1 and 65535" in errors
    assert "conf/gateway.yaml:9: listeners.mllp[0].tls: must be true or false" in errors
    assert "conf/gateway.yaml:10: colour: unknown key" in errors
    assert not project.database.exists()  # it stopped before touching the database


def test_pki_init_then_show(project, tmp_path):
    """`pki init --dir D` writes the CA, parties and registry facilities; `pki show --dir D` lists them."""
    directory = tmp_path / "pki-out"
    init = cli(project, "pki", "init", "--dir", str(directory), "-c", project.config)
    assert init.returncode == 0, init.stderr
    written = sorted(line.removeprefix("wrote ") for line in init.stdout.splitlines())
    names = ["INPE-100001", "INPE-100002", "ca", "gateway", "sandbox-cnss", "sandbox-record"]
    assert written == sorted([str(directory / f"{n}.{ext}") for n in names for ext in ("crt", "key")]
                             + [str(directory / "prescription-signing.key")])
    assert (directory / "ca.key").stat().st_mode & 0o077 == 0
    assert (directory / "prescription-signing.key").stat().st_mode & 0o077 == 0

    show = cli(project, "pki", "show", "--dir", str(directory), "-c", project.config)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == sorted(f"{n}.crt" for n in names)
    ca_line = next(line for line in lines if line.startswith("ca.crt:"))
    assert "(CA)" in ca_line and "MA HIE Development CA" in ca_line
    assert re.search(r"sha256 [0-9a-fA-F:]{32,}", ca_line)

    again = cli(project, "pki", "init", "--dir", str(directory), "-c", project.config)
    assert again.returncode == 0 and "nothing written" in again.stdout


def test_pki_show_of_an_empty_directory_fails(project, tmp_path):
    """`pki show` on a directory without certificates says to run `pki init` and exits 1."""
    done = cli(project, "pki", "show", "--dir", str(tmp_path / "none"), "-c", project.config)
    assert done.returncode == 1 and "gateway pki init" in done.stderr


# What a hostile sender can put in a message for the operator's terminal: an OSC 52 clipboard
# write ended by BEL, cursor moves and line erasure, a C1 CSI, backspaces, a bidi override.
_HOSTILE = ("\x1b]52;c;cm0gLXJmIH4=\x07", "\x1b[1A\x1b[2K", "\x9b31m", "\x08\x08", "\u202e")


def _hostile_adt() -> str:
    message = hl7msgs.message("adt", 31)
    return (message.replace("|SIH_LABO|CHU_LYON|", "|SIH\x1b]52;c;cm0gLXJmIH4=\x07LABO|CHU\u202eNOYL|", 1)
            .replace("|B00000000031|", "|B31\x1b[1A\x1b[2K|", 1)
            .replace("Lefèvre^", "Lefèvre\x9b31m\x08\x08^", 1))


def _assert_escaped(output: str) -> None:
    """None of the hostile characters reaches the terminal; each is shown escaped."""
    for raw in ("\x1b", "\x07", "\x9b", "\x08", "\u202e"):
        assert raw not in output, (raw, output)


def test_messages_list_and_show_escape_what_a_terminal_would_act_on(project, gateway):
    """MSH-3, MSH-4, MSH-10 and the text of a message are the sender's: in text mode they are
    printed with their control characters escaped (ESC as \\x1b, a bidi override as \\u202e),
    its segments still one a line and its French and Arabic letters as they are."""
    path = write_file(project, "hostile.hl7", _hostile_adt().encode("utf-8"))
    cli(project, "send", "--to", f"127.0.0.1:{project.port}", path)
    listed = cli(project, "messages", "list", "-c", project.config)
    assert listed.returncode == 0, listed.stderr
    _assert_escaped(listed.stdout)
    header, row = listed.stdout.splitlines()  # one row: nothing in it passes for another line
    assert "SIH\\x1b]52;c;cm0g" in row and row.endswith("B31\\x1b[1A\\x1b[2K")

    shown = cli(project, "messages", "show", "1", "-c", project.config)
    assert shown.returncode == 0, shown.stderr
    _assert_escaped(shown.stdout)
    assert "\r" not in shown.stdout and "\nEVN|A01|" in shown.stdout  # one segment a line
    assert "|SIH\\x1b]52;c;cm0gLXJmIH4=\\x07LABO|CHU\\u202eNOYL|" in shown.stdout
    assert "||Lefèvre\\x9b31m\\x08\\x08^Hélène^" in shown.stdout
    assert "NK1|1|بن علي^فاطمة^^^^^L|" in shown.stdout
    assert "control_id: B31\\x1b[1A\\x1b[2K" in shown.stdout

    # --json is for programs: the text exactly, C0 controls as JSON's escapes.
    as_json = cli(project, "messages", "show", "1", "--json", "-c", project.config)
    assert "\x1b" not in as_json.stdout and "\\u001b]52;c;" in as_json.stdout
    assert json.loads(as_json.stdout)["text"] == _hostile_adt()
    assert stop(gateway) == 0


def test_send_escapes_what_a_terminal_would_act_on_in_the_answer(project):
    """MSA-2 and the ERR segments come from the peer: printed with their escape sequences,
    C1 controls and bidi overrides escaped, its Arabic as it is."""
    reason = "رمز \x1b]52;c;cm0gLXJmIH4=\x07غير\x9b2J\u202e معروف"
    path = write_file(project, "adt.hl7", hl7msgs.message("adt", 32).encode("utf-8"))
    done = _send_to_peer(project, lambda frame: _ack(_control_id(frame) + b"\x1b[1A\x1b[2K", b"AE", b"UNICODE UTF-8",
                                                     b"ERR||PID^1|103|E||||" + reason.encode("utf-8") + b"\r"),
                         "--timeout", "5", path)
    assert done.returncode == 1, done.stderr
    _assert_escaped(done.stdout)
    assert done.stdout.splitlines() == [
        f"{path}#1: AE B00000000032\\x1b[1A\\x1b[2K",
        "    ERR||PID^1|103|E||||رمز \\x1b]52;c;cm0gLXJmIH4=\\x07غير\\x9b2J\\u202e معروف"]


@pytest.mark.parametrize("command", [
    ("messages", "list", "--patient", b"\xff"), ("messages", "list", "--control-id", b"M\xe91"),
    ("messages", "list", "--facility", b"CHU\xff"), ("messages", "list", "--type", b"\xffADT"),
    ("audit", "show", "--subject", b"message/\xff"), ("translate", "--sender", b"\xe9", "x.hl7"),
    ("send", "--to", b"h\xf4te:2575", "x.hl7"),
], ids=lambda command: " ".join(part if isinstance(part, str) else "BYTES" for part in command))
def test_an_argument_that_is_not_utf8_is_a_usage_error_not_a_traceback(command):
    """Bytes that are not UTF-8 in a text argument (a script in Latin-1) reached the database
    or the encoder as lone surrogates: UnicodeEncodeError and a traceback."""
    argv = [os.fsencode(part) for part in command]
    done = subprocess.run([sys.executable, "-c", "import sys; from gateway.cli import main; main(sys.argv[1:])",
                           *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "not UTF-8 text" in done.stderr and "Traceback" not in done.stderr

"""The translation commands as real processes: translate, mappings check/test/export/reload,
messages replay and show, on a project with its own small mapping set."""
from __future__ import annotations

import csv
import io
import json
import time

from cli_support import cli, gateway, project, stop, write_file  # noqa: F401 (fixtures)
from translation_support import ORU_FIX, hl7, write_mappings


def test_translate_prints_one_bundle_per_file_and_errors_with_location(project):
    """`gateway translate` prints one JSON line per good file; a bad one is named on stderr with
    its location, and the exit status is 1."""
    good = write_file(project, "good.hl7", hl7("C-1"))
    other = write_file(project, "other.hl7", hl7("C-2", birth="19900101"))
    bad = write_file(project, "bad.hl7", hl7("C-3", birth="19851399"))
    done = cli(project, "translate", good, other, "-c", project.config)
    assert done.returncode == 0, done.stderr
    bundles = [json.loads(line) for line in done.stdout.splitlines()]
    assert [b["entry"][0]["resource"]["birthDate"] for b in bundles] == ["1985-07-14", "1990-01-01"]
    failed = cli(project, "translate", good, bad, "--sender", "INPE-100001", "-c", project.config)
    assert failed.returncode == 1 and len(failed.stdout.splitlines()) == 1
    assert f"{bad}: PID[1]: map.birthDate: '19851399' is not a valid date" in failed.stderr
    unknown = cli(project, "translate", good, "--sender", "NOPE", "-c", project.config)
    assert unknown.returncode == 2 and "not in the facility registry" in unknown.stderr
    # A file of several messages: a bundle each, a failure named FILE#n (the second message
    # was left out without a word).
    both = write_file(project, "both.hl7", hl7("C-4") + hl7("C-5", birth="19851399"))
    several = cli(project, "translate", both, "-c", project.config)
    assert several.returncode == 1 and len(several.stdout.splitlines()) == 1
    assert f"{both}#2: PID[1]: map.birthDate: '19851399' is not a valid date" in several.stderr


def test_mappings_check_and_list(project):
    """`mappings check` says OK with the version; --list names types, maps, tables, transforms;
    a broken file gives every problem with file and line, and exit 1."""
    done = cli(project, "mappings", "check", "--list", "-c", project.config)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "ADT^A01" in out and "PID.Patient" in out and "gender" in out and "date " in out
    assert out.splitlines()[-1].startswith("mapping set sha256:") and out.rstrip().endswith("OK")
    (project.root / "mappings" / "segments" / "PID.Patient.yaml").write_text(
        "resource: Patient\nmap:\n  birthDat: {from: PID-7}\n  gender: {from: PID-8, lookup: sex}\n",
        encoding="utf-8")
    broken = cli(project, "mappings", "check", "-c", project.config)
    assert broken.returncode == 1
    assert "mappings/segments/PID.Patient.yaml:3: map.birthDat" in broken.stderr
    assert "mappings/segments/PID.Patient.yaml:4: map.gender.lookup: no code table 'sex'" in broken.stderr


def test_mappings_test_update_then_pass_then_fail(project):
    """`mappings test --update` writes expected bundles; then the cases pass; a changed mapping
    makes them fail with element paths, exit 1."""
    cases = project.root / "mappings" / "tests" / "adt"
    cases.mkdir(parents=True)
    (cases / "a01.hl7").write_bytes(hl7("G-1"))
    missing = cli(project, "mappings", "test", "-c", project.config)
    assert missing.returncode == 1 and "no expected output a01.json" in missing.stdout
    update = cli(project, "mappings", "test", "--update", "-c", project.config)
    assert update.returncode == 0 and (cases / "a01.json").exists()
    passing = cli(project, "mappings", "test", "-c", project.config)
    assert passing.returncode == 0 and "ok   adt/a01.hl7" in passing.stdout
    table = project.root / "mappings" / "tables" / "gender.yaml"
    table.write_text(table.read_text("utf-8").replace("M: male", "M: other"), encoding="utf-8")
    failing = cli(project, "mappings", "test", "-c", project.config)
    assert failing.returncode == 1
    assert "FAIL adt/a01.hl7" in failing.stdout and '.gender: "other", expected "male"' in failing.stdout
    (cases / "a01.json").write_text('{"resourceType": "Bundle",', encoding="utf-8")  # cut short
    (cases / "a01.warnings").write_bytes(b"\xff")
    unreadable = cli(project, "mappings", "test", "-c", project.config)
    assert unreadable.returncode == 1 and "Traceback" not in unreadable.stderr
    assert "FAIL adt/a01.hl7\n    cannot read the expected output: " in unreadable.stdout


def test_mappings_export_csv(project):
    """`mappings export --format csv` gives the guide's columns, one row per rule."""
    done = cli(project, "mappings", "export", "--format", "csv", "-c", project.config)
    assert done.returncode == 0, done.stderr
    rows = list(csv.reader(io.StringIO(done.stdout)))
    assert rows[0] == ["map", "source", "condition", "target", "transform", "lookup", "nested_map"]
    assert ["ADT_A01", "PID", "", "patient", "", "", "PID.Patient"] in rows
    assert ["PID.Patient", "PID-7", "", "birthDate", "date", "", ""] in rows
    assert ["PID.Patient", "PID-8", "", "gender", "", "gender", ""] in rows


def test_mappings_export_csv_keeps_commas_quotes_and_line_breaks_in_one_value(project):
    """A value with a lone carriage return was written unquoted (Python's csv quotes only the
    line terminator's characters): every reader cut that row in two."""
    pid = project.root / "mappings" / "segments" / "PID.Patient.yaml"
    pid.write_text(pid.read_text("utf-8") + '  active: {when: {field: PID-8, in: ["a,b", "say \\"x\\""]}, default: true}\n'
                   '  deceasedBoolean: {when: {field: PID-8, is: "line\\rbreak"}, default: true}\n', encoding="utf-8")
    for format, delimiter in (("csv", ","), ("tsv", "\t")):
        done = cli(project, "mappings", "export", "--format", format, "-c", project.config)
        assert done.returncode == 0, done.stderr
        rows = list(csv.reader(io.StringIO(done.stdout, newline=""), delimiter=delimiter))
        assert all(len(row) == 7 for row in rows), rows
        assert ["PID.Patient", "", 'PID-8 in [a,b, say "x"]', "active", "", "", "default True"] in rows
        assert ["PID.Patient", "", "PID-8 = line\rbreak", "deceasedBoolean", "", "", "default True"] in rows


def wait_for_status(project, expected: list[str], timeout: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        listed = cli(project, "messages", "list", "--json", "-c", project.config)
        found = [json.loads(line) for line in listed.stdout.splitlines()][::-1]
        if [row["status"] for row in found] == expected or time.monotonic() > deadline:
            assert [row["status"] for row in found] == expected
            return found


def test_replay_after_a_fix_and_show(project, gateway):
    """An ORU fails (no map), the map is added, `messages replay --status failed` translates it;
    `messages show --json` then gives the status, the mapping version and the bundle."""
    oru = write_file(project, "oru.hl7", hl7("P-1", kind="ORU^R01^ORU_R01"))
    sent = cli(project, "send", "--to", f"127.0.0.1:{project.port}", oru)
    assert sent.returncode == 0, sent.stdout
    [row] = wait_for_status(project, ["failed"])
    shown = json.loads(cli(project, "messages", "show", str(row["id"]), "--json", "-c", project.config).stdout)
    assert shown["translation_status"] == "failed" and shown["bundle"] is None
    assert shown["translation_error_location"] == "MSH[1]-9"
    text = cli(project, "messages", "show", str(row["id"]), "-c", project.config).stdout
    assert "translation_error_reason: no mapping for message type 'ORU^R01'" in text

    write_mappings(project.root / "mappings", ORU_FIX)
    replay = cli(project, "messages", "replay", "--status", "failed", "-c", project.config)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout.strip() == f"{row['id']}: translated"
    shown = json.loads(cli(project, "messages", "show", str(row["id"]), "--json", "-c", project.config).stdout)
    assert shown["status"] == "translated" and shown["translation_status"] == "translated"
    assert shown["mapping_version"].startswith("sha256:")
    assert shown["bundle"]["entry"][0]["resource"]["resourceType"] == "Patient"
    # An id given twice is replayed once, and counted once ("2 of 2" said one more than done).
    again = cli(project, "messages", "replay", str(row["id"]), str(row["id"]), "-c", project.config)
    assert again.returncode == 0 and again.stdout.strip() == f"{row['id']}: translated"
    assert again.stderr.startswith("1 of 1 translated"), again.stderr
    # Each replay is in the audit trail, by whom and of what.
    audit = cli(project, "audit", "show", "--json", "--subject", f"message/{row['id']}", "--limit", "1000",
                "-c", project.config)
    replays = [r for r in map(json.loads, audit.stdout.splitlines()) if r["action"] == "delivery.replayed"]
    assert [(r["subject"], r["actor"].startswith("cli:")) for r in replays] == [(f"message/{row['id']}", True)] * 2
    assert stop(gateway) == 0


def test_reload_by_command_keeps_the_old_set_when_broken(project, gateway):
    """`mappings reload` refuses to signal a broken set; SIGHUP with a broken set logs every
    problem and keeps the old set; after the fix the reload takes effect on new messages,
    on the same connection-less gateway, without a restart."""
    import os
    import signal

    pid_file = project.root / "var" / "gateway.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert int(pid_file.read_text()) == gateway.pid

    broken = project.root / "mappings" / "messages" / "ORU_R01.yaml"
    broken.write_text("messages: [ORU^R01]\nresources:\n  - name: patient\n    from: PID\n    map: PID.Patiente\n",
                      encoding="utf-8")
    refused = cli(project, "mappings", "reload", "-c", project.config)
    assert refused.returncode == 1 and "PID.Patiente" in refused.stderr
    os.kill(gateway.pid, signal.SIGHUP)  # the gateway checks for itself, too
    log = project.root / "gateway.log"
    deadline = time.monotonic() + 30
    while "refused" not in log.read_text("utf-8") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "PID.Patiente" in log.read_text("utf-8")

    oru = write_file(project, "oru.hl7", hl7("H-1", kind="ORU^R01^ORU_R01"))
    cli(project, "send", "--to", f"127.0.0.1:{project.port}", oru)
    wait_for_status(project, ["failed"])  # the old set, without ORU^R01

    write_mappings(project.root / "mappings", ORU_FIX)
    done = cli(project, "mappings", "reload", "-c", project.config)
    assert done.returncode == 0 and f"pid {gateway.pid}" in done.stdout
    deadline = time.monotonic() + 30
    while "mapping set reloaded" not in log.read_text("utf-8") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "mapping set reloaded" in log.read_text("utf-8")  # before the next message is sent
    oru2 = write_file(project, "oru2.hl7", hl7("H-2", kind="ORU^R01^ORU_R01"))
    cli(project, "send", "--to", f"127.0.0.1:{project.port}", oru2)
    wait_for_status(project, ["failed", "translated"])
    assert stop(gateway) == 0
    assert not pid_file.exists()


def test_reload_without_a_running_gateway_fails(project):
    done = cli(project, "mappings", "reload", "-c", project.config)
    assert done.returncode == 1 and "no running gateway" in done.stderr

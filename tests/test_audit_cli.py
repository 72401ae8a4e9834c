"""`gateway audit verify` and `show` as real processes: an intact trail exits 0; each kind of
tampering done by SQL (an updated detail, a deleted middle record, a forged record, two
records' seq swapped) exits 1 and names the record where it shows."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from process_support import child_environment
from sqlalchemy import text

from gateway.audit.chain import AuditEvent, chain
from gateway.audit.trail import AuditTrail
from gateway.store.database import create_gateway_engine, migrate


@pytest.fixture
def project(tmp_path, dev_pki, db_url):
    config = tmp_path / "gateway.yaml"
    config.write_text(textwrap.dedent(f"""\
        node:
          name: audit-test
        database:
          url: {db_url}
        pki:
          ca: {dev_pki}/ca.crt
          cert: {dev_pki}/gateway.crt
          key: {dev_pki}/gateway.key
        identity:
          application: MA_HIE_GATEWAY
          facility: MA_HIE
        """), encoding="utf-8")
    engine = create_gateway_engine(db_url)
    migrate(engine)
    trail = AuditTrail(engine, "audit-test")
    trail.append([AuditEvent("message.received", "INPE-100001", subject=f"message/{n}",
                             source="10.20.0.5:40000", detail={"control_id": f"C{n}", "size": 900 + n})
                  for n in range(1, 9)])
    yield trail, str(config), tmp_path
    engine.dispose()


def audit(config: str, cwd, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "gateway", "audit", *args, "-c", config], cwd=cwd,
                          env=child_environment(), capture_output=True, timeout=120)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode("utf-8"),
                                       done.stderr.decode("utf-8"))


def sql(trail, *statements, **params):
    with trail.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement), params)


def findings(output: str) -> list[tuple[int, str]]:
    return [(int(seq), problem) for seq, problem in
            re.findall(r"^record (\d+) \(\d{4}-\d\d-\d\dT[\d:.]+Z\): ([a-z-]+): ", output, re.M)]


def test_an_intact_trail_exits_0_with_its_count_range_and_head(project):
    trail, config, cwd = project
    with trail.engine.connect() as conn:
        head = trail.head(conn)
    done = audit(config, cwd, "verify", "--batch", "3")
    assert done.returncode == 0, done.stderr
    assert "audit trail: 8 records, seq 1 to 8" in done.stdout
    assert f"head hash: {head.hash}" in done.stdout and done.stdout.rstrip().endswith("intact")
    shown = audit(config, cwd, "show", "--json", "--subject", "message/3")
    assert shown.returncode == 0, shown.stderr
    [line] = shown.stdout.splitlines()
    assert json.loads(line)["seq"] == 3 and json.loads(line)["detail"]["control_id"] == "C3"


def test_every_kind_of_tampering_exits_1_and_is_located(project):
    trail, config, cwd = project
    with trail.engine.connect() as conn:
        records = list(trail.records(conn))
    sql(trail, "UPDATE audit_log SET detail = :d WHERE seq = 2", d='{"control_id":"C2","size":1}')
    sql(trail, "DELETE FROM audit_log WHERE seq = 4")
    # A forged record chained to record 5, under seq 6 beside the real one.
    fifth = records[4]
    forged = chain(5, fifth.hash, "audit-test", [AuditEvent("message.read", "console:mallory",
                                                            at=fifth.at + timedelta(seconds=1))],
                   fifth.at)[0]
    at = forged.at.replace(tzinfo=None) if trail.engine.dialect.name == "sqlite" else forged.at
    sql(trail, "INSERT INTO audit_log (seq, recorded_at, node, action, actor, outcome, detail, "
               "prev_hash, hash) VALUES (6, :at, 'audit-test', 'message.read', 'console:mallory', "
               "'success', '{}', :prev, :hash)", at=at, prev=forged.prev_hash, hash=forged.hash)
    sql(trail, "UPDATE audit_log SET seq = -7 WHERE seq = 7", "UPDATE audit_log SET seq = 7 WHERE seq = 8",
        "UPDATE audit_log SET seq = 8 WHERE seq = -7")
    done = audit(config, cwd, "verify")
    assert done.returncode == 1, done.stdout + done.stderr
    found = findings(done.stdout)
    assert (2, "altered") in found  # the detail
    assert (5, "removed") in found  # record 4 went
    assert any(seq == 6 and problem in ("inserted", "reordered", "broken-link") for seq, problem in found)
    assert (7, "altered") in found and (8, "altered") in found  # the swap
    assert "NOT intact" in done.stdout
    assert re.search(r"record 2 \(" + re.escape(records[1].at.strftime("%Y-%m-%dT%H:%M:%S")), done.stdout)


def test_show_prints_one_line_per_record_whatever_its_texts_hold(project):
    """A login name typed at the console is recorded as typed: a line break in it made one
    record pass for two in `audit show`, and an escape sequence could erase the lines above
    it on the operator's terminal. They are shown escaped."""
    trail, config, cwd = project
    trail.append([AuditEvent("console.login", "x\n       9  2026-01-01T00:00:00.000000Z  fake",
                             "refused", source="10.0.0.9:5000"),
                  AuditEvent("console.login", "\x1b[1A\x1b[2Kadmin\u202e", "refused",
                             subject="\x9bmessage/1", detail={"reason": "unknown\u2028account"})])
    done = audit(config, cwd, "show")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 10 and [line.split()[0] for line in lines] == [str(n) for n in range(1, 11)]
    assert "\x1b" not in done.stdout and "\x9b" not in done.stdout and "\u202e" not in done.stdout
    assert "x\\n       9" in lines[8] and "\\x1b[1A\\x1b[2Kadmin\\u202e" in lines[9]
    assert "\\x9bmessage/1" in lines[9] and "unknown\\u2028account" in lines[9]

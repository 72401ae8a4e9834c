"""The console's pure parts: password hashes (and `gateway accounts hash`), the HL7 layout with
hl7apy's field names, login throttling, the search form's checks."""
from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from datetime import datetime, timezone

import pytest
import yaml

from gateway.config import PASSWORD_HASH
from gateway.console.criteria import InvalidSearch, parse_search
from gateway.console.hl7_layout import MAX_CHARS, MAX_SEGMENTS, MAX_VALUES, field_name, layout
from gateway.console.passwords import DUMMY_HASH, hash_password, verify_password
from gateway.console.throttle import LoginThrottle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- passwords ---------------------------------------------------------------------------------

def test_a_hash_has_the_configured_form_and_verifies_only_its_password():
    made = hash_password("correct horse")
    assert PASSWORD_HASH.fullmatch(made)
    scheme, n, r, p, salt, key = made.split("$")
    assert (scheme, n, r, p) == ("scrypt", "32768", "8", "1")
    assert len(salt) == 22 and len(key) == 43 and "=" not in salt + key  # 16 and 32 bytes, unpadded
    assert verify_password("correct horse", made)
    assert not verify_password("correct horse ", made)
    assert not verify_password("", made)
    assert hash_password("correct horse") != made  # a fresh salt each time


def test_the_shipped_development_accounts_verify():
    with open(os.path.join(ROOT, "conf", "gateway.yaml"), encoding="utf-8") as handle:
        accounts = {a["name"]: a["password_hash"] for a in yaml.safe_load(handle)["console"]["accounts"]}
    for name in ("admin", "operator", "viewer"):
        assert verify_password(f"{name}-dev", accounts[name])
        assert not verify_password("admin-dev" if name != "admin" else "viewer-dev", accounts[name])


@pytest.mark.parametrize("stored", [
    "", "plain-password", "scrypt$32768$8$1$short$" + "A" * 43,
    "scrypt$3$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # N not a power of two
    "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,  # N too costly to compute
    "scrypt$32768$99$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
    "bcrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43,
])
def test_malformed_or_unreasonable_hashes_verify_nothing(stored):
    started = time.monotonic()
    assert not verify_password("anything", stored)
    assert time.monotonic() - started < 2


def test_the_dummy_hash_costs_a_real_verification():
    assert PASSWORD_HASH.fullmatch(DUMMY_HASH)
    started = time.monotonic()
    assert not verify_password("anything", DUMMY_HASH)
    assert time.monotonic() - started > 0.01  # scrypt ran: an unknown name takes as long


def test_accounts_hash_reads_stdin_and_refuses_short_passwords():
    command = [sys.executable, "-m", "gateway", "accounts", "hash", "--stdin"]
    done = subprocess.run(command, input="motdepasse-console\n", capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.strip()
    assert PASSWORD_HASH.fullmatch(printed) and verify_password("motdepasse-console", printed)
    assert "motdepasse" not in done.stdout + done.stderr.replace("password", "")
    short = subprocess.run(command, input="court\n", capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and short.stdout == "" and "8 characters" in short.stderr
    # The login form reads 1,024 characters: a longer password's account could never log in.
    long = subprocess.run(command, input="x" * 1025 + "\n", capture_output=True, text=True, timeout=60)
    assert long.returncode == 1 and long.stdout == "" and "at most 1024 characters" in long.stderr


def _on_terminal(answers: list[str]) -> tuple[int, str, str]:
    """Run `gateway accounts hash` with a pseudo-terminal as its controlling terminal, typing
    `answers` at its prompts; (exit status, terminal text, stdout)."""
    master, slave = os.openpty()

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([sys.executable, "-m", "gateway", "accounts", "hash"], stdin=slave,
                               stdout=subprocess.PIPE, stderr=slave, preexec_fn=controlling_terminal,
                               pass_fds=(slave,))
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 30
    pending = list(answers)
    while time.monotonic() < deadline and process.poll() is None:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 1024)
            except OSError:
                break
        prompts = seen.count(b"Password: ") + seen.count(b"Again: ")
        if pending and prompts > len(answers) - len(pending):
            os.write(master, pending.pop(0).encode() + b"\n")
    out = process.stdout.read().decode()
    process.wait(timeout=30)
    os.close(master)
    return process.returncode, seen.decode("utf-8", "replace"), out


def test_accounts_hash_asks_twice_without_echo():
    status, terminal, out = _on_terminal(["secret-de-console", "secret-de-console"])
    assert status == 0 and verify_password("secret-de-console", out.strip())
    assert "secret-de-console" not in terminal  # not echoed
    status, terminal, out = _on_terminal(["secret-de-console", "autre-secret"])
    assert status == 1 and out == "" and "differ" in terminal


# -- the HL7 layout --------------------------------------------------------------------------

def test_fields_are_numbered_as_hl7_counts_them_and_named_from_the_version():
    text = ("MSH|^~\\&|APP|FAC|||20250101||ORU^R01|C1|P|2.5\r"
            "PID|1||123^^^MA~X9^^^CNIE||بنعلي^فاطمة\n"
            "OBX|1|ST|GLU^Glucose||5.4||||||F\r\n"
            "ZXY|1|site\r")
    segments = layout(text, "2.5")
    assert [(s.name, s.index) for s in segments] == [("MSH", 1), ("PID", 2), ("OBX", 3), ("ZXY", 4)]
    msh = {f.position: f for f in segments[0].fields}
    assert (msh["MSH-1"].value, msh["MSH-2"].value, msh["MSH-9"].value) == ("|", "^~\\&", "ORU^R01")
    assert msh["MSH-10"].name == "Message Control Id" and msh["MSH-12"].name == "Version Id"
    assert msh["MSH-2"].repetitions == ("^~\\&",)  # never split on its own ~
    pid = {f.position: f for f in segments[1].fields}
    assert pid["PID-3"].repetitions == ("123^^^MA", "X9^^^CNIE")
    assert pid["PID-5"].name == "Patient Name" and pid["PID-5"].value == "بنعلي^فاطمة"
    assert "PID-2" not in pid  # empty fields are left out
    assert {f.position: f.name for f in segments[2].fields}["OBX-5"] == "Observation Value"
    assert [f.name for f in segments[3].fields] == ["", ""]  # a Z-segment has no definition


def test_declared_separators_and_versions_are_followed():
    text = "MSH#^!\\&#APP#FAC#####ADT^A01#C2#P#2.3\rPID#1##A!B##NAME\r"
    segments = layout(text, "2.3")
    pid = {f.position: f for f in segments[1].fields}
    assert pid["PID-3"].repetitions == ("A", "B") and pid["PID-5"].value == "NAME"
    assert field_name("PID", 5, "2.3") == "Patient Name"
    assert field_name("PID", 5, "9.9") == "Patient Name"  # unknown version: 2.5
    assert field_name("PV1", 2, None) == "Patient Class"
    assert field_name("QQQ", 1) == ""
    assert field_name("PID", 6) == "Mother's Maiden Name"



def test_a_message_of_millions_of_fields_is_laid_out_within_bounds():
    """A message of "a|a|a|...", "b~b~b..." or of millions of segments (16 MiB is allowed) was
    laid out whole: millions of fields, gigabytes of memory and a page of hundreds of MB when
    an operator opened it. The page shows MAX_VALUES of them; the decoded text has the rest."""
    head = "MSH|^~\\&|APP|FAC|||20250101||ADT^A01|C1|P|2.5\r"
    for text in (head + "ZZZ|" + "a|" * 1_000_000, head + "PID|1||" + "b~" * 1_000_000,
                 head + "OBX|1|ST\r" * 1_000_000):
        segments = layout(text, "2.5")
        shown = sum(len(field.repetitions) for segment in segments for field in segment.fields)
        assert shown <= MAX_VALUES and len(segments) <= MAX_SEGMENTS
        msh = {field.position: field.value for field in segments[0].fields}
        assert msh["MSH-10"] == "C1"


def test_a_message_of_long_fields_is_laid_out_within_bounds():
    """One field of 16 MiB, or 50,000 of 300 characters, were laid out whole: a page of 128 MB
    (the decoded text shown a second time, escaped). The table shows MAX_CHARS of them."""
    head = "MSH|^~\\&|APP|FAC|||20250101||ADT^A01|C1|P|2.5\r"
    for text in (head + "PID|1||" + "<" * (16 * 1024 * 1024), head + ("OBX|" + "|".join(["x" * 300] * 25) + "\r") * 2000,
                 head + "NTE|1||" + "~".join(["y" * 1000] * 5000)):
        segments = layout(text, "2.5")
        pieces = [piece for segment in segments for field in segment.fields for piece in field.repetitions]
        assert sum(len(piece) for piece in pieces) <= MAX_CHARS + 1
        assert pieces[-1].endswith("…") and not any(piece.endswith("…") for piece in pieces[:-1])
        msh = {field.position: field.value for field in segments[0].fields}
        assert msh["MSH-10"] == "C1" and segments[1].fields[0].repetitions[0] in ("1", "x" * 300)

# -- throttling, search form ---------------------------------------------------------------------

def test_throttle_pauses_one_account_at_one_address_then_forgets():
    throttle = LoginThrottle(attempts=3, pause=60, max_entries=4)
    for _ in range(3):
        assert not throttle.paused("amina", "10.0.0.1", 100.0)
        throttle.failed("amina", "10.0.0.1", 100.0)
    assert throttle.paused("amina", "10.0.0.1", 100.0)
    assert not throttle.paused("amina", "10.0.0.2", 100.0)
    assert not throttle.paused("omar", "10.0.0.1", 100.0)
    assert throttle.paused("amina", "10.0.0.1", 159.9)
    assert not throttle.paused("amina", "10.0.0.1", 160.0)
    throttle.failed("amina", "10.0.0.1", 161.0)  # a fresh count after the pause
    assert not throttle.paused("amina", "10.0.0.1", 161.0)
    throttle.failed("omar", "10.0.0.1", 1.0)
    throttle.succeeded("omar", "10.0.0.1")
    for i in range(10):  # a flood of names stays bounded
        throttle.failed(f"name{i}", "10.0.0.9", 1.0)
    assert len(throttle._records) == 4


def test_search_parameters_are_checked():
    criteria = parse_search({"control_id": [" C1 "], "type": ["ADT^A01"], "status": ["failed"],
                             "since": ["2025-01-02T08:30"], "until": ["2025-01-03"], "before": ["42"],
                             "patient": [""]})
    assert (criteria.control_id, criteria.type, criteria.status, criteria.before, criteria.patient) == \
        ("C1", "ADT^A01", "failed", 42, None)
    assert criteria.since == datetime(2025, 1, 2, 8, 30, tzinfo=timezone.utc)
    assert criteria.query(before=7) == {"control_id": "C1", "type": "ADT^A01", "status": "failed",
                                        "since": "2025-01-02T08:30", "until": "2025-01-03T00:00",
                                        "before": "7"}
    assert parse_search({"since": ["2025-01-02T10:30+01:00"]}).since == datetime(2025, 1, 2, 9, 30,
                                                                                 tzinfo=timezone.utc)
    # On the operators' clock: Morocco is at +00 during Ramadan (1 March 2026), +01 otherwise.
    from zoneinfo import ZoneInfo

    casablanca = ZoneInfo("Africa/Casablanca")
    ramadan = parse_search({"since": ["2026-03-01T10:00"], "until": ["2026-06-01T10:00"]}, casablanca)
    assert (ramadan.since, ramadan.until) == (datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc),
                                              datetime(2026, 6, 1, 9, 0, tzinfo=timezone.utc))
    assert ramadan.form_values()["until"] == "2026-06-01T10:00"  # shown back as typed
    with pytest.raises(InvalidSearch) as refused:
        parse_search({"status": ["x"], "type": ["A B"], "since": ["demain"], "patient": ["\x07"],
                      "facility": ["F" * 200], "before": ["1e3"]})
    assert len(refused.value.problems) == 6


@pytest.mark.parametrize("before", ["\u00b2", "\u2460", "\u0661\u0662"])
def test_a_page_number_in_other_digits_is_refused_as_such(before):
    """"²" and "①" are digits to str.isdigit() and not to int(): a ValueError that was not an
    InvalidSearch, and the console answered 500."""
    with pytest.raises(InvalidSearch) as refused:
        parse_search({"before": [before]})
    assert refused.value.problems == ["Page : un numéro de message"]


@pytest.mark.parametrize("identifier", ["|", "urn:ma:cnie|", "a|b|c", "||"])
def test_a_patient_search_without_a_value_is_refused(identifier):
    """`SYSTEM|` or a lone bar searched the payloads for an empty component ('||'): nearly
    every message matched, whoever the patient."""
    with pytest.raises(InvalidSearch) as refused:
        parse_search({"patient": [identifier]})
    assert refused.value.problems == ["Identifiant patient : VALEUR ou SYSTÈME|VALEUR, une valeur après la barre"]


@pytest.mark.parametrize("identifier", ["BE123456", "|BE123456", "urn:ma:cnie|BE123456"])
def test_a_patient_search_with_a_value_is_kept(identifier):
    assert parse_search({"patient": [identifier]}).patient == identifier

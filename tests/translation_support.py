"""A small, fixed mapping set for the translation tests (the real one under mappings/ changes
while integration engineers work), synthetic messages, and store helpers."""
from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path

from sqlalchemy import text

from gateway.store.database import create_gateway_engine

FILES = {
    "messages/ADT_A01.yaml": """\
        messages: [ADT^A01, ADT^A04]
        resources:
          - name: patient
            from: PID
            map: PID.Patient
        """,
    "segments/PID.Patient.yaml": """\
        description: PID -> Patient (test subset)
        resource: Patient
        map:
          identifier:
            - each: PID-3
              map: {value: {from: 1}, system: {from: 4}}
          # required: a birth date that is no date fails the translation (the tests' way to
          # make one fail; an optional one would be left out with a warning).
          birthDate: {from: PID-7, transform: date, required: true}
          gender: {from: PID-8, lookup: gender}
        """,
    "tables/gender.yaml": """\
        description: HL7 table 0001 (test subset)
        unmapped: default
        default: unknown
        codes:
          F: female
          M: male
        """,
}

# The fix that makes ORU^R01 translatable: replay tests add it after a failure.
ORU_FIX = {
    "messages/ORU_R01.yaml": """\
        messages: [ORU^R01]
        resources:
          - name: patient
            from: PID
            map: PID.Patient
        """,
}


def write_mappings(directory: Path, extra: dict[str, str] | None = None) -> Path:
    """The test mapping set (plus `extra` files) under `directory`; returns it."""
    for name, content in {**FILES, **(extra or {})}.items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(content), encoding="utf-8")
    return Path(directory)


def hl7(control_id: str, kind: str = "ADT^A01^ADT_A01", birth: str = "19850714",
        facility: str = "FAC_TEST", application: str = "HIS_TEST", ack_modes: str = "") -> bytes:
    """A small synthetic v2.5 message (original mode unless `ack_modes` gives MSH-15|MSH-16)."""
    modes = ack_modes or "|"
    return (f"MSH|^~\\&|{application}|{facility}|MA_HIE_GATEWAY|MA_HIE|20250114083512||{kind}|"
            f"{control_id}|P|2.5|||{modes}|MAR|UNICODE UTF-8\r"
            f"PID|1||P-{control_id}^^^CHU^PI||Benali^Karim||{birth}|M\r").encode("utf-8")


def with_mappings(config, directory: Path):
    """`config` translating with the mapping set in `directory`."""
    from gateway.config import MappingsConfig

    return dataclasses.replace(config, mappings=MappingsConfig(directory=str(directory)))


def rows(db_url: str, sql: str, **params) -> list:
    engine = create_gateway_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def wait_for(db_url: str, sql: str, expected, timeout: float = 15.0, **params) -> list:
    """Poll `sql` until its rows (as tuples) equal `expected`; returns them (or fails)."""
    deadline = time.monotonic() + timeout
    found = None
    while time.monotonic() < deadline:
        found = [tuple(row) for row in rows(db_url, sql, **params)]
        if found == expected:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{sql}: {found!r}, expected {expected!r}")

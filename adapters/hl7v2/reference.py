"""What HL7 v2 defines, from hl7apy's reference tables: the versions we accept and the
message types (table 0076) and trigger events (table 0003) we recognise.

The sets are the union over versions 2.3.1 to 2.8.2, so a sender's slightly off version
label does not turn a real message type into an error. They are computed once, lazily.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

SUPPORTED_VERSIONS = frozenset({
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
    "2.8", "2.8.1", "2.8.2", "2.9",
})

_TABLE_VERSIONS = ("2_3_1", "2_4", "2_5", "2_5_1", "2_6", "2_7", "2_8", "2_8_1", "2_8_2")


@lru_cache(maxsize=None)
def _table_union(table: str) -> frozenset[str]:
    values: set[str] = set()
    for version in _TABLE_VERSIONS:
        try:
            tables = importlib.import_module(f"hl7apy.v{version}.tables").TABLES
        except ImportError:
            continue
        if table in tables:
            values.update(tables[table][1])
    return frozenset(values)


def message_types() -> frozenset[str]:
    """MSH-9.1 values HL7 defines (table 0076)."""
    return _table_union("HL70076")


def trigger_events() -> frozenset[str]:
    """MSH-9.2 values HL7 defines (table 0003)."""
    return _table_union("HL70003")


def version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    """Compare a dotted MSH-12 version ('2.5.1') to a tuple; unparseable counts as old."""
    try:
        parts = tuple(int(p) for p in version.split("."))
    except ValueError:
        return False
    return parts >= minimum

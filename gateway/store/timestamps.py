"""Timestamps read back from the store. Pure code."""
from __future__ import annotations

from datetime import datetime, timezone


def utc(value: datetime) -> datetime:
    """A timestamp as an aware UTC datetime: SQLite gives back UTC without its offset,
    PostgreSQL an aware value in the session's zone."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)

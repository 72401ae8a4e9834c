"""When the daily retention run happens: `run_at` (HH:MM) in the node's local time. Pure code.

The local time is the zone named by the TZ environment variable when it names one
(zoneinfo), else Africa/Casablanca, the platform's. Each next run is computed from the wall
clock again, so a change of offset (Morocco moves its clocks around Ramadan) moves no run.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from datetime import datetime, time, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

log = logging.getLogger(__name__)

DEFAULT_ZONE = "Africa/Casablanca"


def local_zone(environ: Mapping[str, str] = os.environ) -> tzinfo:
    """The zone of TZ (an IANA name, optionally with a leading ':'), else DEFAULT_ZONE."""
    name = (environ.get("TZ") or "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            log.warning("TZ=%r names no time zone; retention runs on %s time", name, DEFAULT_ZONE)
    return ZoneInfo(DEFAULT_ZONE)


def parse_run_at(run_at: str) -> time:
    """'03:00' -> time(3, 0); ValueError when it is not HH:MM."""
    hours, _, minutes = run_at.partition(":")
    if not (hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(f"run_at {run_at!r} is not HH:MM")
    return time(int(hours), int(minutes))


def next_run(now: datetime, run_at: str, zone: tzinfo) -> datetime:
    """The first instant strictly after `now` when the local clock of `zone` reads `run_at`
    (a time a clock change skips is taken as the same wall time with the offset before it),
    as an aware UTC datetime."""
    now = now.astimezone(timezone.utc) if now.tzinfo else now.replace(tzinfo=timezone.utc)
    at = parse_run_at(run_at)
    day = now.astimezone(zone).date()
    while True:
        candidate = datetime.combine(day, at, tzinfo=zone).astimezone(timezone.utc)
        if candidate > now:
            return candidate
        day += timedelta(days=1)


__all__ = ["DEFAULT_ZONE", "local_zone", "next_run", "parse_run_at"]

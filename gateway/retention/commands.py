"""`gateway retention run [--now ISO] [--json]`: one retention run from the command line, its
report printed. Exit status 0 when it ran (or another node was running it), 2 when --now is
not an instant between 2000 and the present or the database cannot be reached."""
from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone

from sqlalchemy.exc import SQLAlchemyError

from gateway.audit.trail import AuditTrail
from gateway.config import GatewayConfig
from gateway.retention.run import run_retention
from gateway.retention.service import audit_exports_of
from gateway.store.database import create_gateway_engine, migrate


EARLIEST = datetime(2000, 1, 1, tzinfo=timezone.utc)
# A run counts back from --now: one later than the present (a mistyped year) would expire what
# is still to be kept. The slack is for clocks a little apart.
LATEST_AHEAD = timedelta(hours=1)


def parse_now(value: str | None) -> datetime:
    """An ISO 8601 instant (UTC when it names no offset), or now."""
    if not value:
        return datetime.now(timezone.utc)
    instant = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return instant if instant.tzinfo else instant.replace(tzinfo=timezone.utc)


def run(config: GatewayConfig, args) -> int:
    try:
        now = parse_now(getattr(args, "now", None))
    except ValueError:
        print(f"--now {args.now!r} is not an ISO 8601 instant (2026-11-22T03:00:00Z)", file=sys.stderr)
        return 2
    if not EARLIEST <= now <= datetime.now(timezone.utc) + LATEST_AHEAD:
        print(f"--now {args.now!r} is not between {EARLIEST.date()} and the present: counting "
              "back from a later instant would expire what is still to be kept", file=sys.stderr)
        return 2
    engine = create_gateway_engine(config.database.url, 1)
    try:
        migrate(engine)
        report = run_retention(engine, config.retention, now, AuditTrail(engine, config.node_name),
                               exports=audit_exports_of(config))
    except SQLAlchemyError as error:
        print(f"retention run failed: {error.__class__.__name__}: {getattr(error, 'orig', None) or error}",
              file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if getattr(args, "json", False):
        print(json.dumps(report.as_dict(), ensure_ascii=False))
    else:
        print("\n".join(report.lines()))
    return 0

"""`gateway audit verify` and `gateway audit show`: the trail from the command line.

verify prints the number of records, the first and last seq, the head hash (compare it with a
copy kept elsewhere: cutting records off the end leaves a shorter valid chain) and every break
as "record N (recorded_at): problem: reason"; exit status 0 when intact, 1 when not, 2 when
the trail cannot be read.
"""
from __future__ import annotations

import json
import sys

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from gateway.audit.trail import AuditTrail, record_from_row
from gateway.config import GatewayConfig
from gateway.store.database import create_gateway_engine
from gateway.store.schema import audit_log
from gateway.terminal import printable, printable_json


def verify(config: GatewayConfig, args) -> int:
    engine = create_gateway_engine(config.database.url, 1)
    try:
        result = AuditTrail(engine, config.node_name).verify(batch=getattr(args, "batch", 10_000))
    except SQLAlchemyError as error:
        print(f"cannot read the audit trail: {error.__class__.__name__}: {error.orig or error}",
              file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    if result.count == 0:
        print("audit trail: 0 records")
    else:
        print(f"audit trail: {result.count} records, seq {result.first_seq} to {result.last_seq}")
        print(f"head hash: {result.head_hash}")
    if result.expired_through:
        print(f"expired: records 1 to {result.expired_through} (vouched for by a retention.expired record)")
    for located in result.findings:
        print(printable(str(located)))  # a finding may quote the record it is about
    if result.intact:
        print("intact")
        return 0
    print(f"NOT intact: {len(result.findings)} finding(s)")
    return 1


def show(config: GatewayConfig, args) -> int:
    """The records after --after (seq), oldest first, or those of one --subject."""
    engine = create_gateway_engine(config.database.url, 1)
    query = select(audit_log).order_by(audit_log.c.seq, audit_log.c.recorded_at).limit(args.limit)
    if args.subject:
        query = query.where(audit_log.c.subject == args.subject)
    if args.after:
        query = query.where(audit_log.c.seq > args.after)
    try:
        with engine.connect() as conn:
            records = [record_from_row(row) for row in conn.execute(query)]
    except SQLAlchemyError as error:
        print(f"cannot read the audit trail: {error.__class__.__name__}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    for record in records:
        if args.json:
            print(printable_json(json.dumps(record.as_dict(), ensure_ascii=False)))
        else:
            at = record.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            detail = json.dumps(dict(record.detail), ensure_ascii=False, sort_keys=True)
            # One line whatever a record holds (a line break, an escape sequence, a bidi
            # override in a login name typed at the console): it can neither pass for several
            # nor hide the ones above it.
            print(printable(f"{record.seq:>8}  {at}  {record.node:<12} {record.action:<24} "
                            f"{record.outcome:<8} {record.actor:<20} {record.subject or '-':<20} "
                            f"{record.source or '-':<21} {detail}"))
    return 0


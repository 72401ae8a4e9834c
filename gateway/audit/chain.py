"""The audit trail's hash chain. Pure code.

Every record carries the SHA-256 of the one before it (`prev_hash`) and its own (`hash`, over
the previous hash and the record's canonical JSON). Altering a record breaks its own hash;
removing or inserting one breaks the next record's link or the sequence; `verify` names the
record where each break is. (Cutting records off the end leaves a shorter, valid chain: the
head hash is therefore logged and exported, so that an outside copy shows how far it went.)
"""
from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from gateway.store.texts import is_storable, storable
from gateway.store.timestamps import utc as _utc

GENESIS = "0" * 64  # the previous hash of the first record
# Sorted compact JSON (json.dumps(..., sort_keys=True, separators=(",", ":"),
# ensure_ascii=False)), one encoder for every record.
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_string = encode_basestring  # a JSON string as _JSON writes it (ensure_ascii=False)


@dataclass(frozen=True)
class AuditEvent:
    """Something to record: who did what to which subject, from where. Never patient data:
    subjects are ids (message #42, prescription RX-...), details are codes, sizes, hashes."""

    action: str  # message.received, message.acknowledged, message.refused, message.read, ...
    actor: str  # a facility id, a console user, or the node itself ("system")
    outcome: str = "success"  # success | failure | refused
    subject: str | None = None  # "message/42", "prescription/RX-...", "config"
    source: str | None = None  # the network address it came from
    detail: Mapping[str, Any] = field(default_factory=dict)
    at: datetime | None = None  # default: when it is appended


@dataclass(frozen=True)
class AuditRecord:
    seq: int  # 1, 2, 3 ... without gaps
    at: datetime  # UTC
    node: str
    action: str
    actor: str
    outcome: str
    subject: str | None
    source: str | None
    detail: Mapping[str, Any]
    prev_hash: str
    hash: str
    # The detail's canonical JSON as the hash covered it, when the record was just chained
    # (what the store keeps, written once) or read from the store.
    detail_json: str | None = field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict:
        return {"seq": self.seq, "at": _instant(self.at), "node": self.node, "action": self.action,
                "actor": self.actor, "outcome": self.outcome, "subject": self.subject,
                "source": self.source, "detail": dict(self.detail), "prev_hash": self.prev_hash,
                "hash": self.hash}


def canonical(seq: int, at: datetime, node: str, event: AuditEvent) -> bytes:
    """The bytes a record's hash covers: every field but the hashes, as sorted compact JSON."""
    return _canonical(seq, _instant(at), node, event, _JSON.encode(event.detail))


def _canonical(seq: int, instant: str, node: str, event: AuditEvent, detail: str) -> bytes:
    # The same bytes as _JSON.encode of the record's dict, written out key by key in sorted
    # order: half the cost, and this runs for every message the gateway receives.
    source, subject = event.source, event.subject
    return (f'{{"action":{_string(event.action)},"actor":{_string(event.actor)},"at":"{instant}",'
            f'"detail":{detail},"node":{_string(node)},'
            f'"outcome":{_string(event.outcome)},"seq":{int(seq)},'
            f'"source":{"null" if source is None else _string(source)},'
            f'"subject":{"null" if subject is None else _string(subject)}}}').encode("utf-8")


def link(prev_hash: str, content: bytes) -> str:
    # UTF-8, the same bytes as ASCII for a hash: a tampered prev_hash must fail its check, not
    # the verification.
    return hashlib.sha256(prev_hash.encode("utf-8") + b"\n" + content).hexdigest()


def chain(prev_seq: int, prev_hash: str, node: str, events: Iterable[AuditEvent],
          now: datetime) -> list[AuditRecord]:
    """The records that follow (prev_seq, prev_hash) for `events`, in order."""
    records = []
    last_at, last_instant = None, ""
    for event in events:
        event = _storable(event)
        prev_seq += 1
        at = event.at or now
        if at is not last_at:  # a round of records often shares one instant: format it once
            last_at, at = at, _utc(at)
            last_instant = _instant(at)
        else:
            at = records[-1].at
        detail = _JSON.encode(event.detail)
        if not detail.isascii():  # JSON escapes a NUL, not a lone surrogate
            detail = storable(detail)
        digest = link(prev_hash, _canonical(prev_seq, last_instant, node, event, detail))
        records.append(AuditRecord(prev_seq, at, node, event.action, event.actor, event.outcome,
                                   event.subject, event.source, event.detail, prev_hash, digest,
                                   detail))
        prev_hash = digest
    return records


# The longest actor, subject and source the store keeps (gateway.store.schema.audit_log; a
# test holds them equal).
TEXT_LIMIT = 128


def _storable(event: AuditEvent) -> AuditEvent:
    """`event` with its actor, subject and source storable (gateway.store.texts: no NUL, at
    most TEXT_LIMIT characters), as they are hashed and stored: one that PostgreSQL refuses
    would fail its whole append, then every append after it (a login name typed with a NUL
    would have stopped the trail)."""
    texts = (event.actor, event.subject, event.source)
    if all(is_storable(text, TEXT_LIMIT) for text in texts):
        return event
    actor, subject, source = (storable(text, TEXT_LIMIT) for text in texts)
    return replace(event, actor=actor, subject=subject, source=source)


@dataclass(frozen=True)
class Finding:
    seq: int  # where the break is
    problem: str  # altered | removed | inserted | reordered | broken-link

    reason: str

    def __str__(self) -> str:
        return f"record {self.seq}: {self.problem}: {self.reason}"


def verify(records: Iterable[AuditRecord], start_seq: int = 1,
           start_hash: str = GENESIS) -> Iterator[Finding]:
    """Every break in `records` (in seq order), each named by the record where it shows."""
    expected_seq, expected_prev = start_seq, start_hash
    for record in records:
        event = AuditEvent(record.action, record.actor, record.outcome, record.subject,
                           record.source, record.detail)
        altered = link(record.prev_hash, canonical(record.seq, record.at, record.node, event)) != record.hash
        if altered and record.detail_json is not None and _reads_as(record.detail_json, record.detail):
            # The detail read from the store and written again may differ from the text the
            # hash covered (keys that were not text, or that U+FFFD replaced, sort otherwise):
            # check that text, which the record's detail reads as.
            altered = link(record.prev_hash, _canonical(record.seq, _instant(record.at), record.node,
                                                        event, record.detail_json)) != record.hash
        if altered:
            yield Finding(record.seq, "altered", "its content no longer matches its hash")
        if record.seq > expected_seq:
            missing = (f"{expected_seq}" if record.seq == expected_seq + 1
                       else f"{expected_seq} to {record.seq - 1}")
            yield Finding(record.seq, "removed", f"record(s) {missing} before it are missing")
        elif record.seq < expected_seq:
            yield Finding(record.seq, "inserted" if record.prev_hash != expected_prev else "reordered",
                          f"a second record {record.seq}" if record.seq == expected_seq - 1
                          else f"sequence goes back from {expected_seq - 1} to {record.seq}")
        elif record.prev_hash != expected_prev:
            yield Finding(record.seq, "broken-link",
                          "its previous hash is not the hash of the record before it "
                          "(a record was replaced, inserted or removed before it)")
        expected_seq, expected_prev = record.seq + 1, record.hash


def _reads_as(text: str, detail: Mapping[str, Any]) -> bool:
    try:
        return json.loads(text) == detail
    except (ValueError, RecursionError):
        return False


def _instant(value: datetime) -> str:
    return _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

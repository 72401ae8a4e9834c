"""The audit hash chain (pure): a chain verifies; any altered, removed, inserted or reordered
record is found and named."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

from gateway.audit.chain import GENESIS, AuditEvent, chain, link, verify

T0 = datetime(2026, 11, 22, 9, 0, tzinfo=timezone.utc)


def trail(count: int = 6):
    events = [AuditEvent("message.received", "INPE-100001", subject=f"message/{n}",
                         source="10.20.0.5:40000", detail={"type": "ORU^R01", "size": 1200 + n},
                         at=T0 + timedelta(seconds=n)) for n in range(count)]
    return chain(0, GENESIS, "node-1", events, T0)


def problems(records):
    return [(f.seq, f.problem) for f in verify(records)]


def test_a_fresh_chain_is_intact_and_continues_across_appends():
    first = trail(3)
    more = chain(first[-1].seq, first[-1].hash, "node-2",
                 [AuditEvent("message.read", "console:amina", subject="message/1")], T0)
    assert [r.seq for r in first + more] == [1, 2, 3, 4]
    assert first[0].prev_hash == GENESIS and more[0].prev_hash == first[-1].hash
    assert problems(first + more) == []


def test_each_hash_covers_every_field():
    record = trail(1)[0]
    for change in (dict(actor="INPE-100002"), dict(subject="message/9"), dict(node="node-9"),
                   dict(at=record.at + timedelta(microseconds=1)), dict(detail={"type": "ADT^A01"}),
                   dict(outcome="failure"), dict(source=None), dict(action="message.refused")):
        assert problems([replace(record, **change)]) == [(1, "altered")], change


def test_an_altered_record_is_named():
    records = trail()
    records[2] = replace(records[2], detail={"type": "ORU^R01", "size": 1})
    assert problems(records) == [(3, "altered")]


def test_an_altered_record_with_its_hash_recomputed_breaks_the_next_link():
    records = trail()
    forged = replace(records[2], actor="INPE-999999")
    from gateway.audit.chain import canonical, AuditEvent as E
    forged = replace(forged, hash=link(forged.prev_hash, canonical(
        forged.seq, forged.at, forged.node, E(forged.action, forged.actor, forged.outcome,
                                              forged.subject, forged.source, forged.detail))))
    records[2] = forged
    assert problems(records) == [(4, "broken-link")]


def test_a_removed_record_is_named_by_the_gap():
    records = trail()
    del records[3]
    assert problems(records) == [(5, "removed")]
    assert "4" in next(iter(verify(records))).reason


def test_a_removed_first_record_is_found():
    assert problems(trail()[1:]) == [(2, "removed")]


def test_an_inserted_record_is_found():
    records = trail()
    intruder = chain(2, records[1].hash, "node-1", [AuditEvent("message.read", "x")], T0)[0]
    records.insert(3, intruder)  # a second record 3, after the real one
    found = problems(records)
    assert found and found[0][0] == 3 and found[0][1] in ("inserted", "reordered")


def test_swapped_records_are_found():
    records = trail()
    records[2], records[3] = records[3], records[2]
    assert problems(records)[0] == (4, "removed")


def test_the_hashed_bytes_are_the_records_sorted_compact_json():
    """What a record's hash covers is json.dumps of its fields (sorted keys, compact, UTF-8
    as is), written out by hand for speed: the two must never differ, or old trails would no
    longer verify. Escapes, Arabic, nulls, nested details, and records sharing an instant."""
    import hashlib
    import json

    events = [AuditEvent("console.login", 'amina "\\ admin\n', "refused", None, None,
                         {"z": [1, 2.5e-05, None], "a": {"ب": True}, "m": "محمد\t"}, T0),
              AuditEvent("message.received", "CHU-RABAT", subject="message/7", source="::1",
                         detail={}, at=T0),
              AuditEvent("message.read", "console:x", at=None)]
    records = chain(41, "f" * 64, "nœud-1", events, T0 + timedelta(seconds=1))
    prev = "f" * 64
    for record in records:
        expected = json.dumps({"seq": record.seq, "at": record.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                               "node": "nœud-1", "action": record.action, "actor": record.actor,
                               "outcome": record.outcome, "subject": record.subject,
                               "source": record.source, "detail": record.detail},
                              sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert record.hash == hashlib.sha256(prev.encode() + b"\n" + expected.encode()).hexdigest()
        prev = record.hash
    assert [r.at for r in records] == [T0, T0, T0 + timedelta(seconds=1)]

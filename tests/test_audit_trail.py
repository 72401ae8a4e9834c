"""The audit trail in a real database (SQLite and PostgreSQL): appends chain after the last
record, verify walks it in batches, tampering by SQL is found and located, expiry is accepted
only when a retention.expired record vouches for it, and parallel appenders on PostgreSQL keep
one gapless chain."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from gateway.audit.chain import GENESIS, AuditEvent
from gateway.audit.trail import EXPIRED, AuditTrail, expiry_anchor
from gateway.store.database import create_gateway_engine, migrate, write_transaction


@pytest.fixture
def trail(db_url):
    engine = create_gateway_engine(db_url)
    migrate(engine)
    yield AuditTrail(engine, "node-1")
    engine.dispose()


def events(count, start=0, **changes):
    return [AuditEvent(changes.get("action", "message.received"), "INPE-100001",
                       subject=f"message/{start + n}", source="10.20.0.5:40000",
                       detail={"control_id": f"C{start + n}", "size": 1000 + n, "ratio": 0.25})
            for n in range(count)]


def found(verification):
    return [(l.finding.seq, l.finding.problem) for l in verification.findings]


def sql(trail, statement, **params):
    with trail.engine.begin() as conn:
        return conn.execute(text(statement), params)


def test_texts_the_store_cannot_keep_are_recorded_storable_and_verify(trail):
    """An actor typed with a NUL (a console login name), or a subject or source longer than
    its column, is recorded with U+FFFD and cut, as it was hashed: the append goes through,
    and so does every one after it, and the chain verifies."""
    from gateway.audit.chain import TEXT_LIMIT
    from gateway.store.schema import audit_log

    assert {audit_log.c[name].type.length for name in ("actor", "subject", "source")} == {TEXT_LIMIT}
    [odd] = trail.append([AuditEvent("console.login", "adm\x00in", "refused", "s" * 300, "1.2.3.4:5" + "0" * 200)])
    assert (odd.actor, odd.subject, odd.source) == ("adm\ufffdin", "s" * TEXT_LIMIT, ("1.2.3.4:5" + "0" * 200)[:TEXT_LIMIT])
    trail.append(events(2))
    with trail.engine.connect() as conn:
        stored = list(trail.records(conn))
    assert [r.actor for r in stored] == ["adm\ufffdin", "INPE-100001", "INPE-100001"]
    assert trail.verify().intact


def test_lone_surrogates_are_recorded_storable_and_verify(trail):
    """A lone UTF-16 surrogate (what Python's json reads "\\ud800" as) in an actor or a detail
    cannot be encoded for either database: it is recorded as U+FFFD, as it was hashed, and the
    appends after it go through."""
    [odd] = trail.append([AuditEvent("door.refused", "INPE-\ud800", "refused", "message/1", None,
                                     {"reason": "peer said \udfff", "nested": ["\ud83d"]})])
    assert odd.actor == "INPE-\ufffd"
    trail.append(events(1))
    with trail.engine.connect() as conn:
        stored = list(trail.records(conn))
    assert stored[0].detail == {"reason": "peer said \ufffd", "nested": ["\ufffd"]}
    assert trail.verify().intact


def test_details_whose_keys_sort_otherwise_once_stored_verify(trail):
    """Keys that are not text ({2, 10} sorted as numbers, "10" < "2" as text) or that U+FFFD
    replaces (a lone surrogate sorted before U+E000, U+FFFD after): the stored text is what the
    hash covered, and verify checks that text, not the detail read and written again."""
    trail.append([AuditEvent("message.read", "u", detail={2: "a", 10: "b"}),
                  AuditEvent("door.refused", "u", detail={"\ud800": 1, "\ue000": 2})])
    assert trail.verify().intact
    sql(trail, "UPDATE audit_log SET detail = :d WHERE seq = 1", d='{"10":"b","2":"a"}')
    assert found(trail.verify()) == [(1, "altered")]


def test_appends_chain_after_the_last_record_and_verify_in_small_batches(trail):
    first = trail.append(events(5))
    assert [r.seq for r in first] == [1, 2, 3, 4, 5] and first[0].prev_hash == GENESIS
    second = AuditTrail(trail.engine, "node-2").append(events(4, start=5))
    assert second[0].seq == 6 and second[0].prev_hash == first[-1].hash
    result = trail.verify(batch=2)  # several batches, one record left over
    assert result.intact and result.count == 9
    assert (result.first_seq, result.last_seq, result.head_hash) == (1, 9, second[-1].hash)
    with trail.engine.connect() as conn:
        stored = list(trail.records(conn, batch=4))
    assert [r.node for r in stored] == ["node-1"] * 5 + ["node-2"] * 4
    assert stored[2].detail == {"control_id": "C2", "size": 1002, "ratio": 0.25}
    assert stored == first + second


def test_an_empty_trail_verifies_and_an_empty_append_stores_nothing(trail):
    assert trail.append([]) == []
    result = trail.verify()
    assert result.intact and result.count == 0 and result.head_hash is None


def test_recorded_at_never_goes_back_along_seq(trail):
    now = datetime.now(timezone.utc)
    trail.append([AuditEvent("message.received", "a", at=now)])
    late = trail.append([AuditEvent("message.read", "b", at=now - timedelta(seconds=30)),
                         AuditEvent("message.read", "c", at=now + timedelta(seconds=1)),
                         AuditEvent("message.read", "d", at=now - timedelta(seconds=5))])
    assert [r.at for r in late] == [now, now + timedelta(seconds=1), now + timedelta(seconds=1)]
    assert trail.verify().intact


def test_an_updated_detail_is_found(trail):
    trail.append(events(6))
    sql(trail, "UPDATE audit_log SET detail = :d WHERE seq = 3", d='{"control_id":"X"}')
    result = trail.verify(batch=4)
    assert found(result) == [(3, "altered")]
    assert str(result.findings[0]).startswith("record 3 (20")


def test_a_deleted_middle_record_is_found(trail):
    trail.append(events(6))
    sql(trail, "DELETE FROM audit_log WHERE seq = 4")
    assert found(trail.verify(batch=2)) == [(5, "removed")]


def test_a_forged_record_is_found(trail):
    records = trail.append(events(6))
    third = records[2]
    # A forger who knows the format repeats seq 4 with a plausible hash chained to record 3.
    from gateway.audit.chain import chain
    forged = chain(3, third.hash, "node-1", [AuditEvent("message.read", "console:mallory",
                                                        at=third.at + timedelta(microseconds=1))],
                   third.at)[0]
    sql(trail, "INSERT INTO audit_log (seq, recorded_at, node, action, actor, outcome, detail, "
               "prev_hash, hash) VALUES (4, :at, 'node-1', 'message.read', 'console:mallory', "
               "'success', '{}', :prev, :hash)",
        at=forged.at.replace(tzinfo=None) if trail.engine.dialect.name == "sqlite" else forged.at,
        prev=forged.prev_hash, hash=forged.hash)
    problems = found(trail.verify(batch=3))
    assert problems and problems[0][0] == 4 and problems[0][1] in ("inserted", "reordered", "broken-link")


def test_swapped_seqs_are_found(trail):
    trail.append(events(6))
    for statement in ("UPDATE audit_log SET seq = -2 WHERE seq = 2", "UPDATE audit_log SET seq = 2 WHERE seq = 5",
                      "UPDATE audit_log SET seq = 5 WHERE seq = -2"):
        sql(trail, statement)
    problems = found(trail.verify())
    assert (2, "altered") in problems and (5, "altered") in problems


def test_a_record_appended_with_its_hash_recomputed_still_breaks_the_next_link(trail):
    records = trail.append(events(4))
    from gateway.audit.chain import canonical, link
    record = records[1]
    content = canonical(record.seq, record.at, record.node, AuditEvent(
        record.action, "INPE-999999", record.outcome, record.subject, record.source, record.detail))
    sql(trail, "UPDATE audit_log SET actor = 'INPE-999999', hash = :h WHERE seq = 2",
        h=link(record.prev_hash, content))
    assert found(trail.verify()) == [(3, "broken-link")]


@pytest.mark.parametrize("detail", ['[1, 2]', '"text"', '5', 'null', "[" * 100_000 + "]" * 100_000],
                         ids=["list", "string", "number", "null", "nested-too-deep"])
def test_a_detail_replaced_by_json_that_is_not_an_object_is_found(trail, detail):
    """Every record's detail is a JSON object: another JSON value, or one nested too deep to
    read, is named as altered; it crashed verify (RecursionError), and reading the record (the
    ATNA export, `audit show`) failed on it, every time."""
    trail.append(events(4))
    sql(trail, "UPDATE audit_log SET detail = :d WHERE seq = 3", d=detail)
    assert found(trail.verify(batch=2)) == [(3, "altered")]
    with trail.engine.connect() as conn:
        third = list(trail.records(conn))[2]
    assert third.as_dict()["detail"] == {"unreadable": detail}


def test_a_previous_hash_replaced_by_any_text_is_found(trail):
    trail.append(events(4))
    sql(trail, "UPDATE audit_log SET prev_hash = :h WHERE seq = 3", h="é" * 64)
    assert found(trail.verify()) == [(3, "altered"), (3, "broken-link")]


@pytest.mark.parametrize("seq", [0, -1])
def test_a_record_numbered_below_1_is_found(trail, seq):
    """A record forged under seq 0 (or below), chained from the genesis hash: verify walked
    from seq 1 on and said intact, while `audit show` listed the forged record."""
    records = trail.append(events(4))
    from gateway.audit.chain import chain
    forged = chain(seq - 1, GENESIS, "node-1", [AuditEvent("message.read", "console:mallory",
                                                           subject="message/2")], records[0].at)[0]
    sql(trail, "INSERT INTO audit_log (seq, recorded_at, node, action, actor, outcome, subject, "
               "detail, prev_hash, hash) VALUES (:seq, :at, 'node-1', 'message.read', "
               "'console:mallory', 'success', 'message/2', '{}', :prev, :hash)",
        seq=seq, at=records[0].at.replace(tzinfo=None) if trail.engine.dialect.name == "sqlite"
        else records[0].at, prev=forged.prev_hash, hash=forged.hash)
    result = trail.verify(batch=2)
    assert found(result) == [(seq, "inserted")] and result.count == 5
    assert (result.first_seq, result.last_seq) == (seq, 4)


def expire(trail, before, **detail):
    """What retention does: vouch for the records before `before`, then delete them."""
    with write_transaction(trail.engine) as conn:
        bound = trail.expiry_bound(conn, before)
        trail.append_in(conn, [expiry_anchor(*bound, kind="audit", **detail)])
        return bound


def test_an_expiry_vouched_for_by_a_retention_record_is_intact(trail):
    old = datetime.now(timezone.utc) - timedelta(days=400)
    trail.append([AuditEvent("message.received", "a", subject=f"message/{n}",
                             at=old + timedelta(seconds=n)) for n in range(5)])
    trail.append(events(3))
    bound = expire(trail, old + timedelta(days=1), rows=5)
    assert bound[0] == 5
    sql(trail, "DELETE FROM audit_log WHERE seq <= 5")
    result = trail.verify()
    assert result.intact and result.first_seq == 6 and result.expired_through == 5
    assert result.count == 4


def test_an_expiry_anchor_left_as_the_only_record_is_intact(trail):
    """Everything before the anchor expired and nothing was appended since (a quiet node):
    the anchor, now the first record, vouches for the records before it."""
    old = datetime.now(timezone.utc) - timedelta(days=400)
    trail.append([AuditEvent("message.received", "a", at=old + timedelta(seconds=n)) for n in range(5)])
    expire(trail, old + timedelta(days=1))
    sql(trail, "DELETE FROM audit_log WHERE seq <= 5")
    result = trail.verify()
    assert result.intact and (result.first_seq, result.count, result.expired_through) == (6, 1, 5)
    # One whose announced hash is not the previous hash of its own vouches for nothing.
    sql(trail, "UPDATE audit_log SET prev_hash = :h WHERE seq = 6", h="e" * 64)
    assert (6, "removed") in found(trail.verify())


def test_an_interrupted_expiry_is_accepted_while_the_announced_last_record_remains(trail):
    old = datetime.now(timezone.utc) - timedelta(days=400)
    trail.append([AuditEvent("message.received", "a", at=old + timedelta(seconds=n)) for n in range(5)])
    expire(trail, old + timedelta(days=1))
    sql(trail, "DELETE FROM audit_log WHERE seq <= 2")  # the first batch of deletes only
    assert trail.verify().intact
    sql(trail, "UPDATE audit_log SET hash = :h WHERE seq = 5", h="f" * 64)
    assert (3, "removed") in found(trail.verify())


def test_records_removed_without_a_retention_record_are_found(trail):
    trail.append(events(5))
    sql(trail, "DELETE FROM audit_log WHERE seq <= 2")
    assert found(trail.verify()) == [(3, "removed")]


def test_a_retention_record_that_does_not_match_vouches_for_nothing(trail):
    trail.append(events(5))
    trail.append([AuditEvent(EXPIRED, "system", detail={"through_seq": 2, "last_hash": "0" * 64})])
    sql(trail, "DELETE FROM audit_log WHERE seq <= 2")
    assert found(trail.verify()) == [(3, "removed")]


def test_two_appenders_in_parallel_keep_one_gapless_chain(pg_url):
    engines = [create_gateway_engine(pg_url) for _ in range(2)]
    migrate(engines[0])
    trails = [AuditTrail(engine, f"node-{n}") for n, engine in enumerate(engines)]
    errors = []

    def work(trail):
        try:
            for n in range(40):
                trail.append(events(5, start=n * 5))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(t,)) for t in trails]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    result = trails[0].verify(batch=64)
    assert result.intact and result.count == 400 and result.last_seq == 400
    with engines[0].connect() as conn:
        nodes = {r.node for r in trails[0].records(conn)}
        seqs = conn.execute(text("SELECT count(DISTINCT seq) FROM audit_log")).scalar()
    assert nodes == {"node-0", "node-1"} and seqs == 400
    for engine in engines:
        engine.dispose()

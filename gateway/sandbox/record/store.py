"""The record's own persistent store: one SQLite file (WAL), used from one thread at a time.

Tables:
- `resources`: (type, id) → current version, lastUpdated and the JSON body (stored without
  `meta.versionId`/`meta.lastUpdated`, which read() adds back);
- `identifier_index`, `reference_index`, `code_index`: the search indexes (indexes.py),
  rewritten with each new version;
- `idempotency_keys`: key → SHA-256 of the request and the response it got.

`apply_transaction` runs a whole transaction Bundle in one SQLite transaction: all of it is
stored or none. An update whose content equals the stored one keeps its version, so a
re-delivery leaves one copy and one version. The entries are applied in memory over the rows
they touch, then written with one statement per kind of change (executemany), so a batched
transaction of thousands of resources costs a few statements, not thousands.
`synchronous=OFF` in WAL mode survives a crash of the peer process (SQLite has handed every
commit to the operating system), not a power cut, which is what a sandbox needs; it spares
the fsyncs of each checkpoint. A file written
with an older layout (`PRAGMA user_version`) has its indexes rebuilt when it is opened.

Blocking code: the peer calls it from its own single database thread (peer.py).
"""
from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

from gateway.sandbox.record import json_codec
from gateway.sandbox.record.indexes import PATIENT_ELEMENTS, code_rows, identifier_rows, reference_rows
from gateway.sandbox.record.operation_outcome import FhirError
from gateway.sandbox.record.search import IdClause, ReferenceClause, SearchQuery, TokenClause
from gateway.sandbox.record.transaction import URN_UUID, PlannedEntry, rewrite_references

SCHEMA_VERSION = 3
# Index tables are keyed in lookup order; the rows of a resource being updated are found
# again from its stored content, so no second index per table is needed.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL, id TEXT NOT NULL, version INTEGER NOT NULL,
    last_updated TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (type, id));
CREATE TABLE IF NOT EXISTS identifier_index (
    type TEXT NOT NULL, value TEXT NOT NULL, system TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (type, value, system, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reference_index (
    type TEXT NOT NULL, element TEXT NOT NULL, target_id TEXT NOT NULL, target_type TEXT NOT NULL,
    id TEXT NOT NULL, PRIMARY KEY (type, element, target_id, target_type, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS code_index (
    type TEXT NOT NULL, code TEXT NOT NULL, system TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (type, code, system, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY, body_sha256 TEXT NOT NULL, status INTEGER NOT NULL,
    response BLOB NOT NULL, created TEXT NOT NULL);
"""
_INSERT_INDEX = {
    "identifier_index": "INSERT OR IGNORE INTO identifier_index (type, id, system, value) VALUES (?, ?, ?, ?)",
    "reference_index": "INSERT OR IGNORE INTO reference_index (type, id, element, target_type, target_id) "
                       "VALUES (?, ?, ?, ?, ?)",
    "code_index": "INSERT OR IGNORE INTO code_index (type, id, system, code) VALUES (?, ?, ?, ?)",
}
_DELETE_INDEX = {
    "identifier_index": "DELETE FROM identifier_index WHERE type = ? AND id = ? AND system = ? AND value = ?",
    "reference_index": "DELETE FROM reference_index WHERE type = ? AND id = ? AND element = ? "
                       "AND target_type = ? AND target_id = ?",
    "code_index": "DELETE FROM code_index WHERE type = ? AND id = ? AND system = ? AND code = ?",
}
_INDEX_TABLES = ("identifier_index", "reference_index", "code_index")  # in IndexRows order
_IN_CHUNK = 500  # ids per `IN (...)`: far below SQLite's limit on parameters
# The start of a urn:uuid reference in compact JSON text (see _dumps). Inside a JSON string
# the quotes would be escaped, so this cannot match text that merely looks like a reference.
_URN_REFERENCE_START = '"reference":"urn:uuid:'


@dataclass(frozen=True)
class StoredResponse:
    body_sha256: str
    status: int
    response: bytes


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_dumps = json_codec.dumps  # compact: the reference pattern above relies on it


class RecordStore:
    def __init__(self, path: str):
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        # Random (UUID) keys touch pages all over the indexes: a larger cache, and checkpoints
        # (the only fsyncs in WAL mode) every 40 MB of WAL rather than every 4 MB.
        self._db.execute("PRAGMA cache_size=-65536")
        self._db.execute("PRAGMA wal_autocheckpoint=10000")
        self._db.execute("PRAGMA busy_timeout=5000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{path}: record store schema {version} is newer than this code")
        rebuild = 0 < version < SCHEMA_VERSION  # older index layouts: rebuilt from the resources
        if rebuild:
            self._db.executescript("DROP INDEX IF EXISTS resources_by_update; DROP TABLE identifier_index; "
                                   "DROP TABLE reference_index; DROP TABLE code_index;")
        self._db.executescript(_SCHEMA)
        if rebuild:
            self._reindex()
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _reindex(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        index = {(resource_type, resource_id): _index_rows(json_codec.loads(content))
                 for resource_type, resource_id, content in self._db.execute(
                     "SELECT type, id, content FROM resources")}
        self._insert_index_rows(index)
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- idempotency ------------------------------------------------------------------------

    def stored_response(self, key: str) -> StoredResponse | None:
        row = self._db.execute("SELECT body_sha256, status, response FROM idempotency_keys WHERE key = ?",
                               (key,)).fetchone()
        return StoredResponse(row[0], row[1], bytes(row[2])) if row else None

    # -- reading ----------------------------------------------------------------------------

    def read(self, resource_type: str, resource_id: str) -> dict | None:
        row = self._db.execute("SELECT version, last_updated, content FROM resources WHERE type = ? AND id = ?",
                               (resource_type, resource_id)).fetchone()
        return _with_meta(*row) if row else None

    def search(self, query: SearchQuery) -> tuple[int, list[dict]]:
        """(total matches, the first `query.count` of them, in order of creation)."""
        where, args = _where(query)
        total = self._db.execute(f"SELECT count(*) FROM resources r WHERE {where}", args).fetchone()[0]
        rows = self._db.execute(f"SELECT version, last_updated, content FROM resources r WHERE {where} "
                                "ORDER BY r.rowid LIMIT ?", (*args, query.count)).fetchall()
        return total, [_with_meta(*row) for row in rows]

    def count(self, resource_type: str | None = None) -> int:
        if resource_type is None:
            return self._db.execute("SELECT count(*) FROM resources").fetchone()[0]
        return self._db.execute("SELECT count(*) FROM resources WHERE type = ?", (resource_type,)).fetchone()[0]

    def _matching_ids(self, query: SearchQuery, limit: int) -> set[str]:
        where, args = _where(query)
        rows = self._db.execute(f"SELECT r.id FROM resources r WHERE {where} LIMIT ?", (*args, limit))
        return {row[0] for row in rows}

    # -- writing ----------------------------------------------------------------------------

    def apply_transaction(self, entries: list[PlannedEntry], *, idempotency_key: str | None = None,
                          body_sha256: str = "") -> bytes:
        """Store every entry or none; return the transaction-response Bundle as JSON bytes.

        Raises FhirError (412 several matches, 400 a conditional update's id not its match's,
        422 unresolved reference, 422 key reused with another body), after which nothing has
        changed.
        """
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if idempotency_key is not None:
                stored = self.stored_response(idempotency_key)
                if stored is not None:
                    if stored.body_sha256 != body_sha256:
                        raise key_reused()
                    db.execute("ROLLBACK")
                    return stored.response
            response = self._apply(entries)
            if idempotency_key is not None:
                db.execute("INSERT INTO idempotency_keys VALUES (?, ?, ?, ?, ?)",
                           (idempotency_key, body_sha256, 200, response, _now()))
            db.execute("COMMIT")
            return response
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _apply(self, entries: list[PlannedEntry]) -> bytes:
        targets: dict[str, str] = {}
        ids: list[str] = []
        writes: list[bool] = []  # False: a conditional create that found its resource
        identifiers: list[list[tuple[str, str]]] = []
        planned_identifiers: dict[tuple, set[str]] = {}  # earlier entries, for later conditions
        planned_ids: dict[str, set[str]] = {}
        claimed = {(entry.resource_type, entry.target_id) for entry in entries if entry.target_id}
        # What earlier entries plan only matters to a later condition (the gateway's requests
        # often have none: every entry by id).
        conditional = any(entry.condition is not None for entry in entries)
        for entry in entries:
            resource_id, write = self._decide(entry, planned_identifiers, planned_ids, claimed)
            ids.append(resource_id)
            writes.append(write)
            rows = identifier_rows(entry.resource) if write else []
            identifiers.append(rows)
            if write and conditional:
                planned_ids.setdefault(entry.resource_type, set()).add(resource_id)
                for system, value in rows:
                    for key in ((entry.resource_type, system, value), (entry.resource_type, None, value)):
                        planned_identifiers.setdefault(key, set()).add(resource_id)
            if entry.full_url:
                targets[entry.full_url] = f"{entry.resource_type}/{resource_id}"
        return self._write_all(entries, ids, writes, identifiers, targets)

    def _write_all(self, entries: list[PlannedEntry], ids: list[str], writes: list[bool],
                   identifiers: list[list[tuple[str, str]]], targets: dict[str, str]) -> bytes:
        """Apply the decided entries in order, in memory over the stored rows they touch (read
        in one query per type), then write the final state with one statement per kind of
        change: a resource written several times ends as one row, with one version per change."""
        now = _now()
        keys = {(entry.resource_type, resource_id) for entry, resource_id in zip(entries, ids)}
        stored = self._stored_rows(keys)  # key -> [version, last_updated, content]
        current = {key: list(row) for key, row in stored.items()}
        created: dict[tuple[str, str], None] = {}  # new keys, in order of creation
        index: dict[tuple[str, str], tuple] = {}  # rows to insert once all entries are written
        answers = []
        # fullUrls that are URLs (not urn:uuid): references to them are found on the tree
        url_targets = any(not full_url.startswith(URN_UUID) for full_url in targets)
        for entry, resource_id, write, identifier_list in zip(entries, ids, writes, identifiers):
            key = (entry.resource_type, resource_id)
            if not write:  # a conditional create that found its resource
                version, last_updated, _ = current[key]
                answers.append(_entry_response(*key, "200 OK", version, last_updated))
                continue
            entry.resource["id"] = resource_id
            content = _stored_form(entry, targets, url_targets)
            row = current.get(key)
            if row is None:
                current[key] = [1, now, content]
                created[key] = None
                index[key] = _new_index_rows(entry.resource, identifier_list, targets)
                answers.append(_entry_response(*key, "201 Created", 1, now))
            elif row[2] == content or _same_json(row[2], content):
                answers.append(_entry_response(*key, "200 OK", row[0], row[1]))
            else:
                row[:] = [row[0] + 1, now, content]
                # replaces the rows of an earlier entry of this transaction
                index[key] = _new_index_rows(entry.resource, identifier_list, targets)
                answers.append(_entry_response(*key, "200 OK", row[0], now))
        db = self._db
        if created:
            db.executemany("INSERT INTO resources VALUES (?, ?, ?, ?, ?)",
                           [(*key, *current[key]) for key in created])
        changed = [key for key, row in stored.items() if current[key][0] != row[0]]
        if changed:
            db.executemany("UPDATE resources SET version = ?, last_updated = ?, content = ? WHERE type = ? AND id = ?",
                           [(*current[key], *key) for key in changed])
            before = [_index_rows(json_codec.loads(stored[key][2])) for key in changed]
            for number, table in enumerate(_INDEX_TABLES):
                rows = [(*key, *row) for key, lists in zip(changed, before) for row in lists[number]]
                if rows:
                    db.executemany(_DELETE_INDEX[table], rows)
        self._insert_index_rows(index)
        return _dumps({"resourceType": "Bundle", "id": str(uuid.uuid4()), "type": "transaction-response",
                       "entry": answers}).encode("utf-8")

    def _stored_rows(self, keys: set[tuple[str, str]]) -> dict[tuple[str, str], tuple]:
        """(version, last_updated, content) of the stored resources among `keys`."""
        by_type: dict[str, list[str]] = {}
        for resource_type, resource_id in keys:
            by_type.setdefault(resource_type, []).append(resource_id)
        found = {}
        for resource_type, resource_ids in by_type.items():
            for start in range(0, len(resource_ids), _IN_CHUNK):
                chunk = resource_ids[start:start + _IN_CHUNK]
                for resource_id, version, last_updated, content in self._db.execute(
                        f"SELECT id, version, last_updated, content FROM resources WHERE type = ? "
                        f"AND id IN ({', '.join('?' * len(chunk))})", (resource_type, *chunk)):
                    found[(resource_type, resource_id)] = (version, last_updated, content)
        return found

    def _insert_index_rows(self, index: dict[tuple[str, str], tuple]) -> None:
        for number, table in enumerate(_INDEX_TABLES):
            rows = [(*key, *row) for key, lists in index.items() for row in lists[number]]
            if rows:
                self._db.executemany(_INSERT_INDEX[table], rows)

    def _decide(self, entry: PlannedEntry, planned_identifiers: dict, planned_ids: dict,
                claimed: set[tuple[str, str]]) -> tuple[str, bool]:
        """The id an entry will have, and whether it is written (see transaction.py)."""
        if entry.condition is None:
            if entry.method == "POST":
                return str(uuid.uuid4()), True
            return entry.target_id, True
        matches = self._matching_ids(entry.condition, 2 + len(claimed))
        matches |= _planned_matches(entry.condition, planned_identifiers, planned_ids)
        matches = {match for match in matches if (entry.resource_type, match) not in claimed}
        if len(matches) > 1:
            where = entry.where + (".request.ifNoneExist" if entry.method == "POST" else ".request.url")
            raise FhirError.single(412, "multiple-matches", "the condition matches several resources", where)
        if entry.method == "POST":
            return (next(iter(matches)), False) if matches else (str(uuid.uuid4()), True)
        given = entry.resource.get("id")
        if matches:
            match = next(iter(matches))
            if given is not None and given != match:
                # R4 http.html#cond-update: one match whose id is not the resource's is a 400
                raise FhirError.single(400, "invalid", "the resource id is not the id of the resource "
                                       "the condition matches", entry.where + ".resource.id")
            return match, True
        return given or str(uuid.uuid4()), True  # update-as-create with the given id


def _stored_form(entry: PlannedEntry, targets: dict[str, str], url_targets: bool = False) -> str:
    """The JSON text stored for an entry's resource: without meta.versionId/lastUpdated, its
    `urn:uuid:` references rewritten (on the text: one pass instead of a walk of the tree), and
    when some fullUrls are URLs (`url_targets`), references to them too (on the tree)."""
    resource = entry.resource
    meta = resource.get("meta")
    if isinstance(meta, dict) and ("versionId" in meta or "lastUpdated" in meta):
        meta = {key: value for key, value in meta.items() if key not in ("versionId", "lastUpdated")}
        if meta:
            resource["meta"] = meta
        else:
            del resource["meta"]
    if url_targets:
        rewrite_references(resource, targets, entry.where + ".resource")
    content = _dumps(resource)
    if URN_UUID not in content:
        return content
    # Split at each reference's opening (str.split, not a regex: a third of the time): each
    # piece after the first starts with the rest of a urn:uuid, up to its closing quote.
    pieces = content.split(_URN_REFERENCE_START)
    rewritten = [pieces[0]]
    for piece in pieces[1:]:
        urn, quote, rest = piece.partition('"')
        target = targets.get(URN_UUID + urn)
        if target is None or not quote or "\\" in urn:
            # An unresolved reference (or one the text pass cannot read: an escape in it):
            # walk the tree, which locates the culprit for the OperationOutcome, or rewrites
            # what the text pass could not.
            rewrite_references(resource, targets, entry.where + ".resource")
            return _dumps(resource)
        rewritten.append(f'"reference":"{target}"{rest}')
    return "".join(rewritten)


def _index_rows(resource: dict) -> tuple:
    return identifier_rows(resource), reference_rows(resource), code_rows(resource)


def _new_index_rows(resource: dict, identifiers: list[tuple[str, str]], targets: dict[str, str]) -> tuple:
    """The index rows of a resource being written, whose identifier rows are known already
    (only for what is created or changed: a re-delivery that changes nothing builds none)."""
    return identifiers, reference_rows(resource, targets), code_rows(resource)


def key_reused() -> FhirError:
    return FhirError.single(422, "business-rule",
                            "Idempotency-Key already used for a different request body")


def _entry_response(resource_type: str, resource_id: str, status: str, version: int, last_updated: str) -> dict:
    return {"response": {"status": status, "location": f"{resource_type}/{resource_id}/_history/{version}",
                         "etag": f'W/"{version}"', "lastModified": last_updated}}


def _same_json(stored: str, content: str) -> bool:
    """The same document written otherwise (key order): a re-delivery, not a new version.
    Numbers are compared as written too, as FHIR decimals keep their precision (5.10 is
    not 5.1, nor 1.0 1), which floats compare equal; read so only when the rest agrees."""
    return (json_codec.loads(stored) == json_codec.loads(content)
            and json.loads(stored, parse_float=str) == json.loads(content, parse_float=str))


def _with_meta(version: int, last_updated: str, content: str) -> dict:
    resource = json_codec.loads_exact(content)  # decimals as stored: 5.10, not 5.1
    meta = resource.get("meta")
    resource["meta"] = {**(meta if isinstance(meta, dict) else {}),
                        "versionId": str(version), "lastUpdated": last_updated}
    return resource


def _planned_matches(query: SearchQuery, planned_identifiers: dict, planned_ids: dict) -> set[str]:
    """Ids given to earlier entries of the same transaction that `query` matches.

    Only `identifier=` and `identifier:not=` (with a value) and `_id=` are looked at; a
    condition with any other parameter sees only what is already stored.
    """
    found: set[str] | None = None
    for clause in query.clauses:
        if isinstance(clause, IdClause):
            ids = {clause.id} & planned_ids.get(query.resource_type, set())
        elif isinstance(clause, TokenClause) and clause.param == "identifier" and clause.value is not None:
            ids = planned_identifiers.get((query.resource_type, clause.system, clause.value), set())
            if clause.negated:
                ids = planned_ids.get(query.resource_type, set()) - ids
        else:
            return set()
        found = set(ids) if found is None else found & ids
    return found or set()


def _where(query: SearchQuery) -> tuple[str, list]:
    where = ["r.type = ?"]
    args: list = [query.resource_type]
    for clause in query.clauses:
        if isinstance(clause, IdClause):
            where.append("r.id = ?")
            args.append(clause.id)
        elif isinstance(clause, TokenClause):
            table, column = ("identifier_index", "value") if clause.param == "identifier" else ("code_index", "code")
            sql = f"r.id {'NOT IN' if clause.negated else 'IN'} (SELECT id FROM {table} WHERE type = ?"
            args.append(query.resource_type)
            if clause.value is not None:
                sql += f" AND {column} = ?"
                args.append(clause.value)
            if clause.system is not None:
                sql += " AND system = ?"
                args.append(clause.system)
            where.append(sql + ")")
        elif isinstance(clause, ReferenceClause):
            elements = PATIENT_ELEMENTS if clause.param == "patient" else ("subject",)
            sql = (f"r.id IN (SELECT id FROM reference_index WHERE type = ? AND element IN "
                   f"({', '.join('?' * len(elements))}) AND target_id = ?")
            args += [query.resource_type, *elements, clause.target_id]
            if clause.target_type is not None:
                sql += " AND target_type = ?"
                args.append(clause.target_type)
            where.append(sql + ")")
    return " AND ".join(where), args

"""The CNSS peer's care sheets, in one SQLite file (WAL), keyed by their idempotency key.

Lines that execute an e-prescription line are also kept by their own key (`cleLigne`, table
`lignes_prescription`): a dispensation billed once is refused in any other sheet
(`LineAlreadyBilled`). Sheets for paper prescriptions are flagged (`papier`).

Synchronous and blocking: the peer calls it from its own one-thread pool, never from the
reactor thread, so one connection (opened in that thread) serves every call. Each submission
is one `BEGIN IMMEDIATE` transaction: look the key up, then either return the stored answer
(same content), refuse (`KeyReused`: other content), or insert the sheet, number it from its
row id and store its answer. So two deliveries of one sheet, even after a restart of either
side, leave exactly one row and get the same answer bytes.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS feuilles (
    sequence     INTEGER PRIMARY KEY AUTOINCREMENT,
    numero       TEXT UNIQUE,
    cle          TEXT NOT NULL UNIQUE,
    empreinte    TEXT NOT NULL,
    statut       TEXT NOT NULL,
    recue_le     TEXT NOT NULL,
    requete      BLOB NOT NULL,
    reponse      BLOB NOT NULL
)
"""
LINES_SCHEMA = """
CREATE TABLE IF NOT EXISTS lignes_prescription (
    cle_ligne    TEXT PRIMARY KEY,
    numero       TEXT NOT NULL,
    ligne        INTEGER NOT NULL,
    sequence     INTEGER NOT NULL REFERENCES feuilles (sequence)
)
"""


class LineAlreadyBilled(Exception):
    """A prescription line's key is already billed in another care sheet."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


@dataclass(frozen=True)
class PrescriptionLine:
    """One billed line of an e-prescription (a ReferencePrescription of the contract)."""

    key: str  # cleLigne
    prescription: str
    line: int
    care_sheet: str  # numeroDossier


class KeyReused(Exception):
    """The idempotency key is already taken by a care sheet with other content."""


@dataclass(frozen=True)
class CareSheetRecord:
    number: str
    key: str
    fingerprint: str
    status: str
    received_at: str  # xs:dateTime, UTC
    answer: bytes  # the SoumettreFeuilleDeSoinsReponse element, serialised


def care_sheet_number(sequence: int, received_at: str) -> str:
    """FSE-<year of receipt>-<row id on 8 digits or more>: unique since row ids are."""
    return f"FSE-{received_at[:4]}-{sequence:08d}"


class CareSheetStore:
    def __init__(self, path: str):
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            # Used from one pool thread, though not necessarily the one that built the store.
            connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                         timeout=10)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")  # an answered sheet survives a power cut
            connection.execute(SCHEMA)
            connection.execute(LINES_SCHEMA)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(feuilles)")}
            if "papier" not in columns:  # a store of an older layout
                connection.execute("ALTER TABLE feuilles ADD COLUMN papier INTEGER NOT NULL DEFAULT 0")
            self._connection = connection
        return self._connection

    def open(self) -> None:
        """Create the file and table now, so that a bad path fails at start-up."""
        self._db()

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def submit(
        self,
        key: str,
        fingerprint: str,
        request_xml: bytes,
        received_at: str,
        build_answer: Callable[[str, str, str], bytes],
        prescription_lines: tuple[tuple[str, str, int], ...] = (),
        paper: bool = False,
    ) -> tuple[CareSheetRecord, bool]:
        """(the care sheet for `key`, whether it was created now); `KeyReused` on a conflict,
        `LineAlreadyBilled` when one of `prescription_lines` ((cleLigne, numero, ligne)) is
        already in another sheet.

        `build_answer(number, status, received_at)` gives the answer stored for a new sheet.
        """
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT numero, cle, empreinte, statut, recue_le, reponse FROM feuilles WHERE cle = ?",
                (key,),
            ).fetchone()
            if row is not None:
                db.execute("COMMIT")
                record = CareSheetRecord(*row)
                if record.fingerprint != fingerprint:
                    raise KeyReused(key)
                return record, False
            for line_key, _, _ in prescription_lines:
                if db.execute("SELECT 1 FROM lignes_prescription WHERE cle_ligne = ?", (line_key,)).fetchone():
                    raise LineAlreadyBilled(line_key)
            cursor = db.execute(
                "INSERT INTO feuilles (cle, empreinte, statut, recue_le, requete, reponse, papier)"
                " VALUES (?, ?, 'RECUE', ?, ?, x'', ?)",
                (key, fingerprint, received_at, request_xml, int(paper)),
            )
            db.executemany("INSERT INTO lignes_prescription (cle_ligne, numero, ligne, sequence) VALUES (?, ?, ?, ?)",
                           [(line_key, numero, line, cursor.lastrowid)
                            for line_key, numero, line in prescription_lines])
            number = care_sheet_number(cursor.lastrowid, received_at)
            answer = build_answer(number, "RECUE", received_at)
            db.execute("UPDATE feuilles SET numero = ?, reponse = ? WHERE sequence = ?",
                       (number, answer, cursor.lastrowid))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return CareSheetRecord(number, key, fingerprint, "RECUE", received_at, answer), True

    def find(self, *, number: str | None = None, key: str | None = None) -> CareSheetRecord | None:
        column, value = ("numero", number) if number is not None else ("cle", key)
        row = self._db().execute(
            f"SELECT numero, cle, empreinte, statut, recue_le, reponse FROM feuilles WHERE {column} = ?",
            (value,),
        ).fetchone()
        return CareSheetRecord(*row) if row is not None else None

    def prescription_lines(self, prescription: str | None = None) -> list[PrescriptionLine]:
        """The billed e-prescription lines (of one prescription), in the order received."""
        query = ("SELECT l.cle_ligne, l.numero, l.ligne, f.numero FROM lignes_prescription l "
                 "JOIN feuilles f ON f.sequence = l.sequence")
        rows = (self._db().execute(query + " WHERE l.numero = ? ORDER BY l.rowid", (prescription,))
                if prescription is not None else self._db().execute(query + " ORDER BY l.rowid"))
        return [PrescriptionLine(*row) for row in rows]

    def paper_sheets(self) -> list[str]:
        """The numbers of the care sheets for paper prescriptions."""
        return [row[0] for row in self._db().execute(
            "SELECT numero FROM feuilles WHERE papier = 1 ORDER BY sequence")]

    def count(self) -> int:
        return self._db().execute("SELECT count(*) FROM feuilles").fetchone()[0]

    def request_xml(self, number: str) -> bytes | None:
        row = self._db().execute("SELECT requete FROM feuilles WHERE numero = ?", (number,)).fetchone()
        return row[0] if row else None

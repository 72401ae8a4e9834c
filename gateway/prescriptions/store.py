"""The prescription store: prescriptions, their lines, and what was dispensed or performed
against them.

A line is a drug (`kind` 'drug': an EAN-13 or local code, a quantity to dispense) or an act
(`kind` 'act': a lab test or an imaging examination, NABM/NGAP/LOINC or local code, quantity 1:
performed once). Performed acts are kept in `dispensations` beside dispensed drugs (the
performing facility as `dispensing_facility`, quantity 1), under the key `act|RX-.../n`: an
act line is performed once, whatever message brings its result again.

Tables on the shared `metadata` (gateway.store.schema), created by migration 0005 (the line
kind by 0007). Functions
take a connection (one transaction, the caller's) and return plain dataclasses, like the rest
of the store.

Quantities are kept in thousandths of a unit (integers): exact sums on every database, and
enough for a dose of 0.125 ml. Concurrency: a dispensation locks its prescription row first
(`lock_prescription`: SELECT ... FOR UPDATE on PostgreSQL; on SQLite the write transaction is
BEGIN IMMEDIATE, which already serialises writers), then reads what remains, so two
dispensations of the same line at the same time, on one node or several, never exceed it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from sqlalchemy import (BigInteger, Boolean, Column, Connection, DateTime, ForeignKey, Index,
                        Integer, String, Table, Text, and_, func, select, update)

from gateway.store.schema import Id, metadata
from gateway.store.timestamps import utc as _utc

ACTIVE, CANCELLED, COMPLETED = "active", "cancelled", "completed"
STATUSES = (ACTIVE, CANCELLED, COMPLETED)
DRUG, ACT = "drug", "act"
KINDS = (DRUG, ACT)
MILLI = Decimal(1000)

prescriptions = Table(
    "prescriptions", metadata,
    Column("id", String(16), primary_key=True),  # RX-XXXX-XXXX-C (gateway.prescriptions.ids)
    Column("prescriber_facility", String(64), nullable=False),  # the registry facility that sent it
    Column("prescriber_inpe", String(64), nullable=False),
    Column("patient_key", String(128)),  # 'Patient/<id>' of the canonical bundle
    Column("patient_identifiers", Text, nullable=False),  # JSON list of 'system|value'
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),  # active | cancelled | completed
    Column("source_message_id", Id, ForeignKey("messages.id", ondelete="SET NULL")),
    Column("qr_payload", Text, nullable=False),
    Column("payload", Text),  # JSON: what re-routing a dispensation needs (the prescriber)
)
Index("ux_prescriptions_message", prescriptions.c.source_message_id, unique=True)

prescription_lines = Table(
    "prescription_lines", metadata,
    Column("prescription_id", String(16), ForeignKey("prescriptions.id", ondelete="CASCADE"),
           primary_key=True),
    Column("line", Integer, primary_key=True),  # 1, 2... in message order
    # The drug's code (https://www.gs1.org/gtin for EAN-13, else local), or the act's (its CNSS
    # nomenclature code when it has one: urn:ma:cnss:nabm, urn:ma:cnss:ngap; else LOINC, local)
    Column("medication_system", String(128)),
    Column("medication_code", String(64), nullable=False),
    Column("display", Text),
    Column("quantity_milli", BigInteger, nullable=False),  # prescribed, in thousandths
    Column("unit", String(64)),
    Column("dispensed_milli", BigInteger, nullable=False, default=0),  # so far, in thousandths
    Column("resource", Text),  # the MedicationRequest / ServiceRequest as issued (JSON), sent again
    Column("kind", String(8), nullable=False, default=DRUG, server_default=DRUG),  # drug | act (0007)
)

dispensations = Table(
    "dispensations", metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("dispensation_id", String(128), nullable=False),  # public: the care-sheet line key
    Column("prescription_id", String(16), ForeignKey("prescriptions.id")),  # None: paper
    Column("line", Integer),
    Column("paper", Boolean, nullable=False),
    Column("dispensing_facility", String(64), nullable=False),
    Column("message_id", Id, ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
    Column("medication_code", String(64)),
    Column("quantity_milli", BigInteger, nullable=False),
    # dispenser | its dispensation id (or the message's control id and position) | line:
    # the same dispensation is never recorded twice, whatever message brings it again.
    Column("dedup_key", String(255), nullable=False),
    Column("recorded_at", DateTime(timezone=True), nullable=False),
)
Index("ux_dispensations_dedup", dispensations.c.dedup_key, unique=True)
Index("ix_dispensations_prescription", dispensations.c.prescription_id, dispensations.c.line)
Index("ix_dispensations_message", dispensations.c.message_id)


def to_milli(quantity: Decimal) -> int:
    return int((Decimal(quantity) * MILLI).to_integral_value(ROUND_HALF_UP))


def from_milli(value: int) -> Decimal:
    number = Decimal(value) / MILLI
    return number.quantize(Decimal(1)) if number == number.to_integral_value() else number.normalize()


@dataclass(frozen=True)
class Line:
    prescription_id: str
    line: int
    medication_system: str | None
    medication_code: str
    display: str | None
    quantity: Decimal
    unit: str | None
    dispensed: Decimal = Decimal(0)
    resource: dict | None = None
    kind: str = DRUG

    @property
    def remaining(self) -> Decimal:
        return max(self.quantity - self.dispensed, Decimal(0))

    def as_dict(self) -> dict:
        """The REST view: a drug's `medication`, or an act's `act`; `dispensed` counts what was
        dispensed or performed (an act: 0 or 1)."""
        code = {"system": self.medication_system, "code": self.medication_code, "display": self.display}
        return {"line": self.line, "kind": self.kind, ("act" if self.kind == ACT else "medication"): code,
                "quantity": _number(self.quantity), "unit": self.unit,
                "dispensed": _number(self.dispensed), "remaining": _number(self.remaining)}


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


@dataclass(frozen=True)
class Prescription:
    id: str
    prescriber_facility: str
    prescriber_inpe: str
    patient_key: str | None
    patient_identifiers: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    status: str
    source_message_id: int | None
    qr_payload: str
    payload: dict = field(default_factory=dict)
    lines: tuple[Line, ...] = ()

    def valid_at(self, moment: datetime) -> bool:
        return self.status == ACTIVE and moment < self.expires_at


@dataclass(frozen=True)
class IssuedPrescription:
    """What the prescriber gets back: the id and the signed QR payload."""

    id: str
    qr_payload: str
    issued_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Dispensation:
    id: int
    dispensation_id: str
    prescription_id: str | None
    line: int | None
    paper: bool
    dispensing_facility: str
    message_id: int
    medication_code: str | None
    quantity: Decimal
    dedup_key: str
    recorded_at: datetime


# -- prescriptions ---------------------------------------------------------------------------

def insert_prescription(connection: Connection, prescription: Prescription) -> None:
    """Store a new prescription and its lines."""
    connection.execute(prescriptions.insert().values(
        id=prescription.id, prescriber_facility=prescription.prescriber_facility,
        prescriber_inpe=prescription.prescriber_inpe, patient_key=prescription.patient_key,
        patient_identifiers=json.dumps(list(prescription.patient_identifiers), ensure_ascii=False),
        issued_at=prescription.issued_at, expires_at=prescription.expires_at,
        status=prescription.status, source_message_id=prescription.source_message_id,
        qr_payload=prescription.qr_payload,
        payload=json.dumps(prescription.payload, ensure_ascii=False, separators=(",", ":"))))
    if prescription.lines:
        connection.execute(prescription_lines.insert(), [
            {"prescription_id": prescription.id, "line": line.line,
             "medication_system": line.medication_system, "medication_code": line.medication_code,
             "display": line.display, "quantity_milli": to_milli(line.quantity), "unit": line.unit,
             "dispensed_milli": to_milli(line.dispensed),
             "resource": (json.dumps(line.resource, ensure_ascii=False, separators=(",", ":"))
                          if line.resource is not None else None),
             "kind": line.kind}
            for line in prescription.lines])


def id_taken(connection: Connection, prescription_id: str) -> bool:
    return connection.execute(select(prescriptions.c.id).where(
        prescriptions.c.id == prescription_id)).first() is not None


def get_prescription(connection: Connection, prescription_id: str, *, lock: bool = False,
                     with_resources: bool = False) -> Prescription | None:
    """The prescription and its lines; `lock` holds its row until the transaction ends
    (FOR UPDATE on PostgreSQL; SQLite's write transaction holds the whole database), and its
    lines are read once it is held. Without `lock` (a look-up), the prescription and its lines
    are read by one statement: under PostgreSQL's READ COMMITTED each statement sees its own
    moment, and a dispensation committed between two reads showed an 'active' prescription
    with nothing left."""
    if not lock:
        return _read_at_once(connection, prescription_id, with_resources)
    query = select(prescriptions).where(prescriptions.c.id == prescription_id)
    if connection.dialect.name == "postgresql":
        query = query.with_for_update()
    row = connection.execute(query).first()
    if row is None:
        return None
    return _prescription(row, _lines(connection, prescription_id, with_resources))


def _line_columns(with_resources: bool) -> list:
    return [c for c in prescription_lines.columns if with_resources or c.name != "resource"]


def _read_at_once(connection: Connection, prescription_id: str, with_resources: bool) -> Prescription | None:
    columns = [c.label(f"l_{c.name}") for c in _line_columns(with_resources)]
    rows = connection.execute(
        select(prescriptions, *columns)
        .select_from(prescriptions.outerjoin(prescription_lines,
                                             prescription_lines.c.prescription_id == prescriptions.c.id))
        .where(prescriptions.c.id == prescription_id).order_by(prescription_lines.c.line)).all()
    if not rows:
        return None
    lines = tuple(_line(row._mapping, "l_", with_resources) for row in rows if row.l_line is not None)
    return _prescription(rows[0], lines)


def prescription_for_message(connection: Connection, message_id: int) -> Prescription | None:
    row = connection.execute(select(prescriptions).where(
        prescriptions.c.source_message_id == message_id)).first()
    if row is None:
        return None
    return _prescription(row, _lines(connection, row.id, True))


def prescriptions_for_message(connection: Connection, message_id: int) -> list[IssuedPrescription]:
    """The prescriptions issued for a stored message (the REST door's answer to a prescriber):
    none when it was not a prescription or was refused."""
    rows = connection.execute(
        select(prescriptions.c.id, prescriptions.c.qr_payload, prescriptions.c.issued_at,
               prescriptions.c.expires_at)
        .where(prescriptions.c.source_message_id == message_id).order_by(prescriptions.c.id))
    return [IssuedPrescription(row.id, row.qr_payload, _utc(row.issued_at), _utc(row.expires_at))
            for row in rows]


def set_status(connection: Connection, prescription_id: str, status: str) -> None:
    connection.execute(update(prescriptions).where(prescriptions.c.id == prescription_id)
                       .values(status=status))


def _lines(connection: Connection, prescription_id: str, with_resources: bool) -> tuple[Line, ...]:
    rows = connection.execute(select(*_line_columns(with_resources)).where(
        prescription_lines.c.prescription_id == prescription_id).order_by(prescription_lines.c.line))
    return tuple(_line(row._mapping, "", with_resources) for row in rows)


def _line(row, prefix: str, with_resources: bool) -> Line:
    """A Line from a row's mapping whose line columns are named `prefix` + column name."""
    def get(name):
        return row[prefix + name]

    resource = get("resource") if with_resources else None
    return Line(get("prescription_id"), get("line"), get("medication_system"), get("medication_code"),
                get("display"), from_milli(get("quantity_milli")), get("unit"), from_milli(get("dispensed_milli")),
                json.loads(resource) if resource else None, get("kind"))


def _prescription(row, lines: tuple[Line, ...]) -> Prescription:
    return Prescription(row.id, row.prescriber_facility, row.prescriber_inpe, row.patient_key,
                        tuple(json.loads(row.patient_identifiers)), _utc(row.issued_at),
                        _utc(row.expires_at), row.status, row.source_message_id, row.qr_payload,
                        json.loads(row.payload) if row.payload else {}, lines)


# -- dispensations ---------------------------------------------------------------------------

def dispensations_of_message(connection: Connection, message_id: int) -> list[Dispensation]:
    rows = connection.execute(select(dispensations).where(dispensations.c.message_id == message_id)
                              .order_by(dispensations.c.id))
    return [_dispensation(row) for row in rows]


def dispensation_by_key(connection: Connection, dedup_key: str) -> Dispensation | None:
    row = connection.execute(select(dispensations).where(dispensations.c.dedup_key == dedup_key)).first()
    return _dispensation(row) if row is not None else None


def dispensations_of(connection: Connection, prescription_id: str) -> list[Dispensation]:
    rows = connection.execute(select(dispensations).where(
        dispensations.c.prescription_id == prescription_id).order_by(dispensations.c.id))
    return [_dispensation(row) for row in rows]


def act_key(prescription_id: str, line: int) -> str:
    """The dedup key of an act line performed: once per line, whoever performs it."""
    return f"act|{prescription_id}/{line}"


def record_dispensation(connection: Connection, *, dispensation_id: str, prescription_id: str | None,
                        line: int | None, paper: bool, dispensing_facility: str, message_id: int,
                        medication_code: str | None, quantity: Decimal, dedup_key: str,
                        now: datetime) -> None:
    """Record one dispensation; against a prescription line, add it to what was dispensed and
    complete the prescription once every line is fully dispensed. The caller has checked the
    quantity under `get_prescription(lock=True)`."""
    milli = to_milli(quantity)
    connection.execute(dispensations.insert().values(
        dispensation_id=dispensation_id, prescription_id=prescription_id, line=line, paper=paper,
        dispensing_facility=dispensing_facility, message_id=message_id,
        medication_code=medication_code, quantity_milli=milli, dedup_key=dedup_key, recorded_at=now))
    if prescription_id is None:
        return
    connection.execute(update(prescription_lines).where(and_(
        prescription_lines.c.prescription_id == prescription_id, prescription_lines.c.line == line))
        .values(dispensed_milli=prescription_lines.c.dispensed_milli + milli))
    left = connection.execute(select(func.count()).select_from(prescription_lines).where(
        prescription_lines.c.prescription_id == prescription_id,
        prescription_lines.c.dispensed_milli < prescription_lines.c.quantity_milli)).scalar()
    if not left:
        set_status(connection, prescription_id, COMPLETED)


def _dispensation(row) -> Dispensation:
    return Dispensation(row.id, row.dispensation_id, row.prescription_id, row.line, bool(row.paper),
                        row.dispensing_facility, row.message_id, row.medication_code,
                        from_milli(row.quantity_milli), row.dedup_key, _utc(row.recorded_at))

"""The e-prescription flow as a step of the translation worker: after a message is translated
and inside the same write transaction as its translation and its deliveries, so that an issued
id, a recorded dispensation and what is routed commit together or not at all.

    worker: translate a batch -> prepare(results)  (no transaction: AMO eligibility at CNSS)
            -> BEGIN; apply(connection, results, prepared); save_translations(...); COMMIT

Which messages (by type for HL7, by content for FHIR input):
- a prescription: RDE^O11, OMP^O09, or a FHIR bundle of MedicationRequests to order. The
  prescriber's facility must be in the registry and its type allowed to send RDE^O11 or
  OMP^O09 (a prescriber: doctor, clinic, hospital). A prescription of acts (lab tests,
  imaging examinations): ORM^O01 or OML^O21 whose every ORC-1 is NW, or a FHIR bundle of
  ServiceRequests to order, from a prescriber (the same orders from any other sender are
  ordinary traffic); its lines are the ServiceRequests (OBR), quantity 1 each, answered
  ORR^O02 / ORL^O22 like drugs. The gateway issues the id (ids.py) and the signed QR payload (qr.py), stores the
  prescription and its lines, and writes the id into every MedicationRequest of the canonical
  bundle (bundle.annotate_prescription) before it goes to the shared record. The answer (HL7):
  RRE^O12 / ORP^O10 with ORC-3 = the id and the QR payload in an NTE.
- a cancellation: the same message types with every ORC-1 = CA and ORC-3 = the id (for
  ORM^O01 / OML^O21: every ORC-3 a prescription id, else an ordinary cancellation) (FHIR:
  MedicationRequests cancelled or revoked, carrying the id), from the facility that issued
  it, before anything was dispensed. Answered with ORC-1 = CR; the shared record gets the
  MedicationRequests cancelled; look-ups and dispensations then meet a cancelled prescription.
- a dispensation: RDS^O13, or a FHIR bundle with MedicationDispenses. The dispensing facility's
  type must allow `prescriptions.dispense`; AMO rights must be open at CNSS (when
  `prescriptions.eligibility` names a CNSS destination); against an e-prescription: it exists,
  is active and not expired, the patient shares an identifier with it (and none
  contradicts it: another value of one system), each drug is on it,
  in its unit, within what remains, and the same dispensation was not recorded before.
  A paper prescription (no id, marked paper) skips the prescription checks. Accepted: recorded,
  the bundle rewritten (bundle.annotate_dispensation) and routed as the routes say (shared
  record, CNSS care sheet). Refused: the message is `failed` with the reason, nothing routed,
  AE with an ERR naming the segment and our ERR-5 code (codes.py).
- acts performed: results (ORU^R01, a SOAP imaging report, FHIR DiagnosticReports) whose
  reports name a prescription (ORC-4 `RX-...^HIE`: bundle.read_performance). The performing
  facility's type must allow `prescriptions.perform`; the prescription exists, the patient
  shares an identifier with it (none contradicting it); each act (OBR-4) is an act line of it not performed yet, by
  code. An act line is performed once: its key is the prescription and line, its act id
  RX-.../n.<digest of performer and report id>; the same report again (re-sent, corrected:
  OBR-25 C, preliminary then final) is accepted and bills nothing; another report of it is
  refused (ACT_ALREADY_PERFORMED). A new act needs the prescription active, not expired, open
  AMO rights, and a CNSS code (NABM, NGAP) on the result or the prescription. Accepted: the
  bundle rewritten (bundle.annotate_performance: the report points at its line, a ChargeItem
  per act billed) and routed again, so the routes send it to CNSS as a care-sheet line with
  the prescription reference. Results that name no prescription are not part of the flow.

Applying the same message again (a replay, the start sweep, a second node) finds what it
recorded the first time and gives the same outcome: one id per prescription message, one
record per dispensation.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import unicodedata
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from adapters.hl7v2.ack import AckBuilder, ErrorDetail
from adapters.hl7v2.codes import ErrorCondition, Outcome
from adapters.hl7v2.header import HeaderError, MessageHeader, parse_header
from adapters.hl7v2.order_response import (order_controls, order_response, placer_groups,
                                           response_type)
from gateway.config import GatewayConfig
from gateway.delivery.care_sheet import local_day
from gateway.delivery.routes import Router, patient_key
from gateway.facilities import FacilityRegistry, RegistryRef
from gateway.ingest.model import MessageStatus
from gateway.prescriptions import bundle as rules
from gateway.prescriptions import ids, qr
from gateway.prescriptions import store
from gateway.prescriptions.bundle import Refusal
from gateway.prescriptions.codes import PrescriptionError
from gateway.prescriptions.eligibility import EligibilityAnswer, EligibilityChecker, EligibilityQuery
from gateway.store.schema import messages
from gateway.store.translations import Pending, TranslationRecord, resolve_message_id

log = logging.getLogger(__name__)

PRESCRIBE = {"RDE^O11": "RXE", "OMP^O09": "RXO"}  # message type -> the segment of its lines
DISPENSE = frozenset({"RDS^O13"})
# Orders that are prescriptions of acts when a prescriber sends them (their drug lines, if any: RXO)
ORDER_ACTS = {"ORM^O01": "RXO", "OML^O21": "RXO"}
RESULTS = frozenset({"ORU^R01", "ORU"})  # acts performed, when an ORC-4 names a prescription
# ORC-4.2 namespaces of a national prescription id: the keys of the mapping table
# mappings/tables/prescription_id_system.yaml (a test keeps them equal).
PRESCRIPTION_NAMESPACES = frozenset({b"HIE", b"FSE", b"EPRESCRIPTION", b"ORDONNANCE"})
FHIR_FORMATS = frozenset({"fhir"})
DOCUMENT_FORMATS = frozenset({"fhir", "soap-report"})
HL7_FORMATS = frozenset({"hl7v2"})
DEFAULT_ZONE = "Africa/Casablanca"


def answers_after_translation(message_type: str | None) -> bool:
    """Whether every HL7 message of this type is answered only once the flow has run (its
    answer carries the prescription id, or the dispensation's refusal). Orders of acts and
    results depend on their content too: PrescriptionFlow.waits_for."""
    return message_type in PRESCRIBE or message_type in DISPENSE


def names_prescription(raw: bytes) -> bool:
    """Whether an ER7 message has an ORC whose placer group number (ORC-4) is in a national
    prescription namespace (`RX-...^HIE`). Byte search only: cheap enough for every result
    (one scan for the ORC segments: about 3 µs for an ordinary 3 KB ORU, as much as hashing it)."""
    return any(namespace in PRESCRIPTION_NAMESPACES for _, namespace in placer_groups(raw))


def _act_id(prescription_id: str, line: int, facility_id: str, report: str) -> str:
    """The public id of an act performed (the care-sheet line key at CNSS): the same for
    every message about the same report of the same performer."""
    digest = hashlib.sha256(f"{facility_id}|{report}".encode("utf-8")).hexdigest()
    return f"{prescription_id}.{line}.{digest[:12]}"


@dataclass(frozen=True)
class _Prepared:
    eligibility: dict[EligibilityQuery, EligibilityAnswer]


def _duplicate(index: int, existing: "store.Dispensation", hl7: bool) -> Refusal:
    """The refusal of a dispensation (its ORC-3 / identifier) already recorded by another message."""
    return Refusal(PrescriptionError.DISPENSATION_DUPLICATE,
                   f"dispensation {index} was already recorded (message #{existing.message_id})",
                   rules.location(hl7, "ORC", "MedicationDispense", index, 3, "identifier"),
                   ErrorCondition.DUPLICATE_KEY_IDENTIFIER)


class PrescriptionFlow:
    def __init__(self, config: GatewayConfig, key: qr.SigningKey,
                 registry: "FacilityRegistry | RegistryRef", builder: AckBuilder | None = None,
                 eligibility: EligibilityChecker | None = None, zone: str = DEFAULT_ZONE,
                 router: Router | None = None):
        self.validity = timedelta(days=config.prescriptions.validity_days)
        # Results that perform acts are routed again once annotated (their ChargeItems go to
        # CNSS): the same routes as the translator's.
        self.router = router or (Router(config.routes, config.senders) if config.routes else None)
        self.key = key
        self._registry = registry  # a RegistryRef follows reloads (SIGHUP)
        self.builder = builder
        self.eligibility = eligibility
        self.zone = ZoneInfo(zone)
        self.issued = self.dispensed = self.performed = self.refused = 0

    @property
    def registry(self) -> FacilityRegistry:
        """The facility registry in force (the shared RegistryRef's current one)."""
        registry = self._registry
        return registry.current if isinstance(registry, RegistryRef) else registry

    @registry.setter
    def registry(self, registry: "FacilityRegistry | RegistryRef") -> None:
        self._registry = registry

    # -- which messages ----------------------------------------------------------------------

    def waits_for(self, message_type: str | None, raw: bytes = b"", sender_id: str | None = None) -> bool:
        """Whether a stored HL7 message is answered only after the step (ingest asks before
        the commit, for every message: cheap, from the type, the raw bytes and the sender)."""
        if answers_after_translation(message_type):
            return True
        if message_type in RESULTS:
            return names_prescription(raw)
        if message_type in ORDER_ACTS:
            return self._act_order(raw, sender_id) is not None
        return False

    def involves(self, pending: Pending, record: TranslationRecord) -> bool:
        """Whether the flow works on this translation (the worker keeps its bundle)."""
        return self.kind_of(pending, record) is not None

    def kind_of(self, pending: Pending, record: TranslationRecord) -> str | None:
        """'prescribe', 'cancel', 'dispense', 'perform' or None (not part of the flow)."""
        if record.bundle is None and not record.failed:
            return None  # nothing to work on (sealed by the worker: not the flow's)
        if pending.format in DOCUMENT_FORMATS:
            bundle = record.bundle
            if bundle is None:
                return None
            if rules.is_dispensation_bundle(bundle):
                return "dispense"
            if rules.is_performance_bundle(bundle):
                return "perform"
            if pending.format not in FHIR_FORMATS:
                return None
            if rules.cancelled_group(bundle) is not None:
                return "cancel"
            if not rules.is_prescription_bundle(bundle):
                return None
            if rules.only_acts(bundle) and not self._prescriber(pending.sender_id):
                return None  # another sender's orders: ordinary traffic
            return "prescribe"
        if pending.format not in HL7_FORMATS:
            return None
        if pending.message_type in PRESCRIBE:
            controls = order_controls(pending.raw)
            if controls and all(control == b"CA" for control, _ in controls):
                return "cancel"
            return "prescribe"
        if pending.message_type in DISPENSE:
            return "dispense"
        if pending.message_type in RESULTS:
            return "perform" if names_prescription(pending.raw) else None
        if pending.message_type in ORDER_ACTS:
            return self._act_order(pending.raw, pending.sender_id)
        return None

    def _act_order(self, raw: bytes, sender_id: str | None) -> str | None:
        """'prescribe' for an ORM^O01 / OML^O21 of new orders (every ORC-1 NW) from a
        prescriber, 'cancel' when every ORC-1 is CA and every ORC-3 a prescription id; None:
        an ordinary order (another sender, another control, another system's order number)."""
        if not self._prescriber(sender_id):
            return None
        controls = order_controls(raw)
        if not controls:
            return None
        if all(control == b"NW" for control, _ in controls):
            return "prescribe"
        if all(control == b"CA" and ids.is_prescription_id(filler.decode("ascii", "replace"))
               for control, filler in controls):
            return "cancel"
        return None

    def _prescriber(self, sender_id: str | None) -> bool:
        """Whether the facility may issue prescriptions (its type may send RDE^O11 or OMP^O09)."""
        registry = self.registry
        facility = registry.get(sender_id) if sender_id else None
        return facility is not None and (registry.may_send(facility, "RDE^O11")
                                         or registry.may_send(facility, "OMP^O09"))

    # -- before the transaction --------------------------------------------------------------

    def prepare(self, results: list[tuple[Pending, TranslationRecord]]) -> _Prepared:
        """AMO eligibility of every dispensation of the batch, asked at once (worker thread,
        no transaction open)."""
        if self.eligibility is None:
            return _Prepared({})
        queries = []
        for pending, record in results:
            kind = None if record.failed else self.kind_of(pending, record)
            if kind not in ("dispense", "perform"):
                continue
            hl7 = pending.format in HL7_FORMATS
            try:
                draft = (rules.read_dispensation(record.bundle, hl7) if kind == "dispense"
                         else rules.read_performance(record.bundle, hl7))
            except Refusal:
                continue  # refused in apply, with its reason
            if not draft.items:
                continue
            query = self._query(draft, pending)
            if query is not None:
                queries.append(query)
        return _Prepared(self.eligibility.check_many(queries) if queries else {})

    def _query(self, draft, pending: Pending) -> EligibilityQuery | None:
        if not draft.coverage:
            return None
        kind, value = next(iter(draft.coverage.items()))
        return EligibilityQuery(kind, value, self._care_date(draft, pending))

    def _care_date(self, draft, pending: Pending) -> date:
        """The day of care: the first dispensation's handing over or act's performance, else
        the day the message was received (in the gateway's zone)."""
        for item in draft.items:
            day = self._local_day(getattr(item, "handed_over", None) or getattr(item, "day", None))
            if day is not None:
                return day
        return pending.received_at.astimezone(self.zone).date()

    def _local_day(self, text) -> date | None:
        """The day a FHIR date or dateTime falls on in the gateway's zone (23:30Z on the 15th
        is the 16th in Casablanca, where AMO rights are counted)."""
        return local_day(text, self.zone)

    # -- inside the transaction --------------------------------------------------------------

    def apply(self, connection: Connection, results: list[tuple[Pending, TranslationRecord]],
              prepared: _Prepared | None, now: datetime) -> None:
        """Run the flow for each message of the batch, in the worker's write transaction,
        before save_translations; each message in its own savepoint."""
        prepared = prepared or _Prepared({})
        for pending, record in results:
            kind = self.kind_of(pending, record)
            if kind is None:
                continue
            if record.failed:
                self._answer_failure(pending, record)
                continue
            message_id = resolve_message_id(connection, pending)
            if message_id is None:
                continue
            savepoint = connection.begin_nested()
            try:
                if kind == "prescribe":
                    issued = self._prescribe(connection, pending, record, message_id, now)
                    self._answer(pending, record, Outcome.ACCEPT, prescription=issued)
                    self.issued += 1
                elif kind == "cancel":
                    cancelled = self._cancel(connection, pending, record)
                    self._answer(pending, record, Outcome.ACCEPT, prescription=cancelled, control=b"CR")
                elif kind == "perform":
                    self._perform(connection, pending, record, message_id, prepared, now)
                    self._answer(pending, record, Outcome.ACCEPT)
                    self.performed += 1
                else:
                    self._dispense(connection, pending, record, message_id, prepared, now)
                    self._answer(pending, record, Outcome.ACCEPT)
                    self.dispensed += 1
                savepoint.commit()
            except Refusal as refusal:
                savepoint.rollback()
                self._refuse(pending, record, refusal)
            except Exception as error:  # a bug here must not block the batch or the sweep
                savepoint.rollback()
                log.error("prescription flow failed on message #%s: %s", message_id, type(error).__name__)
                log.debug("prescription flow failure", exc_info=True)
                record.bundle = None
                self._refuse(pending, record, Refusal(
                    PrescriptionError.PRESCRIPTION_INTERNAL,
                    f"internal error in the prescription flow ({type(error).__name__}); send again later"))

    # -- prescriptions -----------------------------------------------------------------------

    def _prescribe(self, connection: Connection, pending: Pending, record: TranslationRecord,
                   message_id: int, now: datetime) -> store.Prescription:
        segment = ((PRESCRIBE.get(pending.message_type or "") or ORDER_ACTS.get(pending.message_type or ""))
                   if pending.format in HL7_FORMATS else None)
        facility = self._facility(pending)
        if not (self.registry.may_send(facility, "RDE^O11") or self.registry.may_send(facility, "OMP^O09")):
            raise Refusal(PrescriptionError.OPERATION_NOT_ALLOWED,
                          f"facility {facility.id} ({facility.type}) may not issue prescriptions",
                          "MSH[1]-4" if segment else "")
        if segment:
            # A new order only, as for acts (ORDER_ACTS): a line sent to cancel (CA beside NW),
            # replace (RP) or change (XO) an order became a line of a new, dispensable prescription.
            for position, (control, _) in enumerate(order_controls(pending.raw), start=1):
                if control != b"NW":
                    raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                                  f"order {position}: ORC-1 is {control[:8].decode('ascii', 'replace')!r}, "
                                  "a prescription's every ORC-1 is NW (to cancel it: every ORC-1 CA and "
                                  "ORC-3 its id; to change it, cancel it and prescribe again)",
                                  f"ORC[{position}]-1", ErrorCondition.TABLE_VALUE_NOT_FOUND)
        draft = rules.read_prescription(record.bundle, segment)
        existing = store.prescription_for_message(connection, message_id)
        if existing is not None:  # the same message again: the same id, nothing new
            rules.annotate_prescription(draft, existing.id)
            return existing
        prescription_id = ids.new_id()
        while store.id_taken(connection, prescription_id):
            prescription_id = ids.new_id()
        inpe = draft.prescriber_inpe or facility.id
        lines = [(line.number, line.medication.code, line.quantity, line.unit) for line in draft.lines]
        payload = qr.sign(self.key, prescription_id, inpe, now.astimezone(self.zone).date(),
                          qr.lines_digest(lines))
        rules.annotate_prescription(draft, prescription_id)
        prescription = store.Prescription(
            prescription_id, facility.id, inpe, draft.patient_key, draft.patient_identifiers, now,
            now + self.validity, store.ACTIVE, message_id, payload,
            {"prescriber": copy.deepcopy(draft.prescriber_entry)} if draft.prescriber_entry else {},
            tuple(store.Line(prescription_id, line.number, line.medication.system, line.medication.code,
                             line.medication.display, line.quantity, line.unit, resource=copy.deepcopy(line.entry),
                             kind=line.kind)
                  for line in draft.lines))
        store.insert_prescription(connection, prescription)
        log.info("prescription %s issued for message #%d (%d lines)", prescription_id, message_id,
                 len(draft.lines))
        return prescription

    def _cancel(self, connection: Connection, pending: Pending, record: TranslationRecord) -> store.Prescription:
        """ORC-1 CA with ORC-3 = the id (FHIR: MedicationRequests cancelled, with the id): the
        facility that issued it cancels a prescription nothing was dispensed against."""
        hl7 = pending.format in HL7_FORMATS
        where = "ORC[1]-3" if hl7 else "MedicationRequest.groupIdentifier"
        facility = self._facility(pending)
        if hl7:
            numbers = {filler for _, filler in order_controls(pending.raw)}
            text = numbers.pop().decode("ascii", "replace") if len(numbers) == 1 else ""
        else:
            text = rules.cancelled_group(record.bundle) or ""
        try:
            prescription_id = ids.parse(text)
        except ids.PrescriptionIdError as error:
            raise Refusal(PrescriptionError.PRESCRIPTION_UNKNOWN,
                          f"cancellation: {error.reason} (every ORC-3 must be the prescription id)", where,
                          ErrorCondition.UNKNOWN_KEY_IDENTIFIER) from None
        prescription = store.get_prescription(connection, prescription_id, lock=True)
        if prescription is None:
            raise Refusal(PrescriptionError.PRESCRIPTION_UNKNOWN, f"unknown prescription {prescription_id}",
                          where, ErrorCondition.UNKNOWN_KEY_IDENTIFIER)
        if prescription.prescriber_facility != facility.id:
            raise Refusal(PrescriptionError.OPERATION_NOT_ALLOWED,
                          f"only the facility that issued prescription {prescription_id} may cancel it", where)
        if prescription.status != store.CANCELLED:
            if any(line.dispensed > 0 for line in prescription.lines):
                raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                              f"prescription {prescription_id} was already dispensed or performed, in part "
                              "or whole: it can no longer be cancelled", where)
            store.set_status(connection, prescription_id, store.CANCELLED)
            log.info("prescription %s cancelled by its prescriber", prescription_id)
        rules.mark_cancelled(record.bundle, prescription_id)
        return prescription

    def _facility(self, pending: Pending, operation: str | None = None, doing: str = ""):
        """The registered sending facility; with `operation`, one its type allows (a Refusal
        saying it may not be `doing` otherwise)."""
        where = "MSH[1]-4" if pending.format in HL7_FORMATS else ""
        facility = self.registry.get(pending.sender_id)
        if facility is None:
            raise Refusal(PrescriptionError.OPERATION_NOT_ALLOWED,
                          "the sending facility is not in the facility registry: only registered "
                          "facilities take part in the e-prescription flow", where)
        if operation is not None and not self.registry.may(facility, operation):
            raise Refusal(PrescriptionError.OPERATION_NOT_ALLOWED,
                          f"facility {facility.id} ({facility.type}) may not {doing}", where)
        return facility

    # -- dispensations -----------------------------------------------------------------------

    def _dispense(self, connection: Connection, pending: Pending, record: TranslationRecord,
                  message_id: int, prepared: _Prepared, now: datetime) -> None:
        hl7 = pending.format in HL7_FORMATS
        facility = self._facility(pending, "prescriptions.dispense", "dispense prescriptions")
        draft = rules.read_dispensation(record.bundle, hl7)
        rules.drop_charge_items(record.bundle)  # billed: the dispensed lines, nothing the sender adds
        prescription_id = draft.items[0].prescription_id
        prescription = None
        if prescription_id is not None:  # locked first: what remains cannot change under us
            prescription = store.get_prescription(connection, prescription_id, lock=True, with_resources=True)
        recorded: dict[int, tuple[str, int | None]] = {}
        already = store.dispensations_of_message(connection, message_id)
        if already and len(already) == len(draft.items):
            # The same message again (replay, sweep, another node): what it recorded stands.
            recorded = {item.index: (row.dispensation_id, row.line) for item, row in zip(draft.items, already)}
            self._annotate(record, draft, recorded, prescription)
            return
        if prescription_id is not None:
            self._check_prescription(prescription, prescription_id, draft, hl7, now)
        if self.eligibility is not None:
            self._check_coverage(draft, pending, prepared)
        control_id = _control_id(connection, pending, message_id)
        writes = []
        taken: dict[int, object] = {}  # line -> quantity taken by earlier items of this message
        keys = {}
        for item in draft.items:  # a dispensation seen before is named as such, first
            reference = f"id:{item.dispensation_ref}" if item.dispensation_ref else f"msg:{control_id}"
            keys[item.index] = f"{facility.id}|{reference}|{item.index}"[:255]
            existing = store.dispensation_by_key(connection, keys[item.index])
            if existing is not None and existing.message_id != message_id:
                raise _duplicate(item.index, existing, hl7)
        for item in draft.items:
            line = self._line_for(prescription, item, taken, hl7) if prescription is not None else None
            number = line.line if line is not None else None
            dedup_key = keys[item.index]
            digest = hashlib.sha256(dedup_key.encode("utf-8")).hexdigest()
            dispensation_id = (f"{prescription_id}.{number}.{digest[:12]}" if prescription_id
                               else f"PAPIER.{digest[:16]}")
            recorded[item.index] = (dispensation_id, number)
            existing = store.dispensation_by_key(connection, dedup_key)
            if existing is not None and existing.message_id != message_id:
                # Recorded meanwhile by another node's copy of it (committed since the look
                # above): a duplicate, as it would have been found then, not an AA of nothing.
                raise _duplicate(item.index, existing, hl7)
            if existing is None:
                writes.append((item.index, dict(
                    dispensation_id=dispensation_id, prescription_id=prescription_id, line=number,
                    paper=item.paper, dispensing_facility=facility.id, message_id=message_id,
                    medication_code=item.medication.code, quantity=item.quantity, dedup_key=dedup_key,
                    now=now)))
        for index, write in writes:
            self._record_once(connection, index, write, hl7)
        self._annotate(record, draft, recorded, prescription)
        if writes:
            log.info("dispensation of message #%d recorded (%s, %d lines)", message_id,
                     prescription_id or "paper prescription", len(writes))

    @staticmethod
    def _record_once(connection: Connection, index: int, write: dict, hl7: bool) -> None:
        """Record a dispensation; the same one recorded meanwhile by another transaction is a
        duplicate. A paper prescription has no row to lock: two copies of one dispensation
        (same ORC-3, two control ids) on two nodes both find their key free, and the second
        insert meets the unique key once the first commits."""
        savepoint = connection.begin_nested()
        try:
            store.record_dispensation(connection, **write)
        except IntegrityError:
            savepoint.rollback()
            existing = store.dispensation_by_key(connection, write["dedup_key"])
            if existing is None:
                raise
            raise _duplicate(index, existing, hl7) from None
        savepoint.commit()

    # -- acts performed ----------------------------------------------------------------------

    def _perform(self, connection: Connection, pending: Pending, record: TranslationRecord,
                 message_id: int, prepared: _Prepared, now: datetime) -> None:
        hl7 = pending.format in HL7_FORMATS
        facility = self._facility(pending, "prescriptions.perform", "perform the acts of prescriptions")
        draft = rules.read_performance(record.bundle, hl7)
        rules.drop_charge_items(record.bundle)  # billed: the ChargeItems annotate_performance adds
        if not draft.items:
            return  # not a result yet (or cancelled): nothing performed, routed as any result
        prescription_id = draft.items[0].prescription_id
        where = rules.location(hl7, "ORC", "DiagnosticReport", draft.items[0].index, 4, "basedOn")
        # Locked first: whether a line is performed cannot change under us.
        prescription = store.get_prescription(connection, prescription_id, lock=True, with_resources=True)
        if prescription is None:
            raise Refusal(PrescriptionError.PRESCRIPTION_UNKNOWN, f"unknown prescription {prescription_id}",
                          where, ErrorCondition.UNKNOWN_KEY_IDENTIFIER)
        mismatch = _patient_mismatch(draft.patient_identifiers, prescription.patient_identifiers)
        if mismatch:
            raise Refusal(PrescriptionError.PATIENT_MISMATCH,
                          f"the patient does not match prescription {prescription_id} ({mismatch})",
                          "PID[1]-3" if hl7 else "Patient.identifier")
        found = []  # (item, line, act id, the record of it or None)
        taken: set[int] = set()
        for item in draft.items:
            line, act_id, existing = self._act_line(connection, prescription, item, facility.id, taken, hl7)
            taken.add(line.line)
            found.append((item, line, act_id, existing))
        new = [entry for entry in found if entry[3] is None]
        if new:  # corrections of acts recorded before stand whatever became of the prescription
            self._check_valid(prescription, where, now)
            if self.eligibility is not None:
                self._check_coverage(draft, pending, prepared)
        recorded: dict[int, tuple[str, int, bool]] = {}
        billing: dict[int, tuple[tuple[str, str], str]] = {}
        for item, line, act_id, existing in found:
            # Billed by this message: a new act, or the same message again (a replay).
            billed = existing is None or existing.message_id == message_id
            recorded[item.index] = (act_id, line.line, billed)
            if billed:
                billing[item.index] = (self._cnss_code(item, line, hl7), self._day(item, pending))
        for item, line, act_id, existing in new:
            store.record_dispensation(
                connection, dispensation_id=act_id, prescription_id=prescription_id, line=line.line,
                paper=False, dispensing_facility=facility.id, message_id=message_id,
                medication_code=billing[item.index][0][1], quantity=Decimal(1),
                dedup_key=store.act_key(prescription_id, line.line), now=now)
        by_number = {line.line: line.resource for line in prescription.lines}
        issued = {number: by_number[number] for _, number, _ in recorded.values()
                  if by_number.get(number) is not None}
        rules.annotate_performance(record.bundle, draft, recorded, issued,
                                   prescription.payload.get("prescriber"), billing)
        if self.router is not None:
            record.destinations = self.router.destinations(pending.message_type or pending.format,
                                                           pending.sender_id, record.bundle)
            record.patient_key = patient_key(record.bundle) if record.destinations else None
        if new:
            log.info("acts of message #%d recorded (%s, %d lines; %d already recorded)", message_id,
                     prescription_id, len(new), len(found) - len(new))

    def _act_line(self, connection: Connection, prescription: store.Prescription, item: rules.PerformedAct,
                  facility_id: str, taken: set[int], hl7: bool):
        """(the act line `item` performs, its act id, the record of it when performed before
        by the same report); a Refusal when the act is not prescribed or was performed by
        another report. The same report's line first (a correction), then a free one."""
        where = rules.location(hl7, "OBR", "DiagnosticReport", item.index, 4, "code")
        candidates = [line for line in prescription.lines if line.kind == store.ACT and line.line not in taken
                      and rules.acts_match(_line_codings(line), item.codings)]
        if not candidates:
            raise Refusal(PrescriptionError.NOT_PRESCRIBED,
                          f"result {item.index}: act {item.codings[0][1]} is not prescribed on "
                          f"{prescription.id}" + (" (or is already named by another result of this message)"
                                                  if taken else ""), where)
        free = None
        for line in candidates:
            act_id = _act_id(prescription.id, line.line, facility_id, item.report)
            existing = store.dispensation_by_key(connection, store.act_key(prescription.id, line.line))
            if existing is not None and existing.dispensation_id == act_id:
                return line, act_id, existing
            if existing is None and free is None:
                free = (line, act_id, None)
        if free is not None:
            return free
        line = candidates[0]
        raise Refusal(PrescriptionError.ACT_ALREADY_PERFORMED,
                      f"result {item.index}: act {line.medication_code} (line {line.line} of {prescription.id}) "
                      "was already performed and reported under another report number or by another facility",
                      where, ErrorCondition.DUPLICATE_KEY_IDENTIFIER)

    def _check_valid(self, prescription: store.Prescription, where: str, now: datetime) -> None:
        if prescription.status == store.CANCELLED:
            raise Refusal(PrescriptionError.PRESCRIPTION_CANCELLED,
                          f"prescription {prescription.id} was cancelled", where)
        if now >= prescription.expires_at:
            day = prescription.expires_at.astimezone(self.zone).date().isoformat()
            raise Refusal(PrescriptionError.PRESCRIPTION_EXPIRED,
                          f"prescription {prescription.id} expired on {day}", where)

    @staticmethod
    def _cnss_code(item: rules.PerformedAct, line: store.Line, hl7: bool) -> tuple[str, str]:
        coding = rules.cnss_coding(item.codings, _line_codings(line))
        if coding is None:
            raise Refusal(PrescriptionError.ACT_NOT_BILLABLE,
                          f"result {item.index}: act {line.medication_code} has no CNSS code (NABM "
                          f"{rules.CNSS_NOMENCLATURES[0]} or NGAP {rules.CNSS_NOMENCLATURES[1]}) on the result "
                          "nor on the prescription: send it as an alternate coding of OBR-4",
                          rules.location(hl7, "OBR", "DiagnosticReport", item.index, 4, "code"),
                          ErrorCondition.REQUIRED_FIELD_MISSING)
        if len(coding[1]) > rules.MAX_CODE or "\x00" in coding[1]:  # the result's own code, kept with the act
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"result {item.index}: the CNSS code of act {line.medication_code} "
                          + (f"is longer than {rules.MAX_CODE} characters" if len(coding[1]) > rules.MAX_CODE
                             else "holds a NUL character (0x00)"),
                          rules.location(hl7, "OBR", "DiagnosticReport", item.index, 4, "code"),
                          ErrorCondition.DATA_TYPE_ERROR)
        return coding

    def _day(self, item: rules.PerformedAct, pending: Pending) -> str:
        """The act's day of care as a FHIR dateTime: as performed, else the day received."""
        if item.day and len(item.day) >= 10:
            try:
                date.fromisoformat(item.day[:10])
                return item.day
            except ValueError:
                pass
        return pending.received_at.astimezone(self.zone).date().isoformat()

    @staticmethod
    def _annotate(record: TranslationRecord, draft: rules.DispensationDraft,
                  recorded: dict[int, tuple[str, int | None]], prescription: store.Prescription | None) -> None:
        issued, prescriber = {}, None
        if prescription is not None:
            by_number = {line.line: line for line in prescription.lines}
            issued = {number: by_number[number].resource for _, number in recorded.values()
                      if number in by_number and by_number[number].resource is not None}
            prescriber = prescription.payload.get("prescriber")
        rules.annotate_dispensation(record.bundle, draft, recorded, issued, prescriber)

    def _check_coverage(self, draft, pending: Pending, prepared: _Prepared) -> None:
        query = self._query(draft, pending)
        hl7 = pending.format in HL7_FORMATS
        if query is None:
            raise Refusal(PrescriptionError.NOT_COVERED,
                          "not covered: the patient has no CNSS immatriculation nor CNIE to check AMO rights",
                          "PID[1]-3" if hl7 else "Patient.identifier", ErrorCondition.REQUIRED_FIELD_MISSING)
        answer = prepared.eligibility.get(query)
        if answer is not None and answer.unaskable:
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"AMO eligibility cannot be asked at CNSS with the patient's {query.kind} as sent "
                          f"({answer.problem}): correct it, asking again will not help",
                          "PID[1]-3" if hl7 else "Patient.identifier", ErrorCondition.DATA_TYPE_ERROR)
        if answer is None or answer.eligibility is None:
            problem = answer.problem if answer is not None else "not asked"
            raise Refusal(PrescriptionError.ELIGIBILITY_UNAVAILABLE,
                          f"AMO eligibility could not be checked at CNSS ({problem}); "
                          "send the message again later with a new control id")
        if not answer.covered:
            raise Refusal(PrescriptionError.NOT_COVERED,
                          f"not covered: AMO rights are not open on {query.on.isoformat()} "
                          f"({answer.eligibility.motive})",
                          "PID[1]-3" if hl7 else "Patient.identifier")

    def _check_prescription(self, prescription: store.Prescription | None, prescription_id: str,
                            draft: rules.DispensationDraft, hl7: bool, now: datetime) -> None:
        where = "ORC[1]-4" if hl7 else "MedicationDispense.authorizingPrescription"
        if prescription is None:
            raise Refusal(PrescriptionError.PRESCRIPTION_UNKNOWN,
                          f"unknown prescription {prescription_id}", where,
                          ErrorCondition.UNKNOWN_KEY_IDENTIFIER)
        if prescription.status == store.CANCELLED:
            raise Refusal(PrescriptionError.PRESCRIPTION_CANCELLED,
                          f"prescription {prescription_id} was cancelled", where)
        if prescription.status == store.COMPLETED:
            raise Refusal(PrescriptionError.PRESCRIPTION_COMPLETED,
                          f"over-dispensing: prescription {prescription_id} was already fully dispensed",
                          where)
        if now >= prescription.expires_at:
            day = prescription.expires_at.astimezone(self.zone).date().isoformat()
            raise Refusal(PrescriptionError.PRESCRIPTION_EXPIRED,
                          f"prescription {prescription_id} expired on {day}", where)
        mismatch = _patient_mismatch(draft.patient_identifiers, prescription.patient_identifiers)
        if mismatch:
            raise Refusal(PrescriptionError.PATIENT_MISMATCH,
                          f"the patient does not match prescription {prescription_id} ({mismatch})",
                          "PID[1]-3" if hl7 else "Patient.identifier")

    def _line_for(self, prescription: store.Prescription, item: rules.DispenseItem, taken: dict,
                  hl7: bool) -> store.Line:
        candidates = [line for line in prescription.lines if line.kind == store.DRUG
                      and rules.Medication(line.medication_system, line.medication_code, None).matches(item.medication)]
        where = rules.location(hl7, "RXD", "MedicationDispense", item.index, 2, "medicationCodeableConcept")
        if not candidates:
            raise Refusal(PrescriptionError.NOT_PRESCRIBED,
                          f"dispensation {item.index}: drug {item.medication.code} is not on prescription "
                          f"{prescription.id}", where)
        quantity_where = rules.location(hl7, "RXD", "MedicationDispense", item.index, 4, "quantity")
        # The drug may be prescribed on several lines in different units (boxes, tablets): the
        # lines in the unit dispensed, not the first line of the drug.
        in_unit = [line for line in candidates
                   if not (item.unit and line.unit and _unit(item.unit) != _unit(line.unit))]
        if not in_unit:
            line = candidates[0]
            raise Refusal(PrescriptionError.UNIT_MISMATCH,
                          f"dispensation {item.index}: line {line.line} of {prescription.id} is "
                          f"prescribed in {line.unit!r}, dispensed in {item.unit!r}",
                          rules.location(hl7, "RXD", "MedicationDispense", item.index, 5, "quantity.unit"))
        for line in in_unit:
            left = line.remaining - taken.get(line.line, 0)
            if item.quantity <= left:
                taken[line.line] = taken.get(line.line, 0) + item.quantity
                return line
        line = in_unit[-1]
        left = max(line.remaining - taken.get(line.line, 0), 0)
        raise Refusal(PrescriptionError.OVER_DISPENSING,
                      f"over-dispensing: line {line.line} of {prescription.id} ({line.medication_code}) "
                      f"has {_text(left)} {line.unit or 'units'} left of {_text(line.quantity)} "
                      f"prescribed; {_text(item.quantity)} dispensed", quantity_where)

    # -- answers -----------------------------------------------------------------------------

    def _refuse(self, pending: Pending, record: TranslationRecord, refusal: Refusal) -> None:
        self.refused += 1
        log.info("message %s refused by the prescription flow: %s", _name(pending), refusal.code.value)
        record.status = MessageStatus.FAILED.value
        record.error_code = int(refusal.condition)
        record.error_location = refusal.location or None
        record.error_reason = refusal.reason
        record.destinations = ()
        from gateway.translation.translator import location_of

        self._answer(pending, record, Outcome.ERROR, error=ErrorDetail(
            refusal.condition, location_of(refusal.location), _ascii(refusal.reason), refusal.code))

    def _answer_failure(self, pending: Pending, record: TranslationRecord) -> None:
        """A prescription message whose translation failed: its answer is the AE saying why
        (stored in place of the provisional one)."""
        from gateway.translation.translator import error_detail

        self._answer(pending, record, Outcome.ERROR, error=error_detail(record))

    def _answer(self, pending: Pending, record: TranslationRecord, outcome: Outcome, *,
                prescription: store.Prescription | None = None, error: ErrorDetail | None = None,
                control: bytes = b"OK") -> None:
        """The HL7 answer to store with the translation (and send, on the live path)."""
        if self.builder is None or pending.format not in HL7_FORMATS:
            return
        header = _header(pending)
        if header is None:
            return
        from gateway.ingest.inspect import Inspector

        if not Inspector._wants_ack(header, outcome is Outcome.ACCEPT):
            return
        if response_type(header.message_code) is not None:
            record.ack = order_response(
                self.builder, header, pending.raw, outcome, header.enhanced_mode,
                filler_number=prescription.id if prescription else None,
                note=prescription.qr_payload if prescription and control == b"OK" else None,
                error=error, control=control)
        else:
            record.ack = self.builder.build(header, outcome, header.enhanced_mode, error)


def _patient_mismatch(sent: tuple[str, ...], prescribed: tuple[str, ...]) -> str | None:
    """Why the patient of a dispensation or a result ('system|value' identifiers) is not the
    prescription's, or None: no identifier in common, or one that contradicts it (a system on
    both sides with no value in common, blanks and case aside). A CNIE in common with another
    CNSS immatriculation was accepted, and AMO rights were checked and billed on the other's."""
    if not set(sent) & set(prescribed):
        return "no identifier in common"
    known: dict[str, set[str]] = {}
    for text in prescribed:
        system, _, value = text.partition("|")
        known.setdefault(system, set()).add(_folded(value))
    given: dict[str, set[str]] = {}
    for text in sent:
        system, _, value = text.partition("|")
        given.setdefault(system, set()).add(_folded(value))
    for system, values in given.items():
        if system in known and not values & known[system]:
            return f"another {system} identifier"
    return None


def _folded(value: str) -> str:
    return "".join(value.split()).casefold()


def _line_codings(line: store.Line) -> tuple:
    """The codes a prescribed act is known by: every coding of its ServiceRequest as issued,
    and the code it is kept by."""
    issued = rules.codings_of(((line.resource or {}).get("resource") or {}).get("code"))
    return ((line.medication_system, line.medication_code),) + issued


def _header(pending: Pending) -> MessageHeader | None:
    header = getattr(pending.context, "header", None)
    if isinstance(header, MessageHeader):
        return header
    try:
        return parse_header(pending.raw)
    except HeaderError:
        return None


def _control_id(connection: Connection, pending: Pending, message_id: int) -> str:
    if pending.key is not None:
        return pending.key[2]
    value = connection.execute(select(messages.c.control_id).where(messages.c.id == message_id)).scalar()
    return value or f"message-{message_id}"


def _ascii(text: str) -> str:
    """ERR-7 text in ASCII (a unit such as 'boîte' read as 'boite'): the ACK builder writes
    reasons as ASCII, and every receiver can read that."""
    folded = unicodedata.normalize("NFKD", text)
    return "".join(c for c in folded if not unicodedata.combining(c)).encode("ascii", "replace").decode()


def _unit(text: str) -> str:
    return " ".join(text.split()).casefold()


def _text(value) -> str:
    return format(value.normalize(), "f") if hasattr(value, "normalize") else str(value)


def _name(pending: Pending) -> str:
    if pending.message_id is not None:
        return f"#{pending.message_id}"
    return f"control id {pending.key[2]!r}" if pending.key else "?"

"""Reading prescriptions and dispensations out of canonical bundles, and writing the
prescription's identifiers back into them. Pure code: plain dicts in, plain data out.

Whatever the input (HL7 RDE^O11, OMP^O09, RDS^O13, a FHIR bundle), the flow looks at the
canonical FHIR resources only:

- a prescription is the message's MedicationRequests (drugs) and ServiceRequests (acts: lab
  tests, imaging examinations), one line each, in bundle order; a drug line needs a medication
  code (EAN-13 `https://www.gs1.org/gtin` preferred, else the first coded one) and a quantity
  to dispense (`dispenseRequest.quantity`, RXE-10 / RXO-11); an act line needs a coded act
  (`code`, OBR-4: a CNSS nomenclature code, NABM or NGAP, preferred, else LOINC, else the
  first coded one) and is performed once;
- a dispensation is a MedicationDispense `completed` (handed over; any other status is
  refused); the prescription it fills is named by
  `authorizingPrescription`: the MedicationRequest it points at (its `groupIdentifier`, RDS^O13
  ORC-4 `RX-...^HIE`) or a logical reference by identifier (FHIR, RXD-7), system
  `urn:ma:hie:prescription`; a paper prescription is marked by the extension
  PAPER_EXTENSION = true (RDS^O13: ORC-4.2 `PAPIER`);
- acts performed are DiagnosticReports whose `basedOn` names the prescription: a logical
  reference by identifier, system `urn:ma:hie:prescription` (ORU^R01 ORC-4 `RX-...^HIE`, a
  SOAP report's prescriptionId, FHIR), or a ServiceRequest of the bundle that carries the id
  (`requisition`, or its line id). Each is matched to a prescribed act by its code (`code`,
  OBR-4: any coding in common). A report that is not a result yet (`registered`) or is
  cancelled performs nothing.

Problems are `Refusal`s with a precise reason (never patient data) and, for HL7 inputs, the
segment they came from.
"""
from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from adapters.hl7v2.codes import ErrorCondition
from adapters.soap.cnss import as_ean13, valid_ean13
from gateway.prescriptions import ids, qr
from gateway.prescriptions.codes import PrescriptionError
from gateway.prescriptions.store import prescription_lines

SYSTEM = ids.SYSTEM
LINE_SYSTEM = "urn:ma:hie:prescription-line"  # one MedicationRequest = one line: RX-.../n
DISPENSATION_SYSTEM = "urn:ma:hie:dispensation"  # MedicationDispense.identifier we give
PAPER_EXTENSION = "urn:ma:hie:StructureDefinition/paper-prescription"
GTIN = "https://www.gs1.org/gtin"
INPE = "urn:ma:inpe"
IMMATRICULATION = "urn:ma:cnss:immatriculation"
CNIE = "urn:ma:cnie"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
ORDER_INTENTS = ("order", "original-order", "instance-order")
MAX_LINES = 100
MAX_QUANTITY = Decimal(100_000)  # prescribed or dispensed on one line
THOUSANDTH = Decimal("0.001")  # the store counts quantities in thousandths (store.to_milli)
# What the store keeps of a drug's or act's code and its system (its columns' lengths).
MAX_CODE = prescription_lines.c.medication_code.type.length
MAX_SYSTEM = prescription_lines.c.medication_system.type.length
ACT_SYSTEM = "urn:ma:hie:act"  # ChargeItem.identifier of a performed act: its care-sheet line key
CNSS_NOMENCLATURES = ("urn:ma:cnss:nabm", "urn:ma:cnss:ngap")  # what a care-sheet act is coded in
LOINC = "http://loinc.org"
NOT_PERFORMED = ("registered", "cancelled", "entered-in-error")  # DiagnosticReport.status
HANDED_OVER = "completed"  # the MedicationDispense.status of a drug the patient received
V2_0443 = "http://terminology.hl7.org/CodeSystem/v2-0443"
ORDER_TYPES = ("MedicationRequest", "ServiceRequest")
INACTIVE_ORDER = {"MedicationRequest": ("cancelled", "revoked", "entered-in-error", "stopped"),
                  "ServiceRequest": ("revoked", "entered-in-error", "completed")}


class Refusal(Exception):
    """Why a prescription or a dispensation is refused; safe to send back and to log."""

    def __init__(self, code: PrescriptionError, reason: str, location: str = "",
                 condition: ErrorCondition = ErrorCondition.APPLICATION_INTERNAL_ERROR):
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.location = location  # 'RXD[2]-4' (HL7) or 'MedicationDispense[2].quantity'
        self.condition = condition


class Resources:
    """The resources of a bundle and their references (fullUrls and Type/id)."""

    def __init__(self, bundle: dict):
        self.bundle = bundle
        self.entries: list[dict] = [e for e in bundle.get("entry") or () if isinstance(e, dict)
                                    and isinstance(e.get("resource"), dict)]
        self._by_reference: dict[str, dict] = {}
        for entry in self.entries:
            resource = entry["resource"]
            if entry.get("fullUrl"):
                self._by_reference[entry["fullUrl"]] = entry
            if resource.get("id"):
                self._by_reference[f"{resource.get('resourceType')}/{resource['id']}"] = entry

    def of_type(self, resource_type: str) -> list[dict]:
        return [e for e in self.entries if e["resource"].get("resourceType") == resource_type]

    def resolve(self, reference) -> dict | None:
        """The entry a reference points at, or None (logical, or outside the bundle)."""
        if not isinstance(reference, dict):
            return None
        return self._by_reference.get(reference.get("reference") or "")


@dataclass(frozen=True)
class Medication:
    system: str | None
    code: str
    display: str | None

    def matches(self, other: "Medication") -> bool:
        if self.system == GTIN or other.system == GTIN:
            return self.system == other.system and self.code == other.code
        return self.code == other.code


@dataclass
class PrescribedLine:
    number: int
    medication: Medication  # the drug, or the act (kind 'act')
    quantity: Decimal
    unit: str | None
    entry: dict  # the MedicationRequest's (ServiceRequest's) bundle entry (annotated in place)
    kind: str = "drug"


@dataclass
class PrescriptionDraft:
    lines: list[PrescribedLine]
    patient_key: str | None
    patient_identifiers: tuple[str, ...]
    prescriber_inpe: str | None
    prescriber_entry: dict | None  # the requester Practitioner's entry, when in the bundle


@dataclass
class DispenseItem:
    index: int  # 1-based, among the MedicationDispenses
    entry: dict
    medication: Medication
    quantity: Decimal
    unit: str | None
    prescription_id: str | None  # parsed: RX-XXXX-XXXX-C
    paper: bool
    dispensation_ref: str | None  # the sender's own id of this dispensation (FILL, identifier)
    handed_over: str | None  # whenHandedOver as sent


@dataclass
class DispensationDraft:
    items: list[DispenseItem]
    patient_identifiers: tuple[str, ...]
    patient_reference: dict | None
    coverage: dict = field(default_factory=dict)  # 'immatriculation'/'cnie' to check AMO rights


@dataclass
class PerformedAct:
    index: int  # 1-based, among the bundle's DiagnosticReports (an HL7 message: its OBR)
    entry: dict  # the DiagnosticReport's entry
    codings: tuple[tuple[str | None, str], ...]  # the act's codes as sent (OBR-4 and alternates)
    display: str | None
    prescription_id: str  # parsed: RX-XXXX-XXXX-C
    report: str  # the report's own identifier ('system|value', FILL first), '' without one
    day: str | None  # when performed (effective, else issued), as sent


@dataclass
class PerformanceDraft:
    items: list[PerformedAct]  # empty: the reports name a prescription but perform nothing yet
    patient_identifiers: tuple[str, ...]
    patient_reference: dict | None
    coverage: dict = field(default_factory=dict)


def location(hl7: bool, segment: str, resource: str, index: int, field_number: int = 0,
             element: str = "") -> str:
    if hl7:
        return f"{segment}[{index}]" + (f"-{field_number}" if field_number else "")
    return f"{resource}[{index}]" + (f".{element}" if element else "")


# -- reading ---------------------------------------------------------------------------------

def medication_of(resource: dict, resources: Resources) -> Medication | None:
    concept = resource.get("medicationCodeableConcept")
    if concept is None:
        target = resources.resolve(resource.get("medicationReference"))
        concept = (target or {}).get("resource", {}).get("code") if target else None
    codings = [c for c in (concept or {}).get("coding") or () if isinstance(c, dict)
               and str(c.get("code") or "").strip()]
    if not codings:
        return None
    coding = next((c for c in codings if c.get("system") == GTIN), codings[0])
    display = coding.get("display") or (concept or {}).get("text")
    code = str(coding["code"]).strip()
    return Medication(coding.get("system"), as_ean13(code) if coding.get("system") == GTIN else code,
                      _label(display, 200) if display else None)


def codings_of(concept) -> tuple[tuple[str | None, str], ...]:
    """(system, code) of every coding of a CodeableConcept that has a code."""
    found = []
    for coding in (concept or {}).get("coding") or () if isinstance(concept, dict) else ():
        if isinstance(coding, dict) and str(coding.get("code") or "").strip():
            found.append((coding.get("system") or None, str(coding["code"]).strip()))
    return tuple(dict.fromkeys(found))


def act_of(concept) -> Medication | None:
    """The code an act is kept and billed by: a CNSS nomenclature's (NABM, NGAP) first, then
    LOINC, then the first coded one."""
    codings = codings_of(concept)
    if not codings:
        return None
    ranked = sorted(codings, key=lambda c: 0 if c[0] in CNSS_NOMENCLATURES else 1 if c[0] == LOINC else 2)
    system, code = ranked[0]
    display = next((c.get("display") for c in concept.get("coding") or ()
                    if isinstance(c, dict) and str(c.get("code") or "").strip() == code and c.get("display")),
                   None) or concept.get("text")
    return Medication(system, code, _label(display, 200) if display else None)


def acts_match(prescribed: tuple, performed: tuple) -> bool:
    """Whether two acts' codings share a code: same system and code, or the same code where
    one side names no system (a local code)."""
    for system, code in performed:
        for other_system, other_code in prescribed:
            if code == other_code and (system == other_system or system is None or other_system is None):
                return True
    return False


def cnss_coding(*codings: tuple) -> tuple[str, str] | None:
    """The first (system, code) in a CNSS nomenclature among `codings` (in order)."""
    for group in codings:
        for system, code in group:
            if system in CNSS_NOMENCLATURES:
                return system, code
    return None


def quantity_of(quantity) -> tuple[Decimal | None, str | None]:
    if not isinstance(quantity, dict) or quantity.get("value") is None:
        return None, None
    try:
        value = Decimal(str(quantity["value"]))
    except InvalidOperation:
        return None, None
    if not value.is_finite():
        return None, None
    unit = quantity.get("unit") or quantity.get("code")
    return value, (_label(unit, 64) if unit else None)


def _label(text, limit: int) -> str:
    """A display or unit as the store keeps it: blanks collapsed, at most `limit` characters, no
    NUL (an HL7 \\X00\\ escape: PostgreSQL refuses it in text, 'send again later' for ever)."""
    return " ".join(str(text).replace("\x00", " ").split())[:limit]


def countable(quantity: Decimal | None) -> bool:
    """Whether the store counts `quantity` exactly: positive, up to MAX_QUANTITY, in whole
    thousandths. A finer one would be rounded: 1.0005 prescribed kept as 1.001 (its QR digest
    no longer matches), 0.0004 dispensed kept as 0 (dispensed again and again)."""
    return quantity is not None and 0 < quantity <= MAX_QUANTITY and quantity % THOUSANDTH == 0


def storable_code(code: Medication) -> bool:
    """Whether the store keeps this drug's or act's code whole (PostgreSQL refuses longer ones,
    and a NUL in text)."""
    return (len(code.code) <= MAX_CODE and len(code.system or "") <= MAX_SYSTEM
            and "\x00" not in code.code + (code.system or ""))


def identifiers_of(resource: dict | None) -> tuple[str, ...]:
    """'system|value' of every identifier with both."""
    found = []
    for identifier in (resource or {}).get("identifier") or ():
        if isinstance(identifier, dict) and identifier.get("system") and str(identifier.get("value") or "").strip():
            found.append(f"{identifier['system']}|{str(identifier['value']).strip()}")
    return tuple(dict.fromkeys(found))


def _too_long(code: Medication) -> str:
    """Why storable_code refused `code`."""
    if "\x00" in code.code + (code.system or ""):
        return "the code or its system holds a NUL character (0x00)"
    return (f"the code is longer than {MAX_CODE} characters" if len(code.code) > MAX_CODE
            else f"the code's system is longer than {MAX_SYSTEM} characters")


def _identifier(resource: dict | None, system: str) -> str | None:
    for identifier in (resource or {}).get("identifier") or ():
        if isinstance(identifier, dict) and identifier.get("system") == system \
                and str(identifier.get("value") or "").strip():
            return str(identifier["value"]).strip()
    return None


def _patient_entry(resources: Resources, resource: dict) -> dict | None:
    entry = resources.resolve(resource.get("subject"))
    if entry is not None and entry["resource"].get("resourceType") == "Patient":
        return entry
    return None


def national_group(resource: dict) -> str | None:
    """The national prescription id a MedicationRequest (groupIdentifier) or a ServiceRequest
    (requisition) already carries, as sent (unparsed)."""
    group = resource.get("requisition" if resource.get("resourceType") == "ServiceRequest"
                         else "groupIdentifier") or {}
    if isinstance(group, dict) and group.get("system") == SYSTEM and str(group.get("value") or "").strip():
        return str(group["value"]).strip()
    return None


def _orders(resources: Resources) -> list[dict]:
    """The MedicationRequest and ServiceRequest entries, in bundle order (the lines' order)."""
    return [e for e in resources.entries if e["resource"].get("resourceType") in ORDER_TYPES]


def is_prescription_bundle(bundle: dict) -> bool:
    """A FHIR input that asks for a prescription: MedicationRequests and/or ServiceRequests to
    order, none of them already carrying a national id, and no MedicationDispense nor
    DiagnosticReport (results that come with their order are not a new prescription)."""
    resources = Resources(bundle)
    if resources.of_type("MedicationDispense") or resources.of_type("DiagnosticReport"):
        return False
    requests = [e["resource"] for e in _orders(resources)]
    return bool(requests) and all(r.get("intent") in ORDER_INTENTS and national_group(r) is None
                                  for r in requests)


def only_acts(bundle: dict) -> bool:
    """Whether the orders of a bundle are all ServiceRequests (acts)."""
    return not Resources(bundle).of_type("MedicationRequest")


def cancelled_group(bundle: dict) -> str | None:
    """A FHIR input that cancels a prescription: every MedicationRequest cancelled (or revoked)
    and every ServiceRequest revoked, all carrying the same national id; that id, as sent."""
    resources = Resources(bundle)
    requests = [e["resource"] for e in _orders(resources)]
    if not requests or resources.of_type("MedicationDispense") or resources.of_type("DiagnosticReport"):
        return None
    groups = {national_group(r) for r in requests}
    if len(groups) != 1 or None in groups:
        return None
    if all(r.get("status") in ("cancelled", "revoked") for r in requests):
        return groups.pop()
    return None


def mark_cancelled(bundle: dict, prescription_id: str) -> None:
    """Every order of a cancelling message: MedicationRequests cancelled, ServiceRequests
    revoked, with the ids of the prescription's lines (in order), so that the shared record
    updates the ones it holds."""
    for number, entry in enumerate(_orders(Resources(bundle)), start=1):
        request = entry["resource"]
        act = request["resourceType"] == "ServiceRequest"
        identifiers = [i for i in request.get("identifier") or ()
                       if not (isinstance(i, dict) and i.get("system") in (SYSTEM, LINE_SYSTEM))]
        request["identifier"] = [{"system": LINE_SYSTEM, "value": f"{prescription_id}/{number}"}] + identifiers
        request["requisition" if act else "groupIdentifier"] = {"system": SYSTEM, "value": prescription_id}
        request["status"] = "revoked" if act else "cancelled"


def is_dispensation_bundle(bundle: dict) -> bool:
    return bool(Resources(bundle).of_type("MedicationDispense"))


def read_prescription(bundle: dict, segment: str | None) -> PrescriptionDraft:
    """The lines, patient and prescriber of a prescription message, or a Refusal. `segment`:
    the HL7 segment of the drug lines (RXE for RDE^O11, RXO for OMP^O09 and ORM^O01), None
    for FHIR input; act lines come from OBR."""
    hl7 = segment is not None
    resources = Resources(bundle)
    orders = _orders(resources)
    if not orders:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      "the prescription has no line (no RXE/RXO, no MedicationRequest)"
                      if segment in ("RXE", None) else
                      "the prescription has no line (no OBR/RXO, no ServiceRequest or MedicationRequest)",
                      f"{segment or 'RXE'}[1]" if hl7 else "MedicationRequest",
                      ErrorCondition.SEGMENT_SEQUENCE_ERROR)
    if len(orders) > MAX_LINES:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      f"the prescription has {len(orders)} lines; at most {MAX_LINES}")
    lines: list[PrescribedLine] = []
    patients: dict[str, dict] = {}
    prescribers: set[str] = set()
    prescriber_entry = None
    counts = {"MedicationRequest": 0, "ServiceRequest": 0}
    for number, entry in enumerate(orders, start=1):
        request = entry["resource"]
        kind = request["resourceType"]
        counts[kind] += 1
        if kind == "ServiceRequest":
            lines.append(_act_line(number, counts[kind], entry, hl7))
        else:
            lines.append(_drug_line(number, counts[kind], entry, resources, segment))
        if request.get("status") in INACTIVE_ORDER[kind]:
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"line {number} is not an active order (status {request.get('status')})",
                          location(hl7, "ORC", kind, number, 1, "status"),
                          ErrorCondition.TABLE_VALUE_NOT_FOUND)
        patient = _patient_entry(resources, request)
        if patient is not None:
            patients[patient.get("fullUrl") or patient["resource"].get("id")] = patient
        requester = resources.resolve(request.get("requester"))
        if requester is not None and requester["resource"].get("resourceType") == "Practitioner":
            inpe = _identifier(requester["resource"], INPE)
            if inpe:
                prescribers.add(inpe)
                prescriber_entry = prescriber_entry or requester
        else:
            logical = ((request.get("requester") or {}).get("identifier") or {})
            if logical.get("system") == INPE and logical.get("value"):
                prescribers.add(str(logical["value"]).strip())
    if len(patients) != 1:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      "a prescription is for one patient" if patients else
                      "the prescription names no patient (PID, MedicationRequest.subject)",
                      "PID[1]" if hl7 else "MedicationRequest.subject",
                      ErrorCondition.REQUIRED_FIELD_MISSING)
    patient = next(iter(patients.values()))
    identifiers = identifiers_of(patient["resource"])
    if not identifiers:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      "the patient has no identifier with a system (PID-3 with an assigning "
                      "authority): a pharmacy could not match the prescription",
                      "PID[1]-3" if hl7 else "Patient.identifier",
                      ErrorCondition.REQUIRED_FIELD_MISSING)
    if len(prescribers) > 1:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      f"{len(prescribers)} different prescribers in one prescription",
                      "ORC[1]-12" if hl7 else "MedicationRequest.requester")
    if prescribers and not qr.signable(next(iter(prescribers))):
        # It goes into the signed QR payload, which could not carry it.
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      "the prescriber's INPE is longer than 64 characters or holds '|' or a control character",
                      "ORC[1]-12" if hl7 else "MedicationRequest.requester", ErrorCondition.DATA_TYPE_ERROR)
    patient_id = patient["resource"].get("id")
    return PrescriptionDraft(lines, f"Patient/{patient_id}" if patient_id else None, identifiers,
                             next(iter(prescribers), None), prescriber_entry)


def _drug_line(number: int, position: int, entry: dict, resources: Resources,
               segment: str | None) -> PrescribedLine:
    hl7 = segment is not None
    request = entry["resource"]
    medication = medication_of(request, resources)
    where = location(hl7, segment, "MedicationRequest", position, 2, "medicationCodeableConcept")
    if medication is None:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, f"line {number} has no coded medication",
                      where, ErrorCondition.REQUIRED_FIELD_MISSING)
    if medication.system == GTIN and not valid_ean13(medication.code):
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      f"line {number}: the drug code is not a valid EAN-13 (GS1 check digit)",
                      where, ErrorCondition.DATA_TYPE_ERROR)
    if not storable_code(medication):
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, f"line {number}: {_too_long(medication)}",
                      where, ErrorCondition.DATA_TYPE_ERROR)
    quantity, unit = quantity_of((request.get("dispenseRequest") or {}).get("quantity"))
    if not countable(quantity):
        field_number = 10 if segment == "RXE" else 11
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      f"line {number} has no quantity to dispense (a positive number up to 100000, "
                      "at most 3 decimals)",
                      location(hl7, segment, "MedicationRequest", position, field_number,
                               "dispenseRequest.quantity"),
                      ErrorCondition.REQUIRED_FIELD_MISSING)
    return PrescribedLine(number, medication, quantity, unit, entry)


def _act_line(number: int, position: int, entry: dict, hl7: bool) -> PrescribedLine:
    """An act: its code (act_of), quantity 1 (an act is performed once)."""
    act = act_of(entry["resource"].get("code"))
    where = location(hl7, "OBR", "ServiceRequest", position, 4, "code")
    if act is None:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, f"line {number} has no coded act",
                      where, ErrorCondition.REQUIRED_FIELD_MISSING)
    if not storable_code(act):
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, f"line {number}: {_too_long(act)}",
                      where, ErrorCondition.DATA_TYPE_ERROR)
    return PrescribedLine(number, act, Decimal(1), None, entry, "act")


def read_dispensation(bundle: dict, hl7: bool) -> DispensationDraft:
    """The dispensed items of a dispensation message, or a Refusal."""
    resources = Resources(bundle)
    dispenses = resources.of_type("MedicationDispense")
    if not dispenses:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, "the message dispenses nothing",
                      "RXD[1]" if hl7 else "MedicationDispense", ErrorCondition.SEGMENT_SEQUENCE_ERROR)
    items: list[DispenseItem] = []
    patients: dict[str, dict] = {}
    for index, entry in enumerate(dispenses, start=1):
        dispense = entry["resource"]
        if dispense.get("status") != HANDED_OVER:
            # Declined, cancelled, in error, not yet handed over: nothing the patient received
            # (and the care sheet bills completed dispenses only).
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"dispensation {index} is {str(dispense.get('status'))[:32]}, not completed: only a "
                          "dispensation handed over is recorded against a prescription",
                          location(hl7, "RXD", "MedicationDispense", index, 0, "status"),
                          ErrorCondition.TABLE_VALUE_NOT_FOUND)
        medication = medication_of(dispense, resources)
        if medication is None:
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"dispensation {index} has no coded medication",
                          location(hl7, "RXD", "MedicationDispense", index, 2, "medicationCodeableConcept"),
                          ErrorCondition.REQUIRED_FIELD_MISSING)
        if not storable_code(medication):
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, f"dispensation {index}: {_too_long(medication)}",
                          location(hl7, "RXD", "MedicationDispense", index, 2, "medicationCodeableConcept"),
                          ErrorCondition.DATA_TYPE_ERROR)
        quantity, unit = quantity_of(dispense.get("quantity"))
        if quantity is None or quantity <= 0:
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"dispensation {index} has no positive quantity dispensed",
                          location(hl7, "RXD", "MedicationDispense", index, 4, "quantity"),
                          ErrorCondition.REQUIRED_FIELD_MISSING)
        if not countable(quantity):
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"dispensation {index}: the quantity dispensed must be at most 100000, "
                          "with at most 3 decimals",
                          location(hl7, "RXD", "MedicationDispense", index, 4, "quantity"),
                          ErrorCondition.DATA_TYPE_ERROR)
        paper = any(isinstance(e, dict) and e.get("url") == PAPER_EXTENSION and e.get("valueBoolean") is True
                    for e in dispense.get("extension") or ())
        reference, dispensation_ref = _prescription_reference(resources, dispense)
        prescription_id = None
        if reference is not None:
            try:
                prescription_id = ids.parse(reference)
            except ids.PrescriptionIdError as error:
                raise Refusal(PrescriptionError.PRESCRIPTION_UNKNOWN,
                              f"dispensation {index}: {error.reason}",
                              location(hl7, "ORC", "MedicationDispense", index, 4, "authorizingPrescription"),
                              ErrorCondition.UNKNOWN_KEY_IDENTIFIER) from None
        if prescription_id is not None and paper:
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                          f"dispensation {index} names an e-prescription and is marked paper-based: one or the other",
                          location(hl7, "ORC", "MedicationDispense", index, 4, "extension"))
        if prescription_id is None and not paper:
            raise Refusal(PrescriptionError.PRESCRIPTION_MISSING,
                          f"dispensation {index} names no prescription id (ORC-4 RX-...^HIE, "
                          f"authorizingPrescription {SYSTEM}) and is not marked paper-based "
                          "(ORC-4.2 PAPIER, extension " + PAPER_EXTENSION + ")",
                          location(hl7, "ORC", "MedicationDispense", index, 4, "authorizingPrescription"),
                          ErrorCondition.REQUIRED_FIELD_MISSING)
        explicit = _identifier_value(dispense) or dispensation_ref
        patient = _patient_entry(resources, dispense)
        if patient is not None:
            patients[patient.get("fullUrl") or patient["resource"].get("id")] = patient
        items.append(DispenseItem(index, entry, medication, quantity, unit, prescription_id, paper,
                                  explicit, dispense.get("whenHandedOver")))
    kinds = {item.prescription_id or "paper" for item in items}
    if len(kinds) > 1:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      "one message dispenses against one prescription (or one paper prescription): "
                      "send the others separately", "ORC[2]-4" if hl7 else "MedicationDispense")
    if len(patients) != 1:
        raise Refusal(PrescriptionError.PATIENT_MISMATCH,
                      "a dispensation is for one patient" if patients else
                      "the dispensation names no patient (PID, MedicationDispense.subject)",
                      "PID[1]" if hl7 else "MedicationDispense.subject",
                      ErrorCondition.REQUIRED_FIELD_MISSING)
    patient_entry = next(iter(patients.values()))
    patient = patient_entry["resource"]
    reference = {"reference": patient_entry["fullUrl"]} if patient_entry.get("fullUrl") else None
    return DispensationDraft(items, identifiers_of(patient), reference, _coverage(resources, patient_entry))


def _coverage(resources: Resources, patient_entry: dict) -> dict:
    """How to ask CNSS about the patient's AMO rights: {'immatriculation': ...} or {'cnie': ...}
    (the patient's own, else a Coverage's subscriber), {} when nothing says."""
    patient = patient_entry["resource"]
    number = _identifier(patient, IMMATRICULATION)
    cnie = _identifier(patient, CNIE)
    if number:
        return {"immatriculation": number}
    if cnie:
        return {"cnie": cnie.upper()}
    for entry in resources.of_type("Coverage"):
        beneficiary = resources.resolve(entry["resource"].get("beneficiary"))
        subscriber = str(entry["resource"].get("subscriberId") or "").strip()
        if beneficiary is patient_entry and subscriber:
            return {"immatriculation": subscriber}
    return {}


def named_prescription(resources: Resources, report: dict) -> str | None:
    """The national prescription id a DiagnosticReport's basedOn names, as sent (unparsed)."""
    for reference in report.get("basedOn") or ():
        if not isinstance(reference, dict):
            continue
        target = resources.resolve(reference)
        if target is not None:
            request = target["resource"]
            found = national_group(request) or _identifier(request, SYSTEM)
            line = _identifier(request, LINE_SYSTEM)
            if found or line:
                return found or line.split("/", 1)[0]
            continue
        logical = reference.get("identifier") or {}
        value = str(logical.get("value") or "").strip() if isinstance(logical, dict) else ""
        if value and logical.get("system") == SYSTEM:
            return value
        if value and logical.get("system") == LINE_SYSTEM:
            return value.split("/", 1)[0]
    return None


def is_performance_bundle(bundle: dict) -> bool:
    """Results (DiagnosticReports) of which one names a prescription: acts performed."""
    resources = Resources(bundle)
    return any(named_prescription(resources, e["resource"]) is not None
               for e in resources.of_type("DiagnosticReport"))


def read_performance(bundle: dict, hl7: bool) -> PerformanceDraft:
    """The acts a results message performs against a prescription, or a Refusal. Reports that
    name no prescription are not acts of it (routed as any result); reports that name one but
    are not a result yet (NOT_PERFORMED) are left out of the items."""
    resources = Resources(bundle)
    items: list[PerformedAct] = []
    named: set[str] = set()
    patients: dict[str, dict] = {}
    for index, entry in enumerate(resources.of_type("DiagnosticReport"), start=1):
        report = entry["resource"]
        reference = named_prescription(resources, report)
        if reference is None:
            continue
        where = location(hl7, "ORC", "DiagnosticReport", index, 4, "basedOn")
        try:
            prescription_id = ids.parse(reference)
        except ids.PrescriptionIdError as error:
            raise Refusal(PrescriptionError.PRESCRIPTION_UNKNOWN, f"result {index}: {error.reason}", where,
                          ErrorCondition.UNKNOWN_KEY_IDENTIFIER) from None
        named.add(prescription_id)
        patient = _patient_entry(resources, report)
        if patient is not None:
            patients[patient.get("fullUrl") or patient["resource"].get("id")] = patient
        if report.get("status") in NOT_PERFORMED:
            continue
        codings = codings_of(report.get("code"))
        act = act_of(report.get("code"))
        if act is None:
            raise Refusal(PrescriptionError.PRESCRIPTION_INVALID, f"result {index} has no coded act",
                          location(hl7, "OBR", "DiagnosticReport", index, 4, "code"),
                          ErrorCondition.REQUIRED_FIELD_MISSING)
        own = identifiers_of(report)
        plain = [str(i.get("value")).strip() for i in report.get("identifier") or ()
                 if isinstance(i, dict) and str(i.get("value") or "").strip()]
        period = report.get("effectivePeriod") or {}
        day = report.get("effectiveDateTime") or period.get("start") or report.get("issued")
        items.append(PerformedAct(index, entry, codings, act.display, prescription_id,
                                  (own[0] if own else f"|{plain[0]}" if plain else "")[:200],
                                  day if isinstance(day, str) else None))
    if len(named) > 1:
        raise Refusal(PrescriptionError.PRESCRIPTION_INVALID,
                      "one message performs acts of one prescription: send the others separately",
                      "ORC[2]-4" if hl7 else "DiagnosticReport.basedOn")
    if len(patients) != 1:
        raise Refusal(PrescriptionError.PATIENT_MISMATCH,
                      "the results are for one patient" if patients else
                      "the results name no patient (PID, DiagnosticReport.subject)",
                      "PID[1]" if hl7 else "DiagnosticReport.subject", ErrorCondition.REQUIRED_FIELD_MISSING)
    patient_entry = next(iter(patients.values()))
    reference = {"reference": patient_entry["fullUrl"]} if patient_entry.get("fullUrl") else None
    return PerformanceDraft(items, identifiers_of(patient_entry["resource"]), reference,
                            _coverage(resources, patient_entry))


def _identifier_value(resource: dict) -> str | None:
    for identifier in resource.get("identifier") or ():
        if isinstance(identifier, dict) and identifier.get("system") != DISPENSATION_SYSTEM \
                and str(identifier.get("value") or "").strip():
            return _reference(identifier["value"])
    return None


def _reference(value) -> str:
    """The sender's own id of a dispensation, as its dedup key keeps it (64 characters, no NUL)."""
    return str(value).strip().replace("\x00", "?")[:64]


def _prescription_reference(resources: Resources, dispense: dict) -> tuple[str | None, str | None]:
    """(the national prescription id named, as sent; the sender's dispensation id: the filler
    order number of the order it fills, ORC-3)."""
    found, filler = None, None
    for reference in dispense.get("authorizingPrescription") or ():
        target = resources.resolve(reference)
        if target is not None:
            request = target["resource"]
            found = found or national_group(request) or _identifier(request, SYSTEM)
            for identifier in request.get("identifier") or ():
                codes = {c.get("code") for c in ((identifier.get("type") or {}).get("coding") or ())}
                if "FILL" in codes and str(identifier.get("value") or "").strip():
                    filler = filler or _reference(identifier["value"])
        else:
            logical = (reference or {}).get("identifier") or {} if isinstance(reference, dict) else {}
            if logical.get("system") == SYSTEM and str(logical.get("value") or "").strip():
                found = found or str(logical["value"]).strip()
            elif logical.get("system") == LINE_SYSTEM and str(logical.get("value") or "").strip():
                found = found or str(logical["value"]).strip().split("/", 1)[0]
    return found, filler


# -- writing ---------------------------------------------------------------------------------

def annotate_prescription(draft: PrescriptionDraft, prescription_id: str) -> None:
    """Put the national id on every line: `groupIdentifier` (a MedicationRequest) or
    `requisition` (a ServiceRequest) for the prescription, and a first `identifier` RX-.../n
    (the line, the shared record's business key for it). The sender's own placer group number
    is kept as an identifier of type PGN, without our system."""
    for line in draft.lines:
        request = line.entry["resource"]
        element = "requisition" if request.get("resourceType") == "ServiceRequest" else "groupIdentifier"
        identifiers = [i for i in request.get("identifier") or ()
                       if not (isinstance(i, dict) and i.get("system") in (SYSTEM, LINE_SYSTEM))]
        group = request.get(element)
        if isinstance(group, dict) and group.get("value") and group.get("value") != prescription_id:
            kept = {k: v for k, v in group.items() if k != "system"}
            kept["type"] = {"coding": [{"system": V2_0203, "code": "PGN"}]}
            identifiers.append(kept)
        request["identifier"] = [{"system": LINE_SYSTEM, "value": f"{prescription_id}/{line.number}"}] + identifiers
        request[element] = {"system": SYSTEM, "value": prescription_id}


def annotate_dispensation(bundle: dict, draft: DispensationDraft, recorded: dict[int, tuple[str, int | None]],
                          issued: dict[int, dict], prescriber: dict | None) -> None:
    """Rewrite an accepted dispensation's bundle for the shared record and CNSS.

    `recorded`: item index -> (dispensation id, prescription line or None for paper);
    `issued`: prescription line -> the MedicationRequest entry as issued. The message's own
    copies of the order (MedicationRequests) are replaced by the issued ones, so that the
    shared record keeps one MedicationRequest per prescription line; each MedicationDispense
    gets its dispensation id and points at its line.
    """
    _add_issued(bundle, "MedicationRequest", issued, prescriber, draft.patient_reference)
    for item in draft.items:
        dispensation_id, line = recorded[item.index]
        dispense = item.entry["resource"]
        identifiers = [i for i in dispense.get("identifier") or ()
                       if not (isinstance(i, dict) and i.get("system") == DISPENSATION_SYSTEM)]
        dispense["identifier"] = [{"system": DISPENSATION_SYSTEM, "value": dispensation_id}] + identifiers
        if line is not None and line in issued:
            dispense["authorizingPrescription"] = [{"reference": issued[line]["fullUrl"]}]
        elif not dispense.get("authorizingPrescription"):
            dispense.pop("authorizingPrescription", None)  # FHIR arrays are never empty


def _add_issued(bundle: dict, resource_type: str, issued: dict[int, dict], prescriber: dict | None,
                patient_reference: dict | None, status: str | None = None) -> None:
    """Replace the message's own copies of the order (`resource_type`) by the prescription's
    lines as issued (`issued`: line -> entry), pointing at the message's patient and at the
    prescriber (added when missing), so that the shared record keeps one resource per line."""
    if not issued:
        return
    bundle["entry"] = [e for e in bundle.get("entry") or ()
                       if ((e or {}).get("resource") or {}).get("resourceType") != resource_type]
    present = {e.get("fullUrl") for e in bundle["entry"]}
    prescriber_url = None
    if prescriber is not None:
        prescriber_url = prescriber.get("fullUrl")
        if prescriber_url not in present:
            bundle["entry"].insert(_after_patient(bundle), copy.deepcopy(prescriber))
            present.add(prescriber_url)
    for line in sorted(issued):
        entry = copy.deepcopy(issued[line])
        request = entry["resource"]
        if patient_reference is not None:
            request["subject"] = dict(patient_reference)
        if prescriber_url:
            request["requester"] = {"reference": prescriber_url}
        if status is not None:
            request["status"] = status
        _drop_dangling(request, present)
        bundle["entry"].append(entry)
        present.add(entry.get("fullUrl"))


def drop_charge_items(bundle: dict) -> None:
    """Remove the sender's own ChargeItems from a dispensation or a result against a
    prescription: what it bills at CNSS is the flow's to say (annotate_performance adds one per
    act it bills). A sender's ChargeItem went to CNSS as it was: a correction re-sent with one
    billed the act line again under a key of the sender's choosing."""
    bundle["entry"] = [e for e in bundle.get("entry") or ()
                       if ((e or {}).get("resource") or {}).get("resourceType") != "ChargeItem"]


def act_charge_id(act_id: str) -> str:
    """The ChargeItem id of a performed act: deterministic, like every canonical id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ACT_SYSTEM}|{act_id}"))


def annotate_performance(bundle: dict, draft: PerformanceDraft, recorded: dict[int, tuple[str, int, bool]],
                         issued: dict[int, dict], prescriber: dict | None,
                         billing: dict[int, tuple[tuple[str, str], str]]) -> None:
    """Rewrite an accepted results message for the shared record and CNSS.

    `recorded`: item index -> (act id, prescription line, billed by this message);
    `issued`: line -> the ServiceRequest entry as issued; `billing`: item index -> (the CNSS
    coding (system, code), the day of care). The prescription's lines performed go in as
    issued, `completed`; each report points at its line (basedOn); each act this message
    bills gets a ChargeItem (status billable, quantity 1, its act id as identifier, the
    report as its service, the prescriber as ordering performer), which the care sheet
    builder turns into a line with the prescription reference. A correction or a re-sent
    result of an act billed before bills nothing.
    """
    _add_issued(bundle, "ServiceRequest", issued, prescriber, draft.patient_reference, "completed")
    prescriber_url = prescriber.get("fullUrl") if prescriber is not None else None
    present = {e.get("fullUrl") for e in bundle.get("entry") or ()}
    for item in draft.items:
        act_id, line, billed = recorded[item.index]
        report = item.entry["resource"]
        kept = [r for r in report.get("basedOn") or ()
                if isinstance(r, dict) and not _names_prescription(r)
                and (not r.get("reference") or r["reference"] in present)]
        if line in issued:
            report["basedOn"] = [{"reference": issued[line]["fullUrl"]}] + kept
        if not billed:
            continue
        (system, code), day = billing[item.index]
        charge: dict = {
            "resourceType": "ChargeItem", "id": act_charge_id(act_id),
            "identifier": [{"system": ACT_SYSTEM, "value": act_id}],
            "status": "billable",
            "code": {"coding": [{"system": system, "code": code}]},
            "subject": dict(draft.patient_reference or report.get("subject") or {}),
            "occurrenceDateTime": day,
            "quantity": {"value": 1},
        }
        if item.display:
            charge["code"]["text"] = item.display
        if prescriber_url:
            charge["performer"] = [{"function": {"coding": [{"system": V2_0443, "code": "OP"}]},
                                    "actor": {"reference": prescriber_url}}]
        if item.entry.get("fullUrl"):
            charge["service"] = [{"reference": item.entry["fullUrl"]}]
        bundle["entry"].append({"fullUrl": f"urn:uuid:{charge['id']}", "resource": charge})


def _names_prescription(reference: dict) -> bool:
    logical = reference.get("identifier") or {}
    return isinstance(logical, dict) and logical.get("system") in (SYSTEM, LINE_SYSTEM)


def _after_patient(bundle: dict) -> int:
    for position, entry in enumerate(bundle["entry"]):
        if ((entry or {}).get("resource") or {}).get("resourceType") == "Patient":
            return position + 1
    return 0


_REFERENCE_ELEMENTS = ("encounter", "reasonReference", "supportingInformation", "basedOn",
                       "insurance", "performer", "recorder", "priorPrescription", "detectedIssue",
                       "eventHistory", "informationSource")


def _drop_dangling(resource: dict, present: set) -> None:
    """Drop references to urn:uuid entries of the prescription's own message: the shared
    record refuses unresolved ones, and it already holds what they named."""
    for name in _REFERENCE_ELEMENTS:
        value = resource.get(name)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, dict) and str(v.get("reference") or "").startswith("urn:uuid:")
               and v.get("reference") not in present for v in values):
            resource.pop(name, None)

"""ERR-5 application error codes of the e-prescription flow, in the gateway's own table
"MA-HIE-ERR" (adapters.hl7v2.codes.APP_ERROR_TABLE). Same shape as AppErrorCode (a value and
a text), so the ACK builder writes them the same way."""
from __future__ import annotations

from enum import Enum


class PrescriptionError(str, Enum):
    PRESCRIPTION_INVALID = "PRESCRIPTION_INVALID"
    PRESCRIPTION_UNKNOWN = "PRESCRIPTION_UNKNOWN"
    PRESCRIPTION_MISSING = "PRESCRIPTION_MISSING"
    PRESCRIPTION_EXPIRED = "PRESCRIPTION_EXPIRED"
    PRESCRIPTION_CANCELLED = "PRESCRIPTION_CANCELLED"
    PRESCRIPTION_COMPLETED = "PRESCRIPTION_COMPLETED"
    NOT_PRESCRIBED = "NOT_PRESCRIBED"
    ACT_ALREADY_PERFORMED = "ACT_ALREADY_PERFORMED"
    ACT_NOT_BILLABLE = "ACT_NOT_BILLABLE"
    OVER_DISPENSING = "OVER_DISPENSING"
    UNIT_MISMATCH = "UNIT_MISMATCH"
    PATIENT_MISMATCH = "PATIENT_MISMATCH"
    DISPENSATION_DUPLICATE = "DISPENSATION_DUPLICATE"
    OPERATION_NOT_ALLOWED = "OPERATION_NOT_ALLOWED"
    NOT_COVERED = "NOT_COVERED"
    ELIGIBILITY_UNAVAILABLE = "ELIGIBILITY_UNAVAILABLE"
    PRESCRIPTION_NOT_PROCESSED = "PRESCRIPTION_NOT_PROCESSED"
    PRESCRIPTION_INTERNAL = "PRESCRIPTION_INTERNAL"

    @property
    def text(self) -> str:
        return _TEXT[self]


_TEXT = {
    PrescriptionError.PRESCRIPTION_INVALID: "Prescription or dispensation not usable as sent",
    PrescriptionError.PRESCRIPTION_UNKNOWN: "Unknown prescription id",
    PrescriptionError.PRESCRIPTION_MISSING: "No prescription id and not marked paper-based",
    PrescriptionError.PRESCRIPTION_EXPIRED: "Prescription expired",
    PrescriptionError.PRESCRIPTION_CANCELLED: "Prescription cancelled",
    PrescriptionError.PRESCRIPTION_COMPLETED: "Prescription already fully dispensed",
    PrescriptionError.NOT_PRESCRIBED: "Drug or act not on the prescription",
    PrescriptionError.ACT_ALREADY_PERFORMED: "Act already performed",
    PrescriptionError.ACT_NOT_BILLABLE: "Act has no CNSS code (NABM, NGAP)",
    PrescriptionError.OVER_DISPENSING: "More than what remains to dispense",
    PrescriptionError.UNIT_MISMATCH: "Dispensed unit differs from the prescribed unit",
    PrescriptionError.PATIENT_MISMATCH: "Patient does not match the prescription",
    PrescriptionError.DISPENSATION_DUPLICATE: "Dispensation already recorded",
    PrescriptionError.OPERATION_NOT_ALLOWED: "Facility type may not do this",
    PrescriptionError.NOT_COVERED: "No open AMO rights",
    PrescriptionError.ELIGIBILITY_UNAVAILABLE: "AMO eligibility could not be checked; send again later",
    PrescriptionError.PRESCRIPTION_NOT_PROCESSED: "Not processed yet; send the message again later",
    PrescriptionError.PRESCRIPTION_INTERNAL: "Internal error in the prescription flow",
}

"""One stored message in, one translation record out: reading the input, optional conformance
validation, and the mapping set. Pure code: no reactor, no database, no logging of content.

The mapping set is held in one attribute, replaced whole on reload, and read once per
message, so a reload never mixes two sets inside one translation.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable
from zoneinfo import ZoneInfo

from adapters.hl7v2.ack import ErrorDetail
from adapters.hl7v2.codes import ErrorCondition
from adapters.hl7v2.header import Location
from adapters.legacy import csv_export
from gateway.config import SenderConfig
from gateway.delivery.routes import Router, patient_key, retired_keys
from gateway.ingest.model import MessageStatus
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import MissingResource, NotTranslated, TranslationContext, TranslationError
from gateway.store.translations import Pending, TranslationRecord
from gateway.translation import conformance
from gateway.translation.inputs import (DOCUMENT_FORMATS, InputError, detect_format,
                                        read_document, read_input, stand_in_control_id)

log = logging.getLogger(__name__)

DEFAULT_TIMEZONE = "Africa/Casablanca"

PAYLOAD_EXPIRED = ("the message's payload expired (retention) before it was translated: "
                   "nothing left to translate")
_HL7_FORMATS = ("hl7v2", "hl7v2-xml")  # what conformance validation reads

# 'PID[1]-7', 'OBX[2]-5.1', 'MSH[1]-9': the segment locations a TranslationError names.
_SEGMENT_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})\[(\d+)\](?:-(\d+)(?:\.(\d+))?)?$")
# 'MSH^1^18', 'PID^1^3^1^4': ERL components, as inputs.InputError gives them.
_ERL_LOCATION = re.compile(r"^([A-Z][A-Z0-9]{2})\^(\d+)(?:\^(\d+)(?:\^\d+\^(\d+))?)?$")


class Translator:
    def __init__(self, mappings: MappingSet, senders: Iterable[SenderConfig] = (),
                 router: Router | None = None):
        self.mappings = mappings
        self.senders = {sender.id: sender for sender in senders}
        self.router = router
        self._zones: dict[str, ZoneInfo] = {}
        self._profiles: tuple[MappingSet, dict[str, tuple[str, ...]]] | None = None

    def translate(self, pending: Pending) -> TranslationRecord:
        """The translation of one message; never raises (a failure is a record)."""
        mappings = self.mappings  # once: a reload may replace it meanwhile
        if pending.raw is None:  # swept after retention removed its payload: nothing to read
            return _failed(mappings, ErrorCondition.APPLICATION_INTERNAL_ERROR, "", PAYLOAD_EXPIRED)
        try:
            return self._translate(pending, mappings)
        except Exception as error:  # a reader's or a check's bug must not stop the worker
            log.error("translation of message %s failed outside the mapping engine: %s",
                      pending.message_id or pending.key and pending.key[2], type(error).__name__)
            log.debug("translation failure", exc_info=True)
            return _failed(mappings, ErrorCondition.APPLICATION_INTERNAL_ERROR, "",
                           f"internal error in the gateway ({type(error).__name__})")

    def _translate(self, pending: Pending, mappings: MappingSet) -> TranslationRecord:
        sender = self.senders.get(pending.sender_id or "")
        format = pending.format or detect_format(pending.raw)
        if format in DOCUMENT_FORMATS:
            return self._translate_document(pending, sender, mappings)
        try:
            profiles = self._csv_profiles(mappings) if format == "csv" else None
            parsed = read_input(pending.raw, (sender.charset_fallback if sender else None) or pending.codec,
                                pending.format, csv_profiles=profiles)
        except InputError as error:
            return _failed(mappings, ErrorCondition.DATA_TYPE_ERROR, error.location, error.reason)
        warnings: list[str] = []
        # HL7 v2 conformance: ASTM records and CSV rows are no HL7 message for hl7apy to read.
        if sender is not None and sender.validation != "off" and parsed.format in _HL7_FORMATS:
            problem = conformance.check(parsed.message)
            if problem is not None:
                if sender.validation == "reject":
                    return _failed(mappings, problem.condition, problem.location, problem.reason)
                warnings.append(problem.reason)
        sender_id = sender.id if sender else ""
        context = TranslationContext(
            sender_id=sender_id, timezone=self._zone(sender.timezone if sender else DEFAULT_TIMEZONE),
            received_at=pending.received_at,
            message_key=f"{sender_id or parsed.sending_facility}|{parsed.control_id}",
            control_id=parsed.control_id, mapping_layer=(sender.mappings or sender.id) if sender else "")
        try:
            translation = mappings.translate(parsed.message, context, parsed.message_type)
        except NotTranslated as error:  # by design (a query): kept, acknowledged, not routed
            return TranslationRecord(MessageStatus.IGNORED.value, mappings.version,
                                     error_location=error.location, error_reason=error.reason,
                                     warnings=warnings)
        except TranslationError as error:
            reason = error.reason + (f" (rule at {error.mapping})" if error.mapping else "")
            return _failed(mappings, _condition_of(error), error.location, reason, warnings)
        except Exception as error:  # a transform's bug must not stop the worker
            log.error("translation of message %s failed inside the mapping engine: %s",
                      pending.message_id or pending.key and pending.key[2], type(error).__name__)
            log.debug("engine failure", exc_info=True)
            return _failed(mappings, ErrorCondition.APPLICATION_INTERNAL_ERROR, "",
                           f"internal error in the mapping engine ({type(error).__name__})", warnings)
        record = TranslationRecord(MessageStatus.TRANSLATED.value, translation.mapping_version,
                                   translation.bundle, warnings=warnings + list(translation.warnings))
        if self.router is not None:
            record.destinations = self.router.destinations(parsed.message_type, sender_id or None,
                                                           translation.bundle)
            if record.destinations:
                record.patient_key = patient_key(translation.bundle)
                record.retired_keys = retired_keys(translation.bundle)
        return record

    def _translate_document(self, pending: Pending, sender: SenderConfig | None,
                            mappings: MappingSet) -> TranslationRecord:
        """A FHIR Bundle or a SOAP report: made canonical directly, no mapping file involved."""
        from gateway.translation import fhir_input, report_input

        format = pending.format or detect_format(pending.raw)
        try:
            document = read_document(pending.raw, format)
        except InputError as error:
            return _failed(mappings, ErrorCondition.DATA_TYPE_ERROR, error.location, error.reason)
        sender_id = sender.id if sender else ""
        control_id = pending.key[2] if pending.key else stand_in_control_id(pending.raw)
        context = document_context(sender_id, control_id, pending.received_at,
                                   self._zone(sender.timezone if sender else DEFAULT_TIMEZONE))
        message_type = pending.message_type or format
        try:
            if format == "fhir":
                bundle = fhir_input.canonical_bundle(document, context, mappings.version, message_type)
            else:
                bundle = report_input.canonical_bundle(document, context, mappings.version)
        except report_input.ReportError as error:
            return _failed(mappings, ErrorCondition.DATA_TYPE_ERROR, error.location, error.reason)
        record = TranslationRecord(MessageStatus.TRANSLATED.value, mappings.version, bundle)
        if self.router is not None:
            record.destinations = self.router.destinations(message_type, sender_id or None, bundle)
            if record.destinations:
                record.patient_key = patient_key(bundle)
                record.retired_keys = retired_keys(bundle)
        return record

    def _csv_profiles(self, mappings: MappingSet) -> dict[str, tuple[str, ...]]:
        """The CSV profiles of the mapping set in use (its directory's, not the repository's
        mappings/), read once per set: a reload brings its own."""
        known = self._profiles
        if known is None or known[0] is not mappings:
            known = self._profiles = (mappings, csv_export.csv_profiles(mappings.directory))
        return known[1]

    def _zone(self, name: str) -> ZoneInfo:
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = ZoneInfo(name)
        return zone


def document_context(sender_id: str, control_id: str, received_at, zone: ZoneInfo | None = None
                     ) -> TranslationContext:
    """The context of a document's translation: its ids are seeded by sender and control id,
    as a message's are (the HTTPS door computes the same ids for its answer)."""
    return TranslationContext(sender_id=sender_id, timezone=zone or ZoneInfo(DEFAULT_TIMEZONE),
                              received_at=received_at, message_key=f"{sender_id}|{control_id}",
                              control_id=control_id)


def _failed(mappings: MappingSet, condition: ErrorCondition, location: str, reason: str,
            warnings: list[str] | None = None) -> TranslationRecord:
    return TranslationRecord(MessageStatus.FAILED.value, mappings.version, None, int(condition),
                             location or None, reason, list(warnings or ()))


def _condition_of(error: TranslationError) -> ErrorCondition:
    """HL7 table 0357 for a translation failure: what the engine's rule tripped on."""
    cause = error.__context__  # the engine raises `from None`, which keeps the context
    if isinstance(cause, KeyError):
        return ErrorCondition.TABLE_VALUE_NOT_FOUND  # a code missing from a strict table
    if isinstance(cause, (ValueError, TypeError)):
        return ErrorCondition.DATA_TYPE_ERROR  # a transform refused the value (a bad date)
    if "is required and has no value" in error.reason:
        return ErrorCondition.REQUIRED_FIELD_MISSING
    if isinstance(error, MissingResource):
        return ErrorCondition.SEGMENT_SEQUENCE_ERROR  # 0357: "required segments are missing"
    return ErrorCondition.APPLICATION_INTERNAL_ERROR  # no map for the type, and the rest


def location_of(text: str | None) -> Location:
    """The ERR-2 location of a stored translation error; the MSH when it names no segment."""
    for pattern in (_SEGMENT_LOCATION, _ERL_LOCATION):
        match = pattern.match(text or "")
        if match:
            segment, sequence, field, component = match.groups()
            return Location(segment, int(sequence), int(field or 0), int(component or 0))
    return Location("MSH", 1)


def error_detail(record: TranslationRecord) -> ErrorDetail:
    """The ERR of the ACK that answers a failed translation."""
    return ErrorDetail(ErrorCondition(record.error_code or ErrorCondition.APPLICATION_INTERNAL_ERROR),
                       location_of(record.error_location),
                       f"translation failed: {record.error_reason}")

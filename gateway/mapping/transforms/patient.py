"""Transforms for patient administration (ADT) maps: identifiers, names, places."""
from __future__ import annotations

import re
import unicodedata

from gateway import local_identifiers
from gateway.mapping.runtime import COMPONENT, Part
from gateway.mapping.transforms import transform
from gateway.mapping.transforms.core import fhir_datetime, raw_components, to_code

_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
_ARABIC = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]")
_TIFINAGH = re.compile("[\u2d30-\u2d7f]")
LANGUAGE_EXTENSION = "http://hl7.org/fhir/StructureDefinition/language"
BIRTH_TIME = "http://hl7.org/fhir/StructureDefinition/patient-birthTime"


@transform("oid_uri")
def oid_uri(value: str, run):
    """An ISO OID (HD-2 with HD-3 'ISO') -> urn:oid:... ; anything else gives nothing."""
    text = value.strip()
    return "urn:oid:" + text if _OID.match(text) else None


CNIE = "urn:ma:cnie"  # the identifier system of the national identity card (DESIGN 4)


@transform("local_system", node=True, reads="CX-1, CX-4.1, CX-5, the sender")
def local_system(node, run):
    """A local CX's system (gateway.local_identifiers): urn:ma:hie:local:<sender>:<CX-4.1>:<CX-5>,
    the sender being its registry facility, so that the shared record finds a registration by
    its number (a merge's MRG-1)."""
    if node.__class__ is not Part:
        raise ValueError("local_system reads a CX (a rule without from: in a CX map)")
    separators = run.separators
    components = raw_components(node.raw, run)
    if not separators.text(components[0]).strip():
        return None  # no ID number: no identifier
    assigner = raw_components(components[3], run, COMPONENT)[0] if len(components) > 3 else ""
    kind = components[4] if len(components) > 4 else ""
    # "unknown": a sender outside the registry, whose ids are made the same way (engine).
    return local_identifiers.local_system(run.context.sender_id or "unknown", separators.text(assigner),
                                          to_code(separators.text(kind), run) or "")


def national_number(value: str) -> str:
    """A CNIE/CIN number as issued: upper case, no blanks (STANDARDS 6.4), its digits ASCII
    (typed on an Arabic keyboard, '١٢٣' is 123): the same card is one identifier, and one
    patient, whatever the sender's keyboard or door."""
    text = re.sub(r"\s+", "", value).upper()
    if text.isascii():
        return text
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text)


@transform("national_id")
def national_id(value: str, run) -> str:
    """CNIE/CIN number normalised as issued (national_number)."""
    return national_number(value)


@transform("name_language", node=True, reads="XPN (the script of its letters)")
def name_language(node, run):
    """XPN -> the `language` extension when the name is in Arabic or Tifinagh script, so the
    two written forms of one name (CNIE Latin and Arabic) can be told apart (STANDARDS 6.8)."""
    text = run.separators.text(node.raw)
    if _ARABIC.search(text):
        code = "ar"
    elif _TIFINAGH.search(text):
        code = "zgh"
    else:
        return None
    return {"url": LANGUAGE_EXTENSION, "valueCode": code}


@transform("birth_time")
def birth_time(value: str, run):
    """PID-7 with a time -> the `_birthDate` element carrying patient-birthTime (v2-to-FHIR
    PID-7 when longer than 8 characters); a date alone gives nothing, and so does a PID-7 that
    is no date/time (the `birthDate` rule reading the same field reports it, once)."""
    digits = value.strip()
    if len(digits) <= 8:
        return None
    try:
        moment = fhir_datetime(digits, run.context.timezone)
    except ValueError:
        return None
    return {"extension": [{"url": BIRTH_TIME, "valueDateTime": moment}]}


@transform("location_text", node=True)
def location_text(node, run):
    """PL (point of care^room^bed^facility) -> one display text: 'CARDIO 12 B (CHU Ibn Rochd)'."""
    separators = run.separators
    components = node.raw.split(separators.component)

    def text(number: int) -> str:
        if number > len(components):
            return ""
        raw = components[number - 1]
        if separators.subcomponent:
            raw = raw.split(separators.subcomponent, 1)[0]
        return separators.text(raw).strip()
    place = " ".join(part for part in (text(1), text(2), text(3)) if part)
    facility = text(4)
    if facility:
        place = f"{place} ({facility})" if place else facility
    return place or None

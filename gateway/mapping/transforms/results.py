"""Results (ORU, MDM): OBX text values, embedded documents (ED) and EI identifiers.

Node transforms, called with the value (a Part) or, when the rule has no `from`, with the
segment being mapped: the OBX (all repetitions of OBX-5), the OBR or TXA (every OBX of their
group, for DiagnosticReport.presentedForm and DocumentReference.content).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from bisect import bisect_left

from adapters.hl7v2.message import Segment
from gateway.mapping.runtime import COMPONENT, Part, TranslationError
from gateway.mapping.transforms import FieldGuard, transform
from gateway.mapping.transforms.core import raw_components, to_decimal

# ED-2 (type of data, table 0191) and ED-3 (subtype, table 0291) -> MIME type, when the sender
# did not already send a MIME type ('application^pdf').
_SUBTYPES = {"PDF": "application/pdf", "JPEG": "image/jpeg", "JPG": "image/jpeg", "GIF": "image/gif",
             "PNG": "image/png", "TIFF": "image/tiff", "RTF": "application/rtf", "HTML": "text/html",
             "XML": "application/xml", "DICOM": "application/dicom", "BASIC": "audio/basic",
             "OCTET-STREAM": "application/octet-stream", "POSTSCRIPT": "application/postscript"}
_MIME_TYPES = ("application", "audio", "image", "text", "video", "multipart", "model")
_TYPES = {"TX": "text/plain", "FT": "text/plain", "TEXT": "text/plain", "AP": "application/octet-stream",
          "IM": "image", "AU": "audio/basic"}
TEXT_TYPES = frozenset(("TX", "FT", "ST"))


def _obx5_text(segment: Segment, run) -> str:
    """Every repetition of OBX-5, decoded (\\.br\\ as a line break), one per line."""
    separators = run.separators
    lines = [separators.text(raw) for raw in segment.repetitions(5, separators.repetition)]
    return "\n".join(lines)


@transform("obx_text", node=True)
def obx_text(node, run):
    """OBX-5 of the OBX as text: repetitions (TX/FT lines) joined with line breaks."""
    if node.__class__ is Segment:
        return _obx5_text(node, run) or None
    return run.separators.text(node.raw) or None


@transform("comment_text", node=True, reads="NTE-3")
def comment_text(node, run):
    """NTE-3 (FT, repeating) of the NTE as one text: repetitions as lines, \\.br\\ as line
    breaks; called with a field, the text of its first repetition."""
    if node.__class__ is Segment:
        separators = run.separators
        text = "\n".join(separators.text(raw) for raw in node.repetitions(3, separators.repetition))
        return text if text.strip() else None
    return run.separators.text(node.raw) or None


def ed_attachment(raw: str, run) -> dict:
    """An ED value (source^type^subtype^encoding^data) as an Attachment: the bytes exactly as
    sent, re-encoded as canonical base64, with their size and SHA-1 hash."""
    parts = raw_components(raw, run) + [""] * 5
    text = run.separators.text
    kind, subtype, encoding, data = (text(part) for part in parts[1:5])
    content_type = _content_type(kind.strip(), subtype.strip())
    if not data:  # declared but empty: kept as such (the sender is told by a warning)
        run.warnings.append("ED without data (component 5): attachment without content")
        return {"contentType": content_type}
    content = _decode(encoding.strip().upper(), data)
    return {"contentType": content_type,
            "data": base64.b64encode(content).decode("ascii"),
            "size": len(content),
            "hash": base64.b64encode(hashlib.sha1(content).digest()).decode("ascii")}


def _decode(encoding: str, data: str) -> bytes:
    if encoding in ("BASE64", "B64"):
        compact = "".join(data.split())  # senders wrap long base64 lines
        try:
            return base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("ED data is not valid base64") from None
    if encoding == "HEX":
        try:
            return bytes.fromhex("".join(data.split()))
        except ValueError:
            raise ValueError("ED data is not valid hexadecimal") from None
    if encoding in ("A", ""):  # ASCII (or unspecified): the text itself
        return data.encode("utf-8")
    raise ValueError(f"ED encoding {encoding!r} is not Base64, Hex or A")


def _content_type(kind: str, subtype: str) -> str:
    if kind.lower() in _MIME_TYPES and subtype:
        return f"{kind.lower()}/{subtype.lower()}"
    found = _SUBTYPES.get(subtype.upper())
    if found:
        return found
    if kind.upper() == "IM" and subtype:
        return "image/" + subtype.lower()
    return _TYPES.get(kind.upper(), "application/octet-stream")


@transform("ed_attachment", node=True)
def ed_attachment_transform(node, run):
    """OBX-5 ED (source^type^subtype^encoding^data) -> Attachment (contentType, data, size, hash)."""
    raw = _obx5_first(node, run) if node.__class__ is Segment else node.raw
    return ed_attachment(raw, run) if raw else None


def _obx5_first(segment: Segment, run) -> str:
    repetitions = segment.repetitions(5, run.separators.repetition)
    return repetitions[0] if repetitions else ""


def text_attachment(text: str) -> dict:
    content = text.encode("utf-8")
    return {"contentType": "text/plain; charset=utf-8",
            "data": base64.b64encode(content).decode("ascii"),
            "size": len(content),
            "hash": base64.b64encode(hashlib.sha1(content).digest()).decode("ascii")}


def _group_obx(run):
    """(segment, ERR-style location) of the OBX of the scope the mapping stands in (the order
    or the document)."""
    message = run.message
    scope = run.scope
    # Only the scope's OBX, found by bisection: a scan of every OBX for every order made a
    # message of a thousand orders take seconds.
    found = message.positions("OBX")
    low = bisect_left(found, scope.start)
    high = bisect_left(found, scope.end, low)
    return [(message.segments[at], f"OBX[{number}]") for number, at in enumerate(found[low:high], low + 1)]


def _located_attachment(raw: str, segment: Segment, location: str, run) -> dict:
    try:
        return _titled(ed_attachment(raw, run), segment, run)
    except ValueError as error:
        raise TranslationError(str(error), location + "-5") from None


def _value_type(segment: Segment, run) -> str:
    raw = segment.field(2)
    return raw_components(raw, run)[0].strip().upper() if raw else ""


# The components of OBX-3 from which CWE.CodeableConcept makes a code or a text.
_IDENTIFYING = (0, 1, 3, 4, 8)


def is_narrative(segment: Segment, run, kind: str | None = None) -> bool:
    """A text OBX (TX, FT, ST) with nothing in OBX-3 that names an observation (no code, no
    text: components 1, 2, 4, 5 and 9 empty): a line of the report's narrative, as imaging and
    transcription systems send a report's body. The message maps keep such OBX out of the
    Observations with the same test, written as conditions. `kind`: OBX-2, when known."""
    if (kind if kind is not None else _value_type(segment, run)) not in TEXT_TYPES:
        return False
    raw = segment.field(3)
    if not raw:
        return True
    components = raw_components(raw, run)
    subcomponent = run.separators.subcomponent
    for number in _IDENTIFYING:
        if number < len(components):
            text = components[number]
            if subcomponent and subcomponent in text:
                text = text.split(subcomponent, 1)[0]
            if text:
                return False
    return True


@transform("report_forms", node=True, reads="OBX-2, OBX-5 of the order's OBX")
def report_forms(node, run):
    """DiagnosticReport.presentedForm: every ED OBX of the order (a PDF report) as an Attachment,
    then the report's narrative (text OBX that name no observation, see is_narrative), in
    order, as one text/plain attachment (line breaks decoded)."""
    forms, lines = [], []
    for segment, location in _group_obx(run):
        kind = _value_type(segment, run)
        if kind == "ED":
            raw = _obx5_first(segment, run)
            if raw:
                forms.append(_located_attachment(raw, segment, location, run))
        elif kind in TEXT_TYPES and is_narrative(segment, run, kind):
            lines.append(_obx5_text(segment, run))
    if lines:
        forms.append(text_attachment("\n".join(lines)))
    return forms or None


@transform("document_content", node=True, reads="OBX-2, OBX-5 of the document's OBX")
def document_content(node, run):
    """DocumentReference.content: each ED OBX as its attachment, and the text OBX (TX, FT, ST),
    in order, as one text/plain attachment (line breaks decoded)."""
    content, lines = [], []
    for segment, location in _group_obx(run):
        kind = _value_type(segment, run)
        if kind == "ED":
            raw = _obx5_first(segment, run)
            if raw:
                content.append({"attachment": _located_attachment(raw, segment, location, run)})
        elif kind in TEXT_TYPES:
            lines.append(_obx5_text(segment, run))
    if lines:
        content.append({"attachment": text_attachment("\n".join(lines))})
    return content or None


def _titled(attachment: dict, segment: Segment, run) -> dict:
    """The OBX-3 text as the attachment's title."""
    code = segment.field(3)
    if code:
        parts = raw_components(code, run)
        title = parts[1] if len(parts) > 1 and parts[1] else ""
        if title:
            attachment["title"] = run.separators.text(title)
    return attachment


@transform("sn_original_text", node=True)
def sn_original_text(node, run):
    """SN (comparator^num1^separator^num2) as the originalText extension, when num2 or the
    separator would otherwise be lost (v2-to-FHIR SN[Quantity])."""
    parts = [run.separators.text(part) for part in raw_components(node.raw, run, node.level)]
    text = " ".join(part for part in parts[:4] if part)
    return {"url": "http://hl7.org/fhir/StructureDefinition/originalText", "valueString": text} if text else None


@transform("sn_text", node=True)
def sn_text(node, run):
    """SN written as text (comparator '<>' or suffix '+'), with the units of OBX-6."""
    if node.__class__ is Segment:
        raw = _obx5_first(node, run)
        segment = node
    else:
        raw, segment = node.raw, run.segment
    parts = [run.separators.text(part) for part in raw_components(raw, run)]
    text = " ".join(part for part in parts[:4] if part)
    unit = segment.field(6) if segment is not None else ""
    if unit:
        unit_parts = raw_components(unit, run)
        label = (unit_parts[1] if len(unit_parts) > 1 and unit_parts[1] else unit_parts[0])
        text = f"{text} {run.separators.text(label)}"
    return text or None


@transform("results_ei_system", node=True, reads="EI-3, EI-4")
def ei_system(node, run):
    """EI (entity^namespace^universal id^type) -> Identifier.system: urn:oid: for ISO OIDs,
    urn:uuid: for UUIDs, a URI as sent; else nothing (local: assigner carries the namespace)."""
    if node.__class__ is not Part:
        return None
    parts = raw_components(node.raw, run, node.level)
    if len(parts) < 3:
        return None
    universal = run.separators.text(parts[2]).strip()
    kind = run.separators.text(parts[3]).strip().upper() if len(parts) > 3 else ""
    if not universal:
        return None
    if kind == "ISO" or (not kind and _is_oid(universal)):
        return "urn:oid:" + universal
    if kind == "UUID":
        return "urn:uuid:" + universal.lower()
    if universal.startswith(("http://", "https://", "urn:")):
        return universal
    return None


def _is_oid(text: str) -> bool:
    return all(part.isdigit() for part in text.split(".")) and text.count(".") >= 2


@transform("obx_unvalued_status", node=True, reads="OBX-5, OBX-11")
def obx_unvalued_status(node, run):
    """For an OBX without a value (OBX-5 empty): its OBX-11 status, the key of the
    dataAbsentReason table ('?' when OBX-11 is empty too, the table's default)."""
    if node.__class__ is not Segment or node.field(5):
        return None
    status = node.field(11)
    return run.separators.text(status).strip() or "?" if status else "?"


# -- OBX-5 by OBX-2 (v2-to-FHIR OBX[Observation]) -------------------------------------------
# One transform per value[x] element, each returning None at once for the other types: the
# OBX-2 test is a string comparison, far cheaper than a YAML condition per type and element.
# Each declares the types it maps (its guard): the generated code reads OBX-2 once per OBX and
# calls only the transform of that type, the test inside staying for direct calls.

UCUM = "http://unitsofmeasure.org"
CODED = frozenset(("CE", "CWE", "CNE", "CF", "IS", "ID"))
MAPPED = frozenset(("NM", "SN", "NR", "DT", "DTM", "TS", "TM", "DR", "ED", "NA")) | CODED
COMPARATORS = frozenset(("<", "<=", ">=", ">"))
_RATIO = frozenset((":", "/"))
_NOT_QUANTITY = frozenset((":", "/", "-", "+"))


def _types(*names: str) -> FieldGuard:
    """The OBX-2 values for which a value transform may give something."""
    return FieldGuard(2, frozenset(names))


def _type_of(segment, run) -> str:
    fields = segment.fields
    return fields[2].strip().upper() if len(fields) > 2 else ""


def _sn(segment, run) -> list[str] | None:
    """SN components (comparator, num1, separator, num2), decoded; None when SN is one text."""
    raw = _obx5_first(segment, run)
    if not raw:
        return None
    parts = [run.separators.text(part) for part in raw_components(raw, run)] + ["", "", ""]
    if not parts[1]:
        return None
    return parts


def _units(segment, run, quantity: dict) -> dict:
    """OBX-6 (CWE[Quantity]) into a Quantity: unit (text, else code); code and system for UCUM."""
    fields = segment.fields
    raw = fields[6] if len(fields) > 6 else ""
    if raw:
        separators = run.separators
        if separators.repetition in raw:
            raw = raw.split(separators.repetition, 1)[0]
        parts = raw.split(separators.component, 3) if separators.component in raw else (raw,)
        text = separators.text
        code = text(parts[0]) if parts[0] else ""
        unit = (text(parts[1]) if len(parts) > 1 and parts[1] else "") or code
        if unit:
            quantity["unit"] = unit
        if code and len(parts) > 2 and parts[2].strip().upper() == "UCUM":
            quantity["system"] = UCUM
            quantity["code"] = code
    return quantity


def _number(text: str, run):
    return to_decimal(text, run)


@transform("obx_quantity", node=True, reads="OBX-2, OBX-5, OBX-6", guard=_types("NM", "SN"))
def obx_quantity(segment, run):
    """valueQuantity: NM (OBX-6 units), or SN comparator^number (the original text kept as an
    extension when a separator or second number would be lost)."""
    kind = _type_of(segment, run)
    if kind == "NM":
        raw = _obx5_first(segment, run)
        if not raw:
            return None
        component = run.separators.component
        if component in raw:
            raw = raw.split(component, 1)[0]
        return _units(segment, run, {"value": to_decimal(run.separators.text(raw), run)})
    if kind != "SN":
        return None
    parts = _sn(segment, run)
    if parts is None or parts[0] == "<>" or parts[2] in _NOT_QUANTITY:
        return None
    quantity = {}
    if parts[2] or parts[3]:
        quantity["extension"] = [{"url": "http://hl7.org/fhir/StructureDefinition/originalText",
                                  "valueString": " ".join(part for part in parts[:4] if part)}]
    quantity["value"] = _number(parts[1], run)
    if parts[0] in COMPARATORS:
        quantity["comparator"] = parts[0]
    return _units(segment, run, quantity)


@transform("obx_range", node=True, reads="OBX-2, OBX-5, OBX-6", guard=_types("NR", "SN"))
def obx_range(segment, run):
    """valueRange: NR low^high, or SN num1^-^num2 (with OBX-6 units)."""
    kind = _type_of(segment, run)
    if kind == "NR":
        raw = _obx5_first(segment, run)
        parts = [run.separators.text(part) for part in raw_components(raw, run)] + [""] if raw else ["", ""]
        found = {}
        if parts[0]:
            found["low"] = {"value": _number(parts[0], run)}
        if parts[1]:
            found["high"] = {"value": _number(parts[1], run)}
        return found or None
    if kind != "SN":
        return None
    parts = _sn(segment, run)
    if parts is None or parts[0] == "<>" or parts[2] != "-":
        return None
    found = {"low": _units(segment, run, {"value": _number(parts[1], run)})}
    if parts[3]:
        found["high"] = _units(segment, run, {"value": _number(parts[3], run)})
    return found


@transform("obx_ratio", node=True, reads="OBX-2, OBX-5, OBX-6", guard=_types("SN"))
def obx_ratio(segment, run):
    """valueRatio: SN num1^:^num2 or num1^/^num2 (OBX-6 units on both, as the guide)."""
    if _type_of(segment, run) != "SN":
        return None
    parts = _sn(segment, run)
    if parts is None or parts[0] == "<>" or parts[2] not in _RATIO:
        return None
    numerator = {"value": _number(parts[1], run)}
    if parts[0] in COMPARATORS:
        numerator["comparator"] = parts[0]
    ratio = {"numerator": _units(segment, run, numerator)}
    if parts[3]:
        ratio["denominator"] = _units(segment, run, {"value": _number(parts[3], run)})
    return ratio


@transform("obx_string", node=True, reads="OBX-2, OBX-5", guard=FieldGuard(2, MAPPED - {"SN"}, inside=False))
def obx_string(segment, run):
    """valueString: ST/TX/FT (repetitions as lines, \\.br\\ as line breaks); SN that is text
    ('<>' comparator, '+' suffix, or written in one component); a type the guide does not map."""
    kind = _type_of(segment, run)
    if kind == "SN":
        parts = _sn(segment, run)
        if parts is None:
            return _obx5_text(segment, run) or None
        if parts[0] == "<>" or parts[2] == "+":
            return sn_text(segment, run)
        return None
    if kind in MAPPED:
        return None
    return _obx5_text(segment, run) or None


@transform("obx_datetime", node=True, reads="OBX-2, OBX-5", guard=_types("DT", "DTM", "TS"))
def obx_datetime(segment, run):
    """valueDateTime: DT, DTM, TS."""
    if _type_of(segment, run) not in ("DT", "DTM", "TS"):
        return None
    raw = _obx5_first(segment, run)
    if not raw:
        return None
    from gateway.mapping.transforms.core import fhir_datetime
    return fhir_datetime(run.separators.text(raw_components(raw, run)[0]), run.context.timezone)


@transform("obx_time", node=True, reads="OBX-2, OBX-5", guard=_types("TM"))
def obx_time(segment, run):
    """valueTime: TM."""
    if _type_of(segment, run) != "TM":
        return None
    raw = _obx5_first(segment, run)
    if not raw:
        return None
    from gateway.mapping.transforms.core import to_time
    return to_time(run.separators.text(raw), run)


@transform("obx_period", node=True, reads="OBX-2, OBX-5", guard=_types("DR"))
def obx_period(segment, run):
    """valuePeriod: DR start^end."""
    if _type_of(segment, run) != "DR":
        return None
    raw = _obx5_first(segment, run)
    if not raw:
        return None
    from gateway.mapping.transforms.core import fhir_datetime
    # Each component's first subcomponent; _components, since a message whose MSH-2 has three
    # characters has no subcomponent separator (str.split('') raises).
    parts = [run.separators.text(raw_components(part, run, COMPONENT)[0]) for part in raw_components(raw, run)]
    period = {}
    if parts[0]:
        period["start"] = fhir_datetime(parts[0], run.context.timezone)
    if len(parts) > 1 and parts[1]:
        period["end"] = fhir_datetime(parts[1], run.context.timezone)
    return period or None

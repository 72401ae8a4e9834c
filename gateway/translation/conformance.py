"""HL7 v2 conformance validation with hl7apy (strict parse, then validate), per sender.

hl7apy is slow (tens of milliseconds for an ORU), so it is imported and run only for senders
whose `validation` is warn or reject; never for the default, off.

A problem is answered with its HL7 table 0357 condition and the place it names ('PID[1]-3'),
so that the AE/AR's ERR-2 points at it. Reasons name elements only, never values: a value is
patient data. hl7apy's exceptions carry no position, so the place is read from the names in its
messages, from the parser's frames (the field it was reading) and from the message itself.
What hl7apy does not check, this module does: segments it cannot place in the structure (it
drops them silently), segment order, and MSH-11 against table 0103. Other table values it only
reports as warnings to a report file, so they are not checked (local codes are common).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from adapters.hl7v2.codes import ErrorCondition
from adapters.hl7v2.message import Hl7Message

_SEGMENT = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_FIELD = re.compile(r"^([A-Z][A-Z0-9]{2})_(\d+)$")  # hl7apy's field names: 'PID_3'
_COMPONENT = re.compile(r"^[A-Z][A-Z0-9]{1,2}_(\d+)$")  # a datatype's component: 'CX_1'
# Validator.validate's messages: 'Missing required child PID.PID_3', 'Child limit exceeded ...',
# 'Datatype ST is not correct for PID.PID_7 (...)', "Invalid children detected for <Segment
# QPD>: ['QPD_4']"; kind, parent and (first) child.
_VALIDATION = (re.compile(r"^(Missing required child|Child limit exceeded|Datatype \S+ is not correct for)"
                          r" (\w+)\.(\w+)"),
               re.compile(r"^(Invalid children) detected for <\w+ (\w+)>: \['(\w+)'"))
# Exceptions of the parse that concern the field being read: what each says of it.
_FIELD_ERRORS = {"InvalidDataType": "not of its data type", "InvalidDateFormat": "not of its data type",
                 "InvalidDateOffset": "not of its data type", "ValueError": "not of its data type",
                 "InvalidMicrosecondsPrecision": "not of its data type",
                 "InvalidName": "has more components than its data type",
                 "OperationNotAllowed": "is no field of its segment in this version"}


@dataclass(frozen=True)
class ConformanceProblem:
    reason: str
    condition: ErrorCondition
    location: str = ""  # 'PID[1]-3', 'MSH[1]-9.2' (translator.location_of reads it); '' = the MSH


def message_text(message: Hl7Message) -> str:
    """The ER7 text of a tokenized message, segments ended by CR."""
    return "\r".join(_segment_lines(message)) + "\r"


def _segment_lines(message: Hl7Message) -> list[str]:
    separator = message.separators.field
    lines = []
    for segment in message.segments:
        fields = segment.fields
        if segment.name == "MSH":
            lines.append("MSH" + separator + separator.join(fields[2:]))
        else:
            lines.append(separator.join(fields))
    return lines


def check(message: Hl7Message) -> ConformanceProblem | None:
    """The first conformance problem of `message` (strict parse, MSH-11, validation, then
    placement of the segments), or None."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(message_text(message), validation_level=VALIDATION_LEVEL.STRICT,
                               find_groups=True)
    except Exception as error:  # hl7apy raises its own and plain ValueError/KeyError alike
        return _parse_problem(message, error)
    return _processing_id_problem(message, parsed.version) or _validation_problem(message, parsed) \
        or _placement_problem(message, parsed)


def _problem(condition: ErrorCondition, what: str, location: str = "") -> ConformanceProblem:
    return ConformanceProblem(f"HL7 conformance: {what}", condition, location)


def _parse_problem(message: Hl7Message, error: Exception) -> ConformanceProblem:
    """A strict parse's refusal, placed at the field (or segment) the parser was reading."""
    name = type(error).__name__
    if name == "UnsupportedVersion":
        return _problem(ErrorCondition.UNSUPPORTED_VERSION_ID, "MSH-12 version not supported", "MSH[1]-12")
    if name == "InvalidEncodingChars":
        return _problem(ErrorCondition.DATA_TYPE_ERROR, "MSH-2 encoding characters not valid for MSH-12",
                        "MSH[1]-2")
    frames = _parser_frames(error)
    if name == "OperationNotAllowed" and "parse_segments" not in frames:
        return _message_type_problem(message)  # parse_message could make no Message of MSH-9
    segment, sequence = _segment_read(message, frames)
    # the field being read, or the one added once too many (a segment's fields are added after)
    field = _FIELD.match(str(frames.get("parse_field", {}).get("name")
                             or getattr(getattr(error, "child", None), "name", "") or ""))
    if segment and field:
        place = f"{segment}-{field.group(2)}"
        location = f"{segment}[{sequence}]-{field.group(2)}"
        if name == "MaxLengthReached":
            return _problem(ErrorCondition.VALUE_TOO_LONG, f"{place} value too long", location)
        if name == "MaxChildLimitReached":
            return _problem(ErrorCondition.DATA_TYPE_ERROR, f"{place} repeated more than allowed", location)
        if name in _FIELD_ERRORS:
            return _problem(ErrorCondition.DATA_TYPE_ERROR, f"{place} {_FIELD_ERRORS[name]}", location)
    if name == "MaxChildLimitReached" and (segment or _SEGMENT.match(error.child.name or "")):
        return _repeated_segment(message, error, segment, sequence)
    return _problem(ErrorCondition.APPLICATION_INTERNAL_ERROR, f"the validator failed ({name})",
                    f"{segment}[{sequence}]" if segment else "")


def _parser_frames(error: Exception) -> dict[str, dict]:
    """The locals of hl7apy.parser's functions under way when `error` was raised, innermost
    kept: 'parse_field' names the field being read, 'parse_segments' has the segment's text."""
    frames = {}
    trace = error.__traceback__
    while trace is not None:
        code = trace.tb_frame.f_code
        if trace.tb_frame.f_globals.get("__name__") == "hl7apy.parser":
            frames[code.co_name] = trace.tb_frame.f_locals
        trace = trace.tb_next
    return frames


def _segment_read(message: Hl7Message, frames: dict[str, dict]) -> tuple[str, int]:
    """The segment id and sequence of the segment the parser was reading, ('', 0) if none."""
    text = frames.get("parse_segments", {}).get("s")
    if not isinstance(text, str):
        return "", 0
    text = text.strip()
    counts: dict[str, int] = {}
    for segment, line in zip(message.segments, _segment_lines(message)):
        counts[segment.name] = counts.get(segment.name, 0) + 1
        if line.strip() == text:
            return segment.name, counts[segment.name]
    return "", 0


def _repeated_segment(message: Hl7Message, error: Exception, segment: str, sequence: int
                      ) -> ConformanceProblem:
    """A segment or group more times than its structure allows: at the segment being read, or
    else (the message's own segments are added after parsing) the first segment too many."""
    name, limit = error.child.name, int(error.limit)
    if not segment:
        segment = name
        sequence = limit + 1 if len(message.positions(name)) > limit else 1
    what = f"{name} segment" if name == segment else f"{name} (at {segment})"
    return _problem(ErrorCondition.SEGMENT_SEQUENCE_ERROR, f"{what} repeated more than allowed ({limit})",
                    f"{segment}[{sequence}]")


def _message_type_problem(message: Hl7Message) -> ConformanceProblem:
    """MSH-9 names no message structure hl7apy knows: which part of it is wrong."""
    from hl7apy import get_default_version

    version = message.value("MSH", 12).strip() or get_default_version()  # as hl7apy reads it ('2.5 ')
    kind, event, structure = (message.value("MSH", 9, n) for n in (1, 2, 3))
    if kind not in _table("HL70076", version, kind):
        return _problem(ErrorCondition.UNSUPPORTED_MESSAGE_TYPE, "MSH-9.1 message type not in HL7 table 0076",
                        "MSH[1]-9.1")
    if event not in _table("HL70003", version, event):
        return _problem(ErrorCondition.UNSUPPORTED_EVENT_CODE, "MSH-9.2 event not in HL7 table 0003",
                        "MSH[1]-9.2")
    if structure:
        return _problem(ErrorCondition.UNSUPPORTED_MESSAGE_TYPE,
                        f"MSH-9.3 message structure unknown in HL7 {version}", "MSH[1]-9.3")
    # A known event without MSH-9.3: hl7apy has no table from events to structures.
    return _problem(ErrorCondition.APPLICATION_INTERNAL_ERROR,
                    "the validator knows no structure for this MSH-9 without MSH-9.3", "MSH[1]-9")


def _table(name: str, version: str, value: str) -> tuple[str, ...]:
    """The codes of HL7 table `name` in hl7apy's `version`; (value,) when it has no such table
    (not every version has every table): what cannot be checked is not refused."""
    from hl7apy import load_reference
    from hl7apy.exceptions import ChildNotFound

    try:
        return load_reference(name, "Table", version)[1]
    except ChildNotFound:
        return (value,)


def _processing_id_problem(message: Hl7Message, version: str) -> ConformanceProblem | None:
    """MSH-11.1 outside HL7 table 0103 (D, P, T); hl7apy checks table values only as warnings."""
    processing_id = message.value("MSH", 11)
    if processing_id and processing_id not in _table("HL70103", version, processing_id):
        return _problem(ErrorCondition.UNSUPPORTED_PROCESSING_ID, "MSH-11 processing id not in HL7 table 0103",
                        "MSH[1]-11")
    return None


def _validation_problem(message: Hl7Message, parsed) -> ConformanceProblem | None:
    """Validator.validate's first error (it raises the first of those it collects), placed."""
    try:
        parsed.validate()
    except Exception as error:
        match = _VALIDATION[0].match(str(error)) or _VALIDATION[1].match(str(error))
        if match is None:
            return _problem(ErrorCondition.APPLICATION_INTERNAL_ERROR,
                            f"the validator refused the message ({type(error).__name__})")
        return _named_problem(message, *match.groups())
    return None


def _named_problem(message: Hl7Message, kind: str, parent: str, child: str) -> ConformanceProblem:
    """A validation error about `child` of `parent` (hl7apy names: 'ADT_A01', 'PID', 'PID_3', 'CX_1')."""
    missing, too_many, unknown = (kind.startswith(start) for start in ("Missing", "Child limit", "Invalid"))
    field, component = _FIELD.match(child), _COMPONENT.match(child)
    owner = _FIELD.match(parent)
    if field and field.group(1) == parent:  # a field of a segment
        segment, number, place = parent, int(field.group(2)), f"{parent}-{field.group(2)}"
        location = f"{segment}[{_sequence(message, segment, number, 0, missing)}]-{number}"
    elif owner and component:  # a component of a field
        segment, number, part = owner.group(1), int(owner.group(2)), int(component.group(1))
        place = f"{segment}-{number}.{part}"
        location = f"{segment}[{_sequence(message, segment, number, part, missing)}]-{number}.{part}"
    elif _SEGMENT.match(child) or not (field or component):  # a segment or a group of the structure
        what = "segment" if _SEGMENT.match(child) else "group"
        location = f"{child}[1]" if what == "segment" else ""
        if missing:
            return _problem(ErrorCondition.SEGMENT_SEQUENCE_ERROR, f"{child} {what} missing in {parent}", location)
        state = "repeated more than allowed" if too_many else "not of its structure"
        return _problem(ErrorCondition.SEGMENT_SEQUENCE_ERROR, f"{child} {what} {state} in {parent}", location)
    else:  # a part of a component: hl7apy names no field
        return _problem(ErrorCondition.REQUIRED_FIELD_MISSING if missing else ErrorCondition.DATA_TYPE_ERROR,
                        f"{parent}.{child} {'required part missing' if missing else 'not valid'}")
    if missing:
        return _problem(ErrorCondition.REQUIRED_FIELD_MISSING, f"{place} required field missing", location)
    state = "repeated more than allowed" if too_many else \
        "is no field of its segment in this version" if unknown else "of the wrong data type"
    return _problem(ErrorCondition.DATA_TYPE_ERROR, f"{place} {state}", location)


def _sequence(message: Hl7Message, segment: str, field: int, component: int, empty: bool) -> int:
    """The sequence of the first `segment` whose field (component) is empty when `empty`, else 1."""
    if not empty:
        return 1
    separators = message.separators
    for sequence, position in enumerate(message.positions(segment), 1):
        repetitions = message.segments[position].repetitions(field, separators.repetition) or [""]
        if any(not _component(value, separators.component, component) for value in repetitions):
            return sequence
    return 1


def _component(value: str, separator: str, number: int) -> str:
    if not number:
        return value
    parts = value.split(separator)
    return parts[number - 1] if number <= len(parts) else ""


def _placement_problem(message: Hl7Message, parsed) -> ConformanceProblem | None:
    """The first segment hl7apy dropped (it places a segment in the structure by name and drops
    what fits nowhere) or put out of the structure's order. Z segments are local: never placed;
    nor is a site-defined message (a Z type, event or structure), whose structure HL7 does not
    give."""
    if any(message.value("MSH", 9, n).startswith("Z") for n in (1, 2, 3)):
        return None
    placed = list(_placed_segments(parsed))
    counts: dict[str, int] = {}
    at = 0
    for segment in message.segments:
        name = segment.name
        counts[name] = counts.get(name, 0) + 1
        if name.startswith("Z"):
            continue
        # ERR-2 takes only an HL7 segment id: a 'pid' or '1AB' line is placed at the MSH
        location = f"{name}[{counts[name]}]" if _SEGMENT.match(name) else ""
        if at >= len(placed) or placed[at][0] != name:
            return _problem(ErrorCondition.SEGMENT_SEQUENCE_ERROR,
                            f"{name} segment not expected here in {parsed.name}", location)
        if placed[at][1]:
            return _problem(ErrorCondition.SEGMENT_SEQUENCE_ERROR,
                            f"{name} segment out of order in {parsed.name}", location)
        at += 1
    return None


def _placed_segments(group, late: bool = False):
    """(segment name, out of order) of the segments under `group`, depth first as parsed: a
    child is out of order when its structure places it before a sibling that came earlier (all
    the segments of a group out of order are)."""
    order = {reference[0]: index for index, reference in enumerate(group.reference[1])}
    highest = -1
    for child in group.children:
        index = order.get(child.name, highest)
        out_of_order, highest = late or index < highest, max(highest, index)
        if child.classname == "Segment":
            yield child.name, out_of_order
        else:
            yield from _placed_segments(child, out_of_order)

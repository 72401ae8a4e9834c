"""HL7 v2 conformance validation with hl7apy (strict parse, then validate), per sender.

hl7apy is slow (tens of milliseconds for an ORU), so it is imported and run only for senders
whose `validation` is warn or reject; never for the default, off.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapters.hl7v2.codes import ErrorCondition
from adapters.hl7v2.message import Hl7Message

# hl7apy's exception names that mean a value of the wrong type or size.
_DATA_ERRORS = {"InvalidDataType": ErrorCondition.DATA_TYPE_ERROR,
                "InvalidDateFormat": ErrorCondition.DATA_TYPE_ERROR,
                "InvalidDateOffset": ErrorCondition.DATA_TYPE_ERROR,
                "InvalidMicrosecondsPrecision": ErrorCondition.DATA_TYPE_ERROR,
                "MaxLengthReached": ErrorCondition.VALUE_TOO_LONG}


@dataclass(frozen=True)
class ConformanceProblem:
    reason: str
    condition: ErrorCondition


def message_text(message: Hl7Message) -> str:
    """The ER7 text of a tokenized message, segments ended by CR."""
    separator = message.separators.field
    lines = []
    for segment in message.segments:
        fields = segment.fields
        if segment.name == "MSH":
            lines.append("MSH" + separator + separator.join(fields[2:]))
        else:
            lines.append(separator.join(fields))
    return "\r".join(lines) + "\r"


def check(message: Hl7Message) -> ConformanceProblem | None:
    """The first conformance problem hl7apy finds in `message` (strict), or None."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(message_text(message), validation_level=VALIDATION_LEVEL.STRICT,
                               find_groups=True)
        parsed.validate()
    except Exception as error:  # hl7apy raises its own and plain ValueError/KeyError alike
        name = type(error).__name__
        condition = _DATA_ERRORS.get(name, ErrorCondition.APPLICATION_INTERNAL_ERROR)
        detail = str(error).strip() or name
        return ConformanceProblem(f"HL7 conformance ({name}): {detail}", condition)
    return None

"""HL7 paths in the standard's numbering, as mapping files write them.

Grammar (1-based, as in the specification and the v2-to-FHIR guide):

    PID            a segment (in `each:` or `from:` of a resource entry)
    PID-3          field 3 of PID; with `from` its first repetition, with `each` every one
    PID-3.4        component 4 of it
    PID-3.4.2      subcomponent 2 of that component
    4.2            relative: component 4, subcomponent 2 of the value being mapped (in a
                   datatype map such as CX, or inside a segment map's nested `map`)
    ROW-quantity   a named column, for formats whose files declare `columns` (CSV)
    @patient       the resource(s) named `patient` by the message map (a Reference)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_ABSOLUTE = re.compile(r"^([A-Z][A-Z0-9]{0,2})(?:-(\d+|[a-z_][a-z0-9_]*)(?:\.(\d+)(?:\.(\d+))?)?)?$")
_RELATIVE = re.compile(r"^(\d+)(?:\.(\d+))?$")
_REFERENCE = re.compile(r"^@([a-z_][a-z0-9_]*)$")


class PathError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Hl7Path:
    segment: str = ""  # '' for a relative path
    field: int = 0  # 0: the whole segment
    component: int = 0  # 0: the whole field repetition
    subcomponent: int = 0
    column: str = ""  # a named field, resolved to `field` by the file's `columns`
    reference: str = ""  # '@name'

    @property
    def relative(self) -> bool:
        return not self.segment and not self.reference

    def __str__(self) -> str:
        if self.reference:
            return "@" + self.reference
        text = self.segment
        if self.field or self.column:
            text += f"-{self.column or self.field}"
        parts = [str(n) for n in (self.component, self.subcomponent) if n]
        if parts:
            text = (text + "." if text else "") + ".".join(parts)
        return text


def parse_path(text) -> Hl7Path:
    """Parse one path; raises PathError with a reason that names the grammar."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if isinstance(text, float):  # YAML reads 4.2 as a number
        text = repr(text)
    if not isinstance(text, str):
        raise PathError(f"a path must be text, not {type(text).__name__}")
    text = text.strip()
    match = _REFERENCE.match(text)
    if match:
        return Hl7Path(reference=match.group(1))
    match = _ABSOLUTE.match(text)
    if match:
        segment, field, component, subcomponent = match.groups()
        if int(component or 1) < 1 or int(subcomponent or 1) < 1:
            # PID-3.0 would read the whole field, as if the component were not written.
            raise PathError(f"{text!r}: components are numbered from 1")
        if field is None:
            return Hl7Path(segment)
        if not field.isdigit():
            return Hl7Path(segment, 0, int(component or 0), int(subcomponent or 0), column=field)
        if int(field) < 1:
            raise PathError(f"{text!r}: fields are numbered from 1")
        return Hl7Path(segment, int(field), int(component or 0), int(subcomponent or 0))
    match = _RELATIVE.match(text)
    if match:
        component, subcomponent = match.groups()
        if int(component) < 1 or (subcomponent is not None and int(subcomponent) < 1):
            raise PathError(f"{text!r}: components are numbered from 1")
        return Hl7Path(component=int(component), subcomponent=int(subcomponent or 0))
    raise PathError(f"{text!r} is not a path: write SEG, SEG-F, SEG-F.C, SEG-F.C.S, "
                    "a relative C or C.S, or @name")

"""Checking the absolute HL7 paths of mapping files against the HL7 v2 reference (hl7apy's
tables of segments, fields and datatypes for versions 2.3 to 2.8).

`check_path(path)` is given to every Environment of a mapping set (see rules.py `_source`):
it returns a reason when a path names something no HL7 version from 2.3 to 2.8 defines, None
otherwise. A path is accepted when one version has it:

- the segment exists in at least one version (Z-segments, and names that are not three
  characters, such as ASTM records, are not checked);
- the field number exists in that segment in at least one version;
- a component number does not exceed the number of components of the field's datatype (the
  largest over the versions where the field exists), and a subcomponent number that of the
  component's datatype; a field whose datatype varies (OBX-5) or is unknown is not checked.

The reference is read once (about 0.15 s for the eight versions) and cached.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache

from gateway.mapping.path import Hl7Path

VERSIONS = ("2_3", "2_3_1", "2_4", "2_5", "2_5_1", "2_6", "2_7", "2_8")
SPAN = "HL7 v2.3 to v2.8"
_UNCHECKED = None  # a count that is not checked (varies, unknown)


@dataclass(frozen=True)
class FieldShape:
    """What the versions that define one field say about it (largest counts over versions)."""

    datatypes: tuple[str, ...]  # datatype names, in version order, without repeats
    components: int | None  # None: not checked (varies / unknown datatype)
    subcomponents: tuple[int | None, ...]  # per component (index 0 = component 1)


@dataclass(frozen=True)
class SegmentShape:
    fields: dict[int, FieldShape]

    @property
    def last(self) -> int:
        return max(self.fields, default=0)


def _count(structure) -> int | None:
    """Children of a datatype structure: its components (a leaf has one); None if unchecked."""
    kind, children, datatype = structure[0], structure[1], structure[2]
    if not datatype or str(datatype).lower() == "varies":
        return _UNCHECKED
    if kind == "leaf" or not children:
        return 1
    return len(children)


def _merge(left: int | None, right: int | None, first: bool) -> int | None:
    if first:
        return right
    if left is _UNCHECKED or right is _UNCHECKED:
        return _UNCHECKED
    return max(left, right)


@lru_cache(maxsize=None)
def reference() -> dict[str, SegmentShape]:
    """Segment name -> its shape over the versions (loaded once)."""
    raw: dict[str, dict[int, list]] = {}
    for version in VERSIONS:
        try:
            segments = importlib.import_module(f"hl7apy.v{version}.segments").SEGMENTS
        except ImportError:  # pragma: no cover - a trimmed hl7apy
            continue
        for name, definition in segments.items():
            fields = raw.setdefault(name, {})
            children = definition[1] if len(definition) > 1 else ()  # 2.7 QRD: no fields
            for child in children:
                child_name, structure = child[0], child[1]
                try:
                    number = int(str(child_name).rsplit("_", 1)[1])
                except (IndexError, ValueError):
                    continue
                fields.setdefault(number, []).append(structure)
    shapes = {}
    for name, fields in raw.items():
        shaped = {}
        for number, structures in fields.items():
            datatypes: list[str] = []
            components: int | None = None
            subcomponents: list[int | None] = []
            for position, structure in enumerate(structures):
                datatype = str(structure[2] or "")
                if datatype not in datatypes:
                    datatypes.append(datatype)
                components = _merge(components, _count(structure), position == 0)
                children = structure[1] if structure[0] != "leaf" and structure[1] else ()
                for index, child in enumerate(children):
                    count = _count(child[1])
                    if index < len(subcomponents):
                        subcomponents[index] = _merge(subcomponents[index], count, False)
                    else:
                        subcomponents.append(count)
            shaped[number] = FieldShape(tuple(datatypes), components, tuple(subcomponents))
        shapes[name] = SegmentShape(shaped)
    return shapes


@lru_cache(maxsize=4096)
def check_path(path: Hl7Path) -> str | None:
    """A reason if no HL7 version from 2.3 to 2.8 has this absolute path, else None."""
    name = path.segment
    if not name or path.reference or len(name) != 3 or name.startswith("Z"):
        return None
    shape = reference().get(name)
    if shape is None:
        return f"{name} is not a segment of {SPAN}"
    if not path.field:
        return None
    field = shape.fields.get(path.field)
    if field is None:
        return f"{name} has no field {path.field} in {SPAN} (it has {shape.last})"
    if not path.component or field.components is _UNCHECKED:
        return None
    where = f"{name}-{path.field}"
    types = "/".join(field.datatypes)
    if path.component > field.components:
        return (f"{where} ({types}) has no component {path.component} in {SPAN} "
                f"(it has {field.components})")
    if path.subcomponent and field.components > 1:
        # A leaf field (one component) has no separate subcomponents to count.
        count = field.subcomponents[path.component - 1] if path.component <= len(field.subcomponents) else 1
        if count is not _UNCHECKED and path.subcomponent > count:
            return (f"{where}.{path.component} of {types} has no subcomponent {path.subcomponent} "
                    f"in {SPAN} (it has {count})")
    return None

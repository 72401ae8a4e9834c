"""Named transforms: the Python functions a mapping file may call with `transform: NAME`.

A transform takes the text of the value (or, registered with `node=True`, the value itself,
to read its components) and the translation context, and returns the FHIR value, or None
when there is nothing to map. It raises ValueError with a reason when the value is wrong;
the engine adds the location. Every module of this package is imported, so a new transform
is a decorated function in a module here.

A transform registered `lenient` (the dates and times) reads values that a sender may get
wrong without the rest of the message being wrong: when a rule that is not `required` gives it
a value it cannot read (a birth date written 'Aug 15, 1942'), the engine leaves the element out
and adds a warning naming the field and the text, instead of failing the whole message; the
rule's `data_absent` puts FHIR's data-absent-reason in the element's place. A `required` rule
still fails with the transform's reason.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class FieldGuard:
    """What a node transform declares about the segment it reads: it gives nothing unless
    field `field` (stripped, upper case) is one of `values` (or, `inside` false, is not one).
    The generated code reads that field once per segment and calls only the transforms whose
    guard holds: the OBX value transforms, one per value[x], skip the other types at no cost."""

    field: int
    values: frozenset
    inside: bool = True

    def allows(self, segment) -> bool:
        fields = segment.fields
        value = fields[self.field].strip().upper() if len(fields) > self.field else ""
        return (value in self.values) is self.inside


@dataclass(frozen=True, slots=True)
class Transform:
    name: str
    function: Callable
    node: bool  # receives the value (Part or Segment) rather than its text
    description: str
    guard: FieldGuard | None = None  # node transforms: when called on a segment, None unless it holds
    lenient: bool = False  # an unreadable value of an optional element is left out, with a warning
    reads: str = ""  # node transforms: the fields they read ("OBX-2, OBX-5, OBX-6"), for the export


REGISTRY: dict[str, Transform] = {}


def transform(name: str, node: bool = False, guard: FieldGuard | None = None, lenient: bool = False,
              reads: str = ""):
    """Register `function` as the transform `name` (`guard`: see FieldGuard, node only;
    `lenient`: see the module's docstring; `reads`: what a node transform reads of the value
    it is given, as `mappings export` shows it for a rule without `from:`)."""
    if guard is not None and not node:
        raise ValueError(f"transform {name!r}: a guard reads a segment, so the transform is node=True")

    def register(function: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"transform {name!r} is registered twice")
        doc = (function.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Transform(name, function, node, doc[0] if doc else "", guard, lenient, reads)
        return function
    return register


def load_all() -> dict[str, Transform]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return REGISTRY

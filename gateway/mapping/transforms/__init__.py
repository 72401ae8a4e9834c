"""Named transforms: the Python functions a mapping file may call with `transform: NAME`.

A transform takes the text of the value (or, registered with `node=True`, the value itself,
to read its components) and the translation context, and returns the FHIR value, or None
when there is nothing to map. It raises ValueError with a reason when the value is wrong;
the engine adds the location. Every module of this package is imported, so a new transform
is a decorated function in a module here.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True, slots=True)
class Transform:
    name: str
    function: Callable
    node: bool  # receives the value (Part or Segment) rather than its text
    description: str


REGISTRY: dict[str, Transform] = {}


def transform(name: str, node: bool = False):
    """Register `function` as the transform `name`."""
    def register(function: Callable) -> Callable:
        if name in REGISTRY:
            raise ValueError(f"transform {name!r} is registered twice")
        doc = (function.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Transform(name, function, node, doc[0] if doc else "")
        return function
    return register


def load_all() -> dict[str, Transform]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return REGISTRY

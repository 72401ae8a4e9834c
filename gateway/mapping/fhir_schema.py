"""What the FHIR side of a mapping may name: elements of R4 resources and datatypes.

Read from fhir.resources' R4B models (identical to R4 for the resources of the canonical
model) at load time only: a mapping that names `Patient.brithDate` is refused with the list
of what exists, and the engine learns which elements are arrays, so that one value mapped
to `identifier` becomes a one-item list.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class Element:
    name: str
    is_list: bool
    type_name: str  # a complex type or resource ('HumanName'), or '' for a primitive
    primitive: str  # 'str', 'date', 'bool', ... for primitives


@lru_cache(maxsize=None)
def _model(type_name: str):
    from fhir.resources.R4B import get_fhir_model_class
    try:
        return get_fhir_model_class(type_name)
    except (KeyError, ValueError, AttributeError):
        return None


@lru_cache(maxsize=None)
def known_type(type_name: str) -> bool:
    return _model(type_name) is not None


_CLASSES: dict[str, type] = {}  # backbone element classes, found through their parent's fields


@lru_cache(maxsize=None)
def elements(type_name: str) -> dict[str, Element]:
    """The elements of a resource or datatype by their FHIR name ({} when unknown)."""
    model = _model(type_name) or _CLASSES.get(type_name)
    if model is None:
        return {}
    found = {}
    for field_name, info in model.model_fields.items():
        name = info.alias or field_name
        if name.endswith("__ext") or name in ("fhir_comments", "resource_type"):
            continue
        found[name] = _element(name, info.annotation)
    return found


def _element(name: str, annotation) -> Element:
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType:
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        elif origin in (list, typing.List):
            is_list = True
            annotation = typing.get_args(annotation)[0]
        elif origin is typing.Annotated:
            return Element(name, is_list, "", typing.get_args(annotation)[0].__name__)
        else:
            break
    klass = annotation.get_model_klass() if hasattr(annotation, "get_model_klass") else None
    if klass is not None:
        _CLASSES.setdefault(klass.__name__, klass)
        return Element(name, is_list, klass.__name__, "")
    return Element(name, is_list, "", getattr(annotation, "__name__", str(annotation)))


def element(type_name: str, name: str) -> Element | None:
    return elements(type_name).get(name)


@lru_cache(maxsize=None)
def is_resource(type_name: str) -> bool:
    """A resource (it has `meta`), as opposed to a datatype or backbone element."""
    return "meta" in elements(type_name)

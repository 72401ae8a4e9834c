"""What the FHIR side of a mapping may name: elements of R4 resources and datatypes.

A mapping that names `Patient.brithDate` is refused with the list of what exists, and the
engine learns which elements are arrays, so that one value mapped to `identifier` becomes a
one-item list, and which are required, so that a reference to a resource the message does not
give fails the translation instead of leaving an invalid resource; routes, mappings and submitted Bundles name resource types that exist. The elements come from fhir.resources' R4B models (identical to R4 for the
resources of the canonical model), read once into `fhir_elements.json`: building the models
took more than a second of every start, command and reload. Regenerate the file after
upgrading fhir.resources with `python -m gateway.mapping.fhir_schema`;
`tests/test_fhir_types.py` checks it against the installed models.
"""
from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLE = Path(__file__).with_name("fhir_elements.json")


@dataclass(frozen=True, slots=True)
class Element:
    name: str
    is_list: bool
    type_name: str  # a complex type or resource ('HumanName'), or '' for a primitive
    primitive: str  # 'str', 'date', 'bool', ... for primitives
    required: bool = False  # at least one (1..1, 1..*): a resource without it is not valid FHIR


@lru_cache(maxsize=None)
def _table() -> dict[str, dict[str, Element]]:
    written = json.loads(TABLE.read_text("utf-8"))
    return {type_name: {name: Element(name, *fields) for name, fields in found.items()}
            for type_name, found in written.items()}


def known_type(type_name: str) -> bool:
    return type_name in _table()


def elements(type_name: str) -> dict[str, Element]:
    """The elements of a resource or datatype by their FHIR name ({} when unknown)."""
    return _table().get(type_name, {})


def element(type_name: str, name: str) -> Element | None:
    return elements(type_name).get(name)


_ABSTRACT = frozenset({"Resource", "DomainResource"})  # no instance may claim them


@lru_cache(maxsize=None)
def _resource_types() -> frozenset[str]:
    return frozenset(name for name, found in _table().items() if "meta" in found) - _ABSTRACT


def is_resource_type(name: object) -> bool:
    """A concrete resource (it has `meta`), as opposed to a datatype, a backbone element or an
    abstract type; a routes', a mapping's or a submitted Bundle's `resourceType`."""
    return isinstance(name, str) and name in _resource_types()


# -- from the models ---------------------------------------------------------------------------

def from_models() -> dict[str, dict[str, Element]]:
    """Every type of fhir.resources' R4B models and the backbone elements they hold, read from
    the models themselves (seconds: it builds them all)."""
    import fhir.resources.R4B
    from fhir.resources.R4B import get_fhir_model_class

    source = (Path(fhir.resources.R4B.__file__).parent / "fhirtypes.py").read_text("utf-8")
    classes = {name: get_fhir_model_class(name)
               for name in sorted(set(re.findall(r'create_fhir_type\(\s*"(\w+)Type"', source)))}
    found: dict[str, dict[str, Element]] = {}
    while len(found) < len(classes):
        for type_name in sorted(set(classes) - set(found)):
            found[type_name] = _model_elements(classes[type_name], classes)
    return found


def _model_elements(model, classes: dict[str, type]) -> dict[str, Element]:
    found = {}
    for field_name, info in model.model_fields.items():
        name = info.alias or field_name
        if name.endswith("__ext") or name in ("fhir_comments", "resource_type"):
            continue
        required = info.is_required() or bool((info.json_schema_extra or {}).get("element_required"))
        found[name] = _element(name, info.annotation, classes, required)
    return found


def _element(name: str, annotation, classes: dict[str, type], required: bool = False) -> Element:
    is_list = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Union or origin is types.UnionType:
            annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
        elif origin in (list, typing.List):
            is_list = True
            annotation = typing.get_args(annotation)[0]
        elif origin is typing.Annotated:
            return Element(name, is_list, "", typing.get_args(annotation)[0].__name__, required)
        else:
            break
    klass = annotation.get_model_klass() if hasattr(annotation, "get_model_klass") else None
    if klass is not None:
        classes.setdefault(klass.__name__, klass)  # a backbone element, known through its parent
        return Element(name, is_list, klass.__name__, "", required)
    return Element(name, is_list, "", getattr(annotation, "__name__", str(annotation)), required)


def written(table: dict[str, dict[str, Element]]) -> str:
    """The table as `fhir_elements.json` holds it: one type per line, for readable diffs."""
    lines = (json.dumps(type_name) + ": " + json.dumps(
        {name: [e.is_list, e.type_name, e.primitive, *((True,) if e.required else ())]
         for name, e in found.items()}, ensure_ascii=False,
        separators=(",", ":")) for type_name, found in sorted(table.items()))
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    TABLE.write_text(written(from_models()), "utf-8")
    print(f"{TABLE}: {len(_table.__wrapped__())} types")

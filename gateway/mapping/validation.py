"""Checking canonical output against the FHIR R4 definitions (fhir.resources, R4B models,
which match R4 for the resources of the canonical model): structure, types, cardinality and
required elements. Used by the tests, `make conformance` and `gateway mappings test`."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def _model(resource_type: str):
    from fhir.resources.R4B import get_fhir_model_class
    return get_fhir_model_class(resource_type)


def resource_problems(resource: dict) -> list[str]:
    """What fhir.resources finds wrong with one resource ([] when it is valid)."""
    from pydantic import ValidationError
    resource_type = resource.get("resourceType", "")
    try:
        model = _model(resource_type)
    except (KeyError, ValueError):
        return [f"unknown resource type {resource_type!r}"]
    try:
        model.model_validate(resource)
    except ValidationError as error:
        return [f"{resource_type}/{resource.get('id', '?')}: "
                f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                for problem in error.errors()]
    return []


def bundle_problems(bundle: dict) -> list[str]:
    """Problems of every resource of a bundle, and of the bundle itself."""
    problems = []
    for entry in bundle.get("entry", ()):
        problems += resource_problems(entry.get("resource", {}))
    shell = dict(bundle, entry=[{"fullUrl": entry.get("fullUrl")} for entry in bundle.get("entry", ())])
    problems += resource_problems(shell)
    return problems

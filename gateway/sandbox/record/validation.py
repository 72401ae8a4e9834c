"""What the record accepts as a resource: a known R4 resource type, a well-formed id, and, when
validation is on, a body that the fhir.resources R4B models accept (structure, types,
cardinality, required elements).

Problems come back as OperationOutcome issues whose `expression` locates the element inside
the request (`Bundle.entry[2].resource.identifier[0].system`); their diagnostics are the
validator's messages, which name the rule broken, never the offending value.
"""
from __future__ import annotations

import re
from functools import lru_cache

from gateway.mapping.fhir_schema import is_resource_type
from gateway.sandbox.record.operation_outcome import Issue

ID_PATTERN = re.compile(r"[A-Za-z0-9\-.]{1,64}")


@lru_cache(maxsize=None)
def _model(resource_type: str):
    """The R4B model class of a concrete resource type (fhir_schema.is_resource_type)."""
    from fhir.resources.R4B import get_fhir_model_class
    return get_fhir_model_class(resource_type)


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def resource_issues(resource: dict, where: str) -> list[Issue]:
    """The validator's objections to `resource` (whose type is known), located under `where`."""
    from pydantic import ValidationError
    model = _model(resource.get("resourceType"))
    try:
        model.model_validate(resource)
    except ValidationError as error:
        return [Issue(_issue_code(problem["type"]), problem["msg"], where + _fhirpath(problem["loc"]))
                for problem in error.errors(include_url=False, include_input=False)]
    except RecursionError:
        # A resource nested deeper than the models can walk (extensions within extensions, some
        # 150 levels: JSON read them): refused as such, not a RecursionError out of the door.
        return [Issue("too-costly", "the resource nests too deeply to be validated", where)]
    except (KeyError, TypeError):
        # The models look a nested resource's (contained, Bundle.entry.resource) model up by its
        # resourceType without checking it: a KeyError or TypeError, not a ValidationError.
        try:
            issues = _unknown_nested_types(resource, where)
        except RecursionError:
            issues = [Issue("too-costly", "the resource nests too deeply to be validated", where)]
        if not issues:
            raise
        return issues
    return []


def _unknown_nested_types(value, where: str) -> list[Issue]:
    """An issue for each object below the resource whose resourceType names no resource."""
    if isinstance(value, dict):
        children = ((f"{where}.{key}", item) for key, item in value.items())
    elif isinstance(value, list):
        children = ((f"{where}[{number}]", item) for number, item in enumerate(value))
    else:
        return []
    issues = []
    for at, item in children:
        if isinstance(item, dict) and "resourceType" in item and not is_resource_type(item["resourceType"]):
            issues.append(Issue("value", "unknown resource type", f"{at}.resourceType"))
        else:
            issues += _unknown_nested_types(item, at)
    return issues


def _issue_code(pydantic_type: str) -> str:
    if pydantic_type.endswith("missing"):
        return "required"
    if pydantic_type == "extra_forbidden":
        return "structure"
    return "value"


def _fhirpath(location: tuple) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path

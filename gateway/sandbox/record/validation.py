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
    return []


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

"""The search index rows of a stored resource: what `identifier`, `patient`/`subject` and
`code` searches look at.

- identifiers: every `identifier` (list or single) with a value, as (system or "", value);
- references: the `subject`, `patient` and `beneficiary` (Coverage) elements, as (element,
  type, id); a `patient` search looks at all three when they point to a Patient, a `subject`
  search at `subject` only;
- codes: the codings of `code`, `medicationCodeableConcept` and `vaccineCode`, as
  (system or "", code): the elements the R4 `code` search parameter covers for the resources
  of the canonical model.

Only relative references `Type/id` (or absolute URLs ending so) are indexed: the record has
rewritten every `urn:uuid:` reference of a transaction before it stores it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# \Z, not $ (which also matches before a final newline: "Patient/a\n" read as Patient/a)
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?\Z")
REFERENCE_ELEMENTS = ("subject", "patient", "beneficiary")
PATIENT_ELEMENTS = REFERENCE_ELEMENTS  # what `patient=` searches (targets of type Patient)
_CODE_ELEMENTS = ("code", "medicationCodeableConcept", "vaccineCode")


@dataclass(frozen=True)
class IndexRows:
    identifiers: list[tuple[str, str]]
    references: list[tuple[str, str, str]]
    codes: list[tuple[str, str]]


def parse_reference(text: object) -> tuple[str, str] | None:
    """(type, id) of a literal reference `Type/id` (or `.../Type/id[/_history/n]`), else None."""
    if not isinstance(text, str):
        return None
    found = _REFERENCE.search(text)
    return (found.group(1), found.group(2)) if found else None


def index_rows(resource: dict, targets: dict[str, str] | None = None) -> IndexRows:
    """Every index row of `resource`; `targets` maps `urn:uuid:` references not yet rewritten."""
    return IndexRows(identifier_rows(resource), reference_rows(resource, targets), code_rows(resource))


def identifier_rows(resource: dict) -> list[tuple[str, str]]:
    rows = []
    for identifier in _as_list(resource.get("identifier")):
        if isinstance(identifier, dict):
            value = identifier.get("value")
            if isinstance(value, str):
                system = identifier.get("system")
                rows.append((system if isinstance(system, str) else "", value))
    return rows


def reference_rows(resource: dict, targets: dict[str, str] | None = None) -> list[tuple[str, str, str]]:
    rows = []
    for element in REFERENCE_ELEMENTS:
        links = resource.get(element)
        if links is None:
            continue
        for link in _as_list(links):
            text = link.get("reference") if isinstance(link, dict) else None
            if targets and isinstance(text, str):
                text = targets.get(text, text)
            target = parse_reference(text)
            if target is not None:
                rows.append((element, *target))
    return rows


def code_rows(resource: dict) -> list[tuple[str, str]]:
    rows = []
    for element in _CODE_ELEMENTS:
        concept = resource.get(element)
        if not isinstance(concept, dict):
            continue
        for coding in _as_list(concept.get("coding")):
            if isinstance(coding, dict):
                code = coding.get("code")
                if isinstance(code, str):
                    system = coding.get("system")
                    rows.append((system if isinstance(system, str) else "", code))
    return rows


def _as_list(value) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]

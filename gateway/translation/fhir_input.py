"""FHIR Bundles from modern software (POST /v1/fhir) as an input format ('fhir'). Pure code.

`read_bundle(data)` parses the JSON; `bundle_issues(document)` says what is wrong with it
(the Bundle's shape, then each resource against the fhir.resources R4B models, as the shared
record sandbox checks them), every issue located by a FHIRPath-like expression
(`Bundle.entry[2].resource.birthDate`) and never quoting values.

`canonical_bundle(document, context, mapping_version)` turns an accepted Bundle (transaction,
batch or collection) into the canonical `collection` Bundle that every other input becomes:
- each entry's resource is kept, its id replaced by the deterministic id of DESIGN §5 (the
  same rule as the mapping engine: first identifier with system and value, else the message
  and the entry's place), so that the same patient sent as HL7 v2 or as FHIR is one resource;
- references to other entries (by fullUrl, `Type/id` or `urn:uuid:`) become `urn:uuid:<id>`,
  as R4 resolves them in a Bundle (bundle.html#references): `Type/id` first against the base
  of the referring entry's fullUrl when that is a RESTful URL, a version-specific reference
  without its version (when the entry has that version, or none); references to anything
  outside the Bundle are left as they are, except a `urn:uuid:` one, which names nothing
  outside a Bundle: an issue of `bundle_issues`;
- a Provenance names the source message, as for every translation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gateway import fhir_json, strict_json
from gateway.mapping.engine import collection_bundle  # also report_input's: one Bundle shape for every input
from gateway.mapping.engine import _resource_id as resource_id  # the id rule of every translation
from gateway.mapping.fhir_schema import is_resource_type
from gateway.mapping.runtime import TranslationContext
from gateway.mapping.transforms.patient import CNIE, national_number
# The id of an act the gateway recorded as performed, billed at CNSS under it: a ChargeItem a
# sender writes with one would bill a prescription's line without the checks of a result
# (prescribed, not performed before, the same patient).
from gateway.prescriptions.bundle import ACT_SYSTEM as GATEWAY_ACT
from gateway.sandbox.record.operation_outcome import Issue
from gateway.sandbox.record.validation import resource_issues

BUNDLE_TYPES = ("transaction", "batch", "collection")
ENTRY_METHODS = ("POST", "PUT")  # what a submitted entry may ask: the gateway upserts
MAX_ENTRIES = 1000
URN_UUID = "urn:uuid:"
# R4 (references.html): a RESTful URL's base, resource type and id; its `_history` version
_RESTFUL = re.compile(r"(?:(?P<base>https?://\S+?)/)?(?P<local>[A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})"
                      r"(?:/_history/(?P<version>[A-Za-z0-9\-.]{1,64}))?")


class BundleError(ValueError):
    """A body that is not a usable Bundle: its issues, each located."""

    def __init__(self, issues: list[Issue]):
        super().__init__("; ".join(f"{i.expression or 'Bundle'}: {i.diagnostics}" for i in issues))
        self.issues = issues


def read_bundle(data: bytes) -> dict:
    """The JSON document of `data` read strictly (gateway.strict_json: no key twice, no BOM,
    no lone surrogate, no NaN, no number a double or a 64-bit integer cannot hold), or
    BundleError (not UTF-8, not such JSON, not an object), located where it can be."""
    try:
        # Decimals keep their text (FHIR R4: 5.40 is not 5.4), written as sent into the
        # canonical bundle by fhir_json.dumps.
        document = strict_json.loads(data, root="Bundle", what="body", parse_float=fhir_json.ExactDecimal)
    except strict_json.JsonInputError as error:
        raise BundleError([Issue("invalid", error.reason, error.where)]) from None
    if not isinstance(document, dict):
        raise BundleError([Issue("structure", "a FHIR Bundle is a JSON object")])
    return document


def bundle_issues(document: dict) -> list[Issue]:
    """Everything wrong with a submitted Bundle; empty when it can be accepted."""
    if document.get("resourceType") != "Bundle":
        return [Issue("structure", "resourceType must be Bundle", "Bundle.resourceType")]
    issues = []
    if document.get("type") not in BUNDLE_TYPES:
        issues.append(Issue("value", f"type must be one of {', '.join(BUNDLE_TYPES)}", "Bundle.type"))
    entries = document.get("entry")
    if not isinstance(entries, list) or not entries:
        return issues + [Issue("required", "a Bundle needs at least one entry", "Bundle.entry")]
    if len(entries) > MAX_ENTRIES:
        return issues + [Issue("too-costly", f"at most {MAX_ENTRIES} entries per Bundle", "Bundle.entry")]
    full_urls: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"Bundle.entry[{index}]"
        if not isinstance(entry, dict):
            issues.append(Issue("structure", "an entry is an object", where))
            continue
        request = entry.get("request")
        if isinstance(request, dict) and request.get("method") not in ENTRY_METHODS:
            issues.append(Issue("not-supported", "request.method must be POST or PUT (resources "
                                                 "are created or updated, never read or deleted here)",
                                f"{where}.request.method"))
        full_url = entry.get("fullUrl")
        if full_url is not None:
            if not isinstance(full_url, str) or not full_url:
                issues.append(Issue("value", "fullUrl must be a non-empty string", f"{where}.fullUrl"))
            elif full_url in full_urls:
                issues.append(Issue("duplicate", "fullUrl repeats an earlier entry's", f"{where}.fullUrl"))
            else:
                full_urls.add(full_url)
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            issues.append(Issue("required", "each entry carries a resource", f"{where}.resource"))
            continue
        resource_type = resource.get("resourceType")
        if not is_resource_type(resource_type) or resource_type == "Bundle":
            issues.append(Issue("not-supported", "resourceType is not a FHIR R4 resource type "
                                                 "accepted in a Bundle entry",
                                f"{where}.resource.resourceType"))
            continue
        issues.extend(resource_issues(resource, f"{where}.resource"))
        issues.extend(_reserved_identifiers(resource, f"{where}.resource"))
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
            issues.extend(_unresolved_urns(entry["resource"], full_urls, f"Bundle.entry[{index}].resource"))
    return issues


def _unresolved_urns(resource: dict, full_urls: set[str], where: str) -> list[Issue]:
    """A `urn:uuid:` reference no entry has: it names nothing outside its Bundle, and the
    record refuses it, after the door had accepted it (walked without recursion)."""
    issues, stack = [], [(resource, where)]
    while stack:
        value, path = stack.pop()
        items = value.items() if isinstance(value, dict) else \
            ((f"[{number}]", item) for number, item in enumerate(value))
        for key, item in items:
            at = f"{path}.{key}" if isinstance(value, dict) else path + key
            if key == "reference" and isinstance(item, str) and item.startswith(URN_UUID) \
                    and item not in full_urls:
                issues.append(Issue("not-found", "reference to a urn:uuid that no entry of the Bundle has", at))
            elif isinstance(item, (dict, list)):
                stack.append((item, at))
    return issues


def _reserved_identifiers(resource: dict, where: str) -> list[Issue]:
    identifiers = resource.get("identifier")
    if not isinstance(identifiers, list):
        return []
    return [Issue("business-rule", f"{GATEWAY_ACT} identifiers are the gateway's own: send the result "
                  "(a DiagnosticReport based on the prescribed ServiceRequest) and the gateway bills the act",
                  f"{where}.identifier[{index}].system")
            for index, identifier in enumerate(identifiers)
            if isinstance(identifier, dict) and identifier.get("system") == GATEWAY_ACT]


@dataclass(frozen=True)
class CanonicalEntry:
    resource_type: str
    id: str

    @property
    def location(self) -> str:
        return f"{self.resource_type}/{self.id}"


def canonical_entries(document: dict, context: TranslationContext) -> list[CanonicalEntry]:
    """The canonical type and id of each entry of an accepted Bundle, in entry order."""
    return [CanonicalEntry(entry["resource"]["resourceType"],
                           resource_id(entry["resource"]["resourceType"], _normalised(entry["resource"]),
                                       context, ordinal))
            for ordinal, entry in enumerate(document["entry"], 1)]


def _normalised(resource: dict) -> dict:
    """`resource` with its CNIE numbers written as the mappings write them (national_number:
    upper case, no blanks, ASCII digits): the same patient sent as HL7 v2 or as FHIR has the
    same identifier, so the same id."""
    identifiers = resource.get("identifier")
    if not isinstance(identifiers, list) or not any(_is_cnie(i) for i in identifiers):
        return resource
    return {**resource, "identifier": [{**i, "value": national_number(i["value"])} if _is_cnie(i) else i
                                       for i in identifiers]}


def _is_cnie(identifier) -> bool:
    return isinstance(identifier, dict) and identifier.get("system") == CNIE \
        and isinstance(identifier.get("value"), str)


def canonical_bundle(document: dict, context: TranslationContext, mapping_version: str,
                     message_type: str = "FHIR") -> dict:
    """The canonical collection Bundle of an accepted submitted Bundle (see the module doc)."""
    entries = canonical_entries(document, context)
    targets: dict[str, tuple[str, object]] = {}  # fullUrl or Type/id: urn:uuid, meta.versionId
    for entry, canonical in zip(document["entry"], entries):
        resource = entry["resource"]
        meta = resource.get("meta")
        new = (URN_UUID + canonical.id, meta.get("versionId") if isinstance(meta, dict) else None)
        if isinstance(entry.get("fullUrl"), str):
            targets[entry["fullUrl"]] = new
        if isinstance(resource.get("id"), str):
            targets[f"{canonical.resource_type}/{resource['id']}"] = new
    resources: list[dict] = []
    place: dict[str, int] = {}
    for entry, canonical in zip(document["entry"], entries):
        base = _restful_base(entry.get("fullUrl"))
        resource = _normalised(fhir_json.with_references(
            entry["resource"], lambda reference, base=base: _resolved(reference, base, targets)))
        resource["id"] = canonical.id
        if canonical.id in place:  # the same resource twice (same identifier): the later wins
            resources[place[canonical.id]] = resource
        else:
            place[canonical.id] = len(resources)
            resources.append(resource)
    return collection_bundle(resources, context, mapping_version, message_type,
                             "FHIR submission made canonical")


def _restful_base(full_url) -> str | None:
    """The base of a RESTful fullUrl (`http://x/fhir` of `http://x/fhir/Patient/1`), else None."""
    found = _RESTFUL.fullmatch(full_url) if isinstance(full_url, str) else None
    return found["base"] if found is not None else None


def _resolved(reference: str, base: str | None, targets: dict[str, tuple[str, object]]) -> str | None:
    """The `urn:uuid:` of the entry `reference` names, written in an entry whose fullUrl has
    the RESTful `base` (or None), or None (R4 bundle.html#references)."""
    restful = _RESTFUL.fullmatch(reference)
    if restful is None:  # a urn:uuid:, or another URL: an entry's fullUrl, or nothing here
        found = targets.get(reference)
        return found[0] if found is not None else None
    local, version = restful["local"], restful["version"]
    if restful["base"] is not None:
        candidates = [f"{restful['base']}/{local}"]
    else:  # relative: on the referring entry's server first, then any entry with that id
        candidates = [f"{base}/{local}", local] if base is not None else [local]
    for candidate in candidates:
        found = targets.get(candidate)
        if found is not None:
            new, stored_version = found
            # another version than the entry's is a resource the Bundle does not carry
            return new if version is None or stored_version in (None, version) else None
    return None



"""Reading a transaction Bundle into planned entries, and resolving its references to its
entries' fullUrls (`urn:uuid:` or URLs).

Pure code: what the request asks for, checked; the store decides ids and writes (store.py).

Accepted entries (`request.method` / `request.url`):
- `POST Type`, optionally with `ifNoneExist: identifier=system|value` (conditional create);
- `PUT Type/id` (create or update with that id; the resource's id, if given, must agree);
- `PUT Type?identifier=system|value` (conditional update; any search of search.py works):
  as R4 http.html#cond-update, one match is updated, and the resource's id, if given, must
  be the match's (a 400 otherwise); no match creates the resource, with its id if given
  (update-as-create), else a new one.

Entries apply in bundle order; the same resource may appear more than once (several messages
batched in one request), the later entry winning. A condition never resolves to a resource
that another entry of the transaction writes by id (`PUT Type/id`): that one is spoken for.
(An A47 identifier change names the old record by id and moves an identifier to the new
record: the new record's conditional update must not land on the old one.) A request that is not JSON, not a Bundle,
not a transaction, or whose entries are malformed is a 400; resources the R4B models reject
are a 422 listing every problem with its location, when validation is on.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateway import strict_json
from gateway.fhir_json import ExactDecimal
from gateway.mapping.fhir_schema import is_resource_type
from gateway.sandbox.record import json_codec
from gateway.sandbox.record.operation_outcome import FhirError, Issue
from gateway.sandbox.record.search import SearchQuery, parse_query_string, parse_search
from gateway.sandbox.record.validation import is_valid_id, resource_issues

MAX_ISSUES = 50  # an OperationOutcome long enough to fix a bundle, short enough to read
URN_UUID = "urn:uuid:"


@dataclass
class PlannedEntry:
    index: int
    full_url: str | None
    method: str  # "POST" or "PUT"
    resource_type: str
    resource: dict
    target_id: str | None = None  # PUT Type/id
    condition: SearchQuery | None = None  # PUT Type?..., POST with ifNoneExist

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def parse_json(body: bytes, *, strict: bool = True) -> object:
    """The JSON document of a request body read strictly (gateway.strict_json: no key twice,
    no BOM, no lone surrogate, no NaN, no number a double or a 64-bit integer cannot hold); a
    400 saying why and where when it is not such UTF-8 JSON. (orjson read faster, but kept the
    last of two keys and read a 20-digit integer as a float.) Not `strict` (the record's input
    validation off, for benchmarks): orjson reads it, a 400 only for what is not JSON."""
    if not strict:
        try:
            return json_codec.loads(body)
        except (ValueError, RecursionError):
            pass  # not JSON: the strict reading says why and where
    try:
        # ExactDecimal: 5.10 is stored and read back as 5.10, not 5.1 (FHIR decimals keep their precision)
        return strict_json.loads(body, root="Bundle", parse_float=ExactDecimal)
    except strict_json.JsonInputError as error:
        raise FhirError.single(400, "structure", error.reason, error.where) from None


def read_transaction(document: object, *, validate: bool = True) -> list[PlannedEntry]:
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle":
        raise FhirError.single(400, "invalid", "expected a Bundle resource", "Bundle")
    if document.get("type") != "transaction":
        raise FhirError.single(400, "not-supported", "only transaction Bundles are accepted here",
                               "Bundle.type")
    entries = document.get("entry", [])
    if not isinstance(entries, list):
        raise FhirError.single(400, "structure", "Bundle.entry must be an array", "Bundle.entry")
    planned = [_read_entry(index, entry) for index, entry in enumerate(entries)]
    first_with: dict[str, int] = {}
    for entry in planned:
        if entry.full_url is not None:
            # bdl-7: a fullUrl names one entry; a reference to it would resolve to either.
            first = first_with.setdefault(entry.full_url, entry.index)
            if first != entry.index:
                raise FhirError.single(400, "invalid", f"the fullUrl of Bundle.entry[{first}] again: "
                                       "each entry's is its own", entry.where + ".fullUrl")
    if validate:
        issues = [issue for entry in planned
                  for issue in resource_issues(entry.resource, entry.where + ".resource")]
        if issues:
            raise FhirError(422, issues[:MAX_ISSUES])
    return planned


def _read_entry(index: int, entry: object) -> PlannedEntry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(entry, dict):
        raise FhirError.single(400, "structure", "an entry must be an object", where)
    resource = entry.get("resource")
    request = entry.get("request")
    if not isinstance(resource, dict):
        raise FhirError.single(400, "required", "the entry has no resource", where + ".resource")
    if not isinstance(request, dict):
        raise FhirError.single(400, "required", "the entry has no request", where + ".request")
    resource_type = resource.get("resourceType")
    if not is_resource_type(resource_type):
        raise FhirError.single(422, "value", "unknown resource type", where + ".resource.resourceType")
    full_url = entry.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise FhirError.single(400, "value", "fullUrl must be a string", where + ".fullUrl")
    method, url = request.get("method"), request.get("url")
    if method not in ("POST", "PUT"):
        raise FhirError.single(400, "not-supported", "request.method must be POST or PUT",
                               where + ".request.method")
    if not isinstance(url, str) or not url:
        raise FhirError.single(400, "required", "request.url is missing", where + ".request.url")
    planned = PlannedEntry(index, full_url, method, resource_type, resource)
    path, _, query = url.partition("?")
    if path != resource_type:
        if method == "POST" or "?" in url:
            raise FhirError.single(400, "invalid", "request.url must name the resource's type",
                                   where + ".request.url")
        url_type, _, url_id = path.partition("/")
        if url_type != resource_type or not is_valid_id(url_id):
            raise FhirError.single(400, "invalid", "request.url must be Type/id of the resource",
                                   where + ".request.url")
        if resource.get("id", url_id) != url_id:
            raise FhirError.single(400, "invalid", "the resource id differs from request.url",
                                   where + ".resource.id")
        planned.target_id = url_id
        return planned
    if method == "POST":
        if query:
            raise FhirError.single(400, "invalid", "POST takes its condition in ifNoneExist",
                                   where + ".request.url")
        if_none_exist = request.get("ifNoneExist")
        if if_none_exist is not None:
            if not isinstance(if_none_exist, str) or not if_none_exist:
                raise FhirError.single(400, "value", "ifNoneExist must be a search query",
                                       where + ".request.ifNoneExist")
            planned.condition = _condition(resource_type, if_none_exist, where + ".request.ifNoneExist")
        return planned
    if not query:
        raise FhirError.single(400, "invalid", "PUT needs Type/id or Type?search", where + ".request.url")
    planned.condition = _condition(resource_type, query, where + ".request.url")
    if "id" in resource and not is_valid_id(resource["id"]):
        raise FhirError.single(422, "value", "not a valid resource id", where + ".resource.id")
    return planned


def _condition(resource_type: str, query: str, where: str) -> SearchQuery:
    try:
        condition = parse_search(resource_type, parse_query_string(query))
    except FhirError as error:
        raise FhirError(400, [Issue(issue.code, issue.diagnostics, where) for issue in error.issues]) from None
    if not condition.clauses:
        raise FhirError.single(400, "invalid", "a conditional request needs search criteria", where)
    return condition


def rewrite_references(value, targets: dict[str, str], where: str) -> None:
    """Replace, in place, every reference to an entry's fullUrl (`urn:uuid:` or a URL) by the
    `Type/id` it was resolved to; a `urn:uuid:` that no entry has is a 422."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str) and (item.startswith(URN_UUID) or item in targets):
                target = targets.get(item)
                if target is None:
                    raise FhirError.single(422, "not-found",
                                           "reference to a urn:uuid that no entry of the bundle has",
                                           f"{where}.reference")
                value[key] = target
            elif isinstance(item, (dict, list)):
                rewrite_references(item, targets, f"{where}.{key}")
    elif isinstance(value, list):
        for number, item in enumerate(value):
            if isinstance(item, (dict, list)):
                rewrite_references(item, targets, f"{where}[{number}]")

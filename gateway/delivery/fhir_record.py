"""Destination adapter for the national shared record (FHIR R4 REST): the canonical bundle as
a transaction request, and the record's answer as a delivery outcome. Pure code.

`transaction_request(bundle, base_url=..., idempotency_key=...)` turns the mapping engine's
`collection` Bundle into `POST {base_url}` with a `transaction` Bundle:
- a resource with an identifier that has both a system and a value is a conditional update
  on the first such identifier (one that is not a sender's own number, if it has one:
  `_business_identifier`), `PUT Type?identifier=system|value`, without its id: the
  record keeps one resource per business identifier under the id it gave it, and R4
  (http.html#cond-update) refuses a conditional update whose id is not the match's (one
  person sent by two hospitals has two ids), or one that would create with the client's id
  where the server does not support update-as-create;
- any other resource is `PUT Type/id` with its deterministic id;
- a Patient a merge retires (linked `replaced-by` a Patient of the request) goes by its own
  identifiers only, never as its survivor, and is left out when all it has is the survivor's
  (`_retirement`);
- fullUrls and references stay `urn:uuid:`: the record resolves them to the ids it stores.
`transaction_request_for_bundles` does the same for several canonical bundles in one request
(entries in the given order; a resource that several carry, under one fullUrl, goes once, as
the last of them has it): the batched delivery of several messages, of one patient or
several, all or nothing at the record;
`transaction_request_for_texts` takes the bundles as stored JSON text (what the outbox holds).

`classify_response(response, request)`:
- 2xx with a `transaction-response` Bundle whose entries are all 2xx, one per entry of the
  `TransactionRequest` it answers: delivered;
- 408, 429 and 5xx: transient (retry later);
- other statuses, and a 2xx that is not such a Bundle: permanent (dead letter).
Reasons are short and made of the status, the OperationOutcome issue codes, element paths and
the peer's diagnostics (which our peer writes without patient data), never of the bundle.
Transport failures (refused connections, timeouts) are classified by the transport.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import msgspec
import orjson

from gateway import fhir_json
from gateway.delivery.outcome import DeliveryOutcome, HttpRequest, HttpResponse
from gateway.local_identifiers import is_local

FHIR_JSON = "application/fhir+json"
TRANSIENT_STATUSES = frozenset({408, 429})
MAX_REASON = 200
# An entry's status "SHALL start with a 3 digit HTTP code" (R4 Bundle.entry.response.status):
# stored is 2xx, not any text that starts with a 2 ("2", "2xx", "2000").
_STORED_STATUS = re.compile(r"2[0-9]{2}(?![0-9])")


@dataclass(frozen=True)
class TransactionRequest(HttpRequest):
    """A transaction's POST, with how many entries it carries: its answer has one per entry."""

    entries: int = 0


def escape_search_value(text: str) -> str:
    """FHIR search escaping (`\\`, `|`, `,`, `$`) then percent-encoding, for one token part."""
    return quote(re.sub(r"([\\|,$])", r"\\\1", text), safe=":/")


def transaction_entry(entry: dict, patients: dict | None = None) -> dict | None:
    """One canonical entry as a transaction entry (see the module docstring); `patients`: the
    request's Patients by fullUrl, for a merge's retired Patient, which is left out (None)
    when it is its survivor's own Patient at the record (`_retirement`)."""
    resource = entry["resource"]
    resource_type = resource["resourceType"]
    full_url = _full_url(entry)
    survivor = patients[reference] if (reference := _survivor_url(resource, patients)) else None
    if survivor is not None and _identifiers(resource):
        shared = _identifiers(survivor)
        identifier = _business_identifier(resource, exclude=shared)
        if identifier is None:
            return None
        url = _retirement(identifier, survivor)
        # The survivor's identifiers stay the survivor's alone: a later update on its CNIE
        # must find one Patient, not the retired registration too (412).
        listed = resource["identifier"] if isinstance(resource["identifier"], list) else [resource["identifier"]]
        resource = {**resource, "identifier": [item for item in listed if not (
            isinstance(item, dict) and (item.get("system"), item.get("value")) in shared)]}
    else:
        identifier = _business_identifier(resource)
        url = _condition(resource_type, identifier) if identifier is not None else f"{resource_type}/{resource['id']}"
    if identifier is not None:
        resource = {key: item for key, item in resource.items() if key != "id"}  # the record names it
    return {"fullUrl": full_url, "resource": resource, "request": {"method": "PUT", "url": url}}


def _full_url(entry: dict) -> str:
    return entry.get("fullUrl") or f"urn:uuid:{entry['resource']['id']}"


def _condition(resource_type: str, identifier: tuple[str, str]) -> str:
    return f"{resource_type}?identifier={escape_search_value(identifier[0])}|{escape_search_value(identifier[1])}"


def _survivor_url(resource: dict, patients: dict | None) -> str | None:
    """The fullUrl of the Patient of the request that replaces `resource` (a merge's or an
    identifier change's retired registration: linked `replaced-by`), if the request has it."""
    links = resource.get("link")
    if not patients or resource.get("resourceType") != "Patient" or not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("type") == "replaced-by":
            other = link.get("other")
            reference = other.get("reference") if isinstance(other, dict) else None
            if isinstance(reference, str) and reference in patients:
                return reference
    return None


def _retirement(identifier: tuple[str, str], survivor: dict) -> str:
    """The condition of a retired Patient. It goes by the first of its identifiers that its
    survivor does not carry (the registration's own number; national first), and never as its
    survivor (`&identifier:not=` the survivor's identifier): that number may also be on the
    survivor's Patient at the record (an A47's old number, still on the Patient its CNIE
    names), which must not be turned inactive and replaced-by itself. It keeps its own
    identifiers only (`transaction_entry`). A retired Patient all of whose identifiers are the
    survivor's is the survivor's own Patient at the record: it is left out
    (`transaction_bundle`)."""
    url = _condition("Patient", identifier)
    kept = _business_identifier(survivor)
    if kept is not None:
        url += f"&identifier:not={escape_search_value(kept[0])}|{escape_search_value(kept[1])}"
    return url


def _identifiers(resource: dict) -> set[tuple[str, str]]:
    return set(_pairs(resource))


def _pairs(resource: dict):
    """The (system, value) of each of its identifiers that has both, in order."""
    identifiers = resource.get("identifier")
    if isinstance(identifiers, dict):
        identifiers = [identifiers]
    for identifier in identifiers or ():
        if isinstance(identifier, dict):
            system, value = identifier.get("system"), identifier.get("value")
            if isinstance(system, str) and system and isinstance(value, str) and value:
                yield system, value


def transaction_bundle(bundles: Sequence[dict]) -> dict:
    canonical = [entry for bundle in bundles for entry in bundle.get("entry", ())]
    patients = {_full_url(entry): entry["resource"]
                for entry in canonical if entry["resource"].get("resourceType") == "Patient"}
    entries, left_out = [], {}  # left_out: fullUrl of a retired Patient -> its survivor's
    for entry in canonical:
        built = transaction_entry(entry, patients)
        if built is not None:
            entries.append(built)
            continue
        left_out[_full_url(entry)] = _survivor_url(entry["resource"], patients)
    if left_out:  # the survivor no longer replaces it; other references are to the survivor
        entries = [_without_links_to(entry, left_out) for entry in entries]
    kept, aliases = _one_per_resource((entry["fullUrl"], entry["request"]["url"], entry) for entry in entries)
    # (a survivor kept under another fullUrl: the references go there)
    aliases = {**{url: aliases.get(survivor, survivor) for url, survivor in left_out.items()}, **aliases}
    if aliases:
        kept = [{**entry, "resource": fhir_json.with_references(entry["resource"], aliases.get)}
                for entry in kept]
    return {"resourceType": "Bundle", "type": "transaction", "entry": kept}


def _without_links_to(entry: dict, left_out: dict) -> dict:
    """`entry` without its Patient's links to the left-out retired Patients."""
    resource = entry["resource"]
    links = resource.get("link")
    if resource.get("resourceType") != "Patient" or not isinstance(links, list):
        return entry
    kept = [link for link in links if not (isinstance(link, dict) and isinstance(link.get("other"), dict)
                                           and link["other"].get("reference") in left_out)]
    if len(kept) == len(links):
        return entry
    resource = {key: value for key, value in resource.items() if key != "link"}
    if kept:
        resource["link"] = kept
    return {**entry, "resource": resource}


def _one_per_resource(entries) -> tuple[list, dict[str, str]]:
    """The entries, each resource once, and the fullUrls dropped for another (old -> kept).

    A later entry takes the place of an earlier one naming the same resource: by its fullUrl
    (ids are deterministic, so the messages of one patient batched together each carry its
    Patient, and a corrected report its report, under one fullUrl; FHIR allows a fullUrl once
    in a bundle, bdl-7), or by its request URL (one person sent by two hospitals has two ids,
    from each hospital's own number, but one `Patient?identifier=urn:ma:cnie|...`): R4 fails a
    transaction two of whose entries resolve to one resource (http 3.1.0.11.2). The later
    message's version is the one that would have stood, as it does between two requests; the
    references to a dropped fullUrl are to be made to the kept one (`aliases`)."""
    kept: list = []
    slot_url: list = []  # the fullUrl of each kept entry
    slots: dict = {}
    aliases: dict[str, str] = {}
    for full_url, url, entry in entries:
        # A fullUrl that is not text (a malformed bundle) names nothing to share.
        name = ("fullUrl", full_url) if isinstance(full_url, str) else object()
        at = slots.get(name)
        if at is None:
            at = slots.get(("url", url))
        if at is None:
            slots[name] = slots[("url", url)] = len(kept)
            kept.append(entry)
            slot_url.append(full_url)
            continue
        kept[at] = entry
        slots[name] = slots[("url", url)] = at
        old = slot_url[at]
        if isinstance(old, str) and isinstance(full_url, str) and old != full_url:
            aliases.pop(full_url, None)  # the kept one again, if it was dropped before
            for dropped, target in aliases.items():
                if target == old:
                    aliases[dropped] = full_url
            aliases[old] = full_url
        slot_url[at] = full_url
    return kept, aliases


def transaction_request(bundle: dict, *, base_url: str, idempotency_key: str) -> HttpRequest:
    """`POST {base_url}` of the canonical `bundle` as a transaction."""
    return transaction_request_for_bundles([bundle], base_url=base_url, idempotency_key=idempotency_key)


def transaction_request_for_bundles(bundles: Sequence[dict], *, base_url: str,
                                    idempotency_key: str) -> HttpRequest:
    """One transaction for several canonical bundles (batched delivery), all or nothing.
    The body is compact UTF-8 JSON and depends only on the bundles and their order, so the
    same deliveries give the same bytes under the same key on every retry."""
    bundle = transaction_bundle(bundles)
    return _request(fhir_json.dumps(bundle), len(bundle["entry"]), base_url, idempotency_key)


def transaction_request_for_texts(bundle_texts: Sequence[str | bytes], *, base_url: str,
                                  idempotency_key: str) -> HttpRequest:
    """`transaction_request_for_bundles` of bundles given as their stored JSON text, with the
    same bytes (stored bundles are orjson's compact text, which is what it writes again).

    Each resource is copied as it is stored (a conditional update's without its id), never
    parsed into objects: msgspec reads of each entry its fullUrl and its resource as raw text,
    and of the resource only its type, id and identifiers. Half the cost of parsing the
    bundles and writing them out again (measured on the benchmark's ORU^R01 bundles, 64 per
    request: 118 -> 62 us per message, on the reactor thread). A bundle that does not read
    that way (no id to name a resource by, a malformed entry) takes the parsing path, which
    builds the same request or fails as it always did."""
    try:
        return _request(*_copied_entries(bundle_texts), base_url, idempotency_key)
    except (msgspec.ValidationError, msgspec.DecodeError, _Unusual):
        pass
    # decimals kept as stored, as the copying path keeps them
    bundles = [fhir_json.loads(text) for text in bundle_texts]
    entries = transaction_bundle(bundles)["entry"]
    return _request(_TRANSACTION_START + fhir_json.dumps(entries)[1:] + b"}", len(entries), base_url,
                    idempotency_key)


_TRANSACTION_START = b'{"resourceType":"Bundle","type":"transaction","entry":['


class _Resource(msgspec.Struct):
    """What a transaction entry needs of a resource (everything else is skipped, unread)."""

    resourceType: str
    id: object = None
    identifier: object = None
    link: object = None


class _Entry(msgspec.Struct):
    resource: msgspec.Raw
    fullUrl: object = None


class _Bundle(msgspec.Struct):
    entry: list[_Entry] = []


_read_bundle = msgspec.json.Decoder(_Bundle).decode
_read_resource = msgspec.json.Decoder(_Resource).decode


class _Unusual(Exception):
    """A bundle for the parsing path (which fails on it, or names its resource otherwise)."""


def _copied_entries(bundle_texts: Sequence[str | bytes]) -> tuple[bytes, int]:
    """The transaction's body, each resource's stored text copied (see above), and its
    number of entries."""
    dumps = orjson.dumps
    copied = []
    for text in bundle_texts:
        for entry in _read_bundle(text).entry:
            raw = entry.resource
            resource = _read_resource(raw)
            resource_id = resource.id
            if resource_id is None:  # `resource['id']` would fail, or print None: the other path
                raise _Unusual
            if resource.link is not None and resource.resourceType == "Patient":
                raise _Unusual  # a merge (rare): the parsing path sees its retired Patient
            identifier = (_business_identifier({"identifier": resource.identifier})
                          if resource.identifier is not None else None)
            if identifier is not None:
                url = _condition(resource.resourceType, identifier)
                raw = _without_id(raw, resource.resourceType, resource_id)
            else:
                url = f"{resource.resourceType}/{resource_id}"
            full_url = entry.fullUrl or f"urn:uuid:{resource_id}"
            if not isinstance(full_url, str):  # a fullUrl that is no text: the other path
                raise _Unusual
            copied.append((full_url, url, (dumps(full_url), raw, dumps(url))))
    entries, aliases = _one_per_resource(copied)
    if aliases:  # a reference's text is its JSON string: the same bytes as the parsing path's
        if any(not target.isascii() or not dropped.isascii() for dropped, target in aliases.items()):
            raise _Unusual  # written escaped or not: let the parsing path decide
        swaps = [(dumps(dropped), dumps(target)) for dropped, target in aliases.items()]
        entries = [(full_url, _swapped(raw, swaps), url) for full_url, raw, url in entries]
    return _TRANSACTION_START + b",".join(
        b"".join((b'{"fullUrl":', full_url, b',"resource":', raw, b',"request":{"method":"PUT","url":', url, b"}}"))
        for full_url, raw, url in entries) + b"]}", len(entries)


def _without_id(raw: bytes, resource_type: str, resource_id: object) -> bytes:
    """A conditional update's resource text without its id, when the text starts
    `{"resourceType":...,"id":...,` as the mapping engine writes it (its identifier follows);
    the parsing path otherwise (an id elsewhere, or written otherwise than orjson does)."""
    dumps = orjson.dumps
    head = b'{"resourceType":' + dumps(resource_type)
    prefix = head + b',"id":' + dumps(resource_id) + b","
    text = bytes(raw)
    if not text.startswith(prefix):
        raise _Unusual
    return head + text[len(prefix) - 1:]


def _swapped(raw: bytes, swaps: list[tuple[bytes, bytes]]) -> bytes:
    """A resource's JSON text with each `"reference":"<dropped>"` made to the kept fullUrl."""
    text = bytes(raw)
    for dropped, target in swaps:
        text = text.replace(b'"reference":' + dropped, b'"reference":' + target)
    return text


def _request(body: bytes, entries: int, base_url: str, idempotency_key: str) -> TransactionRequest:
    return TransactionRequest(
        method="POST",
        url=base_url.rstrip("/"),
        body=body,
        headers={"Content-Type": f"{FHIR_JSON}; charset=utf-8", "Accept": FHIR_JSON,
                 "Idempotency-Key": idempotency_key},
        entries=entries,
    )


def classify_response(response: HttpResponse, request: HttpRequest | None = None) -> DeliveryOutcome:
    """The verdict on the record's answer (module docstring); given the `TransactionRequest`
    it answers, a success must have one entry per entry sent, or some may not be stored."""
    code = response.code
    if 200 <= code < 300:
        expected = request.entries if isinstance(request, TransactionRequest) else None
        return _classify_success(response, expected)
    summary = _outcome_summary(response.body)
    reason = _short(f"HTTP {code}" + (f": {summary}" if summary else ""))
    if code in TRANSIENT_STATUSES or 500 <= code < 600:
        return DeliveryOutcome.transient(reason, response)
    return DeliveryOutcome.permanent(reason, response)


def _business_identifier(resource: dict, exclude: set = frozenset()) -> tuple[str, str] | None:
    """The identifier a conditional update goes by: the first with a system and a value (and
    not in `exclude`), one the gateway minted for a sender's own number
    (gateway.local_identifiers) only when there is no other (the CNIE, not the hospital's
    number, is the one two hospitals share)."""
    local = None
    for pair in _pairs(resource):
        if pair not in exclude:
            if not is_local(pair[0]):
                return pair
            local = local or pair
    return local


def _classify_success(response: HttpResponse, expected: int | None) -> DeliveryOutcome:
    try:
        document = _read_json(response.body)
    except (ValueError, UnicodeDecodeError):
        return DeliveryOutcome.permanent(f"unexpected answer: HTTP {response.code} body is not JSON", response)
    if not isinstance(document, dict) or document.get("resourceType") != "Bundle" \
            or document.get("type") != "transaction-response":
        kind = _shown(document.get("resourceType")) if isinstance(document, dict) else type(document).__name__
        return DeliveryOutcome.permanent(_short(f"unexpected answer: HTTP {response.code} {kind}, "
                                                "not a transaction-response"), response)
    entries = document.get("entry") or []
    if not isinstance(entries, list):
        return DeliveryOutcome.permanent("unexpected answer: entry is not a list", response)
    if expected is not None and len(entries) != expected:
        return DeliveryOutcome.permanent(
            f"unexpected answer: {len(entries)} entries in the transaction-response "
            f"for {expected} sent", response)
    for number, entry in enumerate(entries):
        answer = entry.get("response") if isinstance(entry, dict) else None
        status = answer.get("status") if isinstance(answer, dict) else None
        if not isinstance(status, str) or not _STORED_STATUS.match(status):
            shown = _shown(status, quoted=True)
            return DeliveryOutcome.permanent(_short(f"entry {number} not stored: {shown}"), response)
    return DeliveryOutcome.delivered(f"delivered ({len(entries)} entries)", response)


def _read_json(body: bytes):
    """The peer's JSON; a UTF-8 byte order mark before it is ignored, as RFC 8259 (8.1) lets
    a reader do (orjson refuses it): some servers write one, and the answer is no less theirs."""
    return orjson.loads(body[3:] if body.startswith(b"\xef\xbb\xbf") else body)


def _outcome_summary(body: bytes) -> str:
    """`code at expression: diagnostics; ...` of an OperationOutcome, or "" for other bodies."""
    try:  # orjson, not json: bounded nesting, and no lone surrogate (no storable reason has one)
        document = _read_json(body)
    except ValueError:
        return ""
    if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in document.get("issue") or ():
        if not isinstance(issue, dict):
            continue
        part = _shown(issue.get("code", "unknown"))
        expression = issue.get("expression")
        if isinstance(expression, list) and expression:
            part += f" at {_shown(expression[0])}"
        if isinstance(issue.get("diagnostics"), str):
            part += f": {issue['diagnostics']}"
        parts.append(part)
    return "; ".join(parts)


def _shown(value, quoted: bool = False) -> str:
    """A value of the peer's JSON in a reason: a scalar as text, a list or object by its type
    alone (the text of one nested a thousand deep exhausts Python's recursion limit)."""
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return repr(value) if quoted else str(value)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."

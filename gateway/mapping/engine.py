"""Message maps: which resources a message becomes, and the canonical Bundle they form.

    # mappings/messages/ORU_R01.yaml
    messages: [ORU^R01]
    resources:
      - name: patient
        from: PID                   # the first PID
        map: PID.Patient            # a segment map (mappings/segments/PID.Patient.yaml)
      - each: [ORC, OBR]            # one group per order: ORC (if any), OBR and what follows
        resources:
          - name: report
            from: OBR
            map: OBR.DiagnosticReport
          - name: observation
            each: OBX               # one Observation per OBX of the group
            map: OBX.Observation

A message map may instead say that its types are not translated, by design (`not_translated:
REASON`: acknowledgements, queries: no clinical data to store), or that some of its messages
are not (`not_translated: {when: CONDITION, reason: REASON}` beside `resources:`: an analyzer's
host query in the ASTM map). Either raises NotTranslated with the reason. A message that gives
no resource at all is refused: there is nothing to store, and a Provenance needs a target.

Entry keys: `name` (what `@name` references resolve to), `from`/`each` (a segment, a group of
segments, or a field whose values become resources, such as PV1-7 practitioners), `when`,
`map` (a named map with a resource type, or an inline map with `resource:`), `resources`
(entries evaluated inside this one's scope).

The entries of a message map run as generated code (gateway.mapping.message_codegen: one
function per message map, next to the segment and datatype maps); this module compiles them,
then resolves references and assembles the Provenance and the Bundle.

Ids are deterministic: from the first identifier (system and value, joined by the map's
`identity:` elements: a report's service code), else from the message and the resource's
place in it, so that the same message translated twice, or the same patient sent twice,
gives the same ids and the record is updated instead of duplicated.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from adapters.hl7v2.message import Hl7Message
from gateway.local_identifiers import is_local
from gateway.mapping import codegen, fhir_schema, message_codegen
from gateway.mapping.path import PathError, parse_path
from gateway.mapping.rules import RuleCompiler
from gateway.mapping.runtime import (MissingResource, NotTranslated, Run, TranslationContext,
                                     TranslationError)
from gateway.mapping.source import Located, line_of

# Our namespace for name-based UUIDs (uuid5 of 'urn:ma:hie' in the URL namespace).
ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:ma:hie")
_NAMESPACE_BYTES = ID_NAMESPACE.bytes


try:  # CPython's own SHA-1 is about twice as fast as OpenSSL's for these short inputs
    from _sha1 import sha1 as _sha1
except ImportError:  # pragma: no cover
    _sha1 = hashlib.sha1
# The variant nibble of RFC 4122: the top two bits of octet 8 set to 10.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def name_id(name: str) -> str:
    """str(uuid.uuid5(ID_NAMESPACE, name)), without building UUID objects (hot path): the
    SHA-1 of namespace + name, version nibble 5, variant bits 10, in the 8-4-4-4-12 form."""
    text = _sha1(_NAMESPACE_BYTES + name.encode()).hexdigest()
    return f"{text[:8]}-{text[8:12]}-5{text[13:16]}-{_VARIANT[text[16]]}{text[17:20]}-{text[20:32]}"


ENTRY_KEYS = ("name", "description", "resource", "from", "each", "when", "map", "resources")
MESSAGE_KEYS = ("messages", "description", "resources", "not_translated")
PROVENANCE_SOURCE = "urn:ma:hie:message"


@dataclass
class Entry:
    """One resource entry. `source`, `condition` and `build` are codegen descriptions, written
    out by gateway.mapping.message_codegen."""

    name: str
    resource_type: str
    source: Callable | None  # node, run -> items (each) or item (from)
    many: bool
    group: tuple[str, ...]  # segment names that start a group ('' for field sources)
    condition: Callable | None
    build: Callable
    children: list["Entry"] = field(default_factory=list)
    place: str = ""


@dataclass
class MessageMap:
    name: str
    message_types: tuple[str, ...]
    entries: list[Entry]
    file: str
    function: Callable | None = None  # (None, run): runs the entries (set when the layer is built)
    not_translated: str = ""  # the reason no message of these types is translated
    skip: tuple | None = None  # (condition, reason): the messages that are not translated


def compile_message_map(name: str, document, compiler: RuleCompiler,
                        resource_map: Callable[[str, int, str], tuple[str, Callable] | None]) -> MessageMap | None:
    """Compile a message map document (problems go to the compiler's environment)."""
    if not isinstance(document, dict):
        compiler.problem(0, "", "a message map is a mapping with messages: and resources:")
        return None
    line = document.line_of if isinstance(document, Located) else (lambda key: 0)
    for key in document:
        if key not in MESSAGE_KEYS:
            compiler.problem(line(key), str(key), "unknown key; a message map has " + ", ".join(MESSAGE_KEYS))
    types = document.get("messages")
    if isinstance(types, str):
        types = [types]
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        compiler.problem(line("messages"), "messages", "list the message types handled, as CODE^TRIGGER")
        types = []
    reason, skip = _not_translated(document, compiler, line)
    if reason:
        return MessageMap(name, tuple(types), [], compiler.file, not_translated=reason)
    entries = _entries(document.get("resources"), compiler, resource_map, "resources", line("resources"))
    return MessageMap(name, tuple(types), entries, compiler.file, skip=skip)


def _not_translated(document, compiler: RuleCompiler, line) -> tuple[str, tuple | None]:
    """(reason every message is not translated, or ''; (condition, reason) for some, or None)."""
    spec = document.get("not_translated")
    if spec is None:
        return "", None
    where = line("not_translated")
    if isinstance(spec, str) and spec.strip():
        if "resources" in document:
            compiler.problem(where, "not_translated", "a message map whose messages are not translated has no "
                             "resources (or say which are not: {when: ..., reason: ...})")
        return spec.strip(), None
    if isinstance(spec, dict) and set(spec) == {"when", "reason"} and isinstance(spec["reason"], str) \
            and spec["reason"].strip():
        if "resources" not in document:
            compiler.problem(where, "not_translated", "with when:, resources: maps the other messages")
        condition = compiler._condition(spec["when"], "not_translated.when", where)
        return "", (condition, spec["reason"].strip()) if condition is not None else None
    compiler.problem(where, "not_translated", "give the reason (text), or {when: CONDITION, reason: TEXT}")
    return "", None


def _entries(specs, compiler: RuleCompiler, resource_map, key: str, line: int) -> list[Entry]:
    if not isinstance(specs, list) or not specs:
        compiler.problem(line, key, "resources is a list of entries")
        return []
    entries = []
    for number, spec in enumerate(specs):
        where = f"{key}[{number}]"
        entry = _entry(spec, compiler, resource_map, where, line_of(spec, line))
        if entry is not None:
            entries.append(entry)
    return entries


def _entry(spec, compiler: RuleCompiler, resource_map, key: str, line: int) -> Entry | None:
    if not isinstance(spec, dict):
        compiler.problem(line, key, "an entry is a mapping (name, from/each, map, resources)")
        return None
    for name in spec:
        if name not in ENTRY_KEYS:
            compiler.problem(line, f"{key}.{name}", f"unknown key; an entry has {', '.join(ENTRY_KEYS)}")
    name = spec.get("name", "")
    if name and not (isinstance(name, str) and name.isidentifier() and name.islower()):
        compiler.problem(line, f"{key}.name", "a name is lower_case (it is referenced as @name)")
    if "from" in spec and "each" in spec:
        compiler.problem(line, key, "use from or each, not both")
    many = "each" in spec
    text = spec.get("each", spec.get("from"))
    source, group = None, ()
    if isinstance(text, list):
        group = tuple(str(item) for item in text)
        if not all(_is_segment(item) for item in group):
            compiler.problem(line, key, "a group is a list of segment names, such as [ORC, OBR]")
        if not many:
            compiler.problem(line, key, "a group of segments is read with each:")
    elif text is not None:
        try:
            path = parse_path(text)
        except PathError as error:
            compiler.problem(line, key, str(error))
            return None
        if path.reference or path.relative:
            compiler.problem(line, key, "an entry reads a segment or a field, such as PID or PV1-7")
            return None
        if path.field or path.column:
            source = compiler._source(text, key, line)
        else:
            group = (path.segment,)
    condition = compiler._condition(spec["when"], key, line) if "when" in spec else None
    target = spec.get("map")
    resource_type = spec.get("resource", "")
    if isinstance(target, str):
        found = resource_map(target, line, key)
        if found is None:
            return None
        map_type, build = found
        if resource_type and resource_type != map_type:
            compiler.problem(line, f"{key}.resource", f"map {target!r} builds {map_type}, not {resource_type}")
        resource_type = map_type
    elif isinstance(target, dict):
        if not fhir_schema.is_resource_type(resource_type):
            compiler.problem(line, f"{key}.resource", "an inline map names its FHIR resource type")
            return None
        build = compiler.object(target, resource_type, key, line_of(target, line))
    elif target is None and "resources" in spec:
        build = None
    else:
        compiler.problem(line, f"{key}.map", "map names a segment map (such as PID.Patient) or is inline")
        return None
    if build is not None and not name:
        name = ""
    children = _entries(spec["resources"], compiler, resource_map, f"{key}.resources", line) \
        if "resources" in spec else []
    if children and source is not None:
        compiler.problem(line, f"{key}.resources", "nested resources need a segment or a group source")
    return Entry(name or "", resource_type, source, many, group, condition, build, children,
                 f"{compiler.file}:{line}")


def bind_message_map(message_map: MessageMap, module: codegen.Module) -> None:
    """Declare the message map's function in `module` (gateway.mapping.message_codegen): its
    entries, conditions, field sources and inline maps, written out as one function."""
    message_map.function = message_codegen.message_function(
        module, "message_" + message_map.name, f"{message_map.file} (message map)", message_map.entries,
        place_resource, copy_resource, name_id, message_map.skip)


def resolve_message_map(message_map: MessageMap) -> None:
    """After the module is built: the handle becomes the function."""
    if isinstance(message_map.function, codegen.Handle):
        message_map.function = message_map.function.function


def _is_segment(text: str) -> bool:
    try:
        path = parse_path(text)
    except PathError:
        return False
    return bool(path.segment) and not path.field and not path.column


# -- running -------------------------------------------------------------------------------

def run_message_map(message_map: MessageMap, message: Hl7Message, context: TranslationContext,
                    mapping_version: str, message_type: str = "") -> tuple[dict, list[str]]:
    """Translate one message into the canonical Bundle; returns it and the warnings."""
    if message_map.not_translated:
        raise NotTranslated(f"not translated: {message_map.not_translated}", "MSH[1]-9")
    run = Run(message, context)
    message_map.function(None, run)
    _resolve_references(run)
    resources = run.resources
    if not resources:
        names = list(dict.fromkeys(segment.name for segment in message.segments))
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise TranslationError(f"nothing to translate: no segment of the message gives a resource "
                               f"(segments: {shown})", "MSH[1]")
    # Read only for a sender the registry does not know (the usual one has an INPE).
    sender = "" if context.sender_id else message.value("MSH", 4) or message.value("MSH", 3) or "unknown sender"
    return collection_bundle(resources, context, mapping_version, message_type or "message",
                             "HL7 v2 to FHIR translation", sender), run.warnings


def place_resource(resource: dict, resource_type: str, ordinal: int, run: Run, seen: dict,
                   identity: tuple[str, ...] = ()) -> dict:
    """Give a resource built in place its id; the one already made with that id if any (the
    same practitioner twice in one message: one resource), else the resource, now in the Bundle."""
    resource_id = resource["id"] = _resource_id(resource_type, resource, run.context, ordinal, identity)
    existing = seen.get(resource_id)
    if existing is not None:
        return existing
    seen[resource_id] = resource
    run.resources.append(resource)
    return resource


def copy_resource(body: dict, resource_type: str, ordinal: int, run: Run, seen: dict, pending: int,
                  identity: tuple[str, ...] = ()) -> dict:
    """`place_resource` for a map that writes `id` or `resourceType` itself: the resource is a
    copy of its body (whose values win), and the references made at its top level move to it."""
    resource = {"resourceType": resource_type,
                "id": _resource_id(resource_type, body, run.context, ordinal, identity)}
    resource.update(body)
    references = run.references
    for number in range(pending, len(references)):
        found = references[number]
        if found[0] is body:
            references[number] = (resource, found[1], found[2], found[3])
    existing = seen.get(resource["id"])
    if existing is not None:
        return existing
    seen[resource["id"]] = resource
    run.resources.append(resource)
    return resource


def _resource_id(resource_type: str, body: dict, context: TranslationContext, ordinal: int,
                 identity: tuple[str, ...] = ()) -> str:
    for identifier in body.get("identifier") or ():
        if not isinstance(identifier, dict):
            continue
        value = identifier.get("value")
        if not value:
            continue
        system = identifier.get("system")
        if not system or is_local(system):
            # A local identifier: unique for this sender, assigner and type. The id is made
            # as it was before such identifiers had a system, so that ids stay the same.
            assigner = identifier.get("assigner") or {}
            coding = ((identifier.get("type") or {}).get("coding") or [{}])[0]
            system = "|".join((context.sender_id, assigner.get("display", ""), coding.get("code", "")))
        if identity:  # the map's `identity:` elements join it (a report: its service code)
            value = "|".join([value, *(_identity_text(body.get(name)) for name in identity)])
        return name_id(f"{resource_type}|{system}|{value}")
    key = context.message_key or context.control_id
    return name_id(f"{resource_type}|{key}|{ordinal}")


def _identity_text(value) -> str:
    """The text an `identity:` element adds to an id: a concept by its first coding (system
    and code; display and text may change between two messages about the same thing), else
    its text; a primitive as it is."""
    if value is None or value == "":
        return ""
    if isinstance(value, dict):
        for coding in value.get("coding") or ():
            if isinstance(coding, dict) and coding.get("code"):
                return f"{coding.get('system', '')}^{coding['code']}"
        if "text" in value:
            return str(value["text"])
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if isinstance(value, list):
        return _identity_text(value[0]) if value else ""
    return str(value)


def _resolve_references(run: Run) -> None:
    lists = []  # arrays holding references among other items: flattened once all are known
    for holder, key, reference, scope in run.references:
        targets = scope.named(reference.name) if scope is not None else None
        if holder.__class__ is list:
            lists.append(holder)
        if not targets:
            if reference.required:
                raise MissingResource(f"{reference.key} is required and refers to @{reference.name}, "
                                       "which this message does not give", "", reference.place)
            if holder.__class__ is list:
                holder[key] = None
            else:
                del holder[key]
            continue
        links = [{"reference": "urn:uuid:" + target["id"]} for target in
                 (targets if reference.every else targets[:1])]
        holder[key] = links if reference.as_list or holder.__class__ is list else links[0]
    for holder in lists:
        if any(item is None or item.__class__ is list for item in holder):
            holder[:] = [link for item in holder if item is not None
                         for link in (item if item.__class__ is list else (item,))]


def collection_bundle(resources: list[dict], context: TranslationContext, mapping_version: str,
                      message_type: str, activity: str, sender: str = "unknown sender") -> dict:
    """The canonical Bundle of a translation: `resources`, then the Provenance every translation
    adds, whatever its input (an HL7 v2 message, a submitted FHIR Bundle, a SOAP report), so that
    each input's Bundle says the same things the same way: what was made, when, by which mapping
    version, from which message of which sender. `sender` is shown when the registry gives no
    INPE. Ids come from the message's key: a replay makes the same Bundle."""
    instant = _instant(context.received_at)
    key = context.message_key or context.control_id
    who = {"identifier": {"system": "urn:ma:inpe", "value": context.sender_id}} if context.sender_id \
        else {"display": sender}
    provenance = {
        "resourceType": "Provenance",
        "id": name_id("Provenance|" + key),
        "target": [{"reference": "urn:uuid:" + resource["id"]} for resource in resources],
        "recorded": instant,
        "policy": [f"urn:ma:hie:mappings:{mapping_version}"],
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE", "display": "create"}],
                     "text": activity},
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "author"}]},
                   "who": who}],
        "entity": [{"role": "source",
                    "what": {"identifier": {"system": PROVENANCE_SOURCE, "value": context.control_id},
                             "display": message_type}}],
    }
    return {
        "resourceType": "Bundle",
        "id": name_id("Bundle|" + key),
        "type": "collection",
        "timestamp": instant,
        "entry": [{"fullUrl": "urn:uuid:" + resource["id"], "resource": resource}
                  for resource in (*resources, provenance)],
    }


def _instant(moment: datetime | None) -> str:
    moment = moment or datetime.now(timezone.utc)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

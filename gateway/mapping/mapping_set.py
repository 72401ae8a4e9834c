"""The mapping set: every file under `mappings/`, validated together and compiled.

    mappings/
      messages/ADT_A01.yaml        message maps (which resources a message type becomes)
      segments/PID.Patient.yaml    segment maps (a segment -> one resource)
      datatypes/CX.Identifier.yaml datatype maps (a v2 datatype -> a FHIR datatype)
      tables/*.yaml                code tables
      senders/<FACILITY>/...       a facility's own files, same layout: a file of the same
                                   name replaces the shared one; with `extends: true`, its
                                   `map:` entries (or a table's codes) replace only theirs
      tests/                       golden cases (see gateway.mapping.golden)

A map file has `resource: Patient` (segment maps) or `type: Identifier` (datatype maps),
`map:` (target element -> rule, see gateway.mapping.rules), and optionally `description:`,
`columns:` (field names of a CSV format, in order), `extends:` and, in a resource map,
`identity:` (elements that join the first identifier in the resource's id: a report is its
order number and its service code, since one requisition number can cover several panels).

Loading reads and checks everything, reports every problem at once (MappingErrors), and
gives an immutable set whose `version` is a hash of all the files: the version stored with
every translated message, so that a translation can be traced to the mappings that made it.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from adapters.hl7v2.message import Hl7Message
from gateway.mapping import codegen, fhir_schema
from gateway.mapping.engine import (MessageMap, bind_message_map, compile_message_map, resolve_message_map,
                                    run_message_map)
from gateway.mapping.hl7_reference import check_path
from gateway.mapping.rules import Environment, RuleCompiler
from gateway.mapping.runtime import TranslationContext, TranslationError
from gateway.mapping.source import Located, MappingErrors, Problem, line_of, read_yaml
from gateway.mapping.tables import CodeTable, table_from
from gateway.mapping.transforms import load_all

log = logging.getLogger(__name__)

KINDS = ("messages", "segments", "datatypes", "tables")
MAP_KEYS = ("resource", "type", "description", "map", "columns", "extends", "identity")
# What MSH-9 gives (gateway.translation looks up the type, then CODE^*), an ASTM message or a
# CSV profile.
_MESSAGE_TYPE = re.compile(r"[A-Z][A-Z0-9]{2}(\^(\*|[A-Z0-9]{3}))?|ASTM|CSV\^(\*|[\w-]+)")


@dataclass(frozen=True)
class Translation:
    bundle: dict
    warnings: list[str]
    mapping_version: str
    message_map: str


class _Layer:
    """The compiled maps of one facility (or of everyone: sender '')."""

    def __init__(self, sender: str, documents: dict, tables: dict[str, CodeTable],
                 transforms: dict, problems: list[Problem]):
        self.sender = sender
        self.documents = documents  # (kind, name) -> (document, display)
        self.tables = tables
        self.transforms = transforms
        self.problems = problems
        self.compiled: dict[str, tuple[str, codegen.CallMap] | None] = {}
        self.compiling: dict[str, str] = {}  # the maps being compiled, each using the next: name -> file
        self.messages: dict[str, MessageMap] = {}
        self.module = codegen.Module(sender)

    def build(self) -> None:
        """Generate and compile the layer's code (only for a set without problems)."""
        maps = {id(found): found for found in self.messages.values()}.values()
        for message_map in maps:
            bind_message_map(message_map, self.module)
        self.module.build()
        for message_map in maps:
            resolve_message_map(message_map)

    def compile(self) -> None:
        for (kind, name), (document, display) in sorted(self.documents.items()):
            if kind == "messages":
                compiler = self._compiler(display, document)
                found = compile_message_map(name, document, compiler, self._resource_map(display))
                if found is None:
                    continue
                for message_type in found.message_types:
                    if not _MESSAGE_TYPE.fullmatch(message_type):  # `ORU-R01`, `oru^r01`: never looked up
                        self.problems.append(Problem(display, document.line_of("messages"), "messages",
                                                     f"{message_type!r} is not a message type: write CODE^TRIGGER "
                                                     "(ORU^R01), CODE^* or CODE, ASTM, CSV^profile"))
                        continue
                    other = self.messages.get(message_type)
                    if other is not None and other.name != name:
                        self.problems.append(Problem(display, document.line_of("messages"), "messages",
                                                     f"{message_type} is already mapped by {other.file}"))
                    self.messages[message_type] = found
            elif kind in ("segments", "datatypes"):
                self.named(name, display, 0, "")

    def _compiler(self, display: str, document, depth: int = 0) -> RuleCompiler:
        columns = {}
        if isinstance(document, dict) and isinstance(document.get("columns"), list):
            columns = {str(name): number for number, name in enumerate(document["columns"], 1)}
        return RuleCompiler(Environment(self.transforms, self.tables, self.named, columns, self.problems,
                                        check_path=check_path), display, depth)

    def _resource_map(self, display: str):
        def resource_map(name: str, line: int, key: str):
            found = self.named(name, display, line, key)
            if found is not None and found[0] and not fhir_schema.is_resource_type(found[0]):
                self.problems.append(Problem(display, line, key, f"map {name!r} builds a {found[0]}, not a resource"))
                return None
            return found
        return resource_map

    def named(self, name: str, display: str, line: int, key: str, depth: int = 0):
        """(FHIR type, rule) of the map `name`, compiled once (its rules nested `depth` deep where
        it is first used); None (and a problem) if unknown or if it contains itself."""
        if name in self.compiled:
            return self.compiled[name]
        found = self.documents.get(("segments", name)) or self.documents.get(("datatypes", name))
        if found is None:
            known = sorted(n for (kind, n) in self.documents if kind in ("segments", "datatypes"))
            from gateway.mapping.rules import _suggest
            self.problems.append(Problem(display, line, key, f"no map {name!r}" + _suggest(name, known)))
            return None
        document, file = found
        if not isinstance(document, dict):  # a file that is a list or a single value
            self.problems.append(Problem(file, line_of(document, 1), "",
                                         "a map file is a mapping: resource: (or type:), map: ..."))
            self.compiled[name] = None  # reported once, however many rules name it
            return None
        if name in self.compiling:
            # A map that contains itself, directly or through others: every message using it
            # would recurse without end (a RecursionError per message), so the set is refused.
            names = list(self.compiling)
            cycle = names[names.index(name):]
            files = ", ".join(self.compiling[n] for n in cycle)
            self.problems.append(Problem(display, line, key, f"map cycle {' -> '.join([*cycle, name])} "
                                         f"({files}): a map cannot contain itself"))
            return None
        self.compiling[name] = file
        try:
            type_name = self._type_of(document)
            for extra in document:
                if extra not in MAP_KEYS:
                    self.problems.append(Problem(file, document.line_of(extra), str(extra),
                                                 f"unknown key; a map file has {', '.join(MAP_KEYS)}"))
            if not type_name or not fhir_schema.known_type(type_name):
                self.problems.append(Problem(file, document.line, "resource",
                                             f"name the FHIR type built: resource: or type: (got {type_name!r})"))
                type_name = ""
            compiler = self._compiler(file, document, depth)
            rule = compiler.object(document.get("map"), type_name, "map", document.line_of("map"))
            call = codegen.CallMap(codegen.map_function(self.module, "map_" + name, f"{file} ({type_name})", rule))
            call.identity = self._identity(document, file, type_name)
            call.nesting = compiler.deepest - depth
            self.compiled[name] = (type_name, call)
            return self.compiled[name]
        finally:
            self.compiling.pop(name, None)

    def _identity(self, document, file: str, type_name: str) -> tuple[str, ...]:
        """The `identity:` elements of a resource map, checked: top-level elements of the
        resource, and the map must give an identifier for them to join."""
        names = document.get("identity")
        if names is None:
            return ()
        line = document.line_of("identity")
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            self.problems.append(Problem(file, line, "identity", "list the elements that join the identifier, such as [code]"))
            return ()
        if not type_name or not fhir_schema.is_resource_type(type_name):
            self.problems.append(Problem(file, line, "identity", "identity: belongs to a resource map"))
            return ()
        found = document.get("map")
        if not isinstance(found, dict) or "identifier" not in found:
            self.problems.append(Problem(file, line, "identity",
                                         "the map gives no identifier: its id is its place in the message"))
        for name in names:
            if fhir_schema.element(type_name, name) is None:
                self.problems.append(Problem(file, line, "identity", f"{type_name} has no element {name!r}"))
        return tuple(names)

    @staticmethod
    def _type_of(document) -> str:
        if not isinstance(document, dict):
            return ""
        return str(document.get("resource") or document.get("type") or "")


class MappingSet:
    """Compiled mappings: shared ones, and each facility's overrides."""

    def __init__(self, directory: Path, version: str, layers: dict[str, _Layer], files: int):
        self.directory = directory
        self.version = version
        self._layers = layers
        self.files = files

    @classmethod
    def load(cls, directory: Path | str) -> "MappingSet":
        directory = Path(directory)
        problems: list[Problem] = []
        if not directory.is_dir():
            raise MappingErrors([Problem(str(directory), 0, "", "mapping directory not found")])
        transforms = load_all()
        digest = hashlib.sha256()
        shared = _read_layer(directory, directory, problems, digest)
        senders = {}
        sender_root = directory / "senders"
        if sender_root.is_dir():
            for folder in sorted(p for p in sender_root.iterdir() if p.is_dir()):
                senders[folder.name] = _read_layer(folder, directory, problems, digest)
        base_tables = _tables(shared, {}, problems)
        layers = {"": _Layer("", _documents(shared, {}, problems), base_tables, transforms, problems)}
        for sender, files in senders.items():
            tables = {**base_tables, **_tables(files, base_tables, problems)}
            layers[sender] = _Layer(sender, _documents(shared, files, problems), tables, transforms, problems)
        for layer in layers.values():
            layer.compile()
        if not layers[""].messages and not problems:
            problems.append(Problem(str(directory), 0, "messages", "no message map found"))
        if problems:
            raise MappingErrors(_unique(problems))
        for layer in layers.values():
            layer.build()
        count = sum(len(files) for files in [shared, *senders.values()])
        return cls(directory, "sha256:" + digest.hexdigest()[:12], layers, count)

    def message_types(self, sender: str = "") -> list[str]:
        return sorted(self._layer(sender).messages)

    def message_map(self, message_type: str, sender: str = "") -> MessageMap | None:
        """The map of `message_type` (CODE^TRIGGER), or of every trigger of its code (CODE^*)."""
        messages = self._layer(sender).messages
        return messages.get(message_type) or messages.get(message_type.split("^", 1)[0] + "^*")

    def generated_source(self, sender: str = "") -> str:
        """The Python generated from the mapping files of `sender`'s layer (the shared one by
        default): one function per map, each headed by the file it comes from; for debugging."""
        return self._layer(sender).module.source

    def _layer(self, sender: str) -> _Layer:
        return self._layers.get(sender) or self._layers[""]

    def translate(self, message: Hl7Message, context: TranslationContext,
                  message_type: str | None = None) -> Translation:
        """The canonical Bundle of one tokenized message; TranslationError if it cannot be made
        (NotTranslated, a TranslationError, when the mapping set says the message is not
        translated by design: an acknowledgement, a query)."""
        message_type = message_type or message.message_type
        message_map = self.message_map(message_type, context.mapping_layer or context.sender_id)
        if message_map is None:
            code, _, event = message_type.partition("^")
            site = "; a site-defined (Z) message needs its facility's own map (mappings/senders/<facility>/" \
                "messages/)" if code.startswith("Z") or event.startswith("Z") else ""
            raise TranslationError(f"no mapping for message type {message_type!r}{site}", "MSH[1]-9")
        bundle, warnings = run_message_map(message_map, message, context, self.version, message_type)
        return Translation(bundle, warnings, self.version, message_map.name)


def _read_layer(folder: Path, root: Path, problems: list[Problem], digest) -> dict:
    """(kind, name) -> (document, display path) for one folder of the layout."""
    found = {}
    for kind in KINDS:
        directory = folder / kind
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.yml")):  # never read: a sender's override would not apply
            if not path.name.startswith("."):
                display = str(path.relative_to(root.parent)) if root.parent in path.parents else str(path)
                problems.append(Problem(display, 0, "", "mapping files are named *.yaml; rename it"))
        for path in sorted(directory.glob("*.yaml")):
            if path.name.startswith("."):  # an editor's lock or backup file (.#PID.Patient.yaml)
                continue
            display = str(path.relative_to(root.parent)) if root.parent in path.parents else str(path)
            try:
                data = path.read_bytes()  # once: the version is the hash of what was compiled
            except OSError as error:
                problems.append(Problem(display, 0, "", f"cannot be read: {error}"))
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + data + b"\0")
            before = len(problems)
            document = read_yaml(path, display, problems, data)
            if document is not None:
                found[(kind, path.stem)] = (document, display)
            elif len(problems) == before:
                # Empty (or only comments): left out, it would silently unmap its message types
                # or hide a sender's override behind the shared file.
                problems.append(Problem(display, 0, "", "the file is empty; write its contents or remove it"))
    return found


def _documents(shared: dict, own: dict, problems: list[Problem]) -> dict:
    documents = {key: value for key, value in shared.items() if key[0] != "tables"}
    for key, (document, display) in own.items():
        if key[0] == "tables":
            continue
        base = shared.get(key)
        if isinstance(document, dict) and not isinstance(document.get("extends", False), bool):
            problems.append(Problem(display, document.line_of("extends"), "extends", "extends: is true or false"))
            continue
        if isinstance(document, dict) and document.get("extends"):
            if base is None or not isinstance(base[0], dict):  # missing, or a list or a value
                problems.append(Problem(display, document.line_of("extends"), "extends",
                                        f"there is no shared {key[0]}/{key[1]}.yaml to extend"
                                        + (" (it is not a mapping)" if base else "")))
                continue
            documents[key] = (_extend(base[0], document), display)
        else:
            documents[key] = (document, display)
    return documents


def _extend(base: Located, own: Located) -> Located:
    merged = Located(base)
    merged.file, merged.line, merged.lines = own.file, own.line, {**base.lines, **own.lines}
    for key, value in own.items():
        if key == "map" and isinstance(value, dict) and isinstance(base.get("map"), dict):
            inner = Located({**base["map"], **value})
            inner.file, inner.line = own.file, value.line if isinstance(value, Located) else own.line
            inner.lines = {**getattr(base["map"], "lines", {}), **getattr(value, "lines", {})}
            merged["map"] = inner
        elif key != "extends":
            merged[key] = value
    return merged


def _tables(files: dict, base: dict[str, CodeTable], problems: list[Problem]) -> dict[str, CodeTable]:
    tables = {}
    for (kind, name), (document, display) in files.items():
        if kind == "tables":
            table = table_from(name, document, display, problems, base.get(name))
            if table is not None:
                tables[name] = table
    return tables


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, unique = set(), []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            unique.append(problem)
    return unique

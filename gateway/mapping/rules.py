"""Field rules: the closed vocabulary of mapping files, checked and compiled into generated code.

A rule is a constant (`status: final`), a list of rules (each value collected into an array),
or a mapping with these keys, applied in this order:

    when       a condition (or a list of them, all true): {field: PATH, is: V | in: [..] |
               not_in: [..] | present: true|false}; false: the rule gives nothing
    from       where the value comes from: a path (see gateway.mapping.path)
    each       the same, once per repetition (or per segment): the rule gives an array
    first_of   a list of rules: the first that gives something
    map        build an object: target element -> rule, or the name of a reusable map
               ('CX.Identifier', 'PID.Patient')
    transform  a named Python transform ('datetime', 'date', ...)
    lookup     a code table ('administrative_gender'), with its unmapped policy
    default    the value when the rule gave nothing
    required   true: nothing is an error (with the location)
    data_absent  a DataAbsentReason code ('error'): when the rule's lenient transform (a date or
               time) cannot read the value, FHIR's data-absent-reason takes the element's place

An unreadable value given to a lenient transform (gateway.mapping.transforms: the dates and
times) on a rule that is not `required` leaves the element out with a warning naming the
field and the text; the message is still translated. `required: true` keeps it an error.

Compilation checks every key, path, transform, table and FHIR element, collecting every
problem, and describes each rule as a tree of gateway.mapping.codegen nodes; the mapping set
then generates one Python function per map from them (gateway.mapping.codegen).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gateway.mapping import codegen, fhir_schema
from gateway.mapping.path import Hl7Path, PathError, parse_path
from gateway.mapping.runtime import Reference
from gateway.mapping.source import Located, Problem, line_of
from gateway.mapping.tables import CodeTable
from gateway.mapping.transforms import Transform

VOCABULARY = ("when", "from", "each", "first_of", "map", "transform", "lookup", "default", "required",
              "data_absent")
# FHIR R4 DataAbsentReason (http://terminology.hl7.org/CodeSystem/data-absent-reason).
DATA_ABSENT_REASONS = ("unknown", "asked-unknown", "temp-unknown", "not-asked", "asked-declined", "masked",
                       "not-applicable", "unsupported", "as-text", "error", "not-a-number", "negative-infinity",
                       "positive-infinity", "not-performed", "not-permitted")
CONDITIONS = ("field", "is", "in", "not_in", "present")
# How deep rules may nest, counting the rules of the named maps they use: far beyond any real
# map (the shipped ones reach 8), and low enough that compiling them (about five Python
# frames a level) stays clear of Python's recursion limit.
MAX_NESTING = 100

Rule = codegen.Rule


def is_empty(value) -> bool:
    return value is None or value == "" or value == [] or value == {}


@dataclass
class Environment:
    """What rules may name: transforms, tables, reusable maps (compiled on demand)."""

    transforms: dict[str, Transform]
    tables: dict[str, CodeTable]
    # (name, file, line, key, depth where it is used) -> (type, rule), the rule a CallMap
    named_map: Callable[[str, str, int, str, int], tuple[str, Rule] | None]
    columns: dict[str, int]  # named fields of the file's format (CSV), else {}
    problems: list[Problem]
    # Checks an absolute HL7 path against the HL7 reference: returns a reason or None.
    check_path: Callable[[Hl7Path], str | None] | None = None


class RuleCompiler:
    """Checks the rules of one mapping file and describes them as codegen nodes."""

    def __init__(self, env: Environment, file: str, depth: int = 0):
        self.env = env
        self.file = file
        self.depth = depth  # rules around the one being compiled, from the outermost map on
        self.deepest = depth

    def problem(self, line: int, key: str, message: str) -> None:
        self.env.problems.append(Problem(self.file, line, key, message))

    # -- objects -----------------------------------------------------------------------------

    def object(self, spec, type_name: str, key: str, line: int) -> Rule:
        """A `map:` body: an object of FHIR type `type_name` ('' when unchecked)."""
        if not isinstance(spec, dict):
            self.problem(line, key, "map must be a mapping of target element -> rule, or a map name")
            return codegen.NOTHING
        known = fhir_schema.elements(type_name) if type_name else {}
        fields: list[tuple[str, Rule]] = []
        for target, rule_spec in spec.items():
            where = f"{key}.{target}" if key else str(target)
            target_line = spec.line_of(target) if isinstance(spec, Located) else line
            element = known.get(target) if known else None
            if known and element is None:
                self.problem(target_line, where, f"{type_name} has no element {target!r}"
                             + _suggest(str(target), known))
                continue
            if element is not None and not element.is_list and isinstance(rule_spec, list):
                self.problem(target_line, where, f"{target} holds one value, not a list")
            before = len(self.env.problems)
            rule = self.rule(rule_spec, element, where, target_line)
            if element is not None and element.type_name and len(self.env.problems) == before \
                    and _gives_text(rule):
                # A text where FHIR wants an object (`assigner: {from: 4}`): an invalid resource,
                # or the message failing at the ids with no location.
                self.problem(target_line, where, f"{target} is a {element.type_name}, not a text: "
                             f"map its elements ({{display: {{from: ...}}}} or map: NAME)")
            fields.append((target, rule))
        return codegen.Object(fields)

    # -- rules -------------------------------------------------------------------------------

    def rule(self, spec, element: fhir_schema.Element | None, key: str, line: int) -> Rule:
        # Every nesting (a map, a list, first_of, a named map's rules) passes here: bounded,
        # a file nested too deeply is a problem, not a RecursionError at load or translation.
        if self.depth >= MAX_NESTING:
            self.problem(line, key, f"rules nest more than {MAX_NESTING} levels deep (maps, lists, first_of, "
                         "named maps inside one another): flatten them")
            return codegen.NOTHING
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)
        try:
            many = element.is_list if element else False
            if isinstance(spec, list):
                parts = [self.rule(item, _single(element), f"{key}[{n}]", line_of(item, line))
                         for n, item in enumerate(spec)]
                self._no_data_absent(parts, key, line)
                return codegen.Collect(parts)
            if not isinstance(spec, dict):
                if spec is None or spec == "":
                    self.problem(line, key, "no rule: write a constant, a list or a mapping")
                    return codegen.NOTHING
                if element is not None and element.primitive == "bool" and not isinstance(spec, bool):
                    self.problem(line, key, f"{element.name} is true or false, not {spec!r}")
                elif element is not None and element.primitive == "str" and not isinstance(spec, str):
                    self.problem(line, key, f"{element.name} is text: write {str(spec)!r} in quotes")
                return codegen.Constant(spec, listed=many)
            if not any(name in VOCABULARY for name in spec):
                # An object written directly (`{system: ..., code: {from: 1}}`): an implicit map.
                spec = _implicit_map(spec)
            rule = self._mapping_rule(spec, element, key, line)
            if many and "each" not in spec:
                return codegen.AsList(rule)
            return rule
        finally:
            self.depth -= 1

    def _mapping_rule(self, spec: dict, element, key: str, line: int) -> Rule:
        unknown = [name for name in spec if name not in VOCABULARY]
        for name in unknown:
            self.problem(spec.line_of(name) if isinstance(spec, Located) else line, f"{key}.{name}",
                         f"unknown key; a rule has {', '.join(VOCABULARY)}" + _suggest(str(name), VOCABULARY))
        sources = [name for name in ("from", "each", "first_of") if name in spec]
        if len(sources) > 1:
            self.problem(line, key, f"use one of from, each, first_of (found {', '.join(sources)})")
        type_name = element.type_name if element else ""
        condition = self._condition(spec["when"], key, line) if "when" in spec else None
        required = spec.get("required", False)
        if not isinstance(required, bool):
            self.problem(line, f"{key}.required", "required is true or false")
            required = False
        # A reference FHIR requires (ServiceRequest.subject, Patient.link.other) is required
        # whatever the rule says: without its resource, the resource holding it is invalid.
        reference = self._reference(spec, element, required or bool(element and element.required),
                                    key, f"{self.file}:{line}")
        if reference is not None:
            if element is not None and element.type_name not in ("Reference", "Resource"):
                self.problem(line, key, f"{element.name} is a {element.type_name or element.primitive}, "
                             "not a Reference to a resource (@name)")
            return codegen.ReferenceRule(reference, condition)

        absent = self._data_absent(spec, element, required, key, line)
        fields = _fields_of(spec)
        # The value for one source node.
        after = None if ("map" in spec or "first_of" in spec) else \
            self._after(spec, key, line, required, fields, absent)
        produce = self._produce(spec, type_name, element, key, line, after)
        default = spec.get("default")
        if isinstance(default, (dict, list)):
            default = _plain(default)
        if is_empty(default):
            default = None
        mapping_place = f"{self.file}:{line}"

        if "first_of" in spec:
            options = spec["first_of"]
            if not isinstance(options, list) or not options:
                self.problem(line, f"{key}.first_of", "first_of is a list of rules")
                options = []
            alternatives = [self.rule(option, _single(element), f"{key}.first_of[{n}]", line_of(option, line))
                            for n, option in enumerate(options)]
            self._no_data_absent(alternatives, key, line)
            core: Rule = codegen.FirstOf(alternatives, self._after(spec, key, line, required, fields, absent))
        elif "each" in spec:
            each = self._source(spec["each"], key + ".each", line)
            if each is None:
                return codegen.NOTHING
            core = codegen.Each(each, produce)
        elif "from" in spec:
            source = self._source(spec["from"], key + ".from", line)
            if source is None:
                return codegen.NOTHING
            reader = None
            if "map" not in spec and not (after is not None and after.wants_node):
                reader = self._text_reader(spec["from"])
            if reader is not None:
                core = codegen.FromText(reader, after)
            else:
                core = codegen.FromItem(source, produce)
        else:
            core = produce

        if condition is not None or default is not None or required:
            core = codegen.Guard(condition, core, default, required, key, mapping_place)
        return codegen.DataAbsent(core, absent) if absent else core

    def _data_absent(self, spec: dict, element, required: bool, key: str, line: int) -> str:
        """The rule's data_absent code ('' without one), checked: it stands on a single
        element, beside a lenient transform, without required, lookup or each."""
        if "data_absent" not in spec:
            return ""
        code = spec["data_absent"]
        where = f"{key}.data_absent"
        if code not in DATA_ABSENT_REASONS:
            self.problem(line, where, f"data_absent is a DataAbsentReason code: {', '.join(DATA_ABSENT_REASONS)}"
                         + _suggest(str(code), DATA_ABSENT_REASONS))
            return ""
        transform = self.env.transforms.get(spec.get("transform")) if isinstance(spec.get("transform"), str) else None
        reason = ""
        if transform is None or not transform.lenient:
            lenient = sorted(name for name, found in self.env.transforms.items() if found.lenient)
            reason = f"data_absent goes with a transform that leaves unreadable values out ({', '.join(lenient)})"
        elif required:
            reason = "data_absent and required do not combine: a required value that cannot be read is an error"
        elif "lookup" in spec or "each" in spec or "map" in spec:
            reason = "data_absent stands on one value (no lookup, each or map)"
        elif element is not None and (element.is_list or not element.primitive):
            reason = f"{element.name} is not a single primitive element, whose data-absent-reason goes in `_{element.name}`"
        if reason:
            self.problem(line, where, reason)
            return ""
        return code

    def _no_data_absent(self, parts, key: str, line: int) -> None:
        if any(isinstance(part, codegen.DataAbsent) for part in parts):
            self.problem(line, key, "data_absent stands on an element of a map, not inside a list or first_of")

    def _produce(self, spec: dict, type_name: str, element, key: str, line: int, after) -> Rule:
        """map | transform | text, then lookup (not for first_of, which applies them after)."""
        if "first_of" in spec:
            return codegen.NOTHING
        if "map" in spec:
            target = spec["map"]
            if isinstance(target, str):
                found = self.env.named_map(target, self.file, line, key, self.depth)
                if found is None:
                    return codegen.NOTHING
                map_type, built = found
                # Compiled before (elsewhere, at another depth): its own depth counts here too;
                # once too deep, not counted further (each map above would report it again).
                depth = self.depth + built.nesting
                if depth > MAX_NESTING:
                    self.problem(line, f"{key}.map", f"map {target!r} nests its rules {built.nesting} levels "
                                 f"deep: here that makes {depth}, more than {MAX_NESTING}; flatten them")
                else:
                    self.deepest = max(self.deepest, depth)
                if type_name and map_type and map_type != type_name:
                    self.problem(line, f"{key}.map", f"map {target!r} builds {map_type}, "
                                 f"but {key} is {type_name}")
                elif element is not None and not element.type_name and map_type:
                    # As for an inline map: an object where FHIR wants a primitive.
                    self.problem(line, f"{key}.map", f"map {target!r} builds {map_type}, "
                                 f"but {key} is a {element.primitive}, not an object")
            else:
                if element is not None and not element.type_name:
                    self.problem(line, f"{key}.map", f"{key} is a {element.primitive}, not an object")
                built = self.object(target, type_name, key, line_of(target, line))
            for extra in ("transform", "lookup"):
                if extra in spec:
                    self.problem(line, f"{key}.{extra}", f"{extra} does not combine with map")
            return built
        if after is None:
            # With a source, its text; without one (`{when: .., default: x}`), only the default.
            return codegen.TEXT if "from" in spec or "each" in spec else codegen.NOTHING
        return codegen.Apply(after)

    def _after(self, spec: dict, key: str, line: int, required: bool = False, fields: str = "",
               absent: str = "") -> codegen.After | None:
        """transform then lookup, on a node (or on the value first_of chose); a lenient
        transform on a rule that is not required leaves what it cannot read out."""
        transform = None
        if "transform" in spec:
            name = spec["transform"]
            transform = self.env.transforms.get(name) if isinstance(name, str) else None
            if transform is None:
                self.problem(line, f"{key}.transform", f"no transform {name!r}"
                             + _suggest(str(name), self.env.transforms))
        table = None
        if "lookup" in spec:
            name = spec["lookup"]
            table = self.env.tables.get(name) if isinstance(name, str) else None
            if table is None:
                self.problem(line, f"{key}.lookup", f"no code table {name!r}"
                             + _suggest(str(name), self.env.tables))
        if transform is None and table is None:
            return None
        lenient = transform is not None and transform.lenient and not required
        return codegen.After(transform, table, key, f"{self.file}:{line}", lenient, fields, absent)

    def _reference(self, spec: dict, element, required: bool, key: str, place: str) -> Reference | None:
        for name in ("from", "each"):
            text = spec.get(name)
            if isinstance(text, str) and text.startswith("@"):
                try:
                    path = parse_path(text)
                except PathError:
                    return None  # reported by _source
                many = element.is_list if element else False
                return Reference(path.reference, name == "each", many or name == "each", required, key, place)
        return None

    def _text_reader(self, text):
        """For a field or component path: a reader straight to its decoded text (no Part
        objects), or None when the path reads something else."""
        try:
            path = self._numbered(parse_path(text))
        except PathError:
            return None
        if path.reference or (path.segment and not path.field):
            return None
        if path.relative:
            return codegen.RelativeText(path.component, path.subcomponent)
        return codegen.FieldText(path)

    def _numbered(self, path: Hl7Path) -> Hl7Path:
        """The path with a named column (CSV) replaced by its field number."""
        if not path.column:
            return path
        number = self.env.columns.get(path.column)
        if number is None:
            raise PathError(f"no column {path.column!r} in this format's columns"
                            + _suggest(path.column, self.env.columns))
        return Hl7Path(path.segment, number, path.component, path.subcomponent)

    # -- sources -----------------------------------------------------------------------------

    def _source(self, text, key: str, line: int):
        """What a path reaches (a codegen source), None when the path is wrong (a problem)."""
        try:
            path = self._numbered(parse_path(text))
        except PathError as error:
            self.problem(line, key, str(error))
            return None
        if path.reference:
            if key.endswith(".field"):
                self.problem(line, key, "a condition reads an HL7 path, not a resource")
            return _NO_SOURCE  # a rule with a reference is handled by _reference
        if path.relative:
            return codegen.RelativeSource(path.component, path.subcomponent)
        if self.env.check_path is not None and not self.env.columns:
            reason = self.env.check_path(path)
            if reason:
                self.problem(line, key, reason)
        if not path.field:
            return codegen.SegmentSource(path.segment)
        return codegen.FieldSource(path)

    # -- conditions --------------------------------------------------------------------------

    def _condition(self, spec, key: str, line: int):
        specs = spec if isinstance(spec, list) else [spec]
        tests = []
        for item in specs:
            where = f"{key}.when"
            if isinstance(item, dict) and list(item) == ["any"] and isinstance(item["any"], list):
                options = [self._condition(option, f"{key}.any", line) for option in item["any"]]
                options = [option for option in options if option is not None]
                if options:
                    tests.append(codegen.AnyOf(options))
                continue
            if isinstance(item, dict) and list(item) == ["before"]:
                name = item["before"]
                if isinstance(name, str) and _is_segment_name(name):
                    tests.append(codegen.Before(name))
                else:
                    self.problem(line, f"{where}.before", "before: names a segment, such as ORC")
                continue
            if not isinstance(item, dict) or "field" not in item:
                self.problem(line, where, "a condition is {field: PATH, is|in|not_in|present: ...},"
                             " {before: SEGMENT} or {any: [conditions]}")
                continue
            for name in item:
                if name not in CONDITIONS:
                    self.problem(line, f"{where}.{name}", f"unknown condition key; use {', '.join(CONDITIONS)}")
            wrong = _operand_problems(item)
            for name, reason in wrong:
                self.problem(line, f"{where}.{name}", reason)
            source = self._source(item["field"], where + ".field", line)
            if wrong:
                continue
            if source is None:
                continue
            reader = self._text_reader(item["field"])
            if reader is None:
                # A segment path (`{field: SPM, present: false}`): its name when there is one.
                reader = codegen.SegmentPresent(source.name) if isinstance(source, codegen.SegmentSource) \
                    else _NO_TEXT
            tests.append(_test(reader, item))
        if not tests:
            return None
        return codegen.AllOf(tests)


def _is_segment_name(text: str) -> bool:
    """An HL7 segment name (PID, ZBE) or an ASTM record type (O)."""
    return (len(text) == 3 and text[0].isalpha() and text.isalnum() and text.isupper()) or \
        (len(text) == 1 and text.isalpha() and text.isupper())


class _NoSource:
    """The source of a reference path (`@name`): the rule is a ReferenceRule instead."""

    def emit_first(self, gen, node):
        return "None"

    def emit_loop(self, gen, node, body):
        pass


class _NoText:
    def emit_text(self, gen, node):
        return "''"


_NO_SOURCE = _NoSource()
_NO_TEXT = _NoText()


def _operand_problems(spec: dict) -> list[tuple[str, str]]:
    """What is wrong with a condition's test: `in: ST` would test each letter, `is: [ST]`
    never hold, `present: 'false'` be true, and of `is` and `in` together one be ignored."""
    found = [name for name in CONDITIONS[1:] if name in spec]
    if len(found) > 1:
        return [(found[1], f"a condition has one test; {' and '.join(found)} found (use any: or a list)")]
    name = found[0] if found else ""
    value = spec.get(name)
    if name == "is" and (value is None or isinstance(value, (dict, list))):
        return [(name, "is: compares with one value (for several, in: [A, B])")]
    if name in ("in", "not_in") and not (isinstance(value, list) and
                                         all(not isinstance(item, (dict, list)) for item in value)):
        return [(name, f"{name}: is a list of values, such as [ST, TX]")]
    if name == "present" and not isinstance(value, bool):
        return [(name, "present: is true or false")]
    return []


def _test(reader, spec: dict) -> codegen.Test:
    """A condition on the text the reader gives."""
    if "is" in spec:
        return codegen.Test(reader, "is", str(spec["is"]))
    if "in" in spec:
        return codegen.Test(reader, "in", frozenset(str(value) for value in spec["in"] or ()))
    if "not_in" in spec:
        return codegen.Test(reader, "not_in", frozenset(str(value) for value in spec["not_in"] or ()))
    return codegen.Test(reader, "present", bool(spec.get("present", True)))


# -- small helpers -------------------------------------------------------------------------

def _fields_of(spec: dict) -> str:
    """The field(s) a rule reads, as a warning names them: 'OBX-14', 'OBX-14 or OBR-7',
    'component 7' (in a datatype map)."""
    def one(text) -> str:
        text = str(text)
        return f"component {text}" if text[:1].isdigit() else text
    if "first_of" in spec and isinstance(spec["first_of"], list):
        found = [one(option.get("from") or option.get("each")) for option in spec["first_of"]
                 if isinstance(option, dict) and (option.get("from") or option.get("each"))]
        return " or ".join(found)
    source = spec.get("from") or spec.get("each")
    return one(source) if source else ""


def _implicit_map(spec: dict) -> dict:
    wrapped = Located({"map": spec})
    wrapped.file = getattr(spec, "file", "")
    wrapped.line = getattr(spec, "line", 0)
    wrapped.lines = {"map": wrapped.line}
    return wrapped


def _gives_text(rule) -> bool:
    """Whether a rule gives only text or a constant scalar, never an object: the text read
    as it is (no map, transform or table), a scalar constant or default."""
    if isinstance(rule, (codegen.AsList, codegen.DataAbsent)):
        return _gives_text(rule.inner)
    if isinstance(rule, codegen.Collect):  # `identifier: [false, {each: PID-3, ...}]`: one text is enough
        return any(_gives_text(part) for part in rule.parts)
    if isinstance(rule, codegen.Guard):
        scalar = rule.default is not None and not isinstance(rule.default, (dict, list))
        if rule.core is codegen.NOTHING:
            return scalar
        return _gives_text(rule.core) and (rule.default is None or scalar)
    if isinstance(rule, codegen.Constant):
        return not isinstance(rule.value, (dict, list))
    if isinstance(rule, codegen.FromText):
        return rule.after is None
    if isinstance(rule, (codegen.Each, codegen.FromItem)):
        return rule.produce is codegen.TEXT
    return False


def _single(element):
    if element is None or not element.is_list:
        return element
    return fhir_schema.Element(element.name, False, element.type_name, element.primitive)


def _plain(value):
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _suggest(word: str, choices) -> str:
    import difflib
    close = difflib.get_close_matches(word, [str(choice) for choice in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

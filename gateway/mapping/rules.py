"""Field rules: the closed vocabulary of mapping files, compiled into Python closures.

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

Compilation checks every key, path, transform, table and FHIR element, collecting every
problem; evaluation is then a tree of closures `rule(value, run) -> result or None`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from adapters.hl7v2.message import Segment
from gateway.mapping import fhir_schema
from gateway.mapping.path import Hl7Path, PathError, parse_path
from gateway.mapping.runtime import COMPONENT, FIELD, SUBCOMPONENT, Part, Run, TranslationError
from gateway.mapping.source import Located, LocatedList, Problem, line_of
from gateway.mapping.tables import CodeTable
from gateway.mapping.transforms import Transform

VOCABULARY = ("when", "from", "each", "first_of", "map", "transform", "lookup", "default", "required")
CONDITIONS = ("field", "is", "in", "not_in", "present")

Rule = Callable[[object, Run], object]


def is_empty(value) -> bool:
    return value is None or value == "" or value == [] or value == {}


def text_of(node, run: Run) -> str:
    """The decoded text of a value: its first component's first subcomponent."""
    if node.__class__ is not Part:
        return ""
    raw = node.raw
    separators = run.separators
    if node.level == FIELD and separators.component in raw:
        raw = raw.split(separators.component, 1)[0]
    if node.level != SUBCOMPONENT and separators.subcomponent and separators.subcomponent in raw:
        raw = raw.split(separators.subcomponent, 1)[0]
    if separators.escape in raw:
        return separators.text(raw)
    return raw


class Reference:
    """A pending reference to resources named by the message map, filled in at the end:
    the nearest one (`from: '@x'`) or all of them (`each: '@x'`), as one Reference or a list."""

    __slots__ = ("name", "every", "as_list")

    def __init__(self, name: str, every: bool, as_list: bool):
        self.name = name
        self.every = every
        self.as_list = as_list


@dataclass
class Environment:
    """What rules may name: transforms, tables, reusable maps (compiled on demand)."""

    transforms: dict[str, Transform]
    tables: dict[str, CodeTable]
    named_map: Callable[[str, str, int, str], tuple[str, Rule] | None]  # name -> (type, rule)
    columns: dict[str, int]  # named fields of the file's format (CSV), else {}
    problems: list[Problem]
    # Checks an absolute HL7 path against the HL7 reference: returns a reason or None.
    check_path: Callable[[Hl7Path], str | None] | None = None


class RuleCompiler:
    """Compiles the rules of one mapping file."""

    def __init__(self, env: Environment, file: str):
        self.env = env
        self.file = file

    def problem(self, line: int, key: str, message: str) -> None:
        self.env.problems.append(Problem(self.file, line, key, message))

    # -- objects -----------------------------------------------------------------------------

    def object(self, spec, type_name: str, key: str, line: int) -> Rule:
        """A `map:` body: an object of FHIR type `type_name` ('' when unchecked)."""
        if not isinstance(spec, dict):
            self.problem(line, key, "map must be a mapping of target element -> rule, or a map name")
            return _nothing
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
            fields.append((target, self.rule(rule_spec, element, where, target_line)))
        fields_tuple = tuple(fields)

        def build(node, run: Run):
            result = {}
            for target, rule in fields_tuple:
                value = rule(node, run)
                if value is None:
                    continue
                if value.__class__ is Reference:
                    run.references.append((result, target, value, run.scope))
                result[target] = value  # a Reference is a placeholder, replaced at the end
            return result or None
        return build

    # -- rules -------------------------------------------------------------------------------

    def rule(self, spec, element: fhir_schema.Element | None, key: str, line: int) -> Rule:
        many = element.is_list if element else False
        if isinstance(spec, list):
            parts = [self.rule(item, _single(element), f"{key}[{n}]", line_of(item, line))
                     for n, item in enumerate(spec)]
            return _collect(parts)
        if not isinstance(spec, dict):
            if spec is None or spec == "":
                self.problem(line, key, "no rule: write a constant, a list or a mapping")
                return _nothing
            constant = [spec] if many else spec
            return lambda node, run: constant
        if not any(name in VOCABULARY for name in spec):
            # An object written directly (`{system: ..., code: {from: 1}}`): an implicit map.
            spec = _implicit_map(spec)
        rule = self._mapping_rule(spec, element, key, line)
        if many and "each" not in spec:
            return _as_list(rule)
        return rule

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
        reference = self._reference(spec, element)
        if reference is not None:
            if condition is None:
                return lambda node, run: reference
            return lambda node, run: reference if condition(node, run) else None

        # The value for one source node.
        after = None if ("map" in spec or "first_of" in spec) else self._after(spec, key, line)
        produce = self._produce(spec, type_name, element, key, line, after)
        required = spec.get("required", False)
        if not isinstance(required, bool):
            self.problem(line, f"{key}.required", "required is true or false")
            required = False
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
            after = self._after(spec, key, line)

            def first_of(node, run):
                value = None
                for alternative in alternatives:
                    value = alternative(node, run)
                    if not is_empty(value):
                        break
                return after(value, node, run) if after else value
            core = first_of
        elif "each" in spec:
            each = self._source(spec["each"], key + ".each", line, many=True)
            if each is None:
                return _nothing
            segments = _names_segment(spec["each"])

            def iterate(node, run):
                results = []
                for item in each(node, run):
                    value = _within(produce, item, run) if segments else produce(item, run)
                    if value is None:
                        continue
                    if value.__class__ is list:
                        results.extend(value)
                    else:
                        results.append(value)
                return results or None
            core = iterate
        elif "from" in spec:
            source = self._source(spec["from"], key + ".from", line, many=False)
            if source is None:
                return _nothing

            reader = None
            if "map" not in spec and not (after is not None and after.wants_node):
                reader = self._text_reader(spec["from"])
            if reader is not None and after is None:  # the most common rule: a field's text
                def single(node, run):
                    return reader(node, run) or None
            elif reader is not None:
                def single(node, run):
                    text = reader(node, run)
                    return after(text, node, run) if text else None
            elif _names_segment(spec["from"]):
                def single(node, run):
                    item = source(node, run)
                    return None if item is None else _within(produce, item, run)
            else:
                def single(node, run):
                    item = source(node, run)
                    return None if item is None else produce(item, run)
            core = single
        else:
            core = produce

        if condition is None and default is None and not required:
            return core

        def rule(node, run):
            if condition is not None and not condition(node, run):
                return None
            value = core(node, run)
            if value is None:
                if default is not None:
                    return default
                if required:
                    raise TranslationError(f"{key} is required and has no value",
                                           _location(run), mapping_place)
            return value
        return rule

    def _produce(self, spec: dict, type_name: str, element, key: str, line: int, after) -> Rule:
        """map | transform | text, then lookup (not for first_of, which applies them after)."""
        if "first_of" in spec:
            return _nothing
        if "map" in spec:
            target = spec["map"]
            if isinstance(target, str):
                found = self.env.named_map(target, self.file, line, key)
                if found is None:
                    return _nothing
                map_type, built = found
                if type_name and map_type and map_type != type_name:
                    self.problem(line, f"{key}.map", f"map {target!r} builds {map_type}, "
                                 f"but {key} is {type_name}")
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
            return _text if "from" in spec or "each" in spec else _nothing

        def produce(node, run):
            return after(None, node, run)
        return produce

    def _after(self, spec: dict, key: str, line: int):
        """transform then lookup, on a node (or on the value first_of chose)."""
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
        place = f"{self.file}:{line}"
        function = transform.function if transform else None
        wants_node = transform.node if transform else False

        def after(value, node, run):
            if value is None:
                value = node if wants_node else text_of(node, run)
                if value == "":
                    return None
            elif wants_node:
                value = Part(str(value), SUBCOMPONENT)
            if function is not None:
                try:
                    value = function(value, run)
                except TranslationError:
                    raise
                except (ValueError, TypeError, KeyError) as error:
                    raise TranslationError(f"{key}: {error}", _location(run), place) from None
                if is_empty(value):
                    return None
            if table is not None:
                try:
                    value = table.translate(value)
                except KeyError as error:
                    raise TranslationError(f"{key}: {error.args[0]}", _location(run), place) from None
                if is_empty(value):
                    return None
            return value
        after.wants_node = wants_node
        return after

    def _reference(self, spec: dict, element) -> Reference | None:
        for name in ("from", "each"):
            text = spec.get(name)
            if isinstance(text, str) and text.startswith("@"):
                try:
                    path = parse_path(text)
                except PathError:
                    return None  # reported by _source
                many = element.is_list if element else False
                return Reference(path.reference, name == "each", many or name == "each")
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
        return _relative_text(path) if path.relative else _field_text(path)

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

    def _source(self, text, key: str, line: int, many: bool):
        """An accessor: node, run -> node (from) or iterable of nodes (each)."""
        try:
            path = self._numbered(parse_path(text))
        except PathError as error:
            self.problem(line, key, str(error))
            return None
        if path.reference:
            if key.endswith(".field"):
                self.problem(line, key, "a condition reads an HL7 path, not a resource")
            return lambda node, run: None  # a rule with a reference is handled by _reference
        if path.relative:
            return _relative(path, many)
        if self.env.check_path is not None and not self.env.columns:
            reason = self.env.check_path(path)
            if reason:
                self.problem(line, key, reason)
        if not path.field:
            return _segments(path.segment, many)
        return _field(path, many)

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
                    tests.append(lambda node, run, options=options: any(o(node, run) for o in options))
                continue
            if not isinstance(item, dict) or "field" not in item:
                self.problem(line, where, "a condition is {field: PATH, is|in|not_in|present: ...}"
                             " or {any: [conditions]}")
                continue
            for name in item:
                if name not in CONDITIONS:
                    self.problem(line, f"{where}.{name}", f"unknown condition key; use {', '.join(CONDITIONS)}")
            source = self._source(item["field"], where + ".field", line, many=False)
            if source is None:
                continue
            reader = self._text_reader(item["field"])
            if reader is None:
                def reader(node, run, source=source):
                    return _value(source, node, run)
            tests.append(_test(reader, item))
        if not tests:
            return None

        def condition(node, run):
            for test in tests:
                if not test(node, run):
                    return False
            return True
        return condition


# -- accessors -----------------------------------------------------------------------------

def _descend(part: Part, number: int, run: Run) -> Part | None:
    """Component (or subcomponent) `number` of a value, one level down."""
    level = part.level
    if level == SUBCOMPONENT:
        return part if number == 1 else None
    pieces = part.pieces
    if pieces is None:
        separators = run.separators
        separator = separators.component if level == FIELD else separators.subcomponent
        raw = part.raw
        pieces = raw.split(separator) if separator and separator in raw else (raw,)
        part.pieces = pieces
    if number > len(pieces):
        return None
    piece = pieces[number - 1]
    return Part(piece, level + 1) if piece else None


def _leaf(raw: str, level: int, separators) -> str:
    """The decoded text of a raw value at `level`: first component, first subcomponent."""
    if level == FIELD:
        component = separators.component
        if component in raw:
            raw = raw.split(component, 1)[0]
    if level != SUBCOMPONENT:
        subcomponent = separators.subcomponent
        if subcomponent and subcomponent in raw:
            raw = raw.split(subcomponent, 1)[0]
    if separators.escape in raw:
        return separators.text(raw)
    return raw


def _pick(raw: str, separator: str, number: int) -> str:
    if separator and separator in raw:
        pieces = raw.split(separator)
        return pieces[number - 1] if number <= len(pieces) else ""
    return raw if number == 1 else ""


def _field_text(path: Hl7Path):
    name, number, component, subcomponent = path.segment, path.field, path.component, path.subcomponent
    unsplit = name == "MSH" and number <= 2

    def read(node, run) -> str:
        segment = run.segment
        if segment is None or segment.name != name:
            segment = run.find(name)[0]
            if segment is None:
                return ""
        fields = segment.fields
        if number >= len(fields):
            return ""
        raw = fields[number]
        if not raw or unsplit:
            return raw
        separators = run.separators
        repetition = separators.repetition
        if repetition in raw:
            raw = raw.split(repetition, 1)[0]
        if not component:
            return _leaf(raw, FIELD, separators)
        raw = _pick(raw, separators.component, component)
        if subcomponent:
            return _leaf(_pick(raw, separators.subcomponent, subcomponent), SUBCOMPONENT, separators)
        return _leaf(raw, COMPONENT, separators)
    return read


def _relative_text(path: Hl7Path):
    component, subcomponent = path.component, path.subcomponent

    def read(node, run) -> str:
        if node.__class__ is not Part:
            return ""
        level = node.level
        if level == SUBCOMPONENT:
            return _leaf(node.raw, SUBCOMPONENT, run.separators) if component == 1 and subcomponent <= 1 else ""
        pieces = node.pieces
        separators = run.separators
        if pieces is None:
            separator = separators.component if level == FIELD else separators.subcomponent
            raw = node.raw
            pieces = raw.split(separator) if separator and separator in raw else (raw,)
            node.pieces = pieces
        if component > len(pieces):
            return ""
        raw = pieces[component - 1]
        if not raw:
            return raw
        if level == FIELD:  # raw is a component
            if subcomponent:
                raw = _pick(raw, separators.subcomponent, subcomponent)
            elif separators.subcomponent and separators.subcomponent in raw:
                raw = raw.split(separators.subcomponent, 1)[0]
        elif subcomponent > 1:  # raw is already a subcomponent
            return ""
        return separators.text(raw) if separators.escape in raw else raw
    return read


def _relative(path: Hl7Path, many: bool):
    component, subcomponent = path.component, path.subcomponent

    def access(node, run):
        if node.__class__ is not Part:
            return None
        part = _descend(node, component, run)
        if part is not None and subcomponent:
            part = _descend(part, subcomponent, run) if part.level == COMPONENT else (
                part if subcomponent == 1 else None)
        return part
    if many:
        return lambda node, run: [part] if (part := access(node, run)) is not None else []
    return access


def _segments(name: str, many: bool):
    if many:
        def each(node, run):
            return [_SegmentAt(segment, at) for segment, at in run.following(name)]
        return each

    def first(node, run):
        segment, at = run.find(name)
        return _SegmentAt(segment, at) if segment is not None else None
    return first


class _SegmentAt:
    """A segment reached by a path; evaluating under it makes it the current segment."""

    __slots__ = ("segment", "position")

    def __init__(self, segment: Segment, position: int):
        self.segment = segment
        self.position = position


def _field(path: Hl7Path, many: bool):
    name, number, component, subcomponent = path.segment, path.field, path.component, path.subcomponent
    unsplit = name == "MSH" and number <= 2

    def parts(run):
        segment, _ = run.find(name)
        if segment is None:
            return ()
        if unsplit:
            raw = segment.field(number)
            return [Part(raw, SUBCOMPONENT)] if raw else ()
        key = (segment, number)
        found = run.parts.get(key)
        if found is None:  # one set of Parts per field, so their splits are shared
            found = [Part(raw, FIELD) for raw in segment.repetitions(number, run.separators.repetition)]
            run.parts[key] = found
        return found

    def narrow(part, run):
        if component:
            part = _descend(part, component, run)
            if part is not None and subcomponent:
                part = _descend(part, subcomponent, run)
        return part

    if many:
        def each(node, run):
            found = []
            for raw in parts(run):
                part = narrow(raw, run)
                if part is not None:
                    found.append(part)
            return found
        return each

    def first(node, run):
        for raw in parts(run):
            return narrow(raw, run)
        return None
    return first


def _within(produce: Rule, item, run: Run):
    """Evaluate under `item`; a segment becomes the current one for absolute paths."""
    if item.__class__ is not _SegmentAt:
        return produce(item, run)
    saved = run.segment, run.position
    run.segment, run.position = item.segment, item.position
    try:
        return produce(item.segment, run)
    finally:
        run.segment, run.position = saved


def _test(read, spec: dict):
    """A condition on the text `read(node, run)` gives."""
    if "is" in spec:
        expected = str(spec["is"])
        return lambda node, run: read(node, run) == expected
    if "in" in spec:
        allowed = frozenset(str(value) for value in spec["in"] or ())
        return lambda node, run: read(node, run) in allowed
    if "not_in" in spec:
        refused = frozenset(str(value) for value in spec["not_in"] or ())
        return lambda node, run: read(node, run) not in refused
    present = bool(spec.get("present", True))
    return lambda node, run: (read(node, run) != "") is present


def _value(source, node, run) -> str:
    found = source(node, run)
    if found is None:
        return ""
    if found.__class__ is _SegmentAt:
        return found.segment.name
    return text_of(found, run)


# -- small combinators ---------------------------------------------------------------------

def _names_segment(text) -> bool:
    """Whether a source path reads segments (under which absolute paths change segment)."""
    try:
        path = parse_path(text)
    except PathError:
        return False
    return bool(path.segment) and not path.field and not path.column


def _implicit_map(spec: dict) -> dict:
    wrapped = Located({"map": spec})
    wrapped.file = getattr(spec, "file", "")
    wrapped.line = getattr(spec, "line", 0)
    wrapped.lines = {"map": wrapped.line}
    return wrapped


def _nothing(node, run):
    return None


def _text(node, run):
    text = text_of(node, run)
    return text or None


def _as_list(rule: Rule) -> Rule:
    def listed(node, run):
        value = rule(node, run)
        if value is None or value.__class__ is list or value.__class__ is Reference:
            return value
        return [value]
    return listed


def _collect(parts: list[Rule]) -> Rule:
    def collect(node, run):
        results = []
        for part in parts:
            value = part(node, run)
            if value is None:
                continue
            if value.__class__ is list:
                results.extend(value)
            elif value.__class__ is Reference:  # resolved in place at the end
                run.references.append((results, len(results), value, run.scope))
                results.append(value)
            elif not is_empty(value):
                results.append(value)
        return results or None
    return collect


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


def _location(run: Run) -> str:
    segment = run.segment
    if segment is None:
        return ""
    sequence = sum(1 for at in run.message.positions(segment.name) if at <= run.position)
    return f"{segment.name}[{sequence}]"


def _suggest(word: str, choices) -> str:
    import difflib
    close = difflib.get_close_matches(word, [str(choice) for choice in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

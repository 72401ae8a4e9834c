"""Mapping rules as generated Python: one function per map, compiled once at load.

The rule compiler (gateway.mapping.rules) checks a mapping file and describes each rule as a
small tree of the nodes below; this module turns those trees into Python source, one function
per segment or datatype map (`map_OBX_Observation(node, run)`), per inline resource map of a
message map, and per entry condition or field source, and compiles the whole layer with
`compile()` once. In the generated code:

  - HL7 paths are index operations on the tokenizer's cached splits (`fields[11]`, then the
    repetition, component and subcomponent splits inline, escapes decoded at the leaf);
  - a segment and a field's text read twice in the same block (a `when` on PID-15, then
    `from: PID-15`) are read once; `when` conditions are `if`s; constant FHIR keys and
    constant values are literals (`{'system': '...', 'code': 'FILL'}`);
  - transforms and code tables are globals of the generated module, called inside a
    try/except that turns their ValueError into a TranslationError naming the mapping file,
    line and key, and the HL7 location (`OBX[3]`), as the rule-by-rule engine did.

The result of every rule is the same as before, down to key order: the golden cases prove it.
The source of a layer is kept (`Module.source`) and registered with linecache under the name
`<mappings LAYER>`, so that a traceback through generated code shows the generated line and
its comment naming the mapping file and line.
"""
from __future__ import annotations

import linecache
from contextlib import contextmanager, nullcontext
from typing import Callable

from adapters.hl7v2.message import Segment
from gateway.mapping import code_cache, runtime
from gateway.mapping.path import Hl7Path
from gateway.mapping.runtime import Part, Reference, TranslationError
from gateway.mapping.source import MappingErrors, Problem

_LITERALS = (str, int, float, bool, type(None))
# Compiled code by source text: a reload (or a test) that finds the same files generates the
# same source and skips compile(), the larger part of the generation cost. Code objects are
# immutable; each build runs them in its own namespace with its own constants.
_COMPILED: dict[tuple[str, str], object] = {}
_COMPILED_MAX = 16


class Handle:
    """A generated function, known by name before the module is built."""

    __slots__ = ("name", "function", "rule", "comment", "variants")

    def __init__(self, name: str, rule: "Rule | None" = None, comment: str = ""):
        self.name = name
        self.function: Callable | None = None
        self.rule = rule  # a map's rule, for variants specialised to the value's level
        self.comment = comment
        self.variants: dict[int, str] = {}


class Module:
    """The generated functions of one layer of the mapping set (shared or one facility's)."""

    def __init__(self, label: str):
        self.label = label
        self.filename = f"<mappings {label or 'shared'}>"
        self._bodies: list[tuple[Handle, str, Callable[["Gen"], None]]] = []
        self._names: set[str] = set()
        self._constants: dict[int, tuple[str, object]] = {}
        self.namespace: dict = {
            "__name__": "gateway.mapping.generated", "Part": Part, "Reference": Reference, "Segment": Segment,
            "TranslationError": TranslationError, "EMPTY": runtime.EMPTY, "text_of": runtime.text_of,
            "descend": runtime.descend, "field_parts": runtime.field_parts,
            "unsplit_parts": runtime.unsplit_parts, "relative_part": runtime.relative_part,
            "location": runtime.location, "before_first": runtime.before_first,
            "unreadable": runtime.unreadable, "UNREADABLE": runtime.UNREADABLE,
        }
        self.source = ""

    def name(self, base: str) -> str:
        """A fresh function name made of `base` ('map_CX_Identifier'), in ASCII: Python reads
        '²' or an Arabic presentation form in a name as another character, or refuses it."""
        clean = "".join(char if char.isascii() and char.isalnum() else "_" for char in base)
        name, number = clean, 1
        while name in self._names:
            number += 1
            name = f"{clean}_{number}"
        self._names.add(name)
        return name

    def function(self, base: str, comment: str, body: Callable[["Gen"], None], rule=None) -> Handle:
        """Declare a function `(node, run)`; `body(gen)` writes its statements when built."""
        handle = Handle(self.name(base), rule, comment)
        self._bodies.append((handle, comment, body))
        return handle

    def variant(self, handle: Handle, level: int, resource_type: str = "") -> str:
        """The name of `handle`'s map specialised to a Part of `level` (0: any value), and with
        `resource_type`, to building the resource itself (see Object.emit); made on first use."""
        key = (level, resource_type) if resource_type else level
        name = handle.variants.get(key)
        if name is None:
            suffix = f"{level}" + (f"_{resource_type}" if resource_type else "")
            name = handle.variants[key] = self.name(f"{handle.name}__{suffix}")
            rule = handle.rule

            def body(gen: Gen) -> None:
                if level:
                    gen.levels["node"] = level
                out = gen.new("result")
                if resource_type:
                    rule.emit(gen, "node", out, resource_type)
                else:
                    rule.emit(gen, "node", out)
                gen.emit(f"return {out}")
            what = f"for a Part of level {level}" if level else "for any value"
            if resource_type:
                what += f", as the {resource_type} itself"
            self._bodies.append((Handle(name), f"{handle.comment}, {what}", body))
        return name

    def constant(self, value) -> str:
        """The global name bound to `value` (the same object every time: shared, never copied)."""
        found = self._constants.get(id(value))
        if found is None:
            found = (f"K{len(self._constants) + 1}", value)
            self._constants[id(value)] = found
            self.namespace[found[0]] = value
        return found[0]

    def build(self) -> dict:
        """Generate, compile and run the source; every Handle gets its function."""
        chunks = [comment_line(f"Generated from the mapping files ({self.label or 'shared layer'}); "
                               "see gateway.mapping.codegen.") + "\n"]
        starts = []  # (first line, comment) of each function, to name the file Python refuses
        line = 3  # after the header and the blank line that joins it
        done = 0
        while done < len(self._bodies):  # variants are declared while bodies are written
            handle, comment, body = self._bodies[done]
            done += 1
            gen = Gen(self)
            body(gen)
            chunk = gen.function_source(handle.name, comment)
            starts.append((line, comment))
            line += chunk.count("\n") + 1
            chunks.append(chunk)
        self.source = "\n".join(chunks)
        key = (self.filename, self.source)
        code = _COMPILED.get(key)
        if code is None:
            try:
                code = code_cache.compiled(self.source, self.filename)
            except (SyntaxError, RecursionError) as error:
                raise _too_deep(error, starts) from None
            if len(_COMPILED) >= _COMPILED_MAX:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = code
        exec(code, self.namespace)
        linecache.cache[self.filename] = (len(self.source), None, self.source.splitlines(True), self.filename)
        for handle, _, _ in self._bodies:
            handle.function = self.namespace[handle.name]
        return self.namespace


class Gen:
    """Writes the body of one generated function, with block-scoped caches of what was read."""

    def __init__(self, module: Module):
        self.module = module
        self.lines: list[str] = []
        self.depth = 1
        self.count = 0
        self.seps = False  # the body reads separators: unpack run.seps first
        self.levels: dict[str, int] = {}  # variables known to hold a Part of this level
        # One cache per open block, valid in the block and those nested in it; a barrier (the
        # body of a segment `each`/`from`) hides the absolute reads made outside it.
        self.scopes: list[tuple[dict, bool]] = [({}, False)]

    def new(self, prefix: str = "v") -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def emit(self, text: str) -> None:
        self.lines.append("    " * self.depth + text)

    @contextmanager
    def block(self, header: str, barrier: bool = False):
        self.emit(header)
        self.depth += 1
        self.scopes.append(({}, barrier))
        start = len(self.lines)
        try:
            yield
        finally:
            if len(self.lines) == start:
                self.emit("pass")
            self.scopes.pop()
            self.depth -= 1

    def cached(self, key: tuple, absolute: bool):
        for cache, barrier in reversed(self.scopes):
            if key in cache:
                return cache[key]
            if barrier and absolute:
                return None
        return None

    def remember(self, key: tuple, value) -> None:
        self.scopes[-1][0][key] = value

    def lit(self, value) -> str:
        """A literal for a constant (plain scalars), else the global bound to it."""
        if value.__class__ in _LITERALS:
            return repr(value)
        return self.module.constant(value)

    def use_seps(self) -> None:
        self.seps = True

    def function_source(self, name: str, comment: str) -> str:
        head = [f"def {name}(node, run):"]
        if comment:
            head.insert(0, comment_line(comment))
        if self.seps:
            head.append("    sr, sc, ss, se, unescape = run.seps")
        return "\n".join(head + self.lines) + "\n"


def comment_line(text: str) -> str:
    """A one-line comment of the generated source saying `text` (a file's name, which may
    hold any character): a line break in it (CR, LF, form feed, U+2028) would end the
    comment and make the rest of the name code."""
    return "# " + "".join(char if char.isprintable() else " " for char in text)


def _too_deep(error: BaseException, starts: list[tuple[int, str]]):
    """The MappingErrors for generated code Python refuses (a hundred levels of indentation:
    a first_of or a `when` list of a hundred; twenty loops inside one another: `each` in
    `each`), naming the map whose function it is."""
    line = getattr(error, "lineno", None) or 0
    where = next((comment for start, comment in reversed(starts) if start <= line), "") if line else ""
    reason = getattr(error, "msg", "") or type(error).__name__
    return MappingErrors([Problem(where or "mappings", 0, "", f"the rules nest too deeply to be compiled "
                                  f"({reason}): split them into named maps")])


# -- reading text ----------------------------------------------------------------------------

def segment_var(gen: Gen, name: str) -> str:
    """The variable holding the segment `name` nearest to where the mapping stands (or None)."""
    key = ("segment", name)
    found = gen.cached(key, absolute=True)
    if found:
        return found
    var = gen.new("s")
    gen.emit(f"{var} = run.segment")
    with gen.block(f"if {var} is None or {var}.name != {name!r}:"):
        gen.emit(f"{var} = run.find({name!r})[0]")
    gen.remember(key, var)
    return var


def fields_var(gen: Gen, name: str) -> str:
    key = ("fields", name)
    found = gen.cached(key, absolute=True)
    if found:
        return found
    segment = segment_var(gen, name)
    var = gen.new("f")
    gen.emit(f"{var} = {segment}.fields if {segment} is not None else ()")
    gen.remember(key, var)
    return var


def _emit_pick(gen: Gen, var: str, separator: str, number: int, check_empty: bool) -> None:
    """var = piece `number` of var split on `separator` ('' when absent)."""
    guard = f"{separator} and {separator} in {var}" if check_empty else f"{separator} in {var}"
    if number == 1:
        gen.emit(f"if {guard}: {var} = {var}.split({separator}, 1)[0]")
        return
    pieces = gen.new("p")
    with gen.block(f"if {guard}:"):
        gen.emit(f"{pieces} = {var}.split({separator})")
        gen.emit(f"{var} = {pieces}[{number - 1}] if len({pieces}) > {number - 1} else ''")
    with gen.block("else:"):
        gen.emit(f"{var} = ''")


class FieldText:
    """The decoded text of an absolute path SEG-F[.C[.S]]: first repetition, first component
    and subcomponent unless numbered (as the rule-by-rule reader did)."""

    def __init__(self, path: Hl7Path):
        self.path = path

    def emit_text(self, gen: Gen, node: str) -> str:
        path = self.path
        key = ("text", path.segment, path.field, path.component, path.subcomponent)
        found = gen.cached(key, absolute=True)
        if found:
            return found
        fields = fields_var(gen, path.segment)
        var = gen.new("t")
        number = path.field
        gen.emit(f"{var} = {fields}[{number}] if len({fields}) > {number} else ''")
        if not (path.segment == "MSH" and number <= 2):
            gen.use_seps()
            with gen.block(f"if {var}:"):
                gen.emit(f"if sr in {var}: {var} = {var}.split(sr, 1)[0]")
                if not path.component:
                    gen.emit(f"if sc in {var}: {var} = {var}.split(sc, 1)[0]")
                    gen.emit(f"if ss and ss in {var}: {var} = {var}.split(ss, 1)[0]")
                else:
                    _emit_pick(gen, var, "sc", path.component, check_empty=False)
                    if path.subcomponent:
                        _emit_pick(gen, var, "ss", path.subcomponent, check_empty=True)
                    else:
                        gen.emit(f"if ss and ss in {var}: {var} = {var}.split(ss, 1)[0]")
                gen.emit(f"if se in {var}: {var} = unescape({var})")
        gen.remember(key, var)
        return var


def _pieces(gen: Gen, node: str) -> tuple[str, str]:
    """(level, pieces) variables of the value `node`: level 0 when it is not a Part; pieces
    split one level down (kept on the Part, shared with `descend`)."""
    key = ("pieces", node)
    found = gen.cached(key, absolute=False)
    if found:
        return found
    gen.use_seps()
    known = gen.levels.get(node)
    if known in (1, 2):  # a Part of a known level, not yet split
        pieces, raw = gen.new("pc"), gen.new("w")
        separator = "sc" if known == 1 else "ss"
        gen.emit(f"{pieces} = {node}.pieces")
        with gen.block(f"if {pieces} is None:"):
            gen.emit(f"{raw} = {node}.raw")
            test = f"{separator} in {raw}" if known == 1 else f"{separator} and {separator} in {raw}"
            gen.emit(f"{pieces} = {node}.pieces = {raw}.split({separator}) if {test} else ({raw},)")
        gen.remember(key, (str(known), pieces))
        return str(known), pieces
    level, pieces = gen.new("lv"), gen.new("pc")
    gen.emit(f"{pieces} = None")
    with gen.block(f"if {node}.__class__ is Part:"):
        gen.emit(f"{level} = {node}.level")
        with gen.block(f"if {level} != 3:"):
            gen.emit(f"{pieces} = {node}.pieces")
            with gen.block(f"if {pieces} is None:"):
                raw, separator = gen.new("w"), gen.new("x")
                gen.emit(f"{raw} = {node}.raw")
                gen.emit(f"{separator} = sc if {level} == 1 else ss")
                gen.emit(f"{pieces} = {raw}.split({separator}) if {separator} and {separator} in {raw} "
                         f"else ({raw},)")
                gen.emit(f"{node}.pieces = {pieces}")
    with gen.block("else:"):
        gen.emit(f"{level} = 0")
    gen.remember(key, (level, pieces))
    return level, pieces


class RelativeText:
    """The decoded text of a relative path C[.S] of the value being mapped."""

    def __init__(self, component: int, subcomponent: int):
        self.component = component
        self.subcomponent = subcomponent

    def emit_text(self, gen: Gen, node: str) -> str:
        component, subcomponent = self.component, self.subcomponent
        key = ("relative", node, component, subcomponent)
        found = gen.cached(key, absolute=False)
        if found:
            return found
        if gen.levels.get(node) == 3:  # a subcomponent: itself, or nothing
            var = gen.new("t")
            if component == 1 and subcomponent <= 1:
                gen.use_seps()
                gen.emit(f"{var} = {node}.raw")
                gen.emit(f"if se in {var}: {var} = unescape({var})")
            else:
                gen.emit(f"{var} = ''")
            gen.remember(key, var)
            return var
        level, pieces = _pieces(gen, node)
        var = gen.new("t")
        if level in ("1", "2"):  # known statically
            gen.emit(f"{var} = {pieces}[{component - 1}] if len({pieces}) > {component - 1} else ''")
            with gen.block(f"if {var}:"):
                if subcomponent:
                    if level == "1":
                        _emit_pick(gen, var, "ss", subcomponent, check_empty=True)
                    elif subcomponent > 1:
                        gen.emit(f"{var} = ''")
                elif level == "1":
                    gen.emit(f"if ss and ss in {var}: {var} = {var}.split(ss, 1)[0]")
                gen.emit(f"if se in {var}: {var} = unescape({var})")
            gen.remember(key, var)
            return var
        with gen.block(f"if {level} == 1 or {level} == 2:"):
            gen.emit(f"{var} = {pieces}[{component - 1}] if len({pieces}) > {component - 1} else ''")
            with gen.block(f"if {var}:"):
                if subcomponent:
                    with gen.block(f"if {level} == 1:"):
                        _emit_pick(gen, var, "ss", subcomponent, check_empty=True)
                    if subcomponent > 1:
                        with gen.block("else:"):
                            gen.emit(f"{var} = ''")
                else:
                    gen.emit(f"if {level} == 1 and ss and ss in {var}: {var} = {var}.split(ss, 1)[0]")
                gen.emit(f"if se in {var}: {var} = unescape({var})")
        with gen.block(f"elif {level} == 3:"):
            if component == 1 and subcomponent <= 1:
                gen.emit(f"{var} = {node}.raw")
                gen.emit(f"if se in {var}: {var} = unescape({var})")
            else:
                gen.emit(f"{var} = ''")
        with gen.block("else:"):
            gen.emit(f"{var} = ''")
        gen.remember(key, var)
        return var


class SegmentPresent:
    """A condition's text for a segment path (`{field: SPM, present: false}`): its name, or ''."""

    def __init__(self, name: str):
        self.name = name

    def emit_text(self, gen: Gen, node: str) -> str:
        segment = segment_var(gen, self.name)
        return f"({self.name!r} if {segment} is not None else '')"


# -- sources: what `from` and `each` reach ---------------------------------------------------

class FieldSource:
    """SEG-F[.C[.S]] as Parts: the first repetition (from) or every one (each)."""

    def __init__(self, path: Hl7Path):
        self.path = path

    # Fields 1 and 2 may be unsplit (MSH-1, MSH-2, ASTM H-1, H-2): read through the segment,
    # which knows; any other field is split here, one Part per repetition.

    def _parts(self, gen: Gen) -> str:
        path = self.path
        segment = segment_var(gen, path.segment)
        var = gen.new("ps")
        gen.emit(f"{var} = field_parts({segment}, {path.field}, run) if {segment} is not None else ()")
        return var

    def _raw(self, gen: Gen) -> str:
        fields = fields_var(gen, self.path.segment)
        var = gen.new("w")
        number = self.path.field
        gen.emit(f"{var} = {fields}[{number}] if len({fields}) > {number} else ''")
        gen.use_seps()
        return var

    def _narrow(self, gen: Gen, var: str) -> None:
        path = self.path
        if path.component:
            gen.emit(f"{var} = descend({var}, {path.component}, run)")
            if path.subcomponent:
                gen.emit(f"if {var} is not None: {var} = descend({var}, {path.subcomponent}, run)")

    def _level(self) -> int:
        path = self.path
        return 3 if path.subcomponent else 2 if path.component else 1

    def emit_first(self, gen: Gen, node: str) -> str:
        var = gen.new("n")
        if self.path.field > 2:
            raw = self._raw(gen)
            gen.emit(f"{var} = Part({raw}.split(sr, 1)[0] if sr in {raw} else {raw}, 1) if {raw} else None")
        else:
            parts = self._parts(gen)
            gen.emit(f"{var} = {parts}[0] if {parts} else None")
        if self.path.component:
            with gen.block(f"if {var} is not None:"):
                self._narrow(gen, var)
        if self.path.field > 2:
            gen.levels[var] = self._level()
        return var

    def emit_loop(self, gen: Gen, node: str, body: Callable[[str], None]) -> None:
        var = gen.new("n")
        if self.path.field > 2:
            raw = self._raw(gen)
            repetition = gen.new("w")
            block = gen.block(f"for {repetition} in ({raw}.split(sr) if sr in {raw} else ({raw},)) "
                              f"if {raw} else ():")
        else:
            block = gen.block(f"for {var} in {self._parts(gen)}:")
        with block:
            if self.path.field > 2:
                gen.emit(f"{var} = Part({repetition}, 1)")
                gen.levels[var] = self._level()
            if self.path.component:
                self._narrow(gen, var)
                with gen.block(f"if {var} is not None:"):
                    body(var)
            else:
                body(var)


class RelativeSource:
    """C[.S] of the value being mapped, as a Part (each: that one value, if any)."""

    def __init__(self, component: int, subcomponent: int):
        self.component = component
        self.subcomponent = subcomponent

    def emit_first(self, gen: Gen, node: str) -> str:
        var = gen.new("n")
        gen.emit(f"{var} = relative_part({node}, {self.component}, {self.subcomponent}, run)")
        return var

    def emit_loop(self, gen: Gen, node: str, body: Callable[[str], None]) -> None:
        var = self.emit_first(gen, node)
        with gen.block(f"if {var} is not None:"):
            body(var)


class SegmentSource:
    """Segments: the nearest one (from) or the run of them after the current one (each);
    mapping under a segment makes it the current one for absolute paths."""

    def __init__(self, name: str):
        self.name = name

    def emit_first(self, gen: Gen, node: str) -> tuple[str, str]:
        segment, at = gen.new("s"), gen.new("at")
        gen.emit(f"{segment}, {at} = run.find({self.name!r})")
        return segment, at

    def emit_within(self, gen: Gen, segment: str, at: str, body: Callable[[str], None]) -> None:
        saved_segment, saved_at = gen.new("ss"), gen.new("sp")
        gen.emit(f"{saved_segment} = run.segment; {saved_at} = run.position")
        gen.emit(f"run.segment = {segment}; run.position = {at}")
        with gen.block("try:", barrier=True):
            body(segment)
        with gen.block("finally:"):
            gen.emit(f"run.segment = {saved_segment}; run.position = {saved_at}")

    def emit_loop(self, gen: Gen, node: str, body: Callable[[str], None]) -> None:
        segment, at = gen.new("s"), gen.new("at")
        saved_segment, saved_at = gen.new("ss"), gen.new("sp")
        gen.emit(f"{saved_segment} = run.segment; {saved_at} = run.position")
        with gen.block("try:"):
            with gen.block(f"for {segment}, {at} in run.following({self.name!r}):", barrier=True):
                gen.emit(f"run.segment = {segment}; run.position = {at}")
                body(segment)
        with gen.block("finally:"):
            gen.emit(f"run.segment = {saved_segment}; run.position = {saved_at}")


# -- conditions ------------------------------------------------------------------------------

class Test:
    """One `when` test on a text: is, in, not_in, present."""

    def __init__(self, reader, operator: str, operand):
        self.reader = reader
        self.operator = operator
        # str, frozenset or bool. A code is compared as code tables compare it (and as the
        # OBX-2 guards read it): without surrounding blanks and whatever its case, so that a
        # padded 'CWE ' or a sender's 'cnie' is the code the map names, not silently another.
        if isinstance(operand, str):
            operand = operand.strip().upper()
        elif isinstance(operand, frozenset):
            operand = frozenset(str(value).strip().upper() for value in operand)
        self.operand = operand

    def emit_test(self, gen: Gen, node: str) -> str:
        text = self.reader.emit_text(gen, node)
        if self.operator == "is":
            return f"{text}.strip().upper() == {self.operand!r}"
        if self.operator == "in":
            return f"{text}.strip().upper() in {gen.module.constant(self.operand)}"
        if self.operator == "not_in":
            return f"{text}.strip().upper() not in {gen.module.constant(self.operand)}"
        # Blanks only (' ') are no value: a map guarded by `present` must not build an
        # element (a Coding, an Encounter.location) that then has nothing FHIR requires in it.
        return f"{text}.strip() != ''" if self.operand else f"{text}.strip() == ''"


class Before:
    """`{before: ORC}`: the current segment comes before the message's first ORC (or none)."""

    def __init__(self, name: str):
        self.name = name

    def emit_test(self, gen: Gen, node: str) -> str:
        return f"before_first(run, {self.name!r})"


class AllOf:
    """Every test true (a `when` list); short-circuits as written."""

    def __init__(self, tests: list):
        self.tests = tests

    def emit_test(self, gen: Gen, node: str) -> str:
        if len(self.tests) == 1:
            return self.tests[0].emit_test(gen, node)
        result = gen.new("c")
        gen.emit(f"{result} = False")
        opened = []
        for test in self.tests:
            block = gen.block(f"if {test.emit_test(gen, node)}:")
            block.__enter__()
            opened.append(block)
        gen.emit(f"{result} = True")
        for block in reversed(opened):
            block.__exit__(None, None, None)
        return result


class AnyOf:
    """At least one condition true (`{any: [...]}`)."""

    def __init__(self, options: list):
        self.options = options

    def emit_test(self, gen: Gen, node: str) -> str:
        result = gen.new("c")
        gen.emit(f"{result} = {self.options[0].emit_test(gen, node)}")
        for option in self.options[1:]:
            with gen.block(f"if not {result}:"):
                gen.emit(f"{result} = {option.emit_test(gen, node)}")
        return result


# -- rules -----------------------------------------------------------------------------------
# Each rule writes code that sets `out` to its value, or None for nothing. `kind` says what
# that value can be, so that its consumer checks only what it must: 'one' (neither a list nor
# a Reference), 'list', 'ref' (a Reference), 'val' (a list or not, never a Reference: what a
# transform or a table gives), 'any'.

def _merge(*kinds: str) -> str:
    """The kind of a value that is one of `kinds`: a mix of single values and lists that
    are never References is 'val'."""
    found = set(kinds)
    if len(found) == 1:
        return kinds[0]
    return "val" if found <= {"one", "list", "val"} else "any"


def _add(gen: Gen, kind: str, value: str, holder: str, collect: bool) -> None:
    """Append a rule's value to the array `holder` (a list rule, or `each`)."""
    if kind == "one":
        gen.emit(f"if {value} is not None: {holder}.append({value})")
    elif kind == "list":
        gen.emit(f"if {value} is not None: {holder}.extend({value})")
    elif kind == "ref" and collect:
        with gen.block(f"if {value} is not None:"):
            gen.emit(f"run.references.append(({holder}, len({holder}), {value}, run.scope))")
            gen.emit(f"{holder}.append({value})")
    elif kind == "val" or not collect:
        with gen.block(f"if {value} is not None:"):
            gen.emit(f"if {value}.__class__ is list: {holder}.extend({value})")
            gen.emit(f"else: {holder}.append({value})")
    else:
        with gen.block(f"if {value} is not None:"):
            with gen.block(f"if {value}.__class__ is list:"):
                gen.emit(f"{holder}.extend({value})")
            if collect:
                with gen.block(f"elif {value}.__class__ is Reference:"):
                    gen.emit(f"run.references.append(({holder}, len({holder}), {value}, run.scope))")
                    gen.emit(f"{holder}.append({value})")
            with gen.block("else:"):
                gen.emit(f"{holder}.append({value})")


class Rule:
    kind = "any"

    def emit(self, gen: Gen, node: str, out: str) -> None:
        raise NotImplementedError


class Nothing(Rule):
    kind = "one"

    def emit(self, gen, node, out):
        gen.emit(f"{out} = None")


NOTHING = Nothing()


class Constant(Rule):
    def __init__(self, value, listed: bool):
        self.value = value
        self.listed = listed
        self.kind = "list" if listed else "one"

    def literal(self, gen: Gen) -> str:
        text = gen.lit(self.value)
        return f"[{text}]" if self.listed else text

    def emit(self, gen, node, out):
        gen.emit(f"{out} = {self.literal(gen)}")


class ReferenceRule(Rule):
    """`from: '@name'` / `each: '@name'`: a placeholder the engine resolves at the end."""

    kind = "ref"

    def __init__(self, reference: Reference, condition):
        self.reference = reference
        self.condition = condition

    def emit(self, gen, node, out):
        name = gen.module.constant(self.reference)
        if self.condition is None:
            gen.emit(f"{out} = {name}")
        else:
            test = self.condition.emit_test(gen, node)
            gen.emit(f"{out} = {name} if {test} else None")


class Collect(Rule):
    """A list of rules: every value, in order, in one array."""

    kind = "list"

    def __init__(self, parts: list[Rule]):
        self.parts = parts

    def emit(self, gen, node, out):
        holder = gen.new("a")
        gen.emit(f"{holder} = []")
        for part in self.parts:
            value = gen.new()
            part.emit(gen, node, value)
            _add(gen, part.kind, value, holder, collect=True)
        gen.emit(f"{out} = {holder} or None")


class AsList(Rule):
    """A rule for an array element: a single value becomes a one-item array."""

    def __init__(self, inner: Rule):
        self.inner = inner
        self.kind = {"ref": "ref", "one": "list", "list": "list", "val": "list"}.get(inner.kind, "any")

    def emit(self, gen, node, out):
        self.inner.emit(gen, node, out)
        if self.inner.kind == "one":
            gen.emit(f"if {out} is not None: {out} = [{out}]")
        elif self.inner.kind == "val":
            gen.emit(f"if {out} is not None and {out}.__class__ is not list: {out} = [{out}]")
        elif self.inner.kind == "any":
            gen.emit(f"if {out} is not None and {out}.__class__ is not list "
                     f"and {out}.__class__ is not Reference: {out} = [{out}]")


class Guard(Rule):
    """`when`, then the rule, then `default` or `required`."""

    def __init__(self, condition, core: Rule, default, required: bool, key: str, place: str):
        self.condition = condition
        self.core = core
        self.default = default
        self.required = required
        self.key = key
        self.place = place
        if default is None:
            self.kind = core.kind
        else:
            self.kind = _merge(core.kind, "list" if default.__class__ is list else "one")

    def emit(self, gen, node, out):
        if self.condition is not None:
            block = gen.block(f"if {self.condition.emit_test(gen, node)}:")
        else:
            block = nullcontext()
        with block:
            self.core.emit(gen, node, out)
            if self.default is not None:
                gen.emit(f"if {out} is None: {out} = {gen.lit(self.default)}")
            elif self.required:
                with gen.block(f"if {out} is None:"):
                    gen.emit(f"raise TranslationError({self.key + ' is required and has no value'!r}, "
                             f"location(run), {self.place!r})")
        if self.condition is not None:
            with gen.block("else:"):
                gen.emit(f"{out} = None")


class After:
    """`transform` then `lookup`, on a text, on the value itself (node transforms), or on
    what `first_of` chose.

    `lenient` (a lenient transform on a rule that is not required): a value the transform
    cannot read (ValueError) is left out with a warning naming `fields`, instead of failing
    the message; with `absent` (the rule's data_absent code) the value is UNREADABLE, which the
    map holding the element turns into a data-absent-reason (see DataAbsent)."""

    def __init__(self, transform, table, key: str, place: str, lenient: bool = False,
                 fields: str = "", absent: str = ""):
        self.function = transform.function if transform else None
        self.wants_node = transform.node if transform else False
        self.guard = getattr(transform, "guard", None) if transform else None
        self.table = table
        self.key = key
        self.place = place
        self.lenient = lenient and self.function is not None
        self.fields = fields
        self.absent = absent

    def emit(self, gen: Gen, value: str | None, node: str, out: str, text: bool = False) -> None:
        """`value`: None (the rule reads the node), a variable holding a non-empty text
        (`text`), or a variable holding what first_of chose (None or a value)."""
        guard = None
        if value is None:
            if self.wants_node:
                gen.emit(f"{out} = {node}")
                if self.guard is not None:  # the transform's own test on the segment, read once
                    guard = _guard_test(gen, node, self.guard)
            else:
                gen.emit(f"{out} = text_of({node}, run)")
                guard = out
        elif text:
            if out != value:
                gen.emit(f"{out} = {value}")
        elif self.wants_node:
            gen.emit(f"{out} = Part(str({value}), 3) if {value} is not None else {node}")
        else:
            gen.emit(f"{out} = {value} if {value} is not None else text_of({node}, run)")
            guard = f"{out} != ''"
        with gen.block(f"if {guard}:") if guard else nullcontext():
            if self.function is not None:
                function = gen.module.constant(self.function)
                with gen.block("try:"):
                    gen.emit(f"{out} = {function}({out}, run)")
                with gen.block("except TranslationError:"):
                    gen.emit("raise")
                if self.lenient:  # an optional value it cannot read: left out, with a warning
                    with gen.block("except ValueError as error:"):
                        gen.emit(f"{out} = unreadable(run, error, {self.fields!r}, {self.key!r}, "
                                 f"{self.absent!r})")
                with gen.block("except (ValueError, TypeError, KeyError) as error:"):
                    gen.emit(f"raise TranslationError({self.key + ': '!r} + format(error), location(run), "
                             f"{self.place!r}) from None")
                if self.absent:
                    gen.emit(f"if {out} is not UNREADABLE and {out} in EMPTY: {out} = None")
                else:
                    gen.emit(f"if {out} in EMPTY: {out} = None")
            if self.table is not None:
                translate = gen.module.constant(self.table.translate)
                # A text looked up as written (codes are kept stripped): the dict, then the rules.
                direct = self.function is None and not self.wants_node and all(
                    code.__class__ is str and code == code.strip() for code in self.table.codes)
                with gen.block(f"if {out} is not None:") if self.function is not None else nullcontext():
                    # A table whose values are all something: a code found as written needs
                    # no emptiness check, only what the table's policy gives.
                    filled = direct and not any(value in runtime.EMPTY for value in self.table.codes.values())
                    if direct:
                        found = gen.new("k")
                        gen.emit(f"{found} = {gen.module.constant(self.table.codes)}.get({out})")
                        with gen.block(f"if {found} is not None:"):
                            gen.emit(f"{out} = {found}")
                        block = gen.block("else:")
                    else:
                        block = nullcontext()
                    with block:
                        with gen.block("try:"):
                            gen.emit(f"{out} = {translate}({out})")
                        with gen.block("except KeyError as error:"):
                            gen.emit(f"raise TranslationError({self.key + ': '!r} + format(error.args[0]), "
                                     f"location(run), {self.place!r}) from None")
                        if filled:
                            gen.emit(f"if {out} in EMPTY: {out} = None")
                    if not filled:
                        gen.emit(f"if {out} in EMPTY: {out} = None")
        if guard:
            with gen.block("else:"):
                gen.emit(f"{out} = None")


def _guard_test(gen: Gen, node: str, guard) -> str:
    """The test of a transform's FieldGuard on `node`: true when the transform may give
    something (or `node` is not a segment: the transform decides). The field is read once per
    node and block, for every transform that guards on it."""
    key = ("guard field", node, guard.field)
    var = gen.cached(key, absolute=False)
    if var is None:
        var = gen.new("g")
        fields = gen.new("gf")
        with gen.block(f"if {node}.__class__ is Segment:"):
            gen.emit(f"{fields} = {node}.fields")
            gen.emit(f"{var} = {fields}[{guard.field}].strip().upper() if len({fields}) > {guard.field} else ''")
        with gen.block("else:"):
            gen.emit(f"{var} = None")
        gen.remember(key, var)
    operator = "in" if guard.inside else "not in"
    return f"{var} is None or {var} {operator} {gen.module.constant(guard.values)}"


class FirstOf(Rule):
    """The first alternative that gives something, then transform/lookup on it."""

    def __init__(self, alternatives: list[Rule], after: After | None):
        self.alternatives = alternatives
        self.after = after
        self.kind = "val" if after is not None else _merge(*(a.kind for a in alternatives)) \
            if alternatives else "one"

    def emit(self, gen, node, out):
        chosen = gen.new() if self.after is not None else out
        if not self.alternatives:
            gen.emit(f"{chosen} = None")
        blocks = []
        for number, alternative in enumerate(self.alternatives):
            if number:
                block = gen.block(f"if {chosen} is None:")
                block.__enter__()
                blocks.append(block)
            alternative.emit(gen, node, chosen)
        for block in reversed(blocks):
            block.__exit__(None, None, None)
        if self.after is not None:
            self.after.emit(gen, chosen, node, out)


class Produce(Rule):
    """What a rule makes of one source value: a map, transform/lookup, or its text."""


class TextOf(Produce):
    kind = "one"

    def emit(self, gen, node, out):
        gen.emit(f"{out} = text_of({node}, run) or None")


TEXT = TextOf()


class Apply(Produce):
    """transform/lookup on the value (`{transform: obx_quantity}` reads the segment)."""

    kind = "val"

    def __init__(self, after: After):
        self.after = after

    def emit(self, gen, node, out):
        self.after.emit(gen, None, node, out)


class CallMap(Produce):
    """A named map (`map: CX.Identifier`): a call to its generated function."""

    kind = "one"

    def __init__(self, handle: Handle):
        self.handle = handle
        self.identity: tuple[str, ...] = ()  # a resource map's `identity:` elements
        self.nesting = 0  # how deep the map's rules nest (gateway.mapping.rules.MAX_NESTING)

    def emit(self, gen, node, out):
        name = self.handle.name
        level = gen.levels.get(node)
        if level == 1 and self.handle.rule is not None:
            name = gen.module.variant(self.handle, level)
        gen.emit(f"{out} = {name}({node}, run)")


class DataAbsent(Rule):
    """A rule with `data_absent: CODE` (an element of a map): UNREADABLE from its lenient
    transform becomes FHIR's data-absent-reason extension in the element's place (Object.emit
    writes `_element`), so a reader sees that the sender gave a value that could not be read."""

    def __init__(self, inner: Rule, code: str):
        self.inner = inner
        self.code = code
        self.kind = inner.kind
        self.extension = {"extension": [{"url": runtime.DATA_ABSENT_REASON, "valueCode": code}]}

    def emit(self, gen, node, out):
        self.inner.emit(gen, node, out)


class Object(Produce):
    """An inline map: a dict with its elements in the order written, None when empty."""

    kind = "one"

    def __init__(self, fields: list[tuple[str, Rule]]):
        self.fields = fields

    def builds_resource(self) -> bool:
        """Whether `emit(..., resource_type)` may build the resource itself: not when the map
        writes `resourceType` or `id`, which the engine's own values would hide."""
        return not any(target in ("resourceType", "id") for target, _ in self.fields)

    def emit(self, gen, node, out, resource_type: str = ""):
        """With `resource_type`, the dict starts with resourceType and a placeholder id (the
        engine sets it from the identifiers), so that references land in the resource itself
        and nothing is copied; empty (None) when the map gives nothing else."""
        result = gen.new("r")
        start = 0
        literal = [f"'resourceType': {resource_type!r}", "'id': ''"] if resource_type else []
        fixed = len(literal)
        while start < len(self.fields) and isinstance(self.fields[start][1], Constant):
            target, rule = self.fields[start]
            literal.append(f"{gen.lit(target)}: {rule.literal(gen)}")
            start += 1
        gen.emit(f"{result} = {{{', '.join(literal)}}}")
        for target, rule in self.fields[start:]:
            key = gen.lit(target)
            if isinstance(rule, Constant):
                gen.emit(f"{result}[{key}] = {rule.literal(gen)}")
                continue
            if isinstance(rule, ReferenceRule) and rule.condition is None:
                name = gen.module.constant(rule.reference)
                gen.emit(f"run.references.append(({result}, {key}, {name}, run.scope))")
                gen.emit(f"{result}[{key}] = {name}")
                continue
            value = gen.new()
            rule.emit(gen, node, value)
            if isinstance(rule, DataAbsent):
                with gen.block(f"if {value} is UNREADABLE:"):
                    absent = gen.lit("_" + target)
                    gen.emit(f"{result}[{absent}] = {rule.extension!r}")  # a fresh dict each time
                with gen.block(f"elif {value} is not None:"):
                    gen.emit(f"{result}[{key}] = {value}")
                continue
            if rule.kind == "ref" or rule.kind == "any":
                with gen.block(f"if {value} is not None:"):
                    if rule.kind == "ref":
                        gen.emit(f"run.references.append(({result}, {key}, {value}, run.scope))")
                    else:
                        gen.emit(f"if {value}.__class__ is Reference: "
                                 f"run.references.append(({result}, {key}, {value}, run.scope))")
                    gen.emit(f"{result}[{key}] = {value}")
            else:
                gen.emit(f"if {value} is not None: {result}[{key}] = {value}")
        if len(literal) > fixed:
            gen.emit(f"{out} = {result}")
        elif fixed:
            gen.emit(f"{out} = {result} if len({result}) > {fixed} else None")
        else:
            gen.emit(f"{out} = {result} or None")


class FromText(Rule):
    """`from: PATH` read as text (the most common rule), then transform/lookup if any."""

    def __init__(self, reader, after: After | None):
        self.reader = reader
        self.after = after
        self.kind = "one" if after is None else "val"

    def emit(self, gen, node, out):
        text = self.reader.emit_text(gen, node)
        if self.after is None:
            gen.emit(f"{out} = {text} or None")
            return
        with gen.block(f"if {text}:"):
            self.after.emit(gen, text, node, out, text=True)
        with gen.block("else:"):
            gen.emit(f"{out} = None")


class FromItem(Rule):
    """`from: PATH` reaching a value (a Part or a segment) that a map or a node transform reads."""

    def __init__(self, source, produce: Produce):
        self.source = source
        self.produce = produce
        self.kind = produce.kind

    def emit(self, gen, node, out):
        if isinstance(self.source, SegmentSource):
            segment, at = self.source.emit_first(gen, node)
            with gen.block(f"if {segment} is not None:"):
                self.source.emit_within(gen, segment, at, lambda item: self.produce.emit(gen, item, out))
        else:
            item = self.source.emit_first(gen, node)
            with gen.block(f"if {item} is not None:"):
                self.produce.emit(gen, item, out)
        with gen.block("else:"):
            gen.emit(f"{out} = None")


class Each(Rule):
    """`each: PATH`: the rule once per repetition (or segment), the values in one array."""

    kind = "list"

    def __init__(self, source, produce: Produce):
        self.source = source
        self.produce = produce

    def emit(self, gen, node, out):
        holder = gen.new("a")
        gen.emit(f"{holder} = []")

        def body(item: str) -> None:
            value = gen.new()
            self.produce.emit(gen, item, value)
            _add(gen, self.produce.kind, value, holder, collect=False)
        self.source.emit_loop(gen, node, body)
        gen.emit(f"{out} = {holder} or None")


# -- functions for the engine ----------------------------------------------------------------

def map_function(module: Module, base: str, comment: str, rule: Rule) -> Handle:
    """A function (node, run) -> dict or None for a map."""
    def body(gen: Gen) -> None:
        out = gen.new("result")
        rule.emit(gen, "node", out)
        gen.emit(f"return {out}")
    return module.function(base, comment, body, rule)


def condition_function(module: Module, base: str, comment: str, condition) -> Handle:
    def body(gen: Gen) -> None:
        gen.emit(f"return bool({condition.emit_test(gen, 'node')})")
    return module.function(base, comment, body)


def source_function(module: Module, base: str, comment: str, source, many: bool) -> Handle:
    """A function (node, run) -> the Parts of a field source (each) or the first (from)."""
    def body(gen: Gen) -> None:
        if not many:
            gen.emit(f"return {source.emit_first(gen, 'node')}")
            return
        found = gen.new("a")
        gen.emit(f"{found} = []")
        source.emit_loop(gen, "node", lambda item: gen.emit(f"{found}.append({item})"))
        gen.emit(f"return {found}")
    return module.function(base, comment, body)

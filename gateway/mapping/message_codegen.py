"""Message maps as generated code: every entry of one message map in one function.

The engine (gateway.mapping.engine) compiles a message map's entries (`from`/`each` a segment,
a group of segments or a field, `when`, `map`, nested `resources`); this module writes them as
one Python function `message_ORU_R01(node, run)` of the layer's generated module, so that a
translation runs no interpreter loop over entries. What the function does, in the order of
the entries, is what the rule-by-rule engine did:

  - the spans of a segment entry are slices of the message's position index (bisect within
    the enclosing span); a group ([ORC, OBR]) is cut by `group_spans`; each span gets its own
    Scope, and while it is mapped its segment is the current one (run.segment, run.position);
  - a field entry (PV1-7) maps each repetition, the enclosing segment staying current;
  - `when` is an inline `if` on the span's segment (or the field's value);
  - the resource is built by the map's function specialised to build the resource dict itself
    (resourceType, then a placeholder id, then the map's elements: no copy, and references
    land in the resource directly); `place_resource` gives it its id (from its identifiers,
    else its ordinal per type) and keeps one resource per id;
  - a named entry registers its resource in the enclosing scope for `@name` references.

Reference resolution, Provenance and the Bundle stay in the engine: they run once a message.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Callable

from gateway.mapping import codegen
from gateway.mapping.runtime import NotTranslated, Scope


def group_spans(segments: list, heads: tuple[str, ...], start: int, end: int) -> list[tuple[int, int]]:
    """The (start, end) of each group in [start, end): a group starts at a head segment that
    does not follow a later head of the same group (ORC then OBR is one group; OBR, OBR two)."""
    positions = []
    rank_seen = -1
    for at in range(start, end):
        name = segments[at].name
        if name in heads:
            rank = heads.index(name)
            if rank <= rank_seen or not positions:
                positions.append(at)
            rank_seen = rank
    return [(begin, positions[n + 1] if n + 1 < len(positions) else end)
            for n, begin in enumerate(positions)]


def message_function(module: codegen.Module, base: str, comment: str, entries: list,
                     place_resource: Callable, copy_resource: Callable, name_id: Callable,
                     skip: tuple | None = None) -> codegen.Handle:
    """Declare the function (node, run) that runs `entries` (engine.Entry, descriptions still
    unbound). The engine's helpers: `place_resource(resource, type, ordinal, run, seen[,
    identity])` (the id from the identifiers, and the map's `identity:` elements),
    `copy_resource(body, type, ordinal, run, seen, pending[, identity])` (for a map that
    writes `id` itself), `name_id(text)`: a map without `identifier` gets its id
    from its ordinal inline, as place_resource would give it. `skip`, (condition, reason):
    a message for which the condition holds raises NotTranslated(reason) before anything."""
    module.namespace.update({"Scope": Scope, "bisect_left": bisect_left, "group_spans": group_spans,
                             "place_resource": place_resource, "copy_resource": copy_resource,
                             "name_id": name_id, "NotTranslated": NotTranslated})

    def body(gen: codegen.Gen) -> None:
        writer = _Writer(gen)
        types = sorted({entry.resource_type for entry in _walk(entries) if entry.build is not None})
        for resource_type in types:
            writer.ordinals[resource_type] = gen.new("o")
        if types:
            gen.emit(" = ".join(writer.ordinals[t] for t in types) + " = 0  # resources made, by type")
        gen.emit("segments = run.message.segments")
        gen.emit("positions = run.message.positions")
        gen.emit("seen = {}  # id -> resource: one resource per id")
        gen.emit("resources = run.resources")
        gen.emit("key = run.context.message_key or run.context.control_id")
        gen.emit("scope0 = run.scope")
        gen.emit("end0 = len(segments)")
        if skip is not None:
            condition, reason = skip
            gen.scopes.append(({}, True))
            try:
                with gen.block(f"if {condition.emit_test(gen, 'node')}:"):
                    gen.emit(f"raise NotTranslated({'not translated: ' + reason!r}, 'MSH[1]-9')")
            finally:
                gen.scopes.pop()
        writer.entries(entries, "scope0", "0", "end0", top=True)
        gen.emit("return None")
    return module.function(base, comment, body)


def _walk(entries: list):
    for entry in entries:
        yield entry
        yield from _walk(entry.children)


class _Writer:
    def __init__(self, gen: codegen.Gen):
        self.gen = gen
        self.ordinals: dict[str, str] = {}

    def entries(self, entries: list, scope: str, start: str, end: str, top: bool = False) -> None:
        gen = self.gen
        for entry in entries:
            gen.emit(codegen.comment_line(f"{entry.place} {entry.name or entry.resource_type or 'group'}"))
            gen.scopes.append(({}, True))  # nothing read for one entry is reused by the next
            try:
                if entry.source is not None:
                    self.field_entry(entry, scope)
                else:
                    self.segment_entry(entry, scope, start, end, top)
            finally:
                gen.scopes.pop()

    def field_entry(self, entry, scope: str) -> None:
        """Each value of a field (PV1-7), the enclosing segment and scope staying current."""
        gen = self.gen

        def item(node: str) -> None:
            if entry.condition is not None:
                with gen.block(f"if {entry.condition.emit_test(gen, node)}:"):
                    self.make(entry, node, scope)
            else:
                self.make(entry, node, scope)
        if entry.many:
            entry.source.emit_loop(gen, "node", item)
        else:
            found = entry.source.emit_first(gen, "node")
            with gen.block(f"if {found} is not None:"):
                item(found)

    def segment_entry(self, entry, scope: str, start: str, end: str, top: bool) -> None:
        gen = self.gen
        heads = entry.group
        saved = gen.new("sv")
        gen.emit(f"{saved} = run.segment, run.position")
        first, last = gen.new("b"), gen.new("e")
        if len(heads) == 1:
            positions, low, high = gen.new("pos"), gen.new("lo"), gen.new("hi")
            gen.emit(f"{positions} = positions({heads[0]!r})")
            if top:  # the whole message
                gen.emit(f"{low} = 0; {high} = len({positions})")
            else:
                gen.emit(f"{low} = bisect_left({positions}, {start}); {high} = bisect_left({positions}, {end}, {low})")
            if entry.many:
                at = gen.new("k")
                header = f"for {at} in range({low}, {high}):"
            else:
                at = low
                header = f"if {low} < {high}:"
            with gen.block(header, barrier=True):
                gen.emit(f"{first} = {positions}[{at}]")
                gen.emit(f"{last} = {positions}[{at} + 1] if {at} + 1 < {high} else {end}")
                self.span(entry, scope, first, last, single=True)
        else:
            with gen.block(f"for {first}, {last} in group_spans(segments, {heads!r}, {start}, {end}):",
                           barrier=True):
                self.span(entry, scope, first, last, single=False)
        gen.emit(f"run.segment, run.position = {saved}")
        gen.emit(f"run.scope = {scope}")

    def span(self, entry, scope: str, first: str, last: str, single: bool) -> None:
        gen = self.gen
        inner = gen.new("scope")
        gen.emit(f"{inner} = run.scope = Scope({first}, {last}, {scope})")
        if single:
            node = gen.new("g")
            gen.emit(f"{node} = run.segment = segments[{first}]")
            gen.emit(f"run.position = {first}")
        else:
            node = "None"
            gen.emit("run.segment = None")
            gen.emit("run.position = -1")
        if entry.condition is not None:
            block = gen.block(f"if {entry.condition.emit_test(gen, node)}:")
        else:
            block = None
        if block is not None:
            block.__enter__()
        try:
            if entry.build is not None:
                self.make(entry, node, scope)
            if entry.children:
                self.entries(entry.children, inner, first, last)
        finally:
            if block is not None:
                block.__exit__(None, None, None)

    def make(self, entry, node: str, scope: str) -> None:
        """Build the entry's resource from `node`, give it its id, name it in `scope`."""
        gen = self.gen
        resource_type = entry.resource_type
        build = entry.build
        resource = gen.new("res")
        if isinstance(build, codegen.CallMap):
            rule = build.handle.rule
            direct = isinstance(rule, codegen.Object) and rule.builds_resource()
            level = 1 if gen.levels.get(node) == 1 else 0
        else:
            rule = build
            direct = isinstance(rule, codegen.Object) and rule.builds_resource()
            level = None
        ordinal = self.ordinals[resource_type]
        identity = getattr(build, "identity", ())
        extra = f", {identity!r}" if identity else ""
        if direct:
            if level is None:
                rule.emit(gen, node, resource, resource_type)
            else:
                name = gen.module.variant(build.handle, level, resource_type)
                gen.emit(f"{resource} = {name}({node}, run)")
            with gen.block(f"if {resource} is not None:"):
                gen.emit(f"{ordinal} += 1")
                if any(target == "identifier" for target, _ in rule.fields):
                    gen.emit(f"{resource} = place_resource({resource}, {resource_type!r}, {ordinal}, run, seen{extra})")
                else:  # no identifier: the id of the resource's place in the message
                    rid, existing = gen.new("rid"), gen.new("old")
                    gen.emit(f"{rid} = {resource}['id'] = name_id(f'{resource_type}|{{key}}|{{{ordinal}}}')")
                    gen.emit(f"{existing} = seen.get({rid})")
                    with gen.block(f"if {existing} is None:"):
                        gen.emit(f"seen[{rid}] = {resource}")
                        gen.emit(f"resources.append({resource})")
                    with gen.block("else:"):
                        gen.emit(f"{resource} = {existing}")
                self.register(entry, resource, scope)
            return
        pending, body = gen.new("pn"), gen.new("body")
        gen.emit(f"{pending} = len(run.references)")
        if level is None:
            rule.emit(gen, node, body)
        else:
            gen.emit(f"{body} = {build.handle.name}({node}, run)")
        with gen.block(f"if {body}:"):
            gen.emit(f"{ordinal} += 1")
            gen.emit(f"{resource} = copy_resource({body}, {resource_type!r}, {ordinal}, run, seen, {pending}{extra})")
            self.register(entry, resource, scope)

    def register(self, entry, resource: str, scope: str) -> None:
        if entry.name:
            self.gen.emit(f"{scope}.resources.setdefault({entry.name!r}, []).append({resource})")

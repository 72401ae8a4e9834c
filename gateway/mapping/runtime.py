"""What compiled mapping rules run on: the values they read and the context of one translation.

A value being mapped is either a `Segment` or a `Part`: one repetition of a field, one
component or one subcomponent, still escaped (escapes are decoded when text is taken, after
every split). Scopes bound where a path looks for a segment: an OBX's scope is that OBX and
what follows it up to the next OBX, inside its order group, inside its patient, inside the
message.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from adapters.hl7v2.message import Hl7Message, Segment, Separators

FIELD, COMPONENT, SUBCOMPONENT = 1, 2, 3


class Part:
    """A field repetition (level 1), a component (2) or a subcomponent (3), raw."""

    __slots__ = ("raw", "level", "pieces")

    def __init__(self, raw: str, level: int):
        self.raw = raw
        self.level = level
        self.pieces = None  # split one level down on first use, then kept

    def __repr__(self) -> str:
        return f"Part({self.raw!r}, {self.level})"


class Reference:
    """A pending reference to resources named by the message map, filled in at the end:
    the nearest one (`from: '@x'`) or all of them (`each: '@x'`), as one Reference or a list.
    A `required` one (FHIR requires the element, or the rule says `required: true`) that finds
    no resource fails the translation: the rule's `key` and `place` (file:line) say which."""

    __slots__ = ("name", "every", "as_list", "required", "key", "place")

    def __init__(self, name: str, every: bool, as_list: bool, required: bool = False,
                 key: str = "", place: str = ""):
        self.name = name
        self.every = every
        self.as_list = as_list
        self.required = required
        self.key = key
        self.place = place

    def __repr__(self) -> str:
        return f"Reference({self.name!r}, every={self.every}, as_list={self.as_list})"


class TranslationError(ValueError):
    """A message that the mapping cannot translate; `location` is an ERR-2 style place
    ('PID[1]-7') or a mapping key, `reason` says what is wrong."""

    def __init__(self, reason: str, location: str = "", mapping: str = ""):
        super().__init__(f"{location}: {reason}" if location else reason)
        self.reason = reason
        self.location = location
        self.mapping = mapping  # file:line of the rule that failed


class MissingResource(TranslationError):
    """A required reference to a resource the message does not give (a ServiceRequest, whose
    subject FHIR requires, in a message without PID): a required segment is missing."""


class NotTranslated(TranslationError):
    """A message the mapping set says is not translated, by design: it carries no clinical data
    to store (an acknowledgement, a query). Not a fault of the message nor of the mappings; a
    TranslationError still, so that a caller that knows only those refuses it with the reason."""


@dataclass(slots=True)
class Scope:
    start: int
    end: int
    parent: "Scope | None"
    resources: dict[str, list[dict]] = field(default_factory=dict)
    found: dict | None = None  # Run.find's answers at this level: every OBX asks for its OBR

    def named(self, name: str) -> list[dict]:
        """The resources named `name` in the nearest scope that has some, from this one out
        (what `@name` refers to); [] when none has."""
        scope = self
        while scope is not None:
            found = scope.resources.get(name)
            if found:
                return found
            scope = scope.parent
        return []


@dataclass(slots=True)
class TranslationContext:
    """Who sent the message and when: what transforms need besides the value."""

    sender_id: str = ""
    timezone: ZoneInfo = ZoneInfo("Africa/Casablanca")
    received_at: datetime | None = None
    message_key: str = ""  # sender and control id: seeds ids of resources without identifiers
    control_id: str = ""
    mapping_layer: str = ""  # the sender's folder under mappings/senders/ (default: sender_id)


class Run:
    """The state of one translation: message, separators, scopes, pending references."""

    __slots__ = ("message", "separators", "seps", "context", "segment", "position", "scope",
                 "references", "warnings", "resources", "parts")

    def __init__(self, message: Hl7Message, context: TranslationContext):
        self.message = message
        separators = message.separators
        self.separators: Separators = separators
        # What generated rules unpack once per call: repetition, component, subcomponent and
        # escape characters, and the unescaping function.
        self.seps = (separators.repetition, separators.component, separators.subcomponent,
                     separators.escape, separators.text)
        self.context = context
        self.segment: Segment | None = None
        self.position = -1
        self.scope = Scope(0, len(message.segments), None)
        self.references: list[tuple] = []  # (holder, key, name, scope, many)
        self.warnings: list[str] = []
        self.resources: list[dict] = []
        self.parts: dict[tuple, list[Part]] = {}  # (segment, field) -> its repetitions as Parts

    def find(self, name: str) -> tuple[Segment | None, int]:
        """The segment `name` nearest to where the mapping stands: the current segment, else
        the first in the innermost scope that has one."""
        segment = self.segment
        if segment is not None and segment.name == name:
            return segment, self.position
        scope = self.scope
        message = self.message
        inner = None
        while scope is not None:
            # At the message level the answer depends on the group we come from (see below).
            key = (name, inner.start) if scope.parent is None and inner is not None else name
            found = scope.found
            at = found.get(key) if found is not None else None
            if at is None:
                end = scope.end
                if scope.parent is None and inner is not None:
                    # At the message level, only what comes before the first group of this kind
                    # (MSH, PID, PV1...): never a sibling group's segment (another order's RXR or TQ1).
                    head = message.first(message.segments[inner.start].name, 0, inner.start + 1)
                    end = head if head >= 0 else inner.start
                at = message.first(name, scope.start, end)
                if found is None:
                    scope.found = found = {}
                found[key] = at
            if at >= 0:
                return message.segments[at], at
            inner, scope = scope, scope.parent
        return None, -1

    def following(self, name: str) -> list[tuple[Segment, int]]:
        """The run of `name` segments right after the current segment (its NTEs, say), or every
        `name` in the current scope when no segment is current."""
        segments = self.message.segments
        scope = self.scope
        if self.segment is None:  # by bisection, not a scan of the message's every `name`
            found = self.message.positions(name)
            low = bisect_left(found, scope.start)
            return [(segments[at], at) for at in found[low:bisect_left(found, scope.end, low)]]
        found = []
        at = self.position + 1
        while at < scope.end and segments[at].name == name:
            found.append((segments[at], at))
            at += 1
        return found


# -- what generated rules call (gateway.mapping.codegen) ------------------------------------

EMPTY = (None, "", [], {})  # `value in EMPTY`: nothing to map (0 and False are values)


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


def before_first(run: Run, name: str) -> bool:
    """The current segment comes before the message's first `name` (or it has none): a
    patient-level OBX, before the first order (`when: {before: ORC}`)."""
    if run.segment is None or run.position < 0:
        return False
    found = run.message.positions(name)
    return not found or run.position < found[0]


def descend(part: Part, number: int, run: Run) -> Part | None:
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


def field_parts(segment: Segment, number: int, run: Run) -> list[Part]:
    """The repetitions of SEG-n as Parts, made once per translation so their splits are shared."""
    key = (segment, number)
    found = run.parts.get(key)
    if found is None:
        found = [Part(raw, FIELD) for raw in segment.repetitions(number, run.separators.repetition)]
        run.parts[key] = found
    return found


def unsplit_parts(segment: Segment, number: int, run: Run) -> list[Part]:
    """MSH-1 and MSH-2, never split."""
    raw = segment.field(number)
    return [Part(raw, SUBCOMPONENT)] if raw else []


def relative_part(node, component: int, subcomponent: int, run: Run) -> Part | None:
    """Component `component` (and subcomponent) of the value being mapped, as a Part."""
    if node.__class__ is not Part:
        return None
    part = descend(node, component, run)
    if part is not None and subcomponent:
        part = descend(part, subcomponent, run) if part.level == COMPONENT else (
            part if subcomponent == 1 else None)
    return part


def location(run: Run) -> str:
    """The ERR-style place of the current segment ('OBX[3]'), for errors."""
    segment = run.segment
    if segment is None:
        return ""
    sequence = sum(1 for at in run.message.positions(segment.name) if at <= run.position)
    return f"{segment.name}[{sequence}]"


DATA_ABSENT_REASON = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"


class _Unreadable:
    """What a rule with `data_absent` gives for a value it could not read: the map that holds
    the element writes FHIR's data-absent-reason in its place (`_element`) instead."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNREADABLE"


UNREADABLE = _Unreadable()


def unreadable(run: Run, error: Exception, fields: str, key: str, absent: str):
    """An optional value a lenient transform cannot read (a date that is no date): a warning
    naming the place, the field(s) and the text (the transform's reason quotes it), and the
    element is left out; UNREADABLE when the rule asks for a data-absent-reason (`absent`)."""
    place = location(run)
    element = key[4:] if key.startswith("map.") else key
    outcome = f"left out, data-absent-reason {absent!r} in its place" if absent else "left out"
    run.warnings.append(f"{place + ': ' if place else ''}{fields}: {error}; {element} {outcome}")
    return UNREADABLE if absent else None

"""Reading mapping files: YAML with the line of every key kept, and problems collected.

Mapping files are read with a safe loader that keeps what an engineer writes as text unless
it is plainly a number or true/false: `4.10` is a path (not the float 4.1), `01` and `07` are
codes (not the integer 1 and the octal 7), `NO`, `yes`, `on` are codes (not booleans), a date
is its text. Only null (`~`, `null`, nothing), `true`/`false` and plain decimal integers
(`3`, `-12`) are read as values. Every mapping remembers where each key was written, so
that an error names the file, the key and the line.
"""
from __future__ import annotations

import re
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.yaml_bounds import expansion_limit_passed
from gateway.yaml_loader import SafeLoader, reader_error_line


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class MappingErrors(ValueError):
    """Every problem found in a mapping set, reported together."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


class Located(dict):
    """A YAML mapping that knows its file and the line of each key."""

    __slots__ = ("file", "line", "lines")

    def line_of(self, key) -> int:
        return self.lines.get(key, self.line)


class LocatedList(list):
    __slots__ = ("file", "line")


class _Loader(SafeLoader):
    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, KeyError, TypeError, AttributeError):
            # An explicit tag the node does not fit (`!!int abc`, `!!bool maybe`, `!!map [1]`):
            # PyYAML's constructors then raise plain Python errors, with no line.
            raise yaml.constructor.ConstructorError(
                None, None, f"this {_KINDS.get(type(node), 'value')} is not a {node.tag}",
                node.start_mark) from None


_KINDS = {yaml.ScalarNode: "value", yaml.SequenceNode: "list", yaml.MappingNode: "mapping"}


# YAML 1.1's implicit types change codes: 07 is the octal 7, NO is false, 1:30 is 90, a date
# is a date object. Only these stay values; any other plain scalar is its text.
_Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
        ("int", r"^-?(?:0|[1-9][0-9]*)$", list("-0123456789")),
        ("merge", r"^(?:<<)$", ["<"])):
    _Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)


def _refuse_tag(loader: _Loader, node) -> None:
    # Bytes, dates and sets are no JSON: a bundle holding one could not be stored.
    raise yaml.constructor.ConstructorError(None, None, f"{node.tag} has no place in a mapping file; "
                                            "write the value as text", node.start_mark)


for _tag in ("binary", "timestamp", "set"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse_tag)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    written = {id(key_node) for key_node, _ in node.value}  # not brought by a merge key (<<)
    loader.flatten_mapping(node)
    result = Located()
    result.file = loader.name
    result.line = node.start_mark.line + 1
    result.lines = {}
    explicit = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.MarkedYAMLError("while reading a mapping", node.start_mark,
                                       "a key is a name or a code, not a list or a mapping", key_node.start_mark)
        if id(key_node) in written:  # a key written here replaces one merged in (<<: *base)
            if key in explicit:
                raise yaml.MarkedYAMLError("while reading a mapping", node.start_mark,
                                           f"key {key!r} appears twice", key_node.start_mark)
            explicit.add(key)
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LocatedList:
    result = LocatedList(loader.construct_object(child, deep=True) for child in node.value)
    result.file = loader.name
    result.line = node.start_mark.line + 1
    return result


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def read_yaml(path: Path, display: str, problems: list[Problem], data: bytes | None = None):
    """The document in `path` (whose bytes are `data` when already read), or None with a
    Problem added (shown as `display`)."""
    try:
        text = (path.read_bytes() if data is None else data).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(Problem(display, 0, "", f"cannot be read: {error}"))
        return None
    return read_yaml_text(text, display, problems)


def read_yaml_text(text: str, display: str, problems: list[Problem]):
    loader = None
    try:
        loader = _Loader(text)  # refuses control characters (NUL, ESC) at once
        loader.name = display
        node = loader.get_single_node()
        if node is None:
            return None
        limit = expansion_limit_passed(node)  # the rule compiler walks an alias's node at each use
        if limit is not None:
            problems.append(Problem(display, 0, "", f"its aliases (*name) repeat their anchors' contents "
                                    f"to more than {limit} nodes; write fewer aliases"))
            return None
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        reason = getattr(error, "problem", None) or str(error)
        if isinstance(error, yaml.reader.ReaderError):
            line = reader_error_line(text, error)
            reason = f"character #x{error.character:04x} is not allowed (a control character)"
        problems.append(Problem(display, line, "", f"invalid YAML: {reason}"))
        return None
    except RecursionError:
        problems.append(Problem(display, 0, "", "invalid YAML: nested too deeply"))
        return None
    finally:
        if loader is not None:
            loader.dispose()


def line_of(value, default: int = 0) -> int:
    return getattr(value, "line", default)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_identifier(text) -> bool:
    return isinstance(text, str) and bool(_IDENTIFIER.match(text))

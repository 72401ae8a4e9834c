"""Reading mapping files: YAML with the line of every key kept, and problems collected.

Mapping files are read with a safe loader that also keeps numbers such as `4.10` as text
(a path, not the float 4.1), and every mapping remembers where each key was written, so
that an error names the file, the key and the line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml


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


class _Loader(yaml.SafeLoader):
    pass


# No implicit floats: '4.10' is a path component, not 4.1 (ints and booleans stay).
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Located:
    loader.flatten_mapping(node)
    result = Located()
    result.file = loader.name
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.MarkedYAMLError("while reading a mapping", node.start_mark,
                                       f"key {key!r} appears twice", key_node.start_mark)
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


def read_yaml(path: Path, display: str, problems: list[Problem]):
    """The document in `path`, or None with a Problem added (shown as `display`)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(Problem(display, 0, "", f"cannot be read: {error}"))
        return None
    return read_yaml_text(text, display, problems)


def read_yaml_text(text: str, display: str, problems: list[Problem]):
    loader = _Loader(text)
    loader.name = display
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        reason = getattr(error, "problem", None) or str(error)
        problems.append(Problem(display, mark.line + 1 if mark else 0, "", f"invalid YAML: {reason}"))
        return None
    finally:
        loader.dispose()


def line_of(value, default: int = 0) -> int:
    return getattr(value, "line", default)


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def is_identifier(text) -> bool:
    return isinstance(text, str) and bool(_IDENTIFIER.match(text))

"""How far a YAML document's aliases may expand: one bound for the configuration and the
mapping files. An alias (*name) stands for its anchor's whole node, so whatever walks the
document walks that node again at each alias: a few lines of aliases of aliases ("billion
laughs") would hold a load (a reload, in the running gateway) for hours and gigabytes. Allowed:
FREE nodes, or FACTOR times what is written. Pure: works on PyYAML's composed nodes."""
from __future__ import annotations

import yaml

FREE = 100_000
FACTOR = 10


def expansion_limit_passed(root: yaml.Node) -> int | None:
    """The limit `root` expands past (each alias replaced by its anchor's node), or None."""
    limit = max(FREE, FACTOR * _written_nodes(root))
    return limit if _expands_past(root, limit) else None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _written_nodes(root: yaml.Node) -> int:
    """The nodes of a document as written (an alias's node counted once)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) not in seen:
            seen.add(id(node))
            stack.extend(_children(node))
    return len(seen)


def _expands_past(root: yaml.Node, limit: int) -> bool:
    """Whether the document has more than `limit` nodes once expanded (an alias inside its own
    anchor expands without end). Stops at the limit."""
    count, stack = 0, [root]
    while stack:
        count += 1
        if count > limit:
            return True
        stack.extend(_children(stack.pop()))
    return False

"""PyYAML's safe loading, with libyaml's C scanner and parser where PyYAML has them (its
wheels do): the configuration and the mapping files are read at every start, command and
reload, and the pure-Python scanner took about 0.5 s of each for the shipped mappings.

Only the parsing is libyaml's. Composing the events into nodes stays PyYAML's Python
Composer: libyaml's own composer (Cython) recurses without the interpreter's recursion limit,
and a document nested 100,000 levels deep crashes the process instead of raising
RecursionError.
"""
from __future__ import annotations

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

try:
    from yaml._yaml import CParser
except ImportError:  # a PyYAML built without libyaml
    CParser = None

if CParser is not None:
    class SafeLoader(Composer, CParser, SafeConstructor, Resolver):
        def __init__(self, stream):
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

        def compose_scalar_node(self, anchor):
            node = Composer.compose_scalar_node(self, anchor)
            if node.style == "":  # libyaml's plain style; PyYAML's is None
                node.style = None
            return node
else:
    SafeLoader = yaml.SafeLoader  # type: ignore[misc,assignment]


def reader_error_line(text: str, error: yaml.reader.ReaderError) -> int:
    """The line (from 1) of a character the reader refused: libyaml counts its position in
    UTF-8 bytes, PyYAML's reader in characters."""
    if CParser is not None:
        return text.encode("utf-8", "surrogatepass")[:error.position].count(b"\n") + 1
    return text.count("\n", 0, error.position) + 1

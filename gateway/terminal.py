"""Text made safe to print on an operator's terminal.

What the commands print in text mode comes in good part from senders (MSH fields, message
text, a peer's ACK, a delivery's error): a control character in it would reach the terminal
raw, and an escape sequence can move the cursor, rewrite the lines above, retitle the window
or write the clipboard (OSC 52); a bidi override can make a line read as another. Such
characters are shown escaped, in the form `gateway audit show` already uses (Python's): ESC
as \\x1b, BEL as \\x07, a C1 control as \\x9b, a bidi override as \\u202e. Letters of any
script, and the no-break spaces of French typography, print as they are.
"""
from __future__ import annotations

import unicodedata

# Controls (C0, DEL, C1), format characters (bidi embeddings, overrides, isolates and marks,
# zero-width spaces, BOM, soft hyphen, tags), line and paragraph separators, and lone
# surrogates (bytes decoded with surrogateescape: they would not even encode on output).
_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# ZWNJ and ZWJ are format characters that Arabic-script text and emoji need; they hide nothing.
_KEPT = frozenset("\u200c\u200d")


class _Table(dict):
    """str.translate's table, filled on first sight of each character (the Unicode database
    decides, and translate stays a C loop over long message texts)."""

    def __init__(self, kept: frozenset, escape):
        super().__init__()
        self.kept, self.escape = kept, escape

    def __missing__(self, code: int) -> str:
        char = chr(code)
        safe = char in self.kept or unicodedata.category(char) not in _UNSAFE
        self[code] = value = char if safe else self.escape(char)
        return value


def _python_escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def _json_escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:  # as JSON writes it: a UTF-16 surrogate pair
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


_ONE_LINE = _Table(_KEPT, _python_escape)
_LINES = _Table(_KEPT | {"\t", "\n"}, _python_escape)
_JSON = _Table(_KEPT | {"\n"}, _json_escape)


def printable(text: str, lines: bool = False) -> str:
    """`text` with every character that a terminal would act on, or that would hide or reorder
    what follows, escaped. One line (tab and line feed escaped too, so that a value cannot pass
    for several rows) unless `lines`: then tab and line feed are kept (a message shown one
    segment a line). Carriage return is always escaped: it would let a value overwrite the
    start of its line."""
    return text.translate(_LINES if lines else _ONE_LINE)


def printable_json(document: str) -> str:
    """A JSON document (a FHIR bundle) made safe the same way and still valid JSON with the same
    value: JSON writers escape C0 controls but not DEL, C1 or format characters, written here
    as JSON's own escapes (\\u009b, \\u202e)."""
    return document.translate(_JSON)

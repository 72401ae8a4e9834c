"""HL7 v2 escape sequences (chapter 2, 2.7): decoded into the text they stand for.

`\\F\\ \\S\\ \\T\\ \\R\\ \\E\\` give back the delimiters (and `\\P\\` the v2.7 truncation
character, when MSH-2 declares one); `\\Xhh..\\` are bytes in the message's
character set; `\\.br\\` and `\\.sp n\\` are line breaks, `\\.sk n\\` spaces (n under 1000);
highlighting, fill and indent marks carry no text and are dropped, as are character set
switches as ISO 2022 writes them (`\\Cxxyy\\`, `\\Mxxyy\\`, `\\Mxxyyzz\\`: the hex of an
escape sequence's intermediate byte, 0x20-0x2F, then its final bytes).
A sequence we do not understand (a local `\\Z..\\`, whose meaning only its sender knows,
`\\T\\` without a subcomponent separator, `\\X..\\` bytes that are no text in the character
set), or a lone escape character (Windows paths, emoticons), is kept literally: dropping
text would lose data.
"""
from __future__ import annotations

import re


def unescape(text: str, escape: str, field: str, component: str, repetition: str,
             subcomponent: str, codec: str = "latin-1", truncation: str = "") -> str:
    """The value of `text` with its escape sequences decoded (unchanged when it has none)."""
    if escape not in text or not escape:
        return text
    simple = {"F": field, "S": component, "R": repetition, "E": escape}
    if subcomponent:  # without one (ASTM, a 3-character MSH-2) '\\T\\' is no escape
        simple["T"] = subcomponent
    if truncation:  # v2.7: '\\P\\' is the truncation character ('#') as text
        simple["P"] = truncation
    parts = text.split(escape)
    # parts alternate text, sequence, text, ...; an odd count means every sequence is closed.
    out = [parts[0]]
    index = 1
    last = len(parts) - 1
    while index <= last:
        sequence = parts[index]
        if index == last:  # an escape character with no closing one: literal
            out.append(escape + sequence)
            break
        value = _decode(sequence, simple, codec)
        if value is None:
            out.append(escape + sequence)  # unknown: keep it, and let its closer start anew
            index += 1
            continue
        out.append(value)
        out.append(parts[index + 1])
        index += 2
    return "".join(out)


# A count of lines or spaces: three ASCII digits at most. '\.sk 50000000\' is 20 bytes that
# would expand to 50 MB (and a count of thousands of digits is no number Python reads): a
# sequence with a larger count is kept literally, as any other we do not understand. A sign
# needs its digits: '\.sp -\' is no count either.
_COUNT = re.compile(r"\s*([+-]?\d{1,3})?\s*$", re.ASCII)


def _decode(sequence: str, simple: dict[str, str], codec: str) -> str | None:
    value = simple.get(sequence)
    if value is not None:
        return value
    if not sequence:
        return None
    head = sequence[0]
    if head == "X":
        digits = sequence[1:]
        if len(digits) % 2 or not digits:
            return None
        try:
            return bytes.fromhex(digits).decode(codec)  # strict: never U+FFFD for data
        except ValueError:  # bad hex, or bytes that are no text in the codec
            return None
    if head == ".":
        command = sequence[1:3]
        if command in ("br",) and len(sequence) == 3:
            return "\n"
        if command in ("sp", "sk"):
            match = _COUNT.match(sequence[3:])
            if not match:
                return None
            count = max(int(match.group(1) or "1"), 0)
            return ("\n" if command == "sp" else " ") * count
        if command in ("fi", "nf", "ce") and len(sequence) == 3:
            return ""
        if command in ("in", "ti") and _COUNT.match(sequence[3:]):
            return ""
        return None
    if sequence in ("H", "N"):
        return ""  # highlighting on/off: formatting only
    if _CHARSET_SWITCH.match(sequence):
        return ""  # a character set switch: no text of its own
    return None


# ISO 2022: an intermediate byte (0x28-0x2F for one byte sets, 0x24 for multibyte ones) then
# final bytes 0x30-0x7E. Hex alone is not enough: 'C:\Cafe\menu' is a path.
_CHARSET_SWITCH = re.compile(r"(?:C2[0-9A-Fa-f]|M24(?:2[0-9A-Fa-f])?)[3-7][0-9A-Fa-f]\Z")

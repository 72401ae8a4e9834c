"""MSH-18 character sets (HL7 table 0211) mapped to Python codecs, and decoding with a
per-sender fallback for senders that declare one charset and send another.

Framing works on bytes, which is safe for every single-byte set and for UTF-8 (no UTF-8
sequence contains VT, FS or CR); UTF-16 and UTF-32 cannot travel over MLLP and are refused.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# HL7 table 0211 value -> Python codec. Values that Python cannot decode are left out and
# therefore refused (ISO IR87 / IR159 are JIS X 0208 / 0212 sets used through ISO 2022
# switching, which the gateway does not do).
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",  # Arabic
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR6": "ascii",
    "ISO IR14": "shift_jis",  # JIS X 0201 half-width katakana and Roman: a subset of Shift-JIS
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "CNS 11643-1992": "big5",  # no CNS 11643 codec in Python; Big5 covers its planes 1-2
    "BIG-5": "big5",
    "UNICODE": "utf-8",  # as most engines read it; UTF-16 is not possible over MLLP framing
    "UNICODE UTF-8": "utf-8",
}

# Not table 0211, but what some systems write in MSH-18; unambiguous, so understood.
ALIASES: dict[str, str] = {
    "UTF-8": "utf-8", "UTF8": "utf-8",
    **{f"ISO-8859-{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    **{f"ISO8859-{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
    "WINDOWS-1252": "cp1252", "CP1252": "cp1252", "WINDOWS-1256": "cp1256", "CP1256": "cp1256",
}

# Declared but impossible over byte framing: refused with a clear reason.
MULTIBYTE_WIDE = frozenset({"UNICODE UTF-16", "UNICODE UTF-32"})

DEFAULT_CHARSET = "ASCII"  # when MSH-18 is empty (HL7 2.x)
_AS_WRITTEN = {**CHARSETS, "": CHARSETS[DEFAULT_CHARSET]}


class CharsetError(ValueError):
    """Bytes that cannot be decoded, with the offset of the first bad byte."""

    def __init__(self, reason: str, offset: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


@dataclass(frozen=True, slots=True)
class Decoded:
    text: str
    codec: str  # the Python codec that decoded the bytes
    fell_back: bool  # True when the declared set failed and a fallback was used


def codec_for(declared: str) -> str:
    """The Python codec for an MSH-18 value (first repetition); CharsetError if unsupported."""
    codec = _AS_WRITTEN.get(declared)  # the usual case: a table 0211 value, or nothing
    if codec is not None:
        return codec
    name = declared.strip().upper() or DEFAULT_CHARSET  # blanks (fixed-width senders): none
    codec = CHARSETS.get(name) or ALIASES.get(name)
    if codec is None:
        if name in MULTIBYTE_WIDE:
            raise CharsetError(f"MSH-18 {declared!r} cannot be carried over MLLP byte framing")
        raise CharsetError(f"MSH-18 {declared!r} is not a supported character set (HL7 table 0211)")
    return codec


def is_known_codec(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


_C1_CONTROLS = re.compile(rb"[\x80-\x9f]")


def decode_declared(raw: bytes, codec: str) -> str:
    """`raw.decode(codec)`, except that an ISO 8859 set refuses bytes 0x80-0x9F: Python maps
    them to C1 control characters, which no HL7 text contains; they are what windows-1252 /
    windows-1256 letters and punctuation (0x81 peh, 0x92 apostrophe, 0x9C oe) look like
    when a sender mislabels its bytes, and must reach the fallback instead of being garbled."""
    text = raw.decode(codec)
    if codec.startswith("iso8859"):
        found = _C1_CONTROLS.search(raw)
        if found is not None:
            raise UnicodeDecodeError(codec, raw, found.start(), found.start() + 1,
                                     "C1 control character, not text")
    return text


def decode(raw: bytes, declared: str, fallback: str | None = None) -> Decoded:
    """Decode a message's bytes as MSH-18 says, else with the sender's fallback codec.

    With MSH-18 empty (ASCII by the standard) bytes above 0x7F are tried as UTF-8 before the
    fallback, since that is what most modern senders mean by saying nothing.
    """
    codec = codec_for(declared)
    try:
        return Decoded(decode_declared(raw, codec), codec, False)
    except UnicodeDecodeError as error:
        first = error
    candidates = []
    if not declared.strip() and codec == "ascii":
        candidates.append("utf-8")
    if fallback and fallback not in candidates:
        candidates.append(fallback)
    for candidate in candidates:
        try:
            return Decoded(raw.decode(candidate), candidate, True)
        except UnicodeDecodeError:
            continue
    bad = raw[first.start:first.start + 1].hex()
    name = declared.strip() or DEFAULT_CHARSET
    tried = f" (fallback {', '.join(candidates)} also failed)" if candidates else ""
    raise CharsetError(f"byte 0x{bad} at offset {first.start} is not valid {name}{tried}", first.start)

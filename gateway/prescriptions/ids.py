"""Prescription identifiers: short, readable, with a check character. Pure code.

Format `RX-XXXX-XXXX-C`: eight random data characters and one check character, all from a
31-character alphabet: Crockford's base 32 (no I, L, O, U: they read as 1, 1, 0, V) less Z,
which handwriting confuses with 2. 31 is prime, which is what makes the check work:

    sum over every character (check included) of value(c) * 3^position  ==  0  (mod 31)

with positions counted from the right (the check character has position 0). Any single
wrong character changes the sum by (a - b) * 3^i, never 0 mod 31 since 31 is prime and
a != b; any swap of two neighbours changes it by (a - b) * 3^i * (1 - 3), never 0 either
(3 is moreover a primitive root mod 31, so swaps two apart are caught as well). The test suite
checks every single substitution and every adjacent swap of thousands of ids exhaustively.

31^8 (about 8.5e11) ids, drawn at random (`secrets`): ids cannot be enumerated from one
another; uniqueness is the store's unique key.

Parsing (`parse`) is tolerant of what people do to a printed id: lower case, dashes and spaces
left out or added, and Crockford's readings O -> 0, I and L -> 1. Anything else is refused
with a precise `PrescriptionIdError`.
"""
from __future__ import annotations

import re
import secrets

SYSTEM = "urn:ma:hie:prescription"  # FHIR Identifier.system of the ids (DESIGN.md section 4)
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXY"
MODULUS = len(ALPHABET)  # 31, a prime
WEIGHT = 3  # a primitive root mod 31
DATA_LENGTH = 8
PREFIX = "RX"

_VALUE = {c: i for i, c in enumerate(ALPHABET)}
_READINGS = {"O": "0", "I": "1", "L": "1"}  # what a reader may have meant (Crockford)
_SEPARATORS = re.compile(r"[\s\-]+")
MAX_INPUT = 64  # characters: anything longer is not an id, whatever it holds


class PrescriptionIdError(ValueError):
    """Not a prescription id; `reason` says precisely why (safe to show to the sender)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check_character(data: str) -> str:
    """The check character of `data` (characters of ALPHABET)."""
    total = 0
    weight = WEIGHT  # position 1: the data character next to the check character
    for char in reversed(data):
        total += _VALUE[char] * weight
        weight = weight * WEIGHT % MODULUS
    return ALPHABET[-total % MODULUS]


def is_consistent(compact: str) -> bool:
    """Whether `compact` (data then check, no prefix or dashes) has a correct check character."""
    total = 0
    weight = 1
    for char in reversed(compact):
        total += _VALUE[char] * weight
        weight = weight * WEIGHT % MODULUS
    return total % MODULUS == 0


def format_id(data: str) -> str:
    """`RX-XXXX-XXXX-C` for eight data characters."""
    if len(data) != DATA_LENGTH or any(c not in _VALUE for c in data):
        raise ValueError(f"prescription id data must be {DATA_LENGTH} characters of {ALPHABET}")
    return f"{PREFIX}-{data[:4]}-{data[4:]}-{check_character(data)}"


def new_id(randbelow=secrets.randbelow) -> str:
    """A new random prescription id."""
    return format_id("".join(ALPHABET[randbelow(MODULUS)] for _ in range(DATA_LENGTH)))


def parse(text: str) -> str:
    """The canonical form `RX-XXXX-XXXX-C` of `text`, or PrescriptionIdError saying why not."""
    if not isinstance(text, str) or not text.strip():
        raise PrescriptionIdError("the prescription id is empty")
    if len(text) > MAX_INPUT:
        raise PrescriptionIdError(f"not a prescription id: longer than {MAX_INPUT} characters")
    compact = _SEPARATORS.sub("", text).upper()
    if compact.startswith(PREFIX):
        compact = compact[len(PREFIX):]
    else:
        raise PrescriptionIdError(f"not a prescription id: it must start with {PREFIX}- "
                                  f"(format {PREFIX}-XXXX-XXXX-C)")
    compact = "".join(_READINGS.get(c, c) for c in compact)
    if len(compact) != DATA_LENGTH + 1:
        raise PrescriptionIdError(
            f"not a prescription id: {len(compact)} characters after {PREFIX}-, "
            f"expected {DATA_LENGTH + 1} (format {PREFIX}-XXXX-XXXX-C)")
    for position, char in enumerate(compact, start=1):
        if char not in _VALUE:
            shown = char if char.isprintable() and char.isascii() else f"U+{ord(char):04X}"
            raise PrescriptionIdError(
                f"not a prescription id: character {position} after {PREFIX}- ({shown!r}) is not "
                f"used in prescription ids (digits and letters except I, L, O, U, Z)")
    if not is_consistent(compact):
        raise PrescriptionIdError(
            "wrong check character: the prescription id was mistyped or misread "
            "(a character is wrong or two neighbours are swapped)")
    return f"{PREFIX}-{compact[:4]}-{compact[4:8]}-{compact[8]}"


def is_prescription_id(text: str) -> bool:
    try:
        parse(text)
    except PrescriptionIdError:
        return False
    return True

"""Prescription ids: format, tolerant parsing, precise errors, and a check character proven to
catch every single wrong character and every swap of two neighbours (exhaustively)."""
from __future__ import annotations

import random
import re

import pytest

from gateway.prescriptions import ids
from gateway.prescriptions.ids import ALPHABET, PrescriptionIdError


def _ids(count: int, seed: int = 7) -> list[str]:
    rand = random.Random(seed)
    return [ids.new_id(rand.randrange) for _ in range(count)]


def test_new_ids_have_the_format_and_parse_to_themselves():
    """RX-XXXX-XXXX-C from the 31-character alphabet, and parse() returns it unchanged."""
    for value in _ids(200):
        assert len(value) == 14 and value[:3] == "RX-" and value[7] == "-" and value[12] == "-"
        assert all(c in ALPHABET for c in value[3:].replace("-", ""))
        assert ids.parse(value) == value


def test_alphabet_is_prime_sized_and_unambiguous():
    """31 characters (a prime), without I, L, O, U, Z."""
    assert len(ALPHABET) == len(set(ALPHABET)) == 31
    assert not set("ILOUZ") & set(ALPHABET)


def test_every_single_substitution_is_caught():
    """Each of 14 positions x 30 other characters, for 1,000 ids: 420,000 wrong ids, all refused."""
    for value in _ids(1000, seed=11):
        compact = value[3:].replace("-", "")
        assert ids.is_consistent(compact)
        for position in range(len(compact)):
            for char in ALPHABET:
                if char != compact[position]:
                    wrong = compact[:position] + char + compact[position + 1:]
                    assert not ids.is_consistent(wrong), (value, position, char)


def test_every_swap_of_two_neighbours_is_caught():
    """Every adjacent transposition (check character included) of 20,000 ids that changes the
    id is refused by parse() with the check-character error."""
    for value in _ids(20000, seed=13):
        compact = value[3:].replace("-", "")
        for position in range(len(compact) - 1):
            a, b = compact[position], compact[position + 1]
            if a == b:
                continue
            swapped = compact[:position] + b + a + compact[position + 2:]
            assert not ids.is_consistent(swapped), (value, position)
            with pytest.raises(PrescriptionIdError, match="wrong check character"):
                ids.parse("RX" + swapped)


def test_parsing_tolerates_case_dashes_spaces_and_crockford_readings():
    """Lower case, missing or extra dashes and spaces, and O/I/L read as 0/1/1 all parse."""
    value = ids.format_id("10A0B1C0")
    assert value == ids.parse(value.lower())
    assert value == ids.parse(value.replace("-", ""))
    assert value == ids.parse(" rx " + value[3:].replace("-", " - ") + " ")
    assert value == ids.parse(value.replace("0", "O").replace("1", "l"))


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("ORD-2026-000123", "must start with RX-"),
    ("RX-ABCD-EFGH", "8 characters after RX-, expected 9"),
    ("RX-ABCD-EFGH-JK", "10 characters after RX-, expected 9"),
    ("RX-ABCD-EFGU-1", "character 8 after RX- ('U') is not used"),
    ("RX-ABCD-EF\u00c9H-1", "character 7 after RX- ('U+00C9') is not used"),
    ("RX-" + "A" * 80, "longer than 64"),
    ("RX-ABCD-EFGH-\x00", "character 9"),
])
def test_malformed_ids_are_refused_with_a_precise_reason(text, message):
    """Each malformed input names what is wrong with it."""
    with pytest.raises(PrescriptionIdError, match=re.escape(message)):
        ids.parse(text)


def test_a_wrong_check_character_says_so():
    """A valid-looking id with the wrong last character: the check-character error."""
    value = ids.format_id("ABCDEFGH")
    wrong = value[:-1] + next(c for c in ALPHABET if c != value[-1])
    with pytest.raises(PrescriptionIdError, match="wrong check character"):
        ids.parse(wrong)
    assert not ids.is_prescription_id(wrong) and ids.is_prescription_id(value)


def test_format_id_refuses_data_outside_the_alphabet():
    with pytest.raises(ValueError):
        ids.format_id("ABCDEFGU")
    with pytest.raises(ValueError):
        ids.format_id("ABC")

"""gateway.terminal: text made safe for the operator's terminal."""
from __future__ import annotations

import json

import pytest

from gateway.terminal import printable, printable_json


@pytest.mark.parametrize("raw, shown", [
    ("\x1b[2J", "\\x1b[2J"),                              # ESC: an escape sequence
    ("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),       # OSC 52 (clipboard write), BEL
    ("ab\x08\x08", "ab\\x08\\x08"),                       # backspaces
    ("\x00\x7f", "\\x00\\x7f"),                           # NUL, DEL
    ("\x9b31m\x85", "\\x9b31m\\x85"),                     # C1: CSI, NEL
    ("\u202eevil\u202c", "\\u202eevil\\u202c"),           # bidi override and its end
    ("\u2066x\u2069\u200f\u061c", "\\u2066x\\u2069\\u200f\\u061c"),  # isolates, RLM, ALM
    ("\u200b\ufeff\u2028", "\\u200b\\ufeff\\u2028"),      # zero-width space, BOM, line separator
    ("\U000e0041", "\\U000e0041"),                        # a tag character
    ("a\rb", "a\\rb"),                                    # CR: would overwrite the line's start
])
def test_controls_are_shown_escaped(raw, shown):
    assert printable(raw) == shown
    assert printable(raw, lines=True) == shown


def test_a_lone_surrogate_is_escaped():
    """From bytes decoded with surrogateescape: printed raw it would not even encode."""
    # ascii(): a failure report holding a surrogate would itself fail to be sent by xdist.
    assert ascii(printable("a\udc80")) == ascii("a\\udc80")


def test_one_line_unless_lines_are_wanted():
    assert printable("a\nb\tc") == "a\\nb\\tc"
    assert printable("a\nb\tc", lines=True) == "a\nb\tc"


@pytest.mark.parametrize("text", [
    "PID|1||4500987654^^^CHU_LYON^PI||الحسيني^يوسف^^^^^L~El Husseini^Youssef",
    "Hémoglobine : très élevée, œdème de Quincke",
    "12\u00a0345\u202f€ ; «\u00a0oui\u00a0»",                 # French no-break spaces
    "می\u200cخواهم 👩\u200d⚕️",                                  # ZWNJ, ZWJ
    "MSH|^~\\&|HIS|CHU|\\X0D\\ \\F\\",                         # HL7's own escapes
    "",
])
def test_ordinary_text_is_unchanged(text):
    assert printable(text) == text
    assert printable(text, lines=True) == text
    assert printable_json(text) == text


def test_json_stays_json_with_the_same_value():
    value = {"name": "Lefèvre\x1b[2J\x9b\u202eعلي\x7f\U000e0041", "lines": "a\nb"}
    for document in (json.dumps(value, ensure_ascii=False), json.dumps(value, ensure_ascii=False, indent=2)):
        safe = printable_json(document)
        assert json.loads(safe) == value
        assert not any(c in safe for c in "\x1b\x9b\u202e\x7f\U000e0041")
        assert "\\u009b\\u202eعلي\\u007f\\udb40\\udc41" in safe
    assert printable_json('{\n  "a": 1\n}') == '{\n  "a": 1\n}'  # indentation kept

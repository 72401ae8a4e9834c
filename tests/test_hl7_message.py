"""The tokenizer and escape decoding (pure)."""
import pytest

from adapters.hl7v2.escape import unescape
from adapters.hl7v2.message import MessageParseError, Separators, parse_message

MSG = ("MSH|^~\\&|HIS|CHU|GW|MA|20250114083512||ADT^A01^ADT_A01|C1|P|2.5\r"
       "PID|1||123^^^CHU^MR~BE123456^^^CNIE^NI||El Amrani^Youssef~العمراني^يوسف||19800101|M\r"
       "NTE|1||Line one\\.br\\Line two \\T\\ more\\F\\end\r")


def unescaped(text, codec="latin-1"):
    return unescape(text, "\\", "|", "^", "~", "&", codec)


def test_segments_and_fields_use_the_standard_numbering():
    """MSH-1 is the field separator, MSH-2 the encoding characters, SEG-n is fields[n]."""
    message = parse_message(MSG)
    msh = message.segments[0]
    assert msh.field(1) == "|" and msh.field(2) == "^~\\&" and msh.field(10) == "C1"
    assert message.value("PID", 3, 4) == "CHU"
    assert message.value("PID", 3, 1, repetition=2) == "BE123456"
    assert message.value("PID", 5, 1, repetition=2) == "العمراني"
    assert message.message_type == "ADT^A01"


@pytest.mark.parametrize("ending", ["\r", "\n", "\r\n"])
def test_line_endings_are_tolerated(ending):
    """CR, LF and CRLF all end segments, and blank lines are skipped."""
    message = parse_message(MSG.replace("\r", ending) + ending)
    assert [segment.name for segment in message.segments] == ["MSH", "PID", "NTE"]


def test_escapes_are_decoded_at_the_leaf_after_splitting():
    """An escaped delimiter never splits; \\.br\\ is a line break."""
    message = parse_message(MSG)
    assert message.value("NTE", 3) == "Line one\nLine two & more|end"


def test_repetitions_are_split_once_and_cached():
    """The same list comes back for a second read of a field."""
    segment = parse_message(MSG).segments[1]
    assert segment.repetitions(3, "~") is segment.repetitions(3, "~")
    assert segment.repetitions(99, "~") == []


@pytest.mark.parametrize("text, expected", [
    ("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", "a|b^c&d~e\\f"),
    ("\\X41C3A9\\", "Aé"),
    ("x\\.sp 2\\y", "x\n\ny"),
    ("a\\.sk 3\\b", "a   b"),
    ("\\H\\bold\\N\\", "bold"),
    ("C:\\temp\\file", "C:\\temp\\file"),  # not escapes: kept literally
    ("trailing \\", "trailing \\"),
    ("\\Xzz\\", "\\Xzz\\"),
    ("a\\.sk 999\\b", "a" + " " * 999 + "b"),
    # A count of 1,000 or more would expand 20 bytes into megabytes (and 5,000 digits are no
    # number Python reads); Arabic-Indic digits are no count: kept literally.
    ("a\\.sk 50000000\\b", "a\\.sk 50000000\\b"),
    ("x\\.sp " + "9" * 5000 + "\\y", "x\\.sp " + "9" * 5000 + "\\y"),
    ("a\\.sk \u0663\\b", "a\\.sk \u0663\\b"),
    # A sign without digits is no count (it raised ValueError from int('-')).
    ("x\\.sp -\\y", "x\\.sp -\\y"),
    ("a\\.sk+\\b", "a\\.sk+\\b"),
    # Character set switches are ISO 2022 escapes in hex, and carry no text; a path whose
    # folders begin with C, M or Z is text ('C:\\Mydocs\\x' lost its folder).
    ("x\\C2842\\y\\M2442\\z", "xyz"),
    ("C:\\Mydocs\\file.txt", "C:\\Mydocs\\file.txt"),
    ("C:\\Cafe\\menu", "C:\\Cafe\\menu"),
    # A local escape means what only its sender knows: kept, not dropped.
    ("D:\\Zone1\\scan", "D:\\Zone1\\scan"),
    # Bytes that are no text in the character set are kept as written, not made U+FFFD.
    ("\\XFF\\", "\\XFF\\"),
])
def test_escape_sequences(text, expected):
    """Each sequence of HL7 chapter 2.7; unknown or unterminated ones are kept as written."""
    assert unescaped(text, "utf-8") == expected


def test_no_subcomponent_escape_without_a_subcomponent_separator():
    """\\T\\ stands for the subcomponent separator; with none (3-character MSH-2, ASTM) it
    is no escape and is kept, not decoded to nothing."""
    assert unescape("a\\T\\b", "\\", "|", "^", "~", "") == "a\\T\\b"


def test_hex_escape_uses_the_message_character_set():
    """\\X\\ bytes are text in the message's character set (Arabic in windows-1256)."""
    assert unescaped("\\XC7E1\\", "cp1256") == "ال"


def test_bom_and_leading_blank_lines_are_skipped():
    """A UTF-8 BOM decoded as U+FEFF and stray line breaks before MSH are ignored."""
    assert parse_message("\ufeff\r\n" + MSG).segments[0].name == "MSH"


@pytest.mark.parametrize("text, reason", [
    ("", "empty message"),
    ("PID|1", "does not start with an MSH"),
    ("MSH|^~", "truncated"),
    ("MSHA^~\\&|", "field separator"),
    ("MSH|^^\\&|A", "encoding characters"),
    ("MSH|^~\\&|A\rP D|x", "invalid name"),
    ("MSH|^~\\&|A\rPÎD|x", "invalid name 'PÎD'"),  # letters of ASCII only
])
def test_malformed_messages_are_refused_with_a_reason(text, reason):
    """Every refusal names what is wrong."""
    with pytest.raises(MessageParseError) as caught:
        parse_message(text)
    assert reason in caught.value.reason


def test_custom_delimiters_are_read_from_msh():
    """A sender's own separators are honoured (here '#' for components)."""
    message = parse_message("MSH|#~\\&|A|B|||||ADT#A01|1|P|2.5\rPID|1||9#X#Y#AUTH")
    assert message.separators == Separators("|", "#", "~", "\\", "&", "utf-8")
    assert message.value("PID", 3, 4) == "AUTH"


def test_truncation_character_escape_from_v2_7():
    """MSH-2 '^~\\&#' declares the v2.7 truncation character: '\\P\\' is a '#' in the text
    (it stayed '\\P\\'); without a fifth character it is no escape and is kept."""
    v27 = parse_message("MSH|^~\\&#|A|B|||||ADT^A01|1|P|2.7\rNTE|1||Room \\P\\12")
    assert v27.separators.truncation == "#"
    assert v27.value("NTE", 3) == "Room #12"
    v25 = parse_message("MSH|^~\\&|A|B|||||ADT^A01|1|P|2.5\rNTE|1||Room \\P\\12")
    assert v25.value("NTE", 3) == "Room \\P\\12"


def test_three_encoding_characters_mean_no_subcomponents():
    """MSH-2 '^~\\' (no subcomponent separator, allowed by the standard): '&' is then text."""
    message = parse_message("MSH|^~\\|A|B|||||ORU^R01|1|P|2.5.1\rPID|1||9^^^LAB&1.2&ISO")
    assert message.separators.subcomponent == ""
    assert message.value("PID", 3, 4) == "LAB&1.2&ISO"


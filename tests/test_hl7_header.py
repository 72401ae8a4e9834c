"""MSH reading from raw bytes: delimiters, required fields, errors with their ERR location."""
import pytest

from adapters.hl7v2.codes import ErrorCondition
from adapters.hl7v2.header import (HeaderError, Location, message_start, parse_header,
                                   read_delimiters)


def msh(**fields) -> bytes:
    """An MSH segment (CR-terminated) with defaults for MSH-3..12, overridden by msh_<n>=value."""
    values = {2: "^~\\&", 3: "LAB", 4: "CHU_X", 5: "HIE", 6: "MA", 7: "20260101120000",
              9: "ORU^R01^ORU_R01", 10: "CTRL0001", 11: "P", 12: "2.5"}
    for key, value in fields.items():
        values[int(key.split("_")[1])] = value
    top = max(values)
    parts = ["MSH"] + [values.get(n, "") for n in range(2, top + 1)]
    return "|".join(parts).encode("latin-1") + b"\r"


PID = b"PID|1||123^^^CHU_X^PI||Test^Alice\r"


def header_error(raw: bytes) -> HeaderError:
    with pytest.raises(HeaderError) as caught:
        parse_header(raw)
    return caught.value


def test_standard_msh():
    """A standard MSH gives its delimiters, type, control id, processing id and version."""
    header = parse_header(msh(msh_18="8859/1") + PID)
    d = header.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == (
        b"|", b"^", b"~", b"\\", b"&")
    assert d.encoding_characters == b"^~\\&"
    assert header.start == 0
    assert header.sending_application == b"LAB" and header.sending_facility == b"CHU_X"
    assert (header.message_code, header.trigger_event, header.message_structure) == (
        b"ORU", b"R01", b"ORU_R01")
    assert header.message_type == "ORU^R01"
    assert header.control_id == b"CTRL0001"
    assert header.processing_id == b"P" and header.version == b"2.5"
    assert header.charset == "8859/1"
    assert header.field(1) == b"|" and header.field(2) == b"^~\\&"
    assert header.field(7) == b"20260101120000"
    assert header.field(40) == b""
    assert len(header.fields) >= 18


def test_non_default_delimiters():
    """Fields are split on the declared MSH-1 and components on MSH-2's first character."""
    raw = b"MSH#$*@!#LAB#CHU_X#HIE#MA#20260101##ADT$A01$ADT_A01#C9#T$A#2.5.1$MA\rPID#1\r"
    header = parse_header(raw)
    d = header.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == (
        b"#", b"$", b"*", b"@", b"!")
    assert header.sending_application == b"LAB"
    assert (header.message_code, header.trigger_event, header.message_structure) == (
        b"ADT", b"A01", b"ADT_A01")
    assert header.control_id == b"C9"
    assert header.processing_id == b"T"
    assert header.version == b"2.5.1"
    assert header.field(9) == b"ADT$A01$ADT_A01"


def test_read_delimiters_for_batch_header():
    """read_delimiters reads BHS-1/BHS-2 the same way as MSH-1/MSH-2."""
    d = read_delimiters(b"BHS|^~\\&|LAB", "BHS")
    assert d.field == b"|" and d.component == b"^"


def test_five_encoding_characters_v27():
    """MSH-2 with the v2.7 truncation character (5 characters) is accepted as sent."""
    header = parse_header(msh(msh_2="^~\\&#", msh_12="2.7"))
    d = header.delimiters
    assert d.encoding_characters == b"^~\\&#"
    assert (d.component, d.repetition, d.escape, d.subcomponent) == (b"^", b"~", b"\\", b"&")
    assert header.version == b"2.7" and header.control_id == b"CTRL0001"


@pytest.mark.parametrize("noise", [b"\xef\xbb\xbf", b"\r\n", b"\n\n", b"\xef\xbb\xbf\r\n \t"])
def test_bom_and_leading_line_breaks_are_skipped(noise):
    """A UTF-8 BOM and stray CR/LF/blanks before MSH are skipped; start is MSH's offset."""
    raw = noise + msh() + PID
    assert message_start(raw) == len(noise)
    header = parse_header(raw)
    assert header.start == len(noise)
    assert header.control_id == b"CTRL0001"


def test_message_start_without_noise():
    """message_start is 0 for a message starting with MSH."""
    assert message_start(msh()) == 0


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n", b"\r"])
def test_segment_terminators(terminator):
    """MSH ends at CR, LF or CRLF: the last MSH field does not swallow the next segment."""
    raw = msh(msh_18="UNICODE UTF-8").rstrip(b"\r") + terminator + PID.rstrip(b"\r") + terminator
    header = parse_header(raw)
    assert header.charset == "UNICODE UTF-8"
    assert header.field(19) == b""


def test_msh_without_terminator():
    """An MSH that is the whole message (no segment terminator) is still read."""
    header = parse_header(msh().rstrip(b"\r"))
    assert header.version == b"2.5"


@pytest.mark.parametrize("number", [9, 10, 11, 12])
def test_missing_required_field(number):
    """An empty MSH-9, -10, -11 or -12 gives REQUIRED_FIELD_MISSING at MSH-n."""
    error = header_error(msh(**{f"msh_{number}": ""}) + PID)
    assert error.condition is ErrorCondition.REQUIRED_FIELD_MISSING
    assert error.location == Location("MSH", 1, number)
    assert f"MSH-{number}" in error.reason
    # What was read is kept, to answer from it.
    assert error.field(3) == b"LAB" and error.delimiters.field == b"|"


def test_missing_fields_in_short_msh():
    """An MSH that stops after MSH-2 reports MSH-9 missing."""
    error = header_error(b"MSH|^~\\&\r")
    assert error.condition is ErrorCondition.REQUIRED_FIELD_MISSING
    assert error.location == Location("MSH", 1, 9)


def test_missing_control_id_keeps_other_fields():
    """A HeaderError for MSH-10 still carries MSH-9 and MSH-12 for the ACK."""
    error = header_error(msh(msh_10=""))
    assert error.field(9) == b"ORU^R01^ORU_R01" and error.field(12) == b"2.5"
    assert error.field(1) == b""  # MSH-1 is not a field value in the raw list


@pytest.mark.parametrize("raw, reason", [
    (PID + msh(), "does not start with an MSH"),
    (b"", "empty"),
    (b"\r\n\r\n", "empty"),
    (b"\x00\xff\xfe\x81garbage\x1b", "does not start with an MSH"),
    (b"msh|^~\\&|LAB", "does not start with an MSH"),
])
def test_no_msh(raw, reason):
    """A message without a leading MSH gives SEGMENT_SEQUENCE_ERROR at MSH."""
    error = header_error(raw)
    assert error.condition is ErrorCondition.SEGMENT_SEQUENCE_ERROR
    assert error.location.segment == "MSH" and error.location.field == 0
    assert reason in error.reason
    assert error.fields == []


@pytest.mark.parametrize("raw, field", [
    (b"MSHA^~\\&ALABACHU_X", 1),  # a letter as field separator
    (b"MSH1^~\\&1LAB", 1),  # a digit as field separator
    (b"MSH ^~\\& LAB", 1),  # a blank
    (b"MSH|^^\\&|LAB|CHU_X||||ORU^R01|1|P|2.5", 2),  # repeated encoding character
    (b"MSH|^|\\&|LAB|CHU_X||||ORU^R01|1|P|2.5", 2),  # field separator among encoding characters
    (b"MSH|^~\\|LAB|CHU_X||||ORU^R01|1|P|2.5", 2),  # 3 encoding characters
    (b"MSH|^~\\&#$|LAB|CHU_X||||ORU^R01|1|P|2.5", 2),  # 6 encoding characters
    (b"MSH|^~a&|LAB|CHU_X||||ORU^R01|1|P|2.5", 2),  # a letter among encoding characters
    (b"MSH|^~", 2),  # truncated MSH
])
def test_wrong_delimiters(raw, field):
    """Bad MSH-1 or MSH-2 gives DATA_TYPE_ERROR located at that field."""
    error = header_error(raw)
    assert error.condition is ErrorCondition.DATA_TYPE_ERROR
    assert error.location == Location("MSH", 1, field)


def test_msh_alone_is_truncated():
    """'MSH' with nothing after it has no field separator: MSH-1 missing."""
    error = header_error(b"MSH\rPID|1\r")
    assert error.location == Location("MSH", 1, 1)
    assert error.condition is ErrorCondition.REQUIRED_FIELD_MISSING


def test_wrong_delimiters_after_a_good_message_with_same_key():
    """A bad MSH-2 is refused even after good messages have been read (no stale cache hit)."""
    parse_header(msh())
    with pytest.raises(HeaderError):
        parse_header(b"MSH|^~\\|LAB")
    assert parse_header(msh()).delimiters.escape == b"\\"


@pytest.mark.parametrize("msh15, msh16, enhanced", [
    ("", "", False), ("AL", "", True), ("", "NE", True), ("AL", "NE", True), ("NE", "NE", True),
])
def test_enhanced_mode(msh15, msh16, enhanced):
    """Enhanced acknowledgement mode is on when MSH-15 or MSH-16 is valued."""
    header = parse_header(msh(msh_15=msh15, msh_16=msh16))
    assert header.enhanced_mode is enhanced


@pytest.mark.parametrize("kind, is_ack", [
    ("ACK", True), ("ACK^R01^ACK", True), ("ACK^A01", True), ("ORU^R01", False), ("ADT^A08", False),
])
def test_is_acknowledgement(kind, is_ack):
    """An MSH-9 starting with ACK marks an acknowledgement."""
    assert parse_header(msh(msh_9=kind)).is_acknowledgement is is_ack


def test_msh18_repetition_takes_the_first():
    """MSH-18 with repetitions gives the first one as the message character set."""
    header = parse_header(msh(msh_18="8859/6~UNICODE UTF-8", msh_20="ISO 2022-1994"))
    assert header.charset == "8859/6"


def test_msh18_absent():
    """Without MSH-18 the charset is the empty string."""
    assert parse_header(msh()).charset == ""


def test_components_beyond_first_ignored_for_ids():
    """MSH-11 and MSH-12 keep only their first component."""
    header = parse_header(msh(msh_11="P^T", msh_12="2.5.1^MAR^HL70399"))
    assert header.processing_id == b"P" and header.version == b"2.5.1"


def test_message_type_without_trigger():
    """An MSH-9 with only a code gives an empty trigger and structure."""
    header = parse_header(msh(msh_9="ACK"))
    assert header.trigger_event == b"" and header.message_structure == b""
    assert header.message_type == "ACK"

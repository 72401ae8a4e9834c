"""ACK building: header echo, MSA, ERR in the v2.5 and pre-v2.5 forms, ids and timestamps."""
from datetime import datetime, timezone

import pytest

from adapters.hl7v2.ack import (AckBuilder, ControlIds, ErrorDetail, Hl7Clock, Sender, ack_code_of,
                                escape)
from adapters.hl7v2.codes import AckCode, AppErrorCode, ErrorCondition, Outcome, Severity
from adapters.hl7v2.header import Delimiters, HeaderError, Location, parse_header


def at(*when) -> float:
    """A UTC instant as a POSIX timestamp."""
    return datetime(*when, tzinfo=timezone.utc).timestamp()


FIXED = at(2026, 6, 1, 9, 15, 0)  # outside Ramadan: Morocco at UTC+1


def builder(**kwargs) -> AckBuilder:
    """An AckBuilder with a fixed clock and predictable control ids."""
    kwargs.setdefault("clock", Hl7Clock(now=lambda: FIXED))
    kwargs.setdefault("control_ids", ControlIds(prefix="GW"))
    return AckBuilder(**kwargs)


def message(version="2.5", kind="ORU^R01^ORU_R01", msh15="", msh16="", msh18="",
            control_id="LAB000123", fs="|", enc="^~\\&") -> bytes:
    """A synthetic message: MSH with the given values, then a PID."""
    fields = ["MSH", enc, "SIL_LABO", "CHU_IBN_SINA", "HIE", "MA", "20260315103000", "", kind,
              control_id, "P", version, "", "", msh15, msh16, "MAR", msh18]
    msh = fs.join(fields).encode("ascii")
    pid = fs.join(["PID", "1", "", "X123"]).encode("ascii")
    return msh + b"\r" + pid + b"\r"


def segments(ack: bytes, fs=b"|") -> dict[bytes, list[bytes]]:
    """The ACK's segments by id, each as its field list (index 0 = segment id)."""
    assert ack.endswith(b"\r") and b"\n" not in ack
    out = {}
    for segment in ack.rstrip(b"\r").split(b"\r"):
        fields = segment.split(fs)
        assert fields[0] not in out
        out[fields[0]] = fields
    return out


def msh_field(fields: list[bytes], number: int) -> bytes:
    """MSH-n from an MSH field list (MSH-1 is the separator, so MSH-n is index n - 1)."""
    return fields[number - 1] if number - 1 < len(fields) else b""


def test_positive_ack_original_mode():
    """An ACK for a v2.5 ORU^R01 swaps sender/receiver, has a new MSH-10 and MSA AA + MSH-10."""
    header = parse_header(message())
    ack = builder().build(header, Outcome.ACCEPT, enhanced=False)
    seg = segments(ack)
    msh = seg[b"MSH"]
    assert msh_field(msh, 2) == b"^~\\&"
    assert (msh_field(msh, 3), msh_field(msh, 4)) == (b"MA_HIE_GATEWAY", b"MA_HIE")
    assert (msh_field(msh, 5), msh_field(msh, 6)) == (b"SIL_LABO", b"CHU_IBN_SINA")
    assert msh_field(msh, 7) == b"20260601101500+0100"
    assert msh_field(msh, 9) == b"ACK^R01^ACK"
    new_id = msh_field(msh, 10)
    assert new_id and new_id != b"LAB000123" and len(new_id) <= 20
    assert msh_field(msh, 11) == b"P" and msh_field(msh, 12) == b"2.5"
    assert seg[b"MSA"] == [b"MSA", b"AA", b"LAB000123"]
    assert b"ERR" not in seg
    assert ack_code_of(ack) is AckCode.APPLICATION_ACCEPT


def test_custom_sender_names_the_gateway():
    """MSH-3/4 of the ACK are the configured Sender."""
    ack = builder(sender=Sender(b"HIE_APP", b"HIE_NODE_2")).build(
        parse_header(message()), Outcome.ACCEPT, False)
    msh = segments(ack)[b"MSH"]
    assert (msh_field(msh, 3), msh_field(msh, 4)) == (b"HIE_APP", b"HIE_NODE_2")


def test_positive_ack_enhanced_mode():
    """In enhanced mode a positive ACK is CA."""
    ack = builder().build(parse_header(message(msh15="AL", msh16="NE")), Outcome.ACCEPT, True)
    assert segments(ack)[b"MSA"][1] == b"CA"
    assert ack_code_of(ack) is AckCode.COMMIT_ACCEPT


@pytest.mark.parametrize("outcome, enhanced, code", [
    (Outcome.ERROR, False, b"AE"), (Outcome.REJECT, False, b"AR"),
    (Outcome.ERROR, True, b"CE"), (Outcome.REJECT, True, b"CR"),
])
def test_negative_ack_codes(outcome, enhanced, code):
    """MSA-1 follows the outcome and the acknowledgement mode."""
    error = ErrorDetail(ErrorCondition.APPLICATION_INTERNAL_ERROR, Location("MSH", 1), "failed")
    ack = builder().build(parse_header(message()), outcome, enhanced, error)
    assert segments(ack)[b"MSA"][1] == code


def test_msh18_echoed_when_present():
    """MSH-18 of the original is copied to the ACK."""
    ack = builder().build(parse_header(message(msh18="UNICODE UTF-8")), Outcome.ACCEPT, False)
    assert msh_field(segments(ack)[b"MSH"], 18) == b"UNICODE UTF-8"


def test_msh18_absent_when_not_sent():
    """Without MSH-18 in the original the ACK's MSH stops at MSH-12."""
    ack = builder().build(parse_header(message()), Outcome.ACCEPT, False)
    assert len(segments(ack)[b"MSH"]) == 12  # "MSH", then MSH-2 .. MSH-12


def test_control_ids_differ_between_acks():
    """Two ACKs from one builder get different MSH-10 values."""
    b = builder()
    header = parse_header(message())
    first = segments(b.build(header, Outcome.ACCEPT, False))[b"MSH"][9]
    second = segments(b.build(header, Outcome.ACCEPT, False))[b"MSH"][9]
    assert first != second


def test_negative_ack_v25_err_segment():
    """A v2.5 negative ACK has ERR-2 location, ERR-3 code^text^HL70357, ERR-4 E,
    ERR-5 our code^text^MA-HIE-ERR and ERR-7 the reason."""
    error = ErrorDetail(ErrorCondition.UNSUPPORTED_EVENT_CODE, Location("MSH", 1, 9, 2),
                        "trigger event 'X99' is not in HL7 table 0003", AppErrorCode.NOT_HL7)
    ack = builder().build(parse_header(message()), Outcome.REJECT, False, error)
    err = segments(ack)[b"ERR"]
    assert err[1] == b""  # no ERR-1 from v2.5
    assert err[2] == b"MSH^1^9^1^2"
    assert err[3] == b"201^Unsupported event code^HL70357"
    assert err[4] == b"E"
    assert err[5] == b"NOT_HL7^Not an HL7 v2 message^MA-HIE-ERR"
    assert err[6] == b""
    assert err[7] == b"trigger event 'X99' is not in HL7 table 0003"
    assert segments(ack)[b"MSA"] == [b"MSA", b"AR", b"LAB000123"]  # no MSA-3 from v2.5


def test_negative_ack_v25_location_and_severity_variants():
    """ERR-2 omits unset field/component; ERR-5 is empty without an app code; severity is kept."""
    error = ErrorDetail(ErrorCondition.REQUIRED_FIELD_MISSING, Location("PID", 2, 3), "PID-3 empty",
                        severity=Severity.WARNING)
    err = segments(builder().build(parse_header(message()), Outcome.ERROR, False, error))[b"ERR"]
    assert err[2] == b"PID^2^3"
    assert err[3] == b"101^Required field missing^HL70357"
    assert err[4] == b"W" and err[5] == b""
    error = ErrorDetail(ErrorCondition.SEGMENT_SEQUENCE_ERROR, Location("MSH", 1), "no MSH")
    err = segments(builder().build(parse_header(message()), Outcome.REJECT, False, error))[b"ERR"]
    assert err[2] == b"MSH^1"


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4"])
def test_negative_ack_legacy_err1_and_msa3(version):
    """Before v2.5 the ERR is ERR-1 (segment^sequence^field^code&text&HL70357) and the
    reason is in MSA-3."""
    error = ErrorDetail(ErrorCondition.REQUIRED_FIELD_MISSING, Location("PID", 1, 5),
                        "PID-5 patient name is empty", AppErrorCode.CHARSET_INVALID)
    ack = builder().build(parse_header(message(version=version, kind="ADT^A01")),
                          Outcome.ERROR, False, error)
    seg = segments(ack)
    assert seg[b"MSA"] == [b"MSA", b"AE", b"LAB000123", b"PID-5 patient name is empty"]
    assert seg[b"ERR"] == [b"ERR", b"PID^1^5^101&Required field missing&HL70357"]
    assert msh_field(seg[b"MSH"], 12) == version.encode()


@pytest.mark.parametrize("version, kind", [
    ("2.3", b"ACK^A01"), ("2.3.1", b"ACK^A01^ACK"), ("2.5", b"ACK^A01^ACK"), ("2.2", b"ACK^A01"),
])
def test_msh9_message_structure_from_v231(version, kind):
    """MSH-9 of the ACK carries the ACK structure from v2.3.1 only."""
    ack = builder().build(parse_header(message(version=version, kind="ADT^A01")),
                          Outcome.ACCEPT, False)
    assert msh_field(segments(ack)[b"MSH"], 9) == kind


def test_msh9_without_trigger():
    """An original without a trigger event is acknowledged with a bare ACK type."""
    ack = builder().build(parse_header(message(kind="ORU")), Outcome.ACCEPT, False)
    assert msh_field(segments(ack)[b"MSH"], 9) == b"ACK"


def test_non_default_delimiters_used_throughout():
    """An original with # $ * @ ! delimiters gets an ACK built with the same delimiters."""
    raw = message(fs="#", enc="$*@!", kind="ORU$R01$ORU_R01", msh18="8859/6")
    header = parse_header(raw)
    error = ErrorDetail(ErrorCondition.DATA_TYPE_ERROR, Location("PID", 1, 5, 1),
                        "bad #value$ with @ and ! and *", AppErrorCode.CHARSET_INVALID)
    ack = builder().build(header, Outcome.ERROR, False, error)
    assert b"|" not in ack and b"^" not in ack
    seg = segments(ack, fs=b"#")
    msh = seg[b"MSH"]
    assert msh_field(msh, 2) == b"$*@!"
    assert msh_field(msh, 9) == b"ACK$R01$ACK"
    assert msh_field(msh, 18) == b"8859/6"
    err = seg[b"ERR"]
    assert err[2] == b"PID$1$5$1$1"
    assert err[3] == b"102$Data type error$HL70357"
    assert err[5] == b"CHARSET_INVALID$Bytes not valid in the declared character set$MA-HIE-ERR"
    assert err[7] == b"bad @F@value@S@ with @E@ and @T@ and @R@"


def test_our_own_names_are_escaped_for_the_senders_delimiters():
    """A sender whose field separator is '_' and component separator '-' (both punctuation,
    both allowed) must still read MSH-3, MSH-4, MSH-10 and ERR-5 where they are: our names
    'MA_HIE_GATEWAY', 'NOT_HL7', 'MA-HIE-ERR' are escaped, not sent as separators."""
    raw = b"MSH_-~\\&_LABO_CHU_HIE_MA_20260315103000__ORU-R01_LAB1_P_2.5\rPID_1\r"
    header = parse_header(raw)
    error = ErrorDetail(ErrorCondition.DATA_TYPE_ERROR, Location("PID", 1, 3), "bad",
                        AppErrorCode.NOT_HL7)
    seg = segments(builder().build(header, Outcome.REJECT, False, error), fs=b"_")
    msh = seg[b"MSH"]
    assert msh_field(msh, 3) == b"MA\\F\\HIE\\F\\GATEWAY"
    assert msh_field(msh, 4) == b"MA\\F\\HIE"
    assert (msh_field(msh, 5), msh_field(msh, 10)) == (b"LABO", b"GW00000001")
    assert seg[b"ERR"][5] == b"NOT\\F\\HL7-Not an HL7 v2 message-MA\\S\\HIE\\S\\ERR"


@pytest.mark.parametrize("encoding", [b"+~\\&", b"^-\\&"])
def test_msh7_has_no_offset_for_a_sender_separating_with_a_sign(encoding):
    """'20250114083512+0100' read by a sender whose component (or repetition) separator is '+'
    or '-' is two components: our MSH-7 then goes without its offset; with the usual
    separators it keeps it."""
    raw = b"MSH|" + encoding + b"|LABO|CHU|HIE|MA|20260315103000||ORU|LAB1|P|2.5\rPID|1\r"
    stamp = msh_field(segments(builder().build(parse_header(raw), Outcome.ACCEPT, False))[b"MSH"], 7)
    assert len(stamp) == 14 and stamp.isdigit(), stamp
    usual = msh_field(segments(builder().build(parse_header(message()), Outcome.ACCEPT, False))[b"MSH"], 7)
    assert len(usual) == 19 and usual[14:15] in (b"+", b"-"), usual


def test_ack_from_header_error_partial_read():
    """An ACK can be built from a HeaderError: it echoes what was read and defaults the rest."""
    raw = message(control_id="")
    with pytest.raises(HeaderError) as caught:
        parse_header(raw)
    error = caught.value
    detail = ErrorDetail(error.condition, error.location, error.reason)
    ack = builder().build(error, Outcome.REJECT, False, detail)
    seg = segments(ack)
    assert msh_field(seg[b"MSH"], 5) == b"SIL_LABO"
    assert seg[b"MSA"] == [b"MSA", b"AR", b""]
    assert seg[b"ERR"][2] == b"MSH^1^10"


def test_ack_from_nothing_uses_defaults():
    """An ACK for unreadable input uses default delimiters, processing id P and version 2.5."""
    error = HeaderError(ErrorCondition.SEGMENT_SEQUENCE_ERROR, Location("MSH", 1), "not HL7")
    detail = ErrorDetail(error.condition, error.location, error.reason, AppErrorCode.NOT_HL7)
    ack = builder().build(error, Outcome.REJECT, False, detail)
    seg = segments(ack)
    assert msh_field(seg[b"MSH"], 9) == b"ACK"
    assert msh_field(seg[b"MSH"], 11) == b"P" and msh_field(seg[b"MSH"], 12) == b"2.5"
    assert seg[b"ERR"][5].startswith(b"NOT_HL7^")


def test_escape_default_delimiters():
    """escape() replaces each separator and the escape character by its escape sequence."""
    assert escape("a|b^c~d&e\\f") == b"a\\F\\b\\S\\c\\R\\d\\T\\e\\E\\f"
    assert escape("plain text 123") == b"plain text 123"


def test_escape_custom_delimiters():
    """escape() uses the message's own delimiters."""
    d = Delimiters(b"#", b"$", b"*", b"@", b"!", b"$*@!")
    assert escape("x#y$z*w@v!u|^", d) == b"x@F@y@S@z@R@w@E@v@T@u|^"


def test_escape_non_ascii_stays_ascii():
    """escape() output is ASCII even for non-ASCII reasons, with no raw separator."""
    out = escape("é|")
    out.decode("ascii")
    assert out.endswith(b"\\F\\") and b"|" not in out


@pytest.mark.parametrize("ack, code", [
    (b"MSH|^~\\&|A|B\rMSA|CE|1\r", AckCode.COMMIT_ERROR),
    (b"MSH|^~\\&|A|B\rMSA|AR|1\rERR||MSH^1|100\r", AckCode.APPLICATION_REJECT),
    (b"MSH|^~\\&|A|B\r", None),
    (b"MSH|^~\\&|A|B\rMSA|ZZ|1\r", None),
    (b"MSA", None),
    (b"MSH|^~\\&|HMSA|B\rMSA|CA|1\r", AckCode.COMMIT_ACCEPT),  # "MSA" inside MSH is not the segment
])
def test_ack_code_of(ack, code):
    """ack_code_of reads MSA-1, or None when there is no valid MSA-1."""
    assert ack_code_of(ack) == code


def test_control_ids_unique_and_short():
    """10,000 control ids from one generator are unique and at most 20 characters."""
    ids = ControlIds()
    values = [ids.next() for _ in range(10_000)]
    assert len(set(values)) == len(values)
    assert max(len(v) for v in values) <= 20
    assert all(v.isalnum() for v in values)


def test_control_ids_differ_between_generators():
    """Two generators (two processes) do not produce the same ids."""
    first, second = ControlIds(), ControlIds()
    assert {first.next() for _ in range(100)}.isdisjoint(second.next() for _ in range(100))


@pytest.mark.parametrize("instant, text", [
    (at(2026, 3, 15, 10, 30, 0), b"20260315103000+0000"),  # Ramadan 2026: UTC+0
    (at(2026, 2, 15, 2, 0, 0), b"20260215020000+0000"),  # first second of UTC+0
    (at(2026, 2, 15, 1, 59, 59), b"20260215025959+0100"),  # last second before
    (at(2026, 3, 22, 1, 59, 59), b"20260322015959+0000"),  # last second of UTC+0
    (at(2026, 3, 22, 2, 0, 0), b"20260322030000+0100"),  # back to UTC+1
    (at(2026, 1, 10, 8, 0, 0), b"20260110090000+0100"),
    (at(2026, 7, 1, 23, 30, 0), b"20260702003000+0100"),  # next local day
])
def test_hl7_clock_africa_casablanca(instant, text):
    """Hl7Clock formats local Moroccan time with its offset: +0000 during Ramadan, else +0100."""
    assert Hl7Clock(now=lambda: instant).timestamp() == text


def test_hl7_clock_follows_time():
    """Hl7Clock gives a new text when the second changes and the same text within a second."""
    now = [at(2026, 6, 1, 12, 0, 0)]
    clock = Hl7Clock(now=lambda: now[0])
    first = clock.timestamp()
    now[0] += 0.5
    assert clock.timestamp() == first
    now[0] += 0.5
    assert clock.timestamp() == b"20260601130001+0100"


def test_hl7_clock_other_zone():
    """Hl7Clock uses the zone it is given."""
    assert Hl7Clock("UTC", now=lambda: at(2026, 3, 15, 10, 30)).timestamp() == b"20260315103000+0000"

"""Ingest inspection: one frame in, the records to store and their answers out (pure code)."""
import glob
import hashlib
import os

import hl7msgs
import pytest

from adapters.hl7v2.ack import AckBuilder, ControlIds, ErrorDetail, Hl7Clock, ack_code_of
from adapters.hl7v2.codes import AckCode, AppErrorCode, ErrorCondition, Outcome
from adapters.hl7v2.header import Location, parse_header
from adapters.mllp.client import split_messages
from conftest import CORPUS
from gateway.config import SenderConfig
from gateway.facilities import FacilityRegistry
from gateway.ingest.inspect import FieldView, IngestPolicy, Inspector, locate, refuse_reused
from gateway.ingest.model import MessageStatus


def make_builder() -> AckBuilder:
    return AckBuilder(clock=Hl7Clock(now=lambda: 1_780_000_000.0), control_ids=ControlIds("T"))


def inspector(**policy) -> Inspector:
    """An Inspector for a test listener, with policy overrides."""
    return Inspector(make_builder(), IngestPolicy("mllp-test", **policy))


def message(kind="ORU^R01^ORU_R01", version="2.5", processing="P", msh15="", msh16="",
            msh18="", facility="CHU_X", control_id="MSG0001", pid5=b"Test^Alice",
            fs="|", enc="^~\\&") -> bytes:
    """A synthetic message (MSH, PID, OBX) with the given header values."""
    msh = fs.join(["MSH", enc, "LAB", facility, "HIE", "MA", "20260101120000", "", kind,
                   control_id, processing, version, "", "", msh15, msh16, "MAR", msh18])
    return (msh.encode("ascii") + b"\r" + b"PID|1||X1^^^CHU_X^PI||" + pid5 + b"\r"
            + b"OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL\r")


def segments(ack: bytes) -> dict[bytes, list[bytes]]:
    """ACK segments by id (last wins), each as its fields."""
    return {s.split(b"|")[0]: s.split(b"|") for s in ack.rstrip(b"\r").split(b"\r")}


def err(ack: bytes) -> list[bytes]:
    return segments(ack)[b"ERR"]


@pytest.mark.parametrize("kind", ["oru", "adt"])
def test_benchmark_messages_accepted_ca(kind):
    """The benchmark messages (enhanced mode, UTF-8) are RECEIVED with a CA echoing MSH-10."""
    raw = hl7msgs.message(kind, 1).encode("utf-8")
    result = inspector().frame(raw)
    [item] = result.items
    assert item.status is MessageStatus.RECEIVED and item.outcome is Outcome.ACCEPT
    assert item.error is None
    assert ack_code_of(item.ack) is AckCode.COMMIT_ACCEPT
    assert segments(item.ack)[b"MSA"][2] == b"B00000000001"
    assert result.response(make_builder()) == item.ack
    assert item.codec == "utf-8" and item.charset == "UNICODE UTF-8"
    assert item.sending_application == "SIH_LABO" and item.sending_facility == "CHU_LYON"
    assert item.receiving_application == "PASSERELLE_HL7" and item.receiving_facility == "GHT_RHONE"
    assert item.control_id == "B00000000001" and item.version == "2.5"
    assert item.processing_id == "P" and item.size == len(raw) and not item.truncated
    assert item.deduplicated


def test_sha256_of_exact_raw_bytes():
    """sha256 is the digest of the exact bytes received, and raw keeps them unchanged."""
    raw = hl7msgs.message("oru", 42).encode("utf-8")
    item = inspector().message(raw)
    assert item.raw is raw or item.raw == raw
    assert item.sha256 == hashlib.sha256(raw).digest()


def test_original_mode_accepted_aa():
    """A message with MSH-15/16 empty gets AA."""
    item = inspector().message(message())
    assert item.status is MessageStatus.RECEIVED
    assert ack_code_of(item.ack) is AckCode.APPLICATION_ACCEPT
    assert segments(item.ack)[b"MSA"] == [b"MSA", b"AA", b"MSG0001"]
    assert item.message_type == "ORU^R01"


def test_acknowledgement_is_ignored():
    """An ACK sent to us is stored as IGNORED and never acknowledged."""
    raw = b"MSH|^~\\&|LAB|CHU_X|HIE|MA|20260101||ACK^R01^ACK|A77|P|2.5\rMSA|AA|MSG0001\r"
    item = inspector().message(raw)
    assert item.status is MessageStatus.IGNORED
    assert item.ack is None
    assert inspector().frame(raw).response(make_builder()) is None


@pytest.mark.parametrize("kwargs, policy, code, location", [
    (dict(kind="XYZ^A01"), {}, 200, b"MSH^1^9^1^1"),
    (dict(kind="ADT^X99"), {}, 201, b"MSH^1^9^1^2"),
    (dict(version="3.0"), {}, 203, b"MSH^1^12"),
    (dict(processing="T"), dict(processing_ids=frozenset({b"P"})), 202, b"MSH^1^11"),
])
def test_refused_header_values(kwargs, policy, code, location):
    """Unknown type, trigger, version or processing id give AR with the table 0357 code."""
    item = inspector(**policy).message(message(**kwargs))
    assert item.status is MessageStatus.REJECTED and item.outcome is Outcome.REJECT
    assert item.error.condition.value == code
    assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
    e = err(item.ack)
    assert e[3].split(b"^")[0] == str(code).encode()
    assert e[2] == location
    assert segments(item.ack)[b"MSA"][2] == b"MSG0001"
    assert not item.deduplicated


def test_z_message_types_accepted():
    """Locally defined Z message types and events are accepted."""
    item = inspector().message(message(kind="ZMA^Z01"))
    assert item.status is MessageStatus.RECEIVED


def test_refused_in_enhanced_mode_is_cr():
    """A refusal in enhanced mode answers CR."""
    item = inspector().message(message(kind="XYZ^A01", msh15="AL"))
    assert ack_code_of(item.ack) is AckCode.COMMIT_REJECT


def test_unsupported_charset_ar_103():
    """An MSH-18 outside table 0211 (or UTF-16) gives AR with ERR-3 103 at MSH-18."""
    for declared in ("KOI8-R", "UNICODE UTF-16"):
        item = inspector().message(message(msh18=declared))
        assert item.status is MessageStatus.REJECTED
        assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
        assert err(item.ack)[3].startswith(b"103^")
        assert err(item.ack)[2] == b"MSH^1^18"


def test_invalid_bytes_in_declared_charset_ae_102():
    """A lone 0xE9 in PID-5 of a UTF-8 message gives AE, ERR-3 102 at PID^1^5, CHARSET_INVALID."""
    raw = message(msh18="UNICODE UTF-8", pid5=b"Ren\xe9^Alice")
    item = inspector().message(raw)
    assert item.status is MessageStatus.REJECTED and item.outcome is Outcome.ERROR
    assert ack_code_of(item.ack) is AckCode.APPLICATION_ERROR
    e = err(item.ack)
    assert e[2] == b"PID^1^5"
    assert e[3].startswith(b"102^")
    assert e[5].split(b"^")[0] == b"CHARSET_INVALID"
    assert item.error.app_code is AppErrorCode.CHARSET_INVALID
    assert item.error.location == Location("PID", 1, 5)
    assert item.raw == raw


def test_nul_byte_refused_ae_102_with_its_place_and_the_bytes_kept():
    """A NUL byte anywhere gives AE, ERR-3 102 at its field, CHARSET_INVALID; the bytes are kept
    exactly (and hashed as they came), and no text of the record or its ACK holds a NUL (one
    in MSH-10 is answered as '?')."""
    raw = message(pid5=b"Ren\x00e^Alice")
    item = inspector().message(raw)
    assert item.status is MessageStatus.REJECTED and item.outcome is Outcome.ERROR
    e = err(item.ack)
    assert (e[2], e[3][:4], e[5].split(b"^")[0]) == (b"PID^1^5", b"102^", b"CHARSET_INVALID")
    offset = raw.index(b"\x00")
    assert f"NUL byte (0x00) at byte {offset}" in item.error.reason
    assert item.raw == raw and item.sha256 == hashlib.sha256(raw).digest() and item.size == len(raw)
    item = inspector().message(message(control_id="M\x00X", facility="CHU\x00Y"))
    assert (item.control_id, item.sending_facility) == ("M?X", "CHU?Y")
    assert segments(item.ack)[b"MSA"][2] == b"M?X" and b"\x00" not in item.ack
    assert err(item.ack)[2] == b"MSH^1^4"
    # An acknowledgement holding one is kept, and never answered, as any acknowledgement.
    ack = inspector().message(message(kind="ACK^A01^ACK", control_id="ACK\x001"))
    assert (ack.status, ack.ack, ack.control_id) == (MessageStatus.IGNORED, None, "ACK?1")
    # No MSH to read once the NUL is there: refused as not HL7, still with nothing to store as NUL.
    garbage = inspector().message(b"\x00\x01\x02MSH|")
    assert garbage.status is MessageStatus.REJECTED and b"\x00" not in garbage.ack
    framed = inspector().frame(message(control_id="A\x00") + message(control_id="B"))
    [whole] = framed.items  # two messages without a batch envelope: refused whole
    assert whole.control_id == "A?" and b"\x00" not in whole.ack


@pytest.mark.parametrize("kwargs, location", [
    (dict(control_id="C" * 200), b"MSH^1^10"),
    (dict(facility="F" * 228), b"MSH^1^4"),
    (dict(kind="Z" + "A" * 40 + "^Z01"), b"MSH^1^9"),
])
def test_header_texts_longer_than_the_store_keeps_ar_104(kwargs, location):
    """An MSH text longer than its column (its key must be kept whole) gets AR 104 at its field;
    at the limit it is accepted."""
    item = inspector().message(message(**kwargs))
    assert item.status is MessageStatus.REJECTED and item.error.condition is ErrorCondition.VALUE_TOO_LONG
    assert err(item.ack)[2] == location and err(item.ack)[3].startswith(b"104^")
    assert inspector().message(message(control_id="C" * 199, facility="F" * 227)).status is MessageStatus.RECEIVED


def test_header_text_limits_are_the_store_columns():
    from gateway.ingest.inspect import MSH_TEXT_LIMITS
    from gateway.store.schema import messages

    assert {name: limit for name, _, limit in MSH_TEXT_LIMITS} == {
        name: messages.c[name].type.length for name, _, _ in MSH_TEXT_LIMITS}


def test_registry_sender_fallback_accepts():
    """A registry sender with charset_fallback cp1252 gets the same bytes accepted as cp1252."""
    sender = SenderConfig(id="INPE-1", name="CHU X", type="hospital", facilities=("CHU_X",),
                          charset_fallback="cp1252")
    policy = dict(registry=FacilityRegistry([sender]))
    item = inspector(**policy).message(message(msh18="UNICODE UTF-8", pid5=b"Ren\xe9^Alice"))
    assert item.status is MessageStatus.RECEIVED
    assert item.codec == "cp1252"
    assert item.sender_id == "INPE-1"
    assert ack_code_of(item.ack) is AckCode.APPLICATION_ACCEPT


def test_windows_1252_sent_as_8859_1_uses_fallback():
    """cp1252 punctuation (0x92) declared 8859/1 is refused without a fallback and read as
    cp1252 with one, never accepted as C1 control characters."""
    raw = message(msh18="8859/1", pid5="L’Hôpital^Alice".encode("cp1252"))
    refused = inspector().message(raw)
    assert refused.status is MessageStatus.REJECTED
    assert refused.error.app_code is AppErrorCode.CHARSET_INVALID
    assert refused.error.location == Location("PID", 1, 5)
    sender = SenderConfig(id="INPE-1", name="CHU X", type="hospital", facilities=("CHU_X",),
                          charset_fallback="cp1252")
    item = inspector(registry=FacilityRegistry([sender])).message(raw)
    assert item.status is MessageStatus.RECEIVED and item.codec == "cp1252"


def test_empty_msh18_utf8_accepted():
    """With MSH-18 empty, UTF-8 bytes are accepted as UTF-8."""
    item = inspector().message(message(pid5="Benali^Réda".encode("utf-8")))
    assert item.status is MessageStatus.RECEIVED and item.codec == "utf-8"


def test_registry_by_header():
    """The registry matches MSH-4 first component, and MSH-3 when applications are listed."""
    lab = SenderConfig(id="L1", name="Lab", type="laboratory", applications=("SIL",),
                       facilities=("LABO_A",))
    clinic = SenderConfig(id="C1", name="Clinic", type="clinic")
    registry = FacilityRegistry([lab, clinic])
    assert registry.by_header("SIL", "LABO_A^1.2.3^ISO") is lab
    assert registry.by_header("OTHER", "LABO_A") is None
    assert registry.by_header("ANY", "C1") is clinic
    assert registry.by_header("SIL", "NOWHERE") is None


def test_unknown_sender_refused_when_policy_says_so():
    """An unknown MSH-4 is refused with SENDER_NOT_ALLOWED when unknown senders are not accepted."""
    item = inspector(accept_unknown_senders=False).message(message(facility="STRANGER"))
    assert item.status is MessageStatus.REJECTED
    assert item.error.app_code is AppErrorCode.SENDER_NOT_ALLOWED
    assert err(item.ack)[5].split(b"^")[0] == b"SENDER_NOT_ALLOWED"
    assert err(item.ack)[2] == b"MSH^1^4"
    known = SenderConfig(id="INPE-2", name="CHU X", type="hospital", facilities=("CHU_X",))
    ok = inspector(accept_unknown_senders=False, registry=FacilityRegistry([known])).message(message())
    assert ok.status is MessageStatus.RECEIVED and ok.sender_id == "INPE-2"


@pytest.mark.parametrize("raw", [b"PID|1||X1\r", b"", b"\x00\x01\xff binary", b"GET / HTTP/1.1\r\n"])
def test_no_msh_refused_not_hl7(raw):
    """A frame without MSH gets an AR built from defaults with app code NOT_HL7."""
    result = inspector().frame(raw)
    [item] = result.items
    assert item.status is MessageStatus.REJECTED
    assert item.error.condition is ErrorCondition.SEGMENT_SEQUENCE_ERROR
    assert item.error.app_code is AppErrorCode.NOT_HL7
    assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
    s = segments(item.ack)
    assert s[b"MSH"][1] == b"^~\\&" and s[b"MSH"][11] == b"2.5"
    assert s[b"ERR"][5].startswith(b"NOT_HL7^")
    assert result.response(make_builder()) == item.ack
    assert item.raw == raw


def test_header_error_with_fields_answers_from_them():
    """An MSH with MSH-10 missing is refused with 101 and the ACK still addresses the sender."""
    item = inspector().message(message(control_id=""))
    assert item.status is MessageStatus.REJECTED
    assert item.error.condition is ErrorCondition.REQUIRED_FIELD_MISSING
    assert item.error.app_code is None
    s = segments(item.ack)
    assert s[b"MSH"][4] == b"LAB" and s[b"MSH"][5] == b"CHU_X"
    assert s[b"ERR"][2] == b"MSH^1^10"
    assert item.sending_facility == "CHU_X"


def test_two_messages_without_batch_envelope_refused():
    """A frame with two messages and no BHS/BTS gets one refusal (segment sequence error)."""
    raw = message(control_id="M1") + message(control_id="M2")
    result = inspector().frame(raw)
    [item] = result.items
    assert item.status is MessageStatus.REJECTED
    assert item.error.condition is ErrorCondition.SEGMENT_SEQUENCE_ERROR
    assert item.error.location == Location("MSH", 2)
    assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
    assert segments(item.ack)[b"MSA"][2] == b"M1"
    assert item.sha256 == hashlib.sha256(raw).digest()


BHS = b"BHS|^~\\&|LAB|CHU_X|HIE|MA|20260101120000||||BATCH-42\r"


def test_valid_batch_answered_with_batch_of_acks():
    """A batch gets one item per message and a BHS ... ACKs ... BTS|n answer echoing BHS-11."""
    raw = BHS + message(control_id="M1") + message(control_id="M2", kind="XYZ^A01") + b"BTS|2\r"
    result = inspector().frame(raw)
    assert [i.status for i in result.items] == [MessageStatus.RECEIVED, MessageStatus.REJECTED]
    assert result.batch is not None
    response = result.response(make_builder())
    lines = response.rstrip(b"\r").split(b"\r")
    bhs = lines[0].split(b"|")
    assert bhs[0] == b"BHS"
    assert bhs[2] == b"MA_HIE_GATEWAY"
    assert bhs[4:6] == [b"LAB", b"CHU_X"]  # BHS-5/6 = original BHS-3/4
    assert bhs[11] == b"BATCH-42"  # BHS-12 = original BHS-11
    assert bhs[10] and bhs[10] != b"BATCH-42"
    assert lines[-1] == b"BTS|2"
    msas = [line.split(b"|")[1:3] for line in lines if line.startswith(b"MSA")]
    assert msas == [[b"AA", b"M1"], [b"AR", b"M2"]]
    assert sum(line.startswith(b"MSH") for line in lines) == 2


def test_file_batch_response_has_fhs_and_fts():
    """A file (FHS ... FTS) is answered with FHS ... FTS around the batch of ACKs."""
    raw = (b"FHS|^~\\&|LAB|CHU_X|HIE|MA|20260101||||FILE-9\r" + BHS + message() + b"BTS|1\r"
           + b"FTS|1\r")
    response = inspector().frame(raw).response(make_builder())
    lines = response.rstrip(b"\r").split(b"\r")
    assert lines[0].split(b"|")[0] == b"FHS" and lines[0].split(b"|")[11] == b"FILE-9"
    assert lines[-1] == b"FTS|1" and lines[-2] == b"BTS|1"


def test_batch_headers_in_odd_delimiters_are_read_where_they_are():
    """A file from a sender whose field separator is '_' and component separator '+': our
    names in FHS/BHS-3 and -4 are escaped ('MA_HIE_GATEWAY' was three fields) and FHS/BHS-7
    has no UTC offset (its '+' split the time), as in our ACKs."""
    header = b"FHS_+~\\&_LAB_CHUX_HIE_MA_20260101____FILE-9\rBHS_+~\\&_LAB_CHUX_HIE_MA_20260101____B-1\r"
    body = b"MSH_+~\\&_LAB_CHUX_HIE_MA_20260101__ORU+R01_M1_P_2.5\rPID_1\r"
    response = inspector().frame(header + body + b"BTS_1\rFTS_1\r").response(make_builder())
    for line in response.rstrip(b"\r").split(b"\r")[:2]:
        fields = line.split(b"_")
        assert fields[0] in (b"FHS", b"BHS") and len(fields) == 12, line
        assert fields[2:4] == [b"MA\\F\\HIE\\F\\GATEWAY", b"MA\\F\\HIE"], line
        assert len(fields[6]) == 14 and fields[6].isdigit(), line
        assert fields[11] in (b"FILE-9", b"B-1"), line


def test_batch_without_wanted_acks_counts_zero():
    """Messages whose MSH-15 is NE are not answered: the batch answer says BTS|0."""
    raw = BHS + message(msh15="NE", msh16="NE") + b"BTS|1\r"
    result = inspector().frame(raw)
    assert result.items[0].status is MessageStatus.RECEIVED and result.items[0].ack is None
    assert result.response(make_builder()).rstrip(b"\r").split(b"\r")[-1] == b"BTS|0"


def test_bad_batch_refused_whole():
    """A batch whose count does not match is refused as one frame, answered from BHS-11."""
    raw = BHS + message() + b"BTS|5\r"
    result = inspector().frame(raw)
    [item] = result.items
    assert result.batch is None
    assert item.status is MessageStatus.REJECTED
    assert item.error.app_code is AppErrorCode.BATCH_COUNT_MISMATCH
    assert segments(item.ack)[b"MSA"][2] == b"BATCH-42"
    assert item.raw == raw


def test_oversize_frame():
    """oversize() keeps the prefix, marks it truncated with the full size, and answers AR."""
    prefix = message(control_id="BIG1")[:100]
    result = inspector().oversize(prefix, 20_000_000, 16_777_216)
    [item] = result.items
    assert item.truncated and item.size == 20_000_000
    assert item.raw == prefix
    assert item.status is MessageStatus.REJECTED
    assert item.error.app_code is AppErrorCode.FRAME_TOO_LARGE
    assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
    assert err(item.ack)[5].split(b"^")[0] == b"FRAME_TOO_LARGE"
    assert segments(item.ack)[b"MSA"][2] == b"BIG1"
    assert result.response(make_builder()) == item.ack


def test_refuse_reused_turns_accept_into_reject():
    """refuse_reused makes an accepted item REJECTED with AR and ERR-5 CONTROL_ID_REUSED."""
    item = inspector().message(message())
    assert item.status is MessageStatus.RECEIVED
    refuse_reused(make_builder(), item)
    assert item.status is MessageStatus.REJECTED and item.outcome is Outcome.REJECT
    assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
    assert err(item.ack)[5].split(b"^")[0] == b"CONTROL_ID_REUSED"
    assert err(item.ack)[2] == b"MSH^1^10"
    assert not item.deduplicated


def test_refuse_reused_enhanced_is_cr():
    """A reused control id in enhanced mode is answered CR."""
    item = inspector().message(hl7msgs.message("oru", 3).encode("utf-8"))
    refuse_reused(make_builder(), item)
    assert ack_code_of(item.ack) is AckCode.COMMIT_REJECT


def test_enhanced_never_gets_no_ack():
    """MSH-15=NE in enhanced mode: accepted, and no ACK is due."""
    item = inspector().message(message(msh15="NE", msh16="AL"))
    assert item.status is MessageStatus.RECEIVED and item.ack is None


def test_enhanced_error_only():
    """MSH-15=ER: no ACK on success, a CR on refusal."""
    ok = inspector().message(message(msh15="ER"))
    assert ok.status is MessageStatus.RECEIVED and ok.ack is None
    refused = inspector().message(message(msh15="ER", kind="XYZ^A01"))
    assert refused.status is MessageStatus.REJECTED
    assert ack_code_of(refused.ack) is AckCode.COMMIT_REJECT


def test_enhanced_success_only():
    """MSH-15=SU: a CA on success, no ACK on refusal."""
    assert ack_code_of(inspector().message(message(msh15="SU")).ack) is AckCode.COMMIT_ACCEPT
    refused = inspector().message(message(msh15="SU", kind="XYZ^A01"))
    assert refused.status is MessageStatus.REJECTED and refused.ack is None


@pytest.mark.parametrize("tls", [False, True])
def test_registered_sender_with_its_own_component_separator_is_known(tls):
    """MSH-3/MSH-4 as HD (NAME$OID$ISO) in a message whose component separator is '$' name the
    facility by their first component, as with '^': on plain MLLP and over TLS."""
    from adapters.mllp.protocol import ConnectionInfo

    lab = SenderConfig(id="L1", name="Lab", type="laboratory", applications=("SIL",),
                       facilities=("LABO_A",))
    raw = (b"MSH|$~\\&|SIL$1.2.3$ISO|LABO_A$2.16.504$ISO|HIE|MA|20260101120000||ORU$R01$ORU_R01|"
           b"SEP1|P|2.5\rOBX|1|NM|718-7$Hemoglobin$LN||13.2\r")
    connection = ConnectionInfo("mllp-test", "10.1.2.3:5000", "L1", True) if tls else None
    item = inspector(accept_unknown_senders=False, registry=FacilityRegistry([lab])).message(
        raw, connection)
    assert item.status is MessageStatus.RECEIVED, item.error
    assert item.sender_id == "L1" and item.sending_facility == "LABO_A$2.16.504$ISO"


def test_non_default_delimiters_message_accepted():
    """A message with # $ * @ ! delimiters is accepted and answered in its own delimiters."""
    raw = message(fs="#", enc="$*@!", kind="ORU$R01$ORU_R01")
    item = inspector().message(raw)
    assert item.status is MessageStatus.RECEIVED
    assert item.ack.startswith(b"MSH#$*@!#")
    assert b"MSA#AA#MSG0001" in item.ack


@pytest.mark.parametrize("fs, enc", [("^", "~|\\"), ("&", "^~\\"), ("~", "^^\\&"), ("|", "^~\\")])
def test_bad_msh2_is_answered_in_an_ack_that_parses(fs, enc):
    """A bad MSH-2 after a field separator that is a standard encoding character ('^', '&'):
    the AR is in the standard delimiters, so that its MSH reads and its ERR-2 says MSH-2 (it
    was 'MSH^^~\\&^...', an MSH-2 the sender reads as empty)."""
    item = inspector().message(message(fs=fs, enc=enc))
    assert item.status is MessageStatus.REJECTED and item.error.location == Location("MSH", 1, 2)
    assert parse_header(item.ack).message_code == b"ACK"
    assert ack_code_of(item.ack) is AckCode.APPLICATION_REJECT
    assert err(item.ack)[2] == b"MSH^1^2"


def test_locate():
    """locate() names the segment, its sequence and the field of a byte offset."""
    raw = b"MSH|^~\\&|LAB\rOBX|1|ST\rOBX|2|ST|x|v\xe9\r"
    d = FieldView.of(raw).delimiters
    assert locate(raw, raw.index(b"\xe9"), d) == Location("OBX", 2, 4)
    assert locate(raw, raw.index(b"LAB"), d) == Location("MSH", 1, 3)
    assert locate(raw.replace(b"\r", b"\n"), raw.index(b"\xe9"), d) == Location("OBX", 2, 4)


@pytest.mark.parametrize("segment, name", [
    (b"O\xe9X|1|v\xe9", "O?X"),  # above 0x7F: the ACK is ASCII
    (b"P|X|v\xe9", "P?X"),  # a separator would split ERR-2
    (b"\xe9\r", "?"),  # a short segment: the id stops at its end
])
def test_bad_segment_ids_are_located_with_question_marks(segment, name):
    """A bad byte in a segment whose id is not letters and digits: ERR-2 names the id with '?'
    for each other byte, and the ACK (ASCII, one ERR) is built."""
    raw = message(msh18="ASCII") + segment + b"\r"
    item = inspector().message(raw)
    assert item.error.location.segment == name
    assert item.ack.isascii() and item.ack.count(b"\r") == 3
    assert err(item.ack)[2].split(b"^")[:2] == [name.encode(), b"1"]


def test_field_view_of_batch_header():
    """FieldView of a BHS reads BHS-11 as the control id and has no type or version."""
    view = FieldView.of(BHS + b"BTS|0\r")
    assert view.field(3) == b"LAB" and view.field(10) == b"BATCH-42"
    assert view.field(9) == b"" and view.field(12) == b""
    assert FieldView.of(b"garbage").field(3) == b""


def test_inbound_record_fields_for_refusal():
    """A refused message still records its sender, control id and type for the store."""
    item = inspector().message(message(kind="XYZ^A01", control_id="Z9"))
    assert item.sending_application == "LAB" and item.sending_facility == "CHU_X"
    assert item.control_id == "Z9" and item.message_type == "XYZ^A01"
    assert item.error == ErrorDetail(ErrorCondition.UNSUPPORTED_MESSAGE_TYPE,
                                     Location("MSH", 1, 9, 1), item.error.reason)


CORPUS_FILES = sorted(glob.glob(os.path.join(CORPUS, "**", "*.hl7"), recursive=True))


def test_corpus_is_there():
    """The shared corpus holds HL7 files to inspect."""
    assert len(CORPUS_FILES) > 20


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: os.path.relpath(p, CORPUS))
def test_corpus_never_crashes(path):
    """Every corpus file, split as a sender would, inspects without raising: each item is
    RECEIVED/IGNORED, or REJECTED with an error detail and (when due) a negative ACK."""
    with open(path, "rb") as f:
        data = f.read()
    frames = split_messages(data)
    inspect = inspector()
    builder = make_builder()
    for payload in frames:
        result = inspect.frame(payload)
        assert result.items
        for item in result.items:
            assert item.sha256 == hashlib.sha256(item.raw).digest()
            if item.status is MessageStatus.REJECTED:
                assert item.error is not None and item.error.reason
                if item.ack is not None:
                    assert not ack_code_of(item.ack).positive
            else:
                assert item.status in (MessageStatus.RECEIVED, MessageStatus.IGNORED)
                assert item.error is None
                if item.ack is not None:
                    assert ack_code_of(item.ack).positive
        response = result.response(builder)
        assert response is None or response.endswith(b"\r")

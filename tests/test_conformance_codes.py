"""Conformance problems answered with their HL7 table 0357 condition and an ERR-2 location:
what hl7apy refuses (and what it lets through silently: unplaceable or misordered segments,
MSH-11), placed at the segment and field it names. Synthetic messages, no patient data."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from adapters.hl7v2.codes import ErrorCondition
from adapters.hl7v2.message import parse_message
from gateway.config import SenderConfig
from gateway.mapping.mapping_set import MappingSet
from gateway.store.translations import Pending
from gateway.translation import conformance
from gateway.translation.translator import Translator, error_detail
from translation_support import write_mappings

PID = "PID|1||P-1^^^CHU^PI||Benali^Karim||19850714|M"
ADT = ["EVN|A01|20250114083512", PID, "PV1|1|I"]
ORU = ["PID|1||P-1^^^CHU^PI||Benali^Karim", "OBR|1||F-1|GLU", "OBX|1|NM|GLU||5.1|mmol/L|||||F"]


def text(segments: list[str], kind: str = "ADT^A01^ADT_A01", processing: str = "P",
         version: str = "2.5") -> str:
    return "\r".join([f"MSH|^~\\&|HIS|FAC_C|GW|MA|20250114083512||{kind}|C-1|{processing}|{version}"]
                     + segments) + "\r"


def replaced(segments: list[str], at: int, segment: str) -> list[str]:
    return segments[:at] + [segment] + segments[at + 1:]


CASES = {
    "required segment missing": (text(ADT[:2]), ErrorCondition.SEGMENT_SEQUENCE_ERROR, "PV1[1]"),
    "segment out of order": (text([PID, ADT[0], ADT[2]]), ErrorCondition.SEGMENT_SEQUENCE_ERROR, "EVN[1]"),
    "segment not of the structure": (text(ADT + ["OBR|1||F-1|GLU"]),
                                     ErrorCondition.SEGMENT_SEQUENCE_ERROR, "OBR[1]"),
    "unknown segment": (text(ADT + ["XYZ|1"]), ErrorCondition.SEGMENT_SEQUENCE_ERROR, "XYZ[1]"),
    "segment repeated too often": (text(ADT[:2] + [PID, ADT[2]]),
                                   ErrorCondition.SEGMENT_SEQUENCE_ERROR, "PID[2]"),
    "observation before its order": (text([ORU[0], ORU[2], ORU[1]], "ORU^R01^ORU_R01"),
                                     ErrorCondition.SEGMENT_SEQUENCE_ERROR, "OBR[1]"),
    "required field missing": (text(replaced(ADT, 1, "PID|1||||Benali^Karim||19850714|M")),
                               ErrorCondition.REQUIRED_FIELD_MISSING, "PID[1]-3"),
    "field repeated too often": (text(replaced(ADT, 1, PID.replace("PID|1|", "PID|1~2|"))),
                                 ErrorCondition.DATA_TYPE_ERROR, "PID[1]-1"),
    "date not a date": (text(replaced(ADT, 1, PID.replace("19850714", "1985071X"))),
                        ErrorCondition.DATA_TYPE_ERROR, "PID[1]-7"),
    "field beyond the segment": (text(replaced(ADT, 1, PID + "|" * 60 + "X")),
                                 ErrorCondition.DATA_TYPE_ERROR, "PID[1]-68"),
    "unsupported version": (text(ADT, version="9.9"), ErrorCondition.UNSUPPORTED_VERSION_ID, "MSH[1]-12"),
    "unsupported message type": (text(ADT, "QQQ^A01"), ErrorCondition.UNSUPPORTED_MESSAGE_TYPE, "MSH[1]-9.1"),
    "unsupported event": (text(ADT, "ADT^Z99"), ErrorCondition.UNSUPPORTED_EVENT_CODE, "MSH[1]-9.2"),
    "unknown message structure": (text(ADT, "ADT^A01^ADT_Z99"),
                                  ErrorCondition.UNSUPPORTED_MESSAGE_TYPE, "MSH[1]-9.3"),
    "unsupported processing id": (text(ADT, processing="X"),
                                  ErrorCondition.UNSUPPORTED_PROCESSING_ID, "MSH[1]-11"),
    "version with a space": (text(ADT, "QQQ^A01", version="2.5 "),
                             ErrorCondition.UNSUPPORTED_MESSAGE_TYPE, "MSH[1]-9.1"),
    "segment id not upper case": (text(ADT + ["pid|1"]), ErrorCondition.SEGMENT_SEQUENCE_ERROR, ""),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_gives_condition_and_location(case):
    message, condition, location = CASES[case]
    problem = conformance.check(parse_message(message))
    assert (problem.condition, problem.location) == (condition, location), problem.reason


def test_reasons_name_elements_never_values():
    """A reason names the element ('PID-7'), not what was in it (patient data)."""
    problem = conformance.check(parse_message(CASES["date not a date"][0]))
    assert "PID-7" in problem.reason and "1985071X" not in problem.reason
    problem = conformance.check(parse_message(CASES["required field missing"][0]))
    assert problem.reason == "HL7 conformance: PID-3 required field missing"


@pytest.mark.parametrize("message", [text(ADT), text(ADT + ["ZPI|1|local"]), text(ORU, "ORU^R01^ORU_R01"),
                                     text(ORU[:2] + ["NTE|1||note", ORU[2], "OBR|2||F-2|NA",
                                                     "OBX|1|NM|NA||140|mmol/L|||||F"], "ORU^R01^ORU_R01"),
                                     text(ADT, "ZDT^Z01^ZDT_Z01")])
def test_conformant_messages_pass(message):
    """Z segments, notes and repeated orders are where the structure allows them; a
    site-defined message (ZDT^Z01) has no HL7 structure to place its segments in: no problem."""
    assert conformance.check(parse_message(message)) is None


@pytest.mark.parametrize("case", ["required segment missing", "required field missing",
                                  "unsupported event", "segment out of order"])
def test_refusal_carries_condition_and_err2(tmp_path, case):
    """validation: reject: the failed record, and so the AE's ERR, carries the condition and
    the location (ERR-2), not 207 at the MSH."""
    message, condition, location = CASES[case]
    mappings = MappingSet.load(write_mappings(tmp_path / "mappings"))
    sender = SenderConfig(id="C", name="c", type="hospital", facilities=("FAC_C",), validation="reject")
    record = Translator(mappings, [sender]).translate(
        Pending(1, None, message.encode(), "utf-8", "hl7v2", "C", datetime.now(timezone.utc)))
    assert record.failed and record.error_code == int(condition)
    detail = error_detail(record)
    segment, sequence = location.split("[")[0], location.split("[")[1].split("]")[0]
    assert detail.condition == condition and detail.location.components()[:2] == [segment, sequence]
    assert "-" not in location or detail.location.field == int(location.split("-")[1].split(".")[0])

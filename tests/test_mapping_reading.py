"""Reading messages for translation (gateway.translation.inputs): lenient where ingest has its
own rules or the mapping does not care, precise where the mapping cannot go on; and the value
rules that keep a message translatable (placeholders, HL7 null, a CX without an ID number).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mapping.golden import GOLDEN_RECEIVED_AT
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import TranslationContext, TranslationError
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import InputError, read_input

ROOT = Path(__file__).resolve().parent.parent
PID = "PID|1||123456^^^CHUIR^MR||BENALI^Fatima||19850312|F"


@pytest.fixture
def mappings(repo_mappings) -> MappingSet:
    return repo_mappings


def msh(msh9: str = "ADT^A04^ADT_A01", control: str = "C1", processing: str = "P",
        charset: str = "", encoding: str = "^~\\&") -> str:
    return f"MSH|{encoding}|HIS|CHUIR|HIE|MS|20250114093000||{msh9}|{control}|{processing}|2.5|||||MAR|{charset}"


def translate(mappings, text: str) -> dict:
    parsed = read_input(text.encode("utf-8"))
    context = TranslationContext(received_at=GOLDEN_RECEIVED_AT, message_key=f"t|{parsed.control_id}",
                                 control_id=parsed.control_id)
    bundle = mappings.translate(parsed.message, context, parsed.message_type).bundle
    assert bundle_problems(bundle) == []
    return bundle


def resource(bundle: dict, kind: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind)


def test_empty_processing_id_is_not_the_translations_business(mappings):
    """MSH-11 empty (ingest decides about it): the message still translates."""
    parsed = read_input(f"{msh(processing='')}\r{PID}\r".encode())
    assert parsed.message_type == "ADT^A04"


def test_missing_control_id_gets_a_stable_stand_in(mappings):
    """MSH-10 empty: a digest of the bytes names the message (Provenance, ids), the same for
    the same bytes and different for other ones."""
    first = read_input(f"{msh(control='')}\r{PID}\r".encode())
    again = read_input(f"{msh(control='')}\r{PID}\r".encode())
    other = read_input(f"{msh(control='')}\r{PID.replace('BENALI', 'ALAOUI')}\r".encode())
    assert first.control_id.startswith("sha1-") and first.control_id == again.control_id
    assert first.control_id != other.control_id
    bundle = translate(mappings, f"{msh(control='')}\r{PID}\r")
    provenance = resource(bundle, "Provenance")
    assert provenance["entity"][0]["what"]["identifier"]["value"] == first.control_id


def test_trigger_missing_is_read_from_the_message_structure():
    """MSH-9 'ORU^^ORU_R01' names the ORU^R01 map; without a structure it stays 'ORU'."""
    assert read_input(f"{msh('ORU^^ORU_R01')}\r{PID}\r".encode()).message_type == "ORU^R01"
    assert read_input(f"{msh('ORU')}\r{PID}\r".encode()).message_type == "ORU"


def test_empty_message_type_is_refused_precisely():
    with pytest.raises(InputError) as error:
        read_input(f"{msh('')}\r{PID}\r".encode())
    assert error.value.reason == "MSH-9 message type is empty" and error.value.location == "MSH^1^9"


@pytest.mark.parametrize("raw", [b"MSH\rPID|1||x\r", b"MSH\nEVN|A01\n", b"MSH\r\n\r\nPID|1"])
def test_msh_alone_on_its_line_is_refused_precisely(raw):
    """'MSH' then a line end: no field separator, an InputError at MSH-1 (not a ValueError
    from reading MSH-18 before the message is parsed)."""
    with pytest.raises(InputError) as error:
        read_input(raw)
    assert error.value.location == "MSH[1]-1" and "MSH-1 field separator" in error.value.reason


def test_declared_ascii_with_utf8_bytes_is_read_as_utf8():
    """ASCII is a subset of UTF-8: 'Ménara' sent as UTF-8 under MSH-18 ASCII is read, not refused;
    bytes that are not UTF-8 either are still refused."""
    parsed = read_input(f"{msh(charset='ASCII')}\rPID|1||1^^^X^MR||MÉNARA^Zineb\r".encode())
    assert parsed.message.value("PID", 5) == "MÉNARA"
    with pytest.raises(InputError) as error:
        read_input(f"{msh(charset='ASCII')}\rPID|1||1^^^X^MR||".encode() + b"M\xc9NARA\r")
    assert "not valid ASCII" in error.value.reason


def test_three_character_msh2_translates(mappings):
    """'^~\\' (no subcomponents) as ELR senders write it."""
    bundle = translate(mappings, f"{msh(encoding='^~' + chr(92))}\r{PID}\r")
    assert resource(bundle, "Patient")["name"][0]["family"] == "BENALI"
    assert resource(bundle, "Patient")["identifier"][0]["system"] == "urn:ma:hie:local:unknown:CHUIR:MR"


def test_placeholder_and_null_dates_map_to_nothing(mappings):
    """Birth date '0000' (unknown) and PV1-45 '\"\"' (HL7 null) give no value, not an error."""
    bundle = translate(mappings, f"{msh()}\r{PID.replace('19850312', '0000')}\r"
                                 "PV1|1|O|CONS^1^^CHUIR" + "|" * 42 + '|20250114090000|""')
    assert "birthDate" not in resource(bundle, "Patient")
    assert "end" not in resource(bundle, "Encounter").get("period", {})


def test_cx_without_id_number_is_no_identifier(mappings):
    """PID-2 '^^' (sent empty with its separators) gives no identifier (was an error)."""
    bundle = translate(mappings, f"{msh()}\r{PID.replace('PID|1||', 'PID|1|^^|')}\r")
    assert [i["value"] for i in resource(bundle, "Patient")["identifier"]] == ["123456"]


def test_codes_sent_with_blanks_are_trimmed(mappings):
    """OBX-3 ' 2345-7 ', OBX-8 'H ', PV1-4 'R ' and an OBR-24 of blanks: FHIR refuses a code
    with leading or trailing blanks (the shared record would refuse the bundle), so codes are
    trimmed and blanks alone are no code."""
    text = (f"{msh('ORU^R01^ORU_R01')}\r{PID}\r"
            "OBR|1|P1||2345-7^Glucose^LN|||202501140800" + "|" * 16 + "| \r"
            "OBX|1|NM| 2345-7 ^Glucose^LN||0.9|g/L||H ~|||F\r")
    bundle = translate(mappings, text)
    observation = resource(bundle, "Observation")
    assert observation["code"]["coding"][0]["code"] == "2345-7"
    assert [i["coding"][0]["code"] for i in observation["interpretation"]] == ["H"]
    assert "category" not in resource(bundle, "DiagnosticReport")
    admission = translate(mappings, f"{msh()}\r{PID}\rPV1|1|O|CONS^1^^CHUIR|R ^Routine\r")
    assert resource(admission, "Encounter")["type"][0]["coding"][0]["code"] == "R"


@pytest.mark.parametrize("location, display", [(" ", None), (" ^ ^ ", None), ("^^^CHUIR", "CHUIR")])
def test_encounter_location_of_blanks_is_none_and_a_facility_alone_is_one(mappings, location, display):
    """PV1-3 of blanks gave a location without its required reference (invalid FHIR); a facility
    alone (PV1-3.4) was dropped without a word."""
    bundle = translate(mappings, f"{msh()}\r{PID}\rPV1|1|I|{location}\r")
    found = [item["location"]["display"] for item in resource(bundle, "Encounter").get("location", [])]
    assert found == ([display] if display else [])


def test_malformed_report_and_result_times_are_left_out_with_a_warning(mappings):
    """OBR-22 (when the report was released) '2008081830-0700' (hour 30): no `issued`, a warning;
    the results still arrive. A clinical time (OBX-14) malformed too: left out, its place taken
    by a data-absent-reason (when it was observed is essential), and a warning."""
    text = (f"{msh('ORU^R01^ORU_R01')}\r{PID}\rOBR|1|P1||2345-7^Glucose^LN|||202501140800"
            + "|" * 14 + "|2008081830-0700|||F\rOBX|1|NM|2345-7^Glucose^LN||0.9|g/L|||||F\r")
    parsed = read_input(text.encode())
    context = TranslationContext(received_at=GOLDEN_RECEIVED_AT, message_key="t|1", control_id="1")
    translation = mappings.translate(parsed.message, context, parsed.message_type)
    assert "issued" not in resource(translation.bundle, "DiagnosticReport")
    assert translation.warnings == ["OBR[1]: OBR-22: '2008081830-0700' is not a valid time; issued left out"]
    clinical = text.replace("|||||F\r", "|||||F|||2008081830\r")
    parsed = read_input(clinical.encode())
    translation = mappings.translate(parsed.message, context, parsed.message_type)
    observation = resource(translation.bundle, "Observation")
    assert observation["valueQuantity"]["value"] == 0.9 and "effectiveDateTime" not in observation
    assert observation["_effectiveDateTime"] == {"extension": [
        {"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "error"}]}
    assert "OBX[1]: OBX-14 or OBR-7: '2008081830' is not a valid time; effectiveDateTime left out, " \
           "data-absent-reason 'error' in its place" in translation.warnings
    assert bundle_problems(translation.bundle) == []



def test_translator_keeps_the_warnings_of_an_unreadable_date_with_the_translation(mappings):
    """The record the worker stores (translations.warnings, shown by the console and
    `gateway translate`) is translated, not failed, and carries the warning."""
    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator

    raw = f"{msh()}\r{PID.replace('19850312', 'Aug 15, 1942')}\r".encode()
    record = Translator(mappings).translate(Pending(1, None, raw, None, "hl7v2", None, GOLDEN_RECEIVED_AT))
    assert not record.failed and record.status == "translated"
    patient = resource(record.bundle, "Patient")
    assert "birthDate" not in patient and "_birthDate" in patient
    assert record.warnings == ["PID[1]: PID-7: 'Aug 15, 1942' is not an HL7 date/time "
                               "(YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]); birthDate left out, "
                               "data-absent-reason 'error' in its place"]


def test_a_bug_outside_the_mapping_engine_fails_the_message_not_the_worker(mappings, monkeypatch):
    """The translation worker calls translate() for every message and stores what it returns:
    an exception out of it (a reader's bug, as 'MSH' alone on its line once raised ValueError)
    would end the worker's thread. It is one failed message, internal error, kept for replay."""
    from gateway.store.translations import Pending
    from gateway.translation import translator

    def broken(*args, **kwargs):
        raise ValueError("empty separator")

    monkeypatch.setattr(translator, "read_input", broken)
    raw = f"{msh()}\r{PID}\r".encode()
    record = translator.Translator(mappings).translate(Pending(1, None, raw, None, "hl7v2", None, GOLDEN_RECEIVED_AT))
    assert record.failed and record.error_code == 207
    assert record.error_reason == "internal error in the gateway (ValueError)"


@pytest.mark.parametrize("message", [
    "ORC|NW|ORD1\rOBR|1|ORD1||GLU^Glucose^L",  # an order for nobody: ServiceRequest.subject is 1..1
    "MRG|P9^^^CHUIR^MR",                       # a merge without the surviving patient: link.other is 1..1
], ids=["ORM without PID", "A40 without PID"])
def test_a_resource_fhir_requires_a_reference_for_fails_when_the_message_lacks_it(mappings, message):
    """The shipped mappings make no resource the record would refuse as invalid FHIR: a
    message missing the segment a required reference needs fails its translation with ERR-3
    100 (table 0357: required segment missing), the rule's place in the reason."""
    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator

    msh9 = "ORM^O01" if message.startswith("ORC") else "ADT^A40^ADT_A39"
    raw = f"{msh(msh9)}\r{message}\r".encode()
    record = Translator(mappings).translate(Pending(1, None, raw, None, "hl7v2", None, GOLDEN_RECEIVED_AT))
    assert record.failed and record.error_code == 100
    assert "is required and refers to @patient, which this message does not give (rule at mappings/" \
        in record.error_reason


def _report(performed: str, issued: str) -> bytes:
    """A synthetic SubmitReport as the SOAP door stores it."""
    from adapters.soap.gateway import NAMESPACE

    return (f'<gw:SubmitReport xmlns:gw="{NAMESPACE}"><gw:reportId>R-1</gw:reportId><gw:patient>'
            "<gw:identifier><gw:system>urn:ma:cnie</gw:system><gw:value>ZZ999001</gw:value>"
            "</gw:identifier></gw:patient><gw:examination><gw:display>IRM</gw:display></gw:examination>"
            f"<gw:performed>{performed}</gw:performed><gw:issued>{issued}</gw:issued>"
            "<gw:text>normal</gw:text></gw:SubmitReport>").encode()


@pytest.mark.parametrize("zone, performed, issued, expected", [
    # No offset (the contract's xs:dateTime allows it, FHIR does not once there is a time):
    # the sender's zone, DST included (Morocco is on UTC+0 during Ramadan).
    ("Africa/Casablanca", "2025-01-14T09:30:00", " 2025-01-14T10:00:00.250 ",
     ("2025-01-14T09:30:00+01:00", "2025-01-14T10:00:00.250+01:00")),
    ("Africa/Casablanca", "2025-03-10T09:30:00", "2025-03-10T10:00:00",
     ("2025-03-10T09:30:00+00:00", "2025-03-10T10:00:00+00:00")),
    ("UTC", "2025-01-14T09:30:00", "2025-01-14T10:00:00", ("2025-01-14T09:30:00+00:00", "2025-01-14T10:00:00+00:00")),
    # An offset given is kept as written.
    ("UTC", "2025-01-14T09:30:00-03:00", "2025-01-14T10:00:00Z", ("2025-01-14T09:30:00-03:00", "2025-01-14T10:00:00Z")),
])
def test_report_times_get_the_senders_offset_when_they_have_none(mappings, zone, performed, issued,
                                                                 expected):
    """A SOAP report's performed and issued times without an offset are read in the sender's
    time zone: they used to be copied as they came, a FHIR dateTime and instant the shared
    record refuses as invalid."""
    from gateway.config import SenderConfig
    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator

    sender = SenderConfig(id="IMG", name="img", type="imaging", facilities=("IMG",), timezone=zone)
    record = Translator(mappings, [sender]).translate(
        Pending(1, ("SOAP", "IMG", "R-1"), _report(performed, issued), "utf-8", "soap-report", "IMG",
                GOLDEN_RECEIVED_AT, "SOAP^REPORT"))
    assert not record.failed, record.error_reason
    report = resource(record.bundle, "DiagnosticReport")
    assert (report["effectiveDateTime"], report["issued"]) == expected
    assert bundle_problems(record.bundle) == []


def test_report_time_fhir_cannot_hold_is_refused_precisely(mappings):
    """24:00:00 (valid xs:dateTime, no FHIR time) fails the report, naming the element."""
    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator

    record = Translator(mappings).translate(
        Pending(1, ("SOAP", "IMG", "R-1"), _report("2025-01-14T09:30:00Z", "2025-01-14T24:00:00Z"),
                "utf-8", "soap-report", None, GOLDEN_RECEIVED_AT, "SOAP^REPORT"))
    assert record.failed and record.error_location == "SubmitReport.issued"
    assert "is not a date and time FHIR can hold" in record.error_reason


def test_csv_profiles_come_from_the_mapping_set_in_use(tmp_path):
    """A CSV export is recognised by the profiles of the mapping set the gateway loaded
    (`mappings: directory:`), not by those of the repository's mappings/: a profile added
    there was never found ('no mapping for message type CSV'). A reload brings its own."""
    from datetime import datetime, timezone

    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator
    from translation_support import write_mappings

    profile = {"messages/CSV_clinic_patients.yaml": """\
        messages: [CSV^clinic_patients]
        resources:
          - each: [ROW]
            resources:
              - name: patient
                from: ROW
                map: ROW.Patient
        """, "segments/ROW.Patient.yaml": """\
        description: a row of a clinic's patient list -> Patient
        resource: Patient
        columns: [cnie, birth]
        map:
          identifier:
            - map:
                value: {from: ROW-cnie}
                system: urn:ma:cnie
          birthDate: {from: ROW-birth, transform: date}
        """}
    raw = b"cnie;birth\r\nZZ999001;19850714\r\n"
    pending = Pending(1, None, raw, None, "csv", None, datetime.now(timezone.utc), "CSV")
    translator = Translator(MappingSet.load(write_mappings(tmp_path / "without")))
    assert translator.translate(pending).error_reason == "no mapping for message type 'CSV'"
    translator.mappings = MappingSet.load(write_mappings(tmp_path / "with", profile))  # a reload
    record = translator.translate(pending)
    assert not record.failed, record.error_reason
    patient = resource(record.bundle, "Patient")
    assert (patient["identifier"][0]["value"], patient["birthDate"]) == ("ZZ999001", "1985-07-14")
    # `gateway mappings test` reads a golden CSV case with the profiles of the set it tests too.
    from gateway.mapping.golden import translate_case

    case = tmp_path / "with" / "tests" / "clinic" / "patients.csv"
    case.parent.mkdir(parents=True)
    case.write_bytes(raw)
    found = resource(translate_case(translator.mappings, case).bundle, "Patient")
    assert found["identifier"][0]["value"] == "ZZ999001"


def test_an_mllp_capture_is_read_unframed():
    """A file saved off the wire (VT, the message, FS CR) was detected as HL7 v2 and then
    refused: 'message does not start with an MSH segment'."""
    message = f"{msh()}\r{PID}\r".encode()
    framed = read_input(b"\x0b" + message + b"\x1c\r")
    plain = read_input(message)
    assert framed.control_id == plain.control_id == "C1" and framed.message_type == plain.message_type
    assert [s.name for s in framed.message.segments] == ["MSH", "PID"]

"""ADT (patient administration) mappings: golden cases and the facts they must keep."""
from __future__ import annotations

from pathlib import Path

import pytest

from gateway.mapping.engine import name_id
from gateway.mapping.golden import GOLDEN_RECEIVED_AT, check_case, find_cases, translate_case
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import TranslationContext, TranslationError
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "mappings" / "tests" / "adt"
CORPUS = Path("/work/shared/corpus/ms-fhir-converter/hl7v2")


@pytest.fixture
def mappings(repo_mappings) -> MappingSet:
    return repo_mappings


def resources(bundle: dict, kind: str) -> list[dict]:
    return [entry["resource"] for entry in bundle["entry"] if entry["resource"]["resourceType"] == kind]


def bundle_of(mappings, name: str) -> dict:
    return translate_case(mappings, CASES / name).bundle


def translate_text(mappings, text: str, sender: str = "") -> dict:
    parsed = read_input(text.replace("\n", "\r").encode("utf-8"))
    context = TranslationContext(sender_id=sender, received_at=GOLDEN_RECEIVED_AT,
                                 message_key=f"test|{parsed.control_id}", control_id=parsed.control_id)
    return mappings.translate(parsed.message, context, parsed.message_type).bundle


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.stem)
def test_golden(mappings, case):
    result = check_case(mappings, case)
    assert result.passed, "\n".join(result.differences)


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.stem)
def test_golden_is_valid_fhir(mappings, case):
    assert bundle_problems(translate_case(mappings, case).bundle) == []


def test_every_trigger_has_a_case(mappings):
    triggers = {path.read_text(encoding="utf-8").split("|")[8].split("^")[1] for path in find_cases(CASES)}
    assert {"A01", "A02", "A03", "A04", "A05", "A08", "A11", "A13", "A28", "A31", "A40"} <= triggers
    for trigger in triggers:
        assert mappings.message_map(f"ADT^{trigger}") is not None


def test_arabic_name_is_a_second_human_name_kept_exactly(mappings):
    patient = resources(bundle_of(mappings, "a01-admission.hl7"), "Patient")[0]
    latin, arabic = patient["name"]
    assert latin["family"] == "BENALI" and latin["given"] == ["Fatima"]
    assert arabic["family"] == "بنعلي" and arabic["given"] == ["فاطمة"]
    assert arabic["extension"] == [{"url": "http://hl7.org/fhir/StructureDefinition/language", "valueCode": "ar"}]
    assert "extension" not in latin


def test_national_identifier_systems(mappings):
    patient = resources(bundle_of(mappings, "a01-admission.hl7"), "Patient")[0]
    systems = {identifier.get("system"): identifier["value"] for identifier in patient["identifier"]}
    assert systems["urn:ma:cnie"] == "BE123456"  # sent as 'be123456': normalised
    assert systems["urn:ma:cnss:immatriculation"] == "112233445"
    practitioners = resources(bundle_of(mappings, "a01-admission.hl7"), "Practitioner")
    assert {p["identifier"][0]["system"] for p in practitioners} == {"urn:ma:inpe"}
    payer = [o for o in resources(bundle_of(mappings, "a01-admission.hl7"), "Organization")
             if o.get("type")][0]
    assert payer["identifier"][0] == {"value": "001525896000047", "system": "urn:ma:ice",
                                      "assigner": {"display": "ICE"}}


def test_a_cnie_in_arabic_indic_digits_is_the_same_card():
    """Typed on an Arabic keyboard, a CNIE's digits are Arabic-Indic (or Eastern Arabic-Indic):
    read as the ASCII digits the card bears."""
    from gateway.mapping.transforms.patient import national_number

    assert national_number(" be ١٢٣٤٥٦ ") == national_number("BE۱۲۳۴۵۶") == "BE123456"


def test_same_patient_and_visit_get_the_same_ids_across_messages(mappings):
    admit = bundle_of(mappings, "a01-admission.hl7")
    update = bundle_of(mappings, "a08-update.hl7")
    discharge = bundle_of(mappings, "a03-discharge.hl7")
    ids = {resources(bundle, "Patient")[0]["id"] for bundle in (admit, update, discharge)}
    assert len(ids) == 1
    assert len({resources(bundle, "Encounter")[0]["id"] for bundle in (admit, update, discharge)}) == 1
    assert resources(update, "Patient")[0]["address"][0]["city"] == "Rabat"


def test_naive_times_take_the_casablanca_zone(mappings):
    encounter = resources(bundle_of(mappings, "a01-admission.hl7"), "Encounter")[0]
    assert encounter["period"]["start"] == "2025-01-14T08:35:00+01:00"  # PV1-44 202501140835
    ramadan = resources(bundle_of(mappings, "a04-registration-ramadan.hl7"), "Encounter")[0]
    assert ramadan["period"]["start"] == "2025-03-10T09:10:00+00:00"  # UTC+0 during Ramadan
    newborn = resources(bundle_of(mappings, "a28-add-person-newborn.hl7"), "Patient")[0]
    assert newborn["birthDate"] == "2025-01-12"
    assert newborn["_birthDate"]["extension"][0]["valueDateTime"] == "2025-01-12T06:30:00+01:00"


def test_encounter_status_follows_the_event(mappings):
    def encounter(name):
        return resources(bundle_of(mappings, name), "Encounter")[0]
    assert encounter("a01-admission.hl7")["status"] == "in-progress"
    assert encounter("a01-admission.hl7")["class"]["code"] == "IMP"
    assert encounter("a03-discharge.hl7")["status"] == "finished"
    assert encounter("a03-discharge.hl7")["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "home"
    assert encounter("a11-cancel-admit.hl7")["status"] == "cancelled"
    assert encounter("a13-cancel-discharge.hl7")["status"] == "in-progress"
    assert encounter("a05-preadmit.hl7")["status"] == "planned"
    transfer = encounter("a02-transfer.hl7")["location"]
    assert [(place["location"]["display"], place["status"]) for place in transfer] == [
        ("USIC 2 A (CHUIR)", "active"), ("CARDIO 12 B (CHUIR)", "completed")]
    # A28/A31 with a 'not applicable' visit: the person only
    assert resources(bundle_of(mappings, "a28-add-person-newborn.hl7"), "Encounter") == []


def test_encounter_references_patient_and_practitioners(mappings):
    bundle = bundle_of(mappings, "a01-admission.hl7")
    patient = resources(bundle, "Patient")[0]
    encounter = resources(bundle, "Encounter")[0]
    practitioners = {p["id"]: p for p in resources(bundle, "Practitioner")}
    assert encounter["subject"] == {"reference": "urn:uuid:" + patient["id"]}
    roles = {part["type"][0]["coding"][0]["code"]: part["individual"]["reference"].split(":")[-1]
             for part in encounter["participant"]}
    assert set(roles) == {"ATND", "REF", "CON", "ADM"}
    assert practitioners[roles["ATND"]]["name"][0]["family"] == "EL FASSI"
    assert roles["ATND"] == roles["ADM"]  # one Practitioner for the same INPE
    visit = encounter["identifier"][0]
    assert visit["value"] == "V2025-0001" and visit["type"]["coding"][0]["code"] == "VN"


def participants(encounter: dict) -> list[tuple[str, str]]:
    return [(part["type"][0]["coding"][0]["code"], part["individual"]["reference"].split(":")[-1])
            for part in encounter["participant"]]


def test_every_repetition_of_a_doctor_field_is_a_participant(mappings):
    """PV1-7, -8, -9, -17 repeat (XCN): each repetition is a participant with its Practitioner
    (the guide's PV1[Encounter]); a doctor in two roles is one Practitioner, two participants."""
    bundle = bundle_of(mappings, "a01-several-doctors.hl7")
    encounter = resources(bundle, "Encounter")[0]
    family = {p["id"]: p["name"][0]["family"] for p in resources(bundle, "Practitioner")}
    assert sorted(family.values()) == ["BERRADA", "CHRAIBI", "FILALI", "IDRISSI"]
    assert [(code, family[who]) for code, who in participants(encounter)] == [
        ("ATND", "BERRADA"), ("ATND", "CHRAIBI"), ("REF", "IDRISSI"), ("REF", "FILALI"), ("ADM", "CHRAIBI")]


PV1_SEGMENT = ("PV1|1|I|CHIR^7^C^CHUIR||||{attending}|{referring}|{consulting}||||||||{admitting}"
               "||V2025-0200^^^CHUIR^VN")


def _doctors_message(trigger: str, **fields) -> str:
    values = {"attending": "", "referring": "", "consulting": "", "admitting": "", **fields}
    return ("MSH|^~\\&|HIS_CHU|CHUIR|HIE|MS|20250117093000||ADT^" + trigger + "|D" + trigger + "|P|2.5\n"
            "PID|1||665544^^^CHUIR^MR||OUAZZANI^Hamid||19700822|M\n" + PV1_SEGMENT.format(**values) + "\n")


@pytest.mark.parametrize("trigger", ["A01", "A02", "A03", "A11", "A41", "A60"])
def test_participants_in_every_adt_structure(mappings, trigger):
    doctor_a = "100567890^BERRADA^Samir^^^Dr^^^INPE"
    doctor_b = "100678901^CHRAIBI^Leila^^^Dr^^^INPE"
    bundle = translate_text(mappings, _doctors_message(
        trigger, attending=f"{doctor_a}~{doctor_b}", referring=doctor_b, consulting=f"{doctor_a}~{doctor_a}",
        admitting=doctor_a))
    encounter = resources(bundle, "Encounter")[0]
    family = {p["id"]: p["name"][0]["family"] for p in resources(bundle, "Practitioner")}
    assert len(family) == 2
    # The same doctor twice in PV1-9 is one consultant.
    assert [(code, family[who]) for code, who in participants(encounter)] == [
        ("ATND", "BERRADA"), ("ATND", "CHRAIBI"), ("REF", "CHRAIBI"), ("CON", "BERRADA"), ("ADM", "BERRADA")]
    assert bundle_problems(bundle) == []


def test_a_doctor_after_an_empty_repetition_is_a_participant(mappings):
    """A first repetition naming nobody (no id, no name: no Practitioner) gives no participant;
    the doctor after it does (the role was left out, PV1-7's first repetition being empty)."""
    bundle = translate_text(mappings, _doctors_message(
        "A01", attending="^^^^^^^^INPE~100567890^BERRADA^Samir^^^Dr^^^INPE"))
    family = {p["id"]: p["name"][0]["family"] for p in resources(bundle, "Practitioner")}
    encounter = resources(bundle, "Encounter")[0]
    assert [(code, family[who]) for code, who in participants(encounter)] == [("ATND", "BERRADA")]


def test_each_message_map_names_the_doctors_before_the_encounter():
    """transforms/encounter.py reads the practitioners the message map named attender, referrer,
    consultant and admitter: every map that builds PV1.Encounter builds them, before it."""
    import yaml

    wanted = [("attender", "PV1-7"), ("referrer", "PV1-8"), ("consultant", "PV1-9"), ("admitter", "PV1-17")]
    checked = 0

    def walk(entries):
        nonlocal checked
        for number, entry in enumerate(entries):
            if entry.get("map") == "PV1.Encounter":
                before = [(e.get("name"), e.get("each")) for e in entries[:number] if e.get("map") == "XCN.Practitioner"]
                assert all(role in before for role in wanted), (path.name, before)
                checked += 1
            walk(entry.get("resources") or [])

    for path in sorted((ROOT / "mappings" / "messages").glob("*.yaml")):
        walk(yaml.safe_load(path.read_text(encoding="utf-8")).get("resources") or [])
    assert checked >= 12


def test_coverage_with_cnss_payer(mappings):
    bundle = bundle_of(mappings, "a01-admission.hl7")
    coverage = resources(bundle, "Coverage")[0]
    patient = resources(bundle, "Patient")[0]
    assert coverage["status"] == "active"
    assert coverage["beneficiary"] == {"reference": "urn:uuid:" + patient["id"]}
    assert coverage["subscriberId"] == "112233445"
    assert coverage["period"] == {"start": "2025-01-01", "end": "2025-12-31"}
    payer_id = coverage["payor"][0]["reference"].split(":")[-1]
    payer = [o for o in resources(bundle, "Organization") if o["id"] == payer_id][0]
    assert payer["name"] == "Caisse Nationale de Sécurité Sociale"


def test_a40_merge_links_both_patients(mappings):
    survivor, merged = resources(bundle_of(mappings, "a40-merge.hl7"), "Patient")
    assert survivor["link"] == [{"other": {"reference": "urn:uuid:" + merged["id"]}, "type": "replaces"}]
    assert merged["link"] == [{"other": {"reference": "urn:uuid:" + survivor["id"]}, "type": "replaced-by"}]
    assert merged["active"] is False
    assert merged["identifier"][0]["value"] == "987654"
    # the survivor is the patient of the other messages
    assert survivor["id"] == resources(bundle_of(mappings, "a01-admission.hl7"), "Patient")[0]["id"]


def test_sender_100001_puts_the_cnie_in_pid2(mappings):
    patient = resources(bundle_of(mappings, "sender-INPE-100001-cnie-in-pid2.hl7"), "Patient")[0]
    assert patient["identifier"][0]["system"] == "urn:ma:cnie"
    assert patient["identifier"][0]["value"] == "AB654321"
    # without the sender's layer, PID-2 is an ordinary local identifier (no assigner, no type)
    text = (CASES / "sender-INPE-100001-cnie-in-pid2.hl7").read_text(encoding="utf-8")
    shared = resources(translate_text(mappings, text), "Patient")[0]
    assert shared["identifier"][0].get("system") == "urn:ma:hie:local:unknown::"


def test_the_gateway_uses_the_layer_of_the_registry_facility(mappings):
    """The translator reads a facility's own files from mappings/senders/<its id>, or from the
    folder its `mappings:` setting names."""
    from datetime import datetime, timezone

    from gateway.config import SenderConfig
    from gateway.store.translations import Pending
    from gateway.translation.translator import Translator

    raw = (CASES / "sender-INPE-100001-cnie-in-pid2.hl7").read_bytes().replace(b"\n", b"\r")
    chu = SenderConfig("INPE-100001", "CHU", "hospital")
    renamed = SenderConfig("INPE-777777", "CHU, new id", "hospital", mappings="INPE-100001")
    other = SenderConfig("INPE-100009", "Another hospital", "hospital")
    translator = Translator(mappings, [chu, renamed, other])

    def first_identifier(sender_id):
        record = translator.translate(Pending(None, None, raw, None, "hl7v2", sender_id,
                                              datetime.now(timezone.utc)))
        assert not record.failed, record.error_reason
        return resources(record.bundle, "Patient")[0]["identifier"][0].get("system")

    assert first_identifier("INPE-100001") == "urn:ma:cnie"
    assert first_identifier("INPE-777777") == "urn:ma:cnie"
    assert first_identifier("INPE-100009") == "urn:ma:hie:local:INPE-100009::"


A01 = """MSH|^~\\&|HIS|CHUIR|HIE|MS|20250114083500||ADT^A01^ADT_A01|BAD1|P|2.5
PID|1||123456^^^CHUIR^MR||BENALI^Fatima||19850312|F
PV1|1|I|CARDIO^12^B|||||||||||||||V1^^^CHUIR^VN|||||||||||||||||||||||||202501140835"""


def translation_of(mappings, text: str):
    parsed = read_input(text.replace("\n", "\r").encode("utf-8"))
    context = TranslationContext(received_at=GOLDEN_RECEIVED_AT, message_key=f"test|{parsed.control_id}",
                                 control_id=parsed.control_id)
    return mappings.translate(parsed.message, context, parsed.message_type)


ABSENT = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason", "valueCode": "error"}]}


def test_unreadable_birth_date_is_absent_with_its_reason_and_a_warning(mappings):
    """PID-7 that is no date (month 13, 'Aug 15, 1942'): the patient and the visit arrive, the
    birth date is a data-absent-reason (patients are told apart by it), and a warning names
    the field and the text as the sender wrote it; the birth time extension is not made."""
    for written in ("19851332", "Aug 15, 1942", "198503121"):
        result = translation_of(mappings, A01.replace("19850312", written))
        patient, = resources(result.bundle, "Patient")
        assert "birthDate" not in patient and patient["_birthDate"] == ABSENT
        assert patient["gender"] == "female" and resources(result.bundle, "Encounter")
        assert bundle_problems(result.bundle) == []
        warning, = result.warnings
        assert warning.startswith(f"PID[1]: PID-7: '{written}' is not")
        assert warning.endswith("birthDate left out, data-absent-reason 'error' in its place")


def test_unreadable_death_date_still_says_so(mappings):
    """PID-29 unreadable: a data-absent-reason on deceasedDateTime, not a patient who looks alive
    because the date was dropped silently."""
    text = A01.replace("19850312|F", "19850312|F" + "|" * 21 + "2025011399")
    patient, = resources(translation_of(mappings, text).bundle, "Patient")
    assert patient["_deceasedDateTime"] == ABSENT and "deceasedBoolean" not in patient


def test_unreadable_optional_time_without_data_absent_is_left_out(mappings):
    """PV1-44 (admission) unreadable: the period start is left out, with a warning."""
    result = translation_of(mappings, A01 + "|2025-01-14")  # PV1-44, after PV1-43
    encounter, = resources(result.bundle, "Encounter")
    assert "start" not in encounter.get("period", {}) and "_start" not in encounter.get("period", {})
    assert result.warnings == ["PV1[1]: PV1-44: '2025-01-14' is not an HL7 date/time "
                               "(YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]); period.start left out"]


def test_unmapped_patient_class_is_an_error_with_location(mappings):
    with pytest.raises(TranslationError) as error:
        translate_text(mappings, A01.replace("PV1|1|I|", "PV1|1|X|"))
    assert error.value.location == "PV1[1]"
    assert "patient_class" in error.value.reason


def test_merge_without_prior_identifier_is_an_error(mappings):
    text = A01.replace("ADT^A01^ADT_A01", "ADT^A40^ADT_A39").split("\nPV1")[0] + "\nMRG|||||||BENALLI^Fatima"
    with pytest.raises(TranslationError) as error:
        translate_text(mappings, text)
    assert error.value.location == "MRG[1]"
    assert "required" in error.value.reason


@pytest.mark.skipif(not CORPUS.is_dir(), reason="shared corpus not available")
def test_corpus_adt_messages_translate_and_validate(mappings):
    checked = 0
    for path in sorted(CORPUS.glob("ADT*.hl7")):
        parsed = read_input(path.read_bytes())
        if mappings.message_map(parsed.message_type) is None:
            continue
        context = TranslationContext(received_at=GOLDEN_RECEIVED_AT, message_key=parsed.control_id,
                                     control_id=parsed.control_id)
        bundle = mappings.translate(parsed.message, context, parsed.message_type).bundle
        assert bundle_problems(bundle) == [], path.name
        assert resources(bundle, "Patient"), path.name
        checked += 1
    assert checked >= 25


def test_allergies_diagnoses_procedures_and_observations_of_the_patient(mappings):
    """AL1 -> AllergyIntolerance, DG1 -> Condition, PR1 -> Procedure, OBX -> Observation, each
    of the patient (v2-to-FHIR AL1, DG1, PR1, OBX rows); an AL1 naming no allergen gives none."""
    text = A01 + ("\nOBX|1|NM|29463-7^Poids^LN||64.5|kg^kg^UCUM|||||F"
                  "\nAL1|1|DA^Médicament^HL70127|J01CA04^Amoxicilline^ATC|SV^Sévère^HL70128|Urticaire"
                  "\nAL1|2|FA^Aliment^HL70127"
                  "\nDG1|1||I20.9^Angor^I10|Angor stable|20250114"
                  "\nPR1|1||0JH60DZ^Pose de pacemaker^I10P||20250114103000")
    bundle = translate_text(mappings, text)
    allergy, = resources(bundle, "AllergyIntolerance")
    assert (allergy["category"], allergy["criticality"], allergy["reaction"][0]["severity"]) == \
        (["medication"], "high", "severe")
    condition, = resources(bundle, "Condition")
    assert condition["code"]["text"] == "Angor stable" and condition["onsetDateTime"] == "2025-01-14"
    procedure, = resources(bundle, "Procedure")
    assert procedure["status"] == "unknown" and procedure["performedDateTime"] == "2025-01-14T10:30:00+01:00"
    observation, = resources(bundle, "Observation")
    patient = resources(bundle, "Patient")[0]
    for found in (allergy["patient"], condition["subject"], procedure["subject"], observation["subject"]):
        assert found["reference"] == "urn:uuid:" + patient["id"]
    assert bundle_problems(bundle) == []


def patient_identifiers(mappings, text: str) -> dict[str, str]:
    """value -> type code of the patient's identifiers."""
    patient, = resources(translation_of(mappings, text).bundle, "Patient")
    return {i["value"]: ((i.get("type") or {}).get("coding") or [{}])[0].get("code", "") for i in patient["identifier"]}


GUARANTOR = ("GT1|1|G-42^^^CHUIR^GN|BENALI^Fatima||||||||{relationship}|887766554|||||||EMP-7^^^ATLAS^EI")


def test_guarantor_who_is_the_patient_gives_identifiers(mappings):
    """GT1-11 SEL: the guarantor number, SSN (typed SB) and employee ID are the patient's; a
    parent or spouse as guarantor gives the patient none of theirs."""
    found = patient_identifiers(mappings, A01 + "\n" + GUARANTOR.format(relationship="SEL^Lui-même^HL70063"))
    assert found == {"123456": "MR", "G-42": "GN", "887766554": "SB", "EMP-7": "EI"}
    for other in ("MTH^Mère^HL70063", "SPO", ""):
        assert patient_identifiers(mappings, A01 + "\n" + GUARANTOR.format(relationship=other)) == {"123456": "MR"}


def test_insured_numbers_are_the_patients_only_when_the_insured_is(mappings):
    """IN1-49 (insured's ID) is a patient identifier when IN1-17 is SEL, not when the spouse is
    insured; IN2's covered-person numbers (member number IN2-61, Medicare IN2-6 as MC,
    Medicaid IN2-8 as MA) are the patient's either way; IN2-10 (military ID, maybe the
    sponsor's) and IN2-2 (the insured's SSN) never are."""
    insurance = ("IN1|1|AMO^AMO|CNSS^^^CNSS^NIIP|CNSS|||||||||||||{relationship}" + "|" * 31 + "|223344556^^^CNSS^SN\n"
                 "IN2||425579745||||MC-12345||MA-008||MIL-1" + "|" * 50 + "|AMO-77^^^MUTUELLE^MB")
    spouse = patient_identifiers(mappings, A01 + "\n" + insurance.format(relationship="SPO^Conjoint^HL70063"))
    assert spouse == {"123456": "MR", "AMO-77": "MB", "MC-12345": "MC", "MA-008": "MA"}
    self_insured = patient_identifiers(mappings, A01 + "\n" + insurance.format(relationship="SEL"))
    assert self_insured == {**spouse, "223344556": "SN"}
    assert list(self_insured)[:2] == ["123456", "223344556"]  # PID's first: the patient's id stays


def test_sender_100001_layer_keeps_the_other_identifiers_of_the_shared_map(mappings):
    """The facility's PID.Patient replaces the identifier list to read PID-2 as the CNIE: every
    other identifier the shared map gives (PID-19, PID-20, the insured's and the guarantor's
    numbers when they are the patient's) is still given for its patients."""
    text = (A01.replace("PID|1||123456^^^CHUIR^MR||BENALI^Fatima||19850312|F",
                        "PID|1|ab 654321|123456^^^CHUIR^MR||BENALI^Fatima||19850312|F" + "|" * 10
                        + "|112233445|DL-9^MA^20300101")
            + "\n" + GUARANTOR.format(relationship="SEL"))
    patient, = resources(translate_text(mappings, text, sender="INPE-100001"), "Patient")
    found = {i["value"]: ((i.get("type") or {}).get("coding") or [{}])[0].get("code", "") for i in patient["identifier"]}
    assert found == {"AB654321": "NI", "123456": "MR", "112233445": "SB", "DL-9": "DL",
                     "G-42": "GN", "887766554": "SB", "EMP-7": "EI"}
    shared, = resources(translate_text(mappings, text), "Patient")
    assert [i["value"] for i in shared["identifier"]][1:] == list(found)[1:]


@pytest.mark.parametrize("authority", ["cnie", "Cin", " CNIE "])
def test_cnie_number_is_normalised_whatever_the_case_of_its_authority(mappings, authority):
    """CX-4 'cnie' names the national card as 'CNIE' does (the system is urn:ma:cnie either
    way): its number is normalised too, so that one card is one patient."""
    text = A01.replace("123456^^^CHUIR^MR", f"ab 654321^^^{authority}^NI")
    patient, = resources(translate_text(mappings, text), "Patient")
    reference, = resources(translate_text(mappings, A01.replace("123456^^^CHUIR^MR", "AB654321^^^CNIE^NI")),
                           "Patient")
    assert patient["identifier"][0]["system"] == "urn:ma:cnie"
    assert patient["identifier"][0]["value"] == "AB654321"
    assert patient["id"] == reference["id"]


def test_a_hospitals_own_numbers_get_a_system_of_the_sender_assigner_and_type(mappings):
    """A CX that no national authority or ISO OID names gets the gateway's system for the
    sender's own numbers, urn:ma:hie:local:<sender>:<CX-4.1>:<CX-5> (each part percent-encoded,
    escapes decoded first): what the shared record finds a registration by. National
    authorities and OIDs keep theirs; the ids stay those made from sender, assigner and type."""
    def identifiers(pid3: str, sender: str = "") -> list[tuple[str, str]]:
        patient, = resources(translate_text(mappings, A01.replace("123456^^^CHUIR^MR", pid3), sender), "Patient")
        return [(i["value"], i.get("system")) for i in patient["identifier"]]

    assert identifiers("123456^^^CHUIR^MR") == [("123456", "urn:ma:hie:local:unknown:CHUIR:MR")]
    assert identifiers("123456^^^CHUIR^MR", sender="INPE-100001")[-1][1] == \
        "urn:ma:hie:local:INPE-100001:CHUIR:MR"
    assert identifiers("77^^^^PI") == [("77", "urn:ma:hie:local:unknown::PI")]
    assert identifiers("78^^^H\\T\\D:1 é&x^MR") == [("78", "urn:ma:hie:local:unknown:H%26D%3A1%20%C3%A9:MR")]
    assert identifiers("79^^^CHUIR&2.16.504.1.9&ISO^MR") == [("79", "urn:oid:2.16.504.1.9")]
    assert identifiers("ab1^^^CNIE^NI~80^^^CHUIR^MR") == [
        ("AB1", "urn:ma:cnie"), ("80", "urn:ma:hie:local:unknown:CHUIR:MR")]
    assert identifiers("^^^CHUIR^MR~81^^^CHUIR^MR") == [("81", "urn:ma:hie:local:unknown:CHUIR:MR")]
    # The id of a Patient known by its number alone is the one it had before numbers had a system.
    patient, = resources(translate_text(mappings, A01), "Patient")
    assert patient["id"] == name_id("Patient||CHUIR|MR|123456")

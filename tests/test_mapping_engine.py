"""The mapping engine on small mapping sets written by each test (pure)."""
import textwrap
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from adapters.hl7v2.message import parse_message
from gateway.mapping.engine import name_id
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.path import Hl7Path, PathError, parse_path
from gateway.mapping.runtime import MissingResource, TranslationContext, TranslationError
from gateway.mapping.source import MappingErrors
from gateway.mapping.transforms.core import fhir_datetime

CASABLANCA = ZoneInfo("Africa/Casablanca")

ORU = ("MSH|^~\\&|LAB|LABO_RABAT|GW|MA|20250114083512||ORU^R01|M1|P|2.5\r"
       "PID|1||P1^^^LABO^MR~BE123456^^^CNIE^NI||Alaoui^Samira~العلوي^سميرة||19800101|F\r"
       "ORC|RE|ORD1\r"
       "OBR|1|ORD1||GLU^Glucose^L\r"
       "OBX|1|NM|GLU^Glucose^L||5.4|mmol/L|||||F|||202501140745\r"
       "NTE|1||fasting\r"
       "OBX|2|ST|COM^Comment^L||Hémolysé \\T\\ refait||||||P\r"
       "OBR|2|ORD2||K^Potassium^L\r"
       "OBX|1|NM|K^Potassium^L||4.1|mmol/L|||||F\r")

BASE = {
    "tables/gender.yaml": """
        unmapped: error
        codes: {F: female, M: male}
    """,
    "tables/status.yaml": """
        unmapped: default
        default: unknown
        codes: {F: final, P: preliminary}
    """,
    "datatypes/CX.Identifier.yaml": """
        type: Identifier
        map:
          value: {from: 1, required: true}
          system: {when: {field: 4, is: CNIE}, default: "urn:ma:cnie"}
    """,
    "segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifier}
          name:
            each: PID-5
            map:
              family: {from: 1}
              given: {from: 2}
          birthDate: {from: PID-7, transform: date}
          gender: {from: PID-8, lookup: gender}
    """,
    "segments/OBX.Observation.yaml": """
        resource: Observation
        map:
          status: {from: OBX-11, lookup: status}
          code: {map: {text: {from: OBX-3.2}}}
          subject: {from: "@patient"}
          valueQuantity:
            when: {field: OBX-2, is: NM}
            map:
              value: {from: OBX-5, transform: decimal}
              unit: {from: OBX-6}
          valueString: {when: {any: [{field: OBX-2, is: ST}, {field: OBX-2, is: TX}]}, from: OBX-5}
          effectiveDateTime: {from: OBX-14, transform: datetime}
          note: {each: NTE, map: {text: {from: NTE-3}}}
    """,
    "segments/OBR.DiagnosticReport.yaml": """
        resource: DiagnosticReport
        map:
          status: final
          code: {map: {text: {from: OBR-4.2}}}
          subject: {from: "@patient"}
          result: {each: "@observation"}
          performer:
            - {from: "@patient"}
            - {from: "@nobody"}
            - {each: "@observation"}
    """,
    "messages/ORU_R01.yaml": """
        messages: [ORU^R01]
        resources:
          - name: patient
            from: PID
            map: PID.Patient
          - each: [ORC, OBR]
            resources:
              - name: report
                from: OBR
                map: OBR.DiagnosticReport
              - name: observation
                each: OBX
                map: OBX.Observation
    """,
}


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return root


def translate(mapping_set, text=ORU, sender=""):
    message = parse_message(text)
    context = TranslationContext(sender_id=sender, timezone=CASABLANCA,
                                 received_at=datetime(2025, 1, 14, 8, 35, tzinfo=timezone.utc),
                                 message_key=f"{sender}|M1", control_id="M1")
    return mapping_set.translate(message, context).bundle


def resources(bundle, kind):
    return [entry["resource"] for entry in bundle["entry"] if entry["resource"]["resourceType"] == kind]


@pytest.fixture
def mapping_set(tmp_path):
    return MappingSet.load(write(tmp_path / "mappings", BASE))


def test_groups_observations_and_references(mapping_set):
    """Each order group gets its report, which references that group's observations only;
    every observation references the patient."""
    bundle = translate(mapping_set)
    patient, = resources(bundle, "Patient")
    reports = resources(bundle, "DiagnosticReport")
    observations = resources(bundle, "Observation")
    assert [r["code"]["text"] for r in reports] == ["Glucose", "Potassium"]
    assert len(observations) == 3
    first, second = reports
    ids = [o["id"] for o in observations]
    assert [ref["reference"] for ref in first["result"]] == [f"urn:uuid:{i}" for i in ids[:2]]
    assert [ref["reference"] for ref in second["result"]] == [f"urn:uuid:{ids[2]}"]
    assert all(o["subject"] == {"reference": f"urn:uuid:{patient['id']}"} for o in observations)
    assert bundle["entry"][-1]["resource"]["resourceType"] == "Provenance"
    assert len(bundle["entry"][-1]["resource"]["target"]) == 6


def test_values_conditions_lookups_and_notes(mapping_set):
    """when/is picks the value type, escapes are decoded, lookups apply, and a segment's
    NTE run belongs to it alone."""
    first, comment, potassium = resources(translate(mapping_set), "Observation")
    assert first["valueQuantity"] == {"value": 5.4, "unit": "mmol/L"}
    assert "valueString" not in first
    assert first["note"] == [{"text": "fasting"}]
    assert first["effectiveDateTime"] == "2025-01-14T07:45:00+01:00"
    assert comment["valueString"] == "Hémolysé & refait"
    assert comment["status"] == "preliminary" and "note" not in comment
    assert "valueQuantity" not in comment


def test_repetitions_become_arrays_and_arabic_names_are_kept(mapping_set):
    """A repeating field mapped with each gives one item per repetition, text kept exactly."""
    patient, = resources(translate(mapping_set), "Patient")
    assert patient["name"] == [{"family": "Alaoui", "given": ["Samira"]},
                               {"family": "العلوي", "given": ["سميرة"]}]
    assert patient["identifier"] == [{"value": "P1"}, {"value": "BE123456", "system": "urn:ma:cnie"}]
    assert patient["birthDate"] == "1980-01-01" and patient["gender"] == "female"


def test_ids_are_deterministic(mapping_set):
    """Same message, same ids; a resource with an identifier keeps its id across messages."""
    first, again = translate(mapping_set), translate(mapping_set)
    assert [e["fullUrl"] for e in first["entry"]] == [e["fullUrl"] for e in again["entry"]]
    other = translate(mapping_set, ORU.replace("|M1|", "|M2|"))
    assert resources(other, "Patient")[0]["id"] == resources(first, "Patient")[0]["id"]


def test_unmapped_code_with_policy_error_fails_with_location(mapping_set):
    """A code missing from a table whose policy is error names the segment and the rule."""
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, ORU.replace("||19800101|F", "||19800101|X"))
    assert caught.value.location == "PID[1]"
    assert "'X' is not in table 'gender'" in caught.value.reason
    assert caught.value.mapping.startswith("mappings/segments/PID.Patient.yaml:")


def test_required_value_missing(mapping_set):
    """required: true with nothing to read is an error, not a silent gap."""
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, ORU.replace("PID|1||P1^^^LABO^MR~", "PID|1||^^^LABO^MR~"))
    assert "value is required" in caught.value.reason


def translation(mapping_set, text=ORU):
    message = parse_message(text)
    context = TranslationContext(timezone=CASABLANCA, received_at=datetime(2025, 1, 14, 8, 35, tzinfo=timezone.utc),
                                 message_key="|M1", control_id="M1")
    return mapping_set.translate(message, context)


def test_unreadable_optional_date_is_left_out_with_a_warning(mapping_set):
    """A date that is no date, on a rule that is not required: the element is left out, the
    message translated, and a warning names the place, the field and the text."""
    result = translation(mapping_set, ORU.replace("19800101", "19801301"))
    patient, = resources(result.bundle, "Patient")
    assert "birthDate" not in patient and "_birthDate" not in patient and patient["gender"] == "female"
    assert result.warnings == ["PID[1]: PID-7: '19801301' is not a valid date; birthDate left out"]
    # Every OBX still arrives; only the unreadable time is missing from the first one.
    first, *others = resources(translation(mapping_set, ORU.replace("202501140745", "2025011407451")).bundle,
                               "Observation")
    assert "effectiveDateTime" not in first and first["valueQuantity"]["value"] == 5.4 and len(others) == 2


def test_unreadable_date_with_data_absent_gives_the_reason_in_its_place(tmp_path):
    """data_absent: error writes FHIR's data-absent-reason as `_element`, in a resource and in
    a nested map; the value, when readable, is written as before."""
    files = dict(BASE)
    files["segments/PID.Patient.yaml"] = BASE["segments/PID.Patient.yaml"].replace(
        "birthDate: {from: PID-7, transform: date}", "birthDate: {from: PID-7, transform: date, data_absent: error}")
    files["segments/OBX.Observation.yaml"] = BASE["segments/OBX.Observation.yaml"].replace(
        "effectiveDateTime: {from: OBX-14, transform: datetime}",
        "effectivePeriod: {map: {start: {from: OBX-14, transform: datetime, data_absent: error}}}")
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    absent = {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/data-absent-reason",
                             "valueCode": "error"}]}
    result = translation(mapping_set, ORU.replace("19800101", "Aug 15, 1942").replace("202501140745", "x"))
    patient, = resources(result.bundle, "Patient")
    assert "birthDate" not in patient and patient["_birthDate"] == absent
    first = resources(result.bundle, "Observation")[0]
    assert first["effectivePeriod"] == {"_start": absent}
    assert result.warnings[0].startswith("PID[1]: PID-7: 'Aug 15, 1942' is not an HL7 date/time")
    assert result.warnings[0].endswith("; birthDate left out, data-absent-reason 'error' in its place")
    assert result.warnings[1].startswith("OBX[1]: OBX-14: 'x' is not")
    # Two translations do not share the extension (each bundle its own dict).
    again, = resources(translation(mapping_set, ORU.replace("19800101", "1942")).bundle, "Patient")
    assert again["birthDate"] == "1942" and "_birthDate" not in again
    assert resources(translation(mapping_set, ORU.replace("19800101", "x")).bundle, "Patient")[0][
        "_birthDate"] is not patient["_birthDate"]


def test_unreadable_required_date_is_still_an_error(tmp_path):
    """required: true keeps the transform's reason as the translation's error, with its place."""
    files = dict(BASE)
    files["segments/PID.Patient.yaml"] = BASE["segments/PID.Patient.yaml"].replace(
        "birthDate: {from: PID-7, transform: date}", "birthDate: {from: PID-7, transform: date, required: true}")
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, ORU.replace("19800101", "19801301"))
    assert caught.value.location == "PID[1]" and "'19801301' is not a valid date" in caught.value.reason
    assert caught.value.mapping.startswith("mappings/segments/PID.Patient.yaml:")


def test_a_value_transform_that_is_not_lenient_still_fails(mapping_set):
    """Only dates and times are read leniently: a number that is no number fails the message."""
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, ORU.replace("||5.4|", "||5,4,1|"))
    assert caught.value.location == "OBX[1]" and "is not a number" in caught.value.reason


def test_data_absent_is_checked_at_load(tmp_path):
    """data_absent needs a lenient transform, a known code, no required, a single element."""
    files = dict(BASE)
    files["segments/PID.Patient.yaml"] = """
        resource: Patient
        map:
          birthDate: {from: PID-7, transform: date, data_absent: broken}
          gender: {from: PID-8, lookup: gender, data_absent: error}
          deceasedDateTime: {from: PID-29, transform: datetime, required: true, data_absent: error}
          identifier: {each: PID-3, map: {value: {from: 1}, period: {start: {from: 7, transform: datetime}}},
                       data_absent: error}
          name:
            - {from: PID-5, map: {family: {from: 1}}}
            - {from: PID-9, transform: date, data_absent: error}
          contact: {map: {name: {map: {given: [{from: PID-7, transform: date, data_absent: error}]}}}}
    """
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(write(tmp_path / "mappings", files))
    text = str(caught.value)
    for expected in ["map.birthDate.data_absent: data_absent is a DataAbsentReason code",
                     "map.gender.data_absent: data_absent goes with a transform that leaves unreadable values out",
                     "map.deceasedDateTime.data_absent: data_absent and required do not combine",
                     "map.identifier.data_absent: data_absent goes with a transform",
                     "map.name[1].data_absent: name is not a single primitive element",
                     "map.contact.name.given: data_absent stands on an element of a map, not inside a list"]:
        assert expected in text, text


def test_unknown_message_type(mapping_set):
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, ORU.replace("ORU^R01", "SIU^S12"))
    assert "no mapping for message type 'SIU^S12'" in str(caught.value)


def test_every_problem_is_reported_at_once_with_file_line_and_key(tmp_path):
    """Unknown keys, FHIR elements, transforms, tables, maps and bad paths, all together."""
    files = dict(BASE)
    files["segments/PID.Patient.yaml"] = """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifer}
          brithDate: {from: PID-7}
          gender: {from: PID-8, lookup: gendre}
          name: {each: PID-5, fromm: 1}
          deceasedDateTime: {from: PID-29, transform: datetiem}
          active: {from: PID-x}
    """
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(write(tmp_path / "mappings", files))
    text = str(caught.value)
    for expected in ["PID.Patient.yaml:3: map.identifier: no map 'CX.Identifer' (did you mean 'CX.Identifier'?)",
                     "PID.Patient.yaml:4: map.brithDate: Patient has no element 'brithDate' (did you mean 'birthDate'?)",
                     "PID.Patient.yaml:5: map.gender.lookup: no code table 'gendre' (did you mean 'gender'?)",
                     "PID.Patient.yaml:6: map.name.fromm: unknown key",
                     "PID.Patient.yaml:7: map.deceasedDateTime.transform: no transform 'datetiem'",
                     "PID.Patient.yaml:8: map.active.from: no column 'x'"]:
        assert expected in text, text
    assert len(caught.value.problems) == 6


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    files = dict(BASE)
    files["tables/gender.yaml"] = "codes: {F: female\nunmapped: [\n"
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(write(tmp_path / "mappings", files))
    assert "mappings/tables/gender.yaml:" in str(caught.value) and "invalid YAML" in str(caught.value)


def test_sender_override_extends_only_what_it_lists(tmp_path):
    """A facility's file with extends: true replaces its listed elements; others keep the
    shared map, and other senders are unaffected."""
    files = dict(BASE)
    files["senders/100001/segments/PID.Patient.yaml"] = """
        extends: true
        map:
          identifier:
            - map: {value: {from: PID-2}, system: urn:ma:cnie}
    """
    files["senders/100001/tables/gender.yaml"] = """
        extends: true
        codes: {X: other}
    """
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    message = ORU.replace("PID|1||", "PID|1|AB998877|").replace("||19800101|F", "||19800101|X")
    patient, = resources(translate(mapping_set, message, sender="100001"), "Patient")
    assert patient["identifier"] == [{"value": "AB998877", "system": "urn:ma:cnie"}]
    assert patient["gender"] == "other" and patient["name"][0]["family"] == "Alaoui"
    with pytest.raises(TranslationError):
        translate(mapping_set, message, sender="100002")


def test_version_changes_with_any_file(tmp_path):
    root = write(tmp_path / "mappings", BASE)
    before = MappingSet.load(root).version
    (root / "tables/status.yaml").write_text("unmapped: passthrough\ncodes: {F: final}\n")
    assert MappingSet.load(root).version != before


def test_name_id_is_uuid5():
    import uuid
    from gateway.mapping.engine import ID_NAMESPACE
    assert name_id("Patient|urn:ma:cnie|BE1") == str(uuid.uuid5(ID_NAMESPACE, "Patient|urn:ma:cnie|BE1"))


@pytest.mark.parametrize("text, expected", [
    ("PID", Hl7Path("PID")),
    ("PID-3", Hl7Path("PID", 3)),
    ("PID-3.4.2", Hl7Path("PID", 3, 4, 2)),
    ("4.10", Hl7Path(component=4, subcomponent=10)),
    (1, Hl7Path(component=1)),
    ("@patient", Hl7Path(reference="patient")),
    ("R-3", Hl7Path("R", 3)),
    ("ROW-ean13", Hl7Path("ROW", column="ean13")),
])
def test_paths(text, expected):
    assert parse_path(text) == expected


@pytest.mark.parametrize("text", ["PID-0", "pid-3", "PID-3.", "0", "@Patient", "PID-3..1", None,
                                  "PID-3.0", "PID-3.1.0"])  # component 0 read the whole field
def test_bad_paths(text):
    with pytest.raises(PathError):
        parse_path(text)


@pytest.mark.parametrize("text, expected", [
    ("2025", "2025"),
    ("202501", "2025-01"),
    ("20250114", "2025-01-14"),
    ("2025011408", "2025-01-14T08:00:00+01:00"),
    ("202501140835", "2025-01-14T08:35:00+01:00"),
    ("20250114083512.123", "2025-01-14T08:35:12.123+01:00"),
    ("20250114083512+0000", "2025-01-14T08:35:12+00:00"),
    ("20250114083512-0500", "2025-01-14T08:35:12-05:00"),
    # Ramadan 2025: Morocco moved to UTC+0 from 23 February to 6 April.
    ("20250310120000", "2025-03-10T12:00:00+00:00"),
])
def test_hl7_datetimes_become_fhir_datetimes_in_the_sender_zone(text, expected):
    """Seconds and zone whenever there is a time; Africa/Casablanca through zoneinfo."""
    assert fhir_datetime(text, CASABLANCA) == expected


@pytest.mark.parametrize("text", ["2025013", "20251301", "2025011425", "20250230", "abc"])
def test_bad_datetimes(text):
    with pytest.raises(ValueError):
        fhir_datetime(text, CASABLANCA)


def test_references_listed_among_other_rules(mapping_set):
    """A list of reference rules gives one array: missing targets dropped, `each` spliced in."""
    bundle = translate(mapping_set)
    patient, = resources(bundle, "Patient")
    first = resources(bundle, "DiagnosticReport")[0]
    observations = resources(bundle, "Observation")[:2]
    assert first["performer"] == [{"reference": f"urn:uuid:{patient['id']}"}] + [
        {"reference": f"urn:uuid:{o['id']}"} for o in observations]


def test_identity_joins_the_identifier_in_the_id(tmp_path):
    """`identity: [code]`: two reports sharing an order number but not their code are two
    resources; the id ignores the code's display text."""
    files = dict(BASE)
    files["segments/OBR.DiagnosticReport.yaml"] = """
        resource: DiagnosticReport
        identity: [code]
        map:
          identifier: {each: OBR-2, map: {value: {from: 1}}}
          status: final
          code: {map: {coding: [{system: "urn:x", code: {from: OBR-4.1}, display: {from: OBR-4.2}}]}}
    """
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    shared = ORU.replace("OBR|2|ORD2|", "OBR|2|ORD1|")
    first, second = resources(translate(mapping_set, shared), "DiagnosticReport")
    assert first["id"] != second["id"]
    renamed = translate(mapping_set, shared.replace("GLU^Glucose^L", "GLU^Glycémie^L"))
    assert resources(renamed, "DiagnosticReport")[0]["id"] == first["id"]


def test_identity_is_checked(tmp_path):
    files = dict(BASE)
    files["segments/OBR.DiagnosticReport.yaml"] = """
        resource: DiagnosticReport
        identity: [kode]
        map:
          status: final
          code: {map: {text: {from: OBR-4.2}}}
    """
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(write(tmp_path / "mappings", files))
    text = str(caught.value)
    assert "DiagnosticReport has no element 'kode'" in text
    assert "the map gives no identifier" in text


def test_messages_that_are_not_translated(tmp_path):
    """`not_translated: REASON` for every message of the types (CODE^* for every trigger);
    `{when, reason}` beside resources for some; either raises NotTranslated with the reason."""
    from gateway.mapping.runtime import NotTranslated
    files = dict(BASE)
    files["messages/ACK.yaml"] = """
        messages: ["ACK^*"]
        not_translated: an acknowledgement carries no clinical data
    """
    files["messages/ORU_R01.yaml"] = BASE["messages/ORU_R01.yaml"].replace("messages: [ORU^R01]", """\
        messages: [ORU^R01]
        not_translated:
          when: {field: OBR, present: false}
          reason: no order""")
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    for kind in ("ACK^A01", "ACK"):
        with pytest.raises(NotTranslated) as caught:
            translate(mapping_set, f"MSH|^~\\&|A|B|C|D|20250101||{kind}|M1|P|2.5\rMSA|AA|X1\r")
        assert caught.value.reason == "not translated: an acknowledgement carries no clinical data"
        assert caught.value.location == "MSH[1]-9"
    with pytest.raises(NotTranslated, match="not translated: no order"):
        translate(mapping_set, ORU.split("ORC|")[0])
    assert resources(translate(mapping_set), "DiagnosticReport")
    with pytest.raises(TranslationError, match="no mapping for message type 'ACQ'"):
        translate(mapping_set, ORU.replace("ORU^R01", "ACQ"))


def test_not_translated_is_checked(tmp_path):
    files = dict(BASE)
    files["messages/ACK.yaml"] = """
        messages: ["ACK^*"]
        not_translated: {reason: forgot when}
    """
    files["messages/QRY.yaml"] = """
        messages: ["QRY^*"]
        not_translated: a query
        resources:
          - {from: PID, map: PID.Patient}
    """
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(write(tmp_path / "mappings", files))
    text = str(caught.value)
    assert "ACK.yaml:2: not_translated: give the reason (text), or {when: CONDITION, reason: TEXT}" in text
    assert "QRY.yaml:2: not_translated: a message map whose messages are not translated has no resources" in text


def test_a_message_that_gives_no_resource_is_refused(mapping_set):
    """Nothing to store (and a Provenance needs a target): refused, naming the segments."""
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, "MSH|^~\\&|A|B|C|D|20250101||ORU^R01|M1|P|2.5\rNTE|1||x\r")
    assert caught.value.reason == \
        "nothing to translate: no segment of the message gives a resource (segments: MSH, NTE)"
    assert caught.value.location == "MSH[1]"


def test_a_site_defined_message_without_a_map_says_what_is_needed(mapping_set):
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, ORU.replace("ORU^R01", "ZDT^Z01"))
    assert caught.value.reason == ("no mapping for message type 'ZDT^Z01'; a site-defined (Z) message needs "
                                   "its facility's own map (mappings/senders/<facility>/messages/)")


def test_before_the_first_segment(tmp_path):
    """`{before: ORC}`: an OBX before the first order is the patient's; `before:` is checked."""
    files = dict(BASE)
    files["messages/ORU_R01.yaml"] = BASE["messages/ORU_R01.yaml"].rstrip(" ") + """\
          - name: observation
            each: OBX
            when: {before: ORC}
            map: OBX.Observation
    """
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    text = ORU.replace("ORC|RE|ORD1\r", "OBX|1|NM|WT^Poids^L||70|kg|||||F\rORC|RE|ORD1\r")
    observations = resources(translate(mapping_set, text), "Observation")
    assert [o["code"]["text"] for o in observations] == ["Glucose", "Comment", "Potassium", "Poids"]
    files["messages/ORU_R01.yaml"] = files["messages/ORU_R01.yaml"].replace("{before: ORC}", "{before: orc1}")
    with pytest.raises(MappingErrors, match=r"before: names a segment, such as ORC"):
        MappingSet.load(write(tmp_path / "other", files))


def test_export_shows_what_is_not_translated_and_before(tmp_path):
    from gateway.mapping.export import export_rows
    files = dict(BASE)
    files["messages/ACK.yaml"] = """
        messages: ["ACK^*"]
        not_translated: an acknowledgement carries no clinical data
    """
    files["messages/ORU_R01.yaml"] = BASE["messages/ORU_R01.yaml"].rstrip(" ") + """\
          - {name: observation, each: OBX, when: {before: ORC}, map: OBX.Observation}
    """
    root = write(tmp_path / "mappings", files)
    MappingSet.load(root)
    rows = [row.values() for row in export_rows(root)]
    assert ("ACK", "MSH-9", "", "not translated: an acknowledgement carries no clinical data", "", "", "") in rows
    assert ("ORU_R01", "OBX", "before the first ORC", "observation", "", "", "OBX.Observation") in rows


def test_export_shows_first_of_transforms_and_data_absent(tmp_path):
    """The tabular export (for clinical review) gives each first_of option the transform that
    applies to it, and says what an unreadable value becomes."""
    from gateway.mapping.export import export_rows
    files = dict(BASE)
    files["segments/OBX.Observation.yaml"] = BASE["segments/OBX.Observation.yaml"].replace(
        "effectiveDateTime: {from: OBX-14, transform: datetime}",
        "effectiveDateTime: {first_of: [{from: OBX-14}, {from: OBR-7}], transform: datetime, data_absent: error}")
    root = write(tmp_path / "mappings", files)
    MappingSet.load(root)
    rows = [row.values() for row in export_rows(root)]
    for number, source in ((1, "OBX-14"), (2, "OBR-7")):
        assert ("OBX.Observation", source, f"first of #{number}", "effectiveDateTime", "datetime", "",
                "unreadable: data-absent-reason error") in rows


def test_export_names_what_a_transform_without_from_reads():
    """A rule without `from:` gives its transform the whole value (a segment, a CX): the
    export's source is then what the transform reads, for every such rule of the shipped
    mappings (a transform added without `reads=` shows as a blank source, and fails here)."""
    from gateway.mapping.export import export_rows
    rows = export_rows(Path(__file__).resolve().parent.parent / "mappings")
    assert not [(row.map, row.target, row.transform) for row in rows if row.transform and not row.source]
    shown = {(row.map, row.target): row.source for row in rows}
    assert shown[("PV1.Encounter", "participant")] == "PV1-7, PV1-8, PV1-9, PV1-17"
    assert shown[("OBX.Observation", "valueQuantity")] == "OBX-2, OBX-5, OBX-6"
    assert shown[("CX.Identifier", "system")] == "CX-1, CX-4.1, CX-5, the sender"


REQUIRED_REFERENCES = {
    "segments/OBR.ServiceRequest.yaml": """
        resource: ServiceRequest
        map:
          status: active
          intent: order
          code: {map: {text: {from: OBR-4.2}}}
          subject: {from: "@patient"}
          requester: {from: "@requester"}
    """,
    "messages/ORM_O01.yaml": """
        messages: [ORM^O01]
        resources:
          - name: patient
            from: PID
            map: PID.Patient
          - name: order
            each: OBR
            map: OBR.ServiceRequest
    """,
}
ORM = ("MSH|^~\\&|HIS|CHU|GW|MA|20250114083512||ORM^O01|M1|P|2.5\r"
       "PID|1||P1^^^LABO^MR||Alaoui^Samira||19800101|F\r"
       "ORC|NW|ORD1\r"
       "OBR|1|ORD1||GLU^Glucose^L\r")


def test_a_reference_fhir_requires_fails_the_translation_when_its_resource_is_missing(tmp_path):
    """ServiceRequest.subject is 1..1 in FHIR R4: an order in a message without PID is a
    precise error naming the rule, not a ServiceRequest the record would refuse. An optional
    reference to nothing (requester) is only left out."""
    mappings = MappingSet.load(write(tmp_path / "mappings", {**BASE, **REQUIRED_REFERENCES}))
    bundle = translate(mappings, ORM)
    order, = resources(bundle, "ServiceRequest")
    assert order["subject"] == {"reference": "urn:uuid:" + resources(bundle, "Patient")[0]["id"]}
    assert "requester" not in order
    with pytest.raises(MissingResource) as caught:
        translate(mappings, ORM.replace("PID|1||P1^^^LABO^MR||Alaoui^Samira||19800101|F\r", ""))
    assert caught.value.reason == "map.subject is required and refers to @patient, which this message does not give"
    assert caught.value.mapping.endswith("OBR.ServiceRequest.yaml:6")


def test_required_true_on_an_optional_reference_is_honoured(tmp_path):
    """`required: true` on a reference FHIR leaves optional (Observation.subject)."""
    files = {**BASE, "segments/OBX.Observation.yaml": BASE["segments/OBX.Observation.yaml"].replace(
        'subject: {from: "@patient"}', 'subject: {from: "@patient", required: true}')}
    mappings = MappingSet.load(write(tmp_path / "mappings", files))
    assert resources(translate(mappings), "Observation")[0]["subject"]
    with pytest.raises(MissingResource, match="map.subject is required and refers to @patient"):
        translate(mappings, ORU.replace("PID|", "ZPI|"))
    without = MappingSet.load(write(tmp_path / "plain", BASE))  # optional: the reference left out
    assert "subject" not in resources(translate(without, ORU.replace("PID|", "ZPI|")), "Observation")[0]


def test_export_writes_any_of_conditions_as_the_guide_does(tmp_path):
    """`{any: [...]}` is exported as its conditions joined by 'or', not as a Python dict."""
    from gateway.mapping.export import export_rows
    files = dict(BASE)
    files["messages/ORU_R01.yaml"] = BASE["messages/ORU_R01.yaml"].rstrip(" ") + """\
          - name: observation
            each: OBX
            when: [{field: OBX-2, not_in: [ED]}, {any: [{field: OBX-2, not_in: [TX, ST]}, {field: OBX-3.1, present: true}]}]
            map: OBX.Observation
    """
    root = write(tmp_path / "mappings", files)
    MappingSet.load(root)
    rows = [row.values() for row in export_rows(root)]
    assert ("ORU_R01", "OBX", "OBX-2 not in [ED] and (OBX-2 not in [TX, ST] or OBX-3.1 present)", "observation",
            "", "", "OBX.Observation") in rows

"""The generated code of the mapping engine (gateway.mapping.codegen): every keyword of the
vocabulary in one map, the errors it raises (file, line, key, HL7 location), the readers of
paths (repetitions, components, subcomponents, escapes), maps specialised to a value's level,
the source kept for debugging, and sets that do not share state (reload swaps whole sets)."""
import textwrap
import traceback
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from adapters.hl7v2.message import parse_message
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import Run, TranslationContext, TranslationError
from gateway.mapping.source import MappingErrors
from gateway.mapping.transforms import REGISTRY, load_all, transform

CASABLANCA = ZoneInfo("Africa/Casablanca")

MESSAGE = ("MSH|^~\\&|LAB|LABO_RABAT|GW|MA|20250114083512||ORU^R01|M1|P|2.5\r"
           "PID|1||P1^^^LABO&1.2.3&ISO^MR~BE123456^^^CNIE^NI||Alaoui^Samira^^^Mme~العلوي^سميرة||19800101|f\r"
           "OBR|1|ORD1|FIL1|GLU^Glucose^L|||20250114074500\r"
           "OBX|1|NM|GLU^Glucose^L||5.4|mmol/L|||||F\r"
           "OBX|2|ST|COM^Comm\\S\\ent^L||Hémolysé \\T\\ refait\\.br\\ligne 2||||||P|||20250114080000\r"
           "OBX|3|XX|SUB^A&B&C^L||x||||||Q\r")

FILES = {
    "tables/gender.yaml": """
        unmapped: error
        codes: {F: female, M: male}
    """,
    "tables/status.yaml": """
        unmapped: default
        default: unknown
        codes: {F: final, P: preliminary}
    """,
    "tables/system.yaml": """
        unmapped: passthrough
        codes: {L: "urn:lab:local"}
    """,
    "datatypes/CWE.CodeableConcept.yaml": """
        type: CodeableConcept
        map:
          coding:
            - code: {from: 1}
              display: {from: 2}
              system: {from: 3, lookup: system}
          text: {first_of: [{from: 9}, {from: 2}]}
    """,
    "datatypes/CX.Identifier.yaml": """
        type: Identifier
        map:
          value: {from: 1, required: true}
          system:
            first_of:
              - {when: {field: 4.1, is: CNIE}, default: "urn:ma:cnie"}
              - {when: {field: 4.3, in: [ISO]}, from: 4.2, transform: trim}
          assigner: {when: {field: 4.1, present: true}, map: {display: {from: 4.1}}}
    """,
    "segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifier}
          name:
            each: PID-5
            map:
              family: {from: 1}
              given: [{from: 2}, {from: 3}]
              prefix: {from: 5}
          gender: {from: PID-8, lookup: gender}
          birthDate: {from: PID-7, transform: date}
    """,
    # Every keyword of the vocabulary, several in one rule.
    "segments/OBX.Observation.yaml": """
        resource: Observation
        map:
          status: {from: OBX-11, lookup: status, default: unknown}
          code: {from: OBX-3, map: CWE.CodeableConcept, required: true}
          subject: {from: "@patient"}
          valueQuantity:
            when: [{field: OBX-2, is: NM}, {field: OBX-5, present: true}]
            map:
              value: {from: OBX-5, transform: decimal}
              unit: {from: OBX-6}
          valueString:
            when: {any: [{field: OBX-2, in: [ST, TX]}, {field: OBX-2, not_in: [NM, ST, TX, XX]}]}
            from: OBX-5
          effectiveDateTime: {first_of: [{from: OBX-14}, {from: OBR-7}], transform: datetime}
          note: {each: PID-3.4.2, map: {text: {from: 1}}}
          method: {when: {field: PID-3.4.3, present: true}, map: {text: {from: PID-3.4.3}}}
          interpretation: {each: OBX-8, map: CWE.CodeableConcept, default: [{text: none}]}
          basedOn: {when: {field: OBR, present: true}, map: {display: {from: OBR-3}}}
    """,
    "messages/ORU_R01.yaml": """
        messages: [ORU^R01]
        resources:
          - name: patient
            from: PID
            map: PID.Patient
          - each: OBR
            resources:
              - name: observation
                each: OBX
                when: {field: OBX-2, not_in: [ED]}
                map: OBX.Observation
    """,
}


def write(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return root


def translate(mapping_set, text=MESSAGE, sender=""):
    context = TranslationContext(sender_id=sender, timezone=CASABLANCA,
                                 received_at=datetime(2025, 1, 14, 8, 35, tzinfo=timezone.utc),
                                 message_key="LABO|M1", control_id="M1")
    return mapping_set.translate(parse_message(text), context).bundle


def of_type(bundle, kind):
    return [entry["resource"] for entry in bundle["entry"] if entry["resource"]["resourceType"] == kind]


@pytest.fixture
def mapping_set(tmp_path):
    return MappingSet.load(write(tmp_path / "mappings", FILES))


def test_every_keyword_of_the_vocabulary(mapping_set):
    bundle = translate(mapping_set)
    patient, = of_type(bundle, "Patient")
    first, second, third = of_type(bundle, "Observation")
    assert patient["identifier"] == [
        {"value": "P1", "system": "1.2.3", "assigner": {"display": "LABO"}},
        {"value": "BE123456", "system": "urn:ma:cnie", "assigner": {"display": "CNIE"}}]
    assert patient["name"] == [{"family": "Alaoui", "given": ["Samira"], "prefix": ["Mme"]},
                               {"family": "العلوي", "given": ["سميرة"]}]
    assert patient["gender"] == "female"  # 'f': the table folds case
    assert patient["birthDate"] == "1980-01-01"
    assert first["status"] == "final"
    assert first["code"] == {"coding": [{"code": "GLU", "display": "Glucose", "system": "urn:lab:local"}],
                             "text": "Glucose"}
    assert first["valueQuantity"] == {"value": 5.4, "unit": "mmol/L"}
    assert "valueString" not in first
    assert first["effectiveDateTime"] == "2025-01-14T07:45:00+01:00"  # OBR-7: OBX-14 is empty
    assert first["interpretation"] == [{"text": "none"}]  # each gave nothing: the default
    assert first["basedOn"] == [{"display": "FIL1"}]  # a list element: one item
    assert first["subject"] == {"reference": "urn:uuid:" + patient["id"]}
    # Escapes decoded at the leaf, after the split: \S\ is a '^' inside a component.
    assert second["code"]["coding"][0]["display"] == "Comm^ent"
    assert second["valueString"] == "Hémolysé & refait\nligne 2"
    assert second["status"] == "preliminary"
    assert second["effectiveDateTime"] == "2025-01-14T08:00:00+01:00"
    # Subcomponents: PID-3.4 is LABO&1.2.3&ISO, read from the OBX (the message's PID).
    assert third["status"] == "unknown"  # Q is not in the table: its default
    assert third["code"]["coding"][0]["display"] == "A"
    assert third["note"] == [{"text": "1.2.3"}]
    assert third["method"] == {"text": "ISO"}
    assert "valueString" not in third  # XX: neither ST/TX nor outside [NM, ST, TX, XX]


def test_required_and_lookup_errors_name_file_line_key_and_segment(mapping_set):
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, MESSAGE.replace("|f\r", "|X\r"))
    error = caught.value
    assert error.location == "PID[1]"
    assert error.mapping.endswith("segments/PID.Patient.yaml:10")
    assert "map.gender" in error.reason and "'X'" in error.reason
    # A required value missing in a datatype map: its own file and line, the segment mapped.
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, MESSAGE.replace("OBX|2|ST|COM^Comm\\S\\ent^L|", "OBX|2|ST||"))
    error = caught.value
    assert error.location == "OBX[2]"
    assert error.mapping.endswith("segments/OBX.Observation.yaml:4")
    assert error.reason == "map.code is required and has no value"


def test_transform_errors_keep_their_reason_and_location(mapping_set):
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, MESSAGE.replace("|5.4|", "|cinq|"))
    error = caught.value
    assert error.location == "OBX[1]"
    assert error.mapping.endswith("segments/OBX.Observation.yaml:9")
    assert error.reason.startswith("map.valueQuantity.value: 'cinq' is not a number")


def test_an_unexpected_exception_shows_the_generated_line_and_its_mapping_file(tmp_path):
    if "test_codegen_boom" not in REGISTRY:
        @transform("test_codegen_boom")
        def boom(value, run):
            raise RuntimeError("a transform bug")
    files = dict(FILES)
    files["segments/PID.Patient.yaml"] = """
        resource: Patient
        map:
          gender: {from: PID-8, transform: test_codegen_boom}
    """
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    with pytest.raises(RuntimeError) as caught:  # a bug is not a TranslationError: it shows
        translate(mapping_set)
    text = "".join(traceback.format_exception(caught.value))
    assert '"<mappings shared>"' in text and "map_PID_Patient" in text
    source = mapping_set.generated_source()
    assert "PID.Patient.yaml" in source.split("def map_PID_Patient")[0].rsplit("\n#", 1)[-1]


def test_generated_source_is_python_with_one_function_per_map(mapping_set):
    source = mapping_set.generated_source()
    compile(source, "<check>", "exec")
    for name in ("map_PID_Patient", "map_OBX_Observation", "map_CX_Identifier", "map_CWE_CodeableConcept"):
        assert f"def {name}(node, run):" in source
    # A field-level variant where the caller passes a field repetition (PID-3, OBX-3).
    assert "def map_CX_Identifier__1(node, run):" in source
    assert mapping_set.generated_source("unknown sender") == source


def test_a_map_gives_the_same_for_a_field_and_for_a_component(tmp_path):
    files = dict(FILES)
    files["segments/OBX.Observation.yaml"] = """
        resource: Observation
        map:
          status: final
          code: {from: OBX-3, map: CWE.CodeableConcept}
          method: {from: OBX-3.2, map: CWE.CodeableConcept}
          bodySite: {each: PID-3.4.2, map: CWE.CodeableConcept}
    """
    bundle = translate(MappingSet.load(write(tmp_path / "mappings", files)))
    third = of_type(bundle, "Observation")[2]
    # A field: 2 reads component 2's first subcomponent.
    assert third["code"] == {"coding": [{"code": "SUB", "display": "A", "system": "urn:lab:local"}],
                             "text": "A"}
    # A component: its subcomponents are what 1, 2, 3 read.
    assert third["method"] == {"coding": [{"code": "A", "display": "B", "system": "C"}], "text": "B"}
    assert third["bodySite"] == [{"coding": [{"code": "1.2.3"}]}]  # a subcomponent: 1 is itself


def test_sets_share_no_state_same_code_different_tables(tmp_path):
    """A reload builds a whole new set; when only a table changed, the generated code is the
    same (compiled once), and each set translates with its own table."""
    first = MappingSet.load(write(tmp_path / "mappings", FILES))
    write(tmp_path / "mappings", {"tables/status.yaml": """
        unmapped: default
        default: unknown
        codes: {F: amended, P: preliminary}
    """})
    second = MappingSet.load(tmp_path / "mappings")
    assert first.generated_source() == second.generated_source()
    assert first.version != second.version
    assert of_type(translate(first), "Observation")[0]["status"] == "final"
    assert of_type(translate(second), "Observation")[0]["status"] == "amended"
    assert of_type(translate(first), "Observation")[0]["status"] == "final"


def test_a_broken_set_is_refused_and_the_loaded_one_keeps_working(tmp_path):
    good = MappingSet.load(write(tmp_path / "mappings", FILES))
    before = translate(good)
    write(tmp_path / "mappings", {"segments/OBX.Observation.yaml": """
        resource: Observation
        map:
          status: {from: OBX-11, lookup: no_such_table}
          code: {from: OBX-3, map: No.Such}
    """})
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(tmp_path / "mappings")
    assert {problem.key for problem in caught.value.problems} >= {"map.status.lookup", "map.code"}
    assert translate(good) == before


def test_reading_hostile_values(mapping_set):
    # Empty repetitions, trailing delimiters, a field cut short, an escape at the end.
    text = (MESSAGE.replace("P1^^^LABO&1.2.3&ISO^MR~BE123456^^^CNIE^NI", "~^^^^~P2\\")
            .replace("OBX|3|XX|SUB^A&B&C^L||x||||||Q", "OBX|3|XX|^&&&^"))
    with pytest.raises(TranslationError) as caught:
        translate(mapping_set, text)
    # The first PID-3 repetition is empty: CX value required.
    assert caught.value.location == "PID[1]"
    assert caught.value.mapping.endswith("datatypes/CX.Identifier.yaml:3")


# -- the message map as generated code (gateway.mapping.message_codegen) -----------------------

MESSAGE_MAP_FILES = {
    "datatypes/XCN.Practitioner.yaml": """
        resource: Practitioner
        map:
          identifier: [{value: {from: 1}}]
          name: [{family: {from: 2}}]
    """,
    "segments/PV1.Encounter.yaml": """
        resource: Encounter
        map:
          status: {from: PV1-2}
          subject: {from: "@patient"}
          account: {each: "@doctor"}  # any list of references will do
    """,
    "segments/ORC.Task.yaml": """
        resource: Task
        map:
          id: {from: ORC-2}
          status: requested
          for: {from: "@patient"}
    """,
    "messages/ADT_A01.yaml": """
        messages: [ADT^A01]
        resources:
          - name: patient
            from: PID
            map: PID.Patient
          - name: doctor
            each: PV1-7
            map: XCN.Practitioner
          - name: doctor
            each: PV1-17
            when: {field: 1, present: true}
            map: XCN.Practitioner
          - name: encounter
            from: PV1
            when: {field: PV1-2, not_in: [N]}
            map: PV1.Encounter
          - each: [ORC, OBR]
            resources:
              - name: task
                from: ORC
                map: ORC.Task
              - name: note
                resource: Observation
                each: OBX
                map:
                  status: final
                  code: {text: {from: OBX-3}}
                  subject: {from: "@patient"}
                  derivedFrom: {each: "@task"}
    """,
}

ADT = ("MSH|^~\\&|HIS|HOP|GW|MA|20250114083512||ADT^A01|A1|P|2.5\r"
       "PID|1||P1^^^HOP^MR||Alaoui^Samira||19800101|F\r"
       "PV1|1|I|||||D1^Bennani~D2^Idrissi||||||||||D1^Bennani\r"
       "ORC|NW|O1\r"
       "OBR|1|O1\r"
       "OBX|1|ST|first\r"
       "OBX|2|ST|second\r"
       "OBR|2|O2\r"
       "OBX|3|ST|third\r"
       "ORC|NW|O3\r"
       "OBX|4|ST|fourth\r")


@pytest.fixture
def message_map_set(tmp_path):
    return MappingSet.load(write(tmp_path / "mappings", {**FILES, **MESSAGE_MAP_FILES}))


def test_the_message_map_is_one_generated_function(message_map_set):
    source = message_map_set.generated_source()
    assert "def message_ADT_A01(node, run):" in source and "def message_ORU_R01(node, run):" in source
    # Entries name their mapping file and line; maps build their resource in place.
    assert "# messages/ADT_A01.yaml:" in source.replace("mappings/", "")
    assert "def map_PID_Patient__0_Patient(node, run):" in source
    assert "def map_XCN_Practitioner__1_Practitioner(node, run):" in source  # a field's values
    bundle = translate(message_map_set)
    for entry in bundle["entry"]:
        assert list(entry["resource"])[:2] == ["resourceType", "id"]
        assert entry["fullUrl"] == "urn:uuid:" + entry["resource"]["id"]


def test_entries_spans_groups_conditions_and_references(message_map_set):
    bundle = translate(message_map_set, ADT)
    patient, = of_type(bundle, "Patient")
    # PV1-7 twice and PV1-17: one resource per identifier, each name registered every time.
    first, second = of_type(bundle, "Practitioner")
    assert [p["identifier"][0]["value"] for p in (first, second)] == ["D1", "D2"]
    encounter, = of_type(bundle, "Encounter")
    assert encounter["subject"] == {"reference": "urn:uuid:" + patient["id"]}
    assert encounter["account"] == [{"reference": "urn:uuid:" + p["id"]} for p in (first, second, first)]
    # [ORC, OBR] groups: ORC OBR OBX OBX | OBR OBX (an OBR after an OBR starts a group) | ORC OBX.
    first_task, second_task = of_type(bundle, "Task")
    notes = of_type(bundle, "Observation")
    assert [note["code"]["text"] for note in notes] == ["first", "second", "third", "fourth"]
    assert [note.get("derivedFrom") for note in notes] == [
        [{"reference": "urn:uuid:" + first_task["id"]}]] * 2 + [None] + [
        [{"reference": "urn:uuid:" + second_task["id"]}]]
    assert all(note["subject"] == {"reference": "urn:uuid:" + patient["id"]} for note in notes)
    # A map that writes `id` itself keeps it (its value wins, as a copy of the body did).
    assert [first_task["id"], second_task["id"]] == ["O1", "O3"]
    # Ids without identifiers: the type's ordinal in the message, as before.
    from gateway.mapping.engine import name_id
    assert [note["id"] for note in notes] == [name_id(f"Observation|LABO|M1|{n}") for n in range(1, 5)]


def test_an_entry_condition_false_gives_no_resource_and_no_ordinal(message_map_set):
    bundle = translate(message_map_set, ADT.replace("PV1|1|I|", "PV1|1|N|"))
    assert of_type(bundle, "Encounter") == []
    # The admitting doctor's `when` reads its own value (XCN-1): an empty one is skipped.
    bundle = translate(message_map_set, ADT.replace("|||D1^Bennani\r", "|||^Bennani\r"))
    assert len(of_type(bundle, "Practitioner")) == 2


def test_group_spans():
    from adapters.hl7v2.message import Segment
    from gateway.mapping.message_codegen import group_spans
    segments = [Segment(name, [name]) for name in "MSH PID ORC OBR OBX OBR OBX ORC ORC OBX".split()]
    assert group_spans(segments, ("ORC", "OBR"), 0, len(segments)) == [(2, 5), (5, 7), (7, 8), (8, 10)]
    assert group_spans(segments, ("ORC", "OBR"), 3, 6) == [(3, 5), (5, 6)]
    assert group_spans(segments, ("ORC", "OBR"), 0, 2) == []


OBX_TYPES = ("NM", "SN", "NR", "ST", "TX", "FT", "CE", "CWE", "DT", "DTM", "TS", "TM", "DR", "ED", "XX", "", " nm ")


@pytest.mark.parametrize("name", sorted(n for n, t in load_all().items() if t.guard is not None))
def test_a_transform_guard_never_skips_a_value(name):
    """The generated code calls a guarded transform only when its guard holds: for every OBX-2
    the guard refuses, the transform itself gives nothing, so skipping it changes nothing."""
    found = REGISTRY[name]
    values = {"NM": "5.4", "SN": "<^10", "NR": "1^2", "DT": "20250114", "DTM": "20250114080000",
              "TS": "20250114080000", "TM": "0800", "DR": "20250101^20250102"}
    for kind in OBX_TYPES:
        value = values.get(kind.strip().upper(), "x")
        message = parse_message("MSH|^~\\&|A|B|C|D|20250114||ORU^R01|M1|P|2.5\r"
                                f"OBX|1|{kind}|C^c^L||{value}|mmol/L|||||F\r")
        segment = message.segments[1]
        run = Run(message, TranslationContext(timezone=CASABLANCA, message_key="k", control_id="M1"))
        if not found.guard.allows(segment):
            assert found.function(segment, run) is None, (name, kind)


def test_guarded_transforms_run_once_per_value_type(tmp_path, monkeypatch):
    """The OBX value transforms: OBX-2 read once by the generated code, and only the one for
    the OBX's type called."""
    calls = []
    files = {"segments/OBX.Observation.yaml": """
        resource: Observation
        map:
          status: final
          code: {map: {text: {from: OBX-3.2}}}
          valueQuantity: {transform: obx_quantity}
          valueString: {transform: obx_string}
          valueDateTime: {transform: obx_datetime}
    """, "messages/ORU_R01.yaml": """
        messages: [ORU^R01]
        resources:
          - {each: OBX, map: OBX.Observation}
    """}
    for name in ("obx_quantity", "obx_string", "obx_datetime"):
        original = REGISTRY[name]
        def spy(node, run, _function=original.function, _name=name):
            calls.append(_name)
            return _function(node, run)
        monkeypatch.setitem(REGISTRY, name, original.__class__(name, spy, True, "", original.guard))
    mapping_set = MappingSet.load(write(tmp_path / "mappings", files))
    bundle = translate(mapping_set, MESSAGE)
    values = [{k: v for k, v in e["resource"].items() if k.startswith("value")} for e in bundle["entry"][:3]]
    assert values == [{"valueQuantity": {"value": 5.4, "unit": "mmol/L"}}, {"valueString": "Hémolysé & refait\nligne 2"},
                      {"valueString": "x"}]
    assert calls == ["obx_quantity", "obx_string", "obx_string"]


# -- maps that contain themselves, rules nested without end ---------------------------------

def load_problems(root, files) -> str:
    with pytest.raises(MappingErrors) as caught:
        MappingSet.load(write(root / "mappings", {**FILES, **files}))
    return str(caught.value)


def test_a_map_that_contains_itself_is_refused_at_load(tmp_path):
    """A map naming itself loaded, then every message using it failed with a RecursionError."""
    text = load_problems(tmp_path, {"datatypes/CX.Identifier.yaml": """
        type: Identifier
        map:
          value: {from: 1}
          assigner: {map: {identifier: {from: 1, map: CX.Identifier}}}
    """})
    assert text == ("mappings/datatypes/CX.Identifier.yaml:4: map.assigner.identifier: map cycle "
                    "CX.Identifier -> CX.Identifier (mappings/datatypes/CX.Identifier.yaml): a map cannot contain itself")


def test_a_map_cycle_through_two_files_is_refused_with_the_other_problems(tmp_path):
    text = load_problems(tmp_path, {
        "datatypes/CX.Identifier.yaml": """
            type: Identifier
            map:
              value: {from: 1}
              assigner: {from: 4, map: HD.Reference}
        """,
        "datatypes/HD.Reference.yaml": """
            type: Reference
            map:
              display: {from: 1}
              identifier: {from: 1, map: CX.Identifier}
        """,
        "tables/gender.yaml": "unmapped: nonsense\ncodes: {F: female}\n"})
    assert ("mappings/datatypes/HD.Reference.yaml:4: map.identifier: map cycle CX.Identifier -> HD.Reference -> "
            "CX.Identifier (mappings/datatypes/CX.Identifier.yaml, mappings/datatypes/HD.Reference.yaml): "
            "a map cannot contain itself") in text.splitlines()
    assert "mappings/tables/gender.yaml" in text  # reported together, as every problem is


def test_a_map_used_twice_and_by_two_maps_is_no_cycle(tmp_path):
    """The same map twice in one file, and a diamond: Observation -> CWE.CodeableConcept and
    CWE.Method, both -> CWE.Coding."""
    files = {
        "datatypes/CWE.Coding.yaml": """
            type: Coding
            map:
              code: {from: 1}
              display: {from: 2}
              system: {from: 3, lookup: system}
        """,
        "datatypes/CWE.CodeableConcept.yaml": """
            type: CodeableConcept
            map:
              coding: {map: CWE.Coding}
              text: {from: 2}
        """,
        "datatypes/CWE.Method.yaml": """
            type: CodeableConcept
            map:
              coding: [{map: CWE.Coding}]
              text: method
        """,
        "segments/OBX.Observation.yaml": """
            resource: Observation
            map:
              status: final
              code: {from: OBX-3, map: CWE.CodeableConcept}
              category: {from: OBX-3, map: CWE.CodeableConcept}
              method: {from: OBX-3, map: CWE.Method}
        """}
    observation = of_type(translate(MappingSet.load(write(tmp_path / "mappings", {**FILES, **files}))),
                          "Observation")[0]
    coding = [{"code": "GLU", "display": "Glucose", "system": "urn:lab:local"}]
    assert observation["code"] == {"coding": coding, "text": "Glucose"}
    assert observation["category"] == [{"coding": coding, "text": "Glucose"}]
    assert observation["method"] == {"coding": coding, "text": "method"}


def chain(count: int, reverse: bool = False) -> dict:
    """An Observation whose extension holds an extension ... `count` named maps deep."""
    def name(n):
        return f"E.{count - n:03d}" if reverse else f"E.{n:03d}"
    files = {"segments/OBX.Observation.yaml": f"resource: Observation\nmap:\n  status: final\n"
                                              f"  extension: {{from: OBX-5, map: {name(0)}}}\n"}
    for n in range(count):
        inner = f"  extension: {{from: 1, map: {name(n + 1)}}}\n" if n + 1 < count else ""
        files[f"datatypes/{name(n)}.yaml"] = f"type: Extension\nmap:\n  url: u{n}\n{inner}"
    return files


@pytest.mark.parametrize("reverse, expected", [
    (False, "mappings/datatypes/E.100.yaml:3: map.url: rules nest more than 100 levels deep"),
    # Compiled from the last map up (E.001 first): each map's depth counts where it is used.
    (True, "mappings/datatypes/E.101.yaml:4: map.extension.map: map 'E.100' nests its rules 100 levels deep: "
           "here that makes 101, more than 100"),
])
def test_rules_nested_too_deep_through_named_maps_are_a_problem(tmp_path, reverse, expected):
    """150 maps each using the next: a RecursionError out of the load (or, compiled from the
    last one up, out of every message), now a problem naming the map; 90 still translate."""
    assert expected in load_problems(tmp_path, chain(150, reverse))
    deep = MappingSet.load(write(tmp_path / "ok" / "mappings", {**FILES, **chain(90, reverse)}))
    extension = of_type(translate(deep), "Observation")[0]["extension"]
    for _ in range(89):
        extension = extension[0]["extension"]
    assert extension == [{"url": "u89"}]


def test_rules_nested_too_deep_in_one_file_are_a_problem(tmp_path):
    """Implicit maps 300 deep: YAML takes them, the rule compiler overflowed Python's stack."""
    deep = "{url: y}"
    for _ in range(300):
        deep = "{url: x, extension: %s}" % deep
    text = load_problems(tmp_path, {"segments/OBX.Observation.yaml":
                                    f"resource: Observation\nmap:\n  status: final\n  extension: {deep}\n"})
    assert "mappings/segments/OBX.Observation.yaml:4: map.extension" in text
    assert "rules nest more than 100 levels deep" in text

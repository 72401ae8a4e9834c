"""Hostile and odd mapping files: what YAML makes of codes, names that reach the generated
Python, nesting and aliases that Python or memory cannot take, and mistakes that used to load
and then fail every message. Each set is written by the test and loaded for real (pure)."""
import os
import time

import pytest

from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import TranslationError
from gateway.mapping.source import MappingErrors
from test_mapping_engine import BASE, ORU, resources, translate, write

PID = """
    resource: Patient
    map:
      identifier: {each: PID-3, map: CX.Identifier}
      gender: %s
"""


def load(tmp_path, files: dict, name: str = "mappings") -> MappingSet:
    return MappingSet.load(write(tmp_path / name, {**BASE, **files}))


def problems(tmp_path, files: dict) -> str:
    with pytest.raises(MappingErrors) as caught:
        load(tmp_path, files)
    return str(caught.value)


def gender(mapping_set, sent: str):
    bundle = translate(mapping_set, ORU.replace("||19800101|F", "||19800101|" + sent))
    return resources(bundle, "Patient")[0].get("gender")


# -- YAML: a code is what the engineer wrote --------------------------------------------------

def test_codes_are_kept_as_written_not_as_yaml_types(tmp_path):
    """YAML 1.1 reads 07 as the octal 7, NO and yes as booleans, 1:30 as 90 and 0x1F as 31:
    a table written without quotes then never finds the code a sender sends."""
    mapping_set = load(tmp_path, {"tables/gender.yaml": """
        unmapped: error
        codes: {07: seven, 08: eight, NO: norway, yes: oui, 0x1F: hex, 1:30: time}
    """, "segments/PID.Patient.yaml": PID % "{from: PID-8, lookup: gender}"})
    for sent, expected in (("07", "seven"), ("08", "eight"), ("NO", "norway"), ("yes", "oui"),
                           ("0x1F", "hex"), ("1:30", "time")):
        assert gender(mapping_set, sent) == expected
    with pytest.raises(TranslationError, match="code '7' is not in table"):
        gender(mapping_set, "7")


def test_condition_values_and_constants_are_kept_as_written(tmp_path):
    mapping_set = load(tmp_path, {"segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifier}
          gender:
            first_of:
              - {when: {field: PID-8, is: 01}, default: female}
              - {when: {field: PID-8, in: [NO, off]}, default: other}
          birthDate: 2001-01-01
    """})
    assert gender(mapping_set, "01") == "female"
    assert gender(mapping_set, "NO") == "other" and gender(mapping_set, "off") == "other"
    patient = resources(translate(mapping_set), "Patient")[0]
    assert patient["birthDate"] == "2001-01-01" and type(patient["birthDate"]) is str


def test_a_true_or_false_is_written_true_or_false(tmp_path):
    """`no` is text now: where a boolean is meant, anything but true/false is refused, not
    taken as true (`present: 'false'` used to hold whenever the field was there)."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifier}
          gender: {when: {field: PID-9, present: no}, default: other}
          active: yes
          deceasedBoolean: {when: {field: PID-30, present: 'false'}, default: true}
    """, "senders/INPE-1/tables/gender.yaml": "extends: no\ncodes: {X: other}\n"})
    assert "PID.Patient.yaml:4: map.gender.when.present: present: is true or false" in text
    assert "PID.Patient.yaml:5: map.active: active is true or false, not 'yes'" in text
    assert "PID.Patient.yaml:6: map.deceasedBoolean.when.present: present: is true or false" in text
    assert "senders/INPE-1/tables/gender.yaml:1: extends: extends: is true or false" in text


def test_values_that_are_no_json_are_refused(tmp_path):
    """!!binary is bytes: a bundle holding them cannot be encoded, stored or sent."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": PID % "!!binary ZmVtYWxl",
                               "tables/status.yaml": "codes: !!set {F}\n"})
    assert "PID.Patient.yaml:4: invalid YAML: tag:yaml.org,2002:binary has no place in a mapping file" in text
    assert "status.yaml:1: invalid YAML: tag:yaml.org,2002:set has no place" in text


def test_unreadable_yaml_is_a_problem_with_its_line_not_a_crash(tmp_path):
    """A control character (a NUL, an ESC pasted from a terminal) and a list as a key were
    exceptions out of the loader; now problems, reported together with the others."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": PID % "female" + "      x: \x1b[0m\n",
                               "tables/status.yaml": "codes:\n  ? [F, P]\n  : final\n",
                               "tables/gender.yaml": "codes: {F: fe\x00male}\n"})
    assert "PID.Patient.yaml:5: invalid YAML: character #x001b is not allowed" in text
    assert "status.yaml:2: invalid YAML: a key is a name or a code, not a list or a mapping" in text
    assert "gender.yaml:1: invalid YAML: character #x0000 is not allowed" in text
    # libyaml counts the position in UTF-8 bytes: Arabic text before it must not move the line.
    text = problems(tmp_path / "arabic", {"tables/gender.yaml": "codes:\n  F: " + "أنثى" * 40 + "\n  M: \x1b\n"})
    assert "gender.yaml:3: invalid YAML: character #x001b is not allowed" in text


def test_merge_keys_may_override_but_a_key_written_twice_is_refused(tmp_path):
    mapping_set = load(tmp_path, {"segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifier}
          gender: {<<: &strict {from: PID-8, lookup: gender}, lookup: status}
    """, "tables/status.yaml": "unmapped: passthrough\ncodes: {F: female-by-status}\n"})
    assert gender(mapping_set, "F") == "female-by-status"
    text = problems(tmp_path, {"segments/PID.Patient.yaml": PID % "{from: PID-8, from: PID-9}"})
    assert "PID.Patient.yaml:4: invalid YAML: key 'from' appears twice" in text


def test_aliases_that_repeat_a_document_exponentially_are_refused_at_once(tmp_path):
    """Nine aliases of nine aliases ... : a few lines that compiled into millions of rules
    (gigabytes, minutes, in the running gateway on a reload)."""
    lines = ["resource: Patient", "map:", "  identifier: {each: PID-3, map: CX.Identifier}",
             "  name:", "    - &a0 {text: x}"]
    lines += [f"    - &a{n} [" + ", ".join([f"*a{n - 1}"] * 9) + "]" for n in range(1, 9)]
    started = time.monotonic()
    text = problems(tmp_path, {"segments/PID.Patient.yaml": "\n".join(lines) + "\n"})
    assert "PID.Patient.yaml: its aliases (*name) repeat" in text and time.monotonic() - started < 10
    small = lines[:6]  # one alias level: nine names
    assert len(resources(translate(load(tmp_path / "small", {"segments/PID.Patient.yaml": "\n".join(small) + "\n"})),
                         "Patient")[0]["name"]) == 10


# -- nesting ---------------------------------------------------------------------------------

def test_nesting_beyond_what_yaml_or_python_takes_is_a_problem(tmp_path):
    """Deep flow YAML overflowed the parser's recursion; a first_of of 120 options or 25 each
    inside one another made generated code Python refuses (100 indentation levels, 20 nested
    blocks): exceptions out of the load, now problems naming the file."""
    deep = "{url: y, valueString: {from: PID-5}}"
    for _ in range(400):
        deep = "{url: x, extension: [%s]}" % deep
    assert "PID.Patient.yaml: invalid YAML: nested too deeply" in problems(
        tmp_path / "yaml", {"segments/PID.Patient.yaml": PID % "female" + f"      extension: [{deep}]\n"})
    # libyaml's own composer crashed the process (a segmentation fault) at this depth.
    assert "PID.Patient.yaml: invalid YAML: nested too deeply" in problems(
        tmp_path / "deeper", {"segments/PID.Patient.yaml": PID % f"{'[' * 100_000}{']' * 100_000}"})
    options = ", ".join("{when: {field: PID-8, is: X%d}, default: female}" % n for n in range(120))
    text = problems(tmp_path / "first_of", {"segments/PID.Patient.yaml": PID % f"{{first_of: [{options}]}}"})
    assert "PID.Patient.yaml (Patient): the rules nest too deeply to be compiled" in text
    loops = "{each: NTE, map: {url: y, valueString: {from: NTE-3}}}"
    for _ in range(25):
        loops = "{each: NTE, map: {url: x, extension: [%s]}}" % loops
    text = problems(tmp_path / "each", {"segments/PID.Patient.yaml": PID % "female" + f"      extension: [{loops}]\n"})
    assert "PID.Patient.yaml (Patient): the rules nest too deeply to be compiled" in text


# -- names that reach the generated Python ----------------------------------------------------

def test_a_file_name_cannot_become_code(tmp_path):
    """A file's name is written in a comment of the generated source: a carriage return in it
    ended the comment, and the rest of the name ran when the set was loaded."""
    name = "PID.Patient\rraise SystemExit(4)\r#"
    messages = BASE["messages/ORU_R01.yaml"].replace("map: PID.Patient", 'map: "PID.Patient\\rraise SystemExit(4)\\r#"')
    root = write(tmp_path / "mappings", {**BASE, "messages/ORU_R01.yaml": messages,
                                         f"segments/{name}.yaml": BASE["segments/PID.Patient.yaml"],
                                         "senders/S\rraise SystemExit(5)\r#/tables/gender.yaml":
                                             "extends: true\ncodes: {X: other}\n"})
    mapping_set = MappingSet.load(root)  # SystemExit before the fix
    for sender in ("", "S\rraise SystemExit(5)\r#"):
        source = mapping_set.generated_source(sender)
        assert not any(line.lstrip().startswith("raise SystemExit") for line in source.splitlines())
    assert resources(translate(mapping_set), "Patient")[0]["gender"] == "female"


@pytest.mark.parametrize("name", ["مريض", "\ufee1\ufeae\ufef3\ufebf", "PID.Patient²", "PID½"])
def test_map_names_python_reads_differently_still_load(tmp_path, name):
    """Arabic presentation forms (text copied from a PDF), '²', '½': Python refuses them in a
    name or reads them as other letters (NFKC); the load failed with a SyntaxError or KeyError."""
    messages = BASE["messages/ORU_R01.yaml"].replace("map: PID.Patient", f"map: '{name}'")
    mapping_set = load(tmp_path, {"messages/ORU_R01.yaml": messages,
                                  f"segments/{name}.yaml": BASE["segments/PID.Patient.yaml"]})
    assert resources(translate(mapping_set), "Patient")[0]["gender"] == "female"


# -- the files of the folder ------------------------------------------------------------------

def test_an_editor_lock_file_is_ignored_and_an_unreadable_file_is_a_problem(tmp_path):
    """Emacs keeps `.#NAME.yaml`, a link to nowhere, while a file is edited: the load failed
    with FileNotFoundError (a reload refused, `mappings check` a traceback)."""
    root = write(tmp_path / "mappings", BASE)
    os.symlink("engineer@host.4242:1700000000", root / "segments" / ".#PID.Patient.yaml")
    assert MappingSet.load(root).message_types() == ["ORU^R01"]
    (root / "tables" / "broken.yaml").mkdir()
    with pytest.raises(MappingErrors, match=r"tables/broken.yaml: cannot be read: \[Errno 21\]"):
        MappingSet.load(root)


# -- mistakes that loaded, then failed every message ------------------------------------------

def test_condition_tests_are_checked(tmp_path):
    """`in: FM` tested each letter (M held, FM did not), `in: 5` was a TypeError at load,
    `is: [F]` never held, and of `is` and `in` together `in` was ignored."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: {each: PID-3, map: CX.Identifier}
          gender:
            - {when: {field: PID-8, in: FM}, default: other}
            - {when: {field: PID-8, in: 5}, default: other}
            - {when: {field: PID-8, is: [F]}, default: female}
            - {when: {field: PID-8, in: [F], is: M}, default: male}
    """})
    assert "PID.Patient.yaml:5: map.gender[0].when.in: in: is a list of values" in text
    assert "PID.Patient.yaml:6: map.gender[1].when.in: in: is a list of values" in text
    assert "PID.Patient.yaml:7: map.gender[2].when.is: is: compares with one value" in text
    assert "PID.Patient.yaml:8: map.gender[3].when.in: a condition has one test; is and in found" in text


def test_values_of_the_wrong_shape_are_refused_at_load(tmp_path):
    """A text where FHIR wants an object, a list where it wants one value, a reference where it
    wants no Reference, a number where it wants text: these loaded, then every message failed
    in the engine ('internal error', no location) or gave an invalid resource."""
    text = problems(tmp_path, {"datatypes/CX.Identifier.yaml": """
        type: Identifier
        map:
          value: {from: 1, required: true}
          assigner: {from: 4}
          period: [{start: {from: 7}}]
          type: "@patient"
          system: 5
          use: {from: "@patient"}
    """})
    assert "CX.Identifier.yaml:4: map.assigner: assigner is a Reference, not a text" in text
    assert "CX.Identifier.yaml:5: map.period: period holds one value, not a list" in text
    assert "CX.Identifier.yaml:6: map.type: type is a CodeableConcept, not a text" in text
    assert "CX.Identifier.yaml:7: map.system: system is text: write '5' in quotes" in text
    assert "CX.Identifier.yaml:8: map.use: use is a str, not a Reference to a resource" in text


def test_an_inline_entry_names_a_resource_type(tmp_path):
    """`resource: [Patient]` was a TypeError at load; `resource: HumanName` made a HumanName
    'resource' in the Bundle."""
    entry = "          - {resource: %s, from: PID, map: {text: {from: PID-5}}}\n"
    for written in ("[Patient]", "HumanName"):
        messages = BASE["messages/ORU_R01.yaml"].rstrip(" ") + entry % written
        assert "resources[2].resource: an inline map names its FHIR resource type" in problems(
            tmp_path / written.strip("[]"), {"messages/ORU_R01.yaml": messages})


def test_a_code_listed_without_target_gives_nothing_and_a_padded_code_is_refused(tmp_path):
    """`F: ~` in a strict table failed the message with "code 'F' is not in table" (it is);
    a code written with spaces around it was never found."""
    mapping_set = load(tmp_path, {"tables/gender.yaml": "unmapped: error\ncodes: {F: ~, M: male}\n"})
    assert gender(mapping_set, "F") is None and gender(mapping_set, "M") == "male"
    text = problems(tmp_path / "padded", {"tables/gender.yaml": 'codes:\n  F: female\n  "M ": male\n'})
    assert "gender.yaml:3: codes: code 'M ' has spaces around it" in text


# -- found by fuzzing the loader ---------------------------------------------------------------

def test_a_tag_the_value_does_not_fit_is_a_problem_with_its_line(tmp_path):
    """`!!int abc`, `!!bool maybe`, `!!map [..]`: PyYAML's constructors raised ValueError,
    KeyError, TypeError out of the loader (`mappings check` a traceback)."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": PID % "{from: PID-8, default: !!int abc}",
                               "tables/status.yaml": "codes:\n  F: !!bool maybe\n",
                               "tables/gender.yaml": "codes: !!map [F, M]\n"})
    assert "PID.Patient.yaml:4: invalid YAML: this value is not a tag:yaml.org,2002:int" in text
    assert "status.yaml:2: invalid YAML: this value is not a tag:yaml.org,2002:bool" in text
    assert "gender.yaml:1: invalid YAML: this list is not a tag:yaml.org,2002:map" in text


def test_a_map_file_that_is_no_mapping_is_a_problem_not_a_crash(tmp_path):
    """A segment or datatype map that is a list or a single value was an AttributeError or
    TypeError out of the loader, and so was a sender's `extends: true` of such a file."""
    text = problems(tmp_path, {"datatypes/CX.Identifier.yaml": "- type: Identifier\n",
                               "segments/PID.Patient.yaml": "Patient\n",
                               "senders/F1/segments/PID.Patient.yaml": "extends: true\nmap: {}\n"})
    assert "CX.Identifier.yaml:1: a map file is a mapping: resource: (or type:), map: ..." in text
    assert "segments/PID.Patient.yaml:1: a map file is a mapping" in text
    assert "senders/F1/segments/PID.Patient.yaml:1: extends: there is no shared " \
           "segments/PID.Patient.yaml to extend (it is not a mapping)" in text


def test_an_empty_file_is_a_problem_not_a_file_left_out(tmp_path):
    """An empty message map silently unmapped its message types (the set loaded, and every
    ORU^R01 then failed with 'no mapping'); an empty sender override silently gave the
    shared map."""
    text = problems(tmp_path, {"messages/ORU_R01.yaml": "# to do\n",
                               "senders/F1/segments/PID.Patient.yaml": ""})
    assert "messages/ORU_R01.yaml: the file is empty" in text
    assert "senders/F1/segments/PID.Patient.yaml: the file is empty" in text


def test_a_named_map_gives_no_object_where_fhir_wants_a_primitive(tmp_path):
    """`language: {from: PID-3, map: CX.Identifier}` loaded (an inline map there was
    refused) and put an Identifier object where FHIR wants a code."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": PID % "{from: PID-8, map: CX.Identifier}"})
    assert "PID.Patient.yaml:4: map.gender.map: map 'CX.Identifier' builds Identifier, but " \
           "map.gender is a str, not an object" in text


def test_message_types_are_checked(tmp_path):
    """A type that MSH-9 never gives (`ORU-R01`, `oru^r01`, a blank) loaded and was never
    looked up: those messages then failed with 'no mapping'."""
    messages = BASE["messages/ORU_R01.yaml"].replace("[ORU^R01]", '[ORU-R01, oru^r01, " ", ORU^R01, ZOR^Z01]')
    text = problems(tmp_path, {"messages/ORU_R01.yaml": messages})
    for written in ("'ORU-R01'", "'oru^r01'", "' '"):
        assert f"ORU_R01.yaml:1: messages: {written} is not a message type" in text
    assert "ZOR^Z01" not in text and "'ORU^R01'" not in text


def test_a_table_extends_only_a_shared_table(tmp_path):
    """A sender's `extends: true` table with no shared table of its name loaded silently (a
    map file is refused for the same mistake)."""
    text = problems(tmp_path, {"senders/F1/tables/genre.yaml": "extends: true\ncodes: {F: female}\n"})
    assert "senders/F1/tables/genre.yaml:1: extends: there is no shared tables/genre.yaml to extend" in text


def test_a_code_written_twice_or_empty_is_refused(tmp_path):
    """`1:` and `'1':` are one code once read as text (the last target silently won), and
    `~:` became the code 'None'. A `.yml` file was silently not read."""
    text = problems(tmp_path, {"tables/gender.yaml": "codes:\n  1: female\n  '1': male\n  ~: other\n",
                               "senders/F1/segments/PID.Patient.yml": PID % "female"})
    assert "gender.yaml:3: codes: code '1' is listed twice" in text
    assert "gender.yaml:4: codes: a code is empty" in text
    assert "senders/F1/segments/PID.Patient.yml: mapping files are named *.yaml; rename it" in text


def test_a_table_target_is_a_code_a_coding_or_a_concept(tmp_path):
    """A list, a rule (`{from: 1}`) or a misspelt Coding key as a table's target loaded and
    went into the bundle as it was written."""
    text = problems(tmp_path, {"tables/status.yaml": """
        unmapped: default
        default: {when: {field: OBX-11, is: F}}
        codes:
          F: [final]
          P: {system: "urn:x", code: {from: 1}}
          C: {coding: [{system: "urn:x", cod: corrected}]}
          X: {coding: [{system: "urn:x", code: x}], text: fine}
    """})
    for line, key in ((2, "default"), (4, "codes.F"), (5, "codes.P"), (6, "codes.C")):
        assert f"status.yaml:{line}: {key}: a target is a code, a Coding" in text
    assert "codes.X" not in text


def test_a_text_among_the_rules_of_an_object_list_is_refused(tmp_path):
    """`identifier: [false, {each: PID-3, map: CX.Identifier}]` loaded (one rule alone was
    refused) and put false where FHIR wants an Identifier."""
    text = problems(tmp_path, {"segments/PID.Patient.yaml": """
        resource: Patient
        map:
          identifier: [false, {each: PID-3, map: CX.Identifier}]
    """})
    assert "PID.Patient.yaml:3: map.identifier: identifier is a Identifier, not a text" in text

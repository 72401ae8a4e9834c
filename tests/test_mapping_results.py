"""Results mappings (ORU^R01 lab and imaging, MDM^T02): golden cases, value types of OBX-2,
embedded PDF round trip, errors with their location."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from adapters.hl7v2.message import Hl7Message
from gateway.mapping.golden import check_case, find_cases, translate_case
from gateway.mapping.mapping_set import MappingSet
from gateway.mapping.runtime import TranslationContext, TranslationError
from gateway.mapping.validation import bundle_problems
from gateway.translation.inputs import read_input

ROOT = Path(__file__).resolve().parent.parent
CASES = ROOT / "mappings" / "tests" / "results"
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture
def mappings(repo_mappings) -> MappingSet:
    return repo_mappings


def translate(mappings, text: str) -> dict:
    parsed = read_input(text.replace("\n", "\r").encode("utf-8"))
    context = TranslationContext(message_key="test|" + parsed.control_id, control_id=parsed.control_id)
    return mappings.translate(parsed.message, context, parsed.message_type).bundle


def resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


HEAD = ("MSH|^~\\&|LAB|LABO|HIE|MA|20260115101500||ORU^R01^ORU_R01|T1|P|2.5.1\n"
        "PID|1||AB1^^^CNIE^NI||Test^Patient\n"
        "OBR|1|C1^HOP|L1^LAB|24331-1^Bilan^LN|||20260115073000|||||||||||||||||LAB|F\n")


def observation(mappings, obx: str) -> dict:
    bundle = translate(mappings, HEAD + obx + "\n")
    assert bundle_problems(bundle) == []
    return resources(bundle, "Observation")[0]


@pytest.mark.parametrize("case", find_cases(CASES), ids=lambda path: path.name)
def test_golden(mappings, case):
    result = check_case(mappings, case)
    assert result.passed, "\n".join(result.differences)
    assert bundle_problems(translate_case(mappings, case).bundle) == []


@pytest.mark.parametrize("obx, element, value", [
    ("OBX|1|NM|2093-3^Chol^LN||1.92|g/L^g/L^UCUM|||||F", "valueQuantity",
     {"value": 1.92, "unit": "g/L", "system": "http://unitsofmeasure.org", "code": "g/L"}),
    ("OBX|1|NM|2093-3^Chol^LN||7|mmol/L^^L|||||F", "valueQuantity", {"value": 7, "unit": "mmol/L"}),
    ("OBX|1|ST|1^x^L||ligne 1\\.br\\ligne 2|||||F", "valueString", "ligne 1\nligne 2"),
    ("OBX|1|TX|1^x^L||un~deux \\T\\ trois|||||F", "valueString", "un\ndeux & trois"),
    ("OBX|1|FT|1^x^L||\\H\\gras\\N\\\\.br\\fin|||||F", "valueString", "gras\nfin"),
    ("OBX|1|CWE|1^x^L||260373001^Detected^SCT|||||F", "valueCodeableConcept",
     {"coding": [{"code": "260373001", "display": "Detected", "system": "http://snomed.info/sct"}],
      "text": "Detected"}),
    ("OBX|1|CE|1^x^L||POS^Positif^L|||||F", "valueCodeableConcept",
     {"coding": [{"code": "POS", "display": "Positif"}], "text": "Positif"}),
    ("OBX|1|SN|1^x^L||<^5|mg/L^mg/L^UCUM|||||F", "valueQuantity",
     {"value": 5, "comparator": "<", "unit": "mg/L", "system": "http://unitsofmeasure.org", "code": "mg/L"}),
    ("OBX|1|SN|1^x^L||^1^:^128||||||F", "valueRatio", {"numerator": {"value": 1}, "denominator": {"value": 128}}),
    ("OBX|1|SN|1^x^L||^1^/^2||||||F", "valueRatio", {"numerator": {"value": 1}, "denominator": {"value": 2}}),
    ("OBX|1|SN|1^x^L||^10^-^20|%^%^UCUM|||||F", "valueRange",
     {"low": {"value": 10, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"},
      "high": {"value": 20, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}),
    ("OBX|1|SN|1^x^L||^2^+||||||F", "valueString", "2 +"),
    ("OBX|1|SN|1^x^L||<0.10||||||F", "valueString", "<0.10"),
    ("OBX|1|NR|1^x^L||3.5^5.1||||||F", "valueRange", {"low": {"value": 3.5}, "high": {"value": 5.1}}),
    ("OBX|1|DT|1^x^L||20251220||||||F", "valueDateTime", "2025-12-20"),
    ("OBX|1|DTM|1^x^L||202601150815+0000||||||F", "valueDateTime", "2026-01-15T08:15:00+00:00"),
    ("OBX|1|TM|1^x^L||0730||||||F", "valueTime", "07:30:00"),
    ("OBX|1|DR|1^x^L||20260114^20260115||||||F", "valuePeriod", {"start": "2026-01-14", "end": "2026-01-15"}),
])
def test_value_types(mappings, obx, element, value):
    found = observation(mappings, obx)
    assert found[element] == value
    assert not [key for key in found if key.startswith("value") and key != element]


def test_period_in_a_message_without_subcomponents(mappings):
    """DR under a three-character MSH-2 ('^~\\': no subcomponent separator) is a period; it
    failed with 'map.valuePeriod: empty separator'."""
    bundle = translate(mappings, HEAD.replace("^~\\&", "^~\\", 1)
                       + "OBX|1|DR|1^x^L||20260114^20260115||||||F\n")
    assert resources(bundle, "Observation")[0]["valuePeriod"] == {"start": "2026-01-14", "end": "2026-01-15"}


def test_status_interpretation_range_and_absent_value(mappings):
    found = observation(mappings, "OBX|1|NM|1^x^L||12||10-11|H|||C|||20260115080000")
    assert found["status"] == "corrected"
    assert found["interpretation"][0]["coding"][0] == {
        "code": "H", "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
        "display": "High"}
    assert found["referenceRange"] == [{"text": "10-11"}]
    assert found["effectiveDateTime"] == "2026-01-15T08:00:00+01:00"
    assert found["category"][0]["coding"][0]["code"] == "laboratory"
    absent = observation(mappings, "OBX|1|NM|1^x^L||||||||N")
    assert absent["status"] == "unknown"
    assert absent["dataAbsentReason"]["coding"][0]["code"] == "not-asked"
    assert observation(mappings, "OBX|1|NM|1^x^L||1||||||V")["status"] == "final"  # our choice


V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"


@pytest.mark.parametrize("flag, coding", [
    ("h", {"system": V3_INTERPRETATION, "code": "H", "display": "High"}),  # lower case: the guide's code
    ("l", {"system": V3_INTERPRETATION, "code": "L", "display": "Low"}),
    (" hh ", {"system": V3_INTERPRETATION, "code": "HH", "display": "Critical high"}),
    ("WR", {"system": V3_INTERPRETATION, "code": "WR", "display": "Weakly reactive"}),  # v2.5+ table 0078
    ("nr", {"system": V3_INTERPRETATION, "code": "NR", "display": "Non-reactive"}),
    ("CAR", {"system": V3_INTERPRETATION, "code": "CAR", "display": "Carrier"}),
    ("syn-s", {"system": V3_INTERPRETATION, "code": "SYN-S", "display": "Synergy - susceptible"}),
    ("<", {"system": V3_INTERPRETATION, "code": "<", "display": "Off scale low"}),
])
def test_interpretation_follows_the_guides_concept_map(mappings, flag, coding):
    found = observation(mappings, f"OBX|1|NM|1^x^L||12||10-11|{flag}|||F")
    assert found["interpretation"] == [{"coding": [coding]}]


def test_a_flag_the_guide_does_not_map_is_kept_as_sent(mappings):
    """AC, QCF, TOX: the guide maps them to nothing (inactive in the v3 value set), so they get
    no system (they had v3's); a flag its map does not list keeps the sender's text."""
    found = observation(mappings, "OBX|1|NM|1^x^L||12||10-11|AC~QCF~tox~H>^Tres eleve~Zz^Local|||F")
    assert [i["coding"] for i in found["interpretation"]] == [
        [{"code": "AC"}], [{"code": "QCF"}], [{"code": "tox"}],
        [{"code": "H>", "display": "Tres eleve"}], [{"code": "Zz", "display": "Local"}]]


def test_every_interpretation_flag_repetition_is_coded(mappings):
    found = observation(mappings, "OBX|1|NM|1^x^L||12||10-11|hh~QCF|||F")
    assert [i["coding"][0]["code"] for i in found["interpretation"]] == ["HH", "QCF"]
    assert [i["coding"][0].get("system") for i in found["interpretation"]] == [V3_INTERPRETATION, None]


def test_invalid_number_is_an_error_at_the_obx(mappings):
    with pytest.raises(TranslationError) as error:
        translate(mappings, HEAD + "OBX|1|NM|1^x^L||1.2^||||||F\nOBX|2|NM|1^x^L||abc||||||F\n")
    assert error.value.location == "OBX[2]"
    assert "not a number" in error.value.reason


def test_unknown_result_status_is_an_error(mappings):
    with pytest.raises(TranslationError) as error:
        translate(mappings, HEAD + "OBX|1|NM|1^x^L||1||||||Q\n")
    assert error.value.location == "OBX[1]"
    assert "observation_status" in error.value.reason
    with pytest.raises(TranslationError) as error:
        translate(mappings, HEAD.replace("|LAB|F\n", "|LAB|Y\n") + "OBX|1|NM|1^x^L||1||||||F\n")
    assert error.value.location == "OBR[1]"


def _pdf_of(bundle: dict) -> tuple[dict, bytes]:
    form = resources(bundle, "DiagnosticReport")[0]["presentedForm"][0]
    return form, base64.b64decode(form["data"], validate=True)


def test_embedded_pdf_round_trip(mappings):
    case = CASES / "imaging-pdf.hl7"
    text = case.read_text(encoding="utf-8")
    sent = base64.b64decode(text.split("^Base64^")[1].split("|")[0])
    assert sent.startswith(b"%PDF-") and sent.rstrip().endswith(b"%%EOF")
    form, data = _pdf_of(translate_case(mappings, case).bundle)
    assert data == sent
    assert form["contentType"] == "application/pdf"
    assert form["size"] == len(sent)
    assert form["hash"] == base64.b64encode(hashlib.sha1(sent).digest()).decode()


def test_pdf_wrapped_base64_and_mdm_document(mappings):
    payload = os.urandom(3000)
    encoded = base64.b64encode(payload).decode()
    wrapped = "\\.br\\".join(encoded[n:n + 76] for n in range(0, len(encoded), 76))  # not valid inside base64
    bundle = translate(mappings, HEAD + f"OBX|1|ED|1^PDF^L||^application^pdf^Base64^{encoded}||||||F\n")
    assert _pdf_of(bundle)[1] == payload
    with pytest.raises(TranslationError) as error:
        translate(mappings, HEAD + f"OBX|1|ED|1^PDF^L||^AP^PDF^Base64^{wrapped}x||||||F\n")
    assert error.value.location == "OBX[1]-5"
    bundle = translate_case(mappings, CASES / "mdm-t02-discharge.hl7").bundle
    document = resources(bundle, "DocumentReference")[0]
    pdf, text = (item["attachment"] for item in document["content"])
    assert pdf["contentType"] == "application/pdf"
    assert base64.b64decode(pdf["data"]).startswith(b"%PDF-")
    assert base64.b64decode(text["data"]).decode() == "Patiente sortie à J3.\nTraitement poursuivi."
    assert document["status"] == "current" and document["docStatus"] == "final"
    assert document["subject"]["reference"] == "urn:uuid:" + resources(bundle, "Patient")[0]["id"]


def test_report_links(mappings):
    bundle = translate_case(mappings, CASES / "lab-value-types.hl7").bundle
    report = resources(bundle, "DiagnosticReport")[0]
    observations = resources(bundle, "Observation")
    assert [link["reference"] for link in report["result"]] == ["urn:uuid:" + o["id"] for o in observations]
    assert report["specimen"][0]["reference"] == "urn:uuid:" + resources(bundle, "Specimen")[0]["id"]
    assert report["status"] == "final" and [i["type"]["coding"][0]["code"] for i in report["identifier"]] == \
        ["FILL", "PLAC"]


CORPUS_FILES = ["hl7-v2-to-fhir-ig/test_conversions_ORU_R01.hl7", "nhapi/ORU_R01_large_embedded_pdf.hl7",
                "ms-fhir-converter/hl7v2/ORU-R01-01.hl7", "ms-fhir-converter/hl7v2/ORU-R01-RMGEAD.hl7",
                "ms-fhir-converter/hl7v2/MDM-T02-01.hl7", "ms-fhir-converter/hl7v2/MDM-T02-02.hl7",
                "ms-fhir-converter/hl7v2/MDM-T02-03.hl7", "ms-fhir-converter/hl7v2/MDM-T06-02.hl7",
                "ms-fhir-converter/hl7v2/MDM-T10-02.hl7", "cdc-reportstream/hl7-to-fhir/sample_oru_20241015-001.hl7"]


@pytest.mark.parametrize("name", CORPUS_FILES)
def test_corpus_results_translate_and_validate(mappings, name):
    path = CORPUS / name
    if not path.exists():
        pytest.skip("corpus not available")
    bundle = translate_case(mappings, path).bundle
    assert bundle_problems(bundle) == []
    assert resources(bundle, "DiagnosticReport") or resources(bundle, "DocumentReference")


def test_corpus_placeholder_pdf_is_refused(mappings):
    """The guide's MDM sample carries '<Base64 encoded>' as its PDF: refused, at the OBX."""
    path = CORPUS / "hl7-v2-to-fhir-ig/test_conversions_MDM_T02.hl7"
    if not path.exists():
        pytest.skip("corpus not available")
    with pytest.raises(TranslationError) as error:
        translate_case(mappings, path)
    assert error.value.location == "OBX[4]-5"


def test_panels_of_one_requisition_are_separate_reports(mappings):
    """Several OBR with one placer number (a requisition of several panels) are one report
    each, each with its own results; the same panel sent again keeps its id."""
    panels = ("MSH|^~\\&|LAB|LABO|HIE|MA|20260115101500||ORU^R01^ORU_R01|T2|P|2.5.1\n"
              "PID|1||AB1^^^CNIE^NI||Test^Patient\n"
              "ORC|RE|REQ1^HOP\n"
              "OBR|1|REQ1^HOP||2093-3^Chol^LN|||20260115073000||||||||||||||||||F\n"
              "OBX|1|NM|2093-3^Chol^LN||1.92|g/L|||||F\n"
              "OBR|2|REQ1^HOP||2345-7^Glucose^LN|||20260115073000||||||||||||||||||P\n"
              "OBX|1|NM|2345-7^Glucose^LN||0.95|g/L|||||P\n")
    bundle = translate(mappings, panels)
    reports = resources(bundle, "DiagnosticReport")
    assert [r["code"]["coding"][0]["code"] for r in reports] == ["2093-3", "2345-7"]
    assert [r["status"] for r in reports] == ["final", "preliminary"]
    assert len({r["id"] for r in reports}) == 2
    observations = resources(bundle, "Observation")
    assert [[link["reference"] for link in r["result"]] for r in reports] == \
        [["urn:uuid:" + observations[0]["id"]], ["urn:uuid:" + observations[1]["id"]]]
    alone = translate(mappings, panels.replace("|T2|", "|T3|").split("OBR|2|")[0])
    assert resources(alone, "DiagnosticReport")[0]["id"] == reports[0]["id"]


def test_text_obx_naming_no_observation_is_the_report_narrative(mappings):
    """TX/FT/ST OBX with nothing in OBX-3 (imaging and transcription systems send a report's
    body so): one text/plain presentedForm of the report, lines in order; the coded OBX beside
    them stay Observations. A text OBX with only a text in OBX-3 (component 2) names an
    observation; a non-text OBX naming nothing still fails (Observation.code is required)."""
    bundle = translate(mappings, HEAD + "OBX|1|TX|||Première ligne||||||F\nOBX|2|FT|||Deuxième\\.br\\ligne||||||F\n"
                                        "OBX|3|ST|^Commentaire||Texte nommé||||||F\n"
                                        "OBX|4|NM|2345-7^Glucose^LN||0.9|g/L|||||F\n")
    assert bundle_problems(bundle) == []
    report, = resources(bundle, "DiagnosticReport")
    form, = report["presentedForm"]
    assert form["contentType"] == "text/plain; charset=utf-8"
    assert base64.b64decode(form["data"]).decode("utf-8") == "Première ligne\nDeuxième\nligne"
    named, glucose = resources(bundle, "Observation")
    assert named["code"] == {"text": "Commentaire"} and named["valueString"] == "Texte nommé"
    assert glucose["code"]["coding"][0]["code"] == "2345-7" and len(report["result"]) == 2
    with pytest.raises(TranslationError) as error:
        translate(mappings, HEAD + "OBX|1|NM|||12|g/L|||||F\n")
    assert error.value.location == "OBX[1]" and "code is required" in error.value.reason


def test_oru_r03_is_read_as_r01(mappings):
    """ORU^R03 (v2.1/2.2 display-oriented results) has ORU^R01's segments: the same resources."""
    r01 = translate(mappings, HEAD + "OBX|1|NM|2345-7^Glucose^LN||0.9|g/L|||||F\n")
    r03 = translate(mappings, HEAD.replace("ORU^R01^ORU_R01", "ORU^R03") + "OBX|1|NM|2345-7^Glucose^LN||0.9|g/L|||||F\n")
    assert [e["resource"]["resourceType"] for e in r03["entry"]] == \
        [e["resource"]["resourceType"] for e in r01["entry"]]
    assert resources(r03, "Observation")[0]["valueQuantity"] == resources(r01, "Observation")[0]["valueQuantity"]


def test_the_obx_of_each_order_are_found_without_reading_every_obx(mappings, monkeypatch):
    """Each report's narrative is its own order's text OBX, found by bisection in the message's
    OBX positions: reading every OBX of the message for each order made a message of 2,000
    orders (115 KB) take seconds. Counted, not timed: the positions read stay linear."""
    orders = 300
    body = "".join(f"OBR|{n}|C{n}^HOP|L{n}^LAB|24331-1^Bilan^LN|||20260115073000|||||||||||||||||LAB|F\n"
                   f"OBX|1|TX|||Ligne {n}||||||F\n" for n in range(1, orders + 1))
    read = 0
    positions = Hl7Message.positions

    class Counted(list):
        def __iter__(self):
            nonlocal read
            read += len(self)
            return super().__iter__()

    monkeypatch.setattr(Hl7Message, "positions", lambda message, name: Counted(positions(message, name)))
    bundle = translate(mappings, HEAD.split("OBR|")[0] + body)
    reports = resources(bundle, "DiagnosticReport")
    assert [base64.b64decode(r["presentedForm"][0]["data"]).decode() for r in reports] == \
        [f"Ligne {n}" for n in range(1, orders + 1)]
    assert read < 10 * orders


@pytest.mark.parametrize("kind", ["cwe", "CWE ", " CE"])
def test_coded_value_type_sent_padded_or_in_lower_case_is_kept(mappings, kind):
    """OBX-2 'cwe' or 'CWE ' (a fixed-width sender's padding) is CWE: the coded value becomes
    valueCodeableConcept, as the other value types read OBX-2, instead of being lost."""
    found = observation(mappings, f"OBX|1|{kind}|X^Culture^L||POS^Positif^L||||||F")
    assert found["valueCodeableConcept"] == {"coding": [{"code": "POS", "display": "Positif"}], "text": "Positif"}


def test_comments_after_an_obx_are_the_observations_notes(mappings):
    """NTE after an OBX (ORU_R01 OBSERVATION.NTE -> Observation.note, v2-to-FHIR NTE[Observation]):
    one note per NTE, NTE-3's repetitions and \\.br\\ as lines; an empty NTE gives none, and
    the next OBX has none of them."""
    bundle = translate(mappings, HEAD + "OBX|1|NM|2093-3^Chol^LN||1.92|g/L|||||F\n"
                       "NTE|1|L|Échantillon hémolysé~à contrôler\\.br\\par le biologiste\n"
                       "NTE|2\n"
                       "NTE|3|L|Prélèvement à jeun\n"
                       "OBX|2|NM|2571-8^TG^LN||1.2|g/L|||||F\n")
    assert bundle_problems(bundle) == []
    first, second = resources(bundle, "Observation")
    assert first["note"] == [{"text": "Échantillon hémolysé\nà contrôler\npar le biologiste"},
                             {"text": "Prélèvement à jeun"}]
    assert "note" not in second

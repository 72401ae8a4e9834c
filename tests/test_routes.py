"""Routing rules (pure) and their configuration: matching by type, sender, sender type,
resource types and codes; fan-out; every configuration mistake reported with its file."""
from __future__ import annotations

import pytest

from gateway.config import ConfigError, RouteConfig, RouteMatch, SenderConfig, load_config
from gateway.delivery.routes import Router, patient_key, retired_keys

LAB = SenderConfig("INPE-100002", "Lab", "laboratory")
HOSPITAL = SenderConfig("INPE-100001", "CHU", "hospital")


def bundle(*resources) -> dict:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"urn:uuid:{n}", "resource": r} for n, r in enumerate(resources)]}


PATIENT = {"resourceType": "Patient", "id": "p-1"}
GLUCOSE = {"resourceType": "Observation", "id": "o-1",
           "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]}}
CHARGE = {"resourceType": "ChargeItem", "id": "c-1",
          "code": {"coding": [{"system": "urn:ma:ngap", "code": "C"}]}}


def router(*routes) -> Router:
    return Router(routes, [LAB, HOSPITAL])


def test_message_type_patterns():
    r = router(RouteConfig("a", ("record",), RouteMatch(message_types=("ADT^*",))),
               RouteConfig("b", ("lab",), RouteMatch(message_types=("ORU^R01", "ASTM"))),
               RouteConfig("c", ("all",), RouteMatch(message_types=("*",))),
               RouteConfig("d", ("mdm",), RouteMatch(message_types=("MDM",))))
    assert r.destinations("ADT^A08", None, bundle()) == ("record", "all")
    assert r.destinations("ORU^R01", None, bundle()) == ("lab", "all")
    assert r.destinations("ORU^R30", None, bundle()) == ("all",)
    assert r.destinations("ASTM", None, bundle()) == ("lab", "all")
    assert r.destinations("MDM^T02", None, bundle()) == ("all", "mdm")


def test_sender_and_sender_type():
    r = router(RouteConfig("labs", ("record",), RouteMatch(sender_types=("laboratory",))),
               RouteConfig("chu", ("audit",), RouteMatch(senders=("INPE-100001",))))
    assert r.destinations("ORU^R01", "INPE-100002", bundle()) == ("record",)
    assert r.destinations("ORU^R01", "INPE-100001", bundle()) == ("audit",)
    assert r.destinations("ORU^R01", None, bundle()) == ()  # an unknown sender has no type
    assert r.destinations("ORU^R01", "INPE-999", bundle()) == ()


def test_content_resources_and_codes_and_fan_out_once():
    r = router(RouteConfig("billing", ("cnss",), RouteMatch(resources=("ChargeItem", "MedicationDispense"))),
               RouteConfig("clinical", ("record",), RouteMatch(resources=("Patient",))),
               RouteConfig("glucose", ("record", "diabetes"), RouteMatch(codes=("http://loinc.org|2345-7",))),
               RouteConfig("ngap", ("cnss",), RouteMatch(codes=("C",))))
    assert r.destinations("DFT^P03", None, bundle(PATIENT, CHARGE)) == ("cnss", "record")
    assert r.destinations("ORU^R01", None, bundle(PATIENT, GLUCOSE)) == ("record", "diabetes")
    assert r.destinations("ORU^R01", None, bundle(GLUCOSE)) == ("record", "diabetes")
    assert r.destinations("ADT^A01", None, bundle()) == ()


def test_all_keys_must_match():
    r = router(RouteConfig("x", ("record",), RouteMatch(message_types=("ORU^R01",),
                                                        sender_types=("laboratory",),
                                                        codes=("2345-7",))))
    assert r.destinations("ORU^R01", "INPE-100002", bundle(GLUCOSE)) == ("record",)
    assert r.destinations("ORU^R01", "INPE-100001", bundle(GLUCOSE)) == ()
    assert r.destinations("ORU^R01", "INPE-100002", bundle(PATIENT)) == ()
    assert r.destinations("ADT^A01", "INPE-100002", bundle(GLUCOSE)) == ()


def test_patient_key_is_the_first_patient():
    assert patient_key(bundle(GLUCOSE, PATIENT, {"resourceType": "Patient", "id": "p-2"})) == "Patient/p-1"
    assert patient_key(bundle(GLUCOSE)) is None


def test_a_merge_is_keyed_by_its_survivor_and_retires_the_merged_patient():
    """ADT^A40: the merged patient (linked replaced-by) is retired, wherever the bundle lists it."""
    merged = {"resourceType": "Patient", "id": "p-old", "active": False,
              "link": [{"other": {"reference": "urn:uuid:p-1"}, "type": "replaced-by"}]}
    survivor = {**PATIENT, "link": [{"other": {"reference": "urn:uuid:p-old"}, "type": "replaces"}]}
    assert patient_key(bundle(merged, survivor)) == "Patient/p-1"
    assert retired_keys(bundle(merged, survivor)) == ("Patient/p-old",)
    assert retired_keys(bundle(PATIENT, GLUCOSE)) == ()


BASE = """\
database: {url: 'sqlite:///var/g.sqlite'}
pki: {ca: c, cert: c, key: k}
facilities: conf/facilities.yaml
"""


@pytest.fixture
def conf(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "facilities.yaml").write_text(
        'facilities:\n  - {id: "INPE-100002", name: Lab, type: laboratory}\n')
    return tmp_path / "conf"


def test_destinations_and_routes_load(conf):
    (conf / "routes.yaml").write_text(
        "routes:\n  - name: results\n    when: {message_types: [ORU^R01], sender_types: [laboratory]}\n"
        "    to: [record]\n  - name: billing\n    when: {resources: [ChargeItem]}\n    to: [cnss, record]\n")
    (conf / "gateway.yaml").write_text(BASE + """\
destinations:
  - {name: record, kind: fhir-record, url: "https://127.0.0.1:9444/fhir", retry: {base: 2, max_age: 3600}}
  - {name: cnss, kind: cnss, url: "https://127.0.0.1:9443/", concurrency: 4}
routes: conf/routes.yaml
delivery: {lease: 40, poll_interval: 0.2}
""")
    config = load_config(str(conf / "gateway.yaml"), {})
    record, cnss = config.destinations
    assert (record.kind, record.url, record.retry.base, record.retry.max_age) == \
        ("fhir-record", "https://127.0.0.1:9444/fhir", 2.0, 3600.0)
    assert cnss.concurrency == 4 and config.delivery.lease == 40.0
    assert [(r.name, r.to) for r in config.routes] == [("results", ("record",)), ("billing", ("cnss", "record"))]
    assert config.routes[0].when.sender_types == ("laboratory",)


def test_route_mistakes_are_all_reported_with_their_file(conf):
    (conf / "routes.yaml").write_text(
        "routes:\n  - name: a\n    when: {message_types: [oru], senders: [INPE-100003], resources: [Observaton],"
        " colour: red}\n    to: [recrod]\n  - name: b\n    to: [record]\n    when: {sender_types: [bakery]}\n")
    (conf / "gateway.yaml").write_text(BASE + """\
destinations:
  - {name: record, kind: fhir, url: "http://127.0.0.1:9444/fhir", retry: {factor: 0.5}}
routes: conf/routes.yaml
""")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf / "gateway.yaml"), {})
    problems = "\n".join(caught.value.problems)
    assert "destinations[0].kind" in problems
    assert "destinations[0].url" in problems and "https://" in problems
    assert "destinations[0].retry.factor" in problems
    assert "routes.yaml" in problems and "routes[0].when.colour" in problems
    assert "routes[1].when.sender_types" in problems


def test_route_references_are_checked(conf):
    (conf / "routes.yaml").write_text(
        "routes:\n  - name: a\n    when: {message_types: [oru], senders: [INPE-100003], resources: [Observaton]}\n"
        "    to: [recrod]\n")
    (conf / "gateway.yaml").write_text(BASE + """\
destinations:
  - {name: record, kind: fhir-record, url: "https://127.0.0.1:9444/fhir"}
routes: conf/routes.yaml
""")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf / "gateway.yaml"), {})
    problems = "\n".join(caught.value.problems)
    assert "routes[0].to: 'recrod' is not a destination" in problems and "did you mean 'record'" in problems
    assert "'INPE-100003' is not in the facility registry" in problems
    assert "'Observaton' is not a FHIR R4 resource type" in problems
    assert "'oru' is not a message type pattern" in problems


def test_a_destination_with_an_error_is_not_also_reported_as_missing(conf):
    """A destination whose url is wrong (here: an unset ${VARIABLE}) is reported once; the
    routes and the eligibility check that name it are not told it does not exist (a name
    written nowhere still is)."""
    (conf / "routes.yaml").write_text("routes:\n  - name: a\n    to: [record, cnss]\n"
                                      "  - name: b\n    to: [recrod]\n")
    (conf / "gateway.yaml").write_text(BASE + """\
destinations:
  - {name: record, kind: fhir-record, url: "${SHARED_RECORD_URL}"}
  - {name: cnss, kind: cnss, url: "https://127.0.0.1:9443/"}
routes: conf/routes.yaml
prescriptions: {eligibility: cnss}
""")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf / "gateway.yaml"), {})
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert "destinations[0].url: environment variable SHARED_RECORD_URL is not set" in problems[0]
    assert "routes[1].to: 'recrod' is not a destination" in problems[1]  # still caught


def test_retry_settings_that_do_not_fit_together_are_a_configuration_problem(conf):
    """A cap below the base is reported at load with its destination, not at the first retry."""
    (conf / "routes.yaml").write_text("routes:\n  - name: all\n    to: [record]\n")
    (conf / "gateway.yaml").write_text(BASE + """\
destinations:
  - {name: record, kind: fhir-record, url: "https://127.0.0.1:9444/fhir", retry: {base: 60, cap: 5}}
routes: conf/routes.yaml
""")
    with pytest.raises(ConfigError) as caught:
        load_config(str(conf / "gateway.yaml"), {})
    (problem,) = caught.value.problems
    assert "destinations[0].retry: cap (5.0) must not be below base (60.0)" in problem

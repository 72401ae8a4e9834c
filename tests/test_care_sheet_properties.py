"""Property-based: every care sheet the gateway builds is one the CNSS peer takes, or is refused.

Canonical bundles (acts as ChargeItems, drugs as MedicationDispenses) are generated with
realistic but edgy content: French and Arabic names with diacritics, XML-special characters,
control characters, lone surrogates, very long names, empty or missing optional parts, amounts
with 0 to 3+ decimals and huge ones, zero or negative quantities, many lines, codes and
identifiers at and beyond their limits, times at day boundaries in Africa/Casablanca.

For each: either `care_sheet_request` builds a request that the sandbox CNSS peer's own checks
accept (its lxml schema, then the rules the schema cannot say), and that carries the values
exactly (parsed back and compared: names, amounts, quantities, codes, identifiers, the day of
care), or it raises a CareSheetError whose reason names the field; nothing else. A request
refused by the peer would be dead-lettered as a soap:Client fault that we could have avoided.
"""
from __future__ import annotations

import itertools
import os
import re
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from lxml import etree

from adapters.soap.cnss import NAMESPACE
from gateway.delivery.care_sheet import CareSheetError, care_sheet_request
from gateway.prescriptions.ids import ALPHABET, format_id
from gateway.sandbox.cnss.service import CnssService, load_schema
from gateway.sandbox.cnss.store import CareSheetStore

CASABLANCA = ZoneInfo("Africa/Casablanca")
NS = {"fse": NAMESPACE}
URL = "https://127.0.0.1:9443/cnss"
SCHEMA = load_schema()  # the very schema object type the sandbox peer validates with
# Modest by default (a few seconds); CARE_SHEET_EXAMPLES=5000 for a deeper, random search.
EXAMPLES = int(os.environ.get("CARE_SHEET_EXAMPLES", "40"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 40,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],  # no explain: minutes
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEYS = itertools.count(1)
RECEIVED = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)

# A refusal names what is wrong: the resource and item, or the care-sheet element.
FIELD_WORDS = re.compile(
    r"ChargeItem \d+|MedicationDispense \d+|Patient\.name|patient|Coverage|subscriberId|"
    r"immatriculation|CNIE|cnie|INPE|inpe|prescri|libelle|nom|prenom|code|quantite|montant|"
    r"prixUnitaire|lignes|dateSoins|facility|performer|date of care")


# -- strategies ------------------------------------------------------------------------------

FRENCH = "abcdefghijklmnopqrstuvwxyzàâäçéèêëîïôöùûüÿœæÉÈÀÇÔŒ -'"
ARABIC = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي ءآأؤإئةى"
XML_SPECIAL = "&<>\"'"
CONTROL = "".join(chr(c) for c in (0, 1, 8, 0x0B, 0x0C, 0x1B, 0x7F, 0xFFFE))
SURROGATES = "\ud800\udfff"

clean_letters = st.sampled_from(FRENCH + ARABIC + XML_SPECIAL)
clean_name = st.text(clean_letters, min_size=1, max_size=100).filter(lambda s: s.strip())
edgy_name = st.one_of(
    clean_name,
    st.text(clean_letters, min_size=101, max_size=160),
    st.text(st.sampled_from(FRENCH + ARABIC + XML_SPECIAL + CONTROL + SURROGATES), min_size=0, max_size=30),
    st.just(""), st.just("   "), st.just("\t\n"),
)


def ean13(body: str) -> str:
    weighted = sum(int(d) * (3 if i % 2 else 1) for i, d in enumerate(body))
    return body + str((10 - weighted % 10) % 10)


valid_ean = st.from_regex(r"\A[0-9]{12}\Z").map(ean13)
edgy_ean = st.one_of(valid_ean, st.from_regex(r"\A[0-9]{12,14}\Z"), valid_ean.map(lambda c: f" {c} "),
                     st.just("6118001230068"), st.just("0" + ean13("611800123006")))
valid_act = st.from_regex(r"\A[A-Z0-9][A-Z0-9.]{0,11}\Z")
edgy_act = st.one_of(valid_act, st.from_regex(r"\A[A-Z0-9][A-Z0-9.]{12,14}\Z"), st.just("k"),
                     st.just("C "), st.just("B.1"))

valid_immatriculation = st.from_regex(r"\A[0-9]{6,15}\Z")
edgy_immatriculation = st.one_of(valid_immatriculation, st.from_regex(r"\A[0-9]{1,5}\Z"),
                                 st.from_regex(r"\A[0-9]{16,18}\Z"), st.just("112 233 445"))
valid_cnie = st.from_regex(r"\A[A-Z]{1,2}[0-9]{1,8}\Z")
edgy_cnie = st.one_of(valid_cnie, valid_cnie.map(str.lower), st.just("BE 123456"),
                      st.from_regex(r"\A[A-Z]{3}[0-9]{6}\Z"), st.from_regex(r"\A[A-Z]{2}[0-9]{9}\Z"))
valid_inpe = st.from_regex(r"\A[0-9A-Z][0-9A-Z\-]{2,19}\Z")
edgy_inpe = st.one_of(valid_inpe, st.just("INPE-100001"), st.from_regex(r"\A[0-9A-Z]{21,23}\Z"),
                      st.just("ab"), st.just("-100001"))

two_decimals = st.decimals(min_value=0, max_value=Decimal("99999999.99"), places=2)
edgy_money = st.one_of(
    two_decimals, st.decimals(min_value=0, max_value=1000, places=0), st.decimals(min_value=0, max_value=1000, places=1),
    st.decimals(min_value=0, max_value=1000, places=3), st.just(Decimal("0")), st.just(Decimal("-0.01")),
    st.just(Decimal("9999999999.99")), st.just(Decimal("1E+30")), st.just(Decimal("12.30")),
    st.floats(min_value=0, max_value=1e6, allow_nan=False).map(lambda f: round(f, 2)),
    st.sampled_from(["NaN", "Infinity", "1e400", 1e300, "12,50", True]),
)
unit_prices = st.decimals(min_value=0, max_value=Decimal("9999.99"), places=2)
valid_quantity = st.one_of(st.integers(1, 1000).map(Decimal), st.just(Decimal(100000)),
                           st.decimals(min_value=Decimal("0.001"), max_value=1000, places=3))
edgy_quantity = st.one_of(valid_quantity, st.just(Decimal(0)), st.just(Decimal(-1)), st.just(Decimal("100000.001")),
                          st.just(Decimal("0.0001")), st.sampled_from([100, 10.0, 1e2, 2.5, "NaN", "Infinity"]))


prescription_ids = st.text(st.sampled_from(ALPHABET), min_size=8, max_size=8).map(format_id)
labels = st.one_of(st.none(), clean_name, st.just("   "), st.just(""),
                   st.text(clean_letters, min_size=150, max_size=250))


@st.composite
def moments(draw):
    """A FHIR dateTime near midnight in Casablanca, with an offset (UTC, local, other) or none."""
    day = draw(st.dates(min_value=date(2025, 1, 1), max_value=date(2027, 12, 31)))
    minutes = draw(st.sampled_from([0, 1, 30, 59, 60, 23 * 60, 23 * 60 + 30, 23 * 60 + 59, 12 * 60]))
    local = datetime.combine(day, datetime.min.time(), CASABLANCA) + timedelta(minutes=minutes)
    form = draw(st.sampled_from(["utc", "local", "naive", "plus3", "date"]))
    if form == "utc":
        return local.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if form == "plus3":
        return local.astimezone(timezone(timedelta(hours=3))).isoformat()
    if form == "naive":
        return local.replace(tzinfo=None).isoformat()
    if form == "date":
        return local.date().isoformat()
    return local.isoformat()


def casablanca_day(text: str) -> date:
    if len(text) == 10:
        return date.fromisoformat(text)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.astimezone(CASABLANCA).date() if moment.tzinfo else moment.date()


@st.composite
def care_bundles(draw, edgy: bool):
    name = edgy_name if edgy else clean_name
    pick = (lambda valid, bad: draw(bad if edgy else valid))
    patient = {"resourceType": "Patient", "id": "p", "identifier": []}
    if draw(st.booleans()):
        patient["identifier"].append({"system": "urn:ma:cnss:immatriculation",
                                      "value": pick(valid_immatriculation, edgy_immatriculation)})
    if draw(st.booleans()) or not patient["identifier"]:
        patient["identifier"].append({"system": "urn:ma:cnie", "value": pick(valid_cnie, edgy_cnie)})
    human = {}
    if draw(st.booleans()):
        human["family"] = draw(name)
    if draw(st.booleans()):
        human["given"] = draw(st.lists(name, min_size=1 if not edgy else 0, max_size=3))
    if human or draw(st.booleans()):
        patient["name"] = [human]
    if draw(st.booleans()):
        patient["birthDate"] = draw(st.dates(min_value=date(1920, 1, 1), max_value=date(2026, 1, 1))).isoformat()
    entries = [{"fullUrl": "urn:uuid:p", "resource": patient}]
    relationship = draw(st.sampled_from(["self", "spouse", "child", None]))
    if relationship is not None:
        entries.append({"fullUrl": "urn:uuid:cov", "resource": {
            "resourceType": "Coverage", "status": "active", "beneficiary": {"reference": "urn:uuid:p"},
            "subscriberId": pick(valid_immatriculation, edgy_immatriculation),
            "relationship": {"coding": [{"code": relationship}]}}})
    facility = pick(valid_inpe, edgy_inpe)
    entries.append({"fullUrl": "urn:uuid:org", "resource": {
        "resourceType": "Organization", "identifier": [{"system": "urn:ma:inpe", "value": facility}]}})
    entries.append({"fullUrl": "urn:uuid:prov", "resource": {  # the sender, as the live path records it
        "resourceType": "Provenance", "agent": [{"who": {"identifier": {"system": "urn:ma:inpe", "value": facility}}}]}})
    practitioner = draw(st.one_of(st.none(), valid_inpe if not edgy else edgy_inpe))
    if practitioner is not None:
        entries.append({"fullUrl": "urn:uuid:pr", "resource": {
            "resourceType": "Practitioner", "identifier": [{"system": "urn:ma:inpe", "value": practitioner}]}})
    count = draw(st.integers(1, 8))
    # An e-prescription: its lines as the prescription flow annotates them (gateway.prescriptions).
    prescription = draw(st.one_of(st.none(), prescription_ids))
    if prescription is not None:
        entries.append({"fullUrl": "urn:uuid:doc", "resource": {
            "resourceType": "Practitioner", "identifier": [{"system": "urn:ma:inpe",
                                                            "value": pick(valid_inpe, edgy_inpe)}]}})
    lines = []
    for n in range(count):
        when = draw(moments())
        label = draw(labels if not edgy else st.one_of(labels, name))
        if prescription is not None and draw(st.booleans()):
            entries.extend(prescribed(n, prescription, label=label, when=when,
                                      act=draw(st.booleans()), ean=draw(valid_ean), nabm=draw(valid_act),
                                      quantity=draw(valid_quantity if not edgy else edgy_quantity)))
            lines.append(entries[-1]["resource"])
            continue
        if draw(st.booleans()):  # an act
            code = pick(valid_act, edgy_act)
            item = {"resourceType": "ChargeItem", "status": "billable", "subject": {"reference": "urn:uuid:p"},
                    "code": {"coding": [{"system": draw(st.sampled_from(["urn:ma:cnss:ngap", "urn:ma:cnss:nabm"])),
                                         "code": code, **({"display": label} if label is not None else {})}]},
                    "quantity": {"value": pick(valid_quantity, edgy_quantity)},
                    "priceOverride": {"value": pick(two_decimals, edgy_money), "currency": "MAD"},
                    "performingOrganization": {"reference": "urn:uuid:org"},
                    "occurrenceDateTime": when}
            if practitioner is not None:
                item["performer"] = [{"actor": {"reference": "urn:uuid:pr"}}]
        else:
            code = pick(valid_ean, edgy_ean)
            item = {"resourceType": "MedicationDispense", "status": "completed", "subject": {"reference": "urn:uuid:p"},
                    "medicationCodeableConcept": {"coding": [{"system": "https://www.gs1.org/gtin", "code": code,
                                                              **({"display": label} if label is not None else {})}]},
                    "quantity": {"value": pick(valid_quantity, edgy_quantity), "unit": "boîte"},
                    "performer": [{"actor": {"reference": "urn:uuid:org"}}],
                    "whenHandedOver": when}
            if draw(st.booleans()):
                item["extension"] = [{"url": "urn:ma:hie:StructureDefinition/unit-price",
                                      "valueMoney": {"value": pick(unit_prices, edgy_money), "currency": "MAD"}}]
        lines.append(item)
        entries.append({"fullUrl": f"urn:uuid:l{n}", "resource": item})
    return {"resourceType": "Bundle", "type": "message", "entry": entries}


def prescribed(n: int, prescription: str, *, label, when, act: bool, ean: str, nabm: str, quantity) -> list:
    """Line n+1 of `prescription`, dispensed (MedicationRequest + MedicationDispense) or performed
    (ServiceRequest + DiagnosticReport + ChargeItem without price), with its line key."""
    line = f"{prescription}/{n + 1}"
    key = f"{prescription}.{n + 1}.{n:012x}"
    if act:
        request = {"resourceType": "ServiceRequest", "identifier": [{"system": "urn:ma:hie:prescription-line",
                                                                     "value": line}],
                   "requisition": {"system": "urn:ma:hie:prescription", "value": prescription},
                   "requester": {"reference": "urn:uuid:doc"}}
        report = {"resourceType": "DiagnosticReport", "basedOn": [{"reference": f"urn:uuid:sr{n}"}]}
        charge = {"resourceType": "ChargeItem", "status": "billable", "subject": {"reference": "urn:uuid:p"},
                  "identifier": [{"system": "urn:ma:hie:act", "value": key}],
                  "code": {"coding": [{"system": "urn:ma:cnss:nabm", "code": nabm}],
                           **({"text": label} if label is not None else {})},
                  "occurrenceDateTime": when, "quantity": {"value": 1},
                  "performer": [{"function": {"coding": [{"code": "OP"}]}, "actor": {"reference": "urn:uuid:doc"}}],
                  "service": [{"reference": f"urn:uuid:dr{n}"}]}
        return [{"fullUrl": f"urn:uuid:sr{n}", "resource": request},
                {"fullUrl": f"urn:uuid:dr{n}", "resource": report},
                {"fullUrl": f"urn:uuid:l{n}", "resource": charge}]
    request = {"resourceType": "MedicationRequest",
               "identifier": [{"system": "urn:ma:hie:prescription-line", "value": line}],
               "groupIdentifier": {"system": "urn:ma:hie:prescription", "value": prescription},
               "requester": {"reference": "urn:uuid:doc"}}
    dispense = {"resourceType": "MedicationDispense", "status": "completed", "subject": {"reference": "urn:uuid:p"},
                "identifier": [{"system": "urn:ma:hie:dispensation", "value": key}],
                "medicationCodeableConcept": {"coding": [{"system": "https://www.gs1.org/gtin", "code": ean,
                                                          **({"display": label} if label is not None else {})}]},
                "quantity": {"value": quantity}, "performer": [{"actor": {"reference": "urn:uuid:org"}}],
                "authorizingPrescription": [{"reference": f"urn:uuid:mr{n}"}], "whenHandedOver": when}
    return [{"fullUrl": f"urn:uuid:mr{n}", "resource": request}, {"fullUrl": f"urn:uuid:l{n}", "resource": dispense}]


# -- the oracle ------------------------------------------------------------------------------

def _text(node, path):
    return node.findtext(path, namespaces=NS)


def check(bundle: dict, *, refusable: bool = True) -> None:
    """Accepted by the peer and exact, or (when `refusable`) refused with a reason naming the field."""
    key = f"prop-{next(KEYS):08d}:cnss"
    try:
        request = care_sheet_request(bundle, url=URL, idempotency_key=key)
    except CareSheetError as refusal:
        assert refusable, f"refused a conformant input: {refusal.reason}"
        assert FIELD_WORDS.search(refusal.reason), f"refusal names no field: {refusal.reason!r}"
        return
    assert request is not None
    operation = etree.fromstring(request.body).find("{http://schemas.xmlsoap.org/soap/envelope/}Body")[0]
    assert SCHEMA.validate(operation), f"sent, but invalid: {SCHEMA.error_log[0]}"
    service = CnssService(CareSheetStore(":memory:"), schema=SCHEMA)
    status, answer = service.handle(request.body, RECEIVED)
    assert status == 200, f"the CNSS peer refused it: {answer[:600]!r}"
    round_trip(bundle, operation)


def _dec(value) -> Decimal:
    return Decimal(str(value))


def round_trip(bundle: dict, operation) -> None:
    resources = [e["resource"] for e in bundle["entry"]]
    patient = next(r for r in resources if r["resourceType"] == "Patient")
    items = ([r for r in resources if r["resourceType"] == "ChargeItem"]
             + [r for r in resources if r["resourceType"] == "MedicationDispense"])
    sent = operation.findall("fse:lignes/fse:ligne", NS)
    assert len(sent) == len(items)
    total = Decimal(0)
    for item, line in zip(items, sent):
        quantity = Decimal(_text(line, "fse:quantite"))
        assert quantity == _dec(item["quantity"]["value"])
        if item["resourceType"] == "ChargeItem":
            coding = item["code"]["coding"][0]
            assert _text(line, "fse:acte/fse:code") == coding["code"].strip()
            if "priceOverride" in item:
                amount = Decimal(_text(line, "fse:montant"))
                assert amount == _dec(item["priceOverride"]["value"])
                if _text(line, "fse:prixUnitaire") is not None:
                    assert Decimal(_text(line, "fse:prixUnitaire")) * quantity == amount
            else:  # performed against an e-prescription: CNSS values it
                assert _text(line, "fse:montant") is None
        else:
            coding = item["medicationCodeableConcept"]["coding"][0]
            assert _text(line, "fse:codeEAN13") == coding["code"].strip()
            price = next((e["valueMoney"]["value"] for e in item.get("extension", ())), None)
            if price is None:
                assert _text(line, "fse:prixUnitaire") is None and _text(line, "fse:montant") is None
            else:
                assert Decimal(_text(line, "fse:prixUnitaire")) == _dec(price)
                amount = Decimal(_text(line, "fse:montant"))
        concept = item.get("code") or item["medicationCodeableConcept"]
        label = next((" ".join(v.split()) for v in (coding.get("display"), concept.get("text"), coding["code"])
                      if v and v.strip()))
        if len(label) <= 200:  # longer labels are cut (the code is the data; see the module)
            assert _text(line, "fse:libelle") == label
        key = next((i["value"] for i in item.get("identifier", ())
                    if i["system"] in ("urn:ma:hie:act", "urn:ma:hie:dispensation")), None)
        if key is not None:
            number, rank, _ = key.split(".")
            assert _text(line, "fse:prescription/fse:numero") == number
            assert _text(line, "fse:prescription/fse:ligne") == rank
            assert _text(line, "fse:prescription/fse:cleLigne") == key
            assert _text(operation, "fse:numeroPrescription") == number
        else:
            assert line.find("fse:prescription", NS) is None
        if _text(line, "fse:montant") is not None:
            total += amount
    if _text(operation, "fse:montantTotal") is not None:
        assert Decimal(_text(operation, "fse:montantTotal")) == total
    days = [casablanca_day(item.get("occurrenceDateTime") or item.get("whenHandedOver")) for item in items]
    assert _text(operation, "fse:dateSoins") == min(days).isoformat()
    facility = next(r for r in resources if r["resourceType"] == "Organization")["identifier"][0]["value"]
    assert _text(operation, "fse:executant/fse:inpeEtablissement") == facility.strip()
    own = {i["system"]: i["value"] for i in patient["identifier"]}
    coverage = next((r for r in resources if r["resourceType"] == "Coverage"), None)
    relationship = coverage["relationship"]["coding"][0]["code"] if coverage else "self"
    if relationship == "self":
        assert _text(operation, "fse:assure/fse:immatriculation") == own.get("urn:ma:cnss:immatriculation")
        assert _text(operation, "fse:beneficiaire/fse:nom") is None
    else:
        assert _text(operation, "fse:assure/fse:immatriculation") == coverage["subscriberId"].strip()
        human = (patient.get("name") or [{}])[0]
        family = (human.get("family") or "").strip() or None  # trimmed; blank is missing
        given = " ".join(g.strip() for g in human.get("given") or () if g and g.strip()) or None
        assert _text(operation, "fse:beneficiaire/fse:nom") == family
        assert _text(operation, "fse:beneficiaire/fse:prenom") == given


# -- properties ------------------------------------------------------------------------------

@PROPERTY
@given(care_bundles(edgy=False))
def test_contract_conformant_input_is_accepted_by_the_cnss_peer_and_exact(bundle):
    """Input the contract can carry is never refused, and the peer takes it as is."""
    check(bundle, refusable=False)


@PROPERTY
@given(care_bundles(edgy=True))
def test_any_input_is_accepted_exactly_or_refused_naming_the_field(bundle):
    check(bundle)

"""The reference CNSS peer over real mutual TLS on loopback, with its SQLite store in tmp_path.

Requests are built by zeep from the WSDL (the gateway's way), sent with Twisted's Agent and
a client certificate, and the answers read back by zeep and validated against the XSD: the
contract is exercised from both ends. Covers eligibility, submission, status, idempotency,
every kind of bad input, access control, each fault mode and a restart.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import warnings
from datetime import date, datetime, timezone
from decimal import Decimal
from types import SimpleNamespace

import pytest
import pytest_twisted
import zeep
from lxml import etree
from twisted.internet import defer, reactor
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from adapters.soap.cnss import NAMESPACE, WSDL_PATH, XSD_PATH
from gateway import pki
from gateway.delivery.care_sheet import cnss_client
from gateway.delivery.outcome import HttpResponse
from gateway.sandbox.cnss import CnssPeer, listen_cnss_peer, peer_tls_options
from gateway.sandbox.cnss.service import CnssService
from gateway.sandbox.cnss.store import CareSheetStore
from gateway.tls import client_tls_options

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
NS = {"soap": SOAP_ENV, "fse": NAMESPACE}
CORPUS_XXE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "corpus",
                          "hapi-hl7v2", "xml", "xml-with-xxe.xml")


# -- PKI, peer and client ------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """The gateway's dev PKI (with a facility) and a stranger's PKI whose client is also named `gateway`."""
    main = tmp_path_factory.mktemp("cnss-pki")
    other = tmp_path_factory.mktemp("cnss-pki-other")
    pki.init_dev_pki(str(main), ["INPE-100001"])
    pki.init_dev_pki(str(other), [])
    return SimpleNamespace(dir=str(main), other=str(other),
                           path=lambda name: str(main / name), other_path=lambda name: str(other / name))


class Running:
    def __init__(self, peer: CnssPeer, port, store_path: str):
        self.peer, self.port, self.store_path = peer, port, store_path
        self.url = f"https://127.0.0.1:{port.getHost().port}/"

    @defer.inlineCallbacks
    def stop(self):
        yield self.port.stopListening()
        yield self.peer.stop()


@defer.inlineCallbacks
def start_peer(store_path: str, certs, **options):
    peer = CnssPeer(store_path, reactor=reactor, **options)
    port = yield listen_cnss_peer(reactor, peer, 0, "127.0.0.1", peer_tls_options(certs.dir))
    return Running(peer, port, store_path)


@pytest.fixture
def cnss(certs, tmp_path):
    """A running peer on a free port with a fresh store; stopped after the test."""
    running = pytest_twisted.blockon(start_peer(str(tmp_path / "cnss.sqlite"), certs))
    yield running
    pytest_twisted.blockon(running.stop())


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, creator):
        self.creator = creator

    def creatorForNetloc(self, hostname, port):
        return self.creator


@implementer(IBodyProducer)
class _ChunkedBody:
    """A body of unknown length, so the Agent sends it chunked (no Content-Length)."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes):
        self.data = data

    def startProducing(self, consumer):
        for i in range(0, len(self.data), 65536):
            consumer.write(self.data[i:i + 65536])
        return defer.succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


def client_creator(certs, who: str = "gateway"):
    if who == "none":
        return client_tls_options(certs.path("ca.crt"), "127.0.0.1")
    if who == "stranger":
        return client_tls_options(certs.path("ca.crt"), "127.0.0.1",
                                  certs.other_path("gateway.crt"), certs.other_path("gateway.key"))
    return client_tls_options(certs.path("ca.crt"), "127.0.0.1", certs.path(f"{who}.crt"), certs.path(f"{who}.key"))


@defer.inlineCallbacks
def http(certs, url: str, body: bytes | None = None, *, method: bytes = b"POST", who: str = "gateway",
         headers: dict[str, str] | None = None, chunked: bool = False):
    """One HTTPS exchange with a client certificate; the answer as an HttpResponse."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=_Policy(client_creator(certs, who)), pool=pool)
    sent = {"content-type": "text/xml; charset=utf-8"} if body is not None else {}
    sent.update(headers or {})
    producer = None
    if body is not None:
        producer = _ChunkedBody(body) if chunked else FileBodyProducer(io.BytesIO(body))
    try:
        response = yield agent.request(method, url.encode(),
                                       Headers({k.encode(): [v.encode()] for k, v in sent.items()}), producer)
        with warnings.catch_warnings():
            # Twisted warns that a TLS transport has no abortConnection; harmless here.
            warnings.simplefilter("ignore", DeprecationWarning)
            reading = readBody(response)
        data = yield reading
    finally:
        yield pool.closeCachedConnections()
    answer_headers = {k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()}
    return HttpResponse(response.code, answer_headers, data)


def envelope(operation: str, **fields) -> bytes:
    client = cnss_client()
    return etree.tostring(client.create_message(client.service, operation, **fields),
                          xml_declaration=True, encoding="utf-8")


def call(certs, running: Running, operation: str, **fields):
    return http(certs, running.url, envelope(operation, **fields),
                headers={"SOAPAction": f'"{NAMESPACE}#{operation}"'})


SCHEMA = etree.XMLSchema(etree.parse(XSD_PATH))


def read(operation: str, response: HttpResponse):
    """zeep's reading of the answer (raises zeep Fault for faults), after checking it against the XSD."""
    root = etree.fromstring(response.body)
    payload = root.find("soap:Body", NS)[0]
    if payload.tag == f"{{{SOAP_ENV}}}Fault":
        SCHEMA.assertValid(payload.find("detail/fse:Erreur", NS))
    else:
        SCHEMA.assertValid(payload)
    client = cnss_client()
    binding = client.service._binding
    reply = SimpleNamespace(status_code=response.code, content=response.body, encoding="utf-8",
                            headers={"Content-Type": response.headers.get("content-type", "text/xml")})
    return binding.process_reply(client, binding.get(operation), reply)


def fault_of(response: HttpResponse) -> SimpleNamespace:
    """The fault's code, string and fse:Erreur fields, checking HTTP 500 and the detail schema."""
    assert response.code == 500, response
    assert response.headers["content-type"].startswith("text/xml")
    root = etree.fromstring(response.body)
    fault = root.find("soap:Body/soap:Fault", NS)
    assert fault is not None, response.body
    error = fault.find("detail/fse:Erreur", NS)
    SCHEMA.assertValid(error)
    return SimpleNamespace(code=fault.findtext("faultcode"), string=fault.findtext("faultstring"),
                           error=error.findtext("fse:code", namespaces=NS),
                           message=error.findtext("fse:message", namespaces=NS),
                           line=error.findtext("fse:ligne", namespaces=NS),
                           element=error.findtext("fse:element", namespaces=NS))


def care_sheet(key: str = "cle-test-0001", **changes) -> dict:
    """A valid care sheet: a consultation (NGAP C) and a dispensed drug without a price."""
    sheet = {
        "cleIdempotence": key,
        "assure": {"immatriculation": "112233445", "cnie": "BE123456"},
        "beneficiaire": {"lien": "ASSURE"},
        "inpePrescripteur": "100345678",
        "executant": {"inpeEtablissement": "INPE-100001", "inpePraticien": "100234567"},
        "numeroPrescription": "ORD-2026-000123",
        "dateSoins": date(2026, 1, 15),
        "lignes": {"ligne": [
            {"acte": {"nomenclature": "NGAP", "code": "C"}, "libelle": "Consultation",
             "quantite": Decimal("1"), "prixUnitaire": Decimal("250.00"), "montant": Decimal("250.00")},
            {"codeEAN13": "6118001230068", "libelle": "DOLIPRANE 1000 mg", "quantite": Decimal("2")},
        ]},
    }
    sheet.update(changes)
    return sheet


def rows(store_path: str) -> int:
    with sqlite3.connect(store_path) as db:
        return db.execute("SELECT count(*) FROM feuilles").fetchone()[0]


# -- the contract ----------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_wsdl_and_schema_are_served_and_load_in_zeep(cnss, certs, tmp_path):
    """GET /?wsdl serves the WSDL addressed to the host the client used, /cnss-fse.xsd its schema, and zeep loads the served pair."""
    wsdl = yield http(certs, cnss.url + "?wsdl", method=b"GET")
    xsd = yield http(certs, cnss.url + "cnss-fse.xsd", method=b"GET")
    assert wsdl.code == 200 and wsdl.headers["content-type"].startswith("text/xml")
    location = etree.fromstring(wsdl.body).find(".//{http://schemas.xmlsoap.org/wsdl/soap/}address")
    assert location.get("location") == cnss.url
    assert xsd.code == 200 and xsd.body == open(XSD_PATH, "rb").read()
    (tmp_path / "served.wsdl").write_bytes(wsdl.body)
    (tmp_path / "cnss-fse.xsd").write_bytes(xsd.body)
    client = zeep.Client(str(tmp_path / "served.wsdl"))
    assert sorted(client.service._binding._operations) == \
        ["ConsulterStatutFeuille", "SoumettreFeuilleDeSoins", "VerifierDroits"]
    hint = yield http(certs, cnss.url, method=b"GET")
    assert hint.code == 200 and b"?wsdl" in hint.body
    missing = yield http(certs, cnss.url + "autre", method=b"GET")
    assert missing.code == 404
    put = yield http(certs, cnss.url, b"x", method=b"PUT")
    assert put.code == 405


def test_the_shipped_wsdl_declares_the_three_operations_with_their_soap_actions():
    """The WSDL on disk binds each operation to SOAP 1.1 document/literal with its SOAPAction."""
    client = zeep.Client(WSDL_PATH)
    binding = client.service._binding
    assert {name: binding.get(name).soapaction for name in binding._operations} == {
        name: f"{NAMESPACE}#{name}"
        for name in ("VerifierDroits", "SoumettreFeuilleDeSoins", "ConsulterStatutFeuille")}


# -- eligibility -----------------------------------------------------------------------------

ELIGIBILITY = {
    # case: (who, day, rights open, motive, insured's immatriculation or None)
    "insured by immatriculation": ({"immatriculation": "112233445"}, date(2026, 1, 15), True, "DROITS_OUVERTS", "112233445"),
    "insured by CNIE": ({"cnie": "BK123456"}, date(2026, 1, 14), True, "DROITS_OUVERTS", "223344556"),
    "spouse by CNIE": ({"cnie": "BE654321"}, date(2026, 1, 15), True, "DROITS_OUVERTS", "112233445"),
    "unknown member": ({"immatriculation": "999999999"}, date(2026, 1, 15), False, "ASSURE_INCONNU", None),
    "unknown CNIE": ({"cnie": "ZZ999999"}, date(2026, 1, 15), False, "ASSURE_INCONNU", None),
    "rights ended": ({"immatriculation": "445566778"}, date(2026, 1, 15), False, "DROITS_FERMES", "445566778"),
    "before rights opened": ({"immatriculation": "334455667"}, date(2022, 11, 30), False, "DROITS_FERMES", "334455667"),
    "rights suspended": ({"cnie": "F778899"}, date(2026, 1, 15), False, "DROITS_SUSPENDUS", "556677889"),
}


@pytest.mark.parametrize("case", list(ELIGIBILITY))
@pytest_twisted.inlineCallbacks
def test_eligibility(case, cnss, certs):
    """VerifierDroits answers whether rights are open on the date, with the insured and dependants; an unknown member is a normal answer."""
    who, day, opened, motive, member = ELIGIBILITY[case]
    response = yield call(certs, cnss, "VerifierDroits", dateReference=day, **who)
    assert response.code == 200
    answer = read("VerifierDroits", response)
    assert (answer.droitsOuverts, answer.motif, answer.dateReference) == (opened, motive, day)
    if member is None:
        assert answer.assure is None and answer.ayantsDroit is None
    else:
        assert answer.assure.immatriculation == member


@pytest_twisted.inlineCallbacks
def test_eligibility_lists_the_beneficiaries_with_their_ids(cnss, certs):
    """The insured's dependants come with their rank, relationship and CNIE when they have one."""
    response = yield call(certs, cnss, "VerifierDroits", immatriculation="112233445", dateReference=date(2026, 3, 1))
    answer = read("VerifierDroits", response)
    assert answer.assure.cnie == "BE123456" and answer.assure.regime == "AMO_SALARIES"
    assert [(d.rang, d.lien, d.cnie) for d in answer.ayantsDroit.ayantDroit] == \
        [(1, "CONJOINT", "BE654321"), (2, "ENFANT", None), (3, "ENFANT", None)]


@pytest.mark.parametrize("day", ["2026-01-15Z", "2026-01-15+01:00", "2026-01-15-11:00"])
@pytest_twisted.inlineCallbacks
def test_eligibility_on_a_date_with_a_time_zone(day, cnss, certs):
    """xs:date may carry a time zone: the day is answered, not a soap:Server fault (which is retried)."""
    body = mutate(_set("fse:dateReference", day), "VerifierDroits",
                  immatriculation="112233445", dateReference=date(2026, 3, 1))
    response = yield http(certs, cnss.url, body)
    assert response.code == 200, response.body
    answer = read("VerifierDroits", response)
    assert (answer.droitsOuverts, answer.dateReference) == (True, date(2026, 1, 15))


@pytest.mark.parametrize("day", ["10000-01-01", "99999-01-01", "-0001-01-01"])
@pytest_twisted.inlineCallbacks
def test_eligibility_on_a_year_beyond_9999_or_before_1_is_a_client_fault(day, cnss, certs):
    """The schema takes such years; the peer says it cannot, as a soap:Client fault naming the element."""
    body = mutate(_set("fse:dateReference", day), "VerifierDroits",
                  immatriculation="112233445", dateReference=date(2026, 3, 1))
    fault = fault_of((yield http(certs, cnss.url, body)))
    assert (fault.code, fault.error, fault.element) == ("soap:Client", "SCHEMA", "dateReference"), fault


# -- submission, status, idempotency ----------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_submission_then_status_by_number_and_by_key(cnss, certs):
    """A care sheet is received with a number; its status is found by that number and by its key."""
    response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert response.code == 200
    answer = read("SoumettreFeuilleDeSoins", response)
    assert answer.statut == "RECUE" and answer.cleIdempotence == "cle-test-0001"
    assert answer.numeroDossier.startswith("FSE-") and answer.dateReception.tzinfo is not None
    by_number = yield call(certs, cnss, "ConsulterStatutFeuille", numeroDossier=answer.numeroDossier)
    by_key = yield call(certs, cnss, "ConsulterStatutFeuille", cleIdempotence="cle-test-0001")
    for status in (read("ConsulterStatutFeuille", by_number), read("ConsulterStatutFeuille", by_key)):
        assert (status.numeroDossier, status.statut, status.cleIdempotence) == \
            (answer.numeroDossier, "RECUE", "cle-test-0001")
    unknown = yield call(certs, cnss, "ConsulterStatutFeuille", cleIdempotence="cle-inconnue-1")
    fault = fault_of(unknown)
    assert (fault.code, fault.error) == ("soap:Client", "FEUILLE_INCONNUE")
    with pytest.raises(zeep.exceptions.Fault):
        read("ConsulterStatutFeuille", unknown)


@pytest_twisted.inlineCallbacks
def test_resubmission_with_the_same_key_and_content_keeps_one_care_sheet(cnss, certs):
    """The same key and content, even serialised differently, get the same answer bytes and leave one row."""
    first = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    again = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    pretty = etree.tostring(etree.fromstring(envelope("SoumettreFeuilleDeSoins", **care_sheet())),
                            pretty_print=True).replace(b"ns0:", b"fse:").replace(b"xmlns:ns0", b"xmlns:fse")
    reformatted = yield http(certs, cnss.url, pretty)
    assert first.code == again.code == reformatted.code == 200
    assert first.body == again.body == reformatted.body
    other = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet("cle-test-0002"))
    assert read("SoumettreFeuilleDeSoins", other).numeroDossier != \
        read("SoumettreFeuilleDeSoins", first).numeroDossier
    assert rows(cnss.store_path) == 2


@pytest_twisted.inlineCallbacks
def test_same_key_with_other_content_is_a_client_fault(cnss, certs):
    """Reusing a key for a different care sheet is refused and the first sheet stays alone."""
    yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet(dateSoins=date(2026, 1, 16)))
    fault = fault_of(response)
    assert (fault.code, fault.error, fault.element) == ("soap:Client", "CLE_REUTILISEE", "cleIdempotence")
    assert rows(cnss.store_path) == 1


@pytest_twisted.inlineCallbacks
def test_care_sheets_survive_a_restart_of_the_peer(certs, tmp_path):
    """After a restart on the same file, a re-sent sheet gets its first answer and numbering continues."""
    store = str(tmp_path / "cnss.sqlite")
    first_peer = yield start_peer(store, certs)
    first = yield call(certs, first_peer, "SoumettreFeuilleDeSoins", **care_sheet())
    yield first_peer.stop()
    second_peer = yield start_peer(store, certs)
    try:
        again = yield call(certs, second_peer, "SoumettreFeuilleDeSoins", **care_sheet())
        status = yield call(certs, second_peer, "ConsulterStatutFeuille", cleIdempotence="cle-test-0001")
        other = yield call(certs, second_peer, "SoumettreFeuilleDeSoins", **care_sheet("cle-test-0002"))
    finally:
        yield second_peer.stop()
    assert again.body == first.body
    number = read("SoumettreFeuilleDeSoins", first).numeroDossier
    assert read("ConsulterStatutFeuille", status).numeroDossier == number
    assert read("SoumettreFeuilleDeSoins", other).numeroDossier[-8:] == "00000002"
    assert rows(store) == 2
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- bad input -------------------------------------------------------------------------------

def mutate(edit, operation: str = "SoumettreFeuilleDeSoins", **fields) -> bytes:
    """A zeep-built envelope of `operation`, changed by `edit(operation element)`."""
    root = etree.fromstring(envelope(operation, **(fields or care_sheet())))
    edit(root.find("soap:Body", NS)[0])
    return etree.tostring(root, xml_declaration=True, encoding="utf-8", pretty_print=True)


def _set(path: str, value: str):
    def edit(op):
        op.find(path, NS).text = value
    return edit


def _remove(path: str):
    def edit(op):
        node = op.find(path, NS)
        node.getparent().remove(node)
    return edit


def _add(path: str, name: str, value: str = "x", attribute: bool = False):
    def edit(op):
        parent = op.find(path, NS) if path != "." else op
        if attribute:
            parent.set("inconnu", value)
        else:
            etree.SubElement(parent, f"{{{NAMESPACE}}}{name}").text = value
    return edit


def _many_lines(count: int):
    def edit(op):
        lines = op.find("fse:lignes", NS)
        line = lines[1]
        for _ in range(count - len(lines)):
            lines.append(etree.fromstring(etree.tostring(line)))
    return edit


def _act_in_drug_line(op):
    act = op.find("fse:lignes/fse:ligne[1]/fse:acte", NS)
    op.find("fse:lignes/fse:ligne[2]", NS).insert(1, etree.fromstring(etree.tostring(act)))


SCHEMA_VIOLATIONS = {
    # case: (edit, element path ending, words of the fault string)
    "quantity zero": (_set("fse:lignes/fse:ligne[2]/fse:quantite", "0"), "ligne[2]/quantite", "trop petite"),
    "amount with 3 decimals": (_set("fse:lignes/fse:ligne[1]/fse:montant", "250.005"), "ligne[1]/montant", "décimales"),
    "amount not a number": (_set("fse:lignes/fse:ligne[1]/fse:montant", "250,00"), "ligne[1]/montant", "type"),
    "negative amount": (_set("fse:lignes/fse:ligne[1]/fse:montant", "-1.00"), "ligne[1]/montant", "trop petite"),
    "immatriculation with letters": (_set("fse:assure/fse:immatriculation", "11223344A"), "assure/immatriculation", "format"),
    "CNIE in lower case": (_set("fse:assure/fse:cnie", "be123456"), "assure/cnie", "format"),
    "EAN-13 of 12 digits": (_set("fse:lignes/fse:ligne[2]/fse:codeEAN13", "611800123006"), "ligne[2]/codeEAN13", "format"),
    "unknown relationship": (_set("fse:beneficiaire/fse:lien", "COUSIN"), "beneficiaire/lien", "liste"),
    "unknown nomenclature": (_set("fse:lignes/fse:ligne[1]/fse:acte/fse:nomenclature", "CCAM"), "acte/nomenclature", "liste"),
    "impossible date": (_set("fse:dateSoins", "2026-02-30"), "dateSoins", "type"),
    "empty label": (_set("fse:lignes/fse:ligne[1]/fse:libelle", ""), "ligne[1]/libelle", "courte"),
    "short idempotency key": (_set("fse:cleIdempotence", "abc"), "cleIdempotence", "format"),
    "missing date of care": (_remove("fse:dateSoins"), "lignes", "attendu: dateSoins"),
    "missing facility": (_remove("fse:executant/fse:inpeEtablissement"), "executant/inpePraticien",
                         "attendu: inpeEtablissement"),
    "missing lines": (lambda op: [line.getparent().remove(line) for line in op.findall("fse:lignes/fse:ligne", NS)],
                      "lignes", "attendu: ligne"),
    "unknown element": (_add(".", "remise", "10.00"), "remise", "inattendu"),
    "unknown attribute": (_add("fse:lignes", "", attribute=True), "lignes", "attribut"),
    "line with both act and drug": (_act_in_drug_line, "ligne[2]/acte", "inattendu"),
    "501 lines": (_many_lines(501), "ligne[501]", "inattendu"),
}


@pytest.mark.parametrize("case", list(SCHEMA_VIOLATIONS))
@pytest_twisted.inlineCallbacks
def test_schema_violations_are_client_faults_naming_line_and_element(case, cnss, certs):
    """Each kind of XSD violation is a soap:Client SCHEMA fault with the line and element, and stores nothing."""
    edit, element, words = SCHEMA_VIOLATIONS[case]
    response = yield http(certs, cnss.url, mutate(edit))
    fault = fault_of(response)
    assert (fault.code, fault.error) == ("soap:Client", "SCHEMA"), fault
    assert fault.element.endswith(element), fault
    assert words in fault.string and int(fault.line) > 1, fault
    assert f"ligne {fault.line}" in fault.string
    assert rows(cnss.store_path) == 0


RULE_VIOLATIONS = {
    # case: (edit, fault code, element)
    "EAN-13 check digit wrong": (_set("fse:lignes/fse:ligne[2]/fse:codeEAN13", "6118001230069"),
                                 "EAN13_INVALIDE", "codeEAN13"),
    "insured not identified": (lambda op: [_remove("fse:assure/fse:immatriculation")(op),
                                           _remove("fse:assure/fse:cnie")(op)], "SCHEMA", "assure"),
    "act without amount": (lambda op: [_remove("fse:lignes/fse:ligne[1]/fse:montant")(op)],
                           "ACTE_SANS_MONTANT", "montant"),
    "amount is not quantity x unit price": (_set("fse:lignes/fse:ligne[1]/fse:montant", "240.00"),
                                            "MONTANT_INCOHERENT", "montant"),
    "total with a line without amount": (_add(".", "montantTotal", "250.00"), "MONTANT_INCOHERENT", "montantTotal"),
}


@pytest.mark.parametrize("case", list(RULE_VIOLATIONS))
@pytest_twisted.inlineCallbacks
def test_rules_beyond_the_schema_are_client_faults(case, cnss, certs):
    """Check digit, identification and amount rules give their own soap:Client fault codes."""
    edit, error, element = RULE_VIOLATIONS[case]
    response = yield http(certs, cnss.url, mutate(edit))
    fault = fault_of(response)
    assert (fault.code, fault.error, fault.element) == ("soap:Client", error, element), fault
    assert rows(cnss.store_path) == 0


def _prescription_line(rank: str):
    def edit(op):
        reference = etree.SubElement(op.find("fse:lignes/fse:ligne[2]", NS), f"{{{NAMESPACE}}}prescription")
        for name, value in [("numero", "ORD-2026-000123"), ("ligne", rank), ("cleLigne", "cle-ligne-0001")]:
            etree.SubElement(reference, f"{{{NAMESPACE}}}{name}").text = value
    return edit


@pytest.mark.parametrize("rank", ["1" + "0" * 30, "1" + "0" * 5000])
@pytest_twisted.inlineCallbacks
def test_a_prescription_line_rank_too_large_to_store_is_a_client_fault(rank, cnss, certs):
    """xs:positiveInteger is unbounded: a rank beyond 64 bits is refused as the caller's error,
    not a soap:Server fault that the gateway would retry for ever."""
    fault = fault_of((yield http(certs, cnss.url, mutate(_prescription_line(rank)))))
    assert (fault.code, fault.error, fault.element) == ("soap:Client", "SCHEMA", "ligne"), fault
    assert rows(cnss.store_path) == 0
    stored = yield http(certs, cnss.url, mutate(_prescription_line("+" + "0" * 5000 + "1")))
    assert read("SoumettreFeuilleDeSoins", stored).statut == "RECUE"
    with sqlite3.connect(cnss.store_path) as db:
        assert db.execute("SELECT ligne FROM lignes_prescription").fetchall() == [(1,)]


@pytest_twisted.inlineCallbacks
def test_a_total_that_is_not_the_sum_of_the_lines_is_refused(cnss, certs):
    """montantTotal must equal the sum of the line amounts, which must all be given."""
    sheet = care_sheet(montantTotal=Decimal("250.00"))
    sheet["lignes"]["ligne"] = sheet["lignes"]["ligne"][:1] * 2
    wrong = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **sheet)
    assert fault_of(wrong).error == "MONTANT_INCOHERENT"
    sheet["montantTotal"] = Decimal("500.00")
    right = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **sheet)
    assert right.code == 200


def _xxe_probe() -> bytes:
    if os.path.exists(CORPUS_XXE):
        return open(CORPUS_XXE, "rb").read()
    return (b'<?xml version="1.0"?><!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
            b'<foo>&xxe;</foo>')


SOAP_OPEN = f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body>'.encode()
SOAP_CLOSE = b"</s:Body></s:Envelope>"
STATUS = f'<f:ConsulterStatutFeuille xmlns:f="{NAMESPACE}"><f:cleIdempotence>cle-test-0001</f:cleIdempotence></f:ConsulterStatutFeuille>'.encode()

BAD_INPUTS = {
    # case: (body, faultcode, error code, words of the fault string)
    "empty body": (b"", "soap:Client", "XML_INVALIDE", "vide"),
    "not XML": (b"MSH|^~\\&|SIH|CHU\r", "soap:Client", "XML_INVALIDE", "mal formé"),
    "truncated XML": (SOAP_OPEN + STATUS[:40], "soap:Client", "XML_INVALIDE", "ligne 1"),
    "binary garbage": (bytes(range(256)), "soap:Client", "XML_INVALIDE", "mal formé"),
    "XXE probe (external entity)": (
        b'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        + SOAP_OPEN.replace(b"<s:Body>", b"<s:Body>&xxe;") + STATUS + SOAP_CLOSE,
        "soap:Client", "DTD_INTERDITE", "DOCTYPE"),
    "XXE probe from the corpus": (_xxe_probe(), "soap:Client", "DTD_INTERDITE", "DOCTYPE"),
    "billion laughs": (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                   for i in range(1, 10))
        + b"]><lolz>&lol9;</lolz>", "soap:Client", "DTD_INTERDITE", "DOCTYPE"),
    "SOAP 1.2 envelope": (
        b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body>' + STATUS + b"</e:Body></e:Envelope>",
        "soap:VersionMismatch", "ENVELOPPE_INVALIDE", "SOAP 1.2"),
    "bare operation without envelope": (STATUS, "soap:Client", "ENVELOPPE_INVALIDE", "soap:Envelope"),
    "envelope without body": (f'<s:Envelope xmlns:s="{SOAP_ENV}"/>'.encode(),
                              "soap:Client", "ENVELOPPE_INVALIDE", "soap:Body"),
    "two operations in the body": (SOAP_OPEN + STATUS + STATUS + SOAP_CLOSE,
                                   "soap:Client", "ENVELOPPE_INVALIDE", "exactement un"),
    "text in the body": (SOAP_OPEN + b"bonjour" + STATUS + SOAP_CLOSE,
                         "soap:Client", "ENVELOPPE_INVALIDE", "texte"),
    "unknown operation": (SOAP_OPEN + f'<f:AnnulerFeuille xmlns:f="{NAMESPACE}"/>'.encode() + SOAP_CLOSE,
                          "soap:Client", "OPERATION_INCONNUE", "AnnulerFeuille"),
    "operation in another namespace": (SOAP_OPEN + b'<f:ConsulterStatutFeuille xmlns:f="urn:autre"/>' + SOAP_CLOSE,
                                       "soap:Client", "OPERATION_INCONNUE", "ConsulterStatutFeuille"),
    "header block that must be understood": (
        f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Header><w:Security xmlns:w="urn:wsse" s:mustUnderstand="1"/>'
        f"</s:Header><s:Body>".encode() + STATUS + SOAP_CLOSE,
        "soap:MustUnderstand", "ENVELOPPE_INVALIDE", "Security"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest_twisted.inlineCallbacks
def test_malformed_and_hostile_requests_get_precise_faults(case, cnss, certs):
    """Not XML, DOCTYPE and entity probes, wrong envelopes and unknown operations each get their fault; nothing is resolved or stored."""
    body, code, error, words = BAD_INPUTS[case]
    response = yield http(certs, cnss.url, body)
    fault = fault_of(response)
    assert (fault.code, fault.error) == (code, error), fault
    assert words in fault.string, fault
    assert b"root:" not in response.body and b"lollol" not in response.body
    assert rows(cnss.store_path) == 0


@pytest_twisted.inlineCallbacks
def test_a_request_that_is_not_text_xml_is_refused(cnss, certs):
    """SOAP 1.1 travels as text/xml; another content type is a Client fault."""
    response = yield http(certs, cnss.url, envelope("ConsulterStatutFeuille", cleIdempotence="cle-test-0001"),
                          headers={"content-type": "application/json"})
    assert fault_of(response).error == "ENVELOPPE_INVALIDE"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest_twisted.inlineCallbacks
def test_oversize_requests_are_refused_without_being_kept(chunked, certs, tmp_path):
    """A body over the limit, announced or streamed, is a TAILLE_EXCESSIVE fault; a body under it passes."""
    running = yield start_peer(str(tmp_path / "cnss.sqlite"), certs, max_request_bytes=20_000)
    try:
        padding = b"<!--" + b"x" * 30_000 + b"-->"
        big = envelope("ConsulterStatutFeuille", cleIdempotence="cle-test-0001") + padding
        response = yield http(certs, running.url, big, chunked=chunked)
        fault = fault_of(response)
        assert (fault.code, fault.error) == ("soap:Client", "TAILLE_EXCESSIVE")
        small = yield http(certs, running.url, envelope("VerifierDroits", cnie="BE123456",
                                                        dateReference=date(2026, 1, 1)), chunked=chunked)
        assert small.code == 200
    finally:
        yield running.stop()


# -- access control --------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["", "?wsdl", "_sandbox/faults"])
@pytest_twisted.inlineCallbacks
def test_a_facility_certificate_from_the_same_ca_is_refused(path, cnss, certs):
    """Only the gateway's certificate is accepted: a facility's, though valid, gets ACCES_REFUSE on every path."""
    body = envelope("VerifierDroits", cnie="BE123456", dateReference=date(2026, 1, 1)) if not path else None
    response = yield http(certs, cnss.url + path, body, method=b"POST" if body else b"GET", who="INPE-100001")
    fault = fault_of(response)
    assert (fault.code, fault.error) == ("soap:Client", "ACCES_REFUSE")
    assert "accès refusé" in fault.string


@pytest.mark.parametrize("who", ["none", "stranger"], ids=["no certificate", "certificate of another CA"])
@pytest_twisted.inlineCallbacks
def test_clients_without_a_certificate_of_our_ca_cannot_connect(who, cnss, certs):
    """The TLS handshake fails for a client with no certificate or one from another CA."""
    with pytest.raises(Exception) as failure:
        yield http(certs, cnss.url, envelope("VerifierDroits", cnie="BE123456", dateReference=date(2026, 1, 1)),
                   who=who)
    text = repr(failure.value)
    assert "SSL" in text or "ResponseNeverReceived" in text or "ConnectionLost" in text, text


# -- fault injection -------------------------------------------------------------------------

@defer.inlineCallbacks
def set_fault(certs, running, **plan):
    import json
    response = yield http(certs, running.url + "_sandbox/faults", json.dumps(plan).encode(), method=b"PUT",
                          headers={"content-type": "application/json"})
    assert response.code == 200, response
    return response


@pytest_twisted.inlineCallbacks
def test_soap_fault_mode_answers_a_server_fault_then_recovers(cnss, certs):
    """soap_fault gives a soap:Server fault for `count` requests, then the peer answers normally."""
    yield set_fault(certs, cnss, mode="soap_fault", count=1)
    faulted = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    fault = fault_of(faulted)
    assert (fault.code, fault.error) == ("soap:Server", "SERVICE_INDISPONIBLE")
    assert rows(cnss.store_path) == 0
    normal = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert normal.code == 200
    plan = yield http(certs, cnss.url + "_sandbox/faults", method=b"GET")
    assert b'"mode": "none"' in plan.body


@pytest_twisted.inlineCallbacks
def test_http_500_mode_answers_a_soap_server_fault(cnss, certs):
    """http_500 answers status 500 with a soap:Server fault body."""
    yield set_fault(certs, cnss, mode="http_500", count=1)
    response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    fault = fault_of(response)
    assert (fault.code, fault.error) == ("soap:Server", "ERREUR_INTERNE")
    assert rows(cnss.store_path) == 0


@pytest_twisted.inlineCallbacks
def test_http_503_mode_answers_plain_text(cnss, certs):
    """http_503 answers 503 in plain text, as a proxy in front of the service would, until cleared."""
    yield set_fault(certs, cnss, mode="http_503")
    for _ in range(2):
        response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
        assert response.code == 503 and response.headers["content-type"].startswith("text/plain")
    cleared = yield http(certs, cnss.url + "_sandbox/faults", method=b"DELETE")
    assert cleared.code == 200
    response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert response.code == 200


@pytest_twisted.inlineCallbacks
def test_http_400_mode_answers_a_client_fault(cnss, certs):
    """http_400 answers status 400 with a soap:Client fault: a refusal, nothing stored."""
    yield set_fault(certs, cnss, mode="http_400", count=1)
    response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert response.code == 400
    root = etree.fromstring(response.body)
    assert root.findtext("soap:Body/soap:Fault/faultcode", namespaces=NS) == "soap:Client"
    assert root.findtext("soap:Body/soap:Fault/detail/fse:Erreur/fse:code", namespaces=NS) == "REQUETE_REFUSEE"
    assert rows(cnss.store_path) == 0


@pytest_twisted.inlineCallbacks
def test_drop_answer_mode_keeps_the_sheet_and_a_retry_gets_its_answer(cnss, certs):
    """drop_answer stores the care sheet but loses the answer; the retry with the same key gets it, one row."""
    yield set_fault(certs, cnss, mode="drop_answer", count=1)
    with pytest.raises(Exception):
        yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert rows(cnss.store_path) == 1
    retry = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert read("SoumettreFeuilleDeSoins", retry).numeroDossier.endswith("00000001")
    assert rows(cnss.store_path) == 1


@pytest_twisted.inlineCallbacks
def test_down_mode_drops_the_connection(cnss, certs):
    """down closes the connection without an answer and stores nothing."""
    yield set_fault(certs, cnss, mode="down", count=1)
    with pytest.raises(Exception) as failure:
        yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert "ResponseNeverReceived" in repr(failure.value) or "ConnectionLost" in repr(failure.value)
    assert rows(cnss.store_path) == 0


@pytest_twisted.inlineCallbacks
def test_slow_mode_delays_the_answer(cnss, certs):
    """slow answers normally after the delay."""
    yield set_fault(certs, cnss, mode="slow", delay=0.3, count=1)
    started = reactor.seconds()
    response = yield call(certs, cnss, "SoumettreFeuilleDeSoins", **care_sheet())
    assert response.code == 200 and reactor.seconds() - started >= 0.3


@pytest_twisted.inlineCallbacks
def test_a_bad_fault_plan_is_refused(cnss, certs):
    """The control path answers 400 to a plan it does not understand."""
    response = yield http(certs, cnss.url + "_sandbox/faults", b'{"mode": "fire"}', method=b"PUT",
                          headers={"content-type": "application/json"})
    assert response.code == 400 and b"mode must be one of" in response.body


@pytest.mark.parametrize("delay", [b"NaN", b"Infinity", b"1e400"])
@pytest_twisted.inlineCallbacks
def test_a_delay_that_is_not_a_finite_number_is_refused(delay, cnss, certs):
    """Python's json reads NaN and Infinity: such a delay is refused, not kept (it would never
    answer, and the plan would be read back as NaN, which is not JSON)."""
    response = yield http(certs, cnss.url + "_sandbox/faults", b'{"mode": "slow", "delay": ' + delay + b"}",
                          method=b"PUT", headers={"content-type": "application/json"})
    assert response.code == 400 and b"delay must be a finite number" in response.body
    plan = yield http(certs, cnss.url + "_sandbox/faults", method=b"GET")
    assert json.loads(plan.body)["mode"] == "none"


# -- internal errors -------------------------------------------------------------------------

def test_an_internal_error_is_a_server_fault(tmp_path):
    """A store that cannot be opened makes a soap:Server ERREUR_INTERNE fault, not a crash."""
    service = CnssService(CareSheetStore(str(tmp_path)))  # a directory: SQLite cannot open it
    status, body = service.handle(envelope("SoumettreFeuilleDeSoins", **care_sheet()),
                                  datetime(2026, 1, 15, 9, 30, tzinfo=timezone.utc))
    assert status == 500
    fault = fault_of(HttpResponse(status, {"content-type": "text/xml; charset=utf-8"}, body))
    assert (fault.code, fault.error) == ("soap:Server", "ERREUR_INTERNE")

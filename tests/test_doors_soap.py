"""The SOAP door (/soap/) over real mutual TLS: zeep as a real client (WSDL fetched from the
door, requests session with the facility's certificate), the imaging report with its PDF,
rights, and hostile or malformed XML answered with SOAP faults."""
from __future__ import annotations

import base64
import json
from xml.sax.saxutils import escape

import pytest
import pytest_twisted
import requests
import zeep
from lxml import etree
from twisted.internet import reactor, task, threads

from adapters.soap.gateway import NAMESPACE
from doors_support import (HOSPITAL, IMAGING, LAB, PHARMACY, STRANGER, Client, door_config, hl7, rows,
                           start_door, stop_door, with_listener)
from gateway.doors.soap import SoapDoor
from gateway.doors.store import api_refusals
from gateway.mapping.mapping_set import MappingSet
from gateway.store.schema import messages, translations

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
NS = {"soap": SOAP_ENV, "gw": NAMESPACE}
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


@pytest.fixture
def door(pki, tmp_path, repo_mappings, monkeypatch):
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    config = door_config(pki, f"sqlite:///{tmp_path / 'gateway.sqlite'}")
    running = pytest_twisted.blockon(start_door(config, pki))
    yield running
    pytest_twisted.blockon(stop_door(running))


def zeep_client(door, who: str) -> zeep.Client:
    """zeep over requests with `who`'s certificate, trusting only the dev CA; the WSDL and its
    XSD are fetched from the door."""
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would replace `verify`; no proxies either
    session.cert = (door.path(f"{who}.crt"), door.path(f"{who}.key"))
    session.verify = door.path("ca.crt")
    settings = zeep.Settings(strict=True, forbid_dtd=True, forbid_entities=True, xml_huge_tree=False)
    return zeep.Client(f"{door.base}/soap/?wsdl", transport=zeep.Transport(session=session, timeout=10),
                       settings=settings)


def call(door, who: str, operation: str, **arguments):
    """One zeep call, in a thread (zeep blocks; the reactor serves the door meanwhile)."""
    def run():
        client = zeep_client(door, who)
        return getattr(client.service, operation)(**arguments)

    return threads.deferToThread(run)


def report(**changes) -> dict:
    data = dict(
        reportId="CR-2026-0042",
        patient={"identifier": [{"system": "urn:ma:cnie", "value": "BK123456"}],
                 "familyName": "Ouazzani", "givenName": ["Youssef"], "birthDate": "1971-06-02",
                 "gender": "male"},
        prescriptionId="RX-7K2M9QF",
        examination={"display": "IRM cérébrale", "code": "ZZQN001", "system": "urn:ma:ccam"},
        status="final", text="Pas d'anomalie décelable. Conclusion: examen normal.",
        pdf={"_value_1": PDF, "title": "compte rendu"})
    data.update(changes)
    return data


# -- zeep round trips ------------------------------------------------------------------------

@pytest_twisted.inlineCallbacks
def test_zeep_submits_an_hl7_message_and_gets_the_ack(door):
    """zeep loads the served WSDL and XSD; SubmitHL7Message stores the message and answers AA with its id."""
    text = hl7("SOAP-1").decode("utf-8")
    answer = yield call(door, HOSPITAL.id, "SubmitHL7Message", message=text)
    assert answer.ackCode == "AA" and "\rMSA|AA|SOAP-1" in answer.acknowledgement
    [row] = rows(door, messages, messages.c.control_id == "SOAP-1")
    assert answer.messageId == row.id and row.sender_id == HOSPITAL.id and bytes(row.raw) == text.encode()


@pytest_twisted.inlineCallbacks
def test_zeep_refused_hl7_is_an_answer_not_a_fault(door):
    """A pharmacy's ADT through SOAP: an ordinary answer with the AR ACK, stored as refused."""
    text = hl7("SOAP-PH", application="PHARMA_AGDAL", facility="PHARM_AGDAL").decode()
    answer = yield call(door, PHARMACY.id, "SubmitHL7Message", message=text)
    assert answer.ackCode == "AR" and "pharmacy" in answer.acknowledgement
    assert [r.status for r in rows(door, messages, messages.c.control_id == "SOAP-PH")] == ["rejected"]


@pytest_twisted.inlineCallbacks
def test_zeep_submits_an_imaging_report_with_its_pdf(door):
    """SubmitReport becomes a canonical Patient and DiagnosticReport whose presentedForm holds
    the PDF's exact bytes; the answer names the message and the report."""
    answer = yield call(door, IMAGING.id, "SubmitReport", **report())
    assert answer.status == "translated" and answer.diagnosticReport.startswith("DiagnosticReport/")
    [row] = rows(door, messages, messages.c.format == "soap-report")
    assert answer.messageId == row.id and row.sender_id == IMAGING.id and row.message_type == "SOAP^REPORT"
    [translation] = rows(door, translations, translations.c.message_id == row.id)
    resources = {e["resource"]["resourceType"]: e["resource"] for e in json.loads(translation.bundle)["entry"]}
    diagnostic, patient = resources["DiagnosticReport"], resources["Patient"]
    assert answer.diagnosticReport == f"DiagnosticReport/{diagnostic['id']}"
    [pdf] = [form for form in diagnostic["presentedForm"] if form["contentType"] == "application/pdf"]
    assert base64.b64decode(pdf["data"]) == PDF and pdf["title"] == "compte rendu"
    assert diagnostic["subject"]["reference"] == f"urn:uuid:{patient['id']}"
    assert diagnostic["basedOn"] == [{"identifier": {"system": "urn:ma:hie:prescription", "value": "RX-7K2M9QF"}}]
    assert diagnostic["code"]["text"] == "IRM cérébrale" and patient["identifier"][0]["value"] == "BK123456"
    again = yield call(door, IMAGING.id, "SubmitReport", **report())
    assert again.messageId == row.id  # the same report sent again is not stored twice


@pytest_twisted.inlineCallbacks
def test_a_report_whose_pdf_is_larger_than_libxml2s_text_limit_is_taken(door):
    """A PDF of 8 MB is 10.7 million characters of base64, over libxml2's default limit on one
    text node (10 million), under the door's body limit (16 MiB): stored with its exact bytes,
    not refused as invalid XML."""
    big = PDF[:-6] + b"%" + bytes(range(256)) * (8 * 1024 * 4) + b"\n%%EOF\n"
    answer = yield call(door, IMAGING.id, "SubmitReport", **report(pdf={"_value_1": big, "title": "scan"}))
    assert answer.status == "translated"
    [translation] = rows(door, translations, translations.c.message_id == answer.messageId)
    [diagnostic] = [e["resource"] for e in json.loads(translation.bundle)["entry"]
                    if e["resource"]["resourceType"] == "DiagnosticReport"]
    [pdf] = [form for form in diagnostic["presentedForm"] if form["contentType"] == "application/pdf"]
    assert base64.b64decode(pdf["data"]) == big


@pytest_twisted.inlineCallbacks
def test_report_with_a_pdf_that_is_not_one_is_a_client_fault(door):
    """Base64 that does not decode to a PDF: soap:Client INVALID_PDF, nothing stored."""
    with pytest.raises(zeep.exceptions.Fault) as fault:
        yield call(door, IMAGING.id, "SubmitReport", **report(pdf={"_value_1": b"just text"}))
    assert fault.value.code.endswith("Client") and "PDF" in fault.value.message
    assert not rows(door, messages, messages.c.format == "soap-report")


@pytest_twisted.inlineCallbacks
def test_laboratory_may_not_submit_reports(door):
    """SubmitReport needs reports.submit: a laboratory gets soap:Client ACCESS_DENIED, and the refusal is kept."""
    with pytest.raises(zeep.exceptions.Fault) as fault:
        yield call(door, LAB.id, "SubmitReport", **report())
    assert fault.value.code.endswith("Client")
    assert fault.value.detail.find("gw:Error/gw:code", NS).text == "ACCESS_DENIED"
    [refusal] = rows(door, api_refusals)
    assert (refusal.status, refusal.facility_id, refusal.door, refusal.operation) == (403, LAB.id, "soap", "reports.submit")


# -- raw requests: the contract, hostile and malformed XML ---------------------------------

def envelope(body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap="{SOAP_ENV}" '
            f'xmlns:gw="{NAMESPACE}"><soap:Body>{body}</soap:Body></soap:Envelope>').encode()


def fault_of(answer) -> tuple[str, str]:
    root = etree.fromstring(answer.body)
    fault = root.find("soap:Body/soap:Fault", NS)
    return fault.findtext("faultcode"), fault.find("detail/gw:Error/gw:code", NS).text


XXE = (b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
       b'<soap:Envelope xmlns:soap="' + SOAP_ENV.encode() + b'"><soap:Body>'
       b'<gw:SubmitHL7Message xmlns:gw="' + NAMESPACE.encode() + b'"><gw:message>&x;</gw:message>'
       b'</gw:SubmitHL7Message></soap:Body></soap:Envelope>')
LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "%s">' % (n, (b"&lol%d;" % (n - 1) if n > 1 else b"&lol;") * 10)
                     for n in range(1, 10))
          + b']><soap:Envelope xmlns:soap="' + SOAP_ENV.encode() + b'"><soap:Body><m>&lol9;</m></soap:Body></soap:Envelope>')


@pytest.mark.parametrize("body, code, error", [
    (XXE, "soap:Client", "DTD_FORBIDDEN"),
    (LAUGHS, "soap:Client", "DTD_FORBIDDEN"),
    (b"<soap:Envelope xmlns:soap='" + SOAP_ENV.encode() + b"'><soap:Body>", "soap:Client", "INVALID_XML"),
    (envelope("<gw:SubmitReport><gw:text>x</gw:text></gw:SubmitReport>"), "soap:Client", "SCHEMA_INVALID"),
    (envelope("<gw:Unknown/>"), "soap:Client", "SCHEMA_INVALID"),
    (b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"><e:Body/></e:Envelope>',
     "soap:VersionMismatch", "INVALID_ENVELOPE"),
], ids=["xxe", "billion-laughs", "truncated", "schema", "unknown-operation", "soap12"])
@pytest_twisted.inlineCallbacks
def test_hostile_and_malformed_requests_are_faults(door, body, code, error):
    """Each gets a SOAP 1.1 fault (HTTP 500) with a precise code; nothing is stored."""
    answer = yield Client(door, HOSPITAL.id).post("/soap/", body, "text/xml; charset=utf-8")
    assert answer.code == 500 and answer.header("content-type").startswith("text/xml")
    assert fault_of(answer) == (code, error)
    assert b"passwd" not in answer.body and b"lollol" not in answer.body
    assert not rows(door, messages)



@pytest_twisted.inlineCallbacks
def test_a_comment_inside_a_value_does_not_cut_it(door):
    """lxml's .text stops at a comment: an HL7 message with one in its PID was stored cut there
    and acknowledged AA, a report's patient identifier BK12<!-- -->3456 was read as BK12 and its
    PDF cut in two. Comments carry no data: the text around them is read whole."""
    text = hl7("SOAP-CMT").decode("utf-8")
    message = escape(text).replace("Benali", "Ben<!-- n -->ali")
    answer = yield Client(door, HOSPITAL.id).post("/soap/", envelope(
        f"<gw:SubmitHL7Message><gw:message>{message}</gw:message></gw:SubmitHL7Message>"), "text/xml")
    assert answer.code == 200 and b"<gw:ackCode>AA</gw:ackCode>" in answer.body
    [row] = rows(door, messages, messages.c.control_id == "SOAP-CMT")
    assert bytes(row.raw) == text.encode("utf-8")

    pdf = base64.b64encode(PDF).decode("ascii")
    answer = yield Client(door, IMAGING.id).post("/soap/", envelope(
        "<gw:SubmitReport><gw:reportId>CR-CMT</gw:reportId><gw:patient><gw:identifier>"
        "<gw:system>urn:ma:cnie</gw:system><gw:value>BK12<!-- c -->3456</gw:value></gw:identifier>"
        "</gw:patient><gw:examination><gw:display>IRM<!-- c --> cérébrale</gw:display></gw:examination>"
        f"<gw:text>Examen normal.</gw:text><gw:pdf>{pdf[:40]}<!-- c -->{pdf[40:]}</gw:pdf></gw:SubmitReport>"),
        "text/xml")
    assert answer.code == 200 and b"<gw:status>translated</gw:status>" in answer.body
    [row] = rows(door, messages, messages.c.format == "soap-report")
    [translation] = rows(door, translations, translations.c.message_id == row.id)
    resources = {e["resource"]["resourceType"]: e["resource"] for e in json.loads(translation.bundle)["entry"]}
    assert resources["Patient"]["identifier"][0]["value"] == "BK123456"
    assert resources["DiagnosticReport"]["code"]["text"] == "IRM cérébrale"
    [form] = [f for f in resources["DiagnosticReport"]["presentedForm"] if f["contentType"] == "application/pdf"]
    assert base64.b64decode(form["data"]) == PDF


@pytest_twisted.inlineCallbacks
def test_a_content_type_charset_the_xml_declaration_contradicts_is_a_fault(door):
    """The parser reads the XML declaration: a UTF-8 body declared ISO-8859-1 but sent as
    charset=utf-8 was stored with Bénali as BÃ©nali and acknowledged AA. Now the two labels
    must agree (a soap:Client fault, nothing stored); agreeing ones read the name whole."""
    def request(control_id: str, declared: str, encoding: str) -> bytes:
        message = escape(hl7(control_id, body="PID|1||P-1^^^CHU^PI||Bénali^Karim||19800101|M").decode("utf-8"))
        return envelope(f"<gw:SubmitHL7Message><gw:message>{message}</gw:message></gw:SubmitHL7Message>"
                        ).replace(b'encoding="UTF-8"', f'encoding="{declared}"'.encode()).decode().encode(encoding)

    client = Client(door, HOSPITAL.id)
    answer = yield client.post("/soap/", request("CS-LIE", "ISO-8859-1", "utf-8"), "text/xml; charset=utf-8")
    assert fault_of(answer) == ("soap:Client", "CHARSET_MISMATCH"), answer.body
    assert not rows(door, messages)
    for control_id, declared, charset in (("CS-LATIN", "ISO-8859-1", "latin1"), ("CS-UTF8", "utf8", "UTF-8")):
        answer = yield client.post("/soap/", request(control_id, declared, charset), f'text/xml; charset="{charset}"')
        assert answer.code == 200 and b"<gw:ackCode>AA</gw:ackCode>" in answer.body, answer.body
        [row] = rows(door, messages, messages.c.control_id == control_id)
        assert "Bénali".encode("utf-8") in bytes(row.raw)


@pytest_twisted.inlineCallbacks
def test_a_request_not_answered_in_time_is_a_server_fault(pki, tmp_path, repo_mappings, monkeypatch):
    """Past request_timeout the door answered a SOAP client with a 503 problem+json, which no
    SOAP client reads as a fault: now soap:Server REQUEST_TIMEOUT, send it again later."""
    monkeypatch.setattr(MappingSet, "load", classmethod(lambda cls, directory: repo_mappings))
    handle = SoapDoor.handle

    async def slow(self, *arguments):
        await task.deferLater(reactor, 0.6, lambda: None)
        return await handle(self, *arguments)

    monkeypatch.setattr(SoapDoor, "handle", slow)
    config = with_listener(door_config(pki, f"sqlite:///{tmp_path / 'gateway.sqlite'}"), request_timeout=0.3)
    door = yield start_door(config, pki)
    try:
        message = escape(hl7("SOAP-SLOW").decode("utf-8"))
        answer = yield Client(door, HOSPITAL.id).post("/soap/", envelope(
            f"<gw:SubmitHL7Message><gw:message>{message}</gw:message></gw:SubmitHL7Message>"), "text/xml")
        assert answer.code == 500 and answer.header("content-type").startswith("text/xml"), answer.body
        assert fault_of(answer) == ("soap:Server", "REQUEST_TIMEOUT")
        yield task.deferLater(reactor, 0.6, lambda: None)  # the work goes on, and ends
    finally:
        yield stop_door(door)

@pytest_twisted.inlineCallbacks
def test_contract_is_served_and_strangers_are_refused(door):
    """GET /soap/?wsdl addresses the WSDL to the host used, /soap/gateway.xsd is the schema;
    an unknown certificate gets a fault on POST and 401 on the contract; a wrong media type is a fault."""
    client = Client(door, HOSPITAL.id)
    wsdl = yield client.get("/soap/?wsdl")
    assert wsdl.code == 200 and f'location="https://127.0.0.1:{door.port}/soap/"'.encode() in wsdl.body
    xsd = yield client.get("/soap/gateway.xsd")
    assert xsd.code == 200 and b"SubmitReport" in xsd.body
    plain = yield client.post("/soap/", envelope("<gw:SubmitHL7Message/>"), "application/json")
    assert fault_of(plain) == ("soap:Client", "INVALID_ENVELOPE")
    stranger = Client(door, STRANGER)
    refused = yield stranger.post("/soap/", envelope("<gw:SubmitHL7Message/>"), "text/xml")
    assert fault_of(refused) == ("soap:Client", "UNKNOWN_CERTIFICATE")
    contract = yield stranger.get("/soap/?wsdl")
    assert contract.code == 401
    assert [(r.status, r.door) for r in rows(door, api_refusals)] == [(401, "soap")] * 2

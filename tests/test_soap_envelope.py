"""The shared SOAP 1.1 envelope code (adapters/soap/envelope.py): one hardening for both
contracts, which differ only in their words and fault detail. Pure: no reactor, no sockets."""
from __future__ import annotations

import pytest
from lxml import etree

from adapters.soap import envelope
from adapters.soap.gateway import envelope as gateway
from gateway.sandbox.cnss import soap as cnss

ENV = b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
HOSTILE = {
    "empty": (b" \n", "invalid_xml"),
    "doctype after BOM and comment": (b'\xef\xbb\xbf<!-- c --><!DOCTYPE x><x/>', "dtd_forbidden"),
    "doctype in UTF-16": ('<?xml version="1.0" encoding="utf-16"?><!DOCTYPE x><x/>'.encode("utf-16"),
                          "dtd_forbidden"),
    "truncated": (ENV + b"<s:Body><op>", "invalid_xml"),
    "SOAP 1.2": (b'<e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope"/>', "invalid_envelope"),
    "two operations": (ENV + b"<s:Body><a/><b/></s:Body></s:Envelope>", "invalid_envelope"),
    "text in Body": (ENV + b"<s:Body>x<a/></s:Body></s:Envelope>", "invalid_envelope"),
    "mustUnderstand header": (ENV + b'<s:Header><h s:mustUnderstand="1"/></s:Header>'
                              b"<s:Body><a/></s:Body></s:Envelope>", "invalid_envelope"),
}


@pytest.mark.parametrize("contract", [gateway, cnss], ids=["gateway", "cnss"])
@pytest.mark.parametrize("case", HOSTILE)
def test_both_contracts_refuse_the_same_envelopes_each_with_its_own_code(contract, case):
    """Every hostile envelope is a fault in both contracts, with the code the contract's words name."""
    body, code = HOSTILE[case]
    with pytest.raises(envelope.SoapFault) as raised:
        contract.parse_request(body)
    assert raised.value.error == getattr(contract.WORDS, code)


def test_mandatory_header_for_another_actor_is_not_ours_to_understand():
    """SOAP 1.1 4.2.2-4.2.3: mustUnderstand binds the block's actor. A block for another node
    is passed over; one with no actor, or for 'next', is ours and still faults."""
    ours = (ENV + b'<s:Header><h s:mustUnderstand="1" s:actor="http://schemas.xmlsoap.org/soap/'
            b'actor/next"/></s:Header><s:Body><a/></s:Body></s:Envelope>')
    with pytest.raises(envelope.SoapFault) as raised:
        gateway.parse_request(ours)
    assert raised.value.code == "MustUnderstand"
    theirs = ours.replace(b"http://schemas.xmlsoap.org/soap/actor/next", b"urn:example:proxy")
    assert envelope.local_name(gateway.parse_request(theirs)) == "a"


def test_a_good_request_yields_its_operation_past_header_comments_and_pis():
    """The one element of the Body comes back; an optional header and comments are passed over."""
    body = ENV + b'<s:Header><h s:mustUnderstand="0"/></s:Header><s:Body><!-- c --><?pi x?>' \
                 b'<op xmlns="urn:x">v</op></s:Body></s:Envelope>'
    operation = cnss.parse_request(body)
    assert (operation.tag, operation.text) == ("{urn:x}op", "v")


def test_the_parser_message_goes_to_the_detail_only_where_the_contract_allows_it():
    """CNSS writes the parser's cause in fse:Erreur/message; the gateway writes it (cut) in its fault string."""
    body = b"<a>\n<b></a>"
    with pytest.raises(envelope.SoapFault) as raised:
        cnss.parse_request(body)
    fault = raised.value
    assert (fault.message, fault.line) == ("XML mal formé (ligne 2)", 2) and fault.detail_text
    cnss_detail = etree.fromstring(cnss.fault_envelope(fault)).findtext(".//{urn:ma:cnss:amo:fse:1}message")
    assert cnss_detail == f"XML mal formé (ligne 2): {fault.detail_text}"
    with pytest.raises(envelope.SoapFault) as raised:
        gateway.parse_request(body)
    tree = etree.fromstring(gateway.fault_envelope(raised.value))
    assert tree.findtext(".//faultstring").startswith("malformed XML (line 2): ")
    assert tree.findtext(".//{urn:ma:hie:gateway:soap:1}message") == tree.findtext(".//faultstring")
    assert tree.findtext(".//{urn:ma:hie:gateway:soap:1}line") == "2"


def test_a_fault_with_control_characters_still_serialises():
    """Characters XML 1.0 cannot carry become '?' in fault string and detail, instead of failing the answer."""
    fault = envelope.client_fault("X", "bad \x01 byte", element="e", detail_text="cause \x02")
    tree = etree.fromstring(cnss.fault_envelope(fault))
    assert tree.findtext(".//faultstring") == "bad ? byte"
    assert tree.findtext(".//{urn:ma:cnss:amo:fse:1}message") == "bad ? byte: cause ?"
    assert tree.findtext(".//{urn:ma:cnss:amo:fse:1}element") == "e"
    assert tree.find(".//{urn:ma:cnss:amo:fse:1}ligne") is None


GATEWAY_XSD = etree.XMLSchema(etree.parse("adapters/soap/gateway/gateway.xsd"))


@pytest.mark.parametrize("value, where", [
    ("SECRETNAME'x", "birthDate"),          # a quote inside the value once ended the masking
    ("O'Brien'1971", "birthDate"),
    ("Amina'\n' is not", "gender"),          # a facet (enumeration), with the words that follow
])
def test_a_schema_fault_never_echoes_a_value_of_the_request(value, where):
    """libxml2 quotes the offending value in its message: the fault string keeps the rule and
    the element, never the value, whatever quotes or line ends the value holds."""
    patient = {"birthDate": "<gw:birthDate>{}</gw:birthDate>", "gender": "<gw:gender>{}</gw:gender>"}
    text = value.replace("&", "&amp;").replace("<", "&lt;")
    request = etree.fromstring(
        f'<gw:SubmitReport xmlns:gw="{gateway.NAMESPACE}"><gw:reportId>R1</gw:reportId><gw:patient>'
        f'<gw:identifier><gw:system>urn:ma:cnie</gw:system><gw:value>BK1</gw:value></gw:identifier>'
        f'<gw:familyName>Alaoui</gw:familyName>{patient[where].format(text)}</gw:patient>'
        f'<gw:examination><gw:display>IRM</gw:display></gw:examination><gw:text>x</gw:text>'
        f'</gw:SubmitReport>'.encode())
    with pytest.raises(envelope.SoapFault) as fault:
        gateway.validate(request, GATEWAY_XSD)
    message = fault.value.message
    assert "SECRET" not in message and "Brien" not in message and "1971" not in message
    assert value.split("'")[0] not in message
    assert fault.value.element == where and "is not" in message  # the rule is still told

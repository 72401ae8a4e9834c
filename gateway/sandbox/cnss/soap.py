"""The CNSS peer's words for SOAP 1.1 envelopes, over adapters/soap/envelope. Pure.

What is this contract's own: French fault strings, its CodeErreur values (XML_INVALIDE,
DTD_INTERDITE, ENVELOPPE_INVALIDE; see cnss-fse.xsd) and the fse:Erreur detail, whose message
carries the precise cause (`SoapFault.detail_text`: the parser's or the schema's own message),
which may echo the caller's values: the fault string never does. Validation against
cnss-fse.xsd is the service's step (service.py), after it knows the operation.
Faults are HTTP 500, as SOAP 1.1 over HTTP requires.
"""
from __future__ import annotations

from lxml import etree

from adapters.soap.cnss import NAMESPACE
from adapters.soap.envelope import EnvelopeWords, FaultDetail, SoapFault
from adapters.soap.envelope import fault_envelope as _fault_envelope
from adapters.soap.envelope import parse_request as _parse_request

WORDS = EnvelopeWords(
    invalid_xml="XML_INVALIDE",
    dtd_forbidden="DTD_INTERDITE",
    invalid_envelope="ENVELOPPE_INVALIDE",
    empty="corps de requête vide",
    doctype="DOCTYPE interdit dans un message SOAP",
    malformed="XML mal formé{where}",  # the parser's message goes to the detail only
    at_line=" (ligne {line})",
    soap12="enveloppe SOAP 1.2: ce service parle SOAP 1.1",
    not_envelope="la racine doit être soap:Envelope (SOAP 1.1)",
    one_body="l'enveloppe doit contenir un soap:Body unique, après l'éventuel soap:Header",
    body_count="le soap:Body doit contenir exactement un élément, pas {count}",
    stray_text="texte inattendu dans soap:{where}",
    must_understand="en-tête obligatoire non compris: {name}",
)
DETAIL = FaultDetail(namespace=NAMESPACE, prefix="fse", error="Erreur", line="ligne", with_cause=True)


def parse_request(body: bytes) -> etree._Element:
    """The one element in the Body of a SOAP 1.1 request (its operation), or a fault."""
    return _parse_request(body, WORDS)


def fault_envelope(fault: SoapFault) -> bytes:
    """The SOAP 1.1 fault for `fault`, with an fse:Erreur detail."""
    return _fault_envelope(fault, DETAIL)


def element_bytes(element: etree._Element) -> bytes:
    """`element` serialised alone (stored answers; `answer_envelope` takes it back)."""
    return etree.tostring(element, encoding="utf-8")

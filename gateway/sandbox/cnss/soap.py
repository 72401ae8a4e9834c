"""SOAP 1.1 envelopes for the CNSS peer: hardened parsing of requests, answers and faults.

Pure code (no reactor, no network). `parse_request(body)` returns the operation element of a
well-formed SOAP 1.1 request, or raises `SoapFault`: the parser resolves no entity, loads no
DTD, reads nothing from the network, refuses huge trees, and any DOCTYPE is refused outright.
`answer_envelope` and `fault_envelope` write the peer's replies (UTF-8, with a declaration);
faults are HTTP 500, as SOAP 1.1 over HTTP requires.

Fault strings never repeat values of the request (they may be patient data): they name the
rule, the line and the element. The caller's own values may appear in the `detail` only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from adapters.soap.cnss import NAMESPACE

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
ENVELOPE = f"{{{SOAP_ENV}}}Envelope"
HEADER = f"{{{SOAP_ENV}}}Header"
BODY = f"{{{SOAP_ENV}}}Body"
FAULT = f"{{{SOAP_ENV}}}Fault"
MUST_UNDERSTAND = f"{{{SOAP_ENV}}}mustUnderstand"

# Optional BOM, XML declaration, comments and PIs, then <!DOCTYPE (any ASCII-compatible encoding;
# the check after parsing catches the others).
_DOCTYPE_IN_PROLOG = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml.*?\?>)?(?:\s|<!--.*?-->|<\?.*?\?>)*<!DOCTYPE", re.DOTALL)

FaultCode = Literal["Client", "Server", "VersionMismatch", "MustUnderstand"]


@dataclass(eq=False)  # stays hashable, as exceptions must
class SoapFault(Exception):
    """A fault to answer with. `error` is the contract's CodeErreur (see cnss-fse.xsd)."""

    code: FaultCode
    error: str
    message: str
    line: int | None = None
    element: str | None = None
    detail_text: str | None = None  # the precise cause for the caller; may echo its values

    def __str__(self) -> str:
        return f"{self.code} {self.error}: {self.message}"


def client_fault(error: str, message: str, **kwargs) -> SoapFault:
    return SoapFault("Client", error, message, **kwargs)


def server_fault(error: str, message: str) -> SoapFault:
    return SoapFault("Server", error, message)


def hardened_parser() -> etree.XMLParser:
    """A parser that cannot be made to read files, the network, or expand entities.

    A fresh one per call: lxml parsers must not be shared between threads.
    """
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        collect_ids=False,
        remove_pis=True,
    )


def parse_document(body: bytes) -> etree._Element:
    """The root of `body`, or a Client fault: not XML (with the line), or a DOCTYPE."""
    if not body.strip():
        raise client_fault("XML_INVALIDE", "corps de requête vide")
    if _DOCTYPE_IN_PROLOG.match(body):  # before parsing: libxml2 would still read the DTD
        raise client_fault("DTD_INTERDITE", "DOCTYPE interdit dans un message SOAP")
    try:
        root = etree.fromstring(body, hardened_parser())
    except etree.XMLSyntaxError as e:
        line = e.lineno if e.lineno and e.lineno > 0 else None
        where = f" (ligne {line})" if line else ""
        raise client_fault("XML_INVALIDE", f"XML mal formé{where}", line=line,
                           detail_text=str(e.msg)[:300]) from None
    docinfo = root.getroottree().docinfo
    # Refused even though nothing in it would be resolved: a SOAP message has no DTD
    # (SOAP 1.1 section 3), and a DOCTYPE is the usual carrier of XXE and entity bombs.
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise client_fault("DTD_INTERDITE", "DOCTYPE interdit dans un message SOAP")
    return root


def parse_request(body: bytes) -> etree._Element:
    """The one element in the Body of a SOAP 1.1 request (its operation), or a fault."""
    root = parse_document(body)
    if root.tag == f"{{{SOAP12_ENV}}}Envelope":
        raise SoapFault("VersionMismatch", "ENVELOPPE_INVALIDE",
                        "enveloppe SOAP 1.2: ce service parle SOAP 1.1")
    if root.tag != ENVELOPE:
        raise client_fault("ENVELOPPE_INVALIDE", "la racine doit être soap:Envelope (SOAP 1.1)",
                           line=root.sourceline, element=_name(root))
    children = _elements(root, "Envelope")
    if children and children[0].tag == HEADER:
        _check_headers(children[0])
        children = children[1:]
    if len(children) != 1 or children[0].tag != BODY:
        raise client_fault("ENVELOPPE_INVALIDE",
                           "l'enveloppe doit contenir un soap:Body unique, après l'éventuel soap:Header")
    operations = _elements(children[0], "Body")
    if len(operations) != 1:
        raise client_fault("ENVELOPPE_INVALIDE",
                           f"le soap:Body doit contenir exactement un élément, pas {len(operations)}",
                           line=children[0].sourceline)
    return operations[0]


def _elements(parent: etree._Element, where: str) -> list[etree._Element]:
    """Element children of `parent`; text other than blanks there is a fault (element-only content)."""
    if (parent.text or "").strip():
        raise client_fault("ENVELOPPE_INVALIDE", f"texte inattendu dans soap:{where}",
                           line=parent.sourceline)
    children = []
    for child in parent:
        if (child.tail or "").strip():
            raise client_fault("ENVELOPPE_INVALIDE", f"texte inattendu dans soap:{where}",
                               line=child.sourceline)
        if isinstance(child.tag, str):  # comments are tolerated, processing instructions removed
            children.append(child)
    return children


def _check_headers(header: etree._Element) -> None:
    for block in _elements(header, "Header"):
        if block.get(MUST_UNDERSTAND, "0").strip() in ("1", "true"):
            raise SoapFault("MustUnderstand", "ENVELOPPE_INVALIDE",
                            f"en-tête obligatoire non compris: {_name(block)}",
                            line=block.sourceline, element=_name(block))


def _name(element: etree._Element) -> str:
    return etree.QName(element).localname


def answer_envelope(answer: etree._Element | bytes) -> bytes:
    """A SOAP 1.1 envelope around `answer` (an element, or one serialised by `element_bytes`)."""
    if isinstance(answer, bytes):
        answer = etree.fromstring(answer, hardened_parser())
    envelope = etree.Element(ENVELOPE, nsmap={"soap": SOAP_ENV})
    etree.SubElement(envelope, BODY).append(answer)
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def fault_envelope(fault: SoapFault) -> bytes:
    """The SOAP 1.1 fault for `fault`, with an fse:Erreur detail."""
    envelope = etree.Element(ENVELOPE, nsmap={"soap": SOAP_ENV})
    body = etree.SubElement(envelope, BODY)
    node = etree.SubElement(body, FAULT)
    etree.SubElement(node, "faultcode").text = f"soap:{fault.code}"
    etree.SubElement(node, "faultstring").text = fault.message
    detail = etree.SubElement(node, "detail")
    error = etree.SubElement(detail, f"{{{NAMESPACE}}}Erreur", nsmap={"fse": NAMESPACE})
    etree.SubElement(error, f"{{{NAMESPACE}}}code").text = fault.error
    text = fault.message if not fault.detail_text else f"{fault.message}: {fault.detail_text}"
    etree.SubElement(error, f"{{{NAMESPACE}}}message").text = _xml_safe(text)
    if fault.line:
        etree.SubElement(error, f"{{{NAMESPACE}}}ligne").text = str(fault.line)
    if fault.element:
        etree.SubElement(error, f"{{{NAMESPACE}}}element").text = fault.element
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def element_bytes(element: etree._Element) -> bytes:
    return etree.tostring(element, encoding="utf-8")


def _xml_safe(text: str) -> str:
    # Parser messages may quote control characters that XML 1.0 cannot carry.
    return "".join(c if c in "\t\n\r" or c >= " " else "?" for c in text)

"""SOAP 1.1 envelopes of the gateway's SOAP door: hardened parsing, answers and faults. Pure.

`parse_request(body, schema)` returns the operation element of a well-formed SOAP 1.1 request
whose content the XSD accepts, or raises `SoapFault`. The parser resolves no entity, loads no
DTD, reads nothing from the network and refuses huge trees; any DOCTYPE is refused outright
(a SOAP message has none: SOAP 1.1 section 3), which stops XXE probes and entity expansion
bombs before libxml2 reads them.

Fault strings never repeat values of the request (they may be patient data): they name the
rule, the line and the element.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from adapters.soap.gateway import NAMESPACE

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
ENVELOPE = f"{{{SOAP_ENV}}}Envelope"
HEADER = f"{{{SOAP_ENV}}}Header"
BODY = f"{{{SOAP_ENV}}}Body"
FAULT = f"{{{SOAP_ENV}}}Fault"
MUST_UNDERSTAND = f"{{{SOAP_ENV}}}mustUnderstand"

# Optional BOM, XML declaration, comments and PIs, then <!DOCTYPE (ASCII-compatible encodings;
# the check after parsing catches the others).
_DOCTYPE_IN_PROLOG = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml.*?\?>)?(?:\s|<!--.*?-->|<\?.*?\?>)*<!DOCTYPE", re.DOTALL)

FaultCode = Literal["Client", "Server", "VersionMismatch", "MustUnderstand"]


@dataclass(eq=False)  # stays hashable, as exceptions must
class SoapFault(Exception):
    """A fault to answer with; `error` is a code of the contract (gw:Error/code)."""

    code: FaultCode
    error: str
    message: str
    line: int | None = None
    element: str | None = None

    def __str__(self) -> str:
        return f"{self.code} {self.error}: {self.message}"


def client_fault(error: str, message: str, **kwargs) -> SoapFault:
    return SoapFault("Client", error, message, **kwargs)


def server_fault(error: str, message: str) -> SoapFault:
    return SoapFault("Server", error, message)


def hardened_parser() -> etree.XMLParser:
    """A parser that cannot be made to read files or the network, or to expand entities.
    A fresh one per call: lxml parsers must not be shared between threads."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, collect_ids=False,
                           remove_pis=True)


def parse_document(body: bytes) -> etree._Element:
    """The root of `body`, or a Client fault: empty, not XML (with the line), or a DOCTYPE."""
    if not body.strip():
        raise client_fault("INVALID_XML", "empty request body")
    if _DOCTYPE_IN_PROLOG.match(body):  # before parsing: libxml2 would still read the DTD
        raise client_fault("DTD_FORBIDDEN", "a DOCTYPE is not allowed in a SOAP message")
    try:
        root = etree.fromstring(body, hardened_parser())
    except etree.XMLSyntaxError as error:
        line = error.lineno if error.lineno and error.lineno > 0 else None
        where = f" (line {line})" if line else ""
        raise client_fault("INVALID_XML", f"malformed XML{where}: {_xml_safe(str(error.msg))[:200]}",
                           line=line) from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise client_fault("DTD_FORBIDDEN", "a DOCTYPE is not allowed in a SOAP message")
    return root


def parse_request(body: bytes, schema: etree.XMLSchema | None = None) -> etree._Element:
    """The one element in the Body of a SOAP 1.1 request (its operation), checked against
    `schema` when given, or a fault."""
    root = parse_document(body)
    if root.tag == f"{{{SOAP12_ENV}}}Envelope":
        raise SoapFault("VersionMismatch", "INVALID_ENVELOPE", "SOAP 1.2 envelope: this service speaks SOAP 1.1")
    if root.tag != ENVELOPE:
        raise client_fault("INVALID_ENVELOPE", "the root must be soap:Envelope (SOAP 1.1)",
                           line=root.sourceline, element=_name(root))
    children = _elements(root, "Envelope")
    if children and children[0].tag == HEADER:
        _check_headers(children[0])
        children = children[1:]
    if len(children) != 1 or children[0].tag != BODY:
        raise client_fault("INVALID_ENVELOPE",
                           "the envelope holds one soap:Body, after an optional soap:Header")
    operations = _elements(children[0], "Body")
    if len(operations) != 1:
        raise client_fault("INVALID_ENVELOPE",
                           f"soap:Body must hold exactly one element, not {len(operations)}",
                           line=children[0].sourceline)
    operation = operations[0]
    if schema is not None:
        validate(operation, schema)
    return operation


def validate(element: etree._Element, schema: etree.XMLSchema) -> None:
    """A Client fault naming the first rule `element` breaks (line and element, no value)."""
    if schema.validate(etree.ElementTree(element)):
        return
    error = schema.error_log.last_error
    message = re.sub(r"'[^']*'(?= is not)", "the value", error.message)  # never echo a value
    element_name = None
    if error.path:
        element_name = error.path.rsplit("/", 1)[-1].split(":")[-1].split("[")[0] or None
    raise client_fault("SCHEMA_INVALID", f"the request does not follow gateway.xsd: {_xml_safe(message)[:300]}",
                       line=error.line or None, element=element_name)


def _elements(parent: etree._Element, where: str) -> list[etree._Element]:
    """Element children of `parent`; non-blank text there is a fault (element-only content)."""
    if (parent.text or "").strip():
        raise client_fault("INVALID_ENVELOPE", f"unexpected text in soap:{where}", line=parent.sourceline)
    children = []
    for child in parent:
        if (child.tail or "").strip():
            raise client_fault("INVALID_ENVELOPE", f"unexpected text in soap:{where}", line=child.sourceline)
        if isinstance(child.tag, str):  # comments are tolerated, processing instructions removed
            children.append(child)
    return children


def _check_headers(header: etree._Element) -> None:
    for block in _elements(header, "Header"):
        if block.get(MUST_UNDERSTAND, "0").strip() in ("1", "true"):
            raise SoapFault("MustUnderstand", "INVALID_ENVELOPE",
                            f"mandatory header not understood: {_name(block)}",
                            line=block.sourceline, element=_name(block))


def _name(element: etree._Element) -> str:
    return etree.QName(element).localname


def answer_envelope(answer: etree._Element) -> bytes:
    """A SOAP 1.1 envelope around `answer`, UTF-8 with a declaration."""
    envelope = etree.Element(ENVELOPE, nsmap={"soap": SOAP_ENV})
    etree.SubElement(envelope, BODY).append(answer)
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def fault_envelope(fault: SoapFault) -> bytes:
    """The SOAP 1.1 fault for `fault`, with a gw:Error detail."""
    envelope = etree.Element(ENVELOPE, nsmap={"soap": SOAP_ENV})
    body = etree.SubElement(envelope, BODY)
    node = etree.SubElement(body, FAULT)
    etree.SubElement(node, "faultcode").text = f"soap:{fault.code}"
    etree.SubElement(node, "faultstring").text = _xml_safe(fault.message)
    detail = etree.SubElement(node, "detail")
    error = etree.SubElement(detail, f"{{{NAMESPACE}}}Error", nsmap={"gw": NAMESPACE})
    etree.SubElement(error, f"{{{NAMESPACE}}}code").text = fault.error
    etree.SubElement(error, f"{{{NAMESPACE}}}message").text = _xml_safe(fault.message)
    if fault.line:
        etree.SubElement(error, f"{{{NAMESPACE}}}line").text = str(fault.line)
    if fault.element:
        etree.SubElement(error, f"{{{NAMESPACE}}}element").text = fault.element
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def child(parent: etree._Element, name: str) -> etree._Element | None:
    """The first child `gw:name` of `parent`."""
    return parent.find(f"{{{NAMESPACE}}}{name}")


def child_text(parent: etree._Element, name: str) -> str | None:
    found = child(parent, name)
    return found.text if found is not None else None


def _xml_safe(text: str) -> str:
    # Parser messages may quote control characters that XML 1.0 cannot carry.
    return "".join(c if c in "\t\n\r" or c >= " " else "?" for c in text)

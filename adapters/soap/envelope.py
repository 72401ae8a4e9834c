"""SOAP 1.1 envelopes, for every contract the gateway serves or plays: hardened parsing of a
request, the answer envelope and the fault envelope. Pure (no reactor, no network).

Two services speak SOAP 1.1 here, the gateway's own door (adapters/soap/gateway) and the CNSS
reference peer (gateway/sandbox/cnss); they differ only in words: their error codes, the
language of their fault strings and the names in their fault detail. Each passes its words
(`EnvelopeWords`, `FaultDetail`) to the one parser and serialiser below, so a hardening fix
lands in both at once.

`parse_request(body, words)` returns the operation element of a well-formed SOAP 1.1 request,
or raises `SoapFault`. The parser resolves no entity, loads no DTD, reads nothing from the
network; any DOCTYPE is refused outright (a SOAP message has none: SOAP
1.1 section 3), which stops XXE probes and entity-expansion bombs before libxml2 reads them.
The size of a body is bounded by the transports, before it is read (HTTP 413, TAILLE_EXCESSIVE).
Checking the operation against a contract's XSD is the contract's own step: its faults carry
the contract's rules and words.

Fault strings never repeat values of the request (they may be patient data): they name the
rule, the line and the element. The parser's own message, which may quote the request, goes
to `SoapFault.detail_text`; a contract writes it in its detail only when it says so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lxml import etree

from adapters.safe_xml import safe_parser

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"
ENVELOPE = f"{{{SOAP_ENV}}}Envelope"
HEADER = f"{{{SOAP_ENV}}}Header"
BODY = f"{{{SOAP_ENV}}}Body"
FAULT = f"{{{SOAP_ENV}}}Fault"
MUST_UNDERSTAND = f"{{{SOAP_ENV}}}mustUnderstand"
ACTOR = f"{{{SOAP_ENV}}}actor"
# SOAP 1.1 section 4.2.2: a header block with no actor is for the ultimate destination (us),
# one for ".../actor/next" for whoever reads it first (us too); any other actor is another node.
ACTOR_NEXT = "http://schemas.xmlsoap.org/soap/actor/next"

# Optional BOM, XML declaration, comments and PIs, then <!DOCTYPE (ASCII-compatible encodings;
# the check after parsing catches the others).
_DOCTYPE_IN_PROLOG = re.compile(
    rb"^(?:\xef\xbb\xbf)?\s*(?:<\?xml.*?\?>)?(?:\s|<!--.*?-->|<\?.*?\?>)*<!DOCTYPE", re.DOTALL)

FaultCode = Literal["Client", "Server", "VersionMismatch", "MustUnderstand"]


@dataclass(eq=False)  # stays hashable, as exceptions must
class SoapFault(Exception):
    """A fault to answer with; `error` is a code of the contract (gw:Error/code, fse:Erreur/code)."""

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


@dataclass(frozen=True)
class EnvelopeWords:
    """What a contract calls the faults of a bad envelope: three error codes, and the fault
    strings in its language. Templates are `str.format`ted with the fields named beside them."""

    invalid_xml: str  # error code: empty, or not well-formed
    dtd_forbidden: str  # error code: a DOCTYPE
    invalid_envelope: str  # error code: not one SOAP 1.1 Envelope with one operation
    empty: str
    doctype: str
    malformed: str  # {where} (the line, from `at_line`, or empty), {reason} (the parser's message)
    at_line: str  # {line}
    soap12: str
    not_envelope: str
    one_body: str
    body_count: str  # {count}
    stray_text: str  # {where}: Envelope, Header or Body
    must_understand: str  # {name}: the header block


@dataclass(frozen=True)
class FaultDetail:
    """How a contract writes a fault's detail: `<prefix:error>` in `namespace`, holding
    code, message, `line` (when known) and element (when known)."""

    namespace: str
    prefix: str
    error: str
    line: str
    with_cause: bool  # the message is followed by ": detail_text" when the fault has one


def hardened_parser() -> etree.XMLParser:
    """A parser that cannot be made to read files or the network, or to expand entities.
    A fresh one per call: lxml parsers must not be shared between threads.

    huge_tree lifts libxml2's cap of 10 million characters on a text node, which refused a
    report's PDF over 7.5 MB (base64) well under the door's body limit; what that cap guards
    against is bounded here otherwise: the body's size by the transport, entity expansion by
    refusing any DOCTYPE before parsing."""
    return safe_parser(huge_tree=True, collect_ids=False, remove_pis=True)


def parse_document(body: bytes, words: EnvelopeWords) -> etree._Element:
    """The root of `body`, or a Client fault: empty, not XML (with the line), or a DOCTYPE."""
    if not body.strip():
        raise client_fault(words.invalid_xml, words.empty)
    if _DOCTYPE_IN_PROLOG.match(body):  # before parsing: libxml2 would still read the DTD
        raise client_fault(words.dtd_forbidden, words.doctype)
    try:
        root = etree.fromstring(body, hardened_parser())
    except etree.XMLSyntaxError as error:
        line = error.lineno if error.lineno and error.lineno > 0 else None
        where = words.at_line.format(line=line) if line else ""
        reason = str(error.msg)
        raise client_fault(words.invalid_xml,
                           words.malformed.format(where=where, reason=xml_safe(reason)[:200]),
                           line=line, detail_text=reason[:300]) from None
    docinfo = root.getroottree().docinfo
    # Refused even though nothing in it would be resolved: a SOAP message has no DTD, and a
    # DOCTYPE is the usual carrier of XXE and entity bombs.
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise client_fault(words.dtd_forbidden, words.doctype)
    return root


def parse_request(body: bytes, words: EnvelopeWords) -> etree._Element:
    """The one element in the Body of a SOAP 1.1 request (its operation), or a fault."""
    root = parse_document(body, words)
    if root.tag == f"{{{SOAP12_ENV}}}Envelope":
        raise SoapFault("VersionMismatch", words.invalid_envelope, words.soap12)
    if root.tag != ENVELOPE:
        raise client_fault(words.invalid_envelope, words.not_envelope,
                           line=root.sourceline, element=local_name(root))
    children = _elements(root, "Envelope", words)
    if children and children[0].tag == HEADER:
        _check_headers(children[0], words)
        children = children[1:]
    if len(children) != 1 or children[0].tag != BODY:
        raise client_fault(words.invalid_envelope, words.one_body)
    operations = _elements(children[0], "Body", words)
    if len(operations) != 1:
        raise client_fault(words.invalid_envelope, words.body_count.format(count=len(operations)),
                           line=children[0].sourceline)
    return operations[0]


def _elements(parent: etree._Element, where: str, words: EnvelopeWords) -> list[etree._Element]:
    """Element children of `parent`; non-blank text there is a fault (element-only content)."""
    if (parent.text or "").strip():
        raise client_fault(words.invalid_envelope, words.stray_text.format(where=where),
                           line=parent.sourceline)
    children = []
    for child in parent:
        if (child.tail or "").strip():
            raise client_fault(words.invalid_envelope, words.stray_text.format(where=where),
                               line=child.sourceline)
        if isinstance(child.tag, str):  # comments are tolerated, processing instructions removed
            children.append(child)
    return children


def _check_headers(header: etree._Element, words: EnvelopeWords) -> None:
    for block in _elements(header, "Header", words):
        if block.get(ACTOR, ACTOR_NEXT).strip() not in (ACTOR_NEXT, ""):
            continue  # meant for another node: its mustUnderstand is not ours to honour
        if block.get(MUST_UNDERSTAND, "0").strip() in ("1", "true"):
            name = local_name(block)
            raise SoapFault("MustUnderstand", words.invalid_envelope,
                            words.must_understand.format(name=name),
                            line=block.sourceline, element=name)


def local_name(element: etree._Element) -> str:
    return etree.QName(element).localname


def answer_envelope(answer: etree._Element | bytes) -> bytes:
    """A SOAP 1.1 envelope around `answer` (an element, or one serialised alone), UTF-8 with
    a declaration."""
    if isinstance(answer, bytes):
        answer = etree.fromstring(answer, hardened_parser())
    envelope = etree.Element(ENVELOPE, nsmap={"soap": SOAP_ENV})
    etree.SubElement(envelope, BODY).append(answer)
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def fault_envelope(fault: SoapFault, detail: FaultDetail) -> bytes:
    """The SOAP 1.1 fault for `fault`, its detail written as `detail` says. Sent with HTTP
    500, as SOAP 1.1 over HTTP requires (the caller's job)."""
    envelope = etree.Element(ENVELOPE, nsmap={"soap": SOAP_ENV})
    node = etree.SubElement(etree.SubElement(envelope, BODY), FAULT)
    etree.SubElement(node, "faultcode").text = f"soap:{fault.code}"
    etree.SubElement(node, "faultstring").text = xml_safe(fault.message)
    ns = detail.namespace
    error = etree.SubElement(etree.SubElement(node, "detail"), f"{{{ns}}}{detail.error}",
                             nsmap={detail.prefix: ns})
    etree.SubElement(error, f"{{{ns}}}code").text = fault.error
    text = fault.message
    if detail.with_cause and fault.detail_text:
        text = f"{fault.message}: {fault.detail_text}"
    etree.SubElement(error, f"{{{ns}}}message").text = xml_safe(text)
    if fault.line:
        etree.SubElement(error, f"{{{ns}}}{detail.line}").text = str(fault.line)
    if fault.element:
        etree.SubElement(error, f"{{{ns}}}element").text = fault.element
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


def xml_safe(text: str) -> str:
    """`text` with the control characters XML 1.0 cannot carry (parser messages may quote
    them) turned into '?'."""
    return "".join(c if c in "\t\n\r" or c >= " " else "?" for c in text)

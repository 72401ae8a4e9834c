"""The gateway SOAP door's words for SOAP 1.1 envelopes, over adapters/soap/envelope. Pure.

What is this contract's own: English fault strings, its error codes (INVALID_XML,
DTD_FORBIDDEN, INVALID_ENVELOPE, SCHEMA_INVALID), the gw:Error detail, validation against
gateway.xsd as part of parsing a request, and reading the gw: children of an operation.
The parser's message goes into the fault string (cut, made XML-safe) and the detail never
carries more than the fault string.

The common names (SoapFault, client_fault, server_fault, hardened_parser, answer_envelope)
are re-exported, so that callers of this contract import from one place.
"""
from __future__ import annotations

import re

from lxml import etree

from adapters.soap.envelope import (EnvelopeWords, FaultDetail, SoapFault, answer_envelope,
                                    client_fault, hardened_parser, server_fault, xml_safe)
from adapters.soap.envelope import fault_envelope as _fault_envelope
from adapters.soap.envelope import parse_request as _parse_request
from adapters.soap.gateway import NAMESPACE

__all__ = ["SoapFault", "answer_envelope", "child", "child_text", "client_fault", "fault_envelope",
           "hardened_parser", "parse_request", "server_fault", "validate"]

WORDS = EnvelopeWords(
    invalid_xml="INVALID_XML",
    dtd_forbidden="DTD_FORBIDDEN",
    invalid_envelope="INVALID_ENVELOPE",
    empty="empty request body",
    doctype="a DOCTYPE is not allowed in a SOAP message",
    malformed="malformed XML{where}: {reason}",
    at_line=" (line {line})",
    soap12="SOAP 1.2 envelope: this service speaks SOAP 1.1",
    not_envelope="the root must be soap:Envelope (SOAP 1.1)",
    one_body="the envelope holds one soap:Body, after an optional soap:Header",
    body_count="soap:Body must hold exactly one element, not {count}",
    stray_text="unexpected text in soap:{where}",
    must_understand="mandatory header not understood: {name}",
)
DETAIL = FaultDetail(namespace=NAMESPACE, prefix="gw", error="Error", line="line", with_cause=False)


def parse_request(body: bytes, schema: etree.XMLSchema | None = None) -> etree._Element:
    """The one element in the Body of a SOAP 1.1 request (its operation), checked against
    `schema` when given, or a fault."""
    operation = _parse_request(body, WORDS)
    if schema is not None:
        validate(operation, schema)
    return operation


def validate(element: etree._Element, schema: etree.XMLSchema) -> None:
    """A Client fault naming the first rule `element` breaks (line and element, no value)."""
    if schema.validate(etree.ElementTree(element)):
        return
    error = schema.error_log.last_error
    message = _without_values(error.message, element)
    element_name = None
    if error.path:
        element_name = error.path.rsplit("/", 1)[-1].split(":")[-1].split("[")[0] or None
    raise client_fault("SCHEMA_INVALID", f"the request does not follow gateway.xsd: {xml_safe(message)[:300]}",
                       line=error.line or None, element=element_name)


# libxml2 quotes the offending value after "The value " (a facet) or after the element's name
# ("Element 'x': 'value' is not a valid value of ..."). The value may hold quotes itself: the
# quoted run goes to the last quote before the verb that follows it.
_QUOTED_VALUE = re.compile(r"(The value |: )'.*'(?= (?:is|has|must) )", re.S)
_SHORTEST_CHECKED = 4  # shorter values ("1", "M") are also words of the schema's own rules


def _without_values(message: str, element: etree._Element) -> str:
    """libxml2's message with the request's values taken out (a fault never echoes patient
    data); a generic one when a value of the request is still found in it."""
    message = _QUOTED_VALUE.sub(lambda m: "The value" if m[1] == "The value " else ": the value",
                                message.strip())
    values = [text.strip() for node in element.iter()
              for text in [node.text if isinstance(node.tag, str) else None, *node.attrib.values()]
              if text and len(text.strip()) >= _SHORTEST_CHECKED]
    if any(value in message for value in values):
        return "a value breaks a rule of the schema"
    return message


def fault_envelope(fault: SoapFault) -> bytes:
    """The SOAP 1.1 fault for `fault`, with a gw:Error detail."""
    return _fault_envelope(fault, DETAIL)


def child(parent: etree._Element, name: str) -> etree._Element | None:
    """The first child `gw:name` of `parent`."""
    return parent.find(f"{{{NAMESPACE}}}{name}")


def child_text(parent: etree._Element, name: str) -> str | None:
    found = child(parent, name)
    return found.text if found is not None else None

"""The SOAP door under /soap/: the contract (GET /soap/?wsdl, /soap/gateway.xsd) and its two
operations (POST /soap/), SOAP 1.1 document/literal (adapters/soap/gateway).

- SubmitHL7Message (right hl7v2.submit): the ER7 text through the same ingest as MLLP and
  REST; answered with the ACK text (a refusal is an ordinary answer with its AR/AE ACK; only a
  store outage is a soap:Server fault, as the message was not kept).
- SubmitReport (right reports.submit): an imaging report stored as a 'soap-report' message
  (the SubmitReport element as received) and translated into a canonical DiagnosticReport
  with its PDF; the answer waits for the translation.

Requests are parsed by the hardened parser and validated against gateway.xsd before anything
is stored. Faults: soap:Client for what the caller must fix (HTTP 500, as SOAP 1.1 wants),
soap:Server for an outage. Fault strings name rules and elements, never values.
"""
from __future__ import annotations

import codecs
import hashlib
import re
from dataclasses import dataclass

from lxml import etree

from adapters.hl7v2.charsets import CharsetError, codec_for
from adapters.hl7v2.codes import Outcome
from adapters.hl7v2.header import HeaderError, parse_header
from adapters.safe_xml import XML_BOMS
from adapters.mllp.protocol import ConnectionInfo
from adapters.soap.gateway import NAMESPACE, WSDL_PATH, XSD_NAME, XSD_PATH
from adapters.soap.envelope import SoapFault, answer_envelope, client_fault, server_fault
from adapters.soap.gateway.envelope import child_text, fault_envelope, parse_request
from gateway.config import SenderConfig
from gateway.doors.ingest_bridge import IngestBridge, StoreUnavailable
from gateway.ingest.model import Inbound, MessageStatus
from gateway.translation.report_input import MESSAGE_TYPE, ReportError, pdf_bytes

SOAP_CONTENT_TYPE = "text/xml; charset=utf-8"
OPERATION_RIGHTS = {"SubmitHL7Message": "hl7v2.submit", "SubmitReport": "reports.submit"}
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
_ADDRESS = re.compile(rb'(<soap:address location=")[^"]*(")')


@dataclass(frozen=True)
class SoapAnswer:
    status: int
    body: bytes
    content_type: str = SOAP_CONTENT_TYPE


class Unauthorized(Exception):
    """An operation the caller's facility type may not call (the door records the refusal)."""

    def __init__(self, operation: str, right: str, fault: SoapFault):
        super().__init__(fault.message)
        self.operation = operation
        self.right = right
        self.fault = fault


def fault_answer(fault: SoapFault) -> SoapAnswer:
    return SoapAnswer(500, fault_envelope(fault))


class SoapDoor:
    def __init__(self, bridge: IngestBridge, listener: str):
        self.bridge = bridge
        self.listener = listener
        with open(WSDL_PATH, "rb") as f:
            self.wsdl = f.read()
        with open(XSD_PATH, "rb") as f:
            self.xsd = f.read()
        # Parsed once; validation runs on the reactor thread only (lxml schemas are not
        # shared between threads).
        self.schema = etree.XMLSchema(etree.fromstring(self.xsd))

    # -- the contract ----------------------------------------------------------------------

    def document(self, name: str, host: str | None) -> bytes | None:
        """GET: the WSDL (addressed to the host the client used) or the XSD; None otherwise."""
        if name == "wsdl":
            if not host or not _HOST.match(host):
                return self.wsdl
            address = b"https://" + host.encode("ascii") + b"/soap/"
            return _ADDRESS.sub(rb"\g<1>" + address + rb"\g<2>", self.wsdl, count=1)
        if name == XSD_NAME:
            return self.xsd
        return None

    # -- requests --------------------------------------------------------------------------

    def operation_of(self, body: bytes, may, charset: str | None = None) -> tuple[str, etree._Element]:
        """The operation element of a request, parsed, validated and authorized
        (`may(right)` says whether the caller has a right; `charset`, the Content-Type's);
        raises SoapFault or Unauthorized."""
        _refuse_charset_conflict(body, charset)
        element = parse_request(body, self.schema)
        # A comment splits an element's text, and .text (what the operations and the report's
        # translation read) stops at it: "AB<!---->12" was read as "AB", an HL7 message was
        # stored cut at its first comment. Comments carry no data.
        etree.strip_tags(element, etree.Comment)
        qname = etree.QName(element)
        operation = qname.localname
        if qname.namespace != NAMESPACE or operation not in OPERATION_RIGHTS:
            raise client_fault("UNKNOWN_OPERATION", f"no operation {operation} in this service",
                               line=element.sourceline, element=operation)
        right = OPERATION_RIGHTS[operation]
        if not may(right):
            raise Unauthorized(operation, right, client_fault(
                "ACCESS_DENIED", f"{operation} is not allowed for this facility's type",
                element=operation))
        return operation, element

    async def handle(self, operation: str, element: etree._Element, facility: SenderConfig,
                     peer: str) -> SoapAnswer:
        try:
            if operation == "SubmitHL7Message":
                answer = await self._submit_hl7(element, facility, peer)
            else:
                answer = await self._submit_report(element, facility, peer)
        except SoapFault as fault:
            return fault_answer(fault)
        return SoapAnswer(200, answer_envelope(answer))

    async def _submit_hl7(self, element, facility: SenderConfig, peer: str) -> etree._Element:
        text = child_text(element, "message") or ""
        # XML turns a raw CR into LF: segments come back as CR-separated ER7.
        text = text.replace("\r\n", "\r").replace("\n", "\r")
        payload = _encode_er7(text)
        outcome = await self.bridge.submit_er7(payload, ConnectionInfo(self.listener, peer, facility.id, True))
        if not outcome.stored:
            raise server_fault("STORE_UNAVAILABLE", "the message could not be stored; nothing was kept, "
                                                    "send it again later")
        answer = etree.Element(f"{{{NAMESPACE}}}SubmitHL7MessageResponse", nsmap={"gw": NAMESPACE})
        if outcome.message_id is not None:
            etree.SubElement(answer, f"{{{NAMESPACE}}}messageId").text = str(outcome.message_id)
        if outcome.ack_code:
            etree.SubElement(answer, f"{{{NAMESPACE}}}ackCode").text = outcome.ack_code
        if outcome.answer is not None:
            etree.SubElement(answer, f"{{{NAMESPACE}}}acknowledgement").text = \
                outcome.answer.decode(outcome.codec, "replace")
        return answer

    async def _submit_report(self, element, facility: SenderConfig, peer: str) -> etree._Element:
        try:
            pdf_bytes(element)
        except ReportError as error:
            raise client_fault("INVALID_PDF", error.reason, line=element.sourceline, element="pdf") from None
        raw = etree.tostring(element, encoding="utf-8")  # the operation element, standalone
        digest = hashlib.sha256(raw).digest()
        # Keyed by content, as ASTM is: the same report sent again is a duplicate; a corrected
        # one is a new message (and updates the same DiagnosticReport, by its identifier).
        control_id = "sha256:" + digest.hex()[:32]
        item = Inbound(raw=raw, sha256=digest, outcome=Outcome.ACCEPT, status=MessageStatus.RECEIVED,
                       ack=None, sending_application="SOAP-REPORT", sending_facility=facility.id,
                       control_id=control_id, message_type=MESSAGE_TYPE, codec="utf-8",
                       size=len(raw), sender_id=facility.id, format="soap-report")
        try:
            outcome = await self.bridge.submit_document(item, peer)
        except StoreUnavailable:
            raise server_fault("STORE_UNAVAILABLE", "the report could not be stored; nothing was kept, "
                                                    "send it again later") from None
        record = outcome.translation
        if record is not None and record.status == MessageStatus.FAILED.value:
            raise client_fault("REPORT_NOT_TRANSLATED",
                               f"the report was stored (message {outcome.message_id}) but could not "
                               f"be translated: {record.error_reason}")
        answer = etree.Element(f"{{{NAMESPACE}}}SubmitReportResponse", nsmap={"gw": NAMESPACE})
        etree.SubElement(answer, f"{{{NAMESPACE}}}messageId").text = str(outcome.message_id)
        etree.SubElement(answer, f"{{{NAMESPACE}}}status").text = outcome.status
        if record is not None:
            report = _report_id(record)
            if report:
                etree.SubElement(answer, f"{{{NAMESPACE}}}diagnosticReport").text = report
        return answer


# The encoding an XML declaration names, in a body without a byte order mark.
_DECLARED_ENCODING = re.compile(rb"""^\s*<\?xml\s[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._:-]+)["']""")


def _refuse_charset_conflict(body: bytes, charset: str | None) -> None:
    """A Client fault when the Content-Type's charset and the XML declaration's encoding name
    two character sets: the parser reads the declaration, so a UTF-8 body declared ISO-8859-1
    was stored garbled ("Bénali" as "BÃ©nali") and accepted. Which one is right cannot be told."""
    if not charset or body.startswith(XML_BOMS):
        return  # nothing to compare, or a byte order mark says the encoding itself
    declared = _DECLARED_ENCODING.match(body)
    if declared is None:
        return
    try:
        names = {codecs.lookup(name).name for name in (charset, declared.group(1).decode("ascii"))}
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return  # an encoding the parser does not know: it says so itself
    if len(names) > 1 and names != {"ascii", "utf-8"}:  # ASCII text is UTF-8 as well
        raise client_fault("CHARSET_MISMATCH", f"the Content-Type says charset {charset[:40]!r} and the "
                                               f"XML declaration encoding {declared.group(1).decode('ascii')[:40]!r}: "
                                               "send one character set", line=1)


def _report_id(record) -> str | None:
    bundle = record.bundle or {}
    for entry in bundle.get("entry", ()):
        resource = entry.get("resource") or {}
        if resource.get("resourceType") == "DiagnosticReport":
            return f"DiagnosticReport/{resource['id']}"
    return None


def _encode_er7(text: str) -> bytes:
    """ER7 text as bytes in the character set MSH-18 declares (UTF-8 when it is empty)."""
    probe = text.encode("utf-8", "replace")
    try:
        codec = codec_for(parse_header(probe).charset)
    except (HeaderError, CharsetError):
        return probe  # ingest refuses it, with the reason
    if codec == "ascii":
        codec = "utf-8"  # an empty MSH-18 is read as UTF-8 beyond ASCII
    try:
        return text.encode(codec)
    except UnicodeEncodeError as error:
        raise client_fault("CHARSET_MISMATCH", f"the message holds a character that MSH-18's character "
                                               f"set cannot carry (offset {error.start})",
                           element="message") from None


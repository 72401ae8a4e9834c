"""Imaging reports received by SOAP (SubmitReport, gateway.xsd) as an input format
('soap-report'). Pure code.

The stored message is the SubmitReport element as the door received it (XML, UTF-8). It
becomes a canonical collection Bundle: a Patient (its identifiers, name, birth date, gender),
a DiagnosticReport (status, the examination as code, performed and issued times (in the
sender's time zone when written without an offset), the report
text as `conclusion` and as a text/plain `presentedForm`, the PDF as an application/pdf
`presentedForm` holding its exact bytes, `basedOn` the order or the prescription, the
centre as performer), and the Provenance every translation carries. Ids are deterministic
(DESIGN §5), from the identifiers.
"""
from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from zoneinfo import ZoneInfo

from lxml import etree

from adapters.soap.gateway import NAMESPACE
from adapters.soap.gateway.envelope import child, child_text, hardened_parser
from gateway.mapping.engine import _resource_id as resource_id  # the id rule of every translation
from gateway.mapping.runtime import TranslationContext
from gateway.translation.fhir_input import collection_bundle

MESSAGE_TYPE = "SOAP^REPORT"
PRESCRIPTION_SYSTEM = "urn:ma:hie:prescription"
PDF_MAGIC = b"%PDF-"


class ReportError(ValueError):
    def __init__(self, reason: str, location: str = ""):
        super().__init__(f"{location}: {reason}" if location else reason)
        self.reason = reason
        self.location = location


def report_system(sender_id: str) -> str:
    """The identifier system of one centre's report numbers."""
    return f"urn:ma:hie:report:{sender_id or 'unknown'}"


def order_system(sender_id: str) -> str:
    return f"urn:ma:hie:order:{sender_id or 'unknown'}"


def read_report(data: bytes) -> etree._Element:
    """The SubmitReport element of a stored message (hardened parser), or ReportError."""
    try:
        root = etree.fromstring(data, hardened_parser())
    except etree.XMLSyntaxError as error:
        raise ReportError(f"stored report is not XML: {error.msg}") from None
    if root.tag != f"{{{NAMESPACE}}}SubmitReport":
        raise ReportError("stored report is not a gw:SubmitReport element", "SubmitReport")
    return root


def pdf_bytes(report: etree._Element) -> bytes | None:
    """The PDF's exact bytes, None without one; ReportError when it is not a PDF."""
    pdf = child(report, "pdf")
    if pdf is None:
        return None
    try:
        data = base64.b64decode("".join((pdf.text or "").split()), validate=True)
    except (binascii.Error, ValueError):
        raise ReportError("pdf is not valid base64", "SubmitReport.pdf") from None
    if not data.startswith(PDF_MAGIC):
        raise ReportError("pdf does not hold a PDF document (no %PDF- header)", "SubmitReport.pdf")
    return data


# xs:dateTime's lexical form (the contract's type of performed and issued), offset optional.
_XS_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})?")


def fhir_moment(text: str | None, zone: ZoneInfo, location: str) -> str | None:
    """An xs:dateTime as a FHIR dateTime and instant hold it: with an offset, the sender's
    time zone's at that moment when it has none (FHIR requires one once there is a time), as
    written otherwise; ReportError for a moment FHIR cannot hold (24:00:00, year 0 or past
    9999)."""
    text = (text or "").strip()  # xs:dateTime collapses white space
    if not text:
        return None
    match = _XS_DATETIME.fullmatch(text)
    try:
        if match is None:
            raise ValueError
        moment = datetime.fromisoformat(match.group(1))
    except ValueError:
        raise ReportError(f"{text[:40]!r} is not a date and time FHIR can hold", location) from None
    if match.group(3):
        return text
    offset = int(moment.replace(tzinfo=zone).utcoffset().total_seconds()) // 60
    sign = "-" if offset < 0 else "+"
    return f"{text}{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"


def canonical_bundle(report: etree._Element, context: TranslationContext, mapping_version: str) -> dict:
    """The canonical Bundle of one SubmitReport (see the module docstring)."""
    sender = context.sender_id
    patient_node = child(report, "patient")
    if patient_node is None:
        raise ReportError("patient is required", "SubmitReport.patient")
    patient: dict = {"resourceType": "Patient", "identifier": [
        {"system": child_text(node, "system"), "value": child_text(node, "value")}
        for node in patient_node.findall(f"{{{NAMESPACE}}}identifier")]}
    family = child_text(patient_node, "familyName")
    given = [node.text for node in patient_node.findall(f"{{{NAMESPACE}}}givenName") if node.text]
    if family or given:
        name: dict = {}
        if family:
            name["family"] = family
        if given:
            name["given"] = given
        patient["name"] = [name]
    for key in ("birthDate", "gender"):
        value = child_text(patient_node, key)
        if value:
            patient[key] = value
    patient["id"] = resource_id("Patient", patient, context, 1)

    examination = child(report, "examination")
    if examination is None:
        raise ReportError("examination is required", "SubmitReport.examination")
    code: dict = {"text": child_text(examination, "display")}
    if child_text(examination, "code"):
        coding = {"code": child_text(examination, "code"), "display": child_text(examination, "display")}
        if child_text(examination, "system"):
            coding = {"system": child_text(examination, "system"), **coding}
        code["coding"] = [coding]
    text = child_text(report, "text") or ""
    diagnostic: dict = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": report_system(sender), "value": child_text(report, "reportId")}],
        "status": child_text(report, "status") or "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                  "code": "RAD", "display": "Radiology"}]}],
        "code": code,
        "subject": {"reference": "urn:uuid:" + patient["id"]},
        "conclusion": text,
        "presentedForm": [{"contentType": "text/plain; charset=utf-8",
                           "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                           "title": "report text"}],
    }
    based_on = []
    for node in report:
        if node.tag == f"{{{NAMESPACE}}}orderNumber":
            based_on.append({"identifier": {"system": order_system(sender), "value": node.text}})
        elif node.tag == f"{{{NAMESPACE}}}prescriptionId":
            based_on.append({"identifier": {"system": PRESCRIPTION_SYSTEM, "value": node.text}})
    if based_on:
        diagnostic["basedOn"] = based_on
    for name, element in (("performed", "effectiveDateTime"), ("issued", "issued")):
        moment = fhir_moment(child_text(report, name), context.timezone, f"SubmitReport.{name}")
        if moment is not None:
            diagnostic[element] = moment
    if sender:
        diagnostic["performer"] = [{"identifier": {"system": "urn:ma:inpe", "value": sender}}]
    pdf = pdf_bytes(report)
    if pdf is not None:
        title = child(report, "pdf").get("title") or "report"
        diagnostic["presentedForm"].append({"contentType": "application/pdf",
                                            "data": base64.b64encode(pdf).decode("ascii"),
                                            "title": title})
    diagnostic["id"] = resource_id("DiagnosticReport", diagnostic, context, 2)

    return collection_bundle([patient, diagnostic], context, mapping_version, MESSAGE_TYPE,
                             "SOAP imaging report made canonical")

"""The gateway's own SOAP contract: `gateway.wsdl` (SOAP 1.1, document/literal) and
`gateway.xsd`, in this folder, served by the HTTPS door at `/soap/?wsdl` and `/soap/gateway.xsd`.

Operations: `SubmitHL7Message` (ER7 text in, the ACK text out) and `SubmitReport` (an imaging
report with its PDF). `envelope` parses requests with a hardened parser and writes answers and
faults. Pure code.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
WSDL_PATH = str(HERE / "gateway.wsdl")
XSD_PATH = str(HERE / "gateway.xsd")
XSD_NAME = "gateway.xsd"  # as the WSDL imports it (a relative schemaLocation)

NAMESPACE = "urn:ma:hie:gateway:soap:1"
OPERATIONS = ("SubmitHL7Message", "SubmitReport")


def soap_action(operation: str) -> str:
    """The SOAPAction the WSDL binds to `operation`."""
    return f"{NAMESPACE}#{operation}"

"""The CNSS contract: `cnss.wsdl` (SOAP 1.1, document/literal) and `cnss-fse.xsd`, in this folder.

No public CNSS interface exists, so this contract is ours (namespace `urn:ma:cnss:amo:fse:1`);
the reference peer (`gateway.sandbox.cnss`) serves and enforces it, and the gateway builds its
requests from it with zeep (`gateway.delivery.care_sheet`). Operations: `VerifierDroits` (AMO
eligibility), `SoumettreFeuilleDeSoins` (electronic care sheet, idempotent by key) and
`ConsulterStatutFeuille`. The one rule both sides need that a schema cannot say, the EAN-13
check digit, is `valid_ean13` here.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
WSDL_PATH = str(HERE / "cnss.wsdl")
XSD_PATH = str(HERE / "cnss-fse.xsd")
XSD_NAME = "cnss-fse.xsd"  # as the WSDL imports it (a relative schemaLocation)

NAMESPACE = "urn:ma:cnss:amo:fse:1"
OPERATIONS = ("VerifierDroits", "SoumettreFeuilleDeSoins", "ConsulterStatutFeuille")


def soap_action(operation: str) -> str:
    """The SOAPAction the WSDL binds to `operation`."""
    return f"{NAMESPACE}#{operation}"


def valid_ean13(code: str) -> bool:
    """True when `code` is 13 digits whose last is the GS1 check digit of the first twelve."""
    if len(code) != 13 or not code.isascii() or not code.isdigit():
        return False
    digits = [int(c) for c in code]
    weighted = sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits[:12]))
    return (10 - weighted % 10) % 10 == digits[12]


def as_ean13(gtin: str) -> str:
    """A GTIN as its 13 digits: one trade item whatever its padding. A pharmacy that scans the
    box's GS1 DataMatrix sends the GTIN-14 (a 0, then the EAN-13 of its barcode); a UPC-A is
    12 digits. Zeros added or taken on the left leave the GS1 check digit as it was."""
    if gtin.isascii() and gtin.isdigit():
        if len(gtin) == 14 and gtin[0] == "0":
            return gtin[1:]
        if len(gtin) == 12:
            return "0" + gtin
    return gtin

"""Synthetic prescriptions of acts and their results (no real person: the sandbox CNSS's invented
insured BENALI Fatima): a doctor's OML^O21 / ORM^O01 and a laboratory's ORU^R01 naming the
prescription in ORC-4 (`RX-...^HIE`)."""
from __future__ import annotations

from prescription_support import DOCTOR, LABORATORY, PATIENT, _msh

# OBR-4: LOINC with the NABM code as alternate (what the CNSS care sheet needs).
GLUCOSE = "2345-7^Glucose [Masse/Volume] Serum^LN^B0412^Glycemie a jeun^NABM"
HBA1C = "4548-4^Hemoglobine glyquee^LN^B1104^HbA1c^NABM"
CHOLESTEROL = "2093-3^Cholesterol total^LN^B0582^Cholesterol total^NABM"
LOINC_ONLY = "1558-6^Glucose a jeun^LN"
THORAX = "ZBQK002^Radiographie du thorax^L^Z15^Radiographie thorax^NGAP"
IMAGING = ("RIS_ATLAS", "IMG_ATLAS_MARRAKECH", "INPE-100003")
PHARMACY = ("PHARMA_AGDAL", "PHARM_AGDAL", "INPE-100004")


def oml(control_id: str, tests=(GLUCOSE, HBA1C), sender=DOCTOR, control: str = "NW",
        filler: str = "", kind: str = "OML^O21^OML_O21") -> bytes:
    """OML^O21 (or ORM^O01): one ORC + OBR per test ordered; ORC-3 `filler` (a cancellation:
    the prescription id)."""
    segments = [_msh(sender, kind, control_id), PATIENT]
    for n, test in enumerate(tests, start=1):
        segments.append(f"ORC|{control}|BIO-{control_id}-{n}^CAB|{filler}|GRP-{control_id}^CAB|||||"
                        f"20260115092500|||200001^BENALI^Amina^^^Dr^^^INPE")
        segments.append(f"OBR|{n}|BIO-{control_id}-{n}^CAB||{test}")
    return ("\r".join(segments) + "\r").encode("utf-8")


def orm(control_id: str, tests=(THORAX,), **kwargs) -> bytes:
    return oml(control_id, tests, kind="ORM^O01^ORM_O01", **kwargs)


def oru(control_id: str, prescription: str | None, tests=(GLUCOSE,), status: str = "F",
        accession: str = "ACC-1", patient: str = PATIENT, sender=LABORATORY, namespace: str = "HIE") -> bytes:
    """ORU^R01: one ORC + OBR + OBX per test performed; ORC-4 the prescription (`RX-...^HIE`),
    OBR-3 the laboratory's accession number `accession`-n, OBR-25 the result status."""
    segments = [_msh(sender, "ORU^R01^ORU_R01", control_id), patient]
    group = f"{prescription}^{namespace}" if prescription else ""
    for n, test in enumerate(tests, start=1):
        code = test.split("^", 3)
        segments.append(f"ORC|RE|BIO-{n}^CAB|{accession}-{n}^{sender[1]}|{group}|CM")
        segments.append(f"OBR|{n}|BIO-{n}^CAB|{accession}-{n}^{sender[1]}|{test}|||20260116090000|||||||||||||||"
                        f"20260116100000||CH|{status}")
        segments.append(f"OBX|1|NM|{code[0]}^{code[1]}^{code[2]}||0.95|g/L|0.70-1.10|N|||{status}")
    return ("\r".join(segments) + "\r").encode("utf-8")

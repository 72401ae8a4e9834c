"""What the CNSS peer does with one request: bytes in, (HTTP status, SOAP bytes) out.

Blocking and reactor-free, run in the peer's thread pool. Order of checks for every request:
the SOAP 1.1 envelope (soap.py), the operation (by the Body element's name), the XSD (lxml;
the first violation with its line and element), then the rules the schema cannot say:

- the insured person is named by immatriculation, CNIE, or both (at least one);
- every EAN-13 has a correct GS1 check digit (EAN13_INVALIDE);
- an act line carries its amount (ACTE_SANS_MONTANT), unless it executes an e-prescription
  line (CNSS values it at the national reference tariff); where a line gives unit price and
  amount, amount = quantity x unit price to the centime; a total, when given, is the sum of the
  lines, which must then all carry their amount (MONTANT_INCOHERENT);
- the idempotency key: same key and same content, the stored answer again (one care sheet);
  same key and other content, CLE_REUTILISEE. "Same content" ignores namespace prefixes and
  whitespace between elements, so any client serialising the same sheet is recognised;
- e-prescription lines: a line's prescription reference names the sheet's numeroPrescription,
  a paper sheet (ordonnancePapier) names no prescription (ORDONNANCE_INCOHERENTE), and a
  line's key (cleLigne) is billed once across all sheets (LIGNE_DEJA_FACTUREE).

Every violation is a soap:Client fault; an unexpected exception is a soap:Server fault
(ERREUR_INTERNE), logged without the request.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import date, datetime, timezone
from decimal import Decimal

from lxml import etree
from twisted.logger import Logger

from adapters.soap.cnss import NAMESPACE, XSD_PATH, valid_ean13
from adapters.soap.envelope import SoapFault, answer_envelope, client_fault, server_fault
from gateway.delivery.care_sheet import xsd_date
from gateway.sandbox.cnss import seed
from gateway.sandbox.cnss.soap import element_bytes, fault_envelope, parse_request
from gateway.sandbox.cnss.store import CareSheetStore, KeyReused, LineAlreadyBilled

log = Logger()

NS = {"fse": NAMESPACE}
_EXPECTED = re.compile(r"Expected is (?:one of )?\(([^)]*)\)")
CENT = Decimal("0.01")
# xs:positiveInteger is unbounded; the store's INTEGER is 64 bits (and int() reads 4300 digits)
MAX_LINE_DIGITS = 18

# lxml error types -> what the fault string says (the detail carries lxml's own message).
SCHEMA_RULES = {
    "SCHEMAV_CVC_PATTERN_VALID": "format invalide",
    "SCHEMAV_CVC_DATATYPE_VALID_1_2_1": "valeur invalide pour son type",
    "SCHEMAV_CVC_ENUMERATION_VALID": "valeur hors de la liste autorisée",
    "SCHEMAV_CVC_FRACTIONDIGITS_VALID": "trop de décimales",
    "SCHEMAV_CVC_TOTALDIGITS_VALID": "trop de chiffres",
    "SCHEMAV_CVC_MININCLUSIVE_VALID": "valeur trop petite",
    "SCHEMAV_CVC_MINEXCLUSIVE_VALID": "valeur trop petite",
    "SCHEMAV_CVC_MAXINCLUSIVE_VALID": "valeur trop grande",
    "SCHEMAV_CVC_MINLENGTH_VALID": "valeur trop courte",
    "SCHEMAV_CVC_MAXLENGTH_VALID": "valeur trop longue",
    "SCHEMAV_ELEMENT_CONTENT": "élément inattendu ou manquant",
    "SCHEMAV_CVC_COMPLEX_TYPE_2_4": "élément manquant",
    "SCHEMAV_CVC_COMPLEX_TYPE_2_3": "texte interdit ici",
    "SCHEMAV_CVC_COMPLEX_TYPE_3_2_1": "attribut non autorisé",
    "SCHEMAV_CVC_ELT_1": "élément non déclaré",
}


def load_schema(path: str = XSD_PATH) -> etree.XMLSchema:
    # The contract's own file: read as a file (hardened_parser reads no file, not even this one).
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.XMLSchema(etree.parse(path, parser))


def _q(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


def _text(parent: etree._Element, path: str) -> str | None:
    value = parent.findtext(path, namespaces=NS)
    return value.strip() if value is not None else None


def _decimal(parent: etree._Element, path: str) -> Decimal | None:
    value = _text(parent, path)
    return Decimal(value) if value is not None else None


def _date(parent: etree._Element, path: str) -> date:
    """The day of a schema-valid xs:date (its time zone dropped); a Client fault for a year
    outside 1 to 9999, which the schema accepts (negative, five digits) and a Python date
    cannot hold."""
    node = parent.find(path, NS)
    try:
        return xsd_date(node.text.strip())
    except ValueError:
        raise client_fault("SCHEMA", "date hors des années 1 à 9999", line=node.sourceline,
                           element=etree.QName(node).localname) from None


def _rank(reference: etree._Element) -> str:
    """The digits of a schema-valid prescription line rank (xs:positiveInteger: "+0001" is 1)."""
    return _text(reference, "fse:ligne").lstrip("+").lstrip("0")


def _schema_path(path: str | None) -> str | None:
    """lxml's path of the faulty node, from below the operation, without prefixes."""
    steps = [step.split(":")[-1] for step in (path or "").split("/") if step]
    return "/".join(steps[1:]) or (steps[0] if steps else None)


def utc_timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def content_fingerprint(element: etree._Element) -> str:
    """SHA-256 of the element tree by (namespace-qualified name, attributes, trimmed text)."""
    shape = [
        (node.tag, sorted(node.attrib.items()), (node.text or "").strip())
        for node in element.iter()
        if isinstance(node.tag, str)
    ]
    return hashlib.sha256(json.dumps(shape, ensure_ascii=False).encode()).hexdigest()


class CnssService:
    """The peer's behaviour, given its store and (for tests) its table of insured persons."""

    def __init__(self, store: CareSheetStore, *, insured: tuple[seed.InsuredPerson, ...] = seed.INSURED,
                 schema: etree.XMLSchema | None = None):
        self.store = store
        self.insured = insured
        self.schema = schema if schema is not None else load_schema()
        self._operations = {
            _q("VerifierDroits"): self.verify_rights,
            _q("SoumettreFeuilleDeSoins"): self.submit_care_sheet,
            _q("ConsulterStatutFeuille"): self.care_sheet_status,
        }

    def handle(self, body: bytes, received_at: datetime) -> tuple[int, bytes]:
        """(HTTP status, SOAP envelope) for the request `body`, received at `received_at`."""
        try:
            operation = parse_request(body)
            handler = self._operations.get(operation.tag)
            if handler is None:
                raise client_fault("OPERATION_INCONNUE",
                                   f"opération inconnue: {etree.QName(operation).localname}",
                                   line=operation.sourceline,
                                   element=etree.QName(operation).localname)
            self._validate(operation)
            answer = handler(operation, received_at)
        except SoapFault as fault:
            log.debug("CNSS peer fault {code} {error}", code=fault.code, error=fault.error)
            return 500, fault_envelope(fault)
        except Exception:
            log.failure("CNSS peer: internal error")
            return 500, fault_envelope(server_fault("ERREUR_INTERNE", "erreur interne du service"))
        return 200, answer_envelope(answer)

    def _validate(self, operation: etree._Element) -> None:
        if self.schema.validate(operation):
            return
        error = self.schema.error_log[0]
        element = _schema_path(error.path)
        rule = SCHEMA_RULES.get(error.type_name, error.type_name.lower())
        expected = _EXPECTED.search(error.message or "")
        if expected:  # element names only, never values: safe in the fault string
            names = [name.rsplit("}", 1)[-1] for name in re.split(r"[\s,|()]+", expected.group(1)) if name]
            rule += f" (attendu: {', '.join(names)})"
        where = f"ligne {error.line}" + (f", élément {element}" if element else "")
        raise client_fault("SCHEMA", f"non conforme au schéma ({where}): {rule}",
                           line=error.line or None, element=element, detail_text=error.message)

    # VerifierDroits

    def verify_rights(self, request: etree._Element, received_at: datetime) -> etree._Element:
        immatriculation = _text(request, "fse:immatriculation")
        cnie = _text(request, "fse:cnie")
        day = _date(request, "fse:dateReference")
        person = seed.find_insured(immatriculation=immatriculation, cnie=cnie, table=self.insured)
        motive = person.motive_on(day) if person else "ASSURE_INCONNU"
        answer = etree.Element(_q("VerifierDroitsReponse"), nsmap={"fse": NAMESPACE})
        etree.SubElement(answer, _q("droitsOuverts")).text = "true" if motive == "DROITS_OUVERTS" else "false"
        etree.SubElement(answer, _q("motif")).text = motive
        etree.SubElement(answer, _q("dateReference")).text = day.isoformat()
        if person is None:
            return answer
        insured = etree.SubElement(answer, _q("assure"))
        fields = [("immatriculation", person.immatriculation), ("cnie", person.cnie),
                  ("nom", person.family_name), ("prenom", person.given_name),
                  ("dateNaissance", person.birth_date.isoformat()), ("regime", person.regime),
                  ("debutDroits", person.rights_from.isoformat()),
                  ("finDroits", person.rights_until.isoformat() if person.rights_until else None)]
        for name, value in fields:
            if value is not None:
                etree.SubElement(insured, _q(name)).text = value
        if person.dependants:
            dependants = etree.SubElement(answer, _q("ayantsDroit"))
            for dependant in person.dependants:
                node = etree.SubElement(dependants, _q("ayantDroit"))
                for name, value in [("rang", str(dependant.rank)), ("lien", dependant.relationship),
                                    ("cnie", dependant.cnie), ("nom", dependant.family_name),
                                    ("prenom", dependant.given_name),
                                    ("dateNaissance", dependant.birth_date.isoformat())]:
                    if value is not None:
                        etree.SubElement(node, _q(name)).text = value
        return answer

    # SoumettreFeuilleDeSoins

    def submit_care_sheet(self, request: etree._Element, received_at: datetime) -> bytes:
        self._check_care_sheet(request)
        key = _text(request, "fse:cleIdempotence")
        lines = tuple((_text(reference, "fse:cleLigne"), _text(reference, "fse:numero"),
                       int(_rank(reference)))
                      for reference in request.findall("fse:lignes/fse:ligne/fse:prescription", NS))
        paper = _text(request, "fse:ordonnancePapier") in ("true", "1")
        try:
            record, created = self.store.submit(
                key, content_fingerprint(request), element_bytes(request), utc_timestamp(received_at),
                lambda number, status, at: self._submission_answer(number, key, status, at),
                lines, paper,
            )
        except KeyReused:
            raise client_fault("CLE_REUTILISEE",
                               "clé d'idempotence déjà utilisée pour une autre feuille de soins",
                               element="cleIdempotence") from None
        except LineAlreadyBilled:
            raise client_fault("LIGNE_DEJA_FACTUREE",
                               "ligne de prescription déjà facturée dans une autre feuille de soins",
                               element="cleLigne") from None
        log.info("CNSS peer: care sheet {number} {what}", number=record.number,
                 what="received" if created else "already received (same key, same content)")
        return record.answer

    @staticmethod
    def _submission_answer(number: str, key: str, status: str, received_at: str) -> bytes:
        answer = etree.Element(_q("SoumettreFeuilleDeSoinsReponse"), nsmap={"fse": NAMESPACE})
        for name, value in [("numeroDossier", number), ("cleIdempotence", key),
                            ("statut", status), ("dateReception", received_at)]:
            etree.SubElement(answer, _q(name)).text = value
        return element_bytes(answer)

    def _check_care_sheet(self, request: etree._Element) -> None:
        insured = request.find("fse:assure", NS)
        if insured.find("fse:immatriculation", NS) is None and insured.find("fse:cnie", NS) is None:
            raise client_fault("SCHEMA", "assuré non identifié: immatriculation ou cnie requis",
                               line=insured.sourceline, element="assure")
        prescription = _text(request, "fse:numeroPrescription")
        paper = request.find("fse:ordonnancePapier", NS)
        if paper is not None and _text(request, "fse:ordonnancePapier") in ("true", "1") and prescription:
            raise client_fault("ORDONNANCE_INCOHERENTE",
                               "feuille sur ordonnance papier avec un numéro de prescription électronique",
                               line=paper.sourceline, element="ordonnancePapier")
        lines = request.findall("fse:lignes/fse:ligne", NS)
        keys: set[str] = set()
        for number, line in enumerate(lines, start=1):
            reference = line.find("fse:prescription", NS)
            if reference is None:
                continue
            if len(_rank(reference)) > MAX_LINE_DIGITS:
                raise client_fault("SCHEMA", f"ligne de soins {number}: rang de ligne de prescription trop grand",
                                   line=reference.sourceline, element="ligne")
            if _text(reference, "fse:numero") != prescription:
                raise client_fault("ORDONNANCE_INCOHERENTE",
                                   f"la ligne de soins {number} exécute une autre prescription que numeroPrescription",
                                   line=reference.sourceline, element="prescription")
            line_key = _text(reference, "fse:cleLigne")
            if line_key in keys:
                raise client_fault("LIGNE_DEJA_FACTUREE",
                                   f"ligne de soins {number}: clé de ligne répétée dans la feuille",
                                   line=reference.sourceline, element="cleLigne")
            keys.add(line_key)
        amounts: list[Decimal | None] = []
        for number, line in enumerate(lines, start=1):
            ean = line.find("fse:codeEAN13", NS)
            if ean is not None and not valid_ean13(ean.text.strip()):
                raise client_fault("EAN13_INVALIDE",
                                   f"code EAN-13 invalide (chiffre de contrôle), ligne de soins {number}",
                                   line=ean.sourceline, element="codeEAN13")
            amount = _decimal(line, "fse:montant")
            if amount is None and line.find("fse:acte", NS) is not None and line.find("fse:prescription", NS) is None:
                raise client_fault("ACTE_SANS_MONTANT", f"acte sans montant, ligne de soins {number}",
                                   line=line.sourceline, element="montant")
            unit_price = _decimal(line, "fse:prixUnitaire")
            if amount is not None and unit_price is not None:
                expected = (_decimal(line, "fse:quantite") * unit_price).quantize(CENT)
                if expected != amount:
                    raise client_fault("MONTANT_INCOHERENT",
                                       f"montant différent de quantité x prix unitaire, ligne de soins {number}",
                                       line=line.sourceline, element="montant")
            amounts.append(amount)
        total_node = request.find("fse:montantTotal", NS)
        if total_node is not None:
            if any(amount is None for amount in amounts):
                raise client_fault("MONTANT_INCOHERENT",
                                   "montantTotal donné alors qu'une ligne n'a pas de montant",
                                   line=total_node.sourceline, element="montantTotal")
            if Decimal(total_node.text.strip()) != sum(amounts, Decimal(0)):
                raise client_fault("MONTANT_INCOHERENT",
                                   "montantTotal différent de la somme des lignes",
                                   line=total_node.sourceline, element="montantTotal")

    # ConsulterStatutFeuille

    def care_sheet_status(self, request: etree._Element, received_at: datetime) -> etree._Element:
        number = _text(request, "fse:numeroDossier")
        key = _text(request, "fse:cleIdempotence")
        record = self.store.find(number=number) if number is not None else self.store.find(key=key)
        if record is None:
            raise client_fault("FEUILLE_INCONNUE", "aucune feuille de soins pour ce numéro ou cette clé",
                               element="numeroDossier" if number is not None else "cleIdempotence")
        answer = etree.Element(_q("ConsulterStatutFeuilleReponse"), nsmap={"fse": NAMESPACE})
        for name, value in [("numeroDossier", record.number), ("cleIdempotence", record.key),
                            ("statut", record.status), ("dateReception", record.received_at)]:
            etree.SubElement(answer, _q(name)).text = value
        return answer

"""CNSS destination adapter: canonical bundle -> electronic care sheet (FSE) -> SOAP request.

Pure: no reactor, no network. The envelope is built by zeep from the WSDL and XSD in
`adapters/soap/cnss/` (a zeep Client loaded once, whose transport reads only those files) and
checked against the XSD with lxml before it leaves, so what we send is what the contract says.

- `care_sheet_from_bundle(bundle)`: the care sheet's fields, named and nested as the XSD's
  elements (the keyword arguments of `SoumettreFeuilleDeSoins`, less the key), or None when
  the bundle has nothing billable. Billable: a ChargeItem `billable` (an NGAP or NABM act,
  FT1 of a DFT^P03) and a MedicationDispense `completed` (an EAN-13 drug: RDS^O13, pharmacy
  CSV). One care sheet is one patient and one episode: several patients, prescribers,
  practitioners or facilities in one message are refused rather than guessed.
- `care_sheet_request(bundle, url=, idempotency_key=)`: the POST for `SoumettreFeuilleDeSoins`
  (a `CareSheetRequest`, which knows its key), or None when nothing is billable.
- `eligibility_request(url=, on=, immatriculation= | cnie=)`: the POST for `VerifierDroits`;
  `read_eligibility(response)` its answer as an `Eligibility`, or `EligibilityUnavailable`
  carrying the same kind of outcome as a delivery.
- `classify_response(response, request)`: delivered (the reason names the care-sheet number),
  transient (soap:Server fault, 408, 429, 5xx without a readable fault) or permanent
  (soap:Client and other faults, any other unexpected answer: one the XSD refuses, or that
  answers another key than the request's).

What a care sheet needs and the bundle lacks raises `CareSheetError(reason)`: the message is
dead-lettered with that reason (never patient data), since retrying cannot fix it.

Where the fields come from (identifier systems of DESIGN.md section 4):
- insured person: the patient's `urn:ma:cnss:immatriculation` and/or `urn:ma:cnie`, or, when a
  Coverage names the patient as a spouse or child, the Coverage's `subscriberId`;
- performing facility: an Organization with an `urn:ma:inpe` identifier among the performers
  (RXD-30, the CSV's pharmacy), else the sender as the registry knows it (the Provenance
  author's `urn:ma:inpe` identifier, written on the live path);
- practitioner and prescriber: Practitioners' `urn:ma:inpe` (ChargeItem performer PRF / OP;
  MedicationDispense performer / its MedicationRequest's requester);
- prescription: `urn:ma:hie:prescription` (MedicationRequest.groupIdentifier or identifier,
  or authorizingPrescription.identifier); per dispensed line, the prescription line it fills
  (`prescription`: the MedicationRequest's `urn:ma:hie:prescription-line` identifier RX-.../n
  and the dispensation's `urn:ma:hie:dispensation` identifier, the line's own idempotency key
  at CNSS), as the e-prescription flow (gateway.prescriptions) writes them;
- paper prescription: a dispense with the extension PAPER_EXTENSION true makes the sheet
  `ordonnancePapier` (and may not name an e-prescription);
- amounts: ChargeItem.priceOverride (the line's amount, FT1-11 or FT1-12 x FT1-10), the
  unit-price extension of a dispense (CSV). A dispense without a price is sent without one
  (the contract lets CNSS value a drug at its regulated price), and so is an act performed
  against an e-prescription (valued at the national reference tariff); any other act without
  one is refused;
- a dependant's names: the first HumanName's family and every given name, trimmed, blank parts
  left out; the label (libelle): display, else the concept's text, else the code, cut at 200;
- the day of care (dateSoins): the earliest item's, on its day in Africa/Casablanca.

Values are sent as they are or refused, never cut or guessed: a name past 100 characters, an
amount that is not a finite number of MAD with 2 decimals at most, a character XML cannot carry
(the reason names the element), and anything else the XSD refuses (checked before sending).
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import zeep
import zeep.exceptions
from lxml import etree

from adapters.safe_xml import XML_BOMS, safe_parser
from adapters.soap.cnss import HERE as CONTRACT_DIR
from adapters.soap.cnss import NAMESPACE, WSDL_PATH, XSD_PATH, as_ean13, soap_action, valid_ean13
from gateway.delivery.outcome import DeliveryOutcome, HttpRequest, HttpResponse

IMMATRICULATION = "urn:ma:cnss:immatriculation"
CNIE = "urn:ma:cnie"
INPE = "urn:ma:inpe"
PRESCRIPTION = "urn:ma:hie:prescription"
PRESCRIPTION_LINE = "urn:ma:hie:prescription-line"  # RX-XXXX-XXXX-C/<line>
DISPENSATION = "urn:ma:hie:dispensation"
ACT = "urn:ma:hie:act"  # a performed act's id (ChargeItem.identifier): its line key at CNSS
PAPER_EXTENSION = "urn:ma:hie:StructureDefinition/paper-prescription"
GTIN = "https://www.gs1.org/gtin"
NOMENCLATURES = {"urn:ma:cnss:ngap": "NGAP", "urn:ma:cnss:nabm": "NABM"}
UNIT_PRICE_EXTENSION = "urn:ma:hie:StructureDefinition/unit-price"
PRACTITIONER_ROLE_ORDERING = "OP"  # v2-0443, as FT1.ChargeItem.yaml writes the FT1-21 orderer
RELATIONSHIPS = {"self": "ASSURE", "spouse": "CONJOINT", "common": "CONJOINT", "child": "ENFANT"}

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
CONTENT_TYPE = "text/xml; charset=utf-8"
CENT = Decimal("0.01")
AMOUNT_INTEGER_DIGITS = 10  # fse:Montant: 12 digits in all, 2 after the point
MAX_QUANTITY = 100000  # fse:Quantite
QUANTITY_DECIMALS = 3  # fse:Quantite's fractionDigits
MILLI = Decimal("0.001")
NAME_LIMIT = 100  # fse:Nom
REASON_LIMIT = 200
TRANSIENT_STATUSES = {408, 429, 503}
CNSS_ZONE = ZoneInfo("Africa/Casablanca")


class CareSheetError(Exception):
    """The bundle cannot make a valid care sheet; `reason` says why, without patient data."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# zeep, kept to the contract's own files

class LocalContractTransport(zeep.Transport):
    """A zeep transport that reads the contract's files and refuses everything else.

    zeep fetches what a WSDL imports through its transport; ours never opens a socket, so a
    WSDL edited to point at a URL fails loudly instead of reaching out at start-up.
    """

    def __init__(self, directory: str = str(CONTRACT_DIR)):
        super().__init__()
        self.directory = os.path.realpath(directory)

    def load(self, url: str) -> bytes:
        parsed = urlparse(url)
        if parsed.scheme not in ("", "file"):
            raise zeep.exceptions.TransportError(f"refusing to fetch {url}: the CNSS contract is local")
        path = os.path.realpath(parsed.path if parsed.scheme == "file" else url)
        if os.path.dirname(path) != self.directory:
            raise zeep.exceptions.TransportError(f"refusing to read {path}: outside {self.directory}")
        with open(path, "rb") as f:
            return f.read()

    def get(self, address, params, headers):
        raise zeep.exceptions.TransportError("this zeep client only builds messages")

    def post(self, address, message, headers):
        raise zeep.exceptions.TransportError("this zeep client only builds messages")


@functools.lru_cache(maxsize=1)
def cnss_client() -> zeep.Client:
    """The zeep Client of the CNSS WSDL, loaded once per process."""
    settings = zeep.Settings(strict=True, forbid_dtd=True, forbid_entities=True, xml_huge_tree=False)
    return zeep.Client(WSDL_PATH, transport=LocalContractTransport(), settings=settings)


@functools.lru_cache(maxsize=1)
def _schema() -> etree.XMLSchema:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    return etree.XMLSchema(etree.parse(XSD_PATH, parser))


def _envelope(operation: str, **fields) -> bytes:
    """The SOAP envelope of `operation` built by zeep, checked against the XSD, as bytes."""
    where = _not_xml_text(fields)
    if where is not None:
        raise CareSheetError(f"{operation}: {where} has a character XML cannot carry "
                             "(a control character, U+FFFE/U+FFFF or a lone surrogate)")
    client = cnss_client()
    try:
        envelope = client.create_message(client.service, operation, **fields)
    except (zeep.exceptions.ValidationError, TypeError, ValueError) as e:
        raise CareSheetError(f"{operation}: {_first_line(str(e))}") from None
    body = envelope.find(f"{{{SOAP_ENV}}}Body")
    schema = _schema()
    if not schema.validate(body[0]):
        error = schema.error_log[0]
        path = "/".join(step.split(":")[-1] for step in (error.path or "").split("/") if step)
        rule = error.type_name.replace("SCHEMAV_", "").lower()
        raise CareSheetError(f"{operation}: {path or 'request'} does not match the CNSS schema ({rule})")
    return etree.tostring(envelope, xml_declaration=True, encoding="utf-8")


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _not_xml_text(value, path: str = "") -> str | None:
    """The path (XSD element names, lines numbered from 1) of the first string in `value`
    that XML 1.0 cannot carry, or None. lxml refuses them without naming the element."""
    if isinstance(value, str):
        return (path or "request") if _NOT_XML.search(value) else None
    if isinstance(value, dict):
        for name, child in value.items():
            if isinstance(child, list):
                for n, item in enumerate(child, 1):
                    found = _not_xml_text(item, f"{path}{name}[{n}]/")
                    if found:
                        return found.rstrip("/")
            else:
                found = _not_xml_text(child, f"{path}{name}/")
                if found:
                    return found.rstrip("/")
    return None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:REASON_LIMIT] if text.strip() else "invalid"


@dataclass(frozen=True)
class CareSheetRequest(HttpRequest):
    """A SoumettreFeuilleDeSoins POST, with the key it carries: its answer must repeat it."""

    idempotency_key: str = ""


def _post(url: str, operation: str, body: bytes, cls: type[HttpRequest] = HttpRequest,
          **extra) -> HttpRequest:
    return cls("POST", url, body, {
        "Content-Type": CONTENT_TYPE,
        "SOAPAction": f'"{soap_action(operation)}"',  # a quoted URI, SOAP 1.1 section 6.1.1
    }, **extra)


# Requests

def care_sheet_request(bundle: dict, *, url: str, idempotency_key: str) -> HttpRequest | None:
    """The SoumettreFeuilleDeSoins POST for `bundle`, or None when nothing in it is billable."""
    fields = care_sheet_from_bundle(bundle)
    if fields is None:
        return None
    body = _envelope("SoumettreFeuilleDeSoins", cleIdempotence=idempotency_key, **fields)
    return _post(url, "SoumettreFeuilleDeSoins", body, CareSheetRequest, idempotency_key=idempotency_key)


def eligibility_request(*, url: str, on: date, immatriculation: str | None = None,
                        cnie: str | None = None) -> HttpRequest:
    """The VerifierDroits POST: are AMO rights open on `on`, by member number or by CNIE."""
    if (immatriculation is None) == (cnie is None):
        raise ValueError("give exactly one of immatriculation and cnie")
    who = {"immatriculation": immatriculation} if immatriculation is not None else {"cnie": cnie.upper()}
    return _post(url, "VerifierDroits", _envelope("VerifierDroits", dateReference=on, **who))


# Responses

def classify_response(response: HttpResponse, request: HttpRequest | None = None) -> DeliveryOutcome:
    """The verdict on a SoumettreFeuilleDeSoins answer (see the module docstring); given the
    `CareSheetRequest` it answers, a success must name that request's key."""
    body = _soap_body(response.body, response.headers.get("content-type"))
    failed = _failure(response, body)
    if failed is not None:
        return failed
    answer = body.find(f"{{{NAMESPACE}}}SoumettreFeuilleDeSoinsReponse")
    number = answer.findtext(f"{{{NAMESPACE}}}numeroDossier") if answer is not None else None
    if not number:
        return DeliveryOutcome.permanent("CNSS answered 200 without a care-sheet number", response)
    # Only a receipt the contract describes confirms the care sheet: a blank number or an
    # unknown status is no receipt, and one for another key acknowledges another sheet.
    if not _schema().validate(answer):
        return DeliveryOutcome.permanent("CNSS answered 200 with a receipt the CNSS schema refuses", response)
    if isinstance(request, CareSheetRequest) \
            and _child_text(answer, "cleIdempotence") != request.idempotency_key:
        return DeliveryOutcome.permanent("CNSS answered 200 for another idempotency key than the request's",
                                         response)
    status = _child_text(answer, "statut")
    return DeliveryOutcome.delivered(f"care sheet {number.strip()} {status}", response)


def _failure(response: HttpResponse, body: etree._Element | None) -> DeliveryOutcome | None:
    """The outcome of a fault or of a non-200 answer; None for a 200 SOAP answer to read."""
    fault = body.find(f"{{{SOAP_ENV}}}Fault") if body is not None else None
    if fault is not None:
        kind = _fault_kind(fault.find("faultcode"))
        error = _code(fault.findtext(f"detail/{{{NAMESPACE}}}Erreur/{{{NAMESPACE}}}code"))
        text = " ".join((fault.findtext("faultstring") or "").split())[:REASON_LIMIT]
        reason = f"CNSS {kind} fault{f' {error}' if error else ''}: {text}"
        if kind == "Server":
            return DeliveryOutcome.transient(reason, response)
        return DeliveryOutcome.permanent(reason, response)
    if response.code == 200 and body is not None:
        return None
    if response.code in TRANSIENT_STATUSES or 500 <= response.code <= 599:
        return DeliveryOutcome.transient(f"CNSS HTTP {response.code}", response)
    return DeliveryOutcome.permanent(f"CNSS HTTP {response.code}: unexpected answer", response)


_CODE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")


def _code(text: str | None) -> str | None:
    """A code of the peer's for a reason, or None: what comes before the peer's own words is
    logged above debug (`reason_head`), so it must be a short token, not free text."""
    text = (text or "").strip()
    return text if _CODE.fullmatch(text) else None


def _fault_kind(node: etree._Element | None) -> str:
    """The faultcode's SOAP 1.1 name (Client, Server, ... of soap:Client.Detail), or the code
    as written when its prefix names another namespace (a code of the peer's own:
    "cnss:Server" is not soap:Server), or "unknown". A prefix bound to nothing is taken for
    SOAP's, as it always was (some stacks write "soap:" without declaring it)."""
    code = _code(node.text if node is not None else None)
    if code is None:
        return "unknown"
    prefix, _, name = code.rpartition(":")
    if node.nsmap.get(prefix or None, SOAP_ENV) != SOAP_ENV:
        return code
    return name.split(".", 1)[0] or "unknown"


@dataclass(frozen=True)
class Dependant:
    rank: int
    relationship: str  # CONJOINT or ENFANT
    cnie: str | None
    birth_date: date


@dataclass(frozen=True)
class Eligibility:
    """A VerifierDroits answer: rights open on `on`, why (MotifDroits), and who is covered."""

    rights_open: bool
    motive: str  # DROITS_OUVERTS, DROITS_FERMES, DROITS_SUSPENDUS or ASSURE_INCONNU
    on: date
    immatriculation: str | None = None
    cnie: str | None = None
    dependants: tuple[Dependant, ...] = ()


class EligibilityUnavailable(Exception):
    """No eligibility answer: `outcome` says whether asking again later may help (transient)."""

    def __init__(self, outcome: DeliveryOutcome):
        super().__init__(outcome.reason)
        self.outcome = outcome


def read_eligibility(response: HttpResponse) -> Eligibility:
    """The answer to an `eligibility_request`, or EligibilityUnavailable (fault, HTTP error...)."""
    body = _soap_body(response.body, response.headers.get("content-type"))
    failed = _failure(response, body)
    if failed is not None:
        raise EligibilityUnavailable(failed)
    answer = body.find(f"{{{NAMESPACE}}}VerifierDroitsReponse")
    try:
        if answer is None or not _schema().validate(answer):
            raise ValueError
        text = functools.partial(_child_text, answer)
        dependants = tuple(
            Dependant(int(_child_text(node, "rang")), _child_text(node, "lien"), _child_text(node, "cnie"),
                      xsd_date(_child_text(node, "dateNaissance")))
            for node in answer.iterfind(f"{{{NAMESPACE}}}ayantsDroit/{{{NAMESPACE}}}ayantDroit"))
        return Eligibility(text("droitsOuverts") in ("true", "1"), text("motif"),
                           xsd_date(text("dateReference")), text("assure/immatriculation"),
                           text("assure/cnie"), dependants)
    except ValueError:
        raise EligibilityUnavailable(DeliveryOutcome.permanent(
            "CNSS answered 200 without a valid VerifierDroitsReponse", response)) from None


_XSD_DATE = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:Z|[+-][0-9]{2}:[0-9]{2})?")


def xsd_date(text: str | None) -> date:
    """An xs:date, which may carry a zone ("2026-01-15Z", "2026-01-15+01:00": JAXB writes
    one): the day as written. ValueError for anything else."""
    match = _XSD_DATE.fullmatch(text or "")
    if match is None:
        raise ValueError(f"not an xs:date: {text!r:.40}")
    return date.fromisoformat(match.group(1))


def _child_text(parent: etree._Element, path: str) -> str | None:
    qualified = "/".join(f"{{{NAMESPACE}}}{step}" for step in path.split("/"))
    value = parent.findtext(qualified)
    return value.strip() if value is not None else None


_CHARSET = re.compile(r';\s*charset\s*=\s*"?([A-Za-z0-9._:\-]{1,40})"?', re.IGNORECASE)


def _soap_body(data: bytes, content_type: str | None = None) -> etree._Element | None:
    """The soap:Body of `data`, or None when it is not a SOAP 1.1 envelope (hardened parse).

    A byte order mark may start it (XML 1.0, 4.3.3: .NET stacks write one). Bytes that do not
    read in the encoding the document declares (UTF-8 by default) are read again in the
    Content-Type's charset, which RFC 7303 makes authoritative: an ISO-8859-1 fault without an
    XML declaration is still a fault."""
    if not data or not (data.lstrip().startswith(b"<") or data.startswith(XML_BOMS)):
        return None
    root = _parse_xml(data)
    charset = _CHARSET.search(content_type or "")
    if root is None and charset:
        root = _parse_xml(data, charset.group(1))
    if root is None:
        return None
    if root.tag != f"{{{SOAP_ENV}}}Envelope" or root.getroottree().docinfo.doctype:
        return None
    return root.find(f"{{{SOAP_ENV}}}Body")


def _parse_xml(data: bytes, encoding: str | None = None) -> etree._Element | None:
    try:
        return etree.fromstring(data, safe_parser(huge_tree=False, encoding=encoding))
    except (etree.XMLSyntaxError, LookupError):  # LookupError: a charset libxml2 does not know
        return None


# Bundle -> care sheet

@dataclass
class _Line:
    fields: dict
    day: date | None


class _Bundle:
    """The resources of a bundle and their references (urn:uuid fullUrls and Type/id)."""

    def __init__(self, bundle: dict):
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise CareSheetError("not a FHIR Bundle")
        self.resources: list[dict] = []
        self._by_reference: dict[str, dict] = {}
        for entry in bundle.get("entry") or ():
            resource = (entry or {}).get("resource")
            if not isinstance(resource, dict):
                continue
            self.resources.append(resource)
            if entry.get("fullUrl"):
                self._by_reference[entry["fullUrl"]] = resource
            if resource.get("id"):
                self._by_reference[f"{resource.get('resourceType')}/{resource['id']}"] = resource

    def of_type(self, resource_type: str) -> list[dict]:
        return [r for r in self.resources if r.get("resourceType") == resource_type]

    def resolve(self, reference: dict | None) -> dict | None:
        if not isinstance(reference, dict):
            return None
        return self._by_reference.get(reference.get("reference") or "")


def _identifier(resource: dict | None, system: str) -> str | None:
    for identifier in (resource or {}).get("identifier") or ():
        if identifier.get("system") == system and str(identifier.get("value") or "").strip():
            return str(identifier["value"]).strip()
    return None


def _inpe_of(bundle: _Bundle, reference: dict | None, resource_type: str) -> str | None:
    """The INPE of the `resource_type` that `reference` points at (in the bundle, or logically).

    A logical reference by INPE that does not declare its type is taken for an establishment
    (the pharmacy of the dispensing CSV export).
    """
    target = bundle.resolve(reference)
    if target is not None:
        return _identifier(target, INPE) if target.get("resourceType") == resource_type else None
    logical = (reference or {}).get("identifier") or {}
    declared = (reference or {}).get("type") or "Organization"
    if logical.get("system") == INPE and logical.get("value") and declared == resource_type:
        return str(logical["value"]).strip()
    return None


def _one(values: set, what: str) -> str | None:
    values.discard(None)
    if len(values) > 1:
        raise CareSheetError(f"{len(values)} different {what} in one message: one care sheet has one")
    return next(iter(values), None)


def _day(value) -> date | None:
    """The day of a FHIR date or dateTime in Casablanca, where AMO rights are counted (the
    prescription flow checks eligibility on that day): 23:30Z on the 15th is the 16th there."""
    return local_day(value, CNSS_ZONE)


def local_day(value, zone) -> date | None:
    """The day a FHIR date or dateTime falls on in `zone`: a time with an offset is converted,
    one without it is the day as the sender wrote it; None when `value` is neither."""
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        day = date.fromisoformat(value[:10])
    except ValueError:
        return None
    try:
        moment = datetime.fromisoformat(value)
        return moment.astimezone(zone).date() if moment.tzinfo is not None else day
    except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 shifted out of range
        return day


def _number(value, what: str) -> Decimal:
    """`value` as a finite Decimal: NaN and infinities would fail every comparison."""
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise CareSheetError(f"{what} is not a number") from None
    if not number.is_finite():
        raise CareSheetError(f"{what} is not a finite number")
    return number


def _amount(money: dict | None, what: str) -> Decimal | None:
    if not isinstance(money, dict) or money.get("value") is None:
        return None
    currency = money.get("currency") or "MAD"
    if currency != "MAD":
        raise CareSheetError(f"{what} is in {currency}: CNSS takes MAD only")
    value = _number(money["value"], what)
    if value.adjusted() >= AMOUNT_INTEGER_DIGITS:  # before quantize, which fails past the precision
        raise CareSheetError(f"{what} has more than {AMOUNT_INTEGER_DIGITS} digits before the decimal point")
    if value < 0 or value != value.quantize(CENT):
        raise CareSheetError(f"{what} is negative or has more than 2 decimals")
    return value.quantize(CENT)


def _quantity(quantity: dict | None, what: str, default: Decimal | None = None) -> Decimal:
    value = (quantity or {}).get("value")
    if value is None:
        if default is None:
            raise CareSheetError(f"{what} has no quantity")
        return default
    number = _number(value, f"{what} quantity")
    if number <= 0:
        raise CareSheetError(f"{what} quantity is not positive")
    if number > MAX_QUANTITY:
        raise CareSheetError(f"{what} quantity is more than {MAX_QUANTITY}, the contract's maximum")
    if number.as_tuple().exponent < -QUANTITY_DECIMALS and number != number.quantize(MILLI):
        # Refused here, not by the XSD after: a price divided by 1E-20 overflows the context.
        raise CareSheetError(f"{what} quantity has more than {QUANTITY_DECIMALS} decimals, the contract's maximum")
    return number.normalize() if number == number.to_integral_value() else number


def _label(concept: dict, coding: dict) -> str:
    """The first non-blank of display, text and code, whitespace collapsed (a blank display
    would make an empty libelle)."""
    for value in (coding.get("display"), concept.get("text"), coding.get("code")):
        label = " ".join(str(value).split()) if isinstance(value, (str, int)) else ""
        if label:
            return label[:200]
    return ""


def _charge_item_line(bundle: _Bundle, item: dict, n: int, people: dict) -> _Line:
    what = f"ChargeItem {n}"
    concept = item.get("code") or {}
    coding = next((c for c in concept.get("coding") or () if c.get("system") in NOMENCLATURES
                   and c.get("code")), None)
    if coding is None:
        raise CareSheetError(f"{what} has no NGAP (urn:ma:cnss:ngap) or NABM (urn:ma:cnss:nabm) code")
    quantity = _quantity(item.get("quantity"), what, default=Decimal(1))
    amount = _amount(item.get("priceOverride"), f"{what} price")
    reference = _act_reference(bundle, item, people)
    if amount is None and reference is None:
        raise CareSheetError(f"{what} has no price (priceOverride): an act needs its amount")
    line = {"acte": {"nomenclature": NOMENCLATURES[coding["system"]], "code": str(coding["code"]).strip()},
            "libelle": _label(concept, coding), "quantite": quantity}
    if amount is not None:
        unit_price = amount / quantity
        if unit_price == unit_price.quantize(CENT):  # only when exact: the peer checks q x p = amount
            line["prixUnitaire"] = unit_price.quantize(CENT)
        line["montant"] = amount
    if reference is not None:
        line["prescription"] = reference
    for performer in item.get("performer") or ():
        codes = {c.get("code") for c in ((performer.get("function") or {}).get("coding") or ())}
        role = "prescribers" if PRACTITIONER_ROLE_ORDERING in codes else "practitioners"
        people[role].add(_inpe_of(bundle, performer.get("actor"), "Practitioner"))
    people["facilities"].add(_inpe_of(bundle, item.get("performingOrganization"), "Organization"))
    when = item.get("occurrenceDateTime") or (item.get("occurrencePeriod") or {}).get("start") \
        or item.get("enteredDate")
    return _Line(line, _day(when))


def _dispense_line(bundle: _Bundle, dispense: dict, n: int, people: dict) -> _Line:
    what = f"MedicationDispense {n}"
    concept = dispense.get("medicationCodeableConcept")
    if concept is None:
        medication = bundle.resolve(dispense.get("medicationReference")) or {}
        concept = medication.get("code") or {}
    coding = next((c for c in concept.get("coding") or () if c.get("system") == GTIN and c.get("code")), None)
    if coding is None:
        raise CareSheetError(f"{what} has no EAN-13 drug code ({GTIN})")
    code = as_ean13(str(coding["code"]).strip())
    if not valid_ean13(code):
        raise CareSheetError(f"{what} drug code is not a valid EAN-13 (13 digits, GS1 check digit)")
    quantity = _quantity(dispense.get("quantity"), what)
    line = {"codeEAN13": code, "libelle": _label(concept, coding), "quantite": quantity}
    price = next((e.get("valueMoney") for e in dispense.get("extension") or ()
                  if e.get("url") == UNIT_PRICE_EXTENSION), None)
    unit_price = _amount(price, f"{what} unit price")
    if unit_price is not None:
        line["prixUnitaire"] = unit_price
        line["montant"] = (unit_price * quantity).quantize(CENT)
    for performer in dispense.get("performer") or ():
        people["practitioners"].add(_inpe_of(bundle, performer.get("actor"), "Practitioner"))
        people["facilities"].add(_inpe_of(bundle, performer.get("actor"), "Organization"))
    prescribed_line = None
    for reference in dispense.get("authorizingPrescription") or ():
        request = bundle.resolve(reference)
        if request is not None:
            people["prescribers"].add(_inpe_of(bundle, request.get("requester"), "Practitioner"))
            group = request.get("groupIdentifier") or {}
            people["prescriptions"].add(str(group["value"]).strip()
                                        if group.get("system") == PRESCRIPTION and group.get("value")
                                        else _identifier(request, PRESCRIPTION))
            prescribed_line = prescribed_line or _identifier(request, PRESCRIPTION_LINE)
        else:
            logical = (reference or {}).get("identifier") or {}
            if logical.get("system") == PRESCRIPTION and logical.get("value"):
                people["prescriptions"].add(str(logical["value"]).strip())
    if any(isinstance(e, dict) and e.get("url") == PAPER_EXTENSION and e.get("valueBoolean") is True
           for e in dispense.get("extension") or ()):
        people["paper"].add(True)
    reference = _prescription_reference(prescribed_line, _identifier(dispense, DISPENSATION))
    if reference is not None:
        line["prescription"] = reference
    when = dispense.get("whenHandedOver") or dispense.get("whenPrepared")
    return _Line(line, _day(when))


def _act_reference(bundle: _Bundle, item: dict, people: dict) -> dict | None:
    """The ReferencePrescription of an act performed against an e-prescription: the ChargeItem's
    act id (ACT) and, through its service (the report) and the report's basedOn, the
    ServiceRequest's line id RX-.../n; the prescription joins the sheet's. None otherwise."""
    key = _identifier(item, ACT)
    if key is None:
        return None
    for service in item.get("service") or ():
        report = bundle.resolve(service)
        for based_on in (report or {}).get("basedOn") or ():
            request = bundle.resolve(based_on)
            if request is None or request.get("resourceType") != "ServiceRequest":
                continue
            prescribed_line = _identifier(request, PRESCRIPTION_LINE)
            if prescribed_line is None:
                continue
            requisition = request.get("requisition") or {}
            people["prescriptions"].add(str(requisition["value"]).strip()
                                        if requisition.get("system") == PRESCRIPTION and requisition.get("value")
                                        else prescribed_line.rpartition("/")[0])
            return _prescription_reference(prescribed_line, key)
    raise CareSheetError("an act performed against a prescription (urn:ma:hie:act) names no prescription "
                         "line: its service's basedOn must be the prescribed ServiceRequest")


def _prescription_reference(prescribed_line: str | None, key: str | None) -> dict | None:
    """The line's ReferencePrescription: from 'RX-XXXX-XXXX-C/2' and the dispensation id."""
    if not prescribed_line or not key:
        return None
    number, _, rank = prescribed_line.rpartition("/")
    if not number or not rank.isdigit() or int(rank) < 1:
        raise CareSheetError(f"prescription line identifier is not <prescription>/<line> ({PRESCRIPTION_LINE})")
    return {"numero": number, "ligne": int(rank), "cleLigne": key}


def _sender_inpe(bundle: _Bundle) -> str | None:
    """The sending facility's INPE, as the live translation records it in the Provenance."""
    for provenance in bundle.of_type("Provenance"):
        for agent in provenance.get("agent") or ():
            identifier = (agent.get("who") or {}).get("identifier") or {}
            if identifier.get("system") == INPE and identifier.get("value"):
                return str(identifier["value"]).strip()
    return None


def _insured_and_beneficiary(bundle: _Bundle, patient: dict) -> tuple[dict, dict]:
    own_number = _identifier(patient, IMMATRICULATION)
    own_cnie = (_identifier(patient, CNIE) or "").upper() or None
    coverage = next((c for c in bundle.of_type("Coverage")
                     if bundle.resolve(c.get("beneficiary")) is patient
                     and c.get("status", "active") == "active"), None)
    relationship = "self"
    if coverage is not None:
        codes = [c.get("code") for c in ((coverage.get("relationship") or {}).get("coding") or ())]
        relationship = codes[0] if codes and codes[0] else "self"
    link = RELATIONSHIPS.get(relationship)
    if link is None:
        raise CareSheetError(f"the patient is covered as {relationship!s:.20}: AMO care sheets "
                             "cover the insured, a spouse or a child")
    if link == "ASSURE":
        if own_number is None and own_cnie is None:
            raise CareSheetError(f"the patient has neither a CNSS immatriculation ({IMMATRICULATION}) "
                                 f"nor a CNIE ({CNIE})")
        insured = {k: v for k, v in (("immatriculation", own_number), ("cnie", own_cnie)) if v}
        return insured, {"lien": "ASSURE"}
    subscriber = str(coverage.get("subscriberId") or "").strip() or \
        _identifier(bundle.resolve(coverage.get("subscriber")), IMMATRICULATION)
    if not subscriber:
        raise CareSheetError("the patient is a dependant but the Coverage names no subscriberId "
                             "(the insured person's immatriculation)")
    beneficiary: dict = {"lien": link}
    if own_cnie:
        beneficiary["cnie"] = own_cnie
    name = next(iter(patient.get("name") or ()), {}) or {}
    family = _name_part([name.get("family")], "Patient.name.family")
    if family:
        beneficiary["nom"] = family
    given = _name_part(name.get("given") or (), "Patient.name.given")
    if given:
        beneficiary["prenom"] = given
    if _day(patient.get("birthDate")):
        beneficiary["dateNaissance"] = _day(patient["birthDate"])
    return {"immatriculation": subscriber}, beneficiary


def _name_part(parts, where: str) -> str | None:
    """The non-blank `parts` of a name, trimmed and joined (every given name: XPN-2 and
    XPN-3), or None; refused past fse:Nom's 100 characters rather than cut short."""
    text = " ".join(str(part).strip() for part in parts if isinstance(part, str) and part.strip())
    if len(text) > NAME_LIMIT:
        raise CareSheetError(f"the patient's {where} is longer than {NAME_LIMIT} characters, "
                             "the CNSS maximum: it would be sent cut short")
    return text or None


def care_sheet_from_bundle(bundle: dict) -> dict | None:
    """The care sheet for `bundle` as XSD-named fields, None if nothing is billable.

    Raises CareSheetError when the billable content cannot make one valid care sheet.
    """
    resources = _Bundle(bundle)
    charges = [r for r in resources.of_type("ChargeItem") if r.get("status") == "billable"]
    dispenses = [r for r in resources.of_type("MedicationDispense") if r.get("status") == "completed"]
    if not charges and not dispenses:
        return None
    people: dict[str, set] = {"prescribers": set(), "practitioners": set(), "facilities": set(),
                              "prescriptions": set(), "paper": set()}
    lines = [_charge_item_line(resources, item, n, people) for n, item in enumerate(charges, 1)]
    lines += [_dispense_line(resources, item, n, people) for n, item in enumerate(dispenses, 1)]

    patients = {id(p): p for p in (resources.resolve(item.get("subject")) for item in charges + dispenses)
                if p is not None and p.get("resourceType") == "Patient"}
    if not patients:
        raise CareSheetError("the billable items name no Patient of the bundle")
    if len(patients) > 1:
        raise CareSheetError(f"billable items for {len(patients)} patients in one message: "
                             "a care sheet is for one person")
    insured, beneficiary = _insured_and_beneficiary(resources, next(iter(patients.values())))

    facility = _one(people["facilities"], "performing facilities") or _sender_inpe(resources)
    if facility is None:
        raise CareSheetError("no performing facility INPE: no Organization with urn:ma:inpe among the "
                             "performers, and no sender INPE in the Provenance")
    days = [line.day for line in lines if line.day is not None]
    if not days:
        raise CareSheetError("no date of care on any billable item")

    sheet: dict = {"assure": insured, "beneficiaire": beneficiary}
    prescriber = _one(people["prescribers"], "prescribers")
    if prescriber:
        sheet["inpePrescripteur"] = prescriber
    executant = {"inpeEtablissement": facility}
    practitioner = _one(people["practitioners"], "performing practitioners")
    if practitioner:
        executant["inpePraticien"] = practitioner
    sheet["executant"] = executant
    prescription = _one(people["prescriptions"], "prescriptions")
    if prescription:
        sheet["numeroPrescription"] = prescription
    if people["paper"]:
        if prescription:
            raise CareSheetError("a dispense marked paper-based names an e-prescription: one or the other")
        sheet["ordonnancePapier"] = True
    for line in lines:
        numero = (line.fields.get("prescription") or {}).get("numero")
        if numero is not None and numero != prescription:
            raise CareSheetError("a line's prescription reference is not the care sheet's prescription")
    sheet["dateSoins"] = min(days)
    sheet["lignes"] = {"ligne": [line.fields for line in lines]}
    amounts = [line.fields.get("montant") for line in lines]
    if all(amount is not None for amount in amounts):
        sheet["montantTotal"] = sum(amounts, Decimal(0))
    return sheet

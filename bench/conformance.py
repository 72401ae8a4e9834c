"""Conformance on public material: every HL7 v2 (ER7), v2 XML and ASTM file of the third-party
corpus (../shared/corpus, listed by its INDEX.tsv; CDA and XDS documents are skipped) through
read_input and the mapping set, as the gateway translates them.

Each message ends in one of:

  valid      translated into a Bundle whose every resource validates (fhir.resources R4B)
  rejected   refused with a precise reason (InputError, TranslationError, BatchError), or
             translated into nothing (a Bundle with only its Provenance)
  not translated  the mapping set says so (NotTranslated: an acknowledgement, a query)
  invalid    translated, but the Bundle does not validate: a mapping bug
  crash      any other exception (or more than TIME_LIMIT seconds): a gateway bug

Messages the corpus marks as deliberately malformed (fuzzer output, broken envelopes, bad MSH,
XXE probes and DOCTYPEs SOURCES.md says are meant to be rejected, Mirth's own XML dialect,
segments broken across lines: MALFORMED and MALFORMED_NOTES below, from CURATED_NOTES.tsv,
INDEX.tsv and SOURCES.md) are correct when rejected (or translated into a valid bundle); only
invalid output and crashes count as failures there. An analyzer capture holding several
ASTM messages is split into them, as the E1381 receiver hands them over. Well-formed messages of a type no message map covers are `rejected`
too, and counted apart ("no map"), so that the translated share can be read both over every
well-formed message and over those in scope.

A message with no segment after its header (an MSH alone: a parser's or a header map's test
fixture) is malformed too: every HL7 message structure requires segments after the MSH, and
there is nothing in it to translate. Well-formed messages that carry no clinical data, by their
type (NOT_CLINICAL: acknowledgements, which ingest stores as 'ignored' and never translates;
queries, which ask for data and carry none) or, for ASTM, a host query (a Q record and no
result), are counted apart as "not clinical": translating them is not the gateway's job, so the
share over clinical messages leaves them out; their outcome is correct whatever it is, unless
invalid output or a crash. This list is the harness's own, not read from the mappings, so that
a mapping cannot take a clinical type out of the count by declaring it not translated (such a
message counts as rejected).

Where the corpus has an expected FHIR output (Microsoft `X-expected.json`, ReportStream
`X.fhir`, the IG's `FHIR_bundle.hl7_ADT_A01.json`), a key-field agreement score compares
comparable facts of both bundles: patient identifier values, family and given names, birth
date, gender; observation codes, values, units, statuses and effective dates, report statuses
and effective dates (dates at the precision both have). Score = matched / expected facts.
Facts our guide-following representation cannot have are not compared: Observations Microsoft's
converter makes from non-observation segments (coded in its placeholder code system), the
Observation facts of MDM (the guide makes MDM's OBX the DocumentReference's content) and the
DiagnosticReport facts of order messages and MDM (the guide makes their OBR a ServiceRequest). A naive
v2 time is in the sender's zone: ReportStream's messages are translated as from senders whose
zone is UTC, as its expected bundles were made (SENDER_ZONES); a file INDEX.tsv says is in
ISO-8859-1 without MSH-18 is read as from a sender configured with that fallback (SENDER_CHARSETS).

    .venv/bin/python bench/conformance.py              # table, top reasons, var/bench/conformance.json
    .venv/bin/python bench/conformance.py --verbose    # one line per message
"""
from __future__ import annotations

import argparse
import ast
import collections
import csv
import datetime as dt
import fnmatch
import json
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CORPUS = ROOT.parent / "shared" / "corpus"

SKIPPED_TYPES = ("CDA", "XDS")  # documents, not messages
NOT_INPUT = (".json", ".fhir", ".expected", ".ccda")
TIME_LIMIT = 10  # seconds per message: more is a hang, counted as a crash
TARGET_VALID = 0.95
TARGET_SCORE = 0.90
RECEIVED_AT = dt.datetime(2026, 1, 15, 9, 30, tzinfo=dt.timezone.utc)
TIMEZONE = ZoneInfo("Africa/Casablanca")
# A naive v2 time is in the sender's zone, which is sender configuration. ReportStream's
# expected bundles were made with its senders' zone UTC (a naive '20241015034304' is
# '2024-10-15T03:43:04Z' there): its messages are translated as from senders so configured,
# else the same wall-clock time would be compared across two zones.
SENDER_ZONES = {"cdc-reportstream": ZoneInfo("UTC")}
# The character set a sender that declares none (MSH-18 empty) is configured with (its
# `charset_fallback`), where INDEX.tsv says which one its bytes are in.
SENDER_CHARSETS = {"ISO-8859-1 bytes": "iso8859-1"}

# Deliberately malformed or not a standard format: rejection is the right answer.
MALFORMED = {
    "nhapi/bad-inputs/*": "fuzzer output (nHapi BadInputs)",
    "python-hl7/sample_bad_*": "broken batch/file envelope",
    "ruby-hl7/empty.hl7": "zero-byte file",
    "ruby-hl7/empty-batch.hl7": "batch whose BTS count lies",
    "ruby-hl7/empty_segments.hl7": "segment with an empty name",
    "ruby-hl7/adt_a01.hl7": "MSH-2 '^\\&' (no repetition character)",
    "ruby-hl7/realm/realm-minimal-message.hl7": "MSH-2 '^~&' (no escape character)",
    "hl7apy/test_parser_L1[89]?.hl7": "malformed MSH-2 (upstream expects failure)",
    "hl7apy/test_parser_L20?.hl7": "malformed MSH-2 (upstream expects failure)",
    "hl7apy/test_parser_L21?.hl7": "malformed MSH (upstream expects failure)",
    "hl7apy/test_parser_L23?.hl7": "truncated MSH (upstream expects failure)",
    "hapi-hl7v2/er7/util_messages_04.hl7": "MSH-2 with 3 encoding characters",
    "ipf/platform-camel/ihe/mllp/iti8/iti8-a01-incomplete.hl7": "ADT^A01 without PID",
    "ipf/modules/hl7-kotlin/msg-04.hl7": "unknown message type ABC^XYZ",
    "ipf/modules/hl7/msg-02.hl7": "junk repeating MSH-18",
    "ipf/*invalid*": "upstream negative case",
    "node-hl7-complete/invalid/*": "filed under invalid/ upstream",
    "hapi-hl7v2/xml/xml-with-xxe.xml": "XXE probe",
    "hapi-hl7v2/xml/get_*.xml": "DOCTYPE with an external DTD (XXE probe, SOURCES.md: meant to be rejected)",
    "hapi-hl7v2/xml/weird_message.xml": "invalid TS, unknown root element",
    "mirth-connect/serializer/*.xml": "Mirth's own XML dialect, not HL7 v2 XML",
    "astm/tgenaux-astm-lis/RepeatFields.txt": "a lone O record (no H header): a fragment, not a message",
    "linuxforhealth-hl7v2-fhir-converter/sample_*.hl7": "MSH-2 '^~\\\\&' repeats the escape character",
}
# Message types that carry no clinical data (HL7 table 0076): the gateway does not translate them.
NOT_CLINICAL = {
    "ACK": "an acknowledgement (ingest stores it as 'ignored')",
    "QBP": "a query", "QRY": "a query", "VXQ": "a query", "OSQ": "a query", "SQM": "a query",
    "RQI": "a request for patient information (a query)",
}
# Segments (or ASTM records) that are only the envelope of a message.
ENVELOPE = {"MSH", "SFT", "H", "L"}
HEADER_ONLY = "no segment after the header (every message structure requires one): a test fixture"

# INDEX.tsv notes that say a file is malformed (segments broken by stray line breaks).
MALFORMED_NOTES = {
    "malformed segment id(s)": "segment broken across lines (malformed segment ids)",
    "(no segment terminators)": "segments run together on one line (no segment terminators)",
}

# Expected outputs the INDEX notes do not name in the `X.fhir` / `X-expected.json` form.
EXTRA_EXPECTED = {
    "hl7-v2-to-fhir-ig/test_conversions_ADT_A01.hl7": "hl7-v2-to-fhir-ig/FHIR_bundle.hl7_ADT_A01.json",
}


# --------------------------------------------------------------------------- corpus

@dataclass
class Row:
    path: str
    source: str
    message_type: str
    notes: str
    expected: str = ""  # corpus-relative path of an expected FHIR Bundle JSON


def corpus_rows(corpus: Path = CORPUS) -> list[Row]:
    """The message files of INDEX.tsv (HL7 v2 ER7 and XML, ASTM), with their expected bundle."""
    rows = []
    with open(corpus / "INDEX.tsv", newline="", encoding="utf-8") as f:
        for item in csv.DictReader(f, delimiter="\t"):
            path, kind = item["path"], item["message_type"]
            if kind.startswith(SKIPPED_TYPES) or path.endswith(NOT_INPUT):
                continue
            rows.append(Row(path, item["source"], kind, item["notes"], expected_of(item, corpus)))
    return rows


def expected_of(item: dict, corpus: Path) -> str:
    path = item["path"]
    if path in EXTRA_EXPECTED:
        return EXTRA_EXPECTED[path]
    for name in re.findall(r"expected: ([^;]+?) \(FHIR R4 Bundle JSON\)", item.get("notes", "")):
        candidate = str(Path(path).parent / name.strip())
        if (corpus / candidate).exists():
            return candidate  # the first one (ReportStream's ORM has a second, "with enrichment")
    return ""


def malformed_reason(path: str, notes: str = "") -> str:
    for pattern, reason in MALFORMED.items():
        if fnmatch.fnmatch(path, pattern):
            return reason
    for phrase, reason in MALFORMED_NOTES.items():
        if phrase in notes:
            return reason
    return ""


def stored_bytes(data: bytes, notes: str) -> bytes:
    """Undo how a capture was stored (not part of the message): a JSON array of byte frames,
    an escaped string literal, MLLP framing bytes around the message."""
    if "byte-array dump" in notes:
        try:
            frames = json.loads(data)
            data = b"".join(bytes(frame) for frame in frames)
        except (ValueError, TypeError):
            pass
    if "escaped string literal" in notes:
        try:
            text = ast.literal_eval(data.decode("latin-1").strip())
            data = text.encode("latin-1") if isinstance(text, str) else data
        except (ValueError, SyntaxError):
            pass
    if "MLLP framing bytes present" in notes:
        data = data.replace(b"\x0b", b"").replace(b"\x1c", b"")
    if "[SOM]/[EOM]" in notes:  # Mirth's simple sender frames messages with text markers
        data = data.replace(b"[SOM]", b"").replace(b"[EOM]", b"")
    return data


@dataclass
class Unit:
    """One message to translate (a file, or one message of a multi-message file)."""

    row: Row
    number: int  # 1-based within the file
    data: bytes
    split_error: str = ""  # the batch could not be split: a rejection with this reason

    @property
    def name(self) -> str:
        return self.row.path + (f"#{self.number}" if self.number > 1 or self.split_error else "")


def units_of(row: Row, corpus: Path = CORPUS) -> list[Unit]:
    """The messages of one file: ER7 files may hold several (blank lines, batches)."""
    from adapters.hl7v2.batch import BatchError, is_batch, split_batch
    from adapters.mllp.client import split_messages

    data = stored_bytes((corpus / row.path).read_bytes(), row.notes)
    head = data.lstrip(b"\xef\xbb\xbf\r\n\t \x0b")
    if not head.startswith((b"MSH", b"FHS", b"BHS")):
        return astm_units(row, data)  # XML, ASTM, or something read_input must refuse
    if is_batch(head):
        try:
            batch = split_batch(head)
        except BatchError as error:
            return [Unit(row, 1, data, split_error=f"batch: {error.reason}")]
        messages = batch.messages
        return [Unit(row, n, m) for n, m in enumerate(messages, 1)] or \
            [Unit(row, 1, data, split_error="batch: no message")]
    starts = len(re.findall(rb"(?:^|[\r\n])MSH", head))
    if starts <= 1:
        return [Unit(row, 1, data)]  # as stored: line ends and BOM are read_input's business
    return [Unit(row, n, m) for n, m in enumerate(split_messages(head), 1)]


def astm_units(row: Row, data: bytes) -> list[Unit]:
    """An analyzer capture may hold several ASTM messages (H ... L, one per transfer): each is
    a unit, as the E1381 receiver hands them over one by one. Anything else is one unit."""
    from adapters.astm.records import split_messages, strip_low_level
    from gateway.translation.inputs import detect_format

    if detect_format(data) != "astm":
        return [Unit(row, 1, data)]
    text = strip_low_level(data).decode("latin-1")  # bytes kept as they are
    parts = split_messages(text)
    if len(parts) <= 1 or any(detect_format(part.encode("latin-1")) != "astm" for part in parts):
        return [Unit(row, 1, data)]  # one message (with comment lines, say): as stored
    return [Unit(row, n, part.encode("latin-1")) for n, part in enumerate(parts, 1)]


# --------------------------------------------------------------------------- translation

@dataclass
class Outcome:
    status: str  # valid | rejected | invalid | crash
    reason: str = ""
    message_type: str = ""
    format: str = ""
    no_map: bool = False  # rejected because no message map covers the type
    not_clinical: str = ""  # why the message carries no clinical data (NOT_CLINICAL, host query)
    header_only: bool = False  # nothing after the header: malformed (HEADER_ONLY)
    problems: list[str] = field(default_factory=list)
    bundle: dict | None = None
    seconds: float = 0.0


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def translate_unit(mapping_set, unit: Unit) -> Outcome:
    from gateway.mapping.runtime import NotTranslated, TranslationContext, TranslationError
    from gateway.mapping.validation import bundle_problems
    from gateway.translation.inputs import InputError, read_input

    if unit.split_error:
        return Outcome("rejected", unit.split_error)
    started = time.perf_counter()
    parsed = None
    use_alarm = hasattr(signal, "SIGALRM")
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(TIME_LIMIT)
    try:
        fallback = next((codec for phrase, codec in SENDER_CHARSETS.items() if phrase in unit.row.notes), None)
        parsed = read_input(unit.data, fallback)
        not_clinical, header_only = content_of(parsed)
        zone = SENDER_ZONES.get(unit.row.source, TIMEZONE)
        context = TranslationContext(sender_id="", timezone=zone, received_at=RECEIVED_AT,
                                     message_key=f"{parsed.sending_facility}|{parsed.control_id}",
                                     control_id=parsed.control_id)
        translation = mapping_set.translate(parsed.message, context, parsed.message_type)
    except InputError as error:
        return Outcome("rejected", f"input: {error.reason}", format=error.format,
                       seconds=time.perf_counter() - started)
    except NotTranslated as error:
        return Outcome("not translated", f"translation: {error.reason}", parsed.message_type, parsed.format,
                       not_clinical=not_clinical, header_only=header_only,
                       seconds=time.perf_counter() - started)
    except TranslationError as error:
        kind = parsed.message_type if parsed else ""
        no_map = error.reason.startswith("no mapping for message type")
        where = f" at {error.location}" if error.location and not no_map else ""
        return Outcome("rejected", f"translation: {error.reason}{where}", kind,
                       parsed.format if parsed else "", no_map=no_map, seconds=time.perf_counter() - started,
                       not_clinical=not_clinical if parsed else "", header_only=header_only if parsed else False)
    except _Timeout:
        return Outcome("crash", f"no answer within {TIME_LIMIT} s",
                       parsed.message_type if parsed else "", seconds=time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - any other exception is a bug, and counted
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        return Outcome("crash", f"{type(error).__name__}: {error} ({where})"[:300],
                       parsed.message_type if parsed else "", parsed.format if parsed else "",
                       seconds=time.perf_counter() - started)
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - started
    kinds = [entry["resource"]["resourceType"] for entry in translation.bundle.get("entry", ())]
    if all(kind == "Provenance" for kind in kinds):
        # A query, an MSH alone, segments run together on one line: nothing was translated
        # (and a Provenance without target is not valid FHIR, though the models accept it).
        return Outcome("rejected", "translation: the message gives no resource (nothing to translate)",
                       parsed.message_type, parsed.format, seconds=seconds, not_clinical=not_clinical,
                       header_only=header_only)
    problems = bundle_problems(translation.bundle)
    if problems:
        return Outcome("invalid", problems[0], parsed.message_type, parsed.format, problems=problems,
                       bundle=translation.bundle, seconds=seconds, not_clinical=not_clinical)
    return Outcome("valid", "", parsed.message_type, parsed.format, bundle=translation.bundle, seconds=seconds,
                   not_clinical=not_clinical)


def content_of(parsed) -> tuple[str, bool]:
    """(why the message carries no clinical data, or ''; whether it has nothing after its
    header), from its type and its segments: the harness's own reading, not the mappings'."""
    names = [segment.name for segment in parsed.message.segments]
    code = (parsed.message_type or "").split("^", 1)[0]
    reason = NOT_CLINICAL.get(code, "")
    if not reason and parsed.format == "astm" and "Q" in names and "R" not in names:
        reason = "an analyzer's host query (a Q record, no result)"
    return reason, bool(names) and all(name in ENVELOPE for name in names)


# --------------------------------------------------------------------------- key facts

@dataclass(frozen=True)
class Fact:
    """A comparable fact: its kind and the values that count as the same (any one of them)."""

    kind: str
    values: frozenset


def _text(value) -> str:
    return re.sub(r"\s+", " ", str(value)).strip().casefold()


def _number(value) -> str:
    try:
        return format(Decimal(str(value)).normalize(), "f")
    except (InvalidOperation, ValueError):
        return _text(value)


def _fact(kind: str, *values) -> Fact | None:
    kept = frozenset(v for v in values if v not in (None, ""))
    return Fact(kind, kept) if kept else None


def _codes(concept) -> list[str]:
    if not isinstance(concept, dict):
        return []
    return [_text(c.get("code")) for c in concept.get("coding", ()) if isinstance(c, dict) and c.get("code")]


def _date_fact(kind: str, value) -> Fact | None:
    return _fact(kind, "date:" + str(value)) if value else None


def observation_value_facts(resource: dict) -> list[Fact]:
    facts = []
    quantity = resource.get("valueQuantity")
    if isinstance(quantity, dict):
        facts.append(_fact("observation.value", _number(quantity.get("value"))) if "value" in quantity else None)
        facts.append(_fact("observation.unit", *(_text(quantity.get(k)) for k in ("code", "unit") if quantity.get(k))))
    for key in ("valueString", "valueInteger", "valueBoolean", "valueTime"):
        if key in resource:
            value = resource[key]
            facts.append(_fact("observation.value", _number(value) if key == "valueInteger" else _text(value)))
    for key in ("valueDateTime", "valuePeriod"):
        if key in resource:
            value = resource[key]
            facts.append(_date_fact("observation.value", value.get("start") if isinstance(value, dict) else value))
    if "valueCodeableConcept" in resource:
        facts.append(_fact("observation.value", *_codes(resource["valueCodeableConcept"])))
    rng = resource.get("valueRange")
    if isinstance(rng, dict):
        for end in ("low", "high"):
            if isinstance(rng.get(end), dict) and "value" in rng[end]:
                facts.append(_fact("observation.value", _number(rng[end]["value"])))
    ratio = resource.get("valueRatio")
    if isinstance(ratio, dict):
        for end in ("numerator", "denominator"):
            if isinstance(ratio.get(end), dict) and "value" in ratio[end]:
                facts.append(_fact("observation.value", _number(ratio[end]["value"])))
    return [f for f in facts if f]


# Observations that Microsoft's converter makes from segments that are not observations (PDA
# death and autopsy indicators, ACC accident text), coded in its own placeholder code system:
# no code of the message, no row of the v2-to-FHIR guide; not comparable.
INVENTED_CODE_SYSTEMS = ("http://example.com/v2-to-fhir-converter/CodeSystem/observation-code",)
# Message types whose OBX the guide maps into another resource than Observation: MDM_T02's OBX
# are the document's content (OBX[DocumentReference]), which is how the issue wants them; an
# expected bundle's Observations for them are not comparable with ours.
NOT_OBSERVATIONS = ("MDM",)
# Order messages: the guide maps their OBR to ServiceRequest (ORM_O01, OML_O21; OMG_O19 has the
# same shape), not to a DiagnosticReport as Microsoft's converter does; report facts of the
# expected bundle are not comparable. The same holds for MDM: the guide's MDM_T02 maps its OBR
# to ServiceRequest and its OBX to the DocumentReference, where Microsoft makes a
# DiagnosticReport of the ED OBX.
NOT_REPORTS = ("ORM", "OML", "OMG", "MDM")


def _invented(resource: dict) -> bool:
    codings = [c for c in (resource.get("code") or {}).get("coding", ()) if isinstance(c, dict)]
    return bool(codings) and all(c.get("system") in INVENTED_CODE_SYSTEMS for c in codings)


def comparable_facts(facts: list[Fact], message_type: str) -> list[Fact]:
    """The facts of an expected bundle that our mapping can be compared on (see above)."""
    if message_type.startswith(NOT_OBSERVATIONS):
        facts = [fact for fact in facts if not fact.kind.startswith("observation.")]
    if message_type.startswith(NOT_REPORTS):
        facts = [fact for fact in facts if not fact.kind.startswith("report.")]
    return facts


def facts_of(bundle: dict) -> list[Fact]:
    """The key facts of a bundle (a list: the same fact twice counts twice)."""
    facts: list[Fact | None] = []
    for entry in bundle.get("entry", ()) if isinstance(bundle, dict) else ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            continue
        kind = resource.get("resourceType")
        if kind == "Observation" and _invented(resource):
            continue
        if kind == "Patient":
            for identifier in resource.get("identifier", ()):
                facts.append(_fact("patient.identifier", _text(identifier.get("value", ""))))
            for name in resource.get("name", ()):
                facts.append(_fact("patient.family", _text(name.get("family", ""))))
                for given in name.get("given", ()):
                    facts.append(_fact("patient.given", _text(given)))
            facts.append(_date_fact("patient.birthDate", resource.get("birthDate")))
            facts.append(_fact("patient.gender", _text(resource.get("gender", ""))))
        elif kind == "Observation":
            facts.append(_fact("observation.code", *_codes(resource.get("code"))))
            facts.extend(observation_value_facts(resource))
            facts.append(_fact("observation.status", _text(resource.get("status", ""))))
            effective = resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start")
            facts.append(_date_fact("observation.effective", effective))
        elif kind == "DiagnosticReport":
            facts.append(_fact("report.status", _text(resource.get("status", ""))))
            effective = resource.get("effectiveDateTime") or (resource.get("effectivePeriod") or {}).get("start")
            facts.append(_date_fact("report.effective", effective))
    return [f for f in facts if f]


_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
                   r"(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def _date_parts(text: str):
    """(parts as ints up to the precision given, tz offset in minutes or None), or None."""
    match = _DATE.match(text)
    if not match:
        return None
    *parts, zone = match.groups()
    numbers = [int(p) for p in parts if p is not None]
    offset = None
    if zone:
        offset = 0 if zone == "Z" else (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 60 + int(zone[4:6]))
    return numbers, offset


def dates_agree(left: str, right: str) -> bool:
    """Two FHIR dates/dateTimes name the same time at the precision both have (instants with
    time zones on both sides are compared in UTC)."""
    a, b = _date_parts(left), _date_parts(right)
    if a is None or b is None:
        return _text(left) == _text(right)
    (pa, za), (pb, zb) = a, b
    if len(pa) >= 5 and len(pb) >= 5 and za is not None and zb is not None and za != zb:
        def utc(parts, offset):
            full = parts + [0] * (6 - len(parts))
            return dt.datetime(*full) - dt.timedelta(minutes=offset)
        precision = min(len(pa), len(pb))
        ua, ub = utc(pa, za), utc(pb, zb)
        fmt = ("%Y", "%Y-%m", "%Y-%m-%d", "%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S")[precision - 1]
        return ua.strftime(fmt) == ub.strftime(fmt)
    precision = min(len(pa), len(pb))
    return pa[:precision] == pb[:precision]


def _matches(expected: Fact, actual: Fact) -> bool:
    if expected.kind != actual.kind:
        return False
    if expected.values & actual.values:
        return True
    dated = [v for v in expected.values if str(v).startswith("date:")]
    return any(dates_agree(e[5:], a[5:]) for e in dated for a in actual.values if str(a).startswith("date:"))


def score(expected: list[Fact], actual: list[Fact]) -> tuple[int, int, list[Fact]]:
    """(matched, expected count, the expected facts not found): each actual fact matches once."""
    unused = list(actual)
    missing = []
    matched = 0
    for fact in expected:
        for index, candidate in enumerate(unused):
            if _matches(fact, candidate):
                del unused[index]
                matched += 1
                break
        else:
            missing.append(fact)
    return matched, len(expected), missing


# --------------------------------------------------------------------------- report

def short_type(message_type: str) -> str:
    parts = [p for p in re.split(r"[\^~]", message_type or "") if p]
    if not parts:
        return "?"
    if parts[0] == "ASTM" or message_type.startswith("ASTM"):
        return "ASTM"
    return "^".join(parts[:2])


@dataclass
class Result:
    unit: str
    source: str
    message_type: str
    malformed: str
    outcome: Outcome
    score: tuple[int, int] | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """ok | rejected | failure: what the outcome means for this message."""
        status = self.outcome.status
        if status in ("invalid", "crash"):
            return "failure"
        if status == "valid" or self.malformed or self.outcome.not_clinical:
            return "ok"
        return "rejected"


REFUSED = ("rejected", "not translated")


def tally(results: list[Result]) -> dict:
    well = [r for r in results if not r.malformed]
    bad = [r for r in results if r.malformed]
    clinical = [r for r in well if not r.outcome.not_clinical]
    in_scope = [r for r in clinical if not r.outcome.no_map]
    count = collections.Counter
    matched = sum(r.score[0] for r in results if r.score)
    expected = sum(r.score[1] for r in results if r.score)
    return {
        "messages": len(results),
        "well_formed": len(well),
        "valid": sum(r.outcome.status == "valid" for r in well),
        "rejected": sum(r.outcome.status in REFUSED for r in well),
        "no_map": sum(r.outcome.no_map for r in well),
        "not_clinical": len(well) - len(clinical),
        "clinical": len(clinical),
        "clinical_valid": sum(r.outcome.status == "valid" for r in clinical),
        "in_scope": len(in_scope),
        "in_scope_valid": sum(r.outcome.status == "valid" for r in in_scope),
        "malformed": len(bad),
        "malformed_rejected": sum(r.outcome.status in REFUSED for r in bad),
        "malformed_translated": sum(r.outcome.status == "valid" for r in bad),
        "invalid": sum(r.outcome.status == "invalid" for r in results),
        "crash": sum(r.outcome.status == "crash" for r in results),
        "scored": sum(1 for r in results if r.score),
        "facts_matched": matched,
        "facts_expected": expected,
        "statuses": dict(count(r.outcome.status for r in results)),
    }


def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def table(title: str, groups: dict[str, list[Result]], min_size: int = 1) -> list[str]:
    lines = [f"### by {title}", "", f"| {title} " + HEADER, RULE]
    small: list[Result] = []
    names: list[str] = []
    for name, results in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        if len(results) < min_size:
            small += results
            names.append(name)
        else:
            lines.append(_row(name, tally(results)))
    if small:
        lines.append(_row(f"{len(names)} others ({', '.join(sorted(names))})"
                          if len(names) <= 12 else f"{len(names)} others, < {min_size} messages each", tally(small)))
    return lines


HEADER = ("| msgs | well-formed | not clinical | valid | rejected (no map) | invalid | crash | malformed rejected/ok "
          "| valid / well-formed | valid / clinical | valid / in scope | key facts |")
RULE = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def _row(name: str, t: dict) -> str:
    facts = (f"{t['facts_matched']}/{t['facts_expected']} {pct(t['facts_matched'], t['facts_expected'])}"
             if t["facts_expected"] else "–")
    return (f"| {name} | {t['messages']} | {t['well_formed']} | {t['not_clinical']} | {t['valid']} "
            f"| {t['rejected']} ({t['no_map']}) | {t['invalid']} | {t['crash']} "
            f"| {t['malformed_rejected'] + t['malformed_translated']}/{t['malformed']} "
            f"| {pct(t['valid'], t['well_formed'])} | {pct(t['clinical_valid'], t['clinical'])} "
            f"| {pct(t['in_scope_valid'], t['in_scope'])} | {facts} |")


def top_reasons(results: list[Result], statuses: tuple[str, ...], limit: int, malformed: bool = False,
                clinical: bool | None = None):
    """(reason pattern, count, example units) of the commonest reasons (of well-formed messages
    that are clinical or not, when `clinical` says which)."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if clinical is not None and (bool(r.malformed) or clinical == bool(r.outcome.not_clinical)):
            continue
        if r.outcome.status in statuses and bool(r.malformed) == malformed:
            groups[_pattern(r.outcome.reason)].append(r.unit)
    ranked = sorted(groups.items(), key=lambda item: -len(item[1]))[:limit]
    return [(reason, len(units), units[:3]) for reason, units in ranked]


def _pattern(reason: str) -> str:
    """A reason with its particulars (quoted values, numbers) blurred, to group alike ones."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"(?<![-.\w])\d+\b", "N", reason)
    return reason[:160]


def missing_kinds(results: list[Result]) -> list[tuple[str, int]]:
    counter = collections.Counter(kind for r in results for kind in r.missing)
    return counter.most_common()


# --------------------------------------------------------------------------- main

def run(mapping_dir: Path, corpus: Path, verbose: bool = False, only: str | None = None) -> tuple[list[Result], dict]:
    from gateway.mapping.mapping_set import MappingSet

    started = time.perf_counter()
    mapping_set = MappingSet.load(mapping_dir)
    results = []
    for row in corpus_rows(corpus):
        if only and not fnmatch.fnmatch(row.path, only):
            continue
        expected_facts = None
        if row.expected:
            expected_facts = comparable_facts(
                facts_of(json.loads((corpus / row.expected).read_text(encoding="utf-8-sig"))), row.message_type)
        listed = malformed_reason(row.path, row.notes)
        for unit in units_of(row, corpus):
            outcome = translate_unit(mapping_set, unit)
            malformed = listed or (HEADER_ONLY if outcome.header_only else "")
            message_type = "(malformed)" if malformed else \
                short_type(outcome.message_type or row.message_type.split(",")[0])
            result = Result(unit.name, row.source, message_type, malformed, outcome)
            if expected_facts is not None and unit.number == 1:
                actual = facts_of(outcome.bundle) if outcome.bundle else []
                matched, total, missing = score(expected_facts, actual)
                result.score = (matched, total)
                result.missing = [fact.kind for fact in missing]
            outcome.bundle = None  # keep memory flat
            results.append(result)
            if verbose:
                print(f"{outcome.status:<8} {result.verdict:<8} {unit.name}  {message_type}  "
                      f"{outcome.reason[:140]}" + (f"  facts {result.score[0]}/{result.score[1]}" if result.score else ""))
    meta = {"mapping_version": mapping_set.version, "message_types_mapped": mapping_set.message_types(),
            "seconds": round(time.perf_counter() - started, 1)}
    return results, meta


def report(results: list[Result], meta: dict) -> dict:
    totals = tally(results)
    by_source = collections.defaultdict(list)
    by_type = collections.defaultdict(list)
    for r in results:
        by_source[r.source].append(r)
        by_type[r.message_type].append(r)
    print(f"\nmapping set {meta['mapping_version']}; message maps for: {', '.join(meta['message_types_mapped'])}\n")
    print("\n".join(table("source", by_source)) + "\n")
    print("\n".join(table("message type", by_type, min_size=3)) + "\n")
    print("| totals " + HEADER)
    print(RULE)
    print(_row("**all**", totals) + "\n")
    share = totals["valid"] / totals["well_formed"] if totals["well_formed"] else 0.0
    clinical = totals["clinical_valid"] / totals["clinical"] if totals["clinical"] else 0.0
    in_scope = totals["in_scope_valid"] / totals["in_scope"] if totals["in_scope"] else 0.0
    agreement = totals["facts_matched"] / totals["facts_expected"] if totals["facts_expected"] else 0.0
    verdicts = {
        "translated_valid": "PASS" if share >= TARGET_VALID else "FAIL",
        "translated_valid_clinical": "PASS" if clinical >= TARGET_VALID else "FAIL",
        "translated_valid_in_scope": "PASS" if in_scope >= TARGET_VALID else "FAIL",
        "no_failures": "PASS" if not totals["invalid"] and not totals["crash"] else "FAIL",
        "key_field_agreement": "PASS" if agreement >= TARGET_SCORE else "FAIL",
    }
    print(f"verdict translated+valid / well-formed: {pct(totals['valid'], totals['well_formed'])} "
          f"(target >= {TARGET_VALID:.0%}): {verdicts['translated_valid']}")
    print(f"verdict translated+valid / clinical ({totals['not_clinical']} acknowledgements and queries left out): "
          f"{pct(totals['clinical_valid'], totals['clinical'])} (target >= {TARGET_VALID:.0%}): "
          f"{verdicts['translated_valid_clinical']}")
    print(f"verdict translated+valid / in scope (clinical, a message map exists): "
          f"{pct(totals['in_scope_valid'], totals['in_scope'])}: {verdicts['translated_valid_in_scope']}")
    print(f"verdict failures (invalid FHIR {totals['invalid']}, crashes {totals['crash']}): {verdicts['no_failures']}")
    print(f"verdict key-field agreement over {totals['scored']} pairs: "
          f"{pct(totals['facts_matched'], totals['facts_expected'])} (target >= {TARGET_SCORE:.0%}): "
          f"{verdicts['key_field_agreement']}\n")
    sections = {
        "failures (invalid FHIR, crashes)": top_reasons(results, ("invalid", "crash"), 15)
        + top_reasons(results, ("invalid", "crash"), 15, malformed=True),
        "rejections of well-formed clinical messages": top_reasons(results, REFUSED, 15, clinical=True),
        "not clinical, not translated (correct)": top_reasons(results, REFUSED, 8, clinical=False),
        "rejections of malformed messages (correct)": top_reasons(results, REFUSED, 8, malformed=True),
    }
    for title, reasons in sections.items():
        print(f"top reasons: {title}")
        for reason, count, examples in reasons:
            print(f"  {count:>4}  {reason}\n        e.g. {', '.join(examples)}")
        if not reasons:
            print("  (none)")
        print()
    missing = missing_kinds(results)
    if missing:
        print("expected facts not found, by kind: " + ", ".join(f"{k} {n}" for k, n in missing) + "\n")
    return {"totals": totals, "verdicts": verdicts,
            "by_source": {k: tally(v) for k, v in by_source.items()},
            "by_message_type": {k: tally(v) for k, v in by_type.items()},
            "top_reasons": {k: [{"reason": r, "count": c, "examples": e} for r, c, e in v]
                            for k, v in sections.items()},
            "missing_facts_by_kind": dict(missing)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mappings", type=Path, default=ROOT / "mappings")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--only", help="corpus paths matching this glob")
    ap.add_argument("--verbose", "-v", action="store_true", help="one line per message")
    ap.add_argument("--json-out", type=Path, default=ROOT / "var" / "bench" / "conformance.json")
    args = ap.parse_args(argv)
    if not (args.corpus / "INDEX.tsv").exists():
        sys.exit(f"corpus not found: {args.corpus}/INDEX.tsv")
    from gateway.mapping.source import MappingErrors
    try:
        results, meta = run(args.mappings, args.corpus, args.verbose, args.only)
    except MappingErrors as error:
        print(f"the mapping set does not load:\n{error}", file=sys.stderr)
        return 2
    summary = report(results, meta)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({
        "started": dt.datetime.now().isoformat(timespec="seconds"), **meta, **summary,
        "messages": [{"unit": r.unit, "source": r.source, "message_type": r.message_type,
                      "malformed": r.malformed, "status": r.outcome.status, "verdict": r.verdict,
                      "reason": r.outcome.reason, "no_map": r.outcome.no_map,
                      "not_clinical": r.outcome.not_clinical,
                      "problems": r.outcome.problems[:10], "score": r.score, "missing": r.missing,
                      "ms": round(r.outcome.seconds * 1000, 2)} for r in results],
    }, indent=1, ensure_ascii=False), encoding="utf-8")
    print(f"raw results: {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

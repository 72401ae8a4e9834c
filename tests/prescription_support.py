"""Synthetic e-prescription messages (no real person: the sandbox CNSS's invented insured
BENALI Fatima), a harness that runs the real translation worker with the prescription step
on a real database, and what the flow tests of drugs and of acts both read: the answers'
segments, the bundles' resources, a refusal's code, a race of two messages for one lock."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from datetime import datetime, timezone

import pytest
from sqlalchemy import insert

from adapters.hl7v2.ack import AckBuilder
from gateway.config import load_config
from gateway.delivery.care_sheet import Eligibility
from gateway.delivery.routes import Router
from gateway.facilities import FacilityRegistry
from gateway.prescriptions import qr
from gateway.prescriptions.eligibility import EligibilityAnswer
from gateway.prescriptions.flow import PrescriptionFlow
from gateway.store.database import create_gateway_engine, migrate, write_transaction
from gateway.store.schema import message_payloads, messages
from gateway.store.translations import Pending
from gateway.translation.service import TranslationJob, TranslationWorker
from gateway.translation.translator import Translator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCTOR = ("CABINET_BENALI", "CAB_BENALI_KENITRA", "INPE-200001")
PHARMACY = ("PHARMA_AGDAL", "PHARM_AGDAL", "INPE-100004")
LABORATORY = ("LIS_ALAMAL", "LAB_ALAMAL_RABAT", "INPE-100002")
PATIENT = "PID|1||BE123456^^^CNIE^NI~112233445^^^CNSS^SB||BENALI^Fatima||19850312|F"
OTHER_PATIENT = "PID|1||CD112233^^^CNIE^NI~334455667^^^CNSS^SB||TAHIRI^Khadija||19900115|F"
DOLIPRANE = "6118001230068^DOLIPRANE 1000 mg comprimé B8^EAN13"
AMOXIL = "6118012345676^AMOXIL 1 g comprimé B12^EAN13"


def _msh(sender, kind: str, control_id: str, modes: str = "|") -> str:
    application, facility, _ = sender
    return (f"MSH|^~\\&|{application}|{facility}|MA_HIE_GATEWAY|MA_HIE|20260115103000||{kind}|"
            f"{control_id}|P|2.5|||{modes}|MAR|UNICODE UTF-8|fr")


def rde(control_id: str, lines=((DOLIPRANE, 2), (AMOXIL, 1)), patient: str = PATIENT,
        sender=DOCTOR, modes: str = "|") -> bytes:
    """RDE^O11: one ORC + RXE per line (drug, boxes to dispense)."""
    segments = [_msh(sender, "RDE^O11^RDE_O11", control_id, modes), patient]
    for n, (drug, quantity) in enumerate(lines, start=1):
        segments.append(f"ORC|NW|CMD-{control_id}-{n}^CAB||GRP-{control_id}^CAB|||||20260115102500|||"
                        f"200001^BENALI^Amina^^^Dr^^^INPE")
        segments.append(f"RXE||{drug}|1||CP^comprimé^L|||||{quantity}|BT^boîte^L|0")
    return ("\r".join(segments) + "\r").encode("utf-8")


def cancel(control_id: str, prescription_id: str, lines: int = 2, sender=DOCTOR) -> bytes:
    """RDE^O11 cancelling a prescription: ORC-1 CA, ORC-3 the id, one ORC + RXE per line."""
    segments = [_msh(sender, "RDE^O11^RDE_O11", control_id), PATIENT]
    for n, drug in enumerate((DOLIPRANE, AMOXIL)[:lines], start=1):
        segments.append(f"ORC|CA|CMD-{control_id}-{n}^CAB|{prescription_id}^HIE|GRP-{control_id}^CAB|||||"
                        f"20260115120000|||200001^BENALI^Amina^^^Dr^^^INPE")
        segments.append(f"RXE||{drug}|1||CP^comprimé^L|||||1|BT^boîte^L|0")
    return ("\r".join(segments) + "\r").encode("utf-8")


def omp(control_id: str, drug: str = DOLIPRANE, quantity: int = 3, sender=DOCTOR) -> bytes:
    segments = [_msh(sender, "OMP^O09^OMP_O09", control_id), PATIENT,
                f"ORC|NW|CMD-{control_id}^CAB||GRP-{control_id}^CAB|||||20260115105500|||"
                f"200001^BENALI^Amina^^^Dr^^^INPE",
                f"RXO|{drug}|1||CP^comprimé^L|||||G||{quantity}|BT^boîte^L|0"]
    return ("\r".join(segments) + "\r").encode("utf-8")


def rds(control_id: str, prescription: str | None, lines=((DOLIPRANE, 1),), patient: str = PATIENT,
        sender=PHARMACY, dispensation: str | None = None, paper: bool = False, unit: str = "BT^boîte^L",
        modes: str = "|") -> bytes:
    """RDS^O13: one ORC + RXD per dispensed line; ORC-4 RX-...^HIE (or ^PAPIER for paper),
    ORC-3 the pharmacy's dispensation number."""
    segments = [_msh(sender, "RDS^O13^RDS_O13", control_id, modes), patient]
    group = "^PAPIER" if paper else (f"{prescription}^HIE" if prescription else "")
    for n, (drug, quantity) in enumerate(lines, start=1):
        filler = f"{dispensation or 'DISP-' + control_id}-{n}^{sender[1]}"
        segments.append(f"ORC|RE||{filler}|{group}|CM||||20260116152500")
        segments.append(f"RXD|{n}|{drug}|20260116152000|{quantity}|{unit}|||||||||||||||||||||||||"
                        f"{sender[2]}^Pharmacie Centrale Agdal^INPE")
    return ("\r".join(segments) + "\r").encode("utf-8")


def config_for(db_url: str, tmp_path, **prescriptions):
    """The shipped development configuration (registry, routes, destinations) on `db_url`,
    with the prescription signing key in `tmp_path`."""
    config = load_config(os.path.join(ROOT, "conf", "gateway.yaml"), environ={})
    key = str(tmp_path / "prescription-signing.key")
    qr.ensure_signing_key(key)
    return dataclasses.replace(
        config, database=dataclasses.replace(config.database, url=db_url),
        pki=dataclasses.replace(config.pki, prescription_key=key),
        prescriptions=dataclasses.replace(config.prescriptions, **prescriptions))


class FakeEligibility:
    """Answers VerifierDroits from a table (no network); counts the questions."""

    def __init__(self, open_rights=("112233445", "BE123456"), unavailable: bool = False):
        self.open_rights = set(open_rights)
        self.unavailable = unavailable
        self.asked = []

    def check_many(self, queries):
        self.asked.extend(queries)
        answers = {}
        for query in queries:
            if self.unavailable:
                answers[query] = EligibilityAnswer(query, None, "timeout")
            else:
                opened = query.value in self.open_rights
                answers[query] = EligibilityAnswer(query, Eligibility(
                    opened, "DROITS_OUVERTS" if opened else "DROITS_FERMES", query.on))
        return answers


class Harness:
    """Messages stored as ingest would, then translated by the real worker with the step."""

    def __init__(self, db_url: str, mappings, config, eligibility=None, builder=None):
        self.engine = create_gateway_engine(db_url)
        migrate(self.engine)
        self.config = config
        self.key = qr.load_signing_key(config.pki.prescription_key)
        self.flow = PrescriptionFlow(config, self.key, FacilityRegistry.from_config(config),
                                     builder, eligibility)
        translator = Translator(mappings, config.senders, Router(config.routes, config.senders))
        self.worker = TranslationWorker(self.engine, translator, lambda f, *a: f(*a), step=self.flow)
        self.registry = FacilityRegistry.from_config(config)

    def close(self):
        self.engine.dispose()

    def store(self, raw: bytes) -> Pending:
        fields = raw.split(b"\r", 1)[0].split(b"|")
        application, facility = fields[2].decode(), fields[3].decode()
        sender = self.registry.by_header(application, facility)
        kind = fields[8].decode().split("^")
        now = datetime.now(timezone.utc)
        with self.engine.begin() as connection:
            message_id = connection.execute(insert(messages).values(
                received_at=now, listener="test", peer="127.0.0.1:1", sender_id=sender.id if sender else None,
                sending_application=application, sending_facility=facility, control_id=fields[9].decode(),
                message_type=f"{kind[0]}^{kind[1]}", version="2.5", processing_id="P", codec="utf-8",
                sha256=hashlib.sha256(raw).digest(), size=len(raw), truncated=False,
                status="received", accepted=True, ack_code="AA", ack=b"", format="hl7v2")).inserted_primary_key[0]
            connection.execute(insert(message_payloads).values(message_id=message_id, received_at=now, raw=raw))
        return Pending(message_id, None, raw, "utf-8", "hl7v2", sender.id if sender else None, now,
                       f"{kind[0]}^{kind[1]}")

    def translate(self, *raws: bytes):
        """Store and translate messages in one worker batch; their TranslationRecords."""
        job = TranslationJob([self.store(raw) for raw in raws])
        self.worker._process([job])
        assert job.error is None, job.error
        return job.results

    def again(self, pending: Pending):
        """Translate a stored message again, as a replay does."""
        job = self.worker.translate_now([pending])
        assert job.error is None, job.error
        return job.results[0]


def standard_harness(db_url: str, tmp_path, mappings, eligibility=None) -> Harness:
    """A harness on `db_url` with the shipped configuration, HL7 answers built, and AMO rights
    open for the sandbox's insured unless `eligibility` says otherwise."""
    return Harness(db_url, mappings, config_for(db_url, tmp_path),
                   eligibility if eligibility is not None else FakeEligibility(), AckBuilder())


@pytest.fixture(name="harness")
def harness_fixture(tmp_path, repo_mappings):
    """`harness`: a standard harness on a fresh SQLite database. A test module imports
    `harness_fixture` to have it (the name differs so that arguments do not shadow an import)."""
    made = standard_harness(f"sqlite:///{tmp_path / 'gateway.sqlite'}", tmp_path, repo_mappings)
    yield made
    made.close()


def segments(ack: bytes) -> dict[str, list[list[str]]]:
    """An ER7 answer's segments by name, each as its list of fields."""
    found: dict[str, list[list[str]]] = {}
    for segment in ack.decode().strip("\r").split("\r"):
        fields = segment.split("|")
        found.setdefault(fields[0], []).append(fields)
    return found


def resources(record, kind):
    """The resources of type `kind` in a translation record's bundle."""
    return [e["resource"] for e in record.bundle_dict()["entry"] if e["resource"]["resourceType"] == kind]


def refusal(record):
    """(MSA-1, ERR-2, ERR-5 code, error reason) of a refused message, which goes nowhere."""
    assert record.status == "failed" and record.destinations == ()
    err = segments(record.ack)["ERR"][0]
    return segments(record.ack)["MSA"][0][1], err[2], err[5].split("^")[0], record.error_reason


def race_for_the_lock(harness: Harness, first: bytes, second: bytes):
    """Translates `first` and `second` on two connections at once, `first` keeping its
    transaction open until `second` has had 0.5 s to block on the prescription's lock; their
    records, in that order. Fails when `second` did not wait (the step took no lock)."""
    first_holds_lock = threading.Event()
    release = threading.Event()
    records = {}

    def apply(raw: bytes, hold: bool):
        pending = harness.store(raw)
        record = harness.worker.translator.translate(pending)
        results = [(pending, record)]
        prepared = harness.flow.prepare(results)
        with write_transaction(harness.engine) as connection:
            harness.flow.apply(connection, results, prepared, datetime.now(timezone.utc))
            if hold:
                first_holds_lock.set()
                release.wait(10)
        records[hold] = record

    holder = threading.Thread(target=apply, args=(first, True))
    holder.start()
    assert first_holds_lock.wait(10)
    waiter = threading.Thread(target=apply, args=(second, False))
    waiter.start()
    waiter.join(0.5)
    waited = waiter.is_alive()
    release.set()
    holder.join(10)
    waiter.join(10)
    assert waited, "the second message did not wait for the first's lock"
    return records[True], records[False]

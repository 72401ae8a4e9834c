"""The message search form: its query parameters read and checked, with French messages for
what is wrong. Pure code.

Every text is capped (MAX_TEXT characters) and stripped; times are ISO 8601 dates or
date-times (the form's datetime-local gives YYYY-MM-DDTHH:MM), read in the console's zone
(the operators' wall clock, Africa/Casablanca by default) when they carry no offset; `before`
is the id a page continues below (newest first).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone, tzinfo

from gateway.store.queries import MessageFilter, is_patient_search
from gateway.store.texts import has_control

STATUSES = ("received", "translated", "failed", "rejected", "ignored")
MAX_TEXT = 128
MAX_PARAMS = 32
_TYPE = re.compile(r"[A-Za-z0-9_]{1,16}(\^[A-Za-z0-9_*]{1,16}){0,2}")


class InvalidSearch(ValueError):
    """What is wrong with the query, in French, one problem per entry."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SearchCriteria(MessageFilter):
    """The store's search (gateway.store.queries.MessageFilter) as the form gives it."""

    zone: tzinfo = field(default=timezone.utc, compare=False)  # the form's times are in it

    def form_values(self) -> dict[str, str]:
        """The values to show back in the form (times in the form's zone)."""
        values = {}
        for item in fields(self):
            if item.name == "zone":
                continue
            value = getattr(self, item.name)
            if isinstance(value, datetime):
                value = value.astimezone(self.zone).strftime("%Y-%m-%dT%H:%M")
            values[item.name] = "" if value is None else str(value)
        return values

    def query(self, **changes) -> dict[str, str]:
        """The non-empty parameters (with `changes`), for a link to another page."""
        values = {**self.form_values(), **{k: "" if v is None else str(v) for k, v in changes.items()}}
        return {key: value for key, value in values.items() if value}

    @property
    def empty(self) -> bool:
        return all(getattr(self, item.name) is None for item in fields(self)
                   if item.name not in ("before", "zone"))


def parse_search(params: dict[str, list[str]], zone: tzinfo = timezone.utc) -> SearchCriteria:
    """Criteria from parsed query parameters (parse_qs), times without an offset read in
    `zone`; InvalidSearch when any is wrong."""
    problems: list[str] = []
    if len(params) > MAX_PARAMS:
        raise InvalidSearch(["trop de paramètres"])

    def text(name: str, label: str) -> str | None:
        values = params.get(name) or [""]
        if len(values) > 1:
            problems.append(f"{label} : une seule valeur")
            return None
        value = values[0].strip()
        if len(value) > MAX_TEXT:
            problems.append(f"{label} : {MAX_TEXT} caractères au plus")
            return None
        if has_control(value):
            problems.append(f"{label} : caractères de contrôle interdits")
            return None
        return value or None

    control_id = text("control_id", "Identifiant de contrôle")
    patient = text("patient", "Identifiant patient")
    if patient is not None and not is_patient_search(patient):
        problems.append("Identifiant patient : VALEUR ou SYSTÈME|VALEUR, une valeur après la barre")
        patient = None
    facility = text("facility", "Établissement")
    message_type = text("type", "Type")
    if message_type is not None and not _TYPE.fullmatch(message_type):
        problems.append("Type : de la forme ADT ou ADT^A01")
        message_type = None
    status = text("status", "Statut")
    if status is not None and status not in STATUSES:
        problems.append("Statut : inconnu")
        status = None
    since = _time(text("since", "Depuis"), "Depuis", problems, zone)
    until = _time(text("until", "Jusqu'à"), "Jusqu'à", problems, zone)
    if since and until and since >= until:
        problems.append("Depuis doit précéder Jusqu'à")
    before = text("before", "Page")
    before_id = None
    if before is not None:
        # ASCII digits only: "²" and "①" pass isdigit() and int() refuses them (a 500).
        if not (before.isascii() and before.isdigit()) or len(before) > 18:
            problems.append("Page : un numéro de message")
        else:
            before_id = int(before)
    if problems:
        raise InvalidSearch(problems)
    return SearchCriteria(control_id, patient, facility,
                          message_type.upper() if message_type else None, status, since, until,
                          before_id, zone)


def _time(value: str | None, label: str, problems: list[str], zone: tzinfo) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        problems.append(f"{label} : une date AAAA-MM-JJ ou AAAA-MM-JJTHH:MM")
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=zone)
    if not 1970 <= parsed.year <= 9998:
        problems.append(f"{label} : date hors limites")
        return None
    return parsed.astimezone(timezone.utc)

"""Destination adapters by kind: how a canonical bundle becomes a request to one peer, and how
its answer becomes an outcome. The adapters themselves are pure (`fhir_record`, `care_sheet`);
this module only picks one for a configured destination."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gateway.config import DestinationConfig
from gateway.delivery.outcome import DeliveryOutcome, HttpRequest, HttpResponse


@dataclass(frozen=True)
class Destination:
    config: DestinationConfig
    # (bundle, idempotency key) -> the request, or None when the bundle has nothing for it.
    build: Callable[[dict, str], HttpRequest | None]
    classify: Callable[[HttpResponse], DeliveryOutcome]


def destination_for(config: DestinationConfig) -> Destination:
    if config.kind == "fhir-record":
        from gateway.delivery import fhir_record

        return Destination(config, lambda bundle, key: fhir_record.transaction_request(
            bundle, base_url=config.url, idempotency_key=key), fhir_record.classify_response)
    if config.kind == "cnss":
        from gateway.delivery import care_sheet

        return Destination(config, lambda bundle, key: care_sheet.care_sheet_request(
            bundle, url=config.url, idempotency_key=key), care_sheet.classify_response)
    raise ValueError(f"unknown destination kind {config.kind!r}")

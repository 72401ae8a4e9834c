"""Destination adapters by kind: how canonical bundles become a request to one peer, and how
its answer becomes an outcome. The adapters themselves are pure (`fhir_record`, `care_sheet`);
this module only picks one for a configured destination, with how many deliveries one request
may carry:

- `fhir-record`: up to the destination's `batch_size` (default `RECORD_BATCH_SIZE`) deliveries
  (and `RECORD_BATCH_BYTES` of bundles) in one FHIR transaction, all or nothing at the record;
- `cnss`: one care sheet per SOAP request.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import orjson

from gateway.config import DestinationConfig
from gateway.delivery.outcome import DeliveryOutcome, HttpRequest, HttpResponse

# One transaction of 64 lab results is about 1.5 MB and 1,500 resources: large enough that
# the per-request costs (a round trip, a database transaction at the peer) no longer count,
# small enough to stay far below the record's 32 MiB request limit.
RECORD_BATCH_SIZE = 64
RECORD_BATCH_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Destination:
    config: DestinationConfig
    # (canonical bundles as stored JSON text, in delivery order; idempotency key) -> the
    # request, or None when the bundles have nothing for this peer.
    build: Callable[[Sequence[str], str], HttpRequest | None]
    # (the peer's answer, the request it answers) -> the outcome
    classify: Callable[[HttpResponse, HttpRequest], DeliveryOutcome]
    batch_size: int = 1  # most deliveries in one request
    batch_bytes: int | None = None  # most bundle bytes in one request (a lone delivery may exceed)


def destination_for(config: DestinationConfig, *, batch_size: int | None = None,
                    batch_bytes: int = RECORD_BATCH_BYTES) -> Destination:
    """The adapter for `config`; `batch_size` (else the configured one, else
    RECORD_BATCH_SIZE) and `batch_bytes` apply to kinds that batch."""
    batch_size = batch_size or config.batch_size or RECORD_BATCH_SIZE
    if config.kind == "fhir-record":
        from gateway.delivery import fhir_record

        return Destination(config, lambda bundles, key: fhir_record.transaction_request_for_texts(
            bundles, base_url=config.url, idempotency_key=key), fhir_record.classify_response,
            batch_size, batch_bytes)
    if config.kind == "cnss":
        from gateway.delivery import care_sheet

        return Destination(config, lambda bundles, key: care_sheet.care_sheet_request(
            _single(bundles), url=config.url, idempotency_key=key),
            care_sheet.classify_response)
    raise ValueError(f"unknown destination kind {config.kind!r}")


def _single(bundles: Sequence[str]) -> dict:
    if len(bundles) != 1:
        raise ValueError(f"one care sheet per request, not {len(bundles)}")
    return orjson.loads(bundles[0])

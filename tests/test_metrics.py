"""GET /metrics of a running gateway, over HTTP on a real port, after real traffic: messages
received, acknowledged and refused by listener, facility and type; the ACK latency histogram;
translation failures; the outbox per destination (read from the deliveries table); delivery
attempts and failures; failed TLS handshakes; door refusals. And the label rules that keep
the number of series bounded."""
from __future__ import annotations

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families

from gateway.events import Event
from gateway.metrics import GatewayMetrics
from observability_support import (facility_tls, hl7, http_get, in_thread, observed_config,
                                   send_mllp, try_tls, until)




def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of label items): value} of an exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


@pytest_twisted.inlineCallbacks
def test_metrics_after_real_traffic(db_url, make_config, tmp_path, dev_pki, foreign_pki, observe):
    observed = yield observe(observed_config(make_config, db_url, tmp_path))
    plain, tls = observed.ports["mllp-test"], observed.ports["mllp-tls"]
    yield in_thread(send_mllp, plain, hl7("M-ADT-1"), hl7("M-ORU-1", "ORU^R01^ORU_R01"),
                    b"not hl7 at all\r")
    yield in_thread(try_tls, tls, facility_tls(foreign_pki, "ROGUE-1", ca_dir=dev_pki), hl7("M-X-1"))
    yield in_thread(try_tls, tls, facility_tls(dev_pki, "INPE-100002"), hl7("M-X-2"))
    [ack] = yield in_thread(lambda: send_mllp(tls, hl7("M-TLS-1", "ADT^A04^ADT_A01"),
                                              tls=facility_tls(dev_pki, "INPE-100001")))
    assert b"MSA|AA|M-TLS-1" in ack
    yield until(lambda: observed.kinds("delivery.attempted") and len(observed.kinds("message.translated")) == 2
                and observed.kinds("message.translation_failed") and observed.kinds("door.refused")
                and observed.kinds("tls.handshake_failed"))

    status, headers, body = yield in_thread(http_get, observed.base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    found = samples(body.decode("utf-8"))
    received = "gateway_messages_received_total"
    assert value(found, received, listener="mllp-test", facility="INPE-100001", type="ADT^A01") == 1
    assert value(found, received, listener="mllp-test", facility="INPE-100001", type="ORU^R01") == 1
    assert value(found, received, listener="mllp-test", facility="unknown", type="other") == 1
    assert value(found, received, listener="mllp-tls", facility="INPE-100001", type="ADT^A04") == 1
    acknowledged = "gateway_messages_acknowledged_total"
    assert value(found, acknowledged, listener="mllp-test", facility="INPE-100001", type="ADT^A01",
                 code="AA") == 1
    assert value(found, acknowledged, listener="mllp-test", facility="unknown", type="other",
                 code="AR") == 1
    assert value(found, "gateway_messages_refused_total", listener="mllp-test", facility="unknown",
                 type="other", reason="not_hl7") == 1
    assert value(found, "gateway_ack_latency_seconds_count", listener="mllp-test") == 3
    assert value(found, "gateway_ack_latency_seconds_count", listener="mllp-tls") == 1
    assert 0 < value(found, "gateway_ack_latency_seconds_sum", listener="mllp-test") < 15
    assert value(found, "gateway_ack_latency_seconds_bucket", listener="mllp-test", le="+Inf") == 3
    assert value(found, "gateway_translation_failures_total", facility="INPE-100001", type="ORU^R01") == 1
    # Two ADTs of one patient translated, routed to a peer that is down: both pending (the
    # second behind the first, which is retried in ten minutes).
    assert value(found, "gateway_outbox_depth", destination="record-down") == 2
    assert 0 < value(found, "gateway_outbox_oldest_age_seconds", destination="record-down") < 120
    assert value(found, "gateway_delivery_attempts_total", destination="record-down", outcome="failure") >= 1
    assert value(found, "gateway_delivery_failures_total", destination="record-down", kind="transient") >= 1
    assert value(found, "gateway_tls_handshake_failures_total", listener="mllp-tls",
                 reason="certificate_verify_failed") == 1
    assert value(found, "gateway_door_refusals_total", door="mllp", status="401") == 1
    assert value(found, "gateway_build_info", node="gateway-1", version="0.1.0") == 1

    status, headers, body = yield in_thread(http_get, observed.base + "/metrics",
                                            "application/openmetrics-text; version=1.0.0")
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


@pytest_twisted.inlineCallbacks
def test_outbox_figures_are_read_at_most_every_few_seconds(make_config, tmp_path, observe):
    """A scrape reuses the outbox figures it read within the last seconds (the database is
    asked once however often Prometheus scrapes), then reads them again."""
    observed = yield observe(observed_config(make_config, f"sqlite:///{tmp_path / 'g.sqlite'}", tmp_path,
                                             tls=False))
    outbox = observed.service.metrics.outbox
    yield in_thread(send_mllp, observed.ports["mllp-test"], hl7("C-ADT-1"))
    yield until(lambda: observed.kinds("delivery.attempted"))
    first = samples((yield in_thread(http_get, observed.base + "/metrics"))[2].decode())
    assert value(first, "gateway_outbox_depth", destination="record-down") == 1
    yield in_thread(send_mllp, observed.ports["mllp-test"], hl7("C-ADT-2"))
    yield until(lambda: len(observed.kinds("message.translated")) == 2)
    cached = samples((yield in_thread(http_get, observed.base + "/metrics"))[2].decode())
    assert value(cached, "gateway_outbox_depth", destination="record-down") == 1
    assert outbox.stale() is False
    outbox._read_at -= 10  # as if read ten seconds ago
    fresh = samples((yield in_thread(http_get, observed.base + "/metrics"))[2].decode())
    assert value(fresh, "gateway_outbox_depth", destination="record-down") == 2


def test_labels_stay_bounded():
    """A facility the registry does not know is "unknown", a type that does not look like one
    is "other", a reason or code that is not a short code is "other"; each gateway has its
    own registry."""
    known = {"INPE-100001"}
    metrics = GatewayMetrics("node-a", known_facility=known.__contains__)
    GatewayMetrics("node-b")  # a second gateway in the same process: no clash
    for facility, message_type in [("INPE-100001", "ORU^R01"), ("FAKE-FAC", "ORU^R01"),
                                   ("INPE-100001", "<script>"), ("INPE-100001", "ADT^A01^ADT_A01"),
                                   (None, "ASTM"), ("INPE-100001", "CSV-lab"), ("INPE-100001", "QBP^Q11")]:
        metrics.observe(Event("message.received", "x", facility=facility, message_type=message_type,
                              listener="mllp"))
    metrics.observe(Event("message.refused", "x", listener="mllp", detail={"reason": "a b c " * 20}))
    found = samples(metrics.exposition()[0].decode())
    series = {dict(labels)["facility"] + " " + dict(labels)["type"]: v
              for (name, labels), v in found.items() if name == "gateway_messages_received_total"}
    assert series == {"INPE-100001 ORU^R01": 1, "unknown ORU^R01": 1, "INPE-100001 other": 2,
                      "unknown ASTM": 1, "INPE-100001 CSV-lab": 1, "INPE-100001 QBP^Q11": 1}
    assert value(found, "gateway_messages_refused_total", listener="mllp", facility="unknown",
                 type="other", reason="other") == 1


def test_a_sender_inventing_message_types_cannot_grow_the_series_without_end():
    """Each type that looks like one is a label, but only so many: the pattern admits billions
    (ADT^AAA, ADT^AAB, ...), each one more series of several metrics kept in memory and
    rendered at every scrape."""
    metrics = GatewayMetrics("node-a")
    invented = [f"ADT^{a}{b}{c}" for a in "ABCDEFGH" for b in "ABCDEFGH" for c in "ABCDEFGH"]  # 512
    for message_type in ["ORU^R01"] + invented + ["ADT^A01", "ORU^R01"]:
        metrics.observe(Event("message.refused", "x", listener="mllp", message_type=message_type,
                              detail={"reason": "refused"}))
    found = samples(metrics.exposition()[0].decode())
    types = {dict(labels)["type"]: v for (name, labels), v in found.items()
             if name == "gateway_messages_refused_total"}
    assert len(types) == 512 + 1  # the labels kept, and "other" for every type past them
    assert types["ORU^R01"] == 2 and types["ADT^AAA"] == 1  # the first ones seen keep their label
    assert types["other"] == 1 + 1  # ADT^HHH and ADT^A01, past the bound


def test_a_type_or_reason_ending_in_a_newline_is_other():
    """MSH-9 "ADT^A01<LF>" is not ADT^A01: a label of its own (with a newline in it) next to
    the real one would split its counts; it is "other", like any type that is not one."""
    metrics = GatewayMetrics("node-a")
    for message_type, reason in [("ADT^A01\n", "refused\n"), ("ADT^A01", "refused")]:
        metrics.observe(Event("message.refused", "x", listener="mllp", message_type=message_type,
                              detail={"reason": reason}))
    found = samples(metrics.exposition()[0].decode())
    labels = {(dict(labels)["type"], dict(labels)["reason"]): v for (name, labels), v in found.items()
              if name == "gateway_messages_refused_total"}
    assert labels == {("other", "other"): 1, ("ADT^A01", "refused"): 1}

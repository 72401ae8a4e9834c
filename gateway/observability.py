"""The operators' view of a running gateway: /metrics and /health/, as twisted.web resources
for the admin site to mount.

    observability_resources(gateway, config, reactor) -> {"metrics": Resource, "health": Resource}

- gateway: the service tree that `gateway.service.build_service` returned. Used: its
  `events` attribute (the one EventBus of the tree, which the metrics subscribe to), the
  "store" service's `database` (outbox gauges, the readiness check), the listeners' services
  by name (readiness: each is listening) and the "translation" service (mappings loaded).
- config: the GatewayConfig the tree was built from (node name, listener names, mappings).
- reactor: the reactor the tree runs on (timeouts of the readiness checks).

Call it once per service tree, before startService, so that the metrics see every event from
the first message on; a second call returns the same resources. Mount them as
`site_root.putChild(b"metrics", r["metrics"])` and `site_root.putChild(b"health", r["health"])`
(which answers /health/live and /health/ready).
"""
from __future__ import annotations

from twisted.web.resource import Resource

from gateway.config import GatewayConfig
from gateway.health import HealthResource
from gateway.metrics import GatewayMetrics, MetricsResource


def observability_resources(gateway, config: GatewayConfig, reactor) -> dict[str, Resource]:
    existing = getattr(gateway, "observability", None)
    if existing is not None:
        return existing
    metrics = GatewayMetrics.for_gateway(gateway, config, reactor)
    resources = {"metrics": MetricsResource(metrics, reactor), "health": HealthResource.for_gateway(gateway, config, reactor)}
    gateway.observability = resources
    gateway.metrics = metrics
    return resources

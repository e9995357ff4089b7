"""Each replica's Prometheus metrics, copied into Ray's metrics system.

Behind Serve's proxy, ``/metrics`` reaches one replica at random, so it cannot be scraped per
replica. Instead every replica copies its registry (the same series a standalone server
exports) into Ray gauges every few seconds; Ray's per-node exporter (``--metrics-export-port``,
scraped by Prometheus) publishes them as ``ray_<name>`` with a ``cosyserve_instance`` label (the
replica's ``X-Cosyserve-Instance``). Counters and histogram buckets stay cumulative, so
``rate()`` and ``histogram_quantile()`` work on them as usual; the Grafana dashboard in
``deploy/grafana`` reads both shapes.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from ray.util.metrics import Gauge

logger = logging.getLogger(__name__)

INSTANCE_LABEL = "cosyserve_instance"


class RayMetricsMirror:
    """Copies ``registry`` into Ray gauges on a daemon thread (``sync`` does one copy)."""

    def __init__(self, registry: CollectorRegistry, instance_id: str, interval_s: float = 5.0):
        self.registry = registry
        self.instance_id = instance_id
        self.interval_s = interval_s
        self._gauges: dict[str, tuple[tuple[str, ...], Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cosyserve-ray-metrics", daemon=True)
        self._failed = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sync(self) -> int:
        """Copy every sample once; returns how many were copied."""
        copied = 0
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name.endswith("_created"):  # creation timestamps: not worth a series
                    continue
                keys = tuple(sorted(sample.labels))
                gauge = self._gauge(sample.name, keys, metric.documentation)
                if gauge is None:
                    continue
                gauge.set(float(sample.value), tags={**sample.labels, INSTANCE_LABEL: self.instance_id})
                copied += 1
        return copied

    def _gauge(self, name: str, keys: tuple[str, ...], documentation: str) -> Any:
        known = self._gauges.get(name)
        if known is None:
            gauge = Gauge(name, description=documentation or name, tag_keys=(*keys, INSTANCE_LABEL))
            self._gauges[name] = (keys, gauge)
            return gauge
        if known[0] != keys:  # a family whose label set changed: cannot be one Ray gauge
            return None
        return known[1]

    def _run(self) -> None:
        while True:
            try:
                self.sync()
                self._failed = False
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                if not self._failed:
                    logger.exception("copying metrics to Ray failed (retrying every %.0f s)", self.interval_s)
                self._failed = True
            if self._stop.wait(self.interval_s):
                return

"""The Grafana dashboard over cosyserve's Prometheus metrics, one line per instance.

It reads both shapes the metrics come in:

* a standalone server scraped directly: ``cosyserve_*`` series, one Prometheus target (and so
  one ``instance`` label) per server;
* Ray Serve replicas, copied into Ray's per-node exporter by
  :mod:`cosyserve.deploy.ray_metrics`: ``ray_cosyserve_*`` series whose replica is named by
  the ``cosyserve_instance`` label (the ``X-Cosyserve-Instance`` id).

Every query matches ``(ray_)?cosyserve_<name>`` and copies ``cosyserve_instance`` over
``instance`` where it is set, so the legend shows one line per server or replica either way.
A last row shows Ray Serve's own replica metrics (empty without Ray).

``python -m cosyserve.deploy.grafana > deploy/grafana/cosyserve-dashboard.json`` writes the
dashboard kept in the repository (a test checks the two agree).
"""

from __future__ import annotations

import json
import sys
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def series(name: str, matchers: str = "") -> str:
    """A selector for ``cosyserve_<name>`` from either a direct scrape or Ray's exporter."""
    extra = f", {matchers}" if matchers else ""
    return f'{{__name__=~"(ray_)?cosyserve_{name}"{extra}}}'


def by_instance(expr: str) -> str:
    """``expr`` with Ray's ``cosyserve_instance`` label copied over ``instance`` where set."""
    return f'label_replace({expr}, "instance", "$1", "cosyserve_instance", "(.+)")'


def rate_by(name: str, by: str = "instance", matchers: str = "") -> str:
    return f"sum by ({by}) ({by_instance(f'rate({series(name, matchers)}[{RATE}])')})"


def gauge_by(name: str, by: str = "instance") -> str:
    return f"sum by ({by}) ({by_instance(series(name))})"


def quantile(q: float, histogram: str, by: str = "instance") -> str:
    buckets = by_instance(f"rate({series(histogram + '_bucket')}[{RATE}])")
    return f"histogram_quantile({q}, sum by (le, {by}) ({buckets}))"


def mean(histogram: str, by: str = "instance") -> str:
    return f"{rate_by(histogram + '_sum', by)} / {rate_by(histogram + '_count', by)}"


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def _panel(
    title: str, targets: list[tuple[str, str]], unit: str, x: int, y: int, description: str = ""
) -> dict[str, Any]:
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [_target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)],
    }


def _row(title: str, y: int) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}


# (row title, [(panel title, [(expr, legend)], unit, description)])
_LAYOUT: list[tuple[str, list[tuple[str, list[tuple[str, str]], str, str]]]] = [
    (
        "Traffic",
        [
            (
                "Requests / s",
                [(rate_by("http_requests_total"), "{{instance}}")],
                "reqps",
                "HTTP requests answered, by instance",
            ),
            (
                "Errors / s",
                [
                    (
                        rate_by("http_requests_total", "instance, status", 'status=~"4..|5.."'),
                        "{{instance}} {{status}}",
                    )
                ],
                "reqps",
                "4xx and 5xx answers (429: queue full)",
            ),
            (
                "Audio produced (s / s)",
                [(rate_by("audio_seconds_total"), "{{instance}}")],
                "none",
                "seconds of audio made per wall-clock second: throughput",
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Time to first chunk",
                [
                    (quantile(0.5, "time_to_first_chunk_seconds"), "p50 {{instance}}"),
                    (quantile(0.95, "time_to_first_chunk_seconds"), "p95 {{instance}}"),
                ],
                "s",
                "submit to first audio, queueing included",
            ),
            (
                "Real-time factor",
                [
                    (quantile(0.5, "rtf"), "p50 {{instance}}"),
                    (quantile(0.95, "rtf"), "p95 {{instance}}"),
                ],
                "none",
                "wall time / audio time of finished requests (below 1: faster than real time)",
            ),
            (
                "Response head latency (p95)",
                [
                    (
                        quantile(0.95, "http_request_duration_seconds", "instance, endpoint"),
                        "{{instance}} {{endpoint}}",
                    )
                ],
                "s",
                "time to the response head (streams: to the first audio)",
            ),
        ],
    ),
    (
        "Engine",
        [
            (
                "Queue depth and active requests",
                [
                    (gauge_by("queue_depth"), "queued {{instance}}"),
                    (gauge_by("active_streams"), "active {{instance}}"),
                ],
                "short",
                "requests waiting for an engine slot, and requests being stepped",
            ),
            (
                "Batch sizes (mean)",
                [
                    (mean("llm_batch_size"), "LLM {{instance}}"),
                    (mean("flow_batch_size"), "flow {{instance}}"),
                ],
                "short",
                "requests per batched LLM decode step and per flow call",
            ),
            (
                "Outcomes and rejections / s",
                [
                    (rate_by("synthesis_requests_total", "instance, state"), "{{instance}} {{state}}"),
                    (rate_by("queue_rejections_total"), "{{instance}} rejected (429)"),
                ],
                "reqps",
                "finished requests by final state, and requests refused with a full queue",
            ),
        ],
    ),
    (
        "Ray Serve (replicas)",
        [
            (
                "Requests in each replica",
                [("sum by (replica) (ray_serve_replica_processing_queries)", "{{replica}}")],
                "short",
                "ongoing requests per replica, as Serve counts them (autoscaling reads these)",
            ),
            (
                "Waiting in Serve's router",
                [("sum by (deployment) (ray_serve_deployment_queued_queries)", "{{deployment}}")],
                "short",
                "requests not yet assigned to a replica (all replicas at max_ongoing_requests)",
            ),
            (
                "Healthy replicas and restarts",
                [
                    ("sum by (deployment) (ray_serve_deployment_replica_healthy)", "healthy {{deployment}}"),
                    (
                        'sum by (deployment) (increase({__name__=~"ray_serve_deployment_replica_starts(_total)?"}'
                        f"[{RATE}]))",
                        "starts {{deployment}}",
                    ),
                ],
                "short",
                "replicas passing their health check, and replicas started (restarts, scale-ups)",
            ),
        ],
    ),
]


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    for row_title, row_panels in _LAYOUT:
        panels.append(_row(row_title, y))
        y += 1
        for i, (title, targets, unit, description) in enumerate(row_panels):
            panels.append(_panel(title, targets, unit, x=8 * i, y=y, description=description))
        y += 8
    for panel_id, panel in enumerate(panels, start=1):
        panel["id"] = panel_id
    return {
        "title": "cosyserve",
        "uid": "cosyserve",
        "description": "cosyserve servers and Ray Serve replicas, one line per instance",
        "tags": ["cosyserve", "tts", "ray-serve"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def main() -> int:
    sys.stdout.write(json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prometheus metrics, one :class:`CollectorRegistry` per app (tests create many apps)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cosyserve.api import SynthesisRequest
from cosyserve.engine.loop import EngineLoop, EngineObserver, EngineRequest, RequestState, StepPolicy

_TTFC_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_RTF_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory_bytes() -> int | None:
    """This process's resident set size now (Linux /proc), or None where that is not readable."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


class ServerMetrics(EngineObserver):
    """HTTP counters (fed by the request middleware) and engine hooks (fed by the engine
    thread; prometheus_client is thread-safe)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "cosyserve_http_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "cosyserve_http_request_duration_seconds",
            "time to the response head (streams: to first audio)",
            ["endpoint"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("cosyserve_queue_depth", "requests waiting for an engine slot", registry=r)
        self.active_streams = Gauge("cosyserve_active_streams", "requests the engine is stepping", registry=r)
        self.time_to_first_chunk = Histogram(
            "cosyserve_time_to_first_chunk_seconds",
            "submit to first audio chunk, queueing included",
            buckets=_TTFC_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "cosyserve_rtf",
            "real-time factor of finished requests (wall time / audio time)",
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.audio_seconds = Counter(
            "cosyserve_audio_seconds",
            "seconds of audio produced",
            registry=r,
        )
        self.synthesis = Counter(
            "cosyserve_synthesis_requests",
            "engine requests by outcome",
            ["mode", "state"],
            registry=r,
        )
        self.queue_rejections = Counter("cosyserve_queue_rejections", "requests refused with 429", registry=r)

        self.resident_memory = Gauge(
            "cosyserve_resident_memory_bytes", "resident set size of the server process", registry=r
        )
        self.resident_memory.set_function(lambda: resident_memory_bytes() or 0)
        self.open_streams = Gauge(
            "cosyserve_open_streams", "streamed responses being sent (HTTP side)", registry=r
        )

    def bind_streams(self, count: Callable[[], int]) -> None:
        self.open_streams.set_function(count)

    def bind_engine(self, engine: EngineLoop) -> None:
        # Read at scrape time: no bookkeeping on the hot path.
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.active_streams.set_function(lambda: engine.active_count)

    # -- EngineObserver --

    def first_chunk(self, item: EngineRequest, seconds: float) -> None:
        self.time_to_first_chunk.observe(seconds)

    def finished(self, item: EngineRequest) -> None:
        self.synthesis.labels(mode=item.request.mode, state=item.state.value).inc()
        if item.audio_seconds > 0:
            self.audio_seconds.inc(item.audio_seconds)
            if item.state is RequestState.DONE:
                self.rtf.observe(item.rtf)

    def rejected(self, request: SynthesisRequest) -> None:
        self.queue_rejections.inc()

    # -- HTTP --

    def observe_http(self, endpoint: str, method: str, status: int, seconds: float | None) -> None:
        self.http_requests.labels(endpoint=endpoint, method=method, status=str(status)).inc()
        if seconds is not None:
            self.http_duration.labels(endpoint=endpoint).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def register_prometheus(policy: StepPolicy, registry: Any) -> None:
    """Export a batching policy's per-step numbers into a prometheus ``registry``
    (no-op for other policies)."""
    from cosyserve.engine.batching import BatchingPolicy

    if not isinstance(policy, BatchingPolicy):
        return

    batch = Histogram(
        "cosyserve_llm_batch_size",
        "requests in each batched LLM decode step",
        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
        registry=registry,
    )
    step_seconds = Histogram(
        "cosyserve_engine_step_seconds",
        "duration of one engine step (LLM decode + audio work)",
        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        registry=registry,
    )
    flow_batch = Histogram(
        "cosyserve_flow_batch_size",
        "requests in each flow Euler loop",
        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
        registry=registry,
    )
    prefilled = Counter("cosyserve_llm_prefills", "requests that joined the LLM batch", registry=registry)
    waits = Histogram(
        "cosyserve_engine_wait_seconds",
        "queue: submit to engine admission; join: admission to the first speech token",
        ["stage"],
        buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
        registry=registry,
    )

    def observe(step: Any) -> None:  # a StepStats
        if step.llm_batch:
            batch.observe(step.llm_batch)
        if step.prefilled:
            prefilled.inc(step.prefilled)
        if step.flow_calls:
            flow_batch.observe(step.audio_items / step.flow_calls)
        step_seconds.observe(step.seconds)

    policy.add_hook(observe)
    policy.add_wait_hook(lambda stage, seconds: waits.labels(stage=stage).observe(seconds))

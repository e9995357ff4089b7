"""Prometheus metrics, one :class:`CollectorRegistry` per app (tests create many apps)."""

from __future__ import annotations

import os
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cosyserve.api import SynthesisRequest
from cosyserve.engine.loop import EngineLoop, EngineObserver, EngineRequest, RequestState

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

"""`cosyserve bench --concurrency N`: many requests at once, batched vs one at a time.

Two phases per mode, in one process, on one loaded model (so the ratios compare like with like
on a noisy machine):

* **non-streaming** (throughput): ``N`` requests submitted together to an engine with the
  batching policy, and identical requests served one after another (a few, half before and half
  after the concurrent phase, so that load drifting on a shared machine hits both sides alike).
  Reported: aggregate audio seconds per wall second for both and their ratio
  (``throughput_ratio``), per-request RTF.
* **streaming** (time to first audio): one stream alone, ``N`` streams submitted together, one
  stream alone again. Reported: each stream's time to first chunk (submit → first audio),
  percentiles and the worst one over the single-stream time. Streams are cancelled once every
  one of them has its first chunk (the rest of the audio does not change that number and would
  only cost time).

Every request is forced to ``tokens`` speech tokens (EOS masked), so the work is the same
whatever the weights (a synthetic ``make-model`` directory works). ``http=True`` runs the real
FastAPI app under uvicorn on 127.0.0.1 (an ephemeral port, never another interface) and drives
it with ``N`` client threads over loopback (``/inference_sft``, raw PCM streaming); otherwise
the engine loop is driven in-process. ``url=...`` drives an endpoint that is already running
instead (a cosyserve server, or the Ray Serve application's proxy) with the same phases; the
server then decides the number of tokens (nothing is forced), and the report counts which
instance (``X-Cosyserve-Instance``) answered. Concurrency and time are bounded (``max_seconds``
per phase: what is still running then is cancelled and reported as failed).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from cosyserve.errors import AcceleratorUnavailableError, InvalidRequestError

logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 64
DEFAULT_TEXT = "This is a benchmark sentence that the model reads aloud for the concurrency test."
DEFAULT_VOICE = "英文女"


@dataclass
class RequestResult:
    index: int
    ok: bool = False
    first_chunk_s: float | None = None  # submit → first audio (what a client waits)
    total_s: float = 0.0
    audio_s: float = 0.0
    error: str | None = None
    instance: str | None = None  # X-Cosyserve-Instance of the server that answered (HTTP)

    @property
    def rtf(self) -> float | None:
        return self.total_s / self.audio_s if self.audio_s > 0 else None


@dataclass
class PhaseResult:
    name: str
    concurrency: int
    wall_s: float = 0.0
    requests: list[RequestResult] = field(default_factory=list)
    batching: dict[str, Any] | None = None

    @property
    def audio_s(self) -> float:
        return sum(r.audio_s for r in self.requests)

    @property
    def throughput(self) -> float:
        """Aggregate audio seconds per wall second."""
        return self.audio_s / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        first = [r.first_chunk_s for r in self.requests if r.first_chunk_s is not None]
        rtf = [r.rtf for r in self.requests if r.ok and r.rtf is not None]
        out: dict[str, Any] = {
            "concurrency": self.concurrency,
            "requests": len(self.requests),
            "ok": sum(r.ok for r in self.requests),
            "failed": [r.error for r in self.requests if not r.ok and r.error],
            "wall_s": round(self.wall_s, 3),
            "audio_s": round(self.audio_s, 3),
            "audio_s_per_wall_s": round(self.throughput, 4),
            **_percentiles("first_chunk", first),
            **_percentiles("rtf", rtf, digits=3),
            "per_request": [
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()}
                for r in self.requests
            ],
        }
        if self.batching is not None:
            out["batching"] = self.batching
        instances = Counter(r.instance for r in self.requests if r.instance)
        if instances:
            out["instances"] = dict(sorted(instances.items()))
        return out


def _percentiles(name: str, values: Sequence[float], digits: int = 4) -> dict[str, float | None]:
    if not values:
        return {f"{name}_p50_s": None, f"{name}_p95_s": None, f"{name}_max_s": None}
    arr = np.asarray(values, dtype=np.float64)
    suffix = "" if name == "rtf" else "_s"
    return {
        f"{name}_p50{suffix}": round(float(np.percentile(arr, 50)), digits),
        f"{name}_p95{suffix}": round(float(np.percentile(arr, 95)), digits),
        f"{name}_max{suffix}": round(float(arr.max()), digits),
    }


# --------------------------------------------------------------------------------------------
# In-process: the engine loop directly
# --------------------------------------------------------------------------------------------


class _InProcessDriver:
    """Runs phases against an :class:`~cosyserve.engine.loop.EngineLoop` in this process."""

    def __init__(self, backend: Any, batch_settings: SimpleNamespace):
        self.backend = backend
        self.batch_settings = batch_settings

    def run_phase(
        self, name: str, requests: list[Any], concurrent: bool, first_chunk_only: bool, max_seconds: float
    ) -> PhaseResult:
        return asyncio.run(self._phase(name, requests, concurrent, first_chunk_only, max_seconds))

    async def _phase(
        self, name: str, requests: list[Any], concurrent: bool, first_chunk_only: bool, max_seconds: float
    ) -> PhaseResult:
        from cosyserve.engine.batching import BatchingPolicy, config_from_settings
        from cosyserve.engine.loop import EngineLoop

        n = len(requests)
        policy = BatchingPolicy(self.backend, config_from_settings(self.backend, self.batch_settings))
        engine = EngineLoop(
            self.backend, max_active=max(n, 1), max_queue=n, request_timeout_s=None, policy=policy
        )
        results = [RequestResult(i) for i in range(n)]
        all_first = asyncio.Event()
        firsts = 0
        handles: list[Any] = []

        async def consume(i: int, request: Any) -> None:
            nonlocal firsts
            handle = engine.submit(request)
            handles.append(handle)
            result = results[i]
            try:
                async for chunk in handle:
                    result.audio_s += chunk.duration_s
                    if result.first_chunk_s is None:
                        result.first_chunk_s = handle.first_chunk_seconds
                        firsts += 1
                        if firsts == n:
                            all_first.set()
                        if first_chunk_only:
                            await all_first.wait()
                            handle.cancel()
                            break
                result.ok = True
            except Exception as exc:  # noqa: BLE001 - reported per request
                result.error = f"{type(exc).__name__}: {exc}"
            finally:
                result.total_s = handle.total_seconds

        started = time.perf_counter()
        deadline = started + max_seconds
        try:
            if concurrent:
                await asyncio.wait_for(
                    asyncio.gather(*(consume(i, r) for i, r in enumerate(requests))), max_seconds
                )
            else:
                for i, request in enumerate(requests):
                    await asyncio.wait_for(consume(i, request), max(1.0, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            logger.warning("phase %s: over %.0f s; cancelling what is left", name, max_seconds)
            for handle in handles:
                handle.cancel()
            for result in results:
                if not result.ok and result.error is None:
                    result.error = f"not finished within {max_seconds:g} s"
        wall = time.perf_counter() - started
        await engine.shutdown(5.0)
        return PhaseResult(name, n if concurrent else 1, wall, results, policy.stats())


# --------------------------------------------------------------------------------------------
# HTTP: the real app over loopback
# --------------------------------------------------------------------------------------------


def split_url(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path prefix)`` of a server's base URL (a prefix such as a Ray Serve
    route is kept: requests go to ``{prefix}/inference_sft``)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def http_connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the server at ``url`` and the path prefix to put before routes."""
    scheme, host, port, prefix = split_url(url)
    cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    return cls(host, port, timeout=max(1.0, timeout)), prefix


def _auth_headers() -> dict[str, str]:
    """The bearer key of a server that needs one (``COSYSERVE_API_KEY``, as the server reads it)."""
    key = os.environ.get("COSYSERVE_API_KEY") or None
    return {"Authorization": f"Bearer {key}"} if key else {}


def fetch_json(url: str, path: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """``GET {url}{path}`` as JSON, or None when the server does not answer it (not every server
    behind a URL is cosyserve)."""
    conn, prefix = http_connection(url, timeout)
    try:
        conn.request("GET", prefix + path, headers=_auth_headers())
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        data = json.loads(body)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class HttpDriver:
    """Runs phases against a server over HTTP: ``N`` client threads, each request a POST of
    ``/inference_sft`` (raw PCM streaming) under ``url``. The server may be this process's
    (``--http``) or any other that speaks the CosyVoice API (``--url``: another cosyserve, a
    Ray Serve deployment). ``stats()`` gives the server's batching figures where it has them."""

    def __init__(self, url: str, stats: Callable[[], dict[str, Any] | None] | None = None):
        split_url(url)  # refuse a bad URL before any phase
        self.url = url
        self.stats = stats or (lambda: _remote_batching(url))

    def run_phase(
        self, name: str, requests: list[Any], concurrent: bool, first_chunk_only: bool, max_seconds: float
    ) -> PhaseResult:
        n = len(requests)
        results = [RequestResult(i) for i in range(n)]
        barrier = _FirstChunkBarrier(n if concurrent else 1)
        deadline = time.perf_counter() + max_seconds
        before = dict(self.stats() or {})
        started = time.perf_counter()
        if concurrent:
            with ThreadPoolExecutor(max_workers=n, thread_name_prefix="loadtest-client") as pool:
                futures = [
                    pool.submit(self._one, r, results[i], barrier, first_chunk_only, deadline)
                    for i, r in enumerate(requests)
                ]
                for future in futures:
                    future.result()
        else:
            for i, r in enumerate(requests):
                self._one(r, results[i], _FirstChunkBarrier(1), first_chunk_only, deadline)
        wall = time.perf_counter() - started
        stats = self.stats()
        if stats is not None and "steps" in stats:
            stats["steps_in_phase"] = stats["steps"] - before.get("steps", 0)
        return PhaseResult(name, n if concurrent else 1, wall, results, stats)

    def _one(
        self,
        request: Any,
        result: RequestResult,
        barrier: _FirstChunkBarrier,
        first_chunk_only: bool,
        deadline: float,
    ) -> None:
        fields = {
            "tts_text": request.text,
            "spk_id": request.voice,
            "format": "stream",
            "stream": "true" if request.stream else "false",
        }
        if request.seed is not None:
            fields["seed"] = str(request.seed)
        body = urllib.parse.urlencode(fields)
        conn, prefix = http_connection(self.url, deadline - time.perf_counter())
        t0 = time.perf_counter()
        try:
            conn.request(
                "POST",
                prefix + "/inference_sft",
                body,
                {"Content-Type": "application/x-www-form-urlencoded", **_auth_headers()},
            )
            response = conn.getresponse()
            result.instance = response.headers.get("X-Cosyserve-Instance")
            if response.status != 200:
                result.error = f"HTTP {response.status}: {response.read(300)!r}"
                return
            rate = int(response.headers.get("X-Sample-Rate", "22050"))
            received = 0
            while True:
                data = response.read1(65536)  # blocking; the socket timeout is the phase's limit
                if not data:
                    result.ok = True
                    break
                if received == 0:
                    result.first_chunk_s = time.perf_counter() - t0
                    barrier.arrive()
                received += len(data)
                if first_chunk_only:
                    # Keep the stream open until every client has its first chunk; closing the
                    # connection then cancels the request on the server.
                    result.ok = barrier.wait(deadline - time.perf_counter())
                    if not result.ok:
                        result.error = "other streams' first chunks did not arrive in time"
                    break
            result.audio_s = received / 2 / rate
        except Exception as exc:  # noqa: BLE001 - reported per request
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            result.total_s = time.perf_counter() - t0
            conn.close()


def _remote_batching(url: str) -> dict[str, Any] | None:
    info = fetch_json(url, "/performance_info")
    engine = (info or {}).get("engine")
    batching = engine.get("batching") if isinstance(engine, dict) else None
    return dict(batching) if isinstance(batching, dict) else None


class _LocalServer:
    """The real FastAPI app under uvicorn on 127.0.0.1 (an ephemeral port), for ``--http``."""

    def __init__(self, backend: Any, batch_settings: SimpleNamespace, concurrency: int, max_seconds: float):
        import uvicorn

        from cosyserve.engine.batching import BatchingPolicy, config_from_settings
        from cosyserve.server.app import create_app
        from cosyserve.server.metrics import register_prometheus
        from cosyserve.settings import Settings

        settings = Settings(
            model_dir=None,
            api_key=None,
            host="127.0.0.1",
            max_active=max(concurrency, 1),
            max_queue=max(concurrency, 1),
            request_timeout_s=max_seconds + 60,
            max_text_chars=5000,
            batching=True,
            max_batch=batch_settings.max_batch,
            token_budget=batch_settings.token_budget,
            flow_batch=batch_settings.flow_batch,
        )
        # The app wires the batching policy from these settings, as `cosyserve serve` does.
        self.app = create_app(settings, backend=backend, launch_report={"plan": "loadtest"})
        engine = self.app.state.cosyserve.engine
        if not isinstance(engine.policy, BatchingPolicy):  # an app that does not wire it itself
            engine.policy = BatchingPolicy(backend, config_from_settings(backend, batch_settings))
            register_prometheus(engine.policy, self.app.state.cosyserve.metrics.registry)
        self.policy: BatchingPolicy | None = engine.policy
        self.host = "127.0.0.1"
        self.headers: dict[str, str] = {}
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="loadtest-uvicorn", daemon=True)

    def __enter__(self) -> _LocalServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the loadtest server did not start")
            time.sleep(0.02)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def driver(self) -> HttpDriver:
        return HttpDriver(self.url, stats=lambda: dict(self.policy.stats()))

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)


class _FirstChunkBarrier:
    def __init__(self, n: int):
        self.n = n
        self.count = 0
        self._event = threading.Event()
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    def arrive(self) -> None:
        with self._lock:
            self.count += 1
            if self.count >= self.n:
                self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(max(0.0, timeout))


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def _requests(n: int, stream: bool, text: str, voice: str, seed0: int) -> list[Any]:
    from cosyserve.api import SynthesisRequest

    return [SynthesisRequest(text=text, voice=voice, stream=stream, seed=seed0 + i) for i in range(n)]


def _warm_up(backend: Any, tokens: int, text: str, voice: str) -> float:
    """Fill the position caches to their final size and run the whole pipeline once."""
    import torch

    from cosyserve.api import SynthesisRequest
    from cosyserve.engine.batching import BatchConfig, BatchRunner

    t0 = time.perf_counter()
    model = backend.model
    positions = len(backend.text.tokenize(text)) + tokens + 64
    with torch.inference_mode():
        # Relative-position caches at their final size: no timed step pays for growing one.
        for net in (model.llm, model.flow):
            for module in net.modules():
                if hasattr(module, "precompute_positions"):
                    module.precompute_positions(positions)
    # Two short requests through a runner: batched decode, a stream chunk, a whole segment.
    runner = BatchRunner(backend, BatchConfig(token_budget=10_000))
    for stream in (False, True):
        request = SynthesisRequest(text=text, voice=voice, stream=stream, seed=0)
        runner.add(backend.open(request, num_tokens=min(tokens, 130)))
    while len(runner):
        for event in runner.step():
            if event.error is not None:
                raise event.error
    return time.perf_counter() - t0


def _load_backend(
    model_dir: str | Path,
    plan: str | None,
    device: str,
    num_threads: int | None,
    stream_first_hop: int | None,
) -> tuple[Any, str | None]:
    from cosyserve.acceleration.launcher import open_family
    from cosyserve.families.base import FamilyOptions

    if plan is None:
        options = FamilyOptions(device=device, num_threads=num_threads, stream_first_hop=stream_first_hop)
        return open_family(model_dir).open_backend(model_dir, options), None
    from cosyserve.acceleration.launcher import create_backend

    settings = SimpleNamespace(
        model_dir=str(model_dir),
        force_config=None if plan == "auto" else plan,
        auto=True,
        device=device,
        voices_dir=None,
        stream_first_hop=stream_first_hop,
    )
    backend, launch = create_backend(settings)
    return backend, launch.get("plan")


def run_concurrency_bench(
    model_dir: str | Path | None,
    concurrency: int = 8,
    tokens: int = 250,
    stream: bool | None = None,
    json_out: str | Path | None = None,
    http: bool = False,
    *,
    text: str = DEFAULT_TEXT,
    voice: str | None = None,
    max_seconds: float = 1800.0,
    device: str = "cpu",
    plan: str | None = "auto",
    num_threads: int | None = None,
    stream_first_hop: int | None = None,
    max_batch: int | None = None,
    token_budget: int | None = None,
    flow_batch: int | None = None,
    warmup: bool = True,
    baseline_requests: int | None = None,
    backend: Any = None,
    url: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the concurrency benchmark and return its report (also written to ``json_out``:
    a path, or ``"-"`` for stdout).

    ``stream``: None runs both modes; False only the non-streaming throughput phases; True only
    the streaming first-chunk phases. ``backend``: an already loaded CosyVoice backend (tests);
    otherwise ``model_dir`` is loaded with acceleration ``plan``: ``"auto"`` (what the server
    would pick on this machine), a plan name (``cpu_fast``, ``eager``, ...) or None (plain eager
    on ``device``). ``baseline_requests`` (default ``min(concurrency, 4)``): how many requests
    measure the one-at-a-time rate, half before and half after the concurrent phase (the single
    stream likewise runs once before and once after). The report's top level holds
    ``throughput_ratio`` (batched ÷ one-at-a-time aggregate audio s per wall s),
    ``first_chunk_p50_s`` / ``first_chunk_p95_s`` (concurrent streams) and
    ``first_chunk_max_ratio`` (slowest concurrent first chunk ÷ the single-stream one).

    ``url``: drive an already running server there instead (any server of the CosyVoice API,
    e.g. another host or a Ray Serve deployment; its path prefix is kept). Nothing is loaded
    here, so the token count is the server's own (``tokens`` is not forced) and the batching
    figures come from its ``/performance_info`` when it has one.
    """
    if url is not None:
        return _run_against_url(
            url, int(concurrency), stream, json_out, text, voice, max_seconds, baseline_requests, progress
        )
    import torch

    if not 1 <= int(concurrency) <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}")
    concurrency, tokens = int(concurrency), int(tokens)
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    say = progress or (lambda message: logger.info("%s", message))
    # One-at-a-time requests for the baseline (identical requests: a few give its rate).
    baseline = max(1, min(concurrency, 4) if baseline_requests is None else int(baseline_requests))
    if backend is None:
        if model_dir is None:
            raise ValueError("give a model directory (or a loaded backend)")
        backend, plan = _load_backend(model_dir, plan, device, num_threads, stream_first_hop)
    else:
        plan = backend.options.extra.get("plan")
    if voice is None:  # the v1 English voice where there is one, else the model's first
        speakers = list(backend.speakers)
        voice = DEFAULT_VOICE if DEFAULT_VOICE in speakers or not speakers else speakers[0]
    saved = (backend.options.num_tokens, backend.options.stream_first_hop)
    backend.options.num_tokens = tokens
    if stream_first_hop is not None:
        backend.options.stream_first_hop = stream_first_hop
    batch_settings = SimpleNamespace(
        max_active=concurrency, max_batch=max_batch, token_budget=token_budget, flow_batch=flow_batch
    )
    report: dict[str, Any] = {
        "mode": "http" if http else "in-process",
        "concurrency": concurrency,
        "tokens": tokens,
        "device": str(backend.device),
        "plan": plan,
        "torch_threads": torch.get_num_threads(),
        "stream_first_hop": backend.options.stream_first_hop,
        "text": text,
        "voice": voice,
        "baseline_requests": baseline,
    }
    try:
        if warmup:
            say("warming up")
            report["warmup_s"] = round(_warm_up(backend, tokens, text, voice), 3)
        if http:
            with _LocalServer(backend, batch_settings, concurrency, max_seconds) as server:
                report["url"] = server.url
                _run_modes(
                    server.driver(), report, concurrency, stream, text, voice, max_seconds, say, baseline
                )
        else:
            driver = _InProcessDriver(backend, batch_settings)
            _run_modes(driver, report, concurrency, stream, text, voice, max_seconds, say, baseline)
    finally:
        backend.options.num_tokens, backend.options.stream_first_hop = saved
    _write_report(report, json_out)
    return report


def _write_report(report: dict[str, Any], json_out: str | Path | None) -> None:
    if json_out is not None:
        text_out = json.dumps(report, indent=2, ensure_ascii=False)
        if str(json_out) == "-":
            sys.stdout.write(text_out + "\n")
        else:
            Path(json_out).write_text(text_out + "\n", encoding="utf-8")


def _run_against_url(
    url: str,
    concurrency: int,
    stream: bool | None,
    json_out: str | Path | None,
    text: str,
    voice: str,
    max_seconds: float,
    baseline_requests: int | None,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}")
    say = progress or (lambda message: logger.info("%s", message))
    baseline = max(1, min(concurrency, 4) if baseline_requests is None else int(baseline_requests))
    try:
        driver = HttpDriver(url)
    except ValueError as exc:
        raise InvalidRequestError(
            f"--url must be an http(s) URL such as http://127.0.0.1:9234: {exc}"
        ) from exc
    info = fetch_json(url, "/performance_info")
    if info is None:
        raise AcceleratorUnavailableError(f"cannot use {url} as a cosyserve endpoint (no /performance_info)")
    backend = info.get("backend") if isinstance(info.get("backend"), dict) else {}
    if voice is None:  # the default voice where the server has it, else its first
        voices = (fetch_json(url, "/v1/voices") or {}).get("voices") or []
        voice = DEFAULT_VOICE if DEFAULT_VOICE in voices or not voices else voices[0]
    report: dict[str, Any] = {
        "mode": "url",
        "url": url,
        "concurrency": concurrency,
        "tokens": None,  # the server decides: nothing is forced from here
        "plan": (info.get("launch") or {}).get("plan") if isinstance(info.get("launch"), dict) else None,
        "device": backend.get("device"),
        "text": text,
        "voice": voice,
        "baseline_requests": baseline,
    }
    # As many at once as the timed phase, so that every replica behind the URL warms up.
    say(f"warming up {url} with {concurrency} requests")
    warm = driver.run_phase("warmup", _requests(concurrency, False, text, voice, 0), True, False, max_seconds)
    report["warmup_s"] = round(warm.wall_s, 3)
    _run_modes(driver, report, concurrency, stream, text, voice, max_seconds, say, baseline)
    _write_report(report, json_out)
    return report


def _merge(name: str, parts: Sequence[PhaseResult]) -> PhaseResult:
    """One phase out of several runs of it (walls add up; requests renumbered)."""
    requests = [r for p in parts for r in p.requests]
    for i, r in enumerate(requests):
        r.index = i
    merged = PhaseResult(name, parts[0].concurrency, sum(p.wall_s for p in parts), requests)
    merged.batching = parts[-1].batching
    return merged


def _run_modes(
    driver: _InProcessDriver | HttpDriver,
    report: dict[str, Any],
    n: int,
    stream: bool | None,
    text: str,
    voice: str,
    max_seconds: float,
    say: Callable[[str], None],
    baseline: int,
) -> None:
    # Baselines run half before and half after the concurrent phase (A-B-A): on a shared machine
    # the load drifts over minutes, and a baseline on one side only would carry that drift into
    # the ratio. Identical requests (forced tokens), so a few of them give the one-at-a-time rate.
    if stream is not True:
        before, after = (baseline + 1) // 2, baseline // 2
        say(f"non-streaming: {before} one at a time, {n} batched, {after} one at a time")
        seq_a = driver.run_phase(
            "one_at_a_time", _requests(before, False, text, voice, 100), False, False, max_seconds
        )
        batched = driver.run_phase("batched", _requests(n, False, text, voice, 100), True, False, max_seconds)
        say(f"non-streaming: batched {batched.throughput:.3f} audio s / wall s")
        parts = [seq_a]
        if after:
            parts.append(
                driver.run_phase(
                    "one_at_a_time",
                    _requests(after, False, text, voice, 100 + before),
                    False,
                    False,
                    max_seconds,
                )
            )
        sequential = _merge("one_at_a_time", parts)
        ratio = batched.throughput / sequential.throughput if sequential.throughput > 0 else None
        report["non_stream"] = {
            "batched": batched.summary(),
            "one_at_a_time": sequential.summary(),
            "throughput_ratio": None if ratio is None else round(ratio, 4),
        }
        report["throughput_ratio"] = report["non_stream"]["throughput_ratio"]
        say(f"non-streaming: one at a time {sequential.throughput:.3f}; ratio {ratio}")
    if stream is not False:
        say(f"streaming: one stream alone, {n} streams at once (until every first chunk), one alone")
        single_a = driver.run_phase("single", _requests(1, True, text, voice, 200), True, True, max_seconds)
        batched = driver.run_phase("batched", _requests(n, True, text, voice, 200), True, True, max_seconds)
        single_b = driver.run_phase("single", _requests(1, True, text, voice, 201), True, True, max_seconds)
        b, s = batched.summary(), _merge("single", [single_a, single_b]).summary()
        single_first = s["first_chunk_p50_s"]  # the mean of the two single runs
        worst = b["first_chunk_max_s"]
        ratio = worst / single_first if worst is not None and single_first else None
        report["stream"] = {
            "batched": b,
            "single": s,
            "single_first_chunk_s": single_first,
            "first_chunk_max_ratio": None if ratio is None else round(ratio, 4),
        }
        report["first_chunk_p50_s"] = b["first_chunk_p50_s"]
        report["first_chunk_p95_s"] = b["first_chunk_p95_s"]
        report["first_chunk_max_s"] = worst
        report["single_first_chunk_s"] = single_first
        report["first_chunk_max_ratio"] = report["stream"]["first_chunk_max_ratio"]
        say(
            f"streaming: first chunk p50 {b['first_chunk_p50_s']} s, worst {worst} s, single {single_first} s"
        )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_concurrency_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the concurrency benchmark (``cosyserve bench`` adds them to its own:
    the model, ``--tokens``, ``--stream`` and ``--json`` stay the bench's)."""
    group = parser.add_argument_group("concurrency (continuous batching)")
    group.add_argument(
        "--concurrency",
        type=int,
        default=None,
        metavar="N",
        help=f"run N requests at once, batched vs one at a time (1-{MAX_CONCURRENCY})",
    )
    group.add_argument(
        "--http",
        action="store_true",
        help="with --concurrency: drive the real server over 127.0.0.1 instead of the engine in-process",
    )
    group.add_argument(
        "--url",
        default=None,
        metavar="URL",
        help="with --concurrency: drive an already running server at URL (any CosyVoice API server, "
        "e.g. http://host:8000/prefix); nothing is loaded here and the model flags are ignored",
    )
    group.add_argument(
        "--voice",
        default=None,
        help="with --url or --realtime: the voice to ask for (default: the server's first voice; "
        "--realtime: the first English built-in voice)",
    )
    group.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="MINUTES",
        help="with --url: N clients for MINUTES, every format, streamed and whole, some leaving "
        "mid-stream; reports statuses, undecodable bodies, server RSS and whether it drained",
    )
    group.add_argument(
        "--disconnect-fraction",
        type=float,
        default=0.15,
        help="with --soak: share of streams abandoned after their first chunk (default 0.15)",
    )
    group.add_argument(
        "--soak-warmup-s",
        dest="soak_warmup_s",
        type=float,
        default=60.0,
        help="with --soak: RSS growth is measured from this long after the start (at most half the run)",
    )
    group.add_argument(
        "--max-seconds",
        type=float,
        default=1800.0,
        help="with --concurrency: time limit per phase; what still runs is cancelled (default 1800)",
    )
    group.add_argument(
        "--concurrency-plan",
        default="auto",
        metavar="PLAN",
        help="with --concurrency: acceleration plan (default auto: what the server picks; 'none': plain eager)",
    )
    group.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        help="with --concurrency: one-at-a-time requests for the baseline rate (default min(N, 4))",
    )
    group.add_argument("--max-batch", type=int, default=None, help="LLM rows per decode step (default N)")
    group.add_argument(
        "--token-budget", type=int, default=None, help="flow tokens per engine step (default: per device)"
    )
    group.add_argument(
        "--flow-batch", type=int, default=None, help="requests per flow Euler loop (default N)"
    )


def soak_main(args: argparse.Namespace) -> int:
    """``--soak MINUTES --url URL``: the soak of :mod:`cosyserve.tools.soak`."""
    from cosyserve.tools.soak import format_soak, run_soak, soak_ok

    if not getattr(args, "url", None):
        print("cosyserve bench: --soak drives a running server: give its --url", file=sys.stderr)
        return 2
    report = run_soak(
        args.url,
        clients=args.concurrency or 16,
        minutes=args.soak,
        voice=args.voice,
        disconnect_fraction=args.disconnect_fraction,
        warmup_s=args.soak_warmup_s,
    )
    json_flag = getattr(args, "json", False)
    if json_flag:
        _write_report(report, "-" if json_flag is True else json_flag)
    else:
        print(format_soak(report))
    return 0 if soak_ok(report) else 1


def bench_main(args: argparse.Namespace) -> int:
    """``cosyserve bench --concurrency N``: the bench's own flags (``--model_dir`` already
    resolved, ``--tokens``, ``--json``, ``--stream_first_hop``) plus
    :func:`add_concurrency_arguments`'. Both modes always run: the streaming first-chunk
    phases are half of what this benchmark is for."""
    if getattr(args, "soak", None):
        return soak_main(args)
    report = run_concurrency_bench(
        args.model_dir,
        concurrency=args.concurrency,
        tokens=getattr(args, "tokens", None) or 250,
        stream=None,
        json_out="-" if getattr(args, "json", False) else None,
        http=args.http,
        max_seconds=args.max_seconds,
        baseline_requests=args.baseline_requests,
        plan=None if args.concurrency_plan == "none" else args.concurrency_plan,
        stream_first_hop=getattr(args, "stream_first_hop", None),
        max_batch=args.max_batch,
        token_budget=args.token_budget,
        flow_batch=args.flow_batch,
        url=getattr(args, "url", None),
        voice=args.voice,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    if not getattr(args, "json", False):
        print(format_summary(report))
    return 0 if _all_ok(report) else 1


def _all_ok(report: dict[str, Any]) -> bool:
    phases = [
        p
        for section in ("non_stream", "stream")
        for p in report.get(section, {}).values()
        if isinstance(p, dict)
    ]
    return all(p["ok"] == p["requests"] for p in phases)


def format_summary(report: dict[str, Any]) -> str:
    """A few lines for people (the JSON has everything)."""
    lines = [
        f"concurrency {report['concurrency']}, {report['tokens'] or 'server-chosen'} tokens, {report['mode']}, "
        f"plan {report.get('plan')}"
    ]
    ns = report.get("non_stream")
    if ns:
        lines.append(
            f"non-streaming: batched {ns['batched']['audio_s_per_wall_s']:.3f} vs one at a time "
            f"{ns['one_at_a_time']['audio_s_per_wall_s']:.3f} audio s / wall s: x{ns['throughput_ratio']}"
        )
        if ns["batched"].get("instances"):
            lines.append(f"answered by: {ns['batched']['instances']}")
    st = report.get("stream")
    if st:
        b = st["batched"]
        lines.append(
            f"streaming: first chunk p50 {b['first_chunk_p50_s']} s, p95 {b['first_chunk_p95_s']} s, "
            f"worst {b['first_chunk_max_s']} s; alone {st['single_first_chunk_s']} s "
            f"(worst / alone x{st['first_chunk_max_ratio']})"
        )
    return "\n".join(lines)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Standalone use (``python -m cosyserve.tools.loadtest``)."""
    parser.add_argument("--model", default=None, help="CosyVoice model directory (not with --url)")
    parser.add_argument("--tokens", type=int, default=250, help="speech tokens per request (default 250)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream", dest="stream", action="store_true", default=None, help="streaming phases only"
    )
    mode.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming phases only")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report here ('-': stdout)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream-first-hop", type=int, default=None)
    add_concurrency_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.soak:
        return soak_main(args)
    if args.model is None and args.url is None:
        print("cosyserve-loadtest: give --model DIR or --url URL", file=sys.stderr)
        return 2
    report = run_concurrency_bench(
        args.model,
        concurrency=args.concurrency or 8,
        tokens=args.tokens,
        stream=args.stream,
        json_out=args.json,
        http=args.http,
        max_seconds=args.max_seconds,
        device=args.device,
        baseline_requests=args.baseline_requests,
        plan=None if args.concurrency_plan == "none" else args.concurrency_plan,
        stream_first_hop=args.stream_first_hop,
        max_batch=args.max_batch,
        token_budget=args.token_budget,
        flow_batch=args.flow_batch,
        url=args.url,
        voice=args.voice,
        progress=lambda message: print(message, file=sys.stderr, flush=True),
    )
    if args.json is None:
        print(format_summary(report))
    return 0 if _all_ok(report) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli = argparse.ArgumentParser(prog="cosyserve-loadtest", description=__doc__.splitlines()[0])
    configure_parser(cli)
    sys.exit(main(cli.parse_args()))

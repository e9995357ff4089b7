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


class _HttpDriver:
    """The real FastAPI app under uvicorn on 127.0.0.1, driven by client threads."""

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

    def __enter__(self) -> _HttpDriver:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the loadtest server did not start")
            time.sleep(0.02)
        self.port = int(self.server.servers[0].sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)

    def run_phase(
        self, name: str, requests: list[Any], concurrent: bool, first_chunk_only: bool, max_seconds: float
    ) -> PhaseResult:
        n = len(requests)
        results = [RequestResult(i) for i in range(n)]
        barrier = _FirstChunkBarrier(n if concurrent else 1)
        deadline = time.perf_counter() + max_seconds
        before = dict(self.policy.stats()) if self.policy is not None else {}
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
        stats = None
        if self.policy is not None:
            stats = self.policy.stats()
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
        body = urllib.parse.urlencode(
            {
                "tts_text": request.text,
                "spk_id": request.voice,
                "format": "stream",
                "stream": "true" if request.stream else "false",
                "seed": str(request.seed),
            }
        )
        conn = self._connection(max(1.0, deadline - time.perf_counter()))
        t0 = time.perf_counter()
        try:
            conn.request(
                "POST",
                f"{self.path_prefix}/inference_sft",
                body,
                {"Content-Type": "application/x-www-form-urlencoded", **self.headers},
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

    path_prefix = ""

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


class _UrlDriver(_HttpDriver):
    """An endpoint that is already running: a cosyserve server or the Ray Serve application's
    proxy (``COSYSERVE_API_KEY``, when set, is sent as the bearer key)."""

    def __init__(self, url: str, api_key: str | None = None):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidRequestError(
                f"--url must be an http(s) URL such as http://127.0.0.1:9234, got {url!r}"
            )
        self.url = url.rstrip("/")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.path_prefix = parsed.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.policy = None

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        conn = self._connection(timeout)
        try:
            conn.request("GET", f"{self.path_prefix}{path}", headers=self.headers)
            response = conn.getresponse()
            data = response.read()
            if response.status != 200:
                raise AcceleratorUnavailableError(
                    f"GET {self.url}{path}: HTTP {response.status}: {data[:200]!r}"
                )
            return json.loads(data)
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            raise AcceleratorUnavailableError(
                f"cannot use {self.url} as a cosyserve endpoint: {exc}"
            ) from exc
        finally:
            conn.close()

    def __enter__(self) -> _UrlDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


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
    with torch.inference_mode():
        model.llm.llm.precompute_positions(len(backend.text.tokenize(text)) + tokens + 64)
        model.flow.encoder.precompute_positions(tokens + 64)
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
    voice: str = DEFAULT_VOICE,
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
    progress: Callable[[str], None] | None = None,
    url: str | None = None,
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
    ``url``: drive that running endpoint instead of loading a model (``model_dir``, ``tokens``,
    ``http`` and the batching knobs then do not apply).
    """
    import torch

    if not 1 <= int(concurrency) <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, got {concurrency}")
    concurrency, tokens = int(concurrency), int(tokens)
    if tokens < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    say = progress or (lambda message: logger.info("%s", message))
    # One-at-a-time requests for the baseline (identical requests: a few give its rate).
    baseline = max(1, min(concurrency, 4) if baseline_requests is None else int(baseline_requests))
    if url is not None:
        report = _url_bench(url, concurrency, stream, text, voice, max_seconds, warmup, baseline, say)
        _write_report(report, json_out)
        return report
    if backend is None:
        if model_dir is None:
            raise ValueError("give a model directory (or a loaded backend)")
        backend, plan = _load_backend(model_dir, plan, device, num_threads, stream_first_hop)
    else:
        plan = backend.options.extra.get("plan")
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
            with _HttpDriver(backend, batch_settings, concurrency, max_seconds) as driver:
                report["url"] = f"http://127.0.0.1:{driver.port}"
                _run_modes(driver, report, concurrency, stream, text, voice, max_seconds, say, baseline)
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


def _url_bench(
    url: str,
    concurrency: int,
    stream: bool | None,
    text: str,
    voice: str,
    max_seconds: float,
    warmup: bool,
    baseline: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The phases against a running endpoint; what it runs comes from its /performance_info."""
    driver = _UrlDriver(url, os.environ.get("COSYSERVE_API_KEY") or None)
    info = driver.get_json("/performance_info")
    voices = driver.get_json("/v1/voices").get("voices") or []
    if voices and voice not in voices:
        voice = voices[0]
    report: dict[str, Any] = {
        "mode": "url",
        "url": driver.url,
        "concurrency": concurrency,
        "tokens": None,  # not forced: each request runs to the model's own end
        "device": (info.get("backend") or {}).get("device"),
        "plan": (info.get("launch") or {}).get("plan"),
        "stream_first_hop": (info.get("settings") or {}).get("stream_first_hop"),
        "text": text,
        "voice": voice,
        "baseline_requests": baseline,
    }
    with driver:
        if warmup:
            # As many at once as the timed phase, so that every replica behind the URL warms up.
            say(f"warming up {driver.url} with {concurrency} requests")
            warm = driver.run_phase(
                "warmup", _requests(concurrency, False, text, voice, 0), True, False, max_seconds
            )
            report["warmup_s"] = round(warm.wall_s, 3)
        _run_modes(driver, report, concurrency, stream, text, voice, max_seconds, say, baseline)
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
    driver: _InProcessDriver | _HttpDriver,
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
        help="with --concurrency or --realtime: drive this running endpoint (a cosyserve server or the "
        "Ray Serve application) instead of loading a model; COSYSERVE_API_KEY is sent when set",
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


def bench_main(args: argparse.Namespace) -> int:
    """``cosyserve bench --concurrency N``: the bench's own flags (``--model_dir`` already
    resolved, ``--tokens``, ``--json``, ``--stream_first_hop``) plus
    :func:`add_concurrency_arguments`'. Both modes always run: the streaming first-chunk
    phases are half of what this benchmark is for."""
    report = run_concurrency_bench(
        args.model_dir,
        concurrency=args.concurrency,
        tokens=getattr(args, "tokens", 250),
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
        progress=lambda message: print(message, file=sys.stderr, flush=True),
        url=getattr(args, "url", None),
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
    tokens = f"{report['tokens']} tokens" if report.get("tokens") else "tokens not forced"
    lines = [f"concurrency {report['concurrency']}, {tokens}, {report['mode']}, plan {report.get('plan')}"]
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
    parser.add_argument("--model", default=None, help="CosyVoice model directory (or --url)")
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
        progress=lambda message: print(message, file=sys.stderr, flush=True),
        url=args.url,
    )
    if args.json is None:
        print(format_summary(report))
    return 0 if _all_ok(report) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli = argparse.ArgumentParser(prog="cosyserve-loadtest", description=__doc__.splitlines()[0])
    configure_parser(cli)
    sys.exit(main(cli.parse_args()))

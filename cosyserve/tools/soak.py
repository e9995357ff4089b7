"""`cosyserve bench --soak MINUTES --concurrency N --url URL`: N clients for T minutes against a
running server, every response format, streamed and whole, some clients leaving mid-stream.

Each client loops until the time is up, each time drawing one request: the CosyVoice API
(``/inference_sft``, raw PCM streaming or one file in any format) or the OpenAI API
(``/v1/audio/speech``, any format, streamed, whole or as SSE events); a share of the streams
is abandoned after the first chunk. Every complete body is decoded (PyAV; raw PCM by length;
SSE by its events) and a body that does not decode is counted. The server's resident memory
is sampled from ``/performance_info`` (``/metrics`` as the fallback) through the run; after
it the server must come back to zero queued requests, zero active ones and zero open streams.

Reported: requests by kind and status, transport errors, decode failures, disconnects, RSS at
the start, after warm-up (``warmup_s``, at most half the run: allocator arenas, ONNX Runtime's
and PyTorch's caches grow to the largest shapes seen in the first minute or so), in the middle
and at the end (growth after warm-up in percent), and whether the server drained.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import random
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cosyserve.tools.loadtest import fetch_json, http_connection

logger = logging.getLogger(__name__)

FORMATS = ("wav", "pcm", "mp3", "opus", "aac", "flac")
TEXTS = (
    "Hello there.",
    "The quick brown fox jumps over the lazy dog.",
    "This is a longer request. It has two sentences, and a few words more to say.",
    "Numbers such as 42 and 2025 are read out too.",
)
DEFAULT_WARMUP_S = 60.0


@dataclass
class SoakStats:
    requests: Counter[str] = field(default_factory=Counter)  # by kind
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    decode_failures: list[str] = field(default_factory=list)
    disconnects: int = 0
    audio_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class Scenario:
    kind: str  # "seed-stream", "seed-file", "openai-stream", "openai-file", "openai-sse"
    fmt: str
    text: str
    disconnect: bool


def choose(rng: random.Random, disconnect_fraction: float) -> Scenario:
    kind = rng.choice(["seed-stream", "seed-file", "openai-stream", "openai-file", "openai-sse"])
    fmt = "pcm" if kind in ("seed-stream", "openai-sse") else rng.choice(FORMATS)
    streaming = kind in ("seed-stream", "openai-stream", "openai-sse")
    return Scenario(kind, fmt, rng.choice(TEXTS), streaming and rng.random() < disconnect_fraction)


def _request(scenario: Scenario, voice: str, prefix: str) -> tuple[str, bytes, dict[str, str]]:
    if scenario.kind.startswith("seed"):
        fmt = "stream" if scenario.kind == "seed-stream" else scenario.fmt
        body = urllib.parse.urlencode({"tts_text": scenario.text, "spk_id": voice, "format": fmt}).encode()
        return prefix + "/inference_sft", body, {"Content-Type": "application/x-www-form-urlencoded"}
    payload: dict[str, Any] = {
        "model": "tts-1",
        "input": scenario.text,
        "voice": voice,
        "response_format": scenario.fmt,
        "stream": scenario.kind != "openai-file",
    }
    if scenario.kind == "openai-sse":
        payload["stream_format"] = "sse"
    return prefix + "/v1/audio/speech", json.dumps(payload).encode(), {"Content-Type": "application/json"}


def decoded_seconds(body: bytes, fmt: str, sample_rate: int) -> float:
    """Seconds of audio in a response body; raises ValueError when it does not decode."""
    if fmt == "pcm":
        if len(body) % 2:
            raise ValueError("odd number of bytes in 16-bit PCM")
        return len(body) / 2 / sample_rate
    import av

    samples = rate = 0
    try:
        with av.open(io.BytesIO(body)) as container:
            stream = container.streams.audio[0]
            for frame in container.decode(stream):
                samples += frame.samples
                rate = frame.sample_rate
    except (av.FFmpegError, IndexError, OSError) as exc:
        raise ValueError(f"{fmt} body does not decode: {exc}") from exc
    if not rate or not samples:
        raise ValueError(f"{fmt} body holds no audio")
    return samples / rate


def sse_audio(body: bytes) -> bytes:
    """The PCM of an SSE body; ValueError unless it ends with speech.audio.done."""
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    if not events or events[-1].get("type") != "speech.audio.done":
        raise ValueError("SSE stream without its speech.audio.done event")
    return b"".join(base64.b64decode(e["audio"]) for e in events if e.get("type") == "speech.audio.delta")


def one_request(url: str, scenario: Scenario, voice: str, stats: SoakStats, timeout: float) -> None:
    conn, prefix = http_connection(url, timeout)
    path, body, headers = _request(scenario, voice, prefix)
    try:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        status = response.status
        with stats.lock:
            stats.requests[scenario.kind] += 1
            stats.statuses[status] += 1
        if status != 200:
            response.read()
            return
        rate = int(response.headers.get("X-Sample-Rate") or 22050)
        if scenario.disconnect:
            response.read1(4096)  # the first audio, then hang up mid-stream
            with stats.lock:
                stats.disconnects += 1
            return
        data = response.read()
        try:
            if scenario.kind == "openai-sse":
                seconds = decoded_seconds(sse_audio(data), "pcm", rate)
            else:
                seconds = decoded_seconds(
                    data, "pcm" if scenario.kind == "seed-stream" else scenario.fmt, rate
                )
        except ValueError as exc:
            with stats.lock:
                stats.decode_failures.append(f"{scenario.kind} {scenario.fmt}: {exc}")
            return
        with stats.lock:
            stats.audio_s += seconds
    except (OSError, http.client.HTTPException) as exc:
        with stats.lock:
            stats.transport_errors[type(exc).__name__] += 1
    finally:
        conn.close()


def server_rss_mb(url: str) -> float | None:
    info = fetch_json(url, "/performance_info")
    process = (info or {}).get("process")
    if isinstance(process, dict) and isinstance(process.get("rss_mb"), (int, float)):
        return float(process["rss_mb"])
    conn, prefix = http_connection(url, 10)
    try:
        conn.request("GET", prefix + "/metrics")
        for line in conn.getresponse().read().decode(errors="replace").splitlines():
            if line.startswith(("cosyserve_resident_memory_bytes ", "process_resident_memory_bytes ")):
                return float(line.split()[1]) / 2**20
    except (OSError, ValueError, http.client.HTTPException):
        pass
    finally:
        conn.close()
    return None


def in_flight(url: str) -> dict[str, int] | None:
    """Queued, active and open-stream counts of a cosyserve server (None: it does not say)."""
    info = fetch_json(url, "/performance_info")
    if not info or not isinstance(info.get("engine"), dict):
        return None
    engine, http_side = info["engine"], info.get("http") or {}
    return {
        "queued": int(engine.get("queued", 0)),
        "active": int(engine.get("active", 0)),
        "open_streams": int(http_side.get("open_streams", 0)),
    }


def pick_voice(url: str) -> str:
    listing = fetch_json(url, "/v1/audio/voices") or {}
    voices = [v for v in listing.get("data", []) if isinstance(v, dict) and v.get("kind") != "saved"]
    if not voices:
        raise ValueError(f"{url} lists no built-in voice: give one with --voice")
    preferred = [v["id"] for v in voices if v["id"] in ("英文女", "英文男")]
    return preferred[0] if preferred else str(voices[0]["id"])


def run_soak(
    url: str,
    clients: int = 16,
    minutes: float = 1.0,
    *,
    voice: str | None = None,
    disconnect_fraction: float = 0.15,
    request_timeout_s: float = 300.0,
    drain_timeout_s: float = 60.0,
    warmup_s: float = DEFAULT_WARMUP_S,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the soak and return its report (see the module docstring)."""
    if clients < 1 or minutes <= 0:
        raise ValueError("a soak needs at least one client and a positive duration")
    voice = voice or pick_voice(url)
    stats = SoakStats()
    duration = minutes * 60.0
    started = time.monotonic()
    stop_at = started + duration
    rss: dict[str, float | None] = {"start": server_rss_mb(url)}
    samples: list[tuple[float, float]] = []

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while time.monotonic() < stop_at:
            one_request(url, choose(rng, disconnect_fraction), voice, stats, request_timeout_s)

    threads = [
        threading.Thread(target=client, args=(i,), name=f"soak-{i}", daemon=True) for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    warmup_s = min(warmup_s, duration / 2)
    marks = {"warm": started + warmup_s, "middle": started + duration / 2}
    while any(t.is_alive() for t in threads):
        now = time.monotonic()
        for name, at in list(marks.items()):
            if now >= at:
                rss[name] = server_rss_mb(url)
                del marks[name]
        value = server_rss_mb(url)
        if value is not None:
            samples.append((round(now - started, 1), value))
        time.sleep(min(5.0, max(0.5, duration / 60)))
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started

    drained, last = False, None
    drain_deadline = time.monotonic() + drain_timeout_s
    while time.monotonic() < drain_deadline:
        last = in_flight(url)
        if last is None or not any(last.values()):
            drained = last is not None
            break
        time.sleep(0.5)
    rss["end"] = server_rss_mb(url)
    warm, end = rss.get("warm"), rss.get("end")
    growth = None if not warm or end is None else round(100 * (end - warm) / warm, 2)
    total = sum(stats.requests.values())
    return {
        "url": url,
        "clients": clients,
        "minutes": minutes,
        "elapsed_s": round(elapsed, 1),
        "voice": voice,
        "requests": total,
        "requests_by_kind": dict(sorted(stats.requests.items())),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "server_errors": sum(v for k, v in stats.statuses.items() if k >= 500),
        "transport_errors": dict(stats.transport_errors),
        "decode_failures": len(stats.decode_failures),
        "decode_failure_examples": stats.decode_failures[:5],
        "disconnects": stats.disconnects,
        "audio_s": round(stats.audio_s, 1),
        "rss_mb": {k: (None if v is None else round(v, 1)) for k, v in rss.items()},
        "warmup_s": round(warmup_s, 1),
        "rss_growth_after_warmup_pct": growth,
        "rss_samples": samples,
        "drained": drained,
        "in_flight_after": last,
    }


def format_soak(report: dict[str, Any]) -> str:
    rss = report["rss_mb"]
    return "\n".join(
        [
            f"soak: {report['clients']} clients x {report['minutes']:g} min on {report['url']} "
            f"(voice {report['voice']}): {report['requests']} requests, statuses {report['statuses']}",
            f"5xx {report['server_errors']}, transport errors {report['transport_errors'] or 0}, "
            f"undecodable bodies {report['decode_failures']}, disconnects {report['disconnects']}, "
            f"{report['audio_s']} s of audio",
            f"server RSS MB: start {rss.get('start')}, warm {rss.get('warm')}, middle {rss.get('middle')}, "
            f"end {rss.get('end')} (after warm-up {report['rss_growth_after_warmup_pct']} %); "
            f"drained: {report['drained']} {report['in_flight_after']}",
        ]
    )


def soak_ok(report: dict[str, Any]) -> bool:
    return (
        report["server_errors"] == 0
        and report["decode_failures"] == 0
        and not report["transport_errors"]
        and report["drained"]
    )

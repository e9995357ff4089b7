"""The Ray Serve application end to end: a local Ray instance, two replicas of the tiny model behind
Serve's HTTP proxy, concurrent wav and streamed PCM requests, a saved voice shared by both
replicas, metrics in Ray's exporter, and a replica killed mid-traffic.

Small on purpose (2 logical CPUs, an 80 MB object store, no dashboard); everything Ray starts is
stopped, and checked to be gone, when the module ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import audio_duration, wav_bytes

ray = pytest.importorskip("ray", reason="the ray extra is not installed")
serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

APP = "cosyserve"
TEXT = "Hello there, how are you today?"
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. A second sentence follows the first one. "
    "And here is a third sentence, so that the stream has several chunks to send."
)
SEEDS = (0, 1, 2, 3)
VOICE = "英文女"
INSTANCE = "x-cosyserve-instance"


@dataclass
class Cluster:
    url: str
    metrics_url: str
    temp_dir: str
    voices_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_under(marker: str) -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if marker in args and int(pid) != os.getpid():
            found.append((int(pid), args[:120]))
    return found


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from cosyserve.deploy import ray_serve

    # A short private session directory (Ray's socket paths must stay under ~100 characters).
    temp_dir = tempfile.mkdtemp(prefix="csray-", dir="/tmp")
    voices_dir = tmp_path_factory.mktemp("shared_voices")
    port, metrics_port = _free_port(), _free_port()
    saved_env = {k: os.environ.get(k) for k in ("RAY_USAGE_STATS_ENABLED",)}
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(
        num_cpus=2,
        object_store_memory=80 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=temp_dir,
        _metrics_export_port=metrics_port,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Exactly what `serve run cosyserve.deploy.ray_serve:app key=value ...` hands the builder.
        args = {
            "model_dir": str(tiny_model_dir),
            "voices_dir": str(voices_dir),
            "num_replicas": "2",
            "num_cpus": "1",
            "force_config": "eager",
            "max_active": "8",
            "api_key": "",
            "shutdown_timeout_s": "3",
            "health_check_period_s": "2",
            "metrics_interval_s": "1",
        }
        serve.run(ray_serve.app(args), name=APP, route_prefix="/")
        yield Cluster(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", temp_dir, voices_dir
        )
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            deadline = time.monotonic() + 30
            while _processes_under(temp_dir) and time.monotonic() < deadline:
                time.sleep(0.5)
            leaked = _processes_under(temp_dir)
            for pid, _ in leaked:  # ours (they name our session directory): do not leave them
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not leaked, f"Ray left processes behind: {leaked}"


# ----------------------------------------------------------------------------- requests


@dataclass
class Reply:
    kind: str
    seed: int
    status: int = 0
    instance: str | None = None
    duration_s: float | None = None
    header_duration_s: float | None = None
    chunked: bool = False
    error: str | None = None
    pieces: list[float] = field(default_factory=list)  # arrival times of body pieces
    started: float = 0.0
    ended: float = 0.0


def _request(
    client: httpx.Client,
    kind: str,
    seed: int,
    text: str = TEXT,
    voice: str = VOICE,
    audio_started: threading.Event | None = None,
    live: list[Reply] | None = None,
) -> Reply:
    """``wav``: one file from the OpenAI route; ``pcm``: raw PCM streamed from /inference_sft.
    ``audio_started`` is set when the first body piece arrives; ``live`` receives the reply as
    soon as it exists (its status and instance are filled in when the head arrives)."""
    reply = Reply(kind, seed, started=time.perf_counter())
    if live is not None:
        live.append(reply)
    if kind == "wav":
        method, path = "POST", "/v1/audio/speech"
        kwargs: dict[str, Any] = {
            "json": {
                "model": "tts-1",
                "input": text,
                "voice": voice,
                "response_format": "wav",
                "stream": False,
                "seed": seed,
            }
        }
    else:
        method, path = "POST", "/inference_sft"
        kwargs = {"data": {"tts_text": text, "spk_id": voice, "seed": str(seed)}}
    try:
        with client.stream(method, path, **kwargs) as response:
            reply.status = response.status_code
            reply.instance = response.headers.get(INSTANCE)
            reply.chunked = response.headers.get("transfer-encoding") == "chunked"
            body = bytearray()
            for piece in response.iter_bytes():
                reply.pieces.append(time.perf_counter())
                body += piece
                if audio_started is not None:
                    audio_started.set()
            if reply.status == 200:
                rate = int(response.headers["x-sample-rate"])
                reply.duration_s = audio_duration(bytes(body), kind, rate)
                if "x-audio-duration" in response.headers:
                    reply.header_duration_s = float(response.headers["x-audio-duration"])
            else:
                reply.error = bytes(body[:300]).decode(errors="replace")
    except httpx.HTTPError as exc:  # a dropped connection, a truncated stream, a timeout
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.ended = time.perf_counter()
    return reply


@pytest.fixture(scope="module")
def reference_durations(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], float]:
    """What one standalone server answers for each (kind, seed): the right durations."""
    from fastapi.testclient import TestClient

    from cosyserve.server.app import create_app
    from cosyserve.settings import Settings

    settings = Settings(
        model_dir=str(tiny_model_dir),
        force_config="eager",
        voices_dir=str(tmp_path_factory.mktemp("ref_voices")),
        api_key=None,
        cors_origins=[],
    )
    durations = {}
    with TestClient(create_app(settings)) as client:
        for kind in ("wav", "pcm"):
            for seed in SEEDS:
                reply = _request(client, kind, seed)  # TestClient is an httpx.Client
                assert reply.status == 200, reply.error
                durations[(kind, seed)] = reply.duration_s
    return durations


# ----------------------------------------------------------------------------- tests


def test_forty_concurrent_requests_spread_over_both_replicas(cluster: Cluster, reference_durations) -> None:
    jobs = [("wav" if i % 2 else "pcm", SEEDS[i % len(SEEDS)]) for i in range(40)]
    with httpx.Client(base_url=cluster.url, timeout=120) as client, ThreadPoolExecutor(40) as pool:
        replies = list(pool.map(lambda job: _request(client, *job), jobs))

    failures = [(r.kind, r.status, r.error) for r in replies if r.status != 200]
    assert not failures, failures
    for r in replies:
        assert r.duration_s == pytest.approx(reference_durations[(r.kind, r.seed)], abs=1e-3), (
            r.kind,
            r.seed,
        )
        if r.kind == "wav":
            assert r.header_duration_s == pytest.approx(r.duration_s, abs=1e-3)
        else:
            assert r.chunked, "a PCM stream came back as one buffered body"
    by_instance = Counter(r.instance for r in replies)
    assert len(by_instance) == 2 and None not in by_instance, by_instance
    assert all(re.fullmatch(r"\w+@[\w.\-]+", i) for i in by_instance), by_instance
    # Each instance is a different replica, as /performance_info says.
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        seen: dict[str, dict[str, Any]] = {}
        for _ in range(40):
            response = client.get("/performance_info")
            info = response.json()
            assert info["instance"] == response.headers[INSTANCE]
            seen[info["instance"]] = info["launch"]["ray"]
            if len(seen) == 2:
                break
    assert set(seen) == set(by_instance)
    assert len({ray_info["replica"] for ray_info in seen.values()}) == 2


def test_streams_pass_through_the_proxy_as_they_are_made(cluster: Cluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        reply = _request(client, "pcm", 7, text=LONG_TEXT)
    assert reply.status == 200 and reply.chunked, reply.error
    assert len(reply.pieces) >= 3
    # The first audio arrived well before the last: the proxy did not buffer the response.
    total = reply.ended - reply.started
    assert reply.pieces[0] - reply.started < 0.7 * total, (reply.pieces[0] - reply.started, total)


def _until_both_answer(cluster: Cluster, request, want_status: int, rounds: int = 10) -> dict[str, int]:
    """Send batches of concurrent requests until both instances answered ``want_status``."""
    answered: dict[str, int] = {}
    with httpx.Client(base_url=cluster.url, timeout=120) as client, ThreadPoolExecutor(6) as pool:
        for _ in range(rounds):
            for response in pool.map(lambda _: request(client), range(6)):
                assert response.status_code == want_status, response.text[:300]
                instance = response.headers[INSTANCE]
                answered[instance] = answered.get(instance, 0) + 1
            if len(answered) == 2:
                break
    return answered


def test_a_voice_saved_through_the_proxy_is_used_on_both_replicas(
    cluster: Cluster, reference_durations
) -> None:
    recording = wav_bytes(2.0)
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        added = client.post(
            "/v1/voices",
            data={"name": "shared-voice", "transcript": "This is me."},
            files={"audio": ("me.wav", recording, "audio/wav")},
        )
    assert added.status_code == 201, added.text

    def synthesize(client: httpx.Client) -> httpx.Response:
        return client.post(
            "/inference_sft", data={"tts_text": TEXT, "spk_id": "shared-voice", "format": "wav", "seed": "0"}
        )

    used = _until_both_answer(cluster, synthesize, 200)
    assert len(used) == 2, f"only {used} answered with the saved voice"

    def listing(client: httpx.Client) -> httpx.Response:
        response = client.get("/v1/voices")
        assert "shared-voice" in response.json()["voices"]
        return response

    assert len(_until_both_answer(cluster, listing, 200)) == 2

    # Two saves of one name at the same moment, wherever they land: one voice, one winner.
    with httpx.Client(base_url=cluster.url, timeout=120) as client, ThreadPoolExecutor(4) as pool:
        statuses = sorted(
            pool.map(
                lambda i: (
                    client.post(
                        "/v1/voices",
                        data={"name": "raced", "transcript": f"take {i}"},
                        files={"audio": ("r.wav", recording, "audio/wav")},
                    ).status_code
                ),
                range(4),
            )
        )
    assert statuses == [201, 409, 409, 409], statuses

    # A deletion through one replica is seen by both.
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        assert client.delete("/v1/voices/shared-voice").status_code == 200
    gone = _until_both_answer(cluster, synthesize, 404)
    assert len(gone) == 2


def test_replica_metrics_reach_rays_exporter_per_instance(cluster: Cluster) -> None:
    """Each replica's series appear in Ray's exporter labelled by instance: every series the
    Grafana dashboard queries, for both replicas, and the Ray Serve series it shows."""
    from cosyserve.deploy.grafana import dashboard
    from tests.deploy.test_grafana import queried_cosyserve_series

    wanted = {f"ray_{name}" for name in queried_cosyserve_series(dashboard())}
    ray_serve = {
        "ray_serve_replica_processing_queries",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_deployment_replica_starts_total",
    }
    instance = re.compile(r'cosyserve_instance="([^"]+)"')
    missing: set[str] = set()
    instances: set[str] = set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = httpx.get(cluster.metrics_url, timeout=10).text
        samples = [line for line in text.splitlines() if line and not line.startswith("#")]
        names = {line.split("{")[0].split(" ")[0] for line in samples}
        instances = {
            m.group(1)
            for line in samples
            if line.startswith("ray_cosyserve_http_requests_total")
            for m in [instance.search(line)]
            if m
        }
        missing = (wanted | ray_serve) - names
        if not missing and len(instances) >= 2:
            break
        time.sleep(2)
    assert not missing, f"not in Ray's exporter: {sorted(missing)}"
    assert len(instances) >= 2, f"instances in Ray's exporter: {instances}"


def test_killing_a_replica_mid_traffic(cluster: Cluster, reference_durations, record_property) -> None:
    """In-flight requests on the killed replica end (complete or cleanly failed) within a bound,
    new requests keep succeeding on the other replica, and Serve starts a replacement."""
    bound_s = 60.0
    client = httpx.Client(base_url=cluster.url, timeout=bound_s)
    try:
        instances = _live_instances(client)
        assert len(instances) == 2, instances
        # Long streams; once every one has sent audio, kill the replica serving the most of them.
        with ThreadPoolExecutor(8) as pool:
            started = [threading.Event() for _ in range(8)]
            live: list[Reply] = []
            in_flight = [
                pool.submit(_request, client, "pcm", i % 4, LONG_TEXT, VOICE, started[i], live)
                for i in range(8)
            ]
            for event in started:
                assert event.wait(60), "a stream sent no audio within 60 s"
            streams = Counter(r.instance for r in live)
            victim = max(instances, key=lambda i: streams.get(i, 0))
            (survivor,) = instances - {victim}
            assert streams[victim] >= 1
            handle = ray.get_actor(
                f"SERVE_REPLICA::{APP}#CosyServe#{victim.split('@')[0]}", namespace="serve"
            )
            killed_at = time.perf_counter()
            ray.kill(handle, no_restart=True)

            # New requests, one after another, while the kill is being noticed.
            after: list[Reply] = []
            while time.perf_counter() - killed_at < 20:
                after.append(_request(client, "wav", 0))
            finished = [f.result(timeout=bound_s + 5) for f in in_flight]
        ended_s = max(r.ended for r in finished) - killed_at

        # 1. Nothing hung: every in-flight request ended within the bound, complete or failed.
        assert ended_s < bound_s
        for r in finished:
            assert (r.status == 200 and r.error is None) or r.error, r
        completed = [r for r in finished if r.status == 200 and r.error is None]
        assert all(r.duration_s and r.duration_s > 0 for r in completed)
        # The survivor's own in-flight streams are untouched by the other's death.
        on_survivor = [r for r in finished if r.instance == survivor]
        assert all(r in completed for r in on_survivor), [(r.status, r.error) for r in on_survivor]

        # 2. New requests succeed on the survivor: after the first success, all of them do.
        first_ok = next((i for i, r in enumerate(after) if r.status == 200), None)
        assert first_ok is not None, [r.error for r in after]
        recovered_s = after[first_ok].ended - killed_at
        tail = after[first_ok:]
        assert all(r.status == 200 for r in tail), [(r.status, r.error) for r in tail]
        assert len(tail) >= 3
        assert all(r.instance != victim for r in tail)
        assert all(r.duration_s == pytest.approx(reference_durations[("wav", 0)], abs=1e-3) for r in tail)

        # 3. Serve brings a replacement up: a third instance answers.
        deadline = time.monotonic() + 180
        replacement = None
        while time.monotonic() < deadline and replacement is None:
            fresh = _live_instances(client) - {victim, survivor}
            replacement = next(iter(fresh), None)
            if replacement is None:
                time.sleep(1)
        replaced_s = time.perf_counter() - killed_at
        assert replacement is not None, "no replacement replica answered within 180 s"
    finally:
        client.close()
    timings = {
        "in_flight_per_instance": {"killed": streams[victim], "survivor": streams[survivor]},
        "in_flight_ended_s": round(ended_s, 2),
        "in_flight_completed": len(completed),
        "in_flight_failed": len(finished) - len(completed),
        "in_flight_errors": sorted({(r.error or "")[:60] for r in finished if r not in completed}),
        "failed_after_kill": first_ok,
        "first_success_after_kill_s": round(recovered_s, 2),
        "replacement_serving_s": round(replaced_s, 2),
    }
    for key, value in timings.items():
        record_property(key, value)
    print(f"fault timings: {timings}")


def _live_instances(client: httpx.Client, probes: int = 12) -> set[str]:
    """Instances answering right now (concurrent probes reach every replica)."""
    with ThreadPoolExecutor(probes) as pool:
        responses = list(pool.map(lambda _: _safe_get(client, "/performance_info"), range(probes)))
    return {r.headers[INSTANCE] for r in responses if r is not None and r.status_code == 200}


def _safe_get(client: httpx.Client, path: str) -> httpx.Response | None:
    try:
        return client.get(path)
    except httpx.HTTPError:
        return None


def test_the_engine_thread_dying_fails_the_health_check() -> None:
    """Serve replaces a replica whose check_health raises; it raises once the engine is gone."""
    from types import SimpleNamespace

    from cosyserve.deploy.ray_serve import CosyServeReplica

    replica = CosyServeReplica()
    engine = SimpleNamespace(running=True)
    replica.app = SimpleNamespace(state=SimpleNamespace(cosyserve=SimpleNamespace(engine=engine)))
    replica.check_health()
    engine.running = False
    with pytest.raises(RuntimeError, match="engine"):
        replica.check_health()

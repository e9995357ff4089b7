"""Streaming against a real uvicorn: concurrency fairness, disconnects, mid-stream failures,
graceful shutdown."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.server.conftest import audio_duration
from tests.server.fakes import FakeBackend

LONG = " ".join(f"Sentence {i}." for i in range(12))


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_eight_concurrent_streams_are_complete_and_interleaved(app_factory, live_server) -> None:
    # Each job takes 3 segments x (1 + 4) = 15 engine steps.
    backend = FakeBackend(chunks_per_segment=4, step_sleep_s=0.004)
    server = live_server(app_factory(backend, max_active=8))
    text = "One. Two. Three."
    formats = ["pcm", "mp3", "wav", "opus", "flac", "aac", "pcm", "wav"]

    async def one(client: httpx.AsyncClient, index: int) -> tuple[float, float, bytes, str]:
        fmt = formats[index]
        # stream: wav and flac come whole unless asked to stream
        body = {"model": "tts-1", "input": text, "voice": "alice", "response_format": fmt, "stream": True}
        pieces: list[bytes] = []
        first = last = 0.0
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200
            async for piece in response.aiter_bytes():
                now = time.perf_counter()
                first = first or now
                last = now
                pieces.append(piece)
        return first, last, b"".join(pieces), fmt

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(main())
    expected = backend.expected_seconds(text)
    for i, (first, _, data, fmt) in enumerate(results):
        tolerance = {"aac": 0.15, "mp3": 0.12}.get(fmt, 0.01)
        assert audio_duration(data, fmt) == pytest.approx(expected, abs=tolerance), fmt
        others_last = min(r[1] for j, r in enumerate(results) if j != i)
        assert first < others_last, f"stream {i} got its first audio only after another stream had finished"
    assert len(backend.completed) == 8


def test_disconnect_mid_stream_cancels_and_frees_the_slot(app_factory, live_server) -> None:
    backend = FakeBackend(step_sleep_s=0.01)
    server = live_server(app_factory(backend, max_active=1))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        with client.stream("POST", "/inference_sft", data={"tts_text": LONG, "spk_id": "alice"}) as response:
            assert response.status_code == 200
            next(response.iter_bytes())  # some audio arrived; now walk away
        assert _wait_for(lambda: LONG in backend.cancelled), "the abandoned job was not cancelled"
        assert LONG not in backend.completed
        # The only slot is free again: the next request runs to the end.
        after = client.post("/inference_sft", data={"tts_text": "Next.", "spk_id": "alice", "format": "wav"})
        assert after.status_code == 200
        assert audio_duration(after.content, "wav") == pytest.approx(
            backend.expected_seconds("Next."), abs=1e-3
        )
    engine = server.config.app.state.cosyserve.engine
    assert engine.counters.cancelled == 1 and engine.active_count == 0


def test_disconnect_before_first_chunk_cancels(app_factory, live_server) -> None:
    backend = FakeBackend()
    server = live_server(app_factory(backend, max_active=1))
    with httpx.Client(base_url=server.url) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/inference_sft", data={"tts_text": "[hang]", "spk_id": "alice"}, timeout=0.3)
        assert _wait_for(lambda: "[hang]" in backend.cancelled)
        # Non-streamed requests are cancelled the same way.
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                "/v1/audio/speech",
                json={"model": "tts-1", "input": "[hang] 2", "voice": "bob", "stream": False},
                timeout=0.3,
            )
        assert _wait_for(lambda: "[hang] 2" in backend.cancelled)
        assert client.post("/inference_sft", data={"tts_text": "Ok.", "spk_id": "alice"}).status_code == 200


def test_mid_stream_failure_drops_the_connection(app_factory, live_server) -> None:
    backend = FakeBackend()
    server = live_server(app_factory(backend))
    with httpx.Client(base_url=server.url, timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):  # never a body that looks complete
            client.post("/inference_sft", data={"tts_text": "[failmid] a. b.", "spk_id": "alice"})
        assert client.get("/health").status_code == 200


def test_graceful_shutdown_finishes_in_flight_streams(app_factory, live_server) -> None:
    backend = FakeBackend(step_sleep_s=0.01)
    app = app_factory(backend, shutdown_timeout_s=10)
    server = live_server(app, timeout_graceful_shutdown=10)
    text = "One. Two. Three. Four."
    data = {"tts_text": text, "spk_id": "alice"}
    with (
        httpx.Client(base_url=server.url, timeout=10) as client,
        client.stream("POST", "/inference_sft", data=data) as response,
    ):
        stream = response.iter_bytes()
        pieces = [next(stream)]
        server.server.should_exit = True  # what SIGTERM does
        pieces.extend(stream)
    assert audio_duration(b"".join(pieces), "pcm") == pytest.approx(backend.expected_seconds(text))
    server.thread.join(10)
    assert not server.thread.is_alive()
    engine = app.state.cosyserve.engine
    assert not engine.running and not engine.accepting
    assert text in backend.completed

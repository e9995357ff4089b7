"""The server in front of the real CosyVoice backend (tiny random-weight model): the HTTP layer
and the engine loop with real jobs, every mode, saved voices and concurrent streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import audio_duration, make_settings, wav_bytes


@pytest.fixture(scope="module")
def cosyvoice_client(tiny_backend) -> Iterator[TestClient]:
    from cosyserve.server.app import create_app

    app = create_app(make_settings(max_text_chars=200), backend=tiny_backend, launch_report={"plan": "test"})
    with TestClient(app) as client:
        yield client


def test_sft_stream_and_openai_file(cosyvoice_client) -> None:
    client = cosyvoice_client
    rate = int(client.get("/performance_info").json()["backend"]["sample_rate"])
    streamed = client.post("/inference_sft", data={"tts_text": "Hello there.", "spk_id": "英文女"})
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["x-sample-rate"] == str(rate)
    assert audio_duration(streamed.content, "pcm", rate) > 0

    response = client.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": "Hi.", "voice": "nova", "response_format": "wav", "stream": False},
    )
    assert response.status_code == 200, response.text
    assert float(response.headers["x-audio-duration"]) == pytest.approx(
        audio_duration(response.content, "wav"), abs=1e-3
    )
    # The batching policy serves CosyVoice and reports its step figures.
    batching = client.get("/performance_info").json()["engine"]["batching"]
    assert batching["max_batch"] >= 1 and batching["steps"] > 0


def test_zero_shot_and_saved_voice(cosyvoice_client) -> None:
    client = cosyvoice_client
    prompt = {"prompt_wav": ("p.wav", wav_bytes(2.0), "audio/wav")}
    response = client.post(
        "/inference_zero_shot",
        data={"tts_text": "Hi there.", "prompt_text": "This is me.", "format": "wav"},
        files=prompt,
    )
    assert response.status_code == 200, response.text

    added = client.post(
        "/v1/voices", data={"name": "me", "transcript": "This is me."}, files={"audio": prompt["prompt_wav"]}
    )
    assert added.status_code == 201, added.text
    used = client.post("/inference_sft", data={"tts_text": "Hello.", "spk_id": "me", "format": "wav"})
    assert used.status_code == 200, used.text
    assert client.delete("/v1/voices/me").status_code == 200


def test_health_and_validation(cosyvoice_client) -> None:
    client = cosyvoice_client
    assert client.get("/health").status_code == 200
    assert client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "nobody"}).status_code == 404
    assert client.post("/inference_instruct", data={"tts_text": "Hi.", "spk_id": "英文女"}).status_code == 400


def test_eight_concurrent_streams_on_the_tiny_model(tiny_model_dir, tmp_path, live_server) -> None:
    """8 streaming clients at once: every body is complete and decodes, and every stream gets
    its first audio before any other stream has finished (no one waits for a whole synthesis)."""
    import httpx

    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend
    from cosyserve.families.cosyvoice1.token2wav import stream_num_frames
    from cosyserve.server.app import create_app

    options = FamilyOptions(device="cpu", voices_dir=tmp_path, stream_first_hop=25)
    backend = CosyVoiceBackend.from_dir(tiny_model_dir, options)
    server = live_server(create_app(make_settings(max_active=8), backend=backend))
    text = "The quick brown fox jumps over the lazy dog."  # 10 text tokens -> 200 speech tokens
    n_tokens = 20 * len(backend.text.tokenize(text))
    expected_s = 256 * stream_num_frames(n_tokens, first_hop=25) / backend.sample_rate
    formats = ["pcm", "wav", "mp3", "opus", "flac", "pcm", "wav", "pcm"]

    async def one(client: httpx.AsyncClient, i: int) -> tuple[float, float, bytes]:
        body = {
            "model": "tts-1",
            "input": text,
            "voice": "英文女",
            "response_format": formats[i],
            "seed": i,
            "stream": True,  # wav and flac come whole unless asked to stream
        }
        first = last = 0.0
        pieces: list[bytes] = []
        async with client.stream("POST", "/v1/audio/speech", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for piece in response.aiter_bytes():
                last = time.perf_counter()
                first = first or last
                pieces.append(piece)
        return first, last, b"".join(pieces)

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = asyncio.run(main())
    for i, (first, _, data) in enumerate(results):
        tolerance = {"mp3": 0.12, "opus": 0.03}.get(formats[i], 1e-3)
        assert audio_duration(data, formats[i], backend.sample_rate) == pytest.approx(
            expected_s, abs=tolerance
        )
        others_last = min(r[1] for j, r in enumerate(results) if j != i)
        assert first < others_last, f"stream {i} got its first audio only after another stream finished"

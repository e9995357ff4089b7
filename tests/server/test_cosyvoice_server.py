"""The server in front of the real CosyVoice backend (tiny random-weight model): the HTTP layer
and the engine loop with real jobs, every mode and saved voices. Skipped where the CosyVoice
backend cannot be built."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import audio_duration, make_settings, wav_bytes

# Checked without importing (torch is slow to import), so a skip costs nothing.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("cosyserve.engine.token2wav") is None,
    reason="the CosyVoice backend is not complete in this build",
)


@pytest.fixture(scope="module")
def cosyvoice_client(tiny_model_dir, tmp_path_factory) -> Iterator[TestClient]:
    from cosyserve.engine.cosyvoice import CosyVoiceBackend, CosyVoiceOptions
    from cosyserve.server.app import create_app

    options = CosyVoiceOptions(device="cpu", voices_dir=tmp_path_factory.mktemp("voices"))
    backend = CosyVoiceBackend.from_dir(tiny_model_dir, options)
    app = create_app(make_settings(max_text_chars=200), backend=backend, launch_report={"plan": "test"})
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


def test_zero_shot_and_saved_voice(cosyvoice_client) -> None:
    client = cosyvoice_client
    prompt = {"prompt_wav": ("p.wav", wav_bytes(2.0), "audio/wav")}
    response = client.post(
        "/inference_zero_shot",
        data={"tts_text": "Hi there.", "prompt_text": "This is me.", "format": "wav"},
        files=prompt,
    )
    if response.status_code == 400 and "campplus" in response.text:
        pytest.skip("the tiny model has no prompt models")
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

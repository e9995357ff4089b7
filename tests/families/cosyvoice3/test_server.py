"""The server in front of the CosyVoice3 backend (tiny v3 directory): the seed API's zero-shot and
cross-lingual routes, a saved voice by name on the seed and OpenAI routes, /health and the
model's description, with no built-in speaker anywhere."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import audio_duration, make_settings, wav_bytes

pytestmark = pytest.mark.timeout(300)

TEXT = "收到好友从远方寄来的生日礼物，让我很开心。"


@pytest.fixture(scope="module")
def client(tiny_v3_backend) -> Iterator[TestClient]:
    from cosyserve.server.app import create_app

    app = create_app(
        make_settings(max_text_chars=200), backend=tiny_v3_backend, launch_report={"plan": "test"}
    )
    with TestClient(app) as test_client:
        yield test_client


def _prompt() -> dict:
    return {"prompt_wav": ("p.wav", wav_bytes(2.0), "audio/wav")}


def test_zero_shot_and_cross_lingual_routes(client: TestClient) -> None:
    info = client.get("/performance_info").json()["backend"]
    assert info["family"] == "cosyvoice3" and info["sample_rate"] == 24000
    zero_shot = client.post(
        "/inference_zero_shot",
        data={
            "tts_text": TEXT,
            "prompt_text": "希望你以后能够做的比我还好呦。",
            "format": "wav",
            "seed": "1",
        },
        files=_prompt(),
    )
    assert zero_shot.status_code == 200, zero_shot.text
    assert audio_duration(zero_shot.content, "wav") > 0.1
    streamed = client.post(
        "/inference_cross_lingual", data={"tts_text": "Hello there, my friend.", "seed": "2"}, files=_prompt()
    )
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["x-sample-rate"] == "24000"
    assert audio_duration(streamed.content, "pcm", 24000) > 0.05


def test_saved_voice_on_the_seed_and_openai_routes(client: TestClient) -> None:
    added = client.post(
        "/v1/voices", data={"name": "host", "transcript": "你好。"}, files={"audio": _prompt()["prompt_wav"]}
    )
    assert added.status_code == 201, added.text
    try:
        voices = client.get("/v1/audio/voices").json()
        assert "host" in str(voices)
        speech = client.post(
            "/v1/audio/speech",
            json={
                "model": "tts-1",
                "input": TEXT,
                "voice": "host",
                "response_format": "wav",
                "seed": 3,
                "stream": False,
            },
        )
        assert speech.status_code == 200, speech.text
        assert float(speech.headers["x-audio-duration"]) == pytest.approx(
            audio_duration(speech.content, "wav", 24000), abs=1e-3
        )
        by_name = client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": "host", "format": "wav"})
        assert by_name.status_code == 200, by_name.text
    finally:
        assert client.delete("/v1/voices/host").status_code == 200


def test_no_built_in_speaker_is_a_clear_4xx(client: TestClient) -> None:
    response = client.post("/inference_sft", data={"tts_text": TEXT, "spk_id": "中文女"})
    assert response.status_code in (400, 404) and "saved voice" in response.text
    response = client.post(
        "/v1/audio/speech", json={"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav"}
    )
    assert 400 <= response.status_code < 500 and "voice" in response.text
    response = client.post(
        "/inference_instruct", data={"tts_text": TEXT, "spk_id": "x", "instruct_text": "Hi."}
    )
    assert response.status_code == 400 and "instruct2" in response.text
    assert client.get("/health").status_code == 200

"""The server in front of the CosyVoice3 backend (tiny v3 directory): the seed API's zero-shot,
cross-lingual and instruct2 routes, a saved voice by name on the seed and OpenAI routes (with
``instructions``), text streamed in over the WebSocket, /health and the model's description, with
no built-in speaker anywhere."""

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


def test_instruct2_with_a_recording_or_a_saved_voice(client: TestClient) -> None:
    recorded = client.post(
        "/inference_instruct2",
        data={"tts_text": TEXT, "instruct_text": "请用广东话表达。", "format": "wav", "seed": "4"},
        files=_prompt(),
    )
    assert recorded.status_code == 200, recorded.text
    assert audio_duration(recorded.content, "wav") > 0.1
    added = client.post("/v1/voices", data={"name": "guide"}, files={"audio": _prompt()["prompt_wav"]})
    assert added.status_code == 201, added.text
    try:
        saved = client.post(
            "/inference_instruct2",
            data={"tts_text": TEXT, "instruct_text": "Speak slowly.", "spk_id": "guide", "format": "wav"},
        )
        assert saved.status_code == 200, saved.text
        speech = client.post(
            "/v1/audio/speech",
            json={
                "model": "tts-1",
                "input": "Hello there.",
                "voice": "guide",
                "instructions": "Speak like a pirate.",
                "response_format": "wav",
                "stream": False,
            },
        )
        assert speech.status_code == 200, speech.text
        listing = client.get("/list_voices").json()
        assert listing["family"] == "cosyvoice3" and listing["saved"] == ["guide"]
        assert listing["modes"] == ["cross_lingual", "instruct2", "zero_shot"]
    finally:
        assert client.delete("/v1/voices/guide").status_code == 200


def test_text_streamed_in_over_the_websocket(tiny_v3_backend) -> None:
    """One utterance fed as its text arrives, in a saved voice: audio before the text ends."""
    import asyncio

    from cosyserve.server.app import create_app
    from cosyserve.voices.prompt import warmup_prompt
    from tests.helpers.live_server import LiveServer
    from tests.helpers.realtime import Received, connect, receive_all, receive_until, send, ws_url

    # A short prompt: its speech tokens are mixed 15:5 with the first text tokens, so its length
    # sets how much text the model needs before it speaks.
    tiny_v3_backend.add_voice("reader", warmup_prompt(seconds=1.2))

    async def run(url: str) -> tuple[Received, int]:
        async with connect(ws_url(url)) as ws:
            received = Received()
            await send(ws, type="config", voice="reader")
            started = await receive_until(ws, received, "session.started")
            assert started["text_streaming"] is True and started["sample_rate"] == 24000
            for piece in 2 * [
                "收到好友从远方",
                "寄来的生日礼物，",
                "让我很开心。",
                "Hello there, this ",
                "is more text ",
            ]:
                await send(ws, type="text", text=piece)
            while not received.audio.get("utt_1"):
                received.add(await asyncio.wait_for(ws.recv(), 120))
            before_end = len(received.audio["utt_1"])
            await send(ws, type="text", text="that ends here.")
            await send(ws, type="close")
            await receive_all(ws, received, timeout_s=300)
            return received, before_end

    try:
        with LiveServer(create_app(make_settings(), backend=tiny_v3_backend)) as live:
            received, before_end = asyncio.run(run(live.url))
    finally:
        tiny_v3_backend.delete_voice("reader")
    done = received.of_type("utterance.done")
    assert len(done) == 1 and done[0]["status"] == "done", received.events
    assert before_end > 0 and len(received.audio["utt_1"]) > before_end


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
    health = client.get("/health")
    assert health.status_code == 200 and "latency_s" in health.json()  # probed on a generated recording

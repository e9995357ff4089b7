"""The OpenAI-compatible API, with raw HTTP and with the official ``openai`` client."""

from __future__ import annotations

import base64
import json

import pytest

from tests.server.conftest import audio_duration
from tests.server.fakes import FakeBackend

TEXT = "The quick brown fox. It jumps."


def speech(client, **overrides):
    body = {"model": "tts-1", "input": TEXT, "voice": "alice", **overrides}
    return client.post("/v1/audio/speech", json=body)


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_formats_streamed(client, backend, fmt) -> None:
    response = speech(client, response_format=fmt)
    assert response.status_code == 200, response.text
    from cosyserve.audio.encode import MEDIA_TYPES

    assert response.headers["content-type"].startswith(MEDIA_TYPES[fmt])
    # Streamed MP3/AAC carry no gapless info: encoder delay and frame padding remain.
    tolerance = {"aac": 0.15, "mp3": 0.12}.get(fmt, 0.01)
    assert audio_duration(response.content, fmt) == pytest.approx(
        backend.expected_seconds(TEXT), abs=tolerance
    )


def test_speech_default_is_mp3_and_non_streamed_has_timing_headers(client, backend) -> None:
    response = speech(client, stream=False, speed=0.5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg"
    assert float(response.headers["x-audio-duration"]) == pytest.approx(
        backend.expected_seconds(TEXT, 0.5), abs=1e-3
    )
    assert "x-rtf" in response.headers and "x-processing-time" in response.headers


def test_speech_sse(client, backend) -> None:
    response = speech(client, stream_format="sse", response_format="pcm")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [
        json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")
    ]
    assert events[-1]["type"] == "speech.audio.done" and "usage" in events[-1]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert audio_duration(pcm, "pcm") == pytest.approx(backend.expected_seconds(TEXT))


def test_sse_mid_stream_failure_is_an_error_event(client) -> None:
    response = speech(client, input="[failmid] one.", stream_format="sse", response_format="pcm")
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error" and "exploded" in events[-1]["error"]["message"]


def test_openai_voice_names_and_voice_objects(client, backend) -> None:
    assert speech(client, voice="nova").status_code == 200
    assert backend.opened[-1].voice == "英文女"
    assert speech(client, voice="onyx").status_code == 200
    assert backend.opened[-1].voice == "英文男"
    assert speech(client, voice={"id": "bob"}).status_code == 200
    assert backend.opened[-1].voice == "bob"


def test_openai_voice_fallback_without_preferred_names(app_factory) -> None:
    from fastapi.testclient import TestClient

    backend = FakeBackend(builtin_voices=("only",))
    with TestClient(app_factory(backend)) as client:
        for name in ("alloy", "echo", "shimmer"):
            assert speech(client, voice=name).status_code == 200
            assert backend.opened[-1].voice == "only"


def test_instructions_use_instruct_mode(client, backend) -> None:
    assert speech(client, instructions="Whisper.").status_code == 200
    assert backend.opened[-1].mode == "instruct" and backend.opened[-1].instruct == "Whisper."


def _openai_error(response, status: int, param: str | None, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    assert error["param"] == param
    for word in words:
        assert word in error["message"]


def test_speech_errors_in_openai_shape(client, backend) -> None:
    _openai_error(speech(client, speed=4.0), 400, "speed", "0.5", "2.0")
    _openai_error(speech(client, speed=0.25), 400, "speed")
    _openai_error(speech(client, voice="nobody"), 404, "voice", "nobody")
    _openai_error(speech(client, model="whisper-1"), 404, "model", "tts-1")  # OpenAI: 404 too
    _openai_error(speech(client, response_format="ogg"), 400, "response_format")
    _openai_error(speech(client, input=""), 400, "input", "empty")
    _openai_error(speech(client, input="y" * 5001), 400, "input", "5000")
    _openai_error(
        client.post("/v1/audio/speech", json={"model": "tts-1", "voice": "alice"}), 400, "input", "required"
    )
    assert backend.opened == []
    for model in ("tts-1-hd", "gpt-4o-mini-tts", "cosyvoice", "CosyVoice-300M-SFT"):
        assert speech(client, model=model).status_code == 200


def test_models_and_audio_voices(client) -> None:
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert {"tts-1", "tts-1-hd", "cosyvoice"} <= set(ids)
    assert client.get("/v1/models/tts-1").json()["id"] == "tts-1"
    assert client.get("/v1/models/nope").status_code == 404
    voices = client.get("/v1/audio/voices").json()
    assert "alice" in voices["voices"]
    assert voices["openai_aliases"]["nova"] == "英文女"


# --- the official client against a real server --------------------------------------------


@pytest.fixture
def openai_client(app_factory, live_server):
    openai = pytest.importorskip("openai")
    server = live_server(app_factory(api_key="sekret"))
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0)


def test_openai_client_create(openai_client, backend) -> None:
    response = openai_client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="wav"
    )
    data = response.read()
    assert audio_duration(data, "wav") == pytest.approx(backend.expected_seconds(TEXT), abs=0.01)


def test_openai_client_streaming(openai_client, backend) -> None:
    pieces: list[bytes] = []
    with openai_client.audio.speech.with_streaming_response.create(
        model="tts-1-hd",
        voice="echo",
        input=TEXT,
        response_format="mp3",
        speed=1.5,
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        for piece in response.iter_bytes():
            pieces.append(piece)
    assert len(pieces) >= 1
    assert audio_duration(b"".join(pieces), "mp3") == pytest.approx(
        backend.expected_seconds(TEXT, 1.5), abs=0.12
    )


def test_openai_client_errors_and_models(openai_client, app_factory, live_server) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.audio.speech.create(model="tts-1", voice="alloy", input=TEXT, speed=3.0)
    assert "speed" in str(info.value)
    assert "tts-1" in [m.id for m in openai_client.models.list()]

    server = live_server(app_factory(api_key="sekret"))
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_openai_client_voices(openai_client, backend) -> None:
    from tests.server.conftest import wav_bytes

    voice = openai_client.audio.voices.create(
        name="mine",
        consent="cons_1",
        audio_sample=("mine.wav", wav_bytes(2.0), "audio/wav"),
    )
    assert voice.id == "mine" and voice.object == "audio.voice"
    assert "mine" in backend.saved
    deleted = openai_client.audio.voices.delete("mine")
    assert deleted.deleted and "mine" not in backend.saved

"""The CosyVoice-compatible API: all four modes, form/JSON/query inputs, formats, validation."""

from __future__ import annotations

import base64

import pytest

from tests.server.conftest import audio_duration, wav_bytes
from tests.server.fakes import FakeBackend

TEXT = "Hello there. How are you?"


def _expected(backend: FakeBackend, text: str = TEXT, speed: float = 1.0) -> float:
    return backend.expected_seconds(text, speed)


@pytest.mark.parametrize("encoding", ["form", "json", "urlencoded"])
def test_sft_stream_pcm(client, backend, encoding) -> None:
    fields = {"tts_text": TEXT, "spk_id": "alice"}
    if encoding == "json":
        response = client.post("/inference_sft", json=fields)
    elif encoding == "form":
        response = client.post("/inference_sft", files={k: (None, v) for k, v in fields.items()})
    else:
        response = client.post("/inference_sft", data=fields)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("audio/pcm")
    assert response.headers["x-sample-rate"] == str(backend.sample_rate)
    assert response.headers["x-request-id"]
    assert audio_duration(response.content, "pcm") == pytest.approx(_expected(backend))
    assert backend.opened[-1].stream is True  # format=stream streams at model level too


def test_sft_get_with_query(client, backend) -> None:
    response = client.get("/inference_sft", params={"tts_text": "Hi.", "spk_id": "bob"})
    assert response.status_code == 200
    assert audio_duration(response.content, "pcm") == pytest.approx(_expected(backend, "Hi."))


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "opus", "aac", "pcm"])
def test_sft_file_formats_with_timing_headers(client, backend, fmt) -> None:
    response = client.post(
        "/inference_sft", data={"tts_text": TEXT, "spk_id": "alice", "format": fmt, "speed": "1.25"}
    )
    assert response.status_code == 200, response.text
    expected = _expected(backend, speed=1.25)
    assert float(response.headers["x-audio-duration"]) == pytest.approx(expected, abs=1e-3)
    assert float(response.headers["x-processing-time"]) > 0
    assert float(response.headers["x-rtf"]) > 0
    # ADTS AAC carries no gapless info: 1024 priming samples plus padding to a frame.
    tolerance = 0.15 if fmt == "aac" else 0.08
    assert audio_duration(response.content, fmt) == pytest.approx(expected, abs=tolerance)
    request = backend.opened[-1]
    assert request.speed == 1.25 and request.stream is False


def test_optional_fields_reach_the_backend(client, backend) -> None:
    response = client.post(
        "/inference_sft",
        json={
            "tts_text": TEXT,
            "spk_id": "alice",
            "format": "wav",
            "seed": 7,
            "max_text_length": 40,
            "enable_smart_split": False,
            "stream": True,
        },
    )
    assert response.status_code == 200
    request = backend.opened[-1]
    assert (request.seed, request.max_text_length, request.enable_smart_split, request.stream) == (
        7,
        40,
        False,
        True,
    )


def test_zero_shot_form_upload(client, backend) -> None:
    response = client.post(
        "/inference_zero_shot",
        data={"tts_text": TEXT, "prompt_text": "This is my voice.", "format": "wav"},
        files={"prompt_wav": ("prompt.wav", wav_bytes(1.5), "audio/wav")},
    )
    assert response.status_code == 200, response.text
    request = backend.opened[-1]
    assert request.mode == "zero_shot"
    assert request.prompt is not None and request.prompt.text == "This is my voice."
    assert request.prompt.duration_s == pytest.approx(1.5, abs=0.01)
    assert audio_duration(response.content, "wav") == pytest.approx(_expected(backend), abs=1e-3)


def test_zero_shot_json_base64(client, backend) -> None:
    encoded = base64.b64encode(wav_bytes(1.0)).decode()
    response = client.post(
        "/inference_zero_shot",
        json={
            "tts_text": TEXT,
            "prompt_text": "Hi.",
            "prompt_wav": f"data:audio/wav;base64,{encoded}",
        },
    )
    assert response.status_code == 200, response.text
    assert backend.opened[-1].prompt.duration_s == pytest.approx(1.0, abs=0.01)


def test_cross_lingual_and_instruct(client, backend) -> None:
    response = client.post(
        "/inference_cross_lingual",
        data={"tts_text": TEXT},
        files={"prompt_wav": ("p.wav", wav_bytes(), "audio/wav")},
    )
    assert response.status_code == 200, response.text
    assert backend.opened[-1].mode == "cross_lingual" and backend.opened[-1].prompt.text is None

    response = client.post(
        "/inference_instruct", data={"tts_text": TEXT, "spk_id": "bob", "instruct_text": "Speak slowly."}
    )
    assert response.status_code == 200, response.text
    request = backend.opened[-1]
    assert request.mode == "instruct" and request.instruct == "Speak slowly." and request.voice == "bob"


def test_list_voices(client) -> None:
    body = client.get("/list_voices").json()
    assert "alice" in body["spk_ids"] and body["saved"] == []
    assert {"id", "kind"} <= set(body["voices"][0])


def _error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"code", "message"} <= set(error)
    for word in words:
        assert word in error["message"], error["message"]
    assert "Traceback" not in response.text
    return error


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"spk_id": "alice"}, 400, ["tts_text", "required"]),
        ({"tts_text": "  ", "spk_id": "alice"}, 400, ["empty"]),
        ({"tts_text": "Hi."}, 400, ["voice"]),
        ({"tts_text": "Hi.", "spk_id": "nobody"}, 404, ["nobody", "alice"]),
        ({"tts_text": "Hi.", "spk_id": "alice", "speed": "3"}, 400, ["speed", "0.5", "2.0"]),
        ({"tts_text": "Hi.", "spk_id": "alice", "speed": "fast"}, 400, ["speed"]),
        ({"tts_text": "Hi.", "spk_id": "alice", "format": "ogg"}, 400, ["format"]),
        ({"tts_text": "x" * 5001, "spk_id": "alice"}, 400, ["5001", "5000"]),
        ({"tts_text": "Hi.", "spk_id": "alice", "max_text_length": "3"}, 400, ["max_text_length"]),
    ],
)
def test_sft_bad_input(client, backend, fields, status, words) -> None:
    _error(client.post("/inference_sft", data=fields), status, *words)
    assert backend.opened == []  # rejected before queueing


def test_bad_uploads(client, backend) -> None:
    base = {"tts_text": "Hi.", "prompt_text": "Hello."}
    _error(client.post("/inference_zero_shot", data=base), 400, "prompt_wav")
    _error(
        client.post(
            "/inference_zero_shot",
            data=base,
            files={"prompt_wav": ("p.wav", b"definitely not audio", "audio/wav")},
        ),
        400,
        "audio",
    )
    _error(
        client.post(
            "/inference_zero_shot", data=base, files={"prompt_wav": ("p.txt", b"hello", "text/plain")}
        ),
        415,
        "audio file",
    )
    _error(
        client.post(
            "/inference_zero_shot",
            data={"tts_text": "Hi."},
            files={"prompt_wav": ("p.wav", wav_bytes(), "audio/wav")},
        ),
        400,
        "prompt_text",
    )
    _error(client.post("/inference_zero_shot", json={**base, "prompt_wav": "%%%not base64"}), 400, "base64")
    _error(
        client.post(
            "/inference_zero_shot", data=base, files={"prompt_wav": ("p.wav", wav_bytes(31.0), "audio/wav")}
        ),
        400,
        "30",
    )
    _error(client.post("/inference_sft", content=b"<x/>", headers={"content-type": "application/xml"}), 415)
    _error(
        client.post("/inference_sft", content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "JSON",
    )
    assert backend.opened == []


def test_upload_size_limit(app_factory) -> None:
    from fastapi.testclient import TestClient

    with TestClient(app_factory(max_upload_mb=0.05)) as client:  # ~52 KB
        big = wav_bytes(3.0)  # ~96 KB
        response = client.post(
            "/inference_cross_lingual",
            data={"tts_text": "Hi."},
            files={"prompt_wav": ("p.wav", big, "audio/wav")},
        )
        _error(response, 413, "MiB")
        ok = client.post(
            "/inference_cross_lingual",
            data={"tts_text": "Hi.", "format": "wav"},
            files={"prompt_wav": ("p.wav", wav_bytes(1.0), "audio/wav")},
        )
        assert ok.status_code == 200, ok.text


def test_unsupported_mode_is_400(app_factory) -> None:
    from fastapi.testclient import TestClient

    backend = FakeBackend()
    backend.modes = frozenset({"sft"})
    with TestClient(app_factory(backend)) as client:
        _error(
            client.post(
                "/inference_cross_lingual",
                data={"tts_text": "Hi."},
                files={"prompt_wav": ("p.wav", wav_bytes(), "audio/wav")},
            ),
            400,
            "cross_lingual",
        )


def test_backend_failure_is_clean_500(client) -> None:
    error = _error(
        client.post("/inference_sft", data={"tts_text": "[fail] x", "spk_id": "alice", "format": "wav"}),
        500,
        "exploded",
    )
    assert error["code"] == "synthesis_failed" and error["request_id"]
    # A failure before the first chunk of a stream is still a JSON error.
    _error(client.post("/inference_sft", data={"tts_text": "[fail] x", "spk_id": "alice"}), 500, "exploded")
    # ...and the server keeps serving.
    assert client.post("/inference_sft", data={"tts_text": "Fine.", "spk_id": "alice"}).status_code == 200


def test_unknown_route_and_method(client) -> None:
    _error(client.get("/nope"), 404, "/nope")
    _error(client.delete("/inference_sft"), 405, "DELETE")

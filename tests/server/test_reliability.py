"""Regression tests of issue 15: what a hostile or careless client sent that crashed the server,
answered 500, or was served when it should not have been (one section per defect)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.server.conftest import make_settings, wav_bytes
from tests.server.fakes import FakeBackend

REPO = Path(__file__).resolve().parents[2]


def wav(
    channels: int, sample_rate: int = 16000, seconds: float = 1.0, seed: int = 0
) -> tuple[bytes, np.ndarray]:
    """A 16-bit WAV of noise with ``channels`` channels, and its expected mono mixdown."""
    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal((int(seconds * sample_rate), channels)) * 3000).astype("<i2")
    raw = samples.tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(raw)) + b"WAVEfmt "
    header += struct.pack(
        "<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16
    )
    return header + b"data" + struct.pack("<I", len(raw)) + raw, samples.astype(np.float32).mean(
        axis=1
    ) / 32768


def planar(channels: int, sample_rate: int = 48000) -> bytes:
    """An AAC (ADTS) recording with ``channels`` channels (8 or 16): it decodes to planar float."""
    import av

    buf = io.BytesIO()
    layout = av.AudioLayout({8: "octagonal", 16: "hexadecagonal"}[channels])
    t = np.arange(sample_rate) / sample_rate
    tone = np.tile((0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), (channels, 1))
    with av.open(buf, mode="w", format="adts") as out:
        stream = out.add_stream("aac", rate=sample_rate, layout=layout)
        # Packed input: PyAV's planar from_ndarray has the same 8-channel limit as to_ndarray.
        frame = av.AudioFrame.from_ndarray(tone.T.copy().reshape(1, -1), format="flt", layout=layout)
        frame.sample_rate = sample_rate
        converter = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
        for part in converter.resample(frame):
            for packet in stream.encode(part):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# 1. Prompts with 8 or more channels crashed the process (SIGSEGV in PyAV's planar to_ndarray)
# --------------------------------------------------------------------------------------------

_DECODE_SCRIPT = """
import sys
from cosyserve.audio.io import decode_audio
audio, rate = decode_audio(open(sys.argv[1], "rb").read(), None, 30)
print(len(audio), rate)
"""


@pytest.mark.parametrize("channels", [8, 16, 32])
def test_many_channels_decode_without_crashing(tmp_path, channels) -> None:
    """In a child process, so that a crash shows as a failure instead of killing the run."""
    recordings = [("wav", wav(channels)[0])] + ([("aac", planar(channels))] if channels <= 16 else [])
    for kind, data in recordings:
        path = tmp_path / f"{channels}.{kind}"
        path.write_bytes(data)
        run = subprocess.run(
            [sys.executable, "-c", _DECODE_SCRIPT, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert run.returncode == 0, f"{kind}, {channels} channels: exit {run.returncode} {run.stderr[-500:]}"
        samples, rate = map(int, run.stdout.split())
        assert rate in (16000, 48000) and samples >= 0.9 * rate


def test_many_channels_are_mixed_down_exactly() -> None:
    from cosyserve.audio.io import decode_audio

    data, expected = wav(12)
    audio, rate = decode_audio(data)
    assert rate == 16000
    np.testing.assert_allclose(audio, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (wav(33)[0], ["33 channels", "at most 32"]),
        (wav(1, sample_rate=4000)[0], ["4000 Hz", "8000"]),
        (wav(1, sample_rate=400_000, seconds=0.1)[0], ["400000 Hz"]),
    ],
    ids=["33-channels", "4-kHz", "400-kHz"],
)
def test_absurd_formats_are_refused_before_decoding(data: bytes, words: list[str]) -> None:
    from cosyserve.audio.io import decode_audio
    from cosyserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as info:
        decode_audio(data, None, 30)
    for word in words:
        assert word in info.value.message


def test_uploads_with_eight_channels_are_served(client, backend) -> None:
    data, _ = wav(8, seconds=2.0)
    response = client.post(
        "/v1/voices", data={"name": "eight"}, files={"audio": ("8ch.wav", data, "audio/wav")}
    )
    assert response.status_code == 201, response.text
    response = client.post(
        "/inference_zero_shot",
        data={"tts_text": "Hi.", "prompt_text": "Hello.", "format": "wav"},
        files={"prompt_wav": ("8ch.wav", data, "audio/wav")},
    )
    assert response.status_code == 200, response.text
    assert backend.opened[-1].prompt is not None and backend.opened[-1].prompt.duration_s == pytest.approx(
        2.0
    )


def test_a_crashing_decoder_fails_only_its_request(app_factory) -> None:
    from cosyserve.audio.sandbox import DecodeSandbox

    app = app_factory()
    crashing = DecodeSandbox(workers=1, command=[sys.executable, "-c", "import ctypes; ctypes.string_at(0)"])
    app.state.cosyserve.decoder = crashing
    with TestClient(app) as client:
        files = {"audio": ("x.wav", wav_bytes(), "audio/wav")}
        response = client.post("/v1/voices", data={"name": "x"}, files=files)
        assert response.status_code == 400, response.text
        assert "crashed" in response.json()["error"]["message"]
        assert crashing.describe()["crashes"] == 1
        app.state.cosyserve.decoder = DecodeSandbox(workers=1)
        assert client.post("/v1/voices", data={"name": "x"}, files=files).status_code == 201
        app.state.cosyserve.decoder.close()


def test_a_backend_that_cannot_clone_refuses_before_decoding(app_factory) -> None:
    backend = FakeBackend()
    backend.modes = frozenset({"sft"})  # as the embedded voice
    app = app_factory(backend)
    with TestClient(app) as client:
        files = {"audio": ("8ch.wav", wav(8)[0], "audio/wav")}
        response = client.post("/v1/voices", data={"name": "x"}, files=files)
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_mode"
        assert app.state.cosyserve.decoder.describe()["workers_started"] == 0  # nothing decoded


# --------------------------------------------------------------------------------------------
# 3. 500s for input that deserves a 4xx
# --------------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400(client, backend) -> None:
    deep = b"[" * 50_000 + b"]" * 50_000  # within every route's size limit
    for path in ("/inference_sft", "/v1/audio/speech", "/v1/voices"):
        response = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert "nest" in response.json()["error"]["message"]
    assert backend.opened == []


@pytest.mark.parametrize("seed", [2**64, -1])
def test_seed_out_of_range_is_a_400_before_queueing(client, backend, seed) -> None:
    response = client.post("/inference_sft", json={"tts_text": "Hi.", "spk_id": "alice", "seed": seed})
    assert response.status_code == 400 and "seed" in response.json()["error"]["message"]
    response = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "alice", "seed": str(seed)})
    assert response.status_code == 400
    response = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alice", "seed": seed})
    assert response.status_code == 400 and response.json()["error"]["param"] == "seed"
    assert backend.opened == []
    assert (
        client.post(
            "/inference_sft", json={"tts_text": "Hi.", "spk_id": "alice", "seed": 2**64 - 1}
        ).status_code
        == 200
    )


def test_the_library_refuses_seeds_torch_cannot_take() -> None:
    from cosyserve.api import SynthesisRequest
    from cosyserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="seed"):
        SynthesisRequest(text="Hi.", voice="a", seed=2**64).validate()


@pytest.fixture(scope="module")
def embedded_client():
    pytest.importorskip("piper")
    from cosyserve.families.piper.backend import EmbeddedBackend
    from cosyserve.server.app import create_app

    with TestClient(create_app(make_settings(), backend=EmbeddedBackend())) as client:
        yield client


def test_embedded_voice_takes_nul_and_refuses_lone_surrogates(embedded_client) -> None:
    client = embedded_client
    for text in ("a\x00b", "\x00Hello there.", "Hello\x07 there."):
        response = client.post(
            "/inference_sft", json={"tts_text": text, "spk_id": "default", "format": "wav"}
        )
        assert response.status_code == 200, (text, response.text)
        assert float(response.headers["x-audio-duration"]) > 0
    raw = b'{"tts_text": "a\\ud800b", "spk_id": "default", "format": "wav"}'
    response = client.post("/inference_sft", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]
    raw = b'{"input": "a\\ud800b", "voice": "default"}'
    response = client.post("/v1/audio/speech", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "text", ["\u200b\u200b\u200b", "\u0301\u0302\u0303", "\u200d\ufeff \u2060", "😀😀", "!?"]
)
def test_nothing_to_speak_is_a_400_on_the_embedded_voice(embedded_client, text) -> None:
    response = embedded_client.post(
        "/inference_sft", json={"tts_text": text, "spk_id": "default", "format": "wav"}
    )
    assert response.status_code == 400, response.text
    assert "nothing to speak" in response.json()["error"]["message"]


@pytest.mark.parametrize("text", ["\u200b\u200b", "\u0301\u0302", "😀", "...", "a\u0301", "٣", "一"])
def test_the_frontend_speaks_only_letters_and_digits(text) -> None:
    from cosyserve.errors import InvalidRequestError
    from cosyserve.text.frontend import split_for_synthesis

    speakable = text in ("a\u0301", "٣", "一")
    if speakable:
        assert split_for_synthesis(text)
    else:
        with pytest.raises(InvalidRequestError, match="nothing to speak"):
            split_for_synthesis(text)


# --------------------------------------------------------------------------------------------
# 5. The OpenAI route's body handling
# --------------------------------------------------------------------------------------------


def test_openai_body_over_the_limit_is_a_413_as_it_arrives(app_factory) -> None:
    """A chunked body (no Content-Length) far over the route's limit: 413 after reading just
    past the limit, not a 400 after buffering all of it."""
    app = app_factory(max_text_chars=100)  # the speech route's limit: 12 x 100 + 64 KiB
    pulled = 0
    total = 2000  # 2000 x 64 KiB

    async def receive() -> dict:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": b"a" * 65536, "more_body": pulled < total}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/audio/speech",
        "raw_path": b"/v1/audio/speech",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 5000),
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["error"]["code"] == "payload_too_large"
    assert pulled <= 3, f"read {pulled} chunks of 64 KiB before refusing"


def test_openai_wrong_bodies_say_what_to_send(client) -> None:
    response = client.post(
        "/v1/audio/speech", content=b'{"input": "\xff"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "UTF-8" in response.json()["error"]["message"]
    response = client.post("/v1/audio/speech", content=b"Hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    message = response.json()["error"]["message"]
    assert "application/json" in message and '"input"' in message
    response = client.post(
        "/v1/audio/speech", content=b"[1, 2]", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "object" in response.json()["error"]["message"]
    response = client.post(
        "/v1/audio/speech", content=b"x" * 300_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


# --------------------------------------------------------------------------------------------
# 6. Origin and Host checks while no API key is set
# --------------------------------------------------------------------------------------------


def test_cross_origin_browser_requests_are_refused_without_a_key(app_factory, backend, live_server) -> None:
    server = live_server(app_factory())
    files = {"audio": ("me.wav", wav_bytes(2.0), "audio/wav")}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        evil = {"Origin": "https://attacker.example"}
        response = client.post("/v1/voices", data={"name": "pwned"}, files=files, headers=evil)
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden_origin"
        form = {"tts_text": "Hi.", "spk_id": "alice", "format": "wav"}
        assert client.post("/inference_sft", data=form, headers=evil).status_code == 403
        assert client.post("/inference_sft", data=form, headers={"Origin": "null"}).status_code == 403
        # A cross-site page's <audio src> or <img> GET carries no Origin, but the browser says where from.
        query = "/inference_sft?tts_text=Hi.&spk_id=alice&format=wav"
        assert client.get(query, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
        assert "pwned" not in backend.saved and backend.opened == []
        # The server's own pages, localhost pages, and clients that are not browsers are served.
        own = {"Origin": server.url}
        assert client.post("/inference_sft", data=form, headers=own).status_code == 200
        assert (
            client.post("/inference_sft", data=form, headers={"Origin": "http://localhost:3000"}).status_code
            == 200
        )
        assert client.post("/inference_sft", data=form).status_code == 200
        assert client.get(query, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
        assert client.get("/v1/voices", headers=evil).status_code == 200  # reading needs CORS anyway


def test_rebound_host_names_are_refused_on_loopback(app_factory, live_server) -> None:
    server = live_server(app_factory())
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.get("/v1/voices", headers={"Host": "attacker.example"})
        assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden_host"
        port = server.url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", f"app.localhost:{port}"):
            assert client.get("/v1/voices", headers={"Host": host}).status_code == 200, host
        assert client.get("/", headers={"Host": f"localhost:{port}"}).status_code == 200  # the playground


def test_allowed_hosts_and_origins_are_settings(app_factory, live_server) -> None:
    server = live_server(app_factory(allowed_hosts=["tts.lan"], cors_origins=["https://app.lan"]))
    form = {"tts_text": "Hi.", "spk_id": "alice", "format": "wav"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/v1/voices", headers={"Host": "tts.lan"}).status_code == 200
        assert client.get("/v1/voices", headers={"Host": "other.lan"}).status_code == 403
        assert (
            client.post("/inference_sft", data=form, headers={"Origin": "https://app.lan"}).status_code == 200
        )


def test_with_an_api_key_the_key_decides(app_factory, live_server) -> None:
    server = live_server(app_factory(api_key="sekret"))
    form = {"tts_text": "Hi.", "spk_id": "alice", "format": "wav"}
    headers = {"Origin": "https://attacker.example", "Authorization": "Bearer sekret"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/inference_sft", data=form, headers=headers).status_code == 200
        assert (
            client.post(
                "/inference_sft", data=form, headers={"Origin": "https://attacker.example"}
            ).status_code
            == 401
        )


def test_the_openai_client_works_without_a_key_on_loopback(app_factory, live_server) -> None:
    openai = pytest.importorskip("openai")
    server = live_server(app_factory())
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    audio = client.audio.speech.create(
        model="tts-1", voice="alice", input="Hello there.", response_format="wav"
    )
    assert audio.content[:4] == b"RIFF"


# --------------------------------------------------------------------------------------------
# 8. FLAC and WAV from /v1/audio/speech arrive whole unless streaming is asked for
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_default_flac_and_wav_read_with_soundfile(client, backend, fmt) -> None:
    soundfile = pytest.importorskip("soundfile")
    text = "The quick brown fox. It jumps."
    response = client.post("/v1/audio/speech", json={"input": text, "voice": "alice", "response_format": fmt})
    assert response.status_code == 200 and "x-audio-duration" in response.headers  # one complete body
    audio, rate = soundfile.read(io.BytesIO(response.content))
    assert rate == backend.sample_rate
    assert len(audio) / rate == pytest.approx(backend.expected_seconds(text), abs=1e-3)
    streamed = client.post(
        "/v1/audio/speech", json={"input": text, "voice": "alice", "response_format": fmt, "stream": True}
    )
    assert streamed.status_code == 200 and "x-audio-duration" not in streamed.headers


# --------------------------------------------------------------------------------------------
# 9. Voice names, and the OpenAPI schema against the server
# --------------------------------------------------------------------------------------------


def test_voice_names_follow_one_rule(client, backend) -> None:
    files = {"audio": ("me.wav", b"not even audio", "audio/wav")}
    response = client.post("/v1/voices", data={"name": "my voice"}, files=files)
    assert response.status_code == 400  # before the upload is even decoded
    message = response.json()["error"]["message"]
    assert "no spaces" in message and "or spaces" not in message
    assert client.post("/v1/voices", data={"name": "-x"}, files=files).json()["error"][
        "message"
    ] == message.replace("'my voice'", "'-x'")
    assert "my voice" not in backend.saved


def test_405_allows_every_method_of_the_path(client) -> None:
    response = client.put("/inference_sft")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}


def test_openapi_states_what_the_server_enforces(client) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    sft = paths["/inference_sft"]
    assert "get" in sft  # upstream's GET form is documented
    body = sft["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["tts_text"]["minLength"] == 1
    assert body["properties"]["tts_text"]["maxLength"] == 5000
    assert set(body["required"]) == {"tts_text", "spk_id"}
    speech = schema["components"]["schemas"]["SpeechRequest"]["properties"]
    assert speech["input"]["minLength"] == 1 and speech["seed"]["anyOf"][0]["maximum"] == 2**64 - 1
    assert {"404", "409", "503", "507"} <= set(paths["/v1/voices/{name}"]["delete"]["responses"])
    assert "404" in paths["/v1/models/{model_id}"]["get"]["responses"]
    for item in paths.values():
        for operation in item.values():
            assert "422" not in operation["responses"]  # the server answers 400, never 422

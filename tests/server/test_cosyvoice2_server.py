"""The server in front of a CosyVoice2 model (tiny, random weights): every endpoint, the OpenAI
client unchanged, instruct2 both ways, saved voices across families, text streamed in over the
WebSocket, health without a built-in speaker."""

from __future__ import annotations

import asyncio
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from cosyserve.server.app import create_app
from cosyserve.voices.prompt import PromptFeatures
from cosyserve.voices.store import VoiceStore
from tests.helpers.live_server import LiveServer
from tests.helpers.realtime import Received, connect, receive_all, receive_until, send, ws_url
from tests.server.conftest import audio_duration, make_settings, wav_bytes

pytestmark = pytest.mark.timeout(600)

RATE = 24000
PROMPT = {"prompt_wav": ("p.wav", wav_bytes(2.0), "audio/wav")}


@pytest.fixture(scope="module")
def server(tiny_v2_backend) -> Iterator[LiveServer]:
    torch.set_num_threads(1)
    app = create_app(
        make_settings(max_text_chars=200), backend=tiny_v2_backend, launch_report={"plan": "test"}
    )
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as client:
        yield client


def rate_of(data: bytes) -> int:
    import av

    with av.open(io.BytesIO(data)) as container:
        return container.streams.audio[0].sample_rate


def assert_audio(response: httpx.Response, fmt: str = "wav") -> float:
    assert response.status_code == 200, response.text
    if fmt == "wav":
        assert rate_of(response.content) == RATE
    seconds = audio_duration(response.content, fmt, RATE)
    assert seconds > 0.1
    return seconds


# ---------------------------------------------------------------------------------- seed API


def test_seed_api_every_mode(http: httpx.Client) -> None:
    streamed = http.post("/inference_sft", data={"tts_text": "Hello there.", "spk_id": "中文女"})
    assert streamed.headers["x-sample-rate"] == str(RATE)
    assert_audio(streamed, "pcm")
    assert_audio(
        http.post(
            "/inference_zero_shot",
            data={"tts_text": "你好。", "prompt_text": "This is me.", "format": "wav"},
            files=PROMPT,
        )
    )
    assert_audio(
        http.post("/inference_cross_lingual", data={"tts_text": "Hi there.", "format": "wav"}, files=PROMPT)
    )
    assert_audio(
        http.post(
            "/inference_instruct2",
            data={"tts_text": "Hi there.", "instruct_text": "Speak happily.", "format": "wav"},
            files=PROMPT,
        )
    )
    # v1's instruct mode does not exist here; instruct2 needs its instruction and a voice.
    refused = http.post(
        "/inference_instruct", data={"tts_text": "Hi.", "spk_id": "中文女", "instruct_text": "x"}
    )
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_mode"
    assert "instruct2" in refused.json()["error"]["message"]
    no_instruction = http.post("/inference_instruct2", data={"tts_text": "Hi.", "spk_id": "中文女"})
    assert no_instruction.status_code == 400 and "instruct" in no_instruction.json()["error"]["message"]
    no_voice = http.post("/inference_instruct2", data={"tts_text": "Hi.", "instruct_text": "Softly."})
    assert no_voice.status_code == 400 and "prompt_wav" in no_voice.json()["error"]["message"]


def test_saved_voice_save_use_delete(http: httpx.Client) -> None:
    added = http.post(
        "/v1/voices",
        data={"name": "server_v2", "transcript": "This is me."},
        files={"audio": PROMPT["prompt_wav"]},
    )
    assert added.status_code == 201, added.text
    assert "server_v2" in http.get("/list_voices").json()["saved"]
    assert_audio(
        http.post("/inference_sft", data={"tts_text": "Hello.", "spk_id": "server_v2", "format": "wav"})
    )
    # instruct2 with the saved voice by name (no recording), and through the OpenAI route.
    assert_audio(
        http.post(
            "/inference_instruct2",
            data={
                "tts_text": "Hello.",
                "spk_id": "server_v2",
                "instruct_text": "Speak slowly.",
                "format": "wav",
            },
        )
    )
    speech = http.post(
        "/v1/audio/speech",
        json={
            "model": "gpt-4o-mini-tts",
            "input": "Hello.",
            "voice": "server_v2",
            "instructions": "Speak slowly.",
            "response_format": "wav",
            "stream": False,
        },
    )
    assert_audio(speech)
    assert http.delete("/v1/voices/server_v2").status_code == 200
    gone = http.post("/inference_sft", data={"tts_text": "Hello.", "spk_id": "server_v2"})
    assert gone.status_code == 404


def test_a_voice_saved_by_another_family_is_refused(http: httpx.Client, tiny_v2_backend) -> None:
    v1_store = VoiceStore(tiny_v2_backend.voice_store.root)  # what a CosyVoice v1 server saves
    features = PromptFeatures(
        torch.zeros(1, 192), torch.zeros(1, 50, dtype=torch.long), torch.zeros(1, 86, 80)
    )
    v1_store.save("from_v1", features)
    try:
        assert "from_v1" not in http.get("/v1/audio/voices").json()["voices"]
        for response in (
            http.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "from_v1"}),
            http.post(
                "/inference_instruct2", data={"tts_text": "Hi.", "spk_id": "from_v1", "instruct_text": "x"}
            ),
            http.post("/v1/audio/speech", json={"input": "Hi.", "voice": "from_v1", "stream": False}),
        ):
            assert response.status_code == 409, response.text
            error = response.json()["error"]
            assert error["code"] == "incompatible_voice" and "cosyvoice1" in error["message"]
    finally:
        v1_store.delete("from_v1")


def test_listings_health_and_performance_info(http: httpx.Client) -> None:
    for path in ("/list_voices", "/v1/audio/voices"):
        listing = http.get(path).json()
        assert listing["family"] == "cosyvoice2" and listing["sample_rate"] == RATE
        assert listing["modes"] == ["cross_lingual", "instruct2", "sft", "zero_shot"]
    aliases = http.get("/v1/audio/voices").json()["openai_aliases"]
    assert aliases["nova"] == "英文女" and aliases["onyx"] == "英文男"
    info = http.get("/performance_info").json()["backend"]
    assert (info["family"], info["sample_rate"], info["text_stream"]) == ("cosyvoice2", RATE, True)
    assert "instruct2" in info["modes"]
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_openapi_says_what_each_mode_needs(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    instruct2 = paths["/inference_instruct2"]["post"]
    assert "instruct_text" in instruct2["description"] and "prompt_wav" in instruct2["description"]
    schema = instruct2["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert "prompt_wav" in schema["properties"] and "prompt_wav" not in schema.get("required", [])
    assert "CosyVoice2" in paths["/inference_instruct"]["post"]["description"]
    assert "prompt_text" in paths["/inference_zero_shot"]["post"]["description"]


def test_the_openai_client_works_unchanged(server: LiveServer) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    # Seeded: a random-weight LLM may draw a stop id (not masked by the reference) at any step.
    seeded = {"extra_body": {"seed": 3}}
    data = client.audio.speech.create(
        model="tts-1", voice="alloy", input="Hello there.", response_format="wav", **seeded
    ).read()
    assert rate_of(data) == RATE and audio_duration(data, "wav") > 0.1
    pieces: list[bytes] = []
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="echo",
        input="Hello there.",
        instructions="Speak like a pirate.",
        response_format="pcm",
        **seeded,
    ) as response:
        pieces += list(response.iter_bytes())
    assert audio_duration(b"".join(pieces), "pcm", RATE) > 0.1


def test_text_streamed_in_over_the_websocket(server: LiveServer) -> None:
    """One request per utterance, fed as the text arrives: audio before the text ends."""

    async def run() -> tuple[Received, int]:
        async with connect(ws_url(server.url)) as ws:
            received = Received()
            await send(ws, type="config", voice="中文女", seed=4)
            started = await receive_until(ws, received, "session.started")
            assert started["text_streaming"] is True and started["sample_rate"] == RATE
            for piece in [
                "Hello there, this ",
                "is text that ",
                "arrives in ",
                "pieces as an ",
                "LLM writes ",
            ]:
                await send(ws, type="text", text=piece)
            while not received.audio.get("utt_1"):
                received.add(await asyncio.wait_for(ws.recv(), 120))
            before_end = len(received.audio["utt_1"])
            await send(ws, type="text", text="it, and then it ends.")
            await send(ws, type="close")
            await receive_all(ws, received, timeout_s=300)
            return received, before_end

    received, before_end = asyncio.run(run())
    assert before_end > 0
    done = received.of_type("utterance.done")
    assert len(done) == 1 and done[0]["status"] == "done", received.of_type("error")
    assert not received.of_type("segment.started")  # the model got the text, not sentences
    assert len(received.audio["utt_1"]) > before_end and received.close_code == 1000


def test_health_without_a_built_in_speaker(tiny_v2_model_dir: Path, tmp_path: Path) -> None:
    """No spk2info.pt: /health runs its probe on a generated prompt recording (not skipped)."""
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice2.backend import CosyVoice2Backend

    model = tmp_path / "model"
    shutil.copytree(tiny_v2_model_dir, model, ignore=shutil.ignore_patterns("spk2info.pt", "voices"))
    backend = CosyVoice2Backend.from_dir(model, FamilyOptions(device="cpu", voices_dir=tmp_path / "voices"))
    app = create_app(make_settings(), backend=backend)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=300) as http:
        health = http.get("/health")
        voices = http.get("/v1/audio/voices").json()
        speech = http.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy"})
        # Once the model has a voice of its own family, the OpenAI names speak with it.
        http.post("/v1/voices", data={"name": "mine"}, files={"audio": PROMPT["prompt_wav"]})
        aliases = http.get("/v1/audio/voices").json()["openai_aliases"]
        body = {"input": "Hi.", "voice": "alloy", "response_format": "wav", "stream": False, "seed": 1}
        spoken = http.post("/v1/audio/speech", json=body)
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok" and "latency_s" in health.json()
    assert voices["voices"] == [] and voices["modes"] == ["cross_lingual", "instruct2", "sft", "zero_shot"]
    assert speech.status_code == 404 and "POST /v1/voices" in speech.json()["error"]["message"]
    assert set(aliases.values()) == {"mine"}
    assert_audio(spoken)


def test_serve_model_dir_builds_the_cosyvoice2_backend(tiny_v2_model_copy: Path, tmp_path: Path) -> None:
    """`cosyserve serve --model_dir DIR`: the launcher detects the family, applies the best CPU
    plan and warms the model up before the app answers."""
    from fastapi.testclient import TestClient

    app = create_app(make_settings(model_dir=str(tiny_v2_model_copy), voices_dir=str(tmp_path)))
    with TestClient(app) as client:
        info = client.get("/performance_info").json()
        assert info["backend"]["family"] == "cosyvoice2" and info["launch"]["plan"] == "cpu_fast"
        assert info["launch"]["warmup_s"] > 0 and info["launch"]["fallbacks"] == []
        speech = client.post("/inference_sft", data={"tts_text": "Hi.", "spk_id": "中文女", "format": "wav"})
        assert_audio(speech)

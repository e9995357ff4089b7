"""The request/response vocabulary shared by the library, the engine, the server and the CLI.

Plain data, no torch: what a client asks for (:class:`SynthesisRequest`, :class:`PromptAudio`),
what it gets back (:class:`AudioChunk`, :class:`SynthesisInfo`) and what a model offers
(:class:`VoiceInfo`, the modes).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from cosyserve.errors import InvalidRequestError

# sft: a built-in or saved voice; zero_shot: clone a recording (+ its transcript); cross_lingual: a
# recording's voice for text in another language; instruct: a built-in speaker + an instruction
# (CosyVoice v1); instruct2: any voice (a recording or a saved voice) + an instruction (CosyVoice2/3).
Mode = Literal["sft", "zero_shot", "cross_lingual", "instruct", "instruct2"]
MODES: tuple[str, ...] = ("sft", "zero_shot", "cross_lingual", "instruct", "instruct2")

MIN_SPEED, MAX_SPEED = 0.5, 2.0
MAX_TEXT_CHARS = 50_000
MAX_SEED = 2**64 - 1  # torch generators take seeds in [0, 2**64)


@dataclass(frozen=True)
class VoiceInfo:
    id: str
    kind: Literal["sft", "saved", "embedded"]
    language: str | None = None
    description: str = ""


@dataclass
class PromptAudio:
    """A prompt recording, already decoded to float32 mono."""

    audio: np.ndarray
    sample_rate: int
    text: str | None = None  # transcript (zero-shot); None for cross-lingual

    @property
    def duration_s(self) -> float:
        return len(self.audio) / float(self.sample_rate)


@dataclass
class SynthesisRequest:
    text: str
    voice: str | None = None
    mode: Mode = "sft"
    prompt: PromptAudio | None = None
    instruct: str | None = None
    stream: bool = False
    speed: float = 1.0
    seed: int | None = None
    max_text_length: int | None = None
    enable_smart_split: bool = True

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` with a message that says what to fix."""
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidRequestError("text is empty: give the text to synthesise")
        if len(self.text) > MAX_TEXT_CHARS:
            raise InvalidRequestError(f"text has {len(self.text)} characters; the limit is {MAX_TEXT_CHARS}")
        if self.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if (
            not isinstance(self.speed, (int, float))
            or not math.isfinite(self.speed)
            or not (MIN_SPEED <= self.speed <= MAX_SPEED)
        ):
            raise InvalidRequestError(
                f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {self.speed!r}"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise InvalidRequestError(f"seed must be an integer from 0 to {MAX_SEED}, got {self.seed!r}")
        if self.max_text_length is not None and not (10 <= self.max_text_length <= 1000):
            raise InvalidRequestError(
                f"max_text_length must be between 10 and 1000 characters, got {self.max_text_length}"
            )
        if self.mode in ("zero_shot", "cross_lingual") and self.prompt is None:
            raise InvalidRequestError(f"{self.mode} needs a prompt recording")
        if self.mode == "zero_shot" and (self.prompt is None or not (self.prompt.text or "").strip()):
            raise InvalidRequestError("zero_shot needs the transcript of the prompt recording (prompt_text)")
        if self.mode in ("instruct", "instruct2") and not (self.instruct or "").strip():
            raise InvalidRequestError(f"{self.mode} mode needs an instruction text (instruct_text)")
        if self.mode in ("sft", "instruct") and not self.voice:
            raise InvalidRequestError(f"{self.mode} needs a voice (spk_id)")
        if self.mode == "instruct2" and not self.voice and self.prompt is None:
            raise InvalidRequestError(
                "instruct2 needs a voice: a prompt recording (prompt_wav) or a saved voice"
            )


@dataclass
class AudioChunk:
    audio: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int
    segment: int = 0  # index of the text segment this audio belongs to
    final: bool = False  # last chunk of the whole request

    @property
    def duration_s(self) -> float:
        return len(self.audio) / float(self.sample_rate)


@dataclass
class SynthesisInfo:
    """What a finished (or running) synthesis reports: segments, per-stage times, RTF."""

    segments: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    audio_seconds: float = 0.0
    processing_seconds: float = 0.0
    first_chunk_seconds: float | None = None
    speech_tokens: int = 0
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def rtf(self) -> float:
        return self.processing_seconds / self.audio_seconds if self.audio_seconds > 0 else float("inf")

    def add_stage(self, name: str, seconds: float) -> None:
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + seconds

    def record_chunk(self, chunk: AudioChunk) -> None:
        now = time.perf_counter() - self.started_at
        if self.first_chunk_seconds is None and len(chunk.audio):
            self.first_chunk_seconds = now
        self.audio_seconds += chunk.duration_s
        self.processing_seconds = now

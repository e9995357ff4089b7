"""The request/response vocabulary shared by the library, the engine, the server and the CLI.

Plain data, no torch: what a client asks for (:class:`SynthesisRequest`, :class:`PromptAudio`,
and :class:`TextStreamRequest` when the text arrives while the model speaks), what it gets back
(:class:`AudioChunk`, :class:`SynthesisInfo`) and what a model offers (:class:`VoiceInfo`, the modes).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
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

    def subscribe_input(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever more of the request's input arrives (an engine waiting for
        it wakes up). A plain request has all of its input up front: nothing will arrive."""


# --------------------------------------------------------------------------------------------
# Text streamed in: a request whose text arrives while the model speaks
# --------------------------------------------------------------------------------------------


class TextStream:
    """The text of one utterance, written as it arrives (a WebSocket session on the event loop)
    and read by the request's job (the engine thread). Thread-safe; reads never block.
    Subscribers (:meth:`subscribe`) are called after every write, close and cancel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: deque[str] = deque()
        self._closed = False
        self._cancelled = False
        self._subscribers: list[Callable[[], None]] = []
        self.chars = 0

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def _changed(self) -> None:
        for callback in list(self._subscribers):
            callback()

    def write(self, text: str) -> None:
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the utterance's text is already complete")
            if not text:
                return
            self._pieces.append(text)
            self.chars += len(text)
        self._changed()

    def close(self) -> None:
        """No more text will come (the utterance ended)."""
        with self._lock:
            self._closed = True
        self._changed()

    def cancel(self) -> None:
        """The utterance was cancelled: the reader should stop."""
        with self._lock:
            self._closed = self._cancelled = True
            self._pieces.clear()
        self._changed()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def read(self) -> tuple[str, bool]:
        """All text written since the last read, and whether the stream is finished (closed and
        fully read)."""
        with self._lock:
            text = "".join(self._pieces)
            self._pieces.clear()
            return text, self._closed


class IteratorTextStream(TextStream):
    """Text pulled from an iterator of pieces (an LLM's output, say): each read takes the next
    piece, waiting for it as the reference's text generator does. For the library's batch-1 path,
    where the caller's iterator is the only source of text."""

    def __init__(self, pieces: Iterable[str]):
        super().__init__()
        self._source = iter(pieces)

    def read(self) -> tuple[str, bool]:
        text, closed = super().read()
        if text or closed:
            return text, closed
        piece = next(self._source, None)
        if piece is None:
            self.close()
            return "", True
        if not isinstance(piece, str):
            raise InvalidRequestError(f"streamed text pieces must be strings, got {type(piece).__name__}")
        self.chars += len(piece)
        return piece, False


@dataclass
class TextStreamRequest(SynthesisRequest):
    """A synthesis whose text arrives while it runs: ``text`` is empty, ``text_stream`` has it.
    Backends that take it declare ``accepts_text_stream`` (:class:`~cosyserve.interfaces.Backend`)."""

    text_stream: TextStream = field(default_factory=TextStream)

    def validate(self) -> None:
        # Everything but the text, which is still being written.
        placeholder = SynthesisRequest(
            text="-",
            voice=self.voice,
            mode=self.mode,
            prompt=self.prompt,
            instruct=self.instruct,
            speed=self.speed,
            seed=self.seed,
        )
        placeholder.validate()

    def subscribe_input(self, callback: Callable[[], None]) -> None:
        self.text_stream.subscribe(callback)


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

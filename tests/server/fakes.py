"""Test doubles for the server: a backend that makes a sine tone per text segment.

Each text segment (split on sentence punctuation) costs one "thinking" step that yields None,
then ``chunks_per_segment`` steps that each yield ``chunk_s / speed`` seconds of a sine whose
pitch depends on the segment, so jobs take several engine steps like a real model. Markers in
the text drive failure cases: ``[fail]`` raises at the first step, ``[failmid]`` after the first
chunk, ``[hang]`` never finishes.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from cosyserve.api import MODES, AudioChunk, PromptAudio, SynthesisInfo, SynthesisRequest, VoiceInfo
from cosyserve.errors import UnknownVoiceError
from cosyserve.interfaces import Backend, GeneratorJob, SynthesisJob

SEGMENT_SPLIT = re.compile(r"(?<=[.!?。！？])\s*")


def split_segments(text: str) -> list[str]:
    return [s for s in (part.strip() for part in SEGMENT_SPLIT.split(text)) if s]


class FakeJob(GeneratorJob):
    def __init__(
        self, backend: FakeBackend, request: SynthesisRequest, generator: Iterator[Any], info: SynthesisInfo
    ):
        super().__init__(generator, info)
        self.backend = backend
        self.request = request
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        with self.backend.lock:
            self.backend.cancelled.append(self.request.text)
        super().cancel()


class FakeBackend(Backend):
    name = "fake"
    sample_rate = 16000
    modes = frozenset(MODES)

    def __init__(
        self,
        *,
        chunks_per_segment: int = 3,
        chunk_s: float = 0.1,
        step_sleep_s: float = 0.002,
        builtin_voices: tuple[str, ...] = ("alice", "bob", "英文女", "英文男"),
        accelerated: bool = False,
    ):
        self.chunks_per_segment = chunks_per_segment
        self.chunk_s = chunk_s
        self.step_sleep_s = step_sleep_s
        self.builtin = list(builtin_voices)
        self.saved: dict[str, PromptAudio] = {}
        self.accelerated = accelerated
        self.lock = threading.Lock()
        self.opened: list[SynthesisRequest] = []
        self.cancelled: list[str] = []
        self.completed: list[str] = []
        self.threads: set[str] = set()  # names of the threads that touched the model
        self.warmups = 0

    # -- Backend interface --

    def voices(self) -> list[VoiceInfo]:
        return [VoiceInfo(v, "sft", language="en") for v in self.builtin] + [
            VoiceInfo(v, "saved", description="cloned") for v in self.saved
        ]

    def expected_seconds(self, text: str, speed: float = 1.0) -> float:
        samples = int(round(self.chunk_s * self.sample_rate / speed))
        return len(split_segments(text)) * self.chunks_per_segment * samples / self.sample_rate

    def open(self, request: SynthesisRequest) -> SynthesisJob:
        self.threads.add(threading.current_thread().name)
        if (
            request.voice
            and request.mode in ("sft", "instruct")
            and request.voice not in {v.id for v in self.voices()}
        ):
            raise UnknownVoiceError(f"unknown voice {request.voice!r}")
        with self.lock:
            self.opened.append(request)
        segments = split_segments(request.text)
        info = SynthesisInfo(segments=segments)
        return FakeJob(self, request, self._generate(request, segments), info)

    def _generate(self, request: SynthesisRequest, segments: list[str]) -> Iterator[AudioChunk | None]:
        text = request.text
        samples = int(round(self.chunk_s * self.sample_rate / request.speed))
        if "[fail]" in text:
            raise RuntimeError("the fake model exploded")
        while "[hang]" in text:
            time.sleep(self.step_sleep_s)
            yield None
        for index in range(len(segments)):
            time.sleep(self.step_sleep_s)
            yield None  # "LLM" work without audio yet
            freq = 220.0 + 55.0 * (index % 8)
            for k in range(self.chunks_per_segment):
                time.sleep(self.step_sleep_s)
                t = (np.arange(samples) + k * samples) / self.sample_rate
                audio = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
                last = index == len(segments) - 1 and k == self.chunks_per_segment - 1
                yield AudioChunk(audio, self.sample_rate, segment=index, final=last)
                if "[failmid]" in text:
                    raise RuntimeError("the fake model exploded mid-stream")
        with self.lock:
            self.completed.append(text)

    def add_voice(self, name: str, prompt: PromptAudio) -> VoiceInfo:
        self.threads.add(threading.current_thread().name)
        self.saved[name] = prompt
        return VoiceInfo(name, "saved", description="cloned")

    def delete_voice(self, name: str) -> None:
        if name not in self.saved:
            raise UnknownVoiceError(f"no saved voice {name!r}")
        del self.saved[name]

    def warmup(self) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        self.warmups += 1
        return {"flow.decoder.estimator": "tensorrt fp16"} if self.accelerated else {}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "device": "cpu",
            "precision": "fp32",
            "jit": False,
            "trt": self.accelerated,
            "onnx": False,
        }

"""What the engine drives and what model families implement.

A :class:`Backend` turns a :class:`~cosyserve.api.SynthesisRequest` into a :class:`SynthesisJob`:
an iterator that yields ``AudioChunk`` objects as audio is made, or ``None`` after a unit of work
that produced no audio yet (so an engine loop can interleave many jobs and cancel between steps).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from cosyserve.api import AudioChunk, PromptAudio, SynthesisInfo, SynthesisRequest, VoiceInfo
from cosyserve.errors import UnsupportedModeError


class SynthesisJob(ABC, Iterator["AudioChunk | None"]):
    """One request in progress. Iterate it: each ``next()`` does one unit of work."""

    info: SynthesisInfo

    @abstractmethod
    def __next__(self) -> AudioChunk | None: ...

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Release resources early; the job will not be stepped again."""


class GeneratorJob(SynthesisJob):
    """A job backed by a generator function that yields chunks (or None between work units)."""

    def __init__(self, generator: Iterator[AudioChunk | None], info: SynthesisInfo):
        self._generator = generator
        self.info = info

    def __next__(self) -> AudioChunk | None:
        item = next(self._generator)
        if item is not None:
            self.info.record_chunk(item)
        else:
            self.info.processing_seconds = time.perf_counter() - self.info.started_at
        return item

    def cancel(self) -> None:
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()


class Backend(ABC):
    """A speech model that the engine loop can drive."""

    name: str = "backend"
    sample_rate: int = 22050
    modes: frozenset[str] = frozenset({"sft"})

    @abstractmethod
    def voices(self) -> list[VoiceInfo]: ...

    @abstractmethod
    def open(self, request: SynthesisRequest) -> SynthesisJob:
        """Validate the request against this backend and start a job (no heavy work here)."""

    def check_request(self, request: SynthesisRequest) -> None:
        """Full up-front validation, before any queueing."""
        request.validate()
        if request.mode not in self.modes:
            raise UnsupportedModeError(
                f"the loaded model ({self.name}) does not support {request.mode}; "
                f"supported: {', '.join(sorted(self.modes))}"
            )

    def describe(self) -> dict[str, Any]:
        """Configuration and state for /performance_info."""
        return {"backend": self.name, "sample_rate": self.sample_rate, "modes": sorted(self.modes)}

    def add_voice(self, name: str, prompt: PromptAudio) -> VoiceInfo:
        raise UnsupportedModeError(f"the loaded model ({self.name}) cannot clone voices")

    def delete_voice(self, name: str) -> None:
        raise UnsupportedModeError(f"the loaded model ({self.name}) has no saved voices")

    def warmup(self) -> dict[str, Any]:
        """Run a tiny synthesis through every loaded accelerated path; report what was warmed."""
        return {}

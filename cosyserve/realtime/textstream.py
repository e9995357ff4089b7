"""The plug-in point for backends whose model reads text as it arrives (CosyVoice2/3 "bistream").

Today every backend gets complete sentence (or clause) segments, one engine request each. A
backend that can consume the text of an utterance while it is still being written declares it
with a class-level capability flag, as vLLM's model protocols do::

    class MyBackend(Backend):
        accepts_text_stream = True

        def open(self, request):
            if isinstance(request, TextStreamRequest):
                ...  # read request.text_stream between steps

and then gets one :class:`TextStreamRequest` per utterance: its :class:`TextStream` is written
on the event loop as pieces arrive and read by the job on the engine thread. The job must not
block waiting for text: :meth:`TextStream.read` returns what is there (possibly nothing) and
whether the stream is finished, and a job with nothing to read yields ``None``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from cosyserve.api import SynthesisRequest
from cosyserve.errors import InvalidRequestError


@runtime_checkable
class SupportsTextStream(Protocol):
    """A backend that takes :class:`TextStreamRequest` (its LLM reads text as it arrives)."""

    accepts_text_stream: ClassVar[bool]


def supports_text_stream(backend: Any) -> bool:
    """True when ``backend`` declares ``accepts_text_stream = True``."""
    return bool(getattr(backend, "accepts_text_stream", False))


class TextStream:
    """The text of one utterance, written by the session (event loop) and read by a job (engine
    thread). Thread-safe; reads never block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pieces: deque[str] = deque()
        self._closed = False
        self._cancelled = False
        self.chars = 0

    def write(self, text: str) -> None:
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the utterance's text is already complete")
            if text:
                self._pieces.append(text)
                self.chars += len(text)

    def close(self) -> None:
        """No more text will come (the utterance ended)."""
        with self._lock:
            self._closed = True

    def cancel(self) -> None:
        """The utterance was cancelled: the reader should stop."""
        with self._lock:
            self._closed = self._cancelled = True
            self._pieces.clear()

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


@dataclass
class TextStreamRequest(SynthesisRequest):
    """A synthesis whose text arrives while it runs: ``text`` is empty, ``text_stream`` has it."""

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

"""The vocabulary of a realtime speech session: its settings, its errors and their WebSocket
close codes. No FastAPI, no torch: the WebSocket endpoint and the Wyoming server share it.

Close codes: ``1000`` after the client's ``close`` (everything spoken), ``1001`` when the server
shuts down, ``1011`` on an internal error, and ``4000 + the HTTP status`` the same mistake gets
over HTTP for the rest (:func:`close_code`): ``4400`` a bad message or config, ``4401`` a
missing or wrong API key, ``4403`` a page from an origin that may not call the API, ``4404`` an
unknown voice, ``4408`` an idle connection, ``4413`` an utterance over the text limit, ``4429``
a client that stopped reading audio (the server's buffer is full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cosyserve.api import MAX_SPEED, MIN_SPEED
from cosyserve.errors import CosyserveError, InvalidRequestError
from cosyserve.text.incremental import SegmentBy

ResponseFormat = Literal["pcm", "wav", "mp3", "opus", "aac", "flac"]
# Formats whose encoding is pure numpy (cheap enough for the event loop).
INLINE_FORMATS = frozenset({"pcm", "wav"})
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8000, 48000

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011


class IdleTimeoutError(CosyserveError):
    status_code = 408
    code = "idle_timeout"


class SlowReaderError(CosyserveError):
    """The client stopped reading audio: the server's bounded buffer stayed full."""

    status_code = 429
    code = "slow_reader"


class TextLimitError(CosyserveError):
    status_code = 413
    code = "text_too_long"


class ForbiddenOriginError(CosyserveError):
    status_code = 403
    code = "forbidden_origin"


def close_code(error: BaseException) -> int:
    """The WebSocket close code for an error that ends a connection (see the module doc)."""
    if isinstance(error, CosyserveError):
        if error.code == "shutting_down":
            return CLOSE_GOING_AWAY
        if 400 <= error.status_code < 500:
            return 4000 + error.status_code
    return CLOSE_INTERNAL_ERROR


def error_event(error: CosyserveError, utterance_id: str | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"type": "error", "error": {"code": error.code, "message": error.message}}
    if utterance_id is not None:
        event["utterance_id"] = utterance_id
    return event


@dataclass(frozen=True)
class VoiceSettings:
    """What an utterance is spoken with (validated against the backend by the transport)."""

    voice: str
    mode: str = "sft"
    instruct: str | None = None
    speed: float = 1.0
    seed: int | None = None
    response_format: str = "pcm"
    sample_rate: int | None = None  # None: the model's rate
    segment_by: SegmentBy = "sentence"


@dataclass(frozen=True)
class SessionLimits:
    max_text_chars: int = 5000  # per utterance, as per HTTP request
    buffer_s: float = 30.0  # audio made ahead of what the client has taken; synthesis pauses beyond


class ConfigMessage(BaseModel):
    """The first message of a WebSocket session (and, between utterances, a change of voice)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["config"] = "config"
    model: str = Field(
        "tts-1", description="tts-1, tts-1-hd, gpt-4o-mini-tts or cosyvoice (all the loaded model)"
    )
    voice: str = Field(..., description="a voice id from /v1/audio/voices, or an OpenAI voice name")
    response_format: ResponseFormat = Field(
        "pcm", description="pcm (s16le mono) | wav | mp3 | opus | aac | flac"
    )
    speed: float = Field(1.0, description=f"{MIN_SPEED} to {MAX_SPEED}")
    sample_rate: int | None = Field(None, description="resample to this rate (default: the model's)")
    segment_by: SegmentBy = Field(
        "sentence", description="sentence | clause (earlier audio, choppier prosody)"
    )
    instructions: str | None = Field(
        None, description="how to speak: instruct mode (CosyVoice v1 Instruct) or instruct2 (CosyVoice2/3)"
    )
    seed: int | None = None
    api_key: str | None = Field(None, description="the server's API key (browsers cannot send headers)")

    def check_ranges(self) -> None:
        if not (math.isfinite(self.speed) and MIN_SPEED <= self.speed <= MAX_SPEED):
            raise InvalidRequestError(
                f"speed must be between {MIN_SPEED} and {MAX_SPEED}, got {self.speed:g}"
            )
        if self.sample_rate is not None and not (MIN_SAMPLE_RATE <= self.sample_rate <= MAX_SAMPLE_RATE):
            raise InvalidRequestError(
                f"sample_rate must be between {MIN_SAMPLE_RATE} and {MAX_SAMPLE_RATE} Hz, got {self.sample_rate}"
            )


class TextMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str
    utterance_id: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[\w\-.:]+$")


class ControlMessage(BaseModel):
    """``flush``: speak what is buffered now; ``end``: the utterance's text is complete;
    ``cancel``: stop speaking and drop everything received; ``close``: finish and close."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["flush", "end", "cancel", "close"]


CLIENT_MESSAGES: dict[str, type[BaseModel]] = {
    "config": ConfigMessage,
    "text": TextMessage,
    "flush": ControlMessage,
    "end": ControlMessage,
    "cancel": ControlMessage,
    "close": ControlMessage,
}

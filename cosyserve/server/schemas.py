"""Request/response models of the HTTP API and the HTTP-only errors.

Every error body has the shape ``{"error": {"code", "message"}}``; on the OpenAI-compatible
``/v1/`` routes it also carries OpenAI's ``type`` and ``param`` so OpenAI clients parse it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cosyserve.errors import CosyserveError

# --------------------------------------------------------------------------------------------
# Errors that only the HTTP layer raises.
# --------------------------------------------------------------------------------------------


class UnauthorizedError(CosyserveError):
    status_code = 401
    code = "invalid_api_key"


class PayloadTooLargeError(CosyserveError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(CosyserveError):
    status_code = 415
    code = "unsupported_media_type"


class ConflictError(CosyserveError):
    status_code = 409
    code = "conflict"


class NotFoundError(CosyserveError):
    status_code = 404
    code = "not_found"


def openai_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(
    status: int,
    code: str,
    message: str,
    *,
    openai_style: bool = False,
    param: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if openai_style:
        error["type"] = openai_error_type(status)
        error["param"] = param
    if request_id is not None:
        error["request_id"] = request_id
    return {"error": error}


def describe_validation_error(exc: ValidationError | Any) -> tuple[str, str | None]:
    """A one-line message ("'speed': Input should be a valid number; ...") and the first field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    parts: list[str] = []
    first: str | None = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "form")]
        name = ".".join(loc) or "request body"
        first = first or (name if loc else None)
        if err.get("type") == "missing":
            parts.append(f"'{name}' is required")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"'{name}' is not a known field")
        else:
            parts.append(f"'{name}': {err.get('msg', 'invalid value')}")
    return ("; ".join(parts) or "invalid request"), first


class ErrorDetail(BaseModel):
    code: str
    message: str
    type: str | None = None
    param: str | None = None
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "invalid input (the message says what to fix)"},
    401: {"model": ErrorResponse, "description": "missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "unknown voice"},
    413: {"model": ErrorResponse, "description": "upload too large"},
    429: {"model": ErrorResponse, "description": "queue full; see Retry-After"},
    503: {"model": ErrorResponse, "description": "shutting down"},
}

# --------------------------------------------------------------------------------------------
# Seed (CosyVoice server compatible) API: form fields or JSON.
# --------------------------------------------------------------------------------------------

SeedFormat = Literal["stream", "wav", "pcm", "mp3", "opus", "aac", "flac"]


class SeedParams(BaseModel):
    """Fields of ``/inference_*``. ``format=stream`` streams raw PCM s16le mono as it is made
    (sample rate in ``X-Sample-Rate``); any other format answers one file."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    tts_text: str = Field(..., description="text to speak")
    spk_id: str | None = Field(
        None, description="built-in or saved voice (sft, instruct; instruct2 without prompt_wav)"
    )
    prompt_text: str | None = Field(None, description="transcript of prompt_wav (zero_shot)")
    instruct_text: str | None = Field(None, description="style instruction (instruct, instruct2)")
    format: SeedFormat = Field("stream", description="stream (raw PCM s16le, chunked) | wav | mp3 | ...")
    speed: float = Field(1.0, description="0.5 to 2.0")
    stream: bool | None = Field(
        None, description="model-level streaming (smaller first chunk); default: on for format=stream"
    )
    max_text_length: int | None = Field(None, description="split text into segments of at most this length")
    enable_smart_split: bool = True
    seed: int | None = Field(None, description="random seed for reproducible sampling")


def seed_request_schema(*, prompt: bool, prompt_required: bool = True) -> dict[str, Any]:
    """OpenAPI requestBody for a seed route: the same fields as JSON or multipart form."""
    schema = SeedParams.model_json_schema()
    form = {**schema, "properties": dict(schema.get("properties", {}))}
    json_schema = {**schema, "properties": dict(schema.get("properties", {}))}
    if prompt:
        form["properties"]["prompt_wav"] = {
            "type": "string",
            "format": "binary",
            "description": "prompt recording",
        }
        json_schema["properties"]["prompt_wav"] = {
            "type": "string",
            "description": "prompt recording, base64 (or a data: URL)",
        }
        if prompt_required:
            form["required"] = [*form.get("required", []), "prompt_wav"]
            json_schema["required"] = [*json_schema.get("required", []), "prompt_wav"]
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/x-www-form-urlencoded": {"schema": json_schema},
                "application/json": {"schema": json_schema},
            },
        }
    }


# --------------------------------------------------------------------------------------------
# OpenAI-compatible API.
# --------------------------------------------------------------------------------------------

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class VoiceRef(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``, as OpenAI's API (plus ``stream``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        "tts-1", description="tts-1, tts-1-hd, gpt-4o-mini-tts or cosyvoice (all the loaded model)"
    )
    input: str = Field(..., description="text to speak")
    voice: str | VoiceRef = Field(
        ...,
        description="a voice id from /v1/audio/voices, or an OpenAI name (alloy, echo, ...) mapped to one",
    )
    instructions: str | None = Field(
        None,
        description="how to speak (as gpt-4o-mini-tts takes it): instruct mode on CosyVoice v1 Instruct "
        "models, instruct2 on CosyVoice2/3; ignored by models without either",
    )
    response_format: ResponseFormat = "mp3"
    speed: float = Field(1.0, description="0.5 to 2.0 on this server")
    stream_format: Literal["audio", "sse"] = "audio"
    stream: bool = Field(True, description="send audio as it is made (false: one body with timing headers)")
    seed: int | None = None

    @property
    def voice_id(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "cosyserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --------------------------------------------------------------------------------------------
# Voices.
# --------------------------------------------------------------------------------------------


class VoiceOut(BaseModel):
    id: str
    name: str
    kind: str
    language: str | None = None
    description: str = ""
    object: Literal["audio.voice"] = "audio.voice"
    type: str | None = None
    created_at: int | None = None


class VoiceListOut(BaseModel):
    object: Literal["list"] = "list"
    data: list[VoiceOut]
    voices: list[str] = Field(description="the voice ids, for quick use")
    openai_aliases: dict[str, str] | None = Field(None, description="OpenAI voice name -> voice used")
    family: str | None = Field(None, description="the loaded model's family (cosyvoice1, cosyvoice2, ...)")
    modes: list[str] | None = Field(None, description="its synthesis modes")
    sample_rate: int | None = Field(None, description="its output sample rate (Hz)")


class VoiceDeletedOut(BaseModel):
    id: str
    object: Literal["audio.voice.deleted"] = "audio.voice.deleted"
    deleted: bool = True

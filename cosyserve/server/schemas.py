"""Request/response models of the HTTP API and the HTTP-only errors.

Every error body has the shape ``{"error": {"code", "message"}}``; on the OpenAI-compatible
``/v1/`` routes it also carries OpenAI's ``type`` and ``param`` so OpenAI clients parse it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cosyserve.api import MAX_SEED
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


class ModelNotFoundError(NotFoundError):
    """An OpenAI ``model`` this server does not serve (OpenAI answers 404 too)."""

    code = "model_not_found"


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


def error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
# What every route may answer whatever it does (the middleware's refusals).
COMMON_ERRORS: dict[int | str, dict[str, Any]] = {
    401: error_response("missing or wrong API key (only when the server has one)"),
    403: error_response("a browser request from a foreign origin or host name (only without an API key)"),
    413: error_response("request body too large"),
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_response("invalid input (the message says what to fix)"),
    **COMMON_ERRORS,
    404: error_response("unknown voice (or model)"),
    415: error_response("a body in a format this route does not read (the message says what to send)"),
    429: error_response("queue full; see Retry-After") | {"headers": _RETRY_AFTER},
    500: error_response("the synthesis failed (the message has the request id for the server log)"),
    503: error_response("shutting down, or no audio decoder available; see Retry-After")
    | {"headers": _RETRY_AFTER},
}

# --------------------------------------------------------------------------------------------
# Seed (CosyVoice server compatible) API: form fields or JSON.
# --------------------------------------------------------------------------------------------

SeedFormat = Literal["stream", "wav", "pcm", "mp3", "opus", "aac", "flac"]


# Text fields that the server bounds by COSYSERVE_MAX_TEXT_CHARS (see openapi.set_text_limits).
TEXT_FIELDS = frozenset({"tts_text", "prompt_text", "instruct_text", "input", "instructions", "transcript"})


# The spellings of a boolean a form or query field may use.
FORM_BOOLEANS = ("true", "false", "1", "0", "yes", "no", "on", "off")


class SeedParams(BaseModel):
    """Fields of ``/inference_*``. ``format=stream`` streams raw PCM s16le mono as it is made
    (sample rate in ``X-Sample-Rate``); any other format answers one file."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)

    # Bounds that only the schema states are checked by the server with clearer messages.
    tts_text: str = Field(
        ..., description="text to speak (with something to say in it)", json_schema_extra={"minLength": 1}
    )
    spk_id: str | None = Field(
        None, description="built-in or saved voice (sft, instruct; instruct2 without prompt_wav)"
    )
    prompt_text: str | None = Field(None, description="transcript of prompt_wav (zero_shot)")
    instruct_text: str | None = Field(None, description="style instruction (instruct, instruct2)")
    format: SeedFormat = Field("stream", description="stream (raw PCM s16le, chunked) | wav | mp3 | ...")
    speed: float = Field(1.0, description="0.5 to 2.0", json_schema_extra={"minimum": 0.5, "maximum": 2.0})
    stream: bool | None = Field(
        None, description="model-level streaming (smaller first chunk); default: on for format=stream"
    )
    max_text_length: int | None = Field(
        None,
        description="split text into segments of at most this length",
        json_schema_extra={"minimum": 10, "maximum": 1000},
    )
    enable_smart_split: bool = True
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed for reproducible sampling")

    @field_validator("stream", "enable_smart_split", mode="before")
    @classmethod
    def _form_boolean(cls, value: Any) -> Any:
        # Form and query values are text: exactly the words the schema lists (pydantic alone
        # would also take "T", "Y", "OFF", ...).
        if isinstance(value, str) and value not in FORM_BOOLEANS:
            raise ValueError(f"must be one of {', '.join(FORM_BOOLEANS)}")
        return value


# The fields each seed route needs besides tts_text (the server refuses the request without them).
SEED_REQUIRED: dict[str, tuple[str, ...]] = {
    "sft": ("spk_id",),
    "instruct": ("spk_id", "instruct_text"),
    "zero_shot": ("prompt_text", "prompt_wav"),
    "cross_lingual": ("prompt_wav",),
    "instruct2": ("instruct_text",),  # and a voice: prompt_wav or a saved voice as spk_id
}
_SEED_UNUSED: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_text", "instruct_text"),
    "instruct": ("prompt_text",),
    "zero_shot": ("spk_id", "instruct_text"),
    "cross_lingual": ("spk_id", "prompt_text", "instruct_text"),
    "instruct2": ("prompt_text",),
}
_NON_EMPTY = {"type": "string", "minLength": 1}


def _seed_fields(mode: str, *, nullable: bool) -> dict[str, Any]:
    """The properties of a seed route's body. A form cannot send null (an optional field is
    left out), so a form's schema offers each field's own type only; a required field is never
    null nor empty."""
    schema = SeedParams.model_json_schema()
    required = ("tts_text", *SEED_REQUIRED[mode])
    properties: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if name in _SEED_UNUSED[mode]:
            continue
        options = prop.get("anyOf")
        if isinstance(options, list) and (not nullable or name in required):
            kept = [o for o in options if o.get("type") != "null"]
            prop = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            prop.update(kept[0] if len(kept) == 1 else {"anyOf": kept})
        if name in required and prop.get("type") == "string":
            prop = {**prop, "minLength": 1}
        if not nullable and prop.get("type") == "boolean":
            text = {"type": "string", "enum": list(FORM_BOOLEANS)}
            prop = {k: v for k, v in prop.items() if k != "type"} | {"anyOf": [{"type": "boolean"}, text]}
        properties[name] = prop
    return {"type": "object", "properties": properties, "required": list(required)}


def _with_prompt(schema: dict[str, Any], *, binary: bool) -> dict[str, Any]:
    prompt = (
        {"type": "string", "format": "binary", "description": "prompt recording (wav, flac, mp3, ogg, ...)"}
        if binary
        else {**_NON_EMPTY, "format": "byte", "description": "prompt recording, base64 (or a data: URL)"}
    )
    return {**schema, "properties": {**schema["properties"], "prompt_wav": prompt}}


def seed_request_schema(mode: str) -> dict[str, Any]:
    """OpenAPI requestBody for the seed route of ``mode``: the same fields as JSON or a form
    (multipart: the recording as a file; urlencoded: base64, as in JSON)."""
    prompt = "prompt_wav" in SEED_REQUIRED[mode] or mode == "instruct2"  # instruct2: optional
    form = _seed_fields(mode, nullable=False)
    json_schema = _seed_fields(mode, nullable=True)
    multipart = _with_prompt(form, binary=True) if prompt else form
    urlencoded = _with_prompt(form, binary=False) if prompt else form
    json_body = _with_prompt(json_schema, binary=False) if prompt else json_schema
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart},
                "application/x-www-form-urlencoded": {"schema": urlencoded},
                "application/json": {"schema": json_body},
            },
        }
    }


def seed_query_schema(mode: str) -> dict[str, Any]:
    """The query parameters of upstream's GET form of a seed route (no recording: sft, instruct)."""
    form = _seed_fields(mode, nullable=False)
    return {
        "parameters": [
            {"name": name, "in": "query", "required": name in form["required"], "schema": prop}
            for name, prop in form["properties"].items()
        ]
    }


# --------------------------------------------------------------------------------------------
# OpenAI-compatible API.
# --------------------------------------------------------------------------------------------

ResponseFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
# Formats whose header states the length: streamed, they would carry "unknown", which many
# readers (libsndfile, so Python's soundfile) refuse; they come whole unless asked to stream.
WHOLE_BY_DEFAULT = frozenset({"wav", "flac"})


class VoiceRef(BaseModel):
    id: str


class SpeechRequest(BaseModel):
    """``POST /v1/audio/speech``, as OpenAI's API (plus ``stream``)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(
        "tts-1", description="tts-1, tts-1-hd, gpt-4o-mini-tts or cosyvoice (all the loaded model)"
    )
    input: str = Field(
        ..., description="text to speak (with something to say in it)", json_schema_extra={"minLength": 1}
    )
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
    speed: float = Field(
        1.0, description="0.5 to 2.0 on this server", json_schema_extra={"minimum": 0.5, "maximum": 2.0}
    )
    stream_format: Literal["audio", "sse"] = "audio"
    stream: bool | None = Field(
        None,
        description="send audio as it is made (false: one complete body with timing headers). Default: "
        "streamed for mp3, opus, aac and pcm; wav and flac come whole, with their length in the header, "
        "unless stream is true",
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random seed for reproducible sampling")

    @property
    def streams(self) -> bool:
        """Whether the audio is sent as it is made (see ``stream``)."""
        if self.stream is not None:
            return self.stream
        return self.response_format not in WHOLE_BY_DEFAULT

    @property
    def voice_id(self) -> str:
        return self.voice.id if isinstance(self.voice, VoiceRef) else self.voice


# Models that routes reading their own bodies refer to (added to the OpenAPI components).
REFERENCED_MODELS: tuple[type[BaseModel], ...] = (SpeechRequest,)
SPEECH_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SpeechRequest"}}},
    }
}


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

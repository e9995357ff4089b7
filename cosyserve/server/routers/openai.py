"""The OpenAI-compatible surface: ``/v1/audio/speech``, ``/v1/audio/voices``, ``/v1/models``.

The official ``openai`` client works unchanged (``base_url=http://host:port/v1``). Errors on
these routes use OpenAI's shape (``error.message/type/param/code``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from cosyserve.api import MAX_SPEED, MIN_SPEED, SynthesisRequest
from cosyserve.errors import CosyserveError, InvalidRequestError, UnknownVoiceError
from cosyserve.interfaces import Backend
from cosyserve.server.routers.common import (
    ServerState,
    file_audio,
    get_state,
    instruction_mode,
    model_summary,
    read_json_body,
    resolve_voice_id,
    stream_audio,
    validate_synthesis,
)
from cosyserve.server.routers.voices import (
    DELETE_RESPONSES,
    SAVE_RESPONSES,
    VOICE_REQUEST_BODY,
    create_voice,
    delete_voice,
    voice_list,
)
from cosyserve.server.schemas import (
    ERROR_RESPONSES,
    SPEECH_REQUEST_BODY,
    ModelCard,
    ModelList,
    ModelNotFoundError,
    SpeechRequest,
    VoiceDeletedOut,
    VoiceListOut,
    VoiceOut,
    describe_validation_error,
    error_response,
)

router = APIRouter(prefix="/v1", tags=["OpenAI compatible"])

OPENAI_VOICES: tuple[str, ...] = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
_FEMALE = {"alloy", "coral", "nova", "sage", "shimmer", "marin"}
# CosyVoice-300M-SFT speaker names, best first; other models fall back to a stable pick.
_FEMALE_PREFS = ("英文女", "中文女", "粤语女", "韩语女")
_MALE_PREFS = ("英文男", "中文男", "日语男")
_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "cosyvoice")
_CREATED = int(time.time())
_SPEECH_EXAMPLE = '{"model": "tts-1", "input": "Hello!", "voice": "alloy"}'
# A speech body is text and a few short fields: JSON may spend up to 12 bytes per character
# (an escaped surrogate pair), plus room for the rest.
_SPEECH_BODY_SLACK = 64 * 1024


def _bad(param: str, message: str, error: type[CosyserveError] = InvalidRequestError) -> CosyserveError:
    exc = error(message)
    exc.param = param  # type: ignore[attr-defined]  # read by the OpenAI-shaped error handler
    return exc


def model_ids(backend: Backend) -> list[str]:
    # Not from describe(): that may be costly, and this runs on every request.
    return list(_MODEL_ALIASES) + ([backend.name] if backend.name not in _MODEL_ALIASES else [])


def check_model(model: str, backend: Backend) -> None:
    wanted = model.strip().lower()
    ids = [m.lower() for m in model_ids(backend)]
    if wanted in ids or wanted.startswith(("tts-1", "gpt-4o-mini-tts", "cosyvoice")):
        return
    raise _bad(
        "model",
        f"unknown model {model!r}: this server speaks with its one loaded model; "
        f"use one of {', '.join(model_ids(backend))}",
        ModelNotFoundError,
    )


def map_voice(name: str, backend: Backend) -> str:
    """A voice id, a saved voice, or an OpenAI voice name mapped onto an available voice."""
    try:
        return resolve_voice_id(backend, name)
    except UnknownVoiceError as exc:
        if name.strip().lower() not in OPENAI_VOICES:
            exc.param = "voice"  # type: ignore[attr-defined]
            raise
    openai_name = name.strip().lower()
    voices = backend.voices()
    builtin = [v.id for v in voices if v.kind != "saved"] or [v.id for v in voices]
    if not builtin:
        raise _bad(
            "voice", "this model has no built-in voice: create one with POST /v1/voices", UnknownVoiceError
        )
    for preferred in _FEMALE_PREFS if openai_name in _FEMALE else _MALE_PREFS:
        if preferred in builtin:
            return preferred
    return builtin[OPENAI_VOICES.index(openai_name) % len(builtin)]


@router.post(
    "/audio/speech",
    responses={
        200: {
            "description": "audio (chunked as made) or SSE events",
            "content": {
                "audio/mpeg": {},
                "audio/ogg": {},
                "audio/aac": {},
                "audio/flac": {},
                "audio/wav": {},
                "audio/pcm": {},
                "text/event-stream": {},
            },
        },
        **ERROR_RESPONSES,
    },
    summary="Create speech (OpenAI API)",
    openapi_extra=SPEECH_REQUEST_BODY,
)
async def create_speech(request: Request, state: ServerState = Depends(get_state)) -> Response:
    # The body is read here, not by FastAPI: an oversized one is refused as it arrives (413),
    # and every way a body can be wrong gets its own message.
    limit = 12 * state.settings.max_text_chars + _SPEECH_BODY_SLACK
    payload = await read_json_body(request, limit, _SPEECH_EXAMPLE)
    try:
        body = SpeechRequest.model_validate(payload, strict=True)  # JSON values carry their types
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        raise _bad(param or "body", message) from exc
    backend = state.backend
    check_model(body.model, backend)
    if not (MIN_SPEED <= body.speed <= MAX_SPEED):
        raise _bad(
            "speed",
            f"speed must be between {MIN_SPEED} and {MAX_SPEED} on this server "
            f"(OpenAI allows 0.25-4.0), got {body.speed:g}",
        )
    if not body.input.strip():
        raise _bad("input", "input is empty: give the text to speak")
    if len(body.input) > state.settings.max_text_chars:
        raise _bad(
            "input",
            f"input has {len(body.input)} characters; this server accepts at most "
            f"{state.settings.max_text_chars}: split it into several requests",
        )
    voice = map_voice(body.voice_id, backend)
    mode, instruct = instruction_mode(backend, body.instructions)
    sse = body.stream_format == "sse"
    synthesis = SynthesisRequest(
        text=body.input,
        voice=voice,
        mode=mode,
        instruct=instruct,
        stream=body.streams or sse,
        speed=body.speed,
        seed=body.seed,
    )
    validate_synthesis(state, synthesis)
    if sse or body.streams:
        return await stream_audio(state, request, synthesis, body.response_format, sse=sse, what="speech")
    return await file_audio(state, request, synthesis, body.response_format, what="speech")


@router.get("/audio/voices", response_model=VoiceListOut, summary="Voices (ids usable as `voice`)")
async def list_audio_voices(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    listing = voice_list(state.backend)
    listing["openai_aliases"] = (
        {name: map_voice(name, state.backend) for name in OPENAI_VOICES} if listing["voices"] else {}
    )
    return {**listing, **model_summary(state.backend)}


@router.post(
    "/audio/voices",
    response_model=VoiceOut,
    status_code=200,
    responses=SAVE_RESPONSES,
    summary="Create a voice from a recording (OpenAI: audio_sample, name)",
    openapi_extra=VOICE_REQUEST_BODY,
)
async def create_audio_voice(request: Request, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    out = await create_voice(request, state)
    return {**out, "type": "audio_sample", "created_at": int(time.time())}


@router.delete(
    "/audio/voices/{voice_id}",
    response_model=VoiceDeletedOut,
    responses=DELETE_RESPONSES,
    summary="Delete a saved voice",
)
async def delete_audio_voice(voice_id: str, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    await delete_voice(voice_id, state)
    return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}


@router.get("/models", response_model=ModelList, summary="Models (all names speak with the loaded model)")
async def list_models(state: ServerState = Depends(get_state)) -> ModelList:
    return ModelList(data=[ModelCard(id=m, created=_CREATED) for m in model_ids(state.backend)])


@router.get(
    "/models/{model_id}", response_model=ModelCard, responses={404: error_response("no model of that name")}
)
async def get_model(model_id: str, state: ServerState = Depends(get_state)) -> ModelCard:
    if model_id not in model_ids(state.backend):
        raise ModelNotFoundError(f"no model {model_id!r}; GET /v1/models lists them")
    return ModelCard(id=model_id, created=_CREATED)

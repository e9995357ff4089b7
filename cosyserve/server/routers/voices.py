"""Saved voices: clone a voice from a recording once, then use its name as ``spk_id``/``voice``.

Adding and deleting touch the model (speaker embedding, speech tokens), so they run on the
engine thread through :meth:`EngineLoop.call`, between two synthesis steps.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from cosyserve.api import VoiceInfo
from cosyserve.errors import InvalidRequestError, UnknownVoiceError, UnsupportedModeError
from cosyserve.interfaces import Backend
from cosyserve.server.routers.common import ServerState, get_state, read_fields, read_prompt, voice_out
from cosyserve.server.schemas import (
    COMMON_ERRORS,
    ERROR_RESPONSES,
    ConflictError,
    VoiceDeletedOut,
    VoiceListOut,
    VoiceOut,
    error_response,
)
from cosyserve.voices.names import MAX_NAME_LENGTH, NAME_RULE, NAME_SCHEMA_PATTERN, check_voice_name

router = APIRouter(prefix="/v1/voices", tags=["Voices"])

# Modes that clone a voice from a recording: a backend without them cannot save voices.
_CLONING_MODES = frozenset({"zero_shot", "cross_lingual"})
_AUDIO_FIELDS = ("audio", "file", "audio_sample", "prompt_wav")
_TRANSCRIPT_FIELDS = ("transcript", "prompt_text", "text")


def voice_list(backend: Backend) -> dict[str, Any]:
    voices = backend.voices()
    return {"object": "list", "data": [voice_out(v) for v in voices], "voices": [v.id for v in voices]}


def find_voice(backend: Backend, name: str) -> VoiceInfo:
    voices = backend.voices()
    for voice in voices:
        if voice.id == name:
            return voice
    for voice in voices:
        if voice.id.casefold() == name.casefold():
            return voice
    raise UnknownVoiceError(f"no voice named {name!r}; GET /v1/voices lists them")


async def create_voice(request: Request, state: ServerState) -> dict[str, Any]:
    if not state.backend.modes & _CLONING_MODES:  # before reading (and decoding) any upload
        raise UnsupportedModeError(f"the loaded model ({state.backend.name}) cannot clone voices")
    fields, uploads = await read_fields(request, state.settings)
    for field in ("name", *_TRANSCRIPT_FIELDS):
        if fields.get(field) is not None and not isinstance(fields[field], str):
            raise InvalidRequestError(f"'{field}' must be a string")
    name = str(fields.get("name") or "").strip()
    if not name:
        raise InvalidRequestError("name is required: the name to save the voice under")
    name = check_voice_name(name)
    try:
        existing = find_voice(state.backend, name)
    except UnknownVoiceError:
        pass
    else:
        raise ConflictError(
            f"a {existing.kind} voice named {existing.id!r} already exists: choose another "
            "name (or DELETE /v1/voices/{name} first)"
        )
    upload = next((uploads[f] for f in _AUDIO_FIELDS if f in uploads), None)
    encoded = next((fields[f] for f in _AUDIO_FIELDS if isinstance(fields.get(f), str)), None)
    if upload is None and encoded is None:
        raise InvalidRequestError("audio is required: upload the recording as the form file field 'audio'")
    transcript = next((str(fields[f]).strip() for f in _TRANSCRIPT_FIELDS if fields.get(f)), None) or None
    prompt = await read_prompt(state, upload, encoded, transcript, field_name="audio")
    info = await state.engine.call(state.backend.add_voice, name, prompt)
    return voice_out(info)


async def delete_voice(name: str, state: ServerState) -> None:
    voice = find_voice(state.backend, name)
    if voice.kind != "saved":
        raise ConflictError(f"{voice.id!r} is a built-in voice and cannot be deleted")
    await state.engine.call(state.backend.delete_voice, voice.id)


_NAME_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME_LENGTH,
    "pattern": NAME_SCHEMA_PATTERN,
    "description": "the name to save the voice under: " + NAME_RULE,
}
_VOICE_FIELDS = {
    "name": _NAME_SCHEMA,
    "transcript": {"type": "string", "description": "what the recording says (enables zero-shot quality)"},
}
VOICE_REQUEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "audio"],
                    "properties": {
                        **_VOICE_FIELDS,
                        "audio": {"type": "string", "format": "binary", "description": "the recording"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["name", "audio"],
                    "properties": {
                        **_VOICE_FIELDS,
                        "audio": {
                            "type": "string",
                            "format": "byte",
                            "minLength": 1,
                            "description": "base64",
                        },
                    },
                }
            },
        },
    }
}
_STORE_ERRORS: dict[int | str, dict[str, Any]] = {
    503: error_response("the voice store cannot be written (read-only, permissions), or shutting down"),
    507: error_response("the disk holding saved voices is full"),
}
SAVE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    409: error_response("a voice of that name exists"),
    **_STORE_ERRORS,
}
DELETE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **COMMON_ERRORS,
    400: error_response("this model has no saved voices"),
    404: error_response("no voice of that name"),
    409: error_response("a built-in voice (cannot be deleted)"),
    **_STORE_ERRORS,
}


@router.post(
    "",
    status_code=201,
    response_model=VoiceOut,
    response_model_exclude_none=True,
    responses=SAVE_RESPONSES,
    summary="Save a voice: multipart 'audio' (file), 'name', optional 'transcript' (enables zero-shot quality)",
    openapi_extra=VOICE_REQUEST_BODY,
)
async def add_voice(request: Request, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return await create_voice(request, state)


@router.get("", response_model=VoiceListOut, response_model_exclude_none=True, summary="All voices")
async def list_voices(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return voice_list(state.backend)


@router.get(
    "/{name}",
    response_model=VoiceOut,
    response_model_exclude_none=True,
    responses={**COMMON_ERRORS, 404: error_response("no voice of that name")},
)
async def get_voice(name: str, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return voice_out(find_voice(state.backend, name))


@router.delete(
    "/{name}", response_model=VoiceDeletedOut, responses=DELETE_RESPONSES, summary="Delete a saved voice"
)
async def remove_voice(name: str, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    await delete_voice(name, state)
    return {"id": name, "object": "audio.voice.deleted", "deleted": True}

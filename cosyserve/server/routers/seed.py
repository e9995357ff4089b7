"""The CosyVoice server API (``/inference_*``, ``/list_voices``), compatible with upstream's
field names and raw-PCM streaming, accepting form fields, JSON or query parameters alike."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from cosyserve.api import Mode, SynthesisRequest
from cosyserve.audio.encode import MEDIA_TYPES
from cosyserve.server.routers.common import (
    ServerState,
    ensure_mode,
    file_audio,
    get_state,
    is_json,
    model_summary,
    parse_model,
    read_fields,
    read_prompt,
    stream_audio,
    validate_synthesis,
    voice_out,
)
from cosyserve.server.schemas import ERROR_RESPONSES, SeedParams, seed_query_schema, seed_request_schema

router = APIRouter(tags=["CosyVoice API"])

_AUDIO_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "format=stream: raw PCM s16le mono, chunked as made (rate in X-Sample-Rate); "
        "otherwise one audio file with X-Processing-Time, X-Audio-Duration and X-RTF headers",
        "content": {media_type: {} for media_type in dict.fromkeys(MEDIA_TYPES.values())},
    },
    **ERROR_RESPONSES,
}


async def _synthesise(request: Request, state: ServerState, mode: Mode) -> Response:
    ensure_mode(state.backend, mode)
    fields, uploads = await read_fields(request, state.settings)
    params: SeedParams = parse_model(SeedParams, fields, strict=is_json(request))
    upload = uploads.get("prompt_wav") or uploads.get("prompt_audio")
    encoded = fields.get("prompt_wav")
    prompt = None
    # instruct2 takes its voice from a recording or, without one, from spk_id (a saved voice).
    if mode in ("zero_shot", "cross_lingual") or (mode == "instruct2" and (upload or encoded)):
        prompt = await read_prompt(
            state, upload, encoded, params.prompt_text if mode == "zero_shot" else None
        )
    streaming = params.format == "stream"
    synthesis = SynthesisRequest(
        text=params.tts_text,
        voice=params.spk_id,
        mode=mode,
        prompt=prompt,
        instruct=params.instruct_text if mode in ("instruct", "instruct2") else None,
        stream=streaming if params.stream is None else params.stream,
        speed=params.speed,
        seed=params.seed,
        max_text_length=params.max_text_length,
        enable_smart_split=params.enable_smart_split,
    )
    validate_synthesis(state, synthesis)
    if streaming:
        return await stream_audio(state, request, synthesis, "pcm", what=f"inference_{mode}")
    return await file_audio(state, request, synthesis, params.format, what=f"inference_{mode}")


@router.get(  # upstream answers GET with query fields too
    "/inference_sft",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_query_schema("sft"),
    summary="Speak text with a built-in or saved voice (query fields, as upstream's GET)",
)
@router.post(
    "/inference_sft",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_request_schema("sft"),
    summary="Speak text with a built-in or saved voice (tts_text, spk_id)",
    description="Mode sft: every model with built-in speakers (spk2info.pt) or saved voices. Needs "
    "tts_text and spk_id (GET /list_voices lists them; a voice saved with a model of another family "
    "is refused with 409).",
)
async def inference_sft(request: Request, state: ServerState = Depends(get_state)) -> Response:
    return await _synthesise(request, state, "sft")


@router.post(
    "/inference_zero_shot",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_request_schema("zero_shot"),
    summary="Clone the voice of prompt_wav (with its transcript prompt_text) to speak tts_text",
    description="Mode zero_shot: models whose directory has campplus.onnx and the speech tokenizer. "
    "Needs tts_text, prompt_wav (1-30 s of speech) and prompt_text (what it says).",
)
async def inference_zero_shot(request: Request, state: ServerState = Depends(get_state)) -> Response:
    return await _synthesise(request, state, "zero_shot")


@router.post(
    "/inference_cross_lingual",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_request_schema("cross_lingual"),
    summary="Speak tts_text (any language) in the voice of prompt_wav, no transcript needed",
    description="Mode cross_lingual: models whose directory has campplus.onnx and the speech "
    "tokenizer. Needs tts_text and prompt_wav (1-30 s of speech).",
)
async def inference_cross_lingual(request: Request, state: ServerState = Depends(get_state)) -> Response:
    return await _synthesise(request, state, "cross_lingual")


@router.get(
    "/inference_instruct",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_query_schema("instruct"),
    summary="Speak tts_text with spk_id, styled by instruct_text (query fields, as upstream's GET)",
)
@router.post(
    "/inference_instruct",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_request_schema("instruct"),
    summary="Speak tts_text with spk_id, styled by instruct_text",
    description="Mode instruct: CosyVoice v1 Instruct models (CosyVoice2/3 use /inference_instruct2). "
    "Needs tts_text, spk_id (a built-in speaker) and instruct_text.",
)
async def inference_instruct(request: Request, state: ServerState = Depends(get_state)) -> Response:
    return await _synthesise(request, state, "instruct")


@router.post(
    "/inference_instruct2",
    responses=_AUDIO_RESPONSES,
    openapi_extra=seed_request_schema("instruct2"),
    summary="Speak tts_text in a voice (prompt_wav, or a saved voice as spk_id), styled by instruct_text",
    description="Mode instruct2: CosyVoice2/3 models. Needs tts_text, instruct_text (how to speak: "
    '"speak happily", "用四川话说这句话") and a voice: the recording prompt_wav (no transcript needed; '
    "the directory needs campplus.onnx and the speech tokenizer) or, without one, spk_id (a saved "
    "voice or a built-in speaker).",
)
async def inference_instruct2(request: Request, state: ServerState = Depends(get_state)) -> Response:
    return await _synthesise(request, state, "instruct2")


@router.get(
    "/list_voices", summary="Built-in and saved voices, and the model's family, modes and sample rate"
)
async def list_voices(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    backend = state.backend
    voices = backend.voices()
    return {
        "voices": [voice_out(v) for v in voices],
        "spk_ids": [v.id for v in voices],
        "builtin": [v.id for v in voices if v.kind != "saved"],
        "saved": [v.id for v in voices if v.kind == "saved"],
        **model_summary(backend),
    }

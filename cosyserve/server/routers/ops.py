"""Operations: ``/health`` (a real tiny synthesis, cached), ``/metrics`` (Prometheus),
``/performance_info`` (what is running and why), ``/warmup_trt`` and the index page."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from cosyserve import __version__
from cosyserve.errors import AcceleratorUnavailableError
from cosyserve.server.metrics import CONTENT_TYPE, resident_memory_bytes
from cosyserve.server.routers.common import ServerState, get_state
from cosyserve.server.schemas import error_response

logger = logging.getLogger(__name__)

router = APIRouter(tags=["Operations"])

_ACCEL_KEYS = ("trt", "load_trt", "tensorrt", "jit", "load_jit")
_OFF = {"", "off", "none", "false", "no", "eager", "disabled"}


def accelerated_paths(description: dict[str, Any]) -> list[str]:
    """The accelerated paths ``backend.describe()`` reports as loaded (top level or under
    ``acceleration``): keys such as ``trt``/``jit`` whose value is on."""
    found: list[str] = []
    scopes = [description]
    if isinstance(description.get("acceleration"), dict):
        scopes.append(description["acceleration"])
    for scope in scopes:
        for key in _ACCEL_KEYS:
            value = scope.get(key)
            if value is None or value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
                continue
            if isinstance(value, (dict, list)) and not value:
                continue
            found.append(key)
    # The launcher's report style: "accelerations": ["fp16", "jit", "trt", ...].
    applied = description.get("accelerations")
    if isinstance(applied, (list, tuple)):
        found.extend(str(a) for a in applied if any(k in str(a).lower() for k in ("trt", "tensorrt", "jit")))
    return found


# Only mounted when the playground (which owns "/") is not part of this build.
index_router = APIRouter()


@index_router.get("/", include_in_schema=False)
async def index(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    return {
        "name": "cosyserve",
        "version": __version__,
        "backend": state.backend.name,
        "docs": "/docs",
        "endpoints": [
            "/inference_sft",
            "/inference_zero_shot",
            "/inference_cross_lingual",
            "/inference_instruct",
            "/inference_instruct2",
            "/v1/audio/speech",
            "/v1/voices",
            "/health",
            "/metrics",
        ],
    }


@router.get(
    "/health",
    summary="A tiny real synthesis through the engine (cached); 503 when it fails",
    responses={503: {"description": "unhealthy or shutting down (the body says which)"}},
)
async def health(state: ServerState = Depends(get_state)) -> JSONResponse:
    assert state.health is not None  # noqa: S101 - set by create_app
    ok, payload = await state.health.check()
    return JSONResponse(payload, status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: ServerState = Depends(get_state)) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/performance_info", summary="Active configuration, fallbacks taken, counters")
async def performance_info(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    description = state.backend.describe()
    settings = state.settings
    rss = resident_memory_bytes()
    return {
        "version": __version__,
        "instance": state.instance_id,
        "uptime_s": round(state.uptime_s, 1),
        "backend": description,
        "accelerated": accelerated_paths(description),
        "launch": state.launch_report,
        "concurrency": {
            "max_active": settings.max_active,
            "max_queue": settings.max_queue,
            "trt_concurrent": settings.trt_concurrent,
            "policy": type(state.engine.policy).__name__,
        },
        "engine": state.engine.stats(),
        "http": {
            "open_streams": state.requests.streams,
            "waiting_for_audio": state.requests.waiting,
            "draining": state.requests.draining,
        },
        "process": {"rss_mb": None if rss is None else round(rss / 2**20, 1)},
        "decoder": state.decoder.describe() if state.decoder is not None else {"workers": 0},
        "settings": settings.public_dict(),
    }


@router.post(
    "/warmup_trt",
    summary="Run a tiny synthesis through every accelerated path (TensorRT, JIT)",
    responses={
        409: error_response("nothing accelerated is loaded"),
        503: error_response("shutting down"),
    },
)
async def warmup_trt(state: ServerState = Depends(get_state)) -> dict[str, Any]:
    paths = accelerated_paths(state.backend.describe())
    if not paths:
        raise AcceleratorUnavailableError(
            "nothing accelerated is loaded, so there is nothing to warm up: start the server with "
            "--load_trt (and/or --load_jit) on a CUDA machine"
        )
    warmed = await state.engine.call(state.backend.warmup)
    if not warmed:
        raise AcceleratorUnavailableError(f"the backend reports {', '.join(paths)} but warmed nothing")
    logger.info("warmup: %s", warmed)
    return {"status": "ok", "warmed": warmed}

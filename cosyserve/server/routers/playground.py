"""The web playground: ``GET /`` serves a plain HTML/JS/CSS page (no build step, no CDN, works
offline) that speaks text through the server's own API and shows time to first audio and RTF.

The page and its two assets are public (they hold no data; every API call the page makes sends
the key the user typed): :data:`PUBLIC_PATHS` lists them for the API-key middleware.
``POST /playground/encode`` turns the PCM the page heard into the download format the user
picked, so a download is exactly what was played, not a second synthesis.
"""

from __future__ import annotations

from importlib import resources

from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from cosyserve.errors import InvalidRequestError
from cosyserve.server.schemas import NotFoundError

router = APIRouter(tags=["Playground"])

# name -> media type; anything else under /static/ is a 404 (no directory listing, no traversal).
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
PUBLIC_PATHS: frozenset[str] = frozenset({"/", "/playground", *(f"/static/{name}" for name in ASSETS)})
# Revalidate on every load: a server upgrade must never pair a new page with an old script.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_ENCODE_FORMATS = ("wav", "mp3", "opus", "aac", "flac", "pcm")


def _read(name: str) -> bytes:
    return resources.files("cosyserve.server").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def playground_page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False)
async def playground_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFoundError(f"no static file {name!r}")
    return Response(_read(name), media_type=media_type, headers=_HEADERS)


# The page's helper, not part of the public API (so not in /docs); behind the API key.
@router.post("/playground/encode", include_in_schema=False, response_class=Response)
async def playground_encode(
    request: Request,
    format: str = Query("wav", description="wav | mp3 | opus | aac | flac | pcm"),
    sample_rate: int = Query(..., ge=8000, le=192_000),
) -> Response:
    import numpy as np

    from cosyserve.audio.encode import MEDIA_TYPES, encode_all

    fmt = format.lower()
    if fmt not in _ENCODE_FORMATS:
        raise InvalidRequestError(f"format must be one of {', '.join(_ENCODE_FORMATS)}, got {format!r}")
    body = await request.body()  # size-limited by the request middleware
    if len(body) < 2:
        raise InvalidRequestError("the body is empty: send the PCM samples (s16le mono)")
    samples = np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    data = await to_thread.run_sync(encode_all, samples, sample_rate, fmt)
    return Response(data, media_type=MEDIA_TYPES[fmt], headers={"Cache-Control": "no-store"})

"""What every router shares: the server state, request parsing, up-front validation, prompt
decoding and the two ways of answering with audio (streamed as made, or one file with timing
headers). The routers stay thin: parse → validate → :func:`stream_audio` / :func:`file_audio`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from cosyserve.api import AudioChunk, PromptAudio, SynthesisRequest, VoiceInfo
from cosyserve.engine.loop import EngineLoop, RequestHandle
from cosyserve.errors import (
    CancelledError,
    CosyserveError,
    EngineStoppedError,
    InvalidRequestError,
    UnknownVoiceError,
)
from cosyserve.interfaces import Backend
from cosyserve.server.metrics import ServerMetrics
from cosyserve.server.schemas import (
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    describe_validation_error,
    error_body,
)
from cosyserve.settings import Settings
from cosyserve.text.sanitize import clean_text

if TYPE_CHECKING:
    from cosyserve.audio.sandbox import DecodeSandbox

logger = logging.getLogger(__name__)

# Upstream's speech tokenizer refuses prompts over 30 s; say so before queueing.
MAX_PROMPT_S = 30.0
# Formats whose encoding is pure numpy (cheap enough to run on the event loop).
_INLINE_FORMATS = {"pcm", "wav"}
_JSON_TYPES = ("application/json",)
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class StreamAbortedError(Exception):
    """A stream failed after its head was sent: the connection is dropped, never completed, so
    the client cannot mistake a truncated body for a whole one."""


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


@dataclass
class ServerState:
    settings: Settings
    backend: Backend
    engine: EngineLoop
    metrics: ServerMetrics
    launch_report: dict[str, Any] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    health: HealthChecker | None = None
    instance_id: str = ""  # X-Cosyserve-Instance: which server process answered
    decoder: DecodeSandbox | None = None  # None: uploads are decoded in this process
    requests: InFlight = field(default_factory=lambda: InFlight())
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once it runs

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def begin_shutdown(self) -> None:
        """The server was told to stop (SIGTERM): take no new synthesis from now on, and cut
        what still runs ``shutdown_timeout_s`` later, cleanly (see :class:`InFlight`). Safe to
        call from a signal handler or another thread; only the first call counts."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return

        def start() -> None:
            if self.requests.draining:
                return
            self.requests.drain()
            timeout = self.settings.shutdown_timeout_s
            logger.info(
                "shutting down: %d streams and %d requests in flight get %g s to finish",
                self.requests.streams,
                self.requests.waiting,
                timeout,
            )
            loop.call_later(timeout, self._cut)

        loop.call_soon_threadsafe(start)

    def _cut(self) -> None:
        running = self.requests.cut()
        if running:
            logger.warning(
                "shutdown deadline (%g s): ending the %d requests still running",
                self.settings.shutdown_timeout_s,
                running,
            )


def get_state(request: Request) -> ServerState:
    return request.app.state.cosyserve


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass
class Upload:
    field: str
    filename: str | None
    content_type: str | None
    data: bytes


async def read_fields(request: Request, settings: Settings) -> tuple[dict[str, Any], dict[str, Upload]]:
    """Form fields (multipart or urlencoded), a JSON object, or query parameters, alike.
    Body fields win over query parameters; uploads are read into memory (size-checked)."""
    fields: dict[str, Any] = dict(request.query_params)
    uploads: dict[str, Upload] = {}
    ctype = content_type(request)
    if is_json(request):
        fields.update(parse_json_object(await request.body()))
    elif ctype in _FORM_TYPES:
        try:
            form = await request.form(max_files=4, max_fields=64, max_part_size=1024 * 1024)
        except MultiPartException as exc:
            raise InvalidRequestError(f"cannot read the form: {exc.message}") from exc
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if value.size is not None and value.size > settings.max_upload_bytes:
                        raise _too_large(key, value.size, settings)
                    data = await value.read()
                    if len(data) > settings.max_upload_bytes:
                        raise _too_large(key, len(data), settings)
                    uploads[key] = Upload(key, value.filename, value.content_type, data)
                else:
                    fields[key] = value
        finally:
            await form.close()
    elif ctype and await request.body():
        raise UnsupportedMediaTypeError(
            f"cannot read a {ctype} body: send multipart/form-data, "
            "application/x-www-form-urlencoded or application/json"
        )
    return fields, uploads


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object of fields; every way it is not is a 400."""
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"the body is not valid UTF-8 (byte {exc.start}): send JSON encoded as UTF-8"
        ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:  # the C parser recurses per level: 100,000 '[' end up here
        raise InvalidRequestError("the JSON body nests too deeply to be request fields") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("the JSON body must be an object of fields")
    return data


async def read_json_body(request: Request, limit: int, example: str) -> dict[str, Any]:
    """A JSON-object body read as it arrives: 415 (saying what to send, with ``example``) for
    another content type, 413 as soon as it passes ``limit`` bytes, 400 when it is not JSON."""
    ctype = content_type(request)
    if ctype not in _JSON_TYPES and not ctype.endswith("+json"):
        shown = ctype or "no Content-Type"
        raise UnsupportedMediaTypeError(
            f"cannot read a body with {shown}: send JSON with 'Content-Type: application/json', e.g. {example}"
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the body is {int(declared)} bytes; the limit for this route is {limit}")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise PayloadTooLargeError(f"the body is over {limit} bytes, the limit for this route")
    return parse_json_object(bytes(body))


def _too_large(name: str, size: int, settings: Settings) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"{name} is {size / 2**20:.1f} MiB; the limit is {settings.max_upload_mb:g} MiB "
        "(COSYSERVE_MAX_UPLOAD_MB): send a shorter recording"
    )


def is_json(request: Request) -> bool:
    ctype = content_type(request)
    return ctype in _JSON_TYPES or ctype.endswith("+json")


def parse_model(model: type[BaseModel], fields: dict[str, Any], *, strict: bool = False) -> Any:
    """Validate fields into ``model``; a failure is a 400 that names each bad field.

    ``strict`` for JSON bodies: their values carry types, so ``"seed": false``, ``"stream":
    "yes"`` or a null where the schema has none are refused, as the schema says. Form and query
    values are all text: they are converted (``"1.5"``, ``"true"``) and an empty one is absent."""
    if strict:
        cleaned = fields
    else:
        cleaned = {k: v for k, v in fields.items() if v is not None and (v != "" or k == "tts_text")}
    try:
        return model.model_validate(cleaned, strict=strict)
    except ValidationError as exc:
        message, _ = describe_validation_error(exc)
        raise InvalidRequestError(message) from exc


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_synthesis(state: ServerState, request: SynthesisRequest) -> None:
    """Everything that can be checked before queueing: a mistake is a 4xx at once."""
    limit = state.settings.max_text_chars
    request.text = clean_text(request.text, "text")
    if len(request.text) > limit:
        raise InvalidRequestError(
            f"text has {len(request.text)} characters; this server accepts at most {limit} "
            "(COSYSERVE_MAX_TEXT_CHARS): split it into several requests"
        )
    # The instruction and the prompt's transcript are normalised whole: bound them alike.
    if request.instruct is not None:
        request.instruct = _bounded(clean_text(request.instruct, "instruct_text"), "instruct_text", limit)
    if request.prompt is not None and request.prompt.text is not None:
        request.prompt.text = _bounded(clean_text(request.prompt.text, "prompt_text"), "prompt_text", limit)
    state.backend.check_request(request)
    if request.voice and request.prompt is None:
        request.voice = resolve_voice_id(state.backend, request.voice)


def _bounded(text: str, name: str, limit: int) -> str:
    if len(text) > limit:
        raise InvalidRequestError(f"{name} has {len(text)} characters; this server accepts at most {limit}")
    return text


def instruction_mode(backend: Backend, instructions: str | None) -> tuple[str, str | None]:
    """(mode, instruct) for a named voice with optional style instructions (OpenAI's
    ``instructions``): the model's instruct mode (CosyVoice v1 ``instruct``, CosyVoice2/3
    ``instruct2``) when it has one; otherwise the instructions are ignored, as OpenAI's tts-1 does."""
    text = (instructions or "").strip()
    if text:
        for mode in ("instruct", "instruct2"):
            if mode in backend.modes:
                return mode, text
    return "sft", None


def ensure_mode(backend: Backend, mode: str) -> None:
    """Refuse a mode the loaded model lacks before reading any upload."""
    backend.require_mode(mode)


def resolve_voice_id(backend: Backend, voice: str) -> str:
    """The backend's id for ``voice``, or :class:`UnknownVoiceError` listing what exists."""
    resolver: Callable[[str], str] | None = getattr(backend, "resolve_voice", None)
    if resolver is not None:
        return resolver(voice)
    voices = backend.voices()
    ids = [v.id for v in voices]
    if voice in ids:
        return voice
    folded = {v.casefold(): v for v in ids}
    if voice.casefold() in folded:
        return folded[voice.casefold()]
    raise UnknownVoiceError(f"unknown voice {voice!r}; available: {_list(ids)} (GET /v1/voices lists them)")


def _list(ids: list[str], limit: int = 20) -> str:
    if not ids:
        return "none"
    shown = ", ".join(ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def model_summary(backend: Backend) -> dict[str, Any]:
    """What the voice listings say about the loaded model: its family, modes and sample rate."""
    return {"family": backend.family, "modes": sorted(backend.modes), "sample_rate": backend.sample_rate}


def voice_out(voice: VoiceInfo) -> dict[str, Any]:
    return {
        "id": voice.id,
        "name": voice.id,
        "kind": voice.kind,
        "language": voice.language,
        "description": voice.description,
        "object": "audio.voice",
    }


async def read_prompt(
    state: ServerState,
    upload: Upload | None,
    encoded: Any,
    text: str | None,
    *,
    field_name: str = "prompt_wav",
) -> PromptAudio:
    """Decode a prompt recording (a file field, or base64 in JSON) before anything is queued,
    in the decoder processes when the server has them (:mod:`cosyserve.audio.sandbox`)."""
    settings = state.settings
    if upload is not None:
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        if ctype.startswith("text/") or ctype in ("application/json", "application/xml"):
            raise UnsupportedMediaTypeError(
                f"{field_name} must be an audio file (wav, flac, mp3, ogg, m4a, ...), got {ctype}"
            )
        data = upload.data
    elif isinstance(encoded, str) and encoded.strip():
        payload = encoded.strip()
        if payload.startswith("data:"):
            payload = payload.partition(",")[2]
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(
                f"{field_name} in a JSON body must be base64-encoded audio (or upload it as a form file)"
            ) from exc
    else:
        raise InvalidRequestError(f"{field_name} is required: upload the prompt recording as a file field")
    if len(data) > settings.max_upload_bytes:
        raise _too_large(field_name, len(data), settings)
    if state.decoder is not None:
        audio, sample_rate = await to_thread.run_sync(state.decoder.decode, data, MAX_PROMPT_S)
    else:
        from cosyserve.audio.io import decode_audio  # PyAV: imported when a prompt arrives

        audio, sample_rate = await to_thread.run_sync(lambda: decode_audio(data, None, MAX_PROMPT_S))
    if len(audio) < 0.1 * sample_rate:
        raise InvalidRequestError(
            f"{field_name} is shorter than 0.1 s: record at least a few seconds of speech"
        )
    return PromptAudio(audio=audio, sample_rate=sample_rate, text=text)


# --------------------------------------------------------------------------------------------
# Requests in flight, and how a graceful shutdown ends them
# --------------------------------------------------------------------------------------------

_CUT = object()  # what an awaited step returns when the shutdown deadline came first


class InFlight:
    """The synthesis requests being answered, so that a graceful shutdown ends them cleanly.

    After :meth:`drain` no new synthesis is taken (503). :meth:`cut` (the shutdown deadline)
    cancels what still runs: a stream ends with its encoder's final frame and a complete body
    (SSE: an error event first), a request still waiting for its head answers 503. The counts
    say how many were cut, for the shutdown log.
    """

    def __init__(self) -> None:
        self.draining = False
        self.streams = 0  # open streamed responses
        self.waiting = 0  # requests whose response head is not out yet
        self.cut_streams = 0
        self.cut_waiting = 0
        self._handles: set[RequestHandle] = set()
        self._cut: asyncio.Event | None = None

    @property
    def cutting(self) -> bool:
        return self._cut is not None and self._cut.is_set()

    def cut_event(self) -> asyncio.Event:
        if self._cut is None:
            self._cut = asyncio.Event()
        return self._cut

    def drain(self) -> None:
        self.draining = True

    def cut(self) -> int:
        """End everything still in flight now; returns how many requests that touches."""
        self.draining = True
        self.cut_event().set()
        handles, self._handles = list(self._handles), set()
        for handle in handles:
            handle.cancel()
        return len(handles)

    def add(self, handle: RequestHandle) -> None:
        self._handles.add(handle)

    def discard(self, handle: RequestHandle) -> None:
        self._handles.discard(handle)


async def until_cut(awaitable: Any, requests: InFlight) -> Any:
    """The result of ``awaitable``, or :data:`_CUT` when the shutdown deadline comes first."""
    cut = requests.cut_event()
    task = asyncio.ensure_future(awaitable)
    if cut.is_set():
        task.cancel()
        return _CUT
    waiter = asyncio.ensure_future(cut.wait())
    try:
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return _CUT


def _shutting_down() -> EngineStoppedError:
    return EngineStoppedError("the server is shutting down; retry in a moment (or on another instance)")


# --------------------------------------------------------------------------------------------
# Answering with audio
# --------------------------------------------------------------------------------------------


class DisconnectWatcher:
    """Cancels the request when the client goes away while we wait for the engine.

    Reads ASGI ``receive`` after the body has been consumed: the next message a server sends is
    ``http.disconnect`` (client gone, or our response complete: cancelling then is a no-op)."""

    def __init__(self, request: Request, handle: RequestHandle):
        self._handle = handle
        self._receive = request.receive
        self._task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            while True:
                message = await self._receive()
                if message.get("type") == "http.disconnect":
                    self._handle.cancel()
                    return
        except Exception:  # noqa: BLE001 - a server without disconnect events: nothing to watch
            return

    def stop(self) -> None:
        self._task.cancel()


async def _encode(encoder: Any, audio: Any, fmt: str) -> bytes:
    if fmt in _INLINE_FORMATS:
        return encoder.encode(audio)
    return await to_thread.run_sync(encoder.encode, audio)


def timing_headers(handle: RequestHandle, sample_rate: int) -> dict[str, str]:
    audio = handle.audio_seconds
    total = handle.total_seconds
    return {
        "X-Request-Id": handle.id,
        "X-Processing-Time": f"{total:.3f}",
        "X-Audio-Duration": f"{audio:.3f}",
        "X-RTF": f"{total / audio:.4f}" if audio > 0 else "inf",
        "X-Sample-Rate": str(sample_rate),
    }


def _log_done(handle: RequestHandle, what: str, ok: bool) -> None:
    first = handle.first_chunk_seconds
    # A stream abandoned by its client is logged before the engine has processed the cancel.
    outcome = "done" if ok else handle.state.value if handle.state.finished else "cancelled"
    logger.info(
        "%s %s %s: first chunk %s, %.2f s audio in %.2f s (RTF %.3f)",
        what,
        handle.id,
        outcome,
        f"{first:.3f} s" if first is not None else "-",
        handle.audio_seconds,
        handle.total_seconds,
        handle.rtf if handle.audio_seconds else float("nan"),
    )


def submit(state: ServerState, request: Request, synthesis: SynthesisRequest) -> RequestHandle:
    if state.requests.draining:
        raise _shutting_down()
    handle = state.engine.submit(synthesis, request_id=request_id(request))
    state.requests.add(handle)
    return handle


async def file_audio(
    state: ServerState, request: Request, synthesis: SynthesisRequest, fmt: str, *, what: str = "synthesis"
) -> Response:
    """Synthesise everything, then answer one encoded file with exact headers and timings."""
    from cosyserve.audio.encode import MEDIA_TYPES, encode_all

    inflight = state.requests
    handle = submit(state, request, synthesis)
    watcher = DisconnectWatcher(request, handle)
    inflight.waiting += 1
    try:
        result = await until_cut(handle.collect(), inflight)
    except CancelledError:
        if inflight.cutting:
            inflight.cut_waiting += 1
            raise _shutting_down() from None
        raise
    except BaseException:
        handle.cancel()
        raise
    finally:
        inflight.waiting -= 1
        inflight.discard(handle)
        watcher.stop()
    if result is _CUT:
        handle.cancel()
        inflight.cut_waiting += 1
        raise _shutting_down()
    audio, sample_rate = result
    body = await to_thread.run_sync(encode_all, audio, sample_rate, fmt)
    _log_done(handle, what, True)
    return Response(body, media_type=MEDIA_TYPES[fmt], headers=timing_headers(handle, sample_rate))


async def stream_audio(
    state: ServerState,
    request: Request,
    synthesis: SynthesisRequest,
    fmt: str,
    *,
    sse: bool = False,
    what: str = "stream",
) -> Response:
    """Stream audio as the engine makes it.

    The response head waits for the first chunk, so a request that fails before any audio
    (bad prompt, backend error) still gets a proper JSON error and status.
    """
    from cosyserve.audio.encode import MEDIA_TYPES, make_encoder

    inflight = state.requests
    handle = submit(state, request, synthesis)
    watcher = DisconnectWatcher(request, handle)
    inflight.waiting += 1
    try:
        first: AudioChunk | None | object = await until_cut(anext(handle, None), inflight)
        if first is _CUT:
            inflight.cut_waiting += 1
            raise _shutting_down()
    except BaseException as exc:
        watcher.stop()
        handle.cancel()
        inflight.discard(handle)
        if isinstance(exc, CancelledError) and inflight.cutting:
            inflight.cut_waiting += 1
            raise _shutting_down() from None
        raise
    finally:
        inflight.waiting -= 1
    assert first is None or isinstance(first, AudioChunk)  # noqa: S101 - narrowed for mypy
    sample_rate = first.sample_rate if first is not None else state.backend.sample_rate
    encoder = make_encoder(fmt, sample_rate)
    openai_style = request.url.path.startswith("/v1/")

    async def body() -> AsyncIterator[bytes]:
        ok = cut = False
        inflight.streams += 1
        try:
            chunk: Any = first
            while chunk is not None:
                data = await _encode(encoder, chunk.audio, fmt)
                if data:
                    yield _sse_delta(data) if sse else data
                chunk = await until_cut(anext(handle, None), inflight)
                if chunk is _CUT:
                    cut = True
                    break
            tail = await to_thread.run_sync(encoder.flush)
            if tail:
                yield _sse_delta(tail) if sse else tail
            ok = not cut
            if sse:
                yield _sse_done(handle) if ok else _sse_event(_shutdown_event(openai_style))
        except CancelledError:
            if not inflight.cutting:
                raise
            # The deadline cancelled it between two chunks: end the body as a cut would.
            cut = True
            tail = await to_thread.run_sync(encoder.flush)
            if tail:
                yield _sse_delta(tail) if sse else tail
            if sse:
                yield _sse_event(_shutdown_event(openai_style))
        except CosyserveError as exc:
            logger.warning("%s %s failed mid-stream: %s", what, handle.id, exc.message)
            if not sse:
                raise StreamAbortedError(exc.message) from exc
            # SSE has an in-band error event; the stream then ends cleanly.
            yield _sse_event(
                error_body(exc.status_code, exc.code, exc.message, openai_style=openai_style)
                | {"type": "error"}
            )
        finally:
            inflight.streams -= 1
            inflight.discard(handle)
            watcher.stop()
            if cut:
                inflight.cut_streams += 1
                logger.warning(
                    "%s %s cut by the shutdown deadline after %.2f s of audio",
                    what,
                    handle.id,
                    handle.audio_seconds,
                )
            if not ok:
                handle.cancel()
                encoder.close()
            _log_done(handle, what, ok)

    headers = {
        "X-Request-Id": handle.id,
        "X-Sample-Rate": str(getattr(encoder, "codec_rate", sample_rate)),
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
    }
    media_type = "text/event-stream" if sse else MEDIA_TYPES[fmt]
    return StreamingResponse(body(), media_type=media_type, headers=headers)


def _shutdown_event(openai_style: bool) -> dict[str, Any]:
    message = "the server is shutting down: the audio stops here"
    return error_body(503, "shutting_down", message, openai_style=openai_style) | {"type": "error"}


def _sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def _sse_delta(data: bytes) -> bytes:
    return _sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})


def _sse_done(handle: RequestHandle) -> bytes:
    info = handle.info
    input_tokens = len(handle.request.text)
    output_tokens = info.speech_tokens if info is not None else 0
    return _sse_event(
        {
            "type": "speech.audio.done",
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
    )


# --------------------------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------------------------


def probe_request(backend: Backend) -> SynthesisRequest | None:
    """The tiniest real synthesis this backend can do: with a built-in voice, else with what its
    warm-up uses (a saved voice or a generated prompt recording); None when it has neither."""
    voices = backend.voices()
    if "sft" in backend.modes and voices:
        builtin = [v for v in voices if v.kind != "saved"] or voices
        return SynthesisRequest(text="Hi.", voice=builtin[0].id, mode="sft")
    warmup = backend.warmup_request()
    if warmup.voice is None and warmup.prompt is None:
        return None
    return dataclasses.replace(warmup, text="Hi.")


class HealthChecker:
    """Runs a tiny synthesis through the engine (first chunk only) and caches the verdict for
    ``cache_s`` seconds; concurrent callers share one probe."""

    def __init__(self, engine: EngineLoop, backend: Backend, cache_s: float, timeout_s: float = 60.0):
        self.engine = engine
        self.backend = backend
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.probes = 0
        self._lock = asyncio.Lock()
        self._result: tuple[bool, dict[str, Any]] | None = None
        self._at = 0.0

    def _cached(self) -> tuple[bool, dict[str, Any]] | None:
        if self._result is not None and time.monotonic() - self._at < self.cache_s:
            ok, payload = self._result
            return ok, {**payload, "cached": True}
        return None

    async def check(self) -> tuple[bool, dict[str, Any]]:
        if not self.engine.accepting:
            return False, {"status": "shutting_down", "backend": self.backend.name}
        cached = self._cached()
        if cached is not None:
            return cached
        async with self._lock:
            cached = self._cached()
            if cached is not None:
                return cached
            ok, payload = await self._probe()
            self._result, self._at = (ok, payload), time.monotonic()
            return ok, {**payload, "cached": False}

    async def _probe(self) -> tuple[bool, dict[str, Any]]:
        self.probes += 1
        started = time.perf_counter()
        base: dict[str, Any] = {
            "backend": self.backend.name,
            "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        request = probe_request(self.backend)
        if request is None:
            return True, {**base, "status": "ok", "probe": "skipped: the model has no built-in voice"}
        handle: RequestHandle | None = None
        try:
            handle = self.engine.submit(request, request_id=f"health-{self.probes}", priority=True)
            chunk = await asyncio.wait_for(anext(handle, None), self.timeout_s)
            if chunk is None:
                raise InvalidRequestError("the probe synthesis produced no audio")
        except EngineStoppedError:
            return False, {**base, "status": "shutting_down"}
        except asyncio.TimeoutError:
            return False, {**base, "status": "unhealthy", "error": f"no audio within {self.timeout_s:g} s"}
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            message = exc.message if isinstance(exc, CosyserveError) else f"{type(exc).__name__}: {exc}"
            logger.warning("health probe failed: %s", message)
            return False, {**base, "status": "unhealthy", "error": message}
        finally:
            if handle is not None:
                handle.cancel()  # one chunk proves the path; do not spend more
        return True, {**base, "status": "ok", "latency_s": round(time.perf_counter() - started, 4)}

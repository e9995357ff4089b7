"""The FastAPI application: wiring of settings, backend, engine loop, routers, middleware and
error handling. ``create_app(settings, backend=None, launch_report=None)`` is the one entry
point (``uvicorn --factory cosyserve.server.app:create_app`` works too)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cosyserve import __version__
from cosyserve.engine.loop import EngineLoop
from cosyserve.errors import CosyserveError, QueueFullError
from cosyserve.interfaces import Backend
from cosyserve.server.guard import BrowserGuard
from cosyserve.server.instance import INSTANCE_HEADER, InstanceHeaderMiddleware, default_instance_id
from cosyserve.server.metrics import ServerMetrics
from cosyserve.server.openapi import install_openapi
from cosyserve.server.routers import openai as openai_router
from cosyserve.server.routers import ops, realtime, seed, voices
from cosyserve.server.routers.common import HealthChecker, ServerState, StreamAbortedError
from cosyserve.server.schemas import (
    PayloadTooLargeError,
    UnauthorizedError,
    describe_validation_error,
    error_body,
)
from cosyserve.settings import LOCALHOST_ORIGIN_REGEX, Settings

logger = logging.getLogger(__name__)

# Reachable without the API key: liveness probes and the API docs.
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/redoc"})
EXPOSED_HEADERS = [
    "X-Request-Id",
    "X-Processing-Time",
    "X-Audio-Duration",
    "X-RTF",
    "X-Sample-Rate",
    "Retry-After",
    INSTANCE_HEADER,
]
_REQUEST_ID = re.compile(r"^[\w\-.:]{1,64}$")
# Text fields and base64 overhead on top of the largest accepted upload.
_BODY_SLACK_BYTES = 256 * 1024


def build_backend(settings: Settings) -> tuple[Backend, dict[str, Any]]:
    """The backend the settings ask for (the launcher picks the plan and falls back); without a
    model directory, the embedded default voice."""
    from cosyserve.acceleration.launcher import create_backend

    return create_backend(settings)


def _is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def _json_error(
    status: int,
    code: str,
    message: str,
    path: str,
    *,
    param: str | None = None,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = error_body(
        status, code, message, openai_style=_is_openai_path(path), param=param, request_id=request_id
    )
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Middleware (pure ASGI: they must not buffer streamed bodies)
# --------------------------------------------------------------------------------------------


class RequestContextMiddleware:
    """Request id, body-size limit, HTTP metrics, and the last line of defence: an unexpected
    exception becomes a 500 JSON with the request id (logged with its traceback)."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics, max_body_bytes: int, routes: Any):
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.routes = routes

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is None:  # rejected before routing (auth, size): match it ourselves
            for candidate in self.routes:
                match, _ = candidate.matches(scope)
                if match is Match.FULL:
                    route = candidate
                    break
        return getattr(route, "path", None) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        started = time.perf_counter()
        status: int | None = None
        head_at: float | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status, head_at
            if message["type"] == "http.response.start":
                status = int(message["status"])
                head_at = time.perf_counter()
                response_headers = MutableHeaders(scope=message)
                if "x-request-id" not in response_headers:
                    response_headers.append("X-Request-Id", rid)
            await send(message)

        limit = self.max_body_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(
                        f"the request body is over {limit / 2**20:.1f} MiB; send a shorter recording"
                    )
            return message

        try:
            declared = headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                response = _json_error(
                    413,
                    PayloadTooLargeError.code,
                    f"the request body is {int(declared) / 2**20:.1f} MiB; the limit is "
                    f"{limit / 2**20:.1f} MiB (COSYSERVE_MAX_UPLOAD_MB)",
                    path,
                )
                await response(scope, receive, send_with_id)
                return
            await self.app(scope, limited_receive, send_with_id)
        except StreamAbortedError:
            # The head is out; returning without finishing makes the server drop the connection.
            if status is None:
                raise
        except Exception:
            if status is not None:
                raise  # mid-stream: nothing better to do than drop the connection
            logger.exception("unhandled error in request %s (%s %s)", rid, scope.get("method"), path)
            response = _json_error(
                500, "internal_error", f"internal server error (request id {rid})", path, request_id=rid
            )
            await response(scope, receive, send_with_id)
        finally:
            seconds = (head_at - started) if head_at is not None else None
            self.metrics.observe_http(self._endpoint(scope), scope.get("method", ""), status or 500, seconds)


class APIKeyMiddleware:
    """``Authorization: Bearer <key>`` on everything but the open paths (probes, docs, the
    playground's static page)."""

    def __init__(self, app: ASGIApp, *, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.key = api_key.encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key):
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send 'Authorization: Bearer <key>'"
            if not header
            else "invalid API key: send 'Authorization: Bearer <key>' with the server's COSYSERVE_API_KEY"
        )
        response = _json_error(
            401,
            UnauthorizedError.code,
            message,
            scope.get("path", ""),
            headers={"WWW-Authenticate": 'Bearer realm="cosyserve"'},
        )
        await response(scope, receive, send)


# --------------------------------------------------------------------------------------------
# Error handlers
# --------------------------------------------------------------------------------------------


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _cosyserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CosyserveError)  # noqa: S101
    status = exc.status_code
    headers: dict[str, str] = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif status == 503:
        headers["Retry-After"] = "5"
    if status == 503:  # expected while shutting down or when a resource is unavailable
        logger.info("request %s: %s: %s", _request_id(request), exc.code, exc.message)
    elif status >= 500:
        logger.error("request %s: %s: %s", _request_id(request), exc.code, exc.message)
    return _json_error(
        status,
        exc.code,
        exc.message,
        request.url.path,
        param=getattr(exc, "param", None),
        request_id=_request_id(request) if status >= 500 else None,
        headers=headers,
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    message, param = describe_validation_error(exc)
    return _json_error(400, "invalid_request", message, request.url.path, param=param)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101
    status = exc.status_code
    if status == 404:
        code, message = "not_found", f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    elif status == 405:
        code, message = (
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path} (see /docs)",
        )
    else:
        code, message = "http_error", str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if status == 405:
        # Starlette names the methods of the first route that matched the path; a path served
        # by several routes (GET and POST /inference_sft) allows all of theirs.
        methods = {m.strip() for m in headers.get("Allow", "").split(",") if m.strip()}
        headers["Allow"] = ", ".join(
            sorted(methods | _allowed_methods(request.app.router.routes, request.scope))
        )
    return _json_error(status, code, message, request.url.path, headers=headers or None)


def _allowed_methods(routes: Any, scope: Scope) -> set[str]:
    """The methods of every route whose path matches ``scope`` (included routers searched too)."""
    methods: set[str] = set()
    for route in routes:
        nested = getattr(getattr(route, "original_router", None), "routes", None)
        if nested is None and not hasattr(route, "methods"):
            nested = getattr(route, "routes", None)
        if nested is not None:
            methods |= _allowed_methods(nested, scope)
            continue
        try:
            match, _ = route.matches(scope)
        except Exception:  # noqa: BLE001 - a route type that cannot match this scope
            continue
        if match is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return methods


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def _engine_policy(backend: Backend, settings: Settings, metrics: ServerMetrics) -> Any:
    """Continuous batching for backends that declare it, round-robin (None) for the others; the
    batching module (and torch) is imported only when it is used."""
    if not backend.batchable or not settings.batching:
        return None
    from cosyserve.engine.batching import make_policy
    from cosyserve.server.metrics import register_prometheus

    policy = make_policy(backend, settings)
    register_prometheus(policy, metrics.registry)
    return policy


def create_app(
    settings: Settings | None = None,
    backend: Backend | None = None,
    launch_report: dict[str, Any] | None = None,
) -> FastAPI:
    settings = settings or Settings()
    if backend is None:
        backend, built_report = build_backend(settings)
        launch_report = launch_report if launch_report is not None else built_report
    metrics = ServerMetrics()
    policy = _engine_policy(backend, settings, metrics)
    engine = EngineLoop.from_settings(backend, settings, observer=metrics, policy=policy)
    metrics.bind_engine(engine)
    state = ServerState(
        settings=settings,
        backend=backend,
        engine=engine,
        metrics=metrics,
        launch_report=dict(launch_report or {}),
        instance_id=settings.instance_id or default_instance_id(),
    )
    state.health = HealthChecker(engine, backend, settings.health_cache_s)
    metrics.bind_streams(lambda: state.requests.streams)
    if settings.decode_workers > 0:
        # Workers start with the first upload and stay: a server that never gets one never pays.
        from cosyserve.audio.sandbox import DecodeSandbox

        state.decoder = DecodeSandbox(settings.decode_workers, settings.decode_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        engine.start()
        logger.info(
            "engine ready: backend %s, %d slots, queue %d", backend.name, engine.max_active, engine.max_queue
        )
        try:
            yield
        finally:
            finished = await engine.shutdown(settings.shutdown_timeout_s)
            if state.decoder is not None:
                state.decoder.close()
            requests = state.requests
            if requests.cut_streams or requests.cut_waiting:
                logger.warning(
                    "engine stopped: %d streams and %d requests waiting for audio were cut at the "
                    "shutdown deadline (%g s)",
                    requests.cut_streams,
                    requests.cut_waiting,
                    settings.shutdown_timeout_s,
                )
            else:
                logger.info("engine stopped (%s)", "all requests finished" if finished else "some cancelled")

    app = FastAPI(
        title="cosyserve",
        version=__version__,
        description="Fast CosyVoice text-to-speech server: CosyVoice API, OpenAI-compatible API, saved voices.",
        lifespan=lifespan,
    )
    app.state.cosyserve = state
    open_paths = set(OPEN_PATHS)
    playground = _playground_router()
    if playground is not None:  # the web page owns "/"
        app.include_router(playground.router)
        open_paths |= set(playground.PUBLIC_PATHS)
    else:
        app.include_router(ops.index_router)
    for module in (seed, openai_router, realtime, voices, ops):
        app.include_router(module.router)

    app.add_exception_handler(CosyserveError, _cosyserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    # add_middleware puts each one outside the previous: the order is inner → outer.
    if settings.api_key is not None:
        app.add_middleware(
            APIKeyMiddleware, api_key=settings.api_key.get_secret_value(), open_paths=frozenset(open_paths)
        )
    else:  # a cross-site page cannot send the key; without one, browsers must be told apart
        app.add_middleware(
            BrowserGuard,
            allowed_origins=settings.cors_origins,
            allowed_hosts=settings.allowed_hosts,
            localhost_origin_regex=LOCALHOST_ORIGIN_REGEX,
        )
    install_openapi(
        app,
        settings,
        bearer=settings.api_key is not None,
        open_paths=frozenset(open_paths),
        examples=lambda: ([v.id for v in backend.voices()], openai_router.model_ids(backend)),
    )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=int(settings.max_upload_bytes * 4 / 3) + _BODY_SLACK_BYTES,
        routes=app.router.routes,
    )
    origins = list(settings.cors_origins)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if "*" in origins else origins,
        allow_origin_regex=LOCALHOST_ORIGIN_REGEX,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=EXPOSED_HEADERS,
    )
    app.add_middleware(InstanceHeaderMiddleware, instance_id=state.instance_id)
    return app


def _playground_router() -> Any:
    """The web playground router, when this build has it."""
    try:
        from cosyserve.server.routers import playground
    except ImportError:
        return None
    return playground

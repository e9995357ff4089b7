"""A real uvicorn server in a background thread on 127.0.0.1:<free port>.

``port=0`` lets the kernel pick a free port atomically (no probe-then-bind race); the real port
is read back from the bound socket. Used as a context manager it always stops the server.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Any

import uvicorn
from fastapi import FastAPI


class LiveServer:
    def __init__(self, app: FastAPI, *, start_timeout_s: float = 30.0, **config: Any):
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="live-uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"uvicorn did not start within {self.start_timeout_s:g} s")
            time.sleep(0.02)
        return self

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():  # a stuck stream: stop waiting for it
            self.server.force_exit = True
            self.thread.join(5.0)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def embedded_app(**settings: Any) -> FastAPI:
    """The real app on the embedded default voice, with settings that ignore the developer's
    ``COSYSERVE_*`` environment, and the playground mounted."""
    from cosyserve.families.piper.backend import EmbeddedBackend
    from cosyserve.server.app import create_app
    from cosyserve.settings import Settings

    base: dict[str, Any] = {"api_key": None, "cors_origins": [], "model_dir": None}
    app = create_app(
        Settings(**{**base, **settings}),
        backend=EmbeddedBackend(),
        launch_report={"plan": "embedded", "fallbacks": []},
    )
    ensure_playground(app)
    return app


def ensure_playground(app: FastAPI) -> None:
    """Mount the playground router unless create_app already does."""
    from cosyserve.server.routers import playground

    paths = {getattr(route, "path", None) for route in app.router.routes}
    if "/static/{name}" not in paths:
        app.include_router(playground.router)

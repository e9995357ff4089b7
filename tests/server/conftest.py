"""Fixtures for the server tests: apps on a FakeBackend, an in-process TestClient, a real
uvicorn on a free loopback port (for streaming, disconnects, shutdown and the openai client),
and a PyAV helper that measures the duration of any response body."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cosyserve.server.app import create_app
from cosyserve.settings import Settings
from tests.server.fakes import FakeBackend

# Settings that never read the developer's COSYSERVE_* environment.
_BASE = {"api_key": None, "cors_origins": [], "health_cache_s": 5.0}


def make_settings(**overrides: Any) -> Settings:
    return Settings(**{**_BASE, **overrides})


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app_factory(backend: FakeBackend) -> Callable[..., FastAPI]:
    def factory(
        backend_: FakeBackend | None = None, launch_report: dict | None = None, **overrides: Any
    ) -> FastAPI:
        return create_app(
            make_settings(**overrides), backend=backend_ or backend, launch_report=launch_report
        )

    return factory


@pytest.fixture
def client(app_factory: Callable[..., FastAPI]) -> Iterator[TestClient]:
    with TestClient(app_factory(), raise_server_exceptions=False) as test_client:
        yield test_client


class LiveServer:
    """uvicorn in a thread on 127.0.0.1:<free port>."""

    def __init__(self, app: FastAPI, **config: Any):
        self.config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **config)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self, timeout: float = 10) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


@pytest.fixture
def live_server() -> Iterator[Callable[..., LiveServer]]:
    servers: list[LiveServer] = []

    def start(app: FastAPI, **config: Any) -> LiveServer:
        server = LiveServer(app, **config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def audio_duration(data: bytes, fmt: str, sample_rate: int = FakeBackend.sample_rate) -> float:
    """Seconds of audio in a response body, decoded with PyAV (raw PCM: by size)."""
    if fmt in ("pcm", "stream"):
        assert len(data) % 2 == 0
        return len(data) / 2 / sample_rate
    import av

    samples = 0
    rate = 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        for frame in container.decode(stream):
            samples += frame.samples
            rate = frame.sample_rate
    assert rate > 0, f"no audio decoded from the {fmt} body"
    return samples / rate


def wav_bytes(seconds: float = 1.0, sample_rate: int = 16000) -> bytes:
    from cosyserve.audio.encode import encode_all

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return encode_all((0.2 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), sample_rate, "wav")

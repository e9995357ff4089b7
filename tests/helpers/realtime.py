"""A small client of ``WS /v1/audio/speech/stream-input`` for the tests (the ``websockets``
package, as a user's program would use it)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.exceptions import ConnectionClosed

PATH = "/v1/audio/speech/stream-input"


def ws_url(http_url: str, query: str = "") -> str:
    return http_url.replace("http://", "ws://") + PATH + (f"?{query}" if query else "")


@dataclass
class Received:
    """Everything a session sent: events in order, audio per utterance, the close code."""

    events: list[dict[str, Any]] = field(default_factory=list)
    audio: dict[str, bytearray] = field(default_factory=dict)
    first_audio_at: float | None = None
    close_code: int | None = None
    close_reason: str = ""
    _current: str | None = None

    def add(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            assert self._current is not None, "audio before utterance.started"
            self.audio[self._current] += message
            if self.first_audio_at is None and message:
                self.first_audio_at = time.perf_counter()
            return
        event = json.loads(message)
        self.events.append(event)
        if event["type"] == "utterance.started":
            self._current = event["utterance_id"]
            self.audio.setdefault(self._current, bytearray())

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    @property
    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


async def send(ws: Any, **message: Any) -> None:
    await ws.send(json.dumps(message))


async def receive_all(ws: Any, received: Received | None = None, timeout_s: float = 60.0) -> Received:
    """Read until the server closes the connection."""
    received = received or Received()

    async def read() -> None:
        try:
            async for message in ws:
                received.add(message)
        except ConnectionClosed:
            pass

    await asyncio.wait_for(read(), timeout_s)
    received.close_code = ws.close_code
    received.close_reason = ws.close_reason or ""
    return received


async def receive_until(ws: Any, received: Received, kind: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Read until an event of type ``kind`` arrives; return it."""

    async def read() -> dict[str, Any]:
        while True:
            message = await ws.recv()
            received.add(message)
            if isinstance(message, str) and received.events[-1]["type"] == kind:
                return received.events[-1]

    return await asyncio.wait_for(read(), timeout_s)


def connect(url: str, **kwargs: Any) -> Any:
    return websockets.connect(url, open_timeout=30, max_size=None, **kwargs)

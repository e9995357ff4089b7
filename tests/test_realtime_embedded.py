"""The realtime WebSocket on the embedded voice (real speech, real server): text streamed in word
by word gives about as much audio as the same text in one HTTP request, and its first sentence
plays before the text has ended."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.helpers.live_server import LiveServer, embedded_app
from tests.helpers.realtime import Received, connect, receive_all, send, ws_url

TEXT = (
    "Good morning! The weather today is mild, with a light breeze. "
    "In the afternoon, a short shower is likely. Enjoy your day."
)
VOICE = "en_US-joe-medium"
RATE = 22050


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(embedded_app()) as live:
        httpx.get(f"{live.url}/health", timeout=60).raise_for_status()  # warm the voice
        yield live


@pytest.mark.timeout(120)
def test_streamed_text_matches_one_request(server: LiveServer) -> None:
    pieces = re.findall(r"\s*\S+", TEXT)

    async def run() -> tuple[Received, int | None]:
        async with connect(ws_url(server.url)) as ws:
            received = Received()
            await send(ws, type="config", voice=VOICE)
            reader = asyncio.create_task(receive_all(ws, received))
            audio_after: int | None = None  # pieces sent when the first audio arrived
            for i, piece in enumerate(pieces):
                if audio_after is None and received.first_audio_at is not None:
                    audio_after = i
                await send(ws, type="text", text=piece)
                await asyncio.sleep(1 / 15)  # an LLM's pace
            await send(ws, type="close")
            await reader
            return received, audio_after

    received, sent_before_audio = asyncio.run(run())
    assert received.close_code == 1000
    assert sent_before_audio is not None, "no audio before the text ended"
    segments = [e["text"] for e in received.of_type("segment.done")]
    assert segments == [
        "Good morning!",
        "The weather today is mild, with a light breeze.",
        "In the afternoon, a short shower is likely.",
        "Enjoy your day.",
    ]
    streamed = np.frombuffer(bytes(received.audio["utt_1"]), "<i2")
    whole = httpx.post(
        f"{server.url}/v1/audio/speech",
        json={"input": TEXT, "voice": VOICE, "response_format": "pcm", "stream": False},
        timeout=60,
    )
    assert whole.status_code == 200
    # Piper's durations vary a little from run to run; the segments are the same sentences.
    assert len(streamed) / RATE == pytest.approx(len(whole.content) / 2 / RATE, rel=0.12)
    assert float(np.sqrt(np.mean((streamed / 32768.0) ** 2))) > 0.01

"""``cosyserve wyoming`` spoken to with the ``wyoming`` client library, as Home Assistant does:
``describe``, ``synthesize`` and the streaming events, on the embedded voice (the real command in
a subprocess) and on a tiny CosyVoice v1 model (in process)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

TEXT = "Hello from Home Assistant. The lights in the kitchen are now off."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Spoken:
    types: list[str] = field(default_factory=list)
    rate: int = 0
    pcm: bytearray = field(default_factory=bytearray)
    errors: list[Error] = field(default_factory=list)
    first_audio_at: float | None = None

    @property
    def audio(self) -> np.ndarray:
        return np.frombuffer(bytes(self.pcm), dtype="<i2").astype(np.float32) / 32768.0

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / self.rate if self.rate else 0.0


async def read_until(client: AsyncTcpClient, last: str, spoken: Spoken | None = None) -> Spoken:
    spoken = spoken or Spoken()
    while True:
        event = await asyncio.wait_for(client.read_event(), 120)
        assert event is not None, f"the server closed the connection after {spoken.types}"
        spoken.types.append(event.type)
        if AudioStart.is_type(event.type):
            start = AudioStart.from_event(event)
            assert (start.width, start.channels) == (2, 1)
            spoken.rate = start.rate
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            assert chunk.rate == spoken.rate, "audio-chunk before audio-start, or another rate"
            spoken.pcm += chunk.audio
            if spoken.first_audio_at is None:
                spoken.first_audio_at = time.perf_counter()
        elif Error.is_type(event.type):
            spoken.errors.append(Error.from_event(event))
        if event.type == last or (Error.is_type(event.type) and last != "error"):
            return spoken


async def describe(port: int) -> Info:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        event = await asyncio.wait_for(client.read_event(), 30)
        assert event is not None and Info.is_type(event.type)
        return Info.from_event(event)


async def synthesize(port: int, text: str, voice: str | None = None) -> Spoken:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(
            Synthesize(text=text, voice=SynthesizeVoice(name=voice) if voice else None).event()
        )
        return await read_until(client, AudioStop().event().type)


async def stream(
    port: int, text: str, voice: str | None = None, delay_s: float = 0.02
) -> tuple[Spoken, float]:
    """Home Assistant streaming an LLM's answer: start, word chunks, the whole text again (for
    servers without streaming), stop. Returns what came back and when the last chunk was sent."""
    words = text.split(" ")
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(
            SynthesizeStart(voice=SynthesizeVoice(name=voice) if voice else None).event()
        )
        spoken = Spoken()
        reader = asyncio.create_task(read_until(client, SynthesizeStopped().event().type, spoken))
        for i, word in enumerate(words):
            await client.write_event(SynthesizeChunk(text=word if i == 0 else " " + word).event())
            await asyncio.sleep(delay_s)
        last_text_at = time.perf_counter()
        await client.write_event(Synthesize(text=text).event())
        await client.write_event(SynthesizeStop().event())
        await reader
        return spoken, last_text_at


def assert_speech(spoken: Spoken, min_s: float, max_s: float) -> None:
    assert not spoken.errors, spoken.errors
    assert min_s < spoken.seconds < max_s, spoken.seconds
    rms = float(np.sqrt(np.mean(spoken.audio**2)))
    assert rms > 0.01, "silence"


# --------------------------------------------------------------------------------------------
# The embedded voice, through the real command
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_wyoming() -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "COSYSERVE_MODEL_DIR": ""}  # the developer's environment must not pick a model
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cosyserve.cli",
            "--log-level",
            "WARNING",
            "wyoming",
            "--uri",
            f"tcp://127.0.0.1:{port}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                asyncio.run(describe(port))
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(
                        f"cosyserve wyoming exited: {process.stderr.read().decode() if process.stderr else ''}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail("cosyserve wyoming did not answer within 90 s")
                time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.mark.timeout(180)
def test_describe_lists_the_embedded_voice(embedded_wyoming: int) -> None:
    info = asyncio.run(describe(embedded_wyoming))
    assert len(info.tts) == 1
    program = info.tts[0]
    assert program.supports_synthesize_streaming is True
    assert [(v.name, v.languages) for v in program.voices] == [("en_US-joe-medium", ["en_US"])]


@pytest.mark.timeout(180)
def test_synthesize_and_stream_on_the_embedded_voice(embedded_wyoming: int) -> None:
    whole = asyncio.run(synthesize(embedded_wyoming, TEXT))
    assert whole.types[0] == "audio-start" and whole.types[-1] == "audio-stop"
    assert set(whole.types[1:-1]) == {"audio-chunk"}
    assert whole.rate == 22050
    assert_speech(whole, 2.0, 8.0)

    streamed, last_text_at = asyncio.run(stream(embedded_wyoming, TEXT, voice="en_US-joe-medium"))
    assert streamed.types[0] == "audio-start" and streamed.types[-2:] == ["audio-stop", "synthesize-stopped"]
    assert_speech(streamed, 2.0, 8.0)
    # The compatibility `synthesize` inside the stream is not spoken a second time.
    assert streamed.seconds == pytest.approx(whole.seconds, rel=0.25)
    # The first sentence was spoken before the text stream ended.
    assert streamed.first_audio_at is not None and streamed.first_audio_at < last_text_at + 5.0


@pytest.mark.timeout(120)
def test_unknown_voice_is_an_error_event(embedded_wyoming: int) -> None:
    spoken = asyncio.run(synthesize(embedded_wyoming, "Hi.", voice="nobody"))
    assert spoken.types == ["error"]
    assert spoken.errors[0].code == "unknown_voice" and "nobody" in spoken.errors[0].text


# --------------------------------------------------------------------------------------------
# A CosyVoice model (tiny, random weights), in process
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_wyoming_on_a_cosyvoice_model(tiny_backend) -> None:
    from wyoming.server import AsyncServer

    from cosyserve.engine.batching import make_policy
    from cosyserve.engine.loop import EngineLoop
    from cosyserve.realtime.wyoming import WyomingService, handler_factory
    from cosyserve.settings import Settings

    backend = tiny_backend
    settings = Settings(model_dir=None, api_key=None, cors_origins=[], max_text_chars=400)
    engine = EngineLoop.from_settings(backend, settings, policy=make_policy(backend, settings))
    service = WyomingService(backend, engine, settings)
    port = free_port()

    async def run() -> tuple[Info, Spoken, Spoken]:
        server = AsyncServer.from_uri(f"tcp://127.0.0.1:{port}")
        engine.start()
        await server.start(handler_factory(service))
        try:
            info = await describe(port)
            whole = await synthesize(port, "Hello there. How are you?", voice="英文女")
            streamed, _ = await stream(port, "Hello there. How are you?", voice="英文女", delay_s=0.0)
            return info, whole, streamed
        finally:
            await server.stop()
            await engine.shutdown(5)

    info, whole, streamed = asyncio.run(run())
    voices = {v.name: v.languages for v in info.tts[0].voices}
    assert voices["英文女"] == ["en"] and voices["中文女"] == ["zh"] and voices["粤语女"] == ["yue"]
    assert len(voices) == len(backend.voices())
    for spoken in (whole, streamed):
        assert not spoken.errors, spoken.errors
        assert spoken.rate == backend.sample_rate and spoken.seconds > 0.1
    assert streamed.types[-1] == "synthesize-stopped"


@pytest.mark.timeout(300)
def test_wyoming_streams_the_text_into_a_cosyvoice2_model(tiny_v2_backend) -> None:
    """Home Assistant's streaming events on a model that reads text as it arrives: the words go
    into one request (no sentence segments), and it speaks."""
    from wyoming.server import AsyncServer

    from cosyserve.engine.batching import make_policy
    from cosyserve.engine.loop import EngineLoop
    from cosyserve.realtime.wyoming import WyomingService, handler_factory
    from cosyserve.settings import Settings

    backend = tiny_v2_backend
    settings = Settings(model_dir=None, api_key=None, cors_origins=[], max_text_chars=400)
    engine = EngineLoop.from_settings(backend, settings, policy=make_policy(backend, settings))
    service = WyomingService(backend, engine, settings)
    port = free_port()
    opened: list[str] = []
    submit = engine.submit

    def recording_submit(request, **kwargs):
        opened.append(type(request).__name__)
        return submit(request, **kwargs)

    engine.submit = recording_submit  # type: ignore[method-assign]

    async def run() -> Spoken:
        server = AsyncServer.from_uri(f"tcp://127.0.0.1:{port}")
        engine.start()
        await server.start(handler_factory(service))
        try:
            streamed, _ = await stream(port, "Hello there. How are you today?", voice="中文女", delay_s=0.0)
            return streamed
        finally:
            await server.stop()
            await engine.shutdown(5)

    streamed = asyncio.run(run())
    assert opened == ["TextStreamRequest"]
    assert not streamed.errors, streamed.errors
    assert streamed.rate == backend.sample_rate and streamed.seconds > 0.1
    assert streamed.types[-1] == "synthesize-stopped"

"""``WS /v1/audio/speech/stream-input`` driven by a real client (``websockets``) against uvicorn on
loopback, on the fake backend (a 0.3 s tone per sentence, so lengths are exact)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from cosyserve.api import AudioChunk, SynthesisInfo, SynthesisRequest
from cosyserve.interfaces import GeneratorJob, SynthesisJob
from cosyserve.realtime.textstream import TextStreamRequest
from cosyserve.server.app import create_app
from tests.helpers.live_server import LiveServer
from tests.helpers.realtime import Received, connect, receive_all, receive_until, send, ws_url
from tests.server.conftest import make_settings
from tests.server.fakes import FakeBackend

pytestmark = pytest.mark.timeout(60)
RATE = FakeBackend.sample_rate
SENTENCE_S = 0.3  # the fake backend's audio per sentence


def serve(backend: FakeBackend | None = None, **settings: Any) -> LiveServer:
    app = create_app(make_settings(**settings), backend=backend or FakeBackend())
    return LiveServer(app)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with serve() as live:
        yield live


def seconds(pcm: bytes, rate: int = RATE) -> float:
    return len(pcm) / 2 / rate


def decode(data: bytes) -> tuple[int, int]:
    """(samples, sample rate) of an encoded body, through PyAV."""
    import av

    samples, rate = 0, 0
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(container.streams.audio[0]):
            samples += frame.samples
            rate = frame.sample_rate
    return samples, rate


# --------------------------------------------------------------------------------------------
# Speaking
# --------------------------------------------------------------------------------------------


def test_text_in_pieces_audio_before_the_text_ends(server: LiveServer) -> None:
    async def run() -> tuple[Received, float, float]:
        async with connect(ws_url(server.url)) as ws:
            received = Received()
            await send(ws, type="config", voice="alice")
            started = await receive_until(ws, received, "session.started")
            assert started["sample_rate"] == RATE and started["response_format"] == "pcm"
            for piece in ["Hello", " there", ".", " How", " are"]:
                await send(ws, type="text", text=piece)
            # The first sentence is spoken while the second is still being written.
            done = await receive_until(ws, received, "segment.done")
            assert done["text"] == "Hello there." and done["audio_s"] == pytest.approx(SENTENCE_S)
            audio_before_end = seconds(received.audio["utt_1"])
            for piece in [" you", " today?", " Fine"]:
                await send(ws, type="text", text=piece)
            await send(ws, type="flush")  # "Fine" has no full stop: speak it now anyway
            flushed = await receive_until(ws, received, "segment.started")
            while flushed["text"] != "Fine":
                flushed = await receive_until(ws, received, "segment.started")
            await send(ws, type="close")
            await receive_all(ws, received)
            return received, audio_before_end, seconds(received.audio["utt_1"])

    received, before, total = asyncio.run(run())
    assert before == pytest.approx(SENTENCE_S)
    assert [e["text"] for e in received.of_type("segment.done")] == [
        "Hello there.",
        "How are you today?",
        "Fine",
    ]
    assert total == pytest.approx(3 * SENTENCE_S)
    assert received.types[0] == "session.started" and received.types[1] == "utterance.started"
    done = received.of_type("utterance.done")
    assert len(done) == 1 and done[0]["status"] == "done" and done[0]["segments"] == 3
    assert done[0]["audio_s"] == pytest.approx(total, abs=1e-3)
    assert done[0]["first_segment_audio_s"] is not None and done[0]["first_segment_audio_s"] >= 0
    assert received.close_code == 1000


def test_two_utterances_on_one_connection(server: LiveServer) -> None:
    async def run() -> Received:
        async with connect(ws_url(server.url)) as ws:
            await send(ws, type="config", voice="bob")
            for piece in ["One. ", "Two. ", "Three."]:
                await send(ws, type="text", text=piece, utterance_id="first")
            await send(ws, type="end")
            for piece in ["Four", ". Five", "."]:
                await send(ws, type="text", text=piece)
            await send(ws, type="close")
            return await receive_all(ws)

    received = asyncio.run(run())
    assert received.close_code == 1000
    starts = [e["utterance_id"] for e in received.of_type("utterance.started")]
    assert starts == ["first", "utt_2"]
    done = received.of_type("utterance.done")
    assert [(d["utterance_id"], d["status"], d["segments"]) for d in done] == [
        ("first", "done", 3),
        ("utt_2", "done", 2),
    ]
    # One after another: the second starts after the first is done.
    assert received.types.index("utterance.started", 2) > received.types.index("utterance.done")
    assert seconds(received.audio["first"]) == pytest.approx(3 * SENTENCE_S)
    assert seconds(received.audio["utt_2"]) == pytest.approx(2 * SENTENCE_S)


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_encoded_formats_decode_per_utterance(server: LiveServer, fmt: str) -> None:
    async def run() -> Received:
        async with connect(ws_url(server.url)) as ws:
            await send(ws, type="config", voice="alice", response_format=fmt)
            await send(ws, type="text", text="First sentence. Second one.")
            await send(ws, type="end")
            await send(ws, type="text", text="Another utterance.")
            await send(ws, type="close")
            return await receive_all(ws)

    received = asyncio.run(run())
    assert received.close_code == 1000
    for utterance, sentences in (("utt_1", 2), ("utt_2", 1)):
        samples, rate = decode(bytes(received.audio[utterance]))
        assert rate >= RATE
        expected = sentences * SENTENCE_S
        if fmt == "wav":
            assert samples / rate == pytest.approx(expected, abs=1e-3)
        else:  # a streamed MP3 has no gapless tag: the decoder keeps the encoder's padding
            assert expected <= samples / rate <= expected + 0.15, (fmt, utterance, samples / rate)


def test_sample_rate_and_speed(server: LiveServer) -> None:
    async def run() -> Received:
        async with connect(ws_url(server.url)) as ws:
            await send(ws, type="config", voice="alice", sample_rate=8000, speed=2.0)
            await send(ws, type="text", text="Fast and small.")
            await send(ws, type="close")
            return await receive_all(ws)

    received = asyncio.run(run())
    assert received.of_type("utterance.started")[0]["sample_rate"] == 8000
    assert seconds(received.audio["utt_1"], 8000) == pytest.approx(SENTENCE_S / 2, abs=0.01)


def test_cancel_stops_speaking_and_the_session_goes_on() -> None:
    backend = FakeBackend(chunks_per_segment=200, chunk_s=0.1, step_sleep_s=0.01)  # 20 s per sentence

    async def run(url: str) -> Received:
        async with connect(ws_url(url)) as ws:
            received = Received()
            await send(ws, type="config", voice="alice")
            await send(ws, type="text", text="A very long sentence. And another one.")
            await receive_until(ws, received, "segment.started")
            await ws.recv()  # some audio
            await send(ws, type="cancel")
            cancelled = await receive_until(ws, received, "utterance.done")
            assert cancelled["status"] == "cancelled"
            await send(ws, type="config", voice="bob")  # between utterances the voice may change
            await receive_until(ws, received, "session.updated")
            await send(ws, type="text", text="Hi.")
            await send(ws, type="close")
            return await receive_all(ws, received)

    with serve(backend) as live:
        started = time.perf_counter()
        received = asyncio.run(run(live.url))
        assert time.perf_counter() - started < 15  # not the 40 s the cancelled text would take
        assert received.close_code == 1000
        statuses = [(e["utterance_id"], e["status"]) for e in received.of_type("utterance.done")]
        assert statuses == [("utt_1", "cancelled"), ("utt_2", "done")]
        assert seconds(received.audio["utt_1"]) < 20
        assert backend.opened[-1].voice == "bob"


def test_disconnect_cancels_the_synthesis() -> None:
    backend = FakeBackend()

    async def run(url: str) -> None:
        async with connect(ws_url(url)) as ws:
            received = Received()
            await send(ws, type="config", voice="alice")
            await send(ws, type="text", text="[hang] This never ends. ")
            await receive_until(ws, received, "segment.started")
        # leaving the block closes the socket mid-synthesis

    with serve(backend) as live:
        asyncio.run(run(live.url))
        engine = live.server.config.app.state.cosyserve.engine
        deadline = time.monotonic() + 10
        while (engine.active_count or engine.counters.cancelled < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.active_count == 0 and engine.counters.cancelled == 1


def test_a_failing_utterance_reports_an_error_and_the_session_goes_on(server: LiveServer) -> None:
    async def run() -> Received:
        async with connect(ws_url(server.url)) as ws:
            await send(ws, type="config", voice="alice")
            await send(ws, type="text", text="[fail] Broken. Never spoken.")
            await send(ws, type="end")
            await send(ws, type="text", text="This works.")
            await send(ws, type="close")
            return await receive_all(ws)

    received = asyncio.run(run())
    errors = received.of_type("error")
    assert len(errors) == 1 and errors[0]["utterance_id"] == "utt_1"
    assert errors[0]["error"]["code"] == "synthesis_failed"
    statuses = [(e["utterance_id"], e["status"]) for e in received.of_type("utterance.done")]
    assert statuses == [("utt_1", "failed"), ("utt_2", "done")]
    assert received.close_code == 1000


# --------------------------------------------------------------------------------------------
# Limits and mistakes: an error event, then a close code
# --------------------------------------------------------------------------------------------


async def _expect_close(
    url: str, *messages: dict[str, Any], headers: dict[str, str] | None = None
) -> Received:
    async with connect(url, additional_headers=headers or {}) as ws:
        with contextlib.suppress(ConnectionClosed):  # the server may close before reading them all
            for message in messages:
                await send(ws, **message)
        return await receive_all(ws, timeout_s=20)


@pytest.mark.parametrize(
    ("config", "code", "error", "says"),
    [
        ({"voice": "nobody"}, 4404, "unknown_voice", "nobody"),
        ({"voice": "alice", "response_format": "exe"}, 4400, "invalid_request", "response_format"),
        ({"voice": "alice", "speed": 9}, 4400, "invalid_request", "speed"),
        ({"voice": "alice", "sample_rate": 1000}, 4400, "invalid_request", "sample_rate"),
        ({"voice": "alice", "segment_by": "word"}, 4400, "invalid_request", "segment_by"),
        ({"voice": "alice", "colour": "blue"}, 4400, "invalid_request", "colour"),
        ({"voice": "alice", "model": "whisper-1"}, 4404, "model_not_found", "model"),
    ],
)
def test_a_bad_config_gets_an_error_and_a_close_code(
    server: LiveServer, config: dict[str, Any], code: int, error: str, says: str
) -> None:
    received = asyncio.run(_expect_close(ws_url(server.url), {"type": "config", **config}))
    assert received.close_code == code
    assert received.types == ["error"]
    assert received.events[0]["error"]["code"] == error
    assert says in received.events[0]["error"]["message"]


def test_protocol_mistakes(server: LiveServer) -> None:
    first_not_config = asyncio.run(_expect_close(ws_url(server.url), {"type": "text", "text": "Hi."}))
    assert first_not_config.close_code == 4400 and "config" in first_not_config.events[0]["error"]["message"]
    unknown = asyncio.run(
        _expect_close(ws_url(server.url), {"type": "config", "voice": "alice"}, {"type": "speak"})
    )
    assert (
        unknown.close_code == 4400
        and "unknown message type 'speak'" in unknown.events[-1]["error"]["message"]
    )

    async def not_json() -> Received:
        async with connect(ws_url(server.url)) as ws:
            await send(ws, type="config", voice="alice")
            await ws.send("{not json")
            return await receive_all(ws)

    bad = asyncio.run(not_json())
    assert bad.close_code == 4400 and "not valid JSON" in bad.events[-1]["error"]["message"]


def test_text_limit_per_utterance() -> None:
    with serve(max_text_chars=40) as live:
        received = asyncio.run(
            _expect_close(
                ws_url(live.url),
                {"type": "config", "voice": "alice"},
                {"type": "text", "text": "Twenty characters.. "},
                {"type": "text", "text": "Twenty-one characters."},
            )
        )
    assert received.close_code == 4413
    assert received.events[-1]["error"]["code"] == "text_too_long"
    assert "at most 40" in received.events[-1]["error"]["message"]


def test_idle_connections_are_closed() -> None:
    with serve(realtime_idle_timeout_s=0.5) as live:
        no_config = asyncio.run(_expect_close(ws_url(live.url)))
        idle = asyncio.run(_expect_close(ws_url(live.url), {"type": "config", "voice": "alice"}))
        # An utterance left open (text without its end, nothing left to speak) is idle too.
        quiet = asyncio.run(
            _expect_close(
                ws_url(live.url), {"type": "config", "voice": "alice"}, {"type": "text", "text": "Half a"}
            )
        )
    assert no_config.close_code == 4408 and no_config.events[-1]["error"]["code"] == "idle_timeout"
    assert idle.close_code == 4408 and idle.types == ["session.started", "error"]
    assert quiet.close_code == 4408 and quiet.types == ["session.started", "utterance.started", "error"]


def test_api_key_as_query_parameter_header_or_first_message() -> None:
    config = {"type": "config", "voice": "alice"}
    speak = [{"type": "text", "text": "Hi."}, {"type": "close"}]
    with serve(api_key="sesame") as live:
        missing = asyncio.run(_expect_close(ws_url(live.url), config))
        wrong = asyncio.run(_expect_close(ws_url(live.url, "api_key=nope")))
        by_query = asyncio.run(_expect_close(ws_url(live.url, "api_key=sesame"), config, *speak))
        by_header = asyncio.run(
            _expect_close(ws_url(live.url), config, *speak, headers={"Authorization": "Bearer sesame"})
        )
        by_message = asyncio.run(_expect_close(ws_url(live.url), {**config, "api_key": "sesame"}, *speak))
    assert missing.close_code == 4401 and "missing API key" in missing.events[-1]["error"]["message"]
    assert wrong.close_code == 4401 and "invalid API key" in wrong.events[-1]["error"]["message"]
    for ok in (by_query, by_header, by_message):
        assert ok.close_code == 1000 and seconds(ok.audio["utt_1"]) == pytest.approx(SENTENCE_S)


def test_pages_from_other_origins_are_refused(server: LiveServer) -> None:
    config = {"type": "config", "voice": "alice"}
    evil = asyncio.run(_expect_close(ws_url(server.url), config, headers={"Origin": "https://evil.example"}))
    assert evil.close_code == 4403 and "COSYSERVE_CORS_ORIGINS" in evil.events[-1]["error"]["message"]
    local = asyncio.run(
        _expect_close(
            ws_url(server.url), config, {"type": "close"}, headers={"Origin": "http://localhost:3000"}
        )
    )
    assert local.close_code == 1000


# --------------------------------------------------------------------------------------------
# Back-pressure
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_client_that_stops_reading_is_closed_and_the_server_stays_healthy() -> None:
    # 10 s of audio (320 KB) per sentence and 40 sentences: more than the socket buffers hold
    # (a few MB on loopback).
    backend = FakeBackend(chunks_per_segment=20, chunk_s=0.5, step_sleep_s=0.001)
    sentences = [f"Sentence number {i}. " for i in range(40)]

    async def stalled(url: str) -> Received:
        # No permessage-deflate: the fake's pure tones would compress a hundredfold.
        async with connect(ws_url(url), max_queue=2, compression=None) as ws:
            received = Received()
            await send(ws, type="config", voice="alice")
            for sentence in sentences:
                await send(ws, type="text", text=sentence)
            await send(ws, type="end")
            await receive_until(ws, received, "segment.started")
            await asyncio.sleep(4.0)  # stop reading; the server gives up after 1 s
            return await receive_all(ws, received)

    async def healthy(url: str) -> Received:
        async with connect(ws_url(url)) as ws:
            await send(ws, type="config", voice="alice")
            await send(ws, type="text", text="Still here.")
            await send(ws, type="close")
            return await receive_all(ws)

    with serve(backend, realtime_buffer_s=5.0, realtime_send_timeout_s=1.0) as live:
        received = asyncio.run(stalled(live.url))
        assert received.close_code == 4429, received.types[-3:]
        assert received.events[-1]["error"]["code"] == "slow_reader"
        engine = live.server.config.app.state.cosyserve.engine
        # Synthesis paused with the client instead of making all 400 s of audio.
        assert engine.counters.submitted < len(sentences) and engine.counters.audio_seconds < 300
        assert seconds(received.audio["utt_1"]) < engine.counters.audio_seconds
        deadline = time.monotonic() + 10
        while engine.active_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.active_count == 0
        after = asyncio.run(healthy(live.url))
        assert after.close_code == 1000 and seconds(after.audio["utt_1"]) == pytest.approx(10.0)
        assert httpx.get(f"{live.url}/health", timeout=30).status_code == 200


# --------------------------------------------------------------------------------------------
# A backend that reads the text as it arrives (the CosyVoice2/3 plug-in point)
# --------------------------------------------------------------------------------------------


class TextStreamBackend(FakeBackend):
    """Speaks 0.05 s per word as soon as the word has arrived, from one request per utterance."""

    accepts_text_stream = True

    def open(self, request: SynthesisRequest) -> SynthesisJob:
        assert isinstance(request, TextStreamRequest), "a text-stream backend gets the whole utterance"
        self.check_request(request)
        with self.lock:
            self.opened.append(request)
        return GeneratorJob(self._speak(request), SynthesisInfo())

    def _speak(self, request: TextStreamRequest) -> Iterator[AudioChunk | None]:
        pending = ""
        while True:
            text, finished = request.text_stream.read()
            pending += text
            *ready, pending = pending.split(" ") if not finished else [*pending.split(" "), ""]
            for _word in filter(None, ready):
                yield AudioChunk(np.full(int(0.05 * self.sample_rate), 0.1, np.float32), self.sample_rate)
            if finished:
                return
            time.sleep(0.005)
            yield None


def test_a_text_stream_backend_gets_one_request_per_utterance() -> None:
    backend = TextStreamBackend()

    async def run(url: str) -> tuple[Received, float]:
        async with connect(ws_url(url)) as ws:
            received = Received()
            await send(ws, type="config", voice="alice")
            started = await receive_until(ws, received, "session.started")
            assert started["text_streaming"] is True
            await send(ws, type="text", text="no sentence end yet ")
            received.add(await ws.recv())  # utterance.started
            audio = await ws.recv()
            received.add(audio)
            assert isinstance(audio, bytes)  # audio before any sentence is complete
            await send(ws, type="text", text="and the rest")
            await send(ws, type="close")
            await receive_all(ws, received)
            return received, seconds(received.audio["utt_1"])

    with serve(backend) as live:
        received, audio_s = asyncio.run(run(live.url))
    assert len(backend.opened) == 1
    assert audio_s == pytest.approx(7 * 0.05)
    assert received.of_type("utterance.done")[0]["status"] == "done"
    assert not received.of_type("segment.started")

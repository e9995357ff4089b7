"""A realtime speech session: text arrives in pieces, audio leaves as it is made.

:class:`SpeechSession` is the transport-independent core that the WebSocket endpoint and the
Wyoming server both drive. The transport calls :meth:`~SpeechSession.append`, ``flush``,
``end`` and ``cancel`` as client messages arrive, runs :meth:`~SpeechSession.run` as a task, and
sends what appears in :attr:`~SpeechSession.outbox` (JSON events and encoded audio, in order).

Utterances run one after another; each is turned into engine requests in one of two ways:

* segments (every backend today): an :class:`~cosyserve.text.incremental.IncrementalSegmenter`
  hands out each sentence (or clause) as soon as it is complete, and each segment becomes one
  streaming engine request, submitted when the previous one has finished. One request at a time
  per session keeps a session from crowding out others, and the audio already made covers the
  next request's first-chunk latency.
* a text stream (backends with ``accepts_text_stream``, see :mod:`cosyserve.realtime.textstream`):
  one request per utterance whose text is fed to the model as it arrives.

Back-pressure: the outbox counts the audio it holds. A new request is submitted only while it
holds less than ``limits.buffer_s`` seconds, so a client that reads slowly slows synthesis down
instead of growing the server's memory; a transport whose client stops reading altogether closes
the connection (:class:`~cosyserve.realtime.protocol.SlowReaderError`).

Events (``type``), all carrying ``utterance_id``: ``utterance.started`` (sample rate, format),
``segment.started`` (its index and text), binary audio, ``segment.done`` (audio seconds, time from
the segment's text being complete to its first audio), ``utterance.done`` (status ``done`` |
``failed`` | ``cancelled`` and timings), and ``error`` (a failed utterance; the session goes on).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from anyio import to_thread

from cosyserve.api import SynthesisRequest
from cosyserve.engine.loop import EngineLoop, RequestHandle
from cosyserve.errors import (
    CancelledError,
    CosyserveError,
    EngineStoppedError,
    InvalidRequestError,
    SynthesisFailedError,
)
from cosyserve.interfaces import Backend
from cosyserve.realtime.protocol import (
    INLINE_FORMATS,
    SessionLimits,
    TextLimitError,
    VoiceSettings,
    error_event,
)
from cosyserve.realtime.textstream import TextStream, TextStreamRequest, supports_text_stream
from cosyserve.text.incremental import IncrementalSegmenter

logger = logging.getLogger(__name__)

UtteranceState = Literal["open", "ended", "done", "failed", "cancelled"]


def _round_s(seconds: float | None) -> float | None:
    """Seconds to the millisecond, for events."""
    return None if seconds is None else round(seconds, 3)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


@dataclass
class OutEvent:
    payload: dict[str, Any]


@dataclass
class OutAudio:
    data: bytes  # encoded in the utterance's response format
    seconds: float
    utterance_id: str


OutItem = OutEvent | OutAudio


class Outbox:
    """The ordered output of a session, and the bounded buffer between synthesis and a client:
    it counts the seconds of audio it holds (:meth:`wait_room` blocks a producer above a limit)."""

    def __init__(self) -> None:
        self._items: deque[OutItem] = deque()
        self._audio_s = 0.0
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def audio_seconds(self) -> float:
        return self._audio_s

    @property
    def empty(self) -> bool:
        return not self._items

    async def put(self, item: OutItem) -> None:
        async with self._changed:
            if self._closed:
                return
            self._items.append(item)
            if isinstance(item, OutAudio):
                self._audio_s += item.seconds
            self._changed.notify_all()

    async def get(self) -> OutItem | None:
        """The next item; None once the outbox is closed and empty."""
        async with self._changed:
            while not self._items and not self._closed:
                await self._changed.wait()
            if not self._items:
                return None
            item = self._items.popleft()
            if isinstance(item, OutAudio):
                self._audio_s = max(0.0, self._audio_s - item.seconds)
            self._changed.notify_all()
            return item

    async def wait_room(self, limit_s: float) -> None:
        """Return once less than ``limit_s`` seconds of audio wait here."""
        async with self._changed:
            while self._audio_s >= limit_s and not self._closed:
                await self._changed.wait()

    async def discard_audio(self, utterance_ids: Iterable[str]) -> None:
        """Drop the queued audio of cancelled utterances (their events stay)."""
        ids = set(utterance_ids)
        async with self._changed:
            kept = deque(i for i in self._items if not (isinstance(i, OutAudio) and i.utterance_id in ids))
            self._items = kept
            self._audio_s = sum(i.seconds for i in kept if isinstance(i, OutAudio))
            self._changed.notify_all()

    async def close(self) -> None:
        """No more items: ``get`` drains what is left, then returns None."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


# --------------------------------------------------------------------------------------------
# Utterances and the work queue
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Utterance:
    id: str
    settings: VoiceSettings
    segmenter: IncrementalSegmenter | None = None
    text_stream: TextStream | None = None
    opened_at: float = field(default_factory=time.perf_counter)
    state: UtteranceState = "open"
    chars: int = 0
    segments: int = 0
    audio_s: float = 0.0
    first_segment_at: float | None = None
    first_audio_at: float | None = None
    first_segment_audio_s: float | None = None
    error: CosyserveError | None = None
    encoder: Any = None
    resampler: Any = None
    sample_rate: int = 0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


@dataclass
class _Start:
    utterance: Utterance


@dataclass
class _Segment:
    utterance: Utterance
    index: int
    text: str
    ready_at: float


@dataclass
class _End:
    utterance: Utterance


_STOP = object()


class SpeechSession:
    """See the module doc. All methods run on the event loop; ``run()`` is the producer task."""

    def __init__(
        self,
        engine: EngineLoop,
        backend: Backend,
        limits: SessionLimits | None = None,
        *,
        session_id: str = "session",
    ):
        self.engine = engine
        self.backend = backend
        self.limits = limits or SessionLimits()
        self.id = session_id
        self.outbox = Outbox()
        self.text_streaming = supports_text_stream(backend)
        self._work: asyncio.Queue[object] = asyncio.Queue()
        self._pending = 0  # work items queued or being processed
        self._open: Utterance | None = None
        self._live: list[Utterance] = []  # opened, not yet finished
        self._handle: RequestHandle | None = None
        self._numbers = itertools.count(1)
        self._stopped = False

    # ---- state -------------------------------------------------------------------------

    @property
    def open_utterance(self) -> Utterance | None:
        return self._open

    @property
    def busy(self) -> bool:
        """Text is buffered, work is queued or running, or output waits to be sent."""
        return self._open is not None or self.working

    @property
    def working(self) -> bool:
        """Synthesis is queued or running, or output waits to be sent (an open utterance whose
        client has gone quiet is not work)."""
        return self._pending > 0 or not self.outbox.empty

    # ---- commands (from the transport's receive loop) ----------------------------------

    def append(self, text: str, settings: VoiceSettings, utterance_id: str | None = None) -> Utterance:
        """Add text to the open utterance, opening one (with ``settings``) if none is open."""
        utt = self._open
        if utt is None:
            utt = self._start(settings, utterance_id)
        elif utterance_id is not None and utterance_id != utt.id:
            raise InvalidRequestError(
                f"utterance {utt.id!r} is still open: send 'end' before starting {utterance_id!r}"
            )
        limit = self.limits.max_text_chars
        if utt.chars + len(text) > limit:
            raise TextLimitError(
                f"utterance {utt.id!r} would have {utt.chars + len(text)} characters; this server accepts "
                f"at most {limit} per utterance (COSYSERVE_MAX_TEXT_CHARS): end it and start another"
            )
        utt.chars += len(text)
        if utt.state != "open":  # failed or cancelled meanwhile: the rest of its text is dropped
            return utt
        if utt.text_stream is not None:
            utt.text_stream.write(text)
        else:
            assert utt.segmenter is not None  # noqa: S101
            self._queue_segments(utt, utt.segmenter.push(text))
        return utt

    def flush(self) -> None:
        """Speak what the open utterance has buffered, complete sentence or not."""
        utt = self._open
        if utt is not None and utt.segmenter is not None and utt.state == "open":
            self._queue_segments(utt, utt.segmenter.flush())

    def end(self) -> Utterance | None:
        """The open utterance's text is complete: speak the rest, then ``utterance.done``."""
        utt = self._open
        if utt is None:
            return None
        self.flush()
        if utt.text_stream is not None:
            utt.text_stream.close()
        if utt.state == "open":
            utt.state = "ended"
        self._open = None
        self._queue(_End(utt))
        return utt

    def open_empty(self, settings: VoiceSettings, utterance_id: str | None = None) -> Utterance:
        """Open an utterance before any text (Wyoming's ``synthesize-start``)."""
        if self._open is not None:
            raise InvalidRequestError(f"utterance {self._open.id!r} is still open")
        return self._start(settings, utterance_id)

    async def cancel(self) -> list[Utterance]:
        """Stop speaking: drop everything received and queued; each dropped utterance still ends
        with ``utterance.done`` (status ``cancelled``)."""
        dropped = [u for u in self._live if not u.finished]
        for utt in dropped:
            utt.state = "cancelled"
            if utt.text_stream is not None:
                utt.text_stream.cancel()
        if self._open is not None:
            self._queue(_End(self._open))
            self._open = None
        if self._handle is not None:
            self._handle.cancel()
        await self.outbox.discard_audio(u.id for u in dropped)
        return dropped

    def stop(self) -> None:
        """No more commands: ``run()`` returns once the queued work is done."""
        if not self._stopped:
            self._stopped = True
            self._work.put_nowait(_STOP)

    async def abort(self) -> None:
        """Stop now (client gone, fatal error): cancel what runs, drop what waits."""
        await self.cancel()
        self.stop()

    # ---- the producer ------------------------------------------------------------------

    async def run(self) -> None:
        """Process the work queue until :meth:`stop`; then close the outbox. Raises
        :class:`~cosyserve.errors.EngineStoppedError` when the server shuts down."""
        try:
            while True:
                item = await self._work.get()
                if item is _STOP:
                    return
                try:
                    await self._process(item)
                finally:
                    self._pending -= 1
        finally:
            if self._handle is not None:
                self._handle.cancel()
            for utt in self._live:
                if utt.encoder is not None:
                    utt.encoder.close()
            await self.outbox.close()

    # ---- internals ---------------------------------------------------------------------

    def _start(self, settings: VoiceSettings, utterance_id: str | None) -> Utterance:
        if self._stopped:
            raise InvalidRequestError("the session is closing: no new utterance")
        number = next(self._numbers)
        utt = Utterance(id=utterance_id or f"utt_{number}", settings=settings)
        if self.text_streaming:
            utt.text_stream = TextStream()
        else:
            utt.segmenter = IncrementalSegmenter(segment_by=settings.segment_by)
        self._open = utt
        self._live.append(utt)
        self._queue(_Start(utt))
        return utt

    def _queue(self, item: object) -> None:
        self._pending += 1
        self._work.put_nowait(item)

    def _queue_segments(self, utt: Utterance, segments: list[str]) -> None:
        now = time.perf_counter()
        for text in segments:
            if utt.first_segment_at is None:
                utt.first_segment_at = now
            self._queue(_Segment(utt, utt.segments, text, now))
            utt.segments += 1

    async def _process(self, item: object) -> None:
        if isinstance(item, _Start):
            await self._begin(item.utterance)
        elif isinstance(item, _Segment):
            await self._speak_segment(item)
        elif isinstance(item, _End):
            await self._finish(item.utterance)

    async def _begin(self, utt: Utterance) -> None:
        from cosyserve.audio.encode import codec_sample_rate, make_encoder

        settings = utt.settings
        model_rate = self.backend.sample_rate
        utt.sample_rate = settings.sample_rate or model_rate
        if utt.sample_rate != model_rate:
            import soxr

            utt.resampler = soxr.ResampleStream(model_rate, utt.sample_rate, 1, dtype="float32")
        utt.encoder = make_encoder(settings.response_format, utt.sample_rate)
        await self.outbox.put(
            OutEvent(
                {
                    "type": "utterance.started",
                    "utterance_id": utt.id,
                    "response_format": settings.response_format,
                    "sample_rate": codec_sample_rate(settings.response_format, utt.sample_rate),
                }
            )
        )
        if utt.text_stream is not None and utt.state != "cancelled":
            request = TextStreamRequest(text="", text_stream=utt.text_stream, **self._request_fields(utt))
            await self._synthesize(utt, request, started_at=utt.opened_at)

    async def _speak_segment(self, seg: _Segment) -> None:
        utt = seg.utterance
        if utt.state in ("failed", "cancelled"):
            return
        await self.outbox.wait_room(self.limits.buffer_s)  # back-pressure: the client is behind
        if utt.state in ("failed", "cancelled"):
            return
        await self.outbox.put(
            OutEvent(
                {"type": "segment.started", "utterance_id": utt.id, "segment": seg.index, "text": seg.text}
            )
        )
        request = SynthesisRequest(text=seg.text, **self._request_fields(utt))
        started = time.perf_counter()
        result = await self._synthesize(utt, request, started_at=seg.ready_at, segment=seg.index)
        if result is None:
            return
        audio_s, first_audio_s = result
        if seg.index == 0:
            utt.first_segment_audio_s = first_audio_s
        await self.outbox.put(
            OutEvent(
                {
                    "type": "segment.done",
                    "utterance_id": utt.id,
                    "segment": seg.index,
                    "text": seg.text,
                    "audio_s": _round_s(audio_s),
                    "first_audio_s": _round_s(first_audio_s),
                    "synthesis_s": _round_s(time.perf_counter() - started),
                }
            )
        )

    def _request_fields(self, utt: Utterance) -> dict[str, Any]:
        s = utt.settings
        return {
            "voice": s.voice,
            "mode": s.mode,
            "instruct": s.instruct,
            "speed": s.speed,
            "seed": s.seed,
            "stream": True,
        }

    async def _synthesize(
        self, utt: Utterance, request: SynthesisRequest, *, started_at: float, segment: int | None = None
    ) -> tuple[float, float | None] | None:
        """Run one engine request and queue its audio; (audio seconds, seconds from
        ``started_at`` to the first audio), or None when the utterance failed or was cancelled."""
        suffix = f"-{segment}" if segment is not None else ""
        audio_s = 0.0
        first_audio_s: float | None = None
        try:
            self._handle = handle = self.engine.submit(request, request_id=f"{self.id}-{utt.id}{suffix}")
            async for chunk in handle:
                if utt.state == "cancelled":
                    break
                now = time.perf_counter()
                if first_audio_s is None and len(chunk.audio):
                    first_audio_s = now - started_at
                    if utt.first_audio_at is None:
                        utt.first_audio_at = now
                data = await self._encode(utt, chunk.audio)
                seconds = chunk.duration_s
                audio_s += seconds
                utt.audio_s += seconds
                if data:
                    await self.outbox.put(OutAudio(data, seconds, utt.id))
        except CancelledError:
            if utt.state != "cancelled":  # cancelled by the engine (shutdown, timeout)
                await self._fail(utt, SynthesisFailedError("the synthesis was cancelled"))
            return None
        except EngineStoppedError:
            raise
        except CosyserveError as exc:
            await self._fail(utt, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - an encoder bug fails one utterance, not the session
            logger.exception("session %s: utterance %s failed", self.id, utt.id)
            await self._fail(utt, SynthesisFailedError(f"synthesis failed ({type(exc).__name__}: {exc})"))
            return None
        finally:
            self._handle = None
        if utt.state == "cancelled":
            return None
        return audio_s, first_audio_s

    async def _encode(self, utt: Utterance, audio: np.ndarray) -> bytes:
        if utt.resampler is not None and len(audio):
            audio = utt.resampler.resample_chunk(np.asarray(audio, dtype=np.float32))
        if utt.settings.response_format in INLINE_FORMATS:
            return utt.encoder.encode(audio)
        return await to_thread.run_sync(utt.encoder.encode, audio)

    async def _fail(self, utt: Utterance, error: CosyserveError) -> None:
        if utt.finished:
            return
        logger.info("session %s: utterance %s failed: %s", self.id, utt.id, error.message)
        utt.state = "failed"
        utt.error = error
        if utt.text_stream is not None:
            utt.text_stream.cancel()
        await self.outbox.put(OutEvent(error_event(error, utt.id)))

    async def _finish(self, utt: Utterance) -> None:
        if utt.state in ("open", "ended"):
            utt.state = "done"
        encoder = utt.encoder
        if encoder is not None:
            if utt.state == "done":
                tail = b""
                if utt.resampler is not None:
                    rest = utt.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
                    tail = await self._encode_tail(utt, rest)
                tail += await to_thread.run_sync(encoder.flush)
                if tail:
                    await self.outbox.put(OutAudio(tail, 0.0, utt.id))
            else:
                encoder.close()
        if utt in self._live:
            self._live.remove(utt)
        now = time.perf_counter()
        await self.outbox.put(
            OutEvent(
                {
                    "type": "utterance.done",
                    "utterance_id": utt.id,
                    "status": utt.state,
                    "segments": utt.segments,
                    "text_chars": utt.chars,
                    "audio_s": _round_s(utt.audio_s),
                    # from the utterance's first text to its first audio
                    "first_audio_s": _round_s(
                        None if utt.first_audio_at is None else utt.first_audio_at - utt.opened_at
                    ),
                    # from its first segment being complete to that segment's first audio
                    "first_segment_audio_s": _round_s(utt.first_segment_audio_s),
                    "elapsed_s": _round_s(now - utt.opened_at),
                }
            )
        )

    async def _encode_tail(self, utt: Utterance, audio: np.ndarray) -> bytes:
        if not len(audio):
            return b""
        if utt.settings.response_format in INLINE_FORMATS:
            return utt.encoder.encode(audio)
        return await to_thread.run_sync(utt.encoder.encode, audio)

"""``cosyserve wyoming``: the Wyoming protocol, the way Home Assistant talks to local voices.

    cosyserve wyoming --model_dir DIR --uri tcp://0.0.0.0:10200

Without ``--model_dir`` it serves the embedded default voice, like ``cosyserve serve``.
Events handled (the ``wyoming`` package's types):

* ``describe`` → ``info``: one TTS program listing every voice (built-in and saved) with its
  languages, ``supports_synthesize_streaming=True``.
* ``synthesize`` → ``audio-start``, ``audio-chunk``..., ``audio-stop`` (16-bit mono PCM at the
  model's rate). The text is segmented like a realtime session's, so the first sentence's audio
  goes out while the rest is synthesised.
* ``synthesize-start``, ``synthesize-chunk``..., ``synthesize-stop`` (Home Assistant streaming an
  LLM's answer) → the same audio events as sentences complete, then ``synthesize-stopped``. The
  ``synthesize`` event Home Assistant also sends inside a stream (for servers without streaming)
  is ignored there.

Each connection drives a :class:`~cosyserve.realtime.session.SpeechSession` over one shared
engine loop, so concurrent requests are batched as on the HTTP server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.server import AsyncEventHandler, AsyncServer
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeStopped,
    SynthesizeVoice,
)

from cosyserve import __version__
from cosyserve.api import SynthesisRequest, VoiceInfo
from cosyserve.engine.loop import EngineLoop
from cosyserve.errors import CosyserveError, InvalidRequestError, UnknownVoiceError
from cosyserve.interfaces import Backend
from cosyserve.realtime.protocol import SessionLimits, VoiceSettings
from cosyserve.realtime.session import OutAudio, SpeechSession
from cosyserve.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_URI = "tcp://0.0.0.0:10200"
SAMPLES_PER_CHUNK = 1024  # audio-chunk size, as wyoming-piper sends
_ATTRIBUTIONS = {
    "embedded": Attribution(name="Piper (rhasspy)", url="https://github.com/rhasspy/piper"),
    "cosyvoice": Attribution(name="FunAudioLLM CosyVoice", url="https://github.com/FunAudioLLM/CosyVoice"),
}
_SERVER_ATTRIBUTION = Attribution(name="cosyserve", url="https://github.com/FunAudioLLM/CosyVoice")
# Flags of `cosyserve serve` that mean something here.
_SETTINGS_FLAGS = (
    "model_dir",
    "load_jit",
    "load_trt",
    "fp16",
    "trt_concurrent",
    "auto",
    "force_config",
    "device",
    "voices_dir",
    "stream_first_hop",
    "max_queue",
    "max_active",
    "batching",
    "max_batch",
    "max_text_chars",
    "request_timeout_s",
    "shutdown_timeout_s",
    "realtime_buffer_s",
)


def wyoming_language(code: str) -> str:
    """Home Assistant's spelling of a language: "en-us" → "en_US", "zh" stays "zh"."""
    lang, _, region = code.replace("_", "-").partition("-")
    return f"{lang.lower()}_{region.upper()}" if region else lang.lower()


class WyomingService:
    """What every connection shares: the backend, its engine loop and the voice catalogue."""

    def __init__(
        self, backend: Backend, engine: EngineLoop, settings: Settings, default_voice: str | None = None
    ):
        self.backend = backend
        self.engine = engine
        self.settings = settings
        self.limits = SessionLimits(
            max_text_chars=settings.max_text_chars, buffer_s=settings.realtime_buffer_s
        )
        self.default_voice = default_voice
        self._sessions = itertools.count(1)

    def next_session_id(self) -> str:
        return f"wyoming-{next(self._sessions)}"

    def voices(self) -> list[tuple[VoiceInfo, list[str]]]:
        """Every voice with its languages; a saved (cloned) voice speaks every language the
        model's built-in voices speak."""
        voices = self.backend.voices()
        builtin = sorted({wyoming_language(v.language) for v in voices if v.language})
        return [(v, [wyoming_language(v.language)] if v.language else builtin or ["en"]) for v in voices]

    def info(self) -> Info:
        attribution = _ATTRIBUTIONS.get(self.backend.name, _SERVER_ATTRIBUTION)
        voices = [
            TtsVoice(
                name=voice.id,
                description=voice.description or f"{voice.kind} voice",
                attribution=attribution,
                installed=True,
                version=None,
                languages=languages,
            )
            for voice, languages in self.voices()
        ]
        program = TtsProgram(
            name="cosyserve",
            description=f"cosyserve ({self.backend.name}): CosyVoice text-to-speech",
            attribution=_SERVER_ATTRIBUTION,
            installed=True,
            version=__version__,
            voices=voices,
            supports_synthesize_streaming=True,
        )
        return Info(tts=[program])

    def voice_settings(self, wanted: SynthesizeVoice | None) -> VoiceSettings:
        """The voice Home Assistant asked for: by name, else the first one of its language, else
        the default voice."""
        from cosyserve.server.routers.common import resolve_voice_id

        voices = self.voices()
        if not voices:
            raise UnknownVoiceError("the model has no voice: save one with the HTTP server first")
        voice_id: str | None = None
        if wanted is not None and wanted.name:
            voice_id = resolve_voice_id(self.backend, wanted.name)
        elif wanted is not None and wanted.language:
            lang = wyoming_language(wanted.language)
            for voice, languages in voices:
                if any(code == lang or code.split("_")[0] == lang.split("_")[0] for code in languages):
                    voice_id = voice.id
                    break
        if voice_id is None:
            builtin = [v for v, _ in voices if v.kind != "saved"] or [v for v, _ in voices]
            voice_id = (
                resolve_voice_id(self.backend, self.default_voice) if self.default_voice else builtin[0].id
            )
        self.backend.check_request(SynthesisRequest(text="Hello.", voice=voice_id))
        return VoiceSettings(voice=voice_id, response_format="pcm")


class CosyserveEventHandler(AsyncEventHandler):
    """One Wyoming connection."""

    def __init__(self, service: WyomingService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        super().__init__(reader, writer)
        self.service = service
        self.streaming = False
        self.session: SpeechSession | None = None
        self.pump: asyncio.Task[None] | None = None
        self.failed = False

    async def handle_event(self, event: Event) -> bool:
        try:
            if Describe.is_type(event.type):
                await self.write_event(self.service.info().event())
            elif Synthesize.is_type(event.type):
                if not self.streaming:  # inside a stream it only repeats the chunks' text
                    await self._synthesize(Synthesize.from_event(event))
            elif SynthesizeStart.is_type(event.type):
                await self._stream_start(SynthesizeStart.from_event(event))
            elif SynthesizeChunk.is_type(event.type):
                self._stream_text(SynthesizeChunk.from_event(event).text)
            elif SynthesizeStop.is_type(event.type):
                await self._stream_stop()
        except CosyserveError as exc:
            await self._report(exc)
        return True

    async def disconnect(self) -> None:
        if self.session is not None:
            await self.session.abort()
        if self.pump is not None:
            self.pump.cancel()

    # ---- requests ------------------------------------------------------------------------

    async def _synthesize(self, request: Synthesize) -> None:
        settings = self.service.voice_settings(request.voice)
        session = self._new_session()
        session.append(request.text, settings)
        session.end()
        session.stop()
        await self._pump(session)

    async def _stream_start(self, request: SynthesizeStart) -> None:
        if self.session is not None:
            await self.session.abort()
        self.streaming = True
        self.failed = False
        settings = self.service.voice_settings(request.voice)
        session = self._new_session()
        session.open_empty(settings)
        self.pump = asyncio.create_task(self._pump(session))
        logger.debug("text stream started (voice %s)", settings.voice)

    def _stream_text(self, text: str) -> None:
        if self.session is None or not self.streaming:
            raise InvalidRequestError("synthesize-chunk outside a stream: send synthesize-start first")
        if self.failed:
            return
        try:
            self.session.append(text, self.session.open_utterance.settings)  # type: ignore[union-attr]
        except CosyserveError:
            self.failed = True
            raise

    async def _stream_stop(self) -> None:
        if self.session is None or not self.streaming:
            raise InvalidRequestError("synthesize-stop outside a stream: send synthesize-start first")
        session, pump = self.session, self.pump
        if self.failed:
            await session.cancel()
        session.end()
        session.stop()
        if pump is not None:
            await pump
        self.streaming = False
        self.session = self.pump = None
        await self.write_event(SynthesizeStopped().event())

    def _new_session(self) -> SpeechSession:
        self.session = SpeechSession(
            self.service.engine,
            self.service.backend,
            self.service.limits,
            session_id=self.service.next_session_id(),
        )
        return self.session

    # ---- output --------------------------------------------------------------------------

    async def _pump(self, session: SpeechSession) -> None:
        """Run the session and turn its output into Wyoming audio events."""
        producer = asyncio.create_task(session.run())
        rate = self.service.backend.sample_rate
        try:
            while (item := await session.outbox.get()) is not None:
                if isinstance(item, OutAudio):
                    await self._write_audio(item.data, rate)
                    continue
                payload = item.payload
                kind = payload["type"]
                if kind == "utterance.started":
                    rate = int(payload["sample_rate"])
                    await self.write_event(AudioStart(rate=rate, width=2, channels=1).event())
                elif kind == "utterance.done":
                    await self.write_event(AudioStop().event())
                elif kind == "error":
                    error = payload["error"]
                    await self.write_event(Error(text=error["message"], code=error["code"]).event())
            await producer
        except CosyserveError as exc:
            await self._report(exc)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def _write_audio(self, data: bytes, rate: int) -> None:
        step = 2 * SAMPLES_PER_CHUNK
        for offset in range(0, len(data), step):
            chunk = AudioChunk(rate=rate, width=2, channels=1, audio=data[offset : offset + step])
            await self.write_event(chunk.event())

    async def _report(self, error: CosyserveError) -> None:
        logger.info("wyoming request failed: %s: %s", error.code, error.message)
        await self.write_event(Error(text=error.message, code=error.code).event())


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


def build_service(settings: Settings, default_voice: str | None = None) -> WyomingService:
    """The backend the settings ask for (the embedded voice without a model directory), its
    engine loop (continuous batching for CosyVoice) and the voice catalogue."""
    from cosyserve.server.app import build_backend

    backend, report = build_backend(settings)
    for fallback in report.get("fallbacks", []) or []:
        logger.warning("fallback: %s", fallback)
    policy = None
    if backend.name == "cosyvoice" and settings.batching:
        from cosyserve.engine.batching import make_policy

        policy = make_policy(backend, settings)
    engine = EngineLoop.from_settings(backend, settings, policy=policy)
    service = WyomingService(backend, engine, settings, default_voice=default_voice)
    if default_voice:
        service.voice_settings(SynthesizeVoice(name=default_voice))  # fail at start, not per request
    return service


def handler_factory(service: WyomingService) -> Callable[..., AsyncEventHandler]:
    return partial(CosyserveEventHandler, service)


async def serve(service: WyomingService, uri: str, ready: Callable[[], Any] | None = None) -> None:
    """Serve ``uri`` (tcp://host:port, unix://path or stdio://) until cancelled or SIGTERM."""
    server = AsyncServer.from_uri(uri)
    service.engine.start()
    try:
        if ready is not None:
            ready()
        await server.run(handler_factory(service))
    finally:
        await service.engine.shutdown(service.settings.shutdown_timeout_s)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from cosyserve.settings import add_arguments

    parser.add_argument(
        "--uri",
        default=DEFAULT_URI,
        help=f"where to listen: tcp://HOST:PORT, unix://PATH or stdio:// (default {DEFAULT_URI})",
    )
    parser.add_argument(
        "--voice", default=None, help="voice used when a request names none (default: the first)"
    )
    add_arguments(parser, only=_SETTINGS_FLAGS)
    parser.epilog = (
        "Every flag can also be set as an environment variable: COSYSERVE_<FLAG> (e.g. COSYSERVE_MODEL_DIR)."
    )


def main(args: argparse.Namespace) -> int:
    from cosyserve.settings import settings_from_args

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"cosyserve wyoming: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        AsyncServer.from_uri(args.uri)  # a bad URI fails before the model loads
    except ValueError as exc:
        print(f"cosyserve wyoming: --uri {args.uri}: {exc}", file=sys.stderr)
        return 2
    try:
        service = build_service(settings, default_voice=args.voice)
    except CosyserveError as exc:
        logger.error("cannot start: %s", exc.message)
        return 1

    def ready() -> None:
        # stderr: with stdio:// the standard output carries the protocol
        voices = ", ".join(v.id for v in service.backend.voices()[:8])
        print(
            f"cosyserve wyoming ({service.backend.name}) on {args.uri}; voices: {voices}",
            file=sys.stderr,
            flush=True,
        )

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(service, args.uri, ready))
    return 0

"""``WS /v1/audio/speech/stream-input``: text streamed in, audio streamed out.

Named after ElevenLabs' ``stream-input`` WebSocket (the best-known text-in, audio-out session),
beside the OpenAI-compatible ``POST /v1/audio/speech`` it extends; the message style (``type``
with dotted event names) follows OpenAI's Realtime API, and binary audio frames with JSON events
beside them follow Deepgram's ``/v1/speak`` socket.

Client → server, JSON text messages::

    {"type": "config", "voice": "...", "response_format": "pcm", "speed": 1.0,
     "sample_rate": null, "segment_by": "sentence", "instructions": null, "api_key": "..."}
    {"type": "text", "text": "Hello, wor", "utterance_id": "optional, names a new utterance"}
    {"type": "flush"}    speak what is buffered now (the utterance goes on)
    {"type": "end"}      the utterance's text is complete (the next text starts a new one)
    {"type": "cancel"}   stop speaking, drop everything received so far
    {"type": "close"}    end the open utterance, send all its audio, then close (code 1000)

``config`` comes first (it may come again between utterances to change the voice). The API key,
when the server has one, is the ``api_key`` query parameter, an ``Authorization: Bearer`` header
or ``config.api_key`` (browsers cannot set headers on a WebSocket).

Server → client: ``session.started`` after the config, then per utterance
``utterance.started``, ``segment.started`` / ``segment.done`` around each segment's binary audio
frames, ``utterance.done``; ``error`` events say what failed. Utterances are spoken one after
another, so every binary frame belongs to the utterance last started. See
:mod:`cosyserve.realtime.session` for the events and :mod:`cosyserve.realtime.protocol` for the
close codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from cosyserve.api import SynthesisRequest
from cosyserve.errors import CosyserveError, InvalidRequestError, SynthesisFailedError
from cosyserve.realtime.protocol import (
    CLIENT_MESSAGES,
    CLOSE_NORMAL,
    ConfigMessage,
    ForbiddenOriginError,
    IdleTimeoutError,
    SessionLimits,
    SlowReaderError,
    TextMessage,
    VoiceSettings,
    close_code,
    error_event,
)
from cosyserve.realtime.session import OutAudio, OutEvent, SpeechSession
from cosyserve.server.routers.common import ServerState, instruction_mode, validate_synthesis
from cosyserve.server.routers.openai import check_model, map_voice
from cosyserve.server.schemas import UnauthorizedError, describe_validation_error
from cosyserve.settings import LOCALHOST_ORIGIN_REGEX

logger = logging.getLogger(__name__)

PATH = "/v1/audio/speech/stream-input"
router = APIRouter(tags=["Realtime"])
# A close frame to a client that has stopped reading may wait this long for room to be sent.
_CLOSE_TIMEOUT_S = 5.0


@router.websocket(PATH)
async def speech_stream_input(websocket: WebSocket) -> None:
    await RealtimeConnection(websocket, websocket.app.state.cosyserve).serve()


class _Disconnected(Exception):
    """The client went away."""


class RealtimeConnection:
    """One WebSocket: a receive loop (client messages → session commands), the session's
    producer, and a write loop (outbox → socket). The first of them to end decides how the
    connection closes."""

    def __init__(self, websocket: WebSocket, state: ServerState):
        self.ws = websocket
        self.state = state
        settings = state.settings
        self.idle_timeout_s = settings.realtime_idle_timeout_s
        self.send_timeout_s = settings.realtime_send_timeout_s
        self.id = uuid.uuid4().hex[:12]
        self.voice: VoiceSettings | None = None
        self.closing = False
        self.session = SpeechSession(
            state.engine,
            state.backend,
            SessionLimits(max_text_chars=settings.max_text_chars, buffer_s=settings.realtime_buffer_s),
            session_id=f"ws-{self.id}",
        )

    # ---- lifecycle -----------------------------------------------------------------------

    async def serve(self) -> None:
        await self.ws.accept()
        try:
            self._check_origin()
            key_given = self._handshake_key()
            config = await self._first_config()
            if not key_given:
                self._check_key(config.api_key)
            self._apply_config(config)
        except CosyserveError as exc:
            await self._close(exc)
            return
        except _Disconnected:
            return
        logger.info("realtime session %s opened (voice %s)", self.id, self.voice.voice if self.voice else "-")
        await self._send_json(self._session_started())
        await self._run()

    async def _run(self) -> None:
        producer = asyncio.create_task(self.session.run(), name=f"realtime-{self.id}-producer")
        writer = asyncio.create_task(self._write_loop(), name=f"realtime-{self.id}-writer")
        receiver = asyncio.create_task(self._receive_loop(), name=f"realtime-{self.id}-receiver")
        tasks = {producer, writer, receiver}
        error: CosyserveError | None = None
        outcome = "disconnected"
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished = None
                for task in done:
                    exc = task.exception()
                    if isinstance(exc, _Disconnected):
                        finished = "disconnected"
                    elif exc is not None:
                        error = self._as_error(exc)
                        finished = "error"
                    elif task is writer:
                        finished = "closed"  # the outbox was drained after `close`
                    elif task is receiver:
                        finished = "disconnected"
                    # the producer ending cleanly (after `close`) leaves the writer to drain
                if finished is not None:
                    outcome = finished
                    break
        finally:
            for task in tasks:
                task.cancel()
            await self.session.abort()
            await asyncio.gather(*tasks, return_exceptions=True)
        if outcome == "closed":
            await self._close(None)
        elif outcome == "error" and error is not None:
            await self._close(error)
        logger.info("realtime session %s ended (%s)", self.id, error.code if error else outcome)

    def _as_error(self, exc: BaseException) -> CosyserveError:
        if isinstance(exc, CosyserveError):
            return exc
        logger.error("realtime session %s failed", self.id, exc_info=exc)
        return SynthesisFailedError(f"internal error in the realtime session ({type(exc).__name__})")

    async def _close(self, error: CosyserveError | None) -> None:
        """Send the error event (if any) and the close frame; a client that does not read gets
        ``_CLOSE_TIMEOUT_S`` to make room for them."""
        code = CLOSE_NORMAL if error is None else close_code(error)
        if error is not None:
            log = logger.warning if code >= 4000 and error.status_code < 500 else logger.error
            log("realtime session %s: closing with %d (%s: %s)", self.id, code, error.code, error.message)
        reason = "" if error is None else error.message.encode()[:120].decode(errors="ignore")

        async def send_close() -> None:
            if error is not None:
                await self.ws.send_text(json.dumps(error_event(error), ensure_ascii=False))
            await self.ws.close(code, reason)

        # Gone, or not reading: nothing more to tell it.
        with contextlib.suppress(asyncio.TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            await asyncio.wait_for(send_close(), _CLOSE_TIMEOUT_S)

    # ---- handshake -----------------------------------------------------------------------

    def _check_origin(self) -> None:
        """Browsers do not apply CORS to WebSockets: refuse pages from origins that may not call
        the HTTP API either (clients without an Origin header are not browsers)."""
        origin = self.ws.headers.get("origin")
        if not origin:
            return
        allowed = self.state.settings.cors_origins
        host = self.ws.headers.get("host", "")
        same_origin = origin.split("://", 1)[-1] == host
        if same_origin or "*" in allowed or origin in allowed or re.fullmatch(LOCALHOST_ORIGIN_REGEX, origin):
            return
        raise ForbiddenOriginError(
            f"pages from {origin} may not use this server: add the origin to COSYSERVE_CORS_ORIGINS"
        )

    def _handshake_key(self) -> bool:
        """Check a key sent with the handshake; True when one was sent (or none is needed)."""
        if self.state.settings.api_key is None:
            return True
        header = self.ws.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
        key = key or self.ws.query_params.get("api_key")
        if key is None:
            return False
        self._check_key(key)
        return True

    def _check_key(self, key: str | None) -> None:
        expected = self.state.settings.api_key
        if expected is None:
            return
        if not key:
            raise UnauthorizedError(
                "missing API key: add ?api_key=<key> to the URL, an 'Authorization: Bearer <key>' header, "
                "or api_key in the config message"
            )
        if not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
            raise UnauthorizedError("invalid API key: use the server's COSYSERVE_API_KEY")

    async def _first_config(self) -> ConfigMessage:
        try:
            message = await asyncio.wait_for(self.ws.receive(), self.idle_timeout_s)
        except asyncio.TimeoutError as exc:
            raise IdleTimeoutError(
                f'no config message within {self.idle_timeout_s:g} s: send {{"type": "config", ...}} first'
            ) from exc
        if message["type"] == "websocket.disconnect":
            raise _Disconnected
        parsed = self._parse(message)
        if not isinstance(parsed, ConfigMessage):
            raise InvalidRequestError(
                'the first message must be the config: {"type": "config", "voice": "...", ...}'
            )
        return parsed

    def _apply_config(self, config: ConfigMessage) -> None:
        backend = self.state.backend
        check_model(config.model, backend)
        config.check_ranges()
        voice = map_voice(config.voice, backend)
        mode, instruct = instruction_mode(backend, config.instructions)
        probe = SynthesisRequest(
            text="Hello.", voice=voice, mode=mode, instruct=instruct, speed=config.speed, seed=config.seed
        )
        validate_synthesis(self.state, probe)  # the voice exists, the mode is supported, ...
        self.voice = VoiceSettings(
            voice=probe.voice or voice,
            mode=mode,
            instruct=instruct,
            speed=config.speed,
            seed=config.seed,
            response_format=config.response_format,
            sample_rate=config.sample_rate,
            segment_by=config.segment_by,
        )

    def _session_started(self, kind: str = "session.started") -> dict[str, Any]:
        from cosyserve.audio.encode import codec_sample_rate

        assert self.voice is not None  # noqa: S101
        v = self.voice
        settings = self.state.settings
        return {
            "type": kind,
            "session_id": self.id,
            "voice": v.voice,
            "response_format": v.response_format,
            "sample_rate": codec_sample_rate(
                v.response_format, v.sample_rate or self.state.backend.sample_rate
            ),
            "speed": v.speed,
            "segment_by": v.segment_by,
            "text_streaming": self.session.text_streaming,
            "limits": {
                "max_text_chars": settings.max_text_chars,
                "idle_timeout_s": settings.realtime_idle_timeout_s,
                "buffer_s": settings.realtime_buffer_s,
            },
        }

    # ---- receiving -----------------------------------------------------------------------

    def _parse(self, message: dict[str, Any]) -> Any:
        text = message.get("text")
        if text is None:
            raise InvalidRequestError("binary messages are not accepted: send JSON text messages")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"a message is not valid JSON: {exc.msg}") from exc
        kind = data.get("type") if isinstance(data, dict) else None
        model = CLIENT_MESSAGES.get(kind) if isinstance(kind, str) else None
        if model is None:
            raise InvalidRequestError(
                f"unknown message type {kind!r}: send one of {', '.join(CLIENT_MESSAGES)}"
            )
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            detail, _ = describe_validation_error(exc)
            raise InvalidRequestError(f"bad {kind} message: {detail}") from exc

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(), self.idle_timeout_s)
            except asyncio.TimeoutError as exc:
                if self.session.working or self.closing:
                    continue  # audio is still being made or sent: the client is listening
                raise IdleTimeoutError(
                    f"no message for {self.idle_timeout_s:g} s: the connection was idle"
                ) from exc
            if message["type"] == "websocket.disconnect":
                raise _Disconnected
            await self._handle(self._parse(message))

    async def _handle(self, message: Any) -> None:
        if self.closing:
            raise InvalidRequestError(f"no {message.type} after close: the session is closing")
        session = self.session
        if isinstance(message, TextMessage):
            if message.text:
                assert self.voice is not None  # noqa: S101
                session.append(message.text, self.voice, message.utterance_id)
        elif isinstance(message, ConfigMessage):
            if session.open_utterance is not None:
                raise InvalidRequestError("the config can change only between utterances: send 'end' first")
            self._apply_config(message)
            await session.outbox.put(OutEvent(self._session_started("session.updated")))
        elif message.type == "flush":
            session.flush()
        elif message.type == "end":
            session.end()
        elif message.type == "cancel":
            await session.cancel()
        elif message.type == "close":
            self.closing = True
            session.end()
            session.stop()

    # ---- sending -------------------------------------------------------------------------

    async def _send_json(self, payload: dict[str, Any]) -> None:
        try:
            await self.ws.send_text(json.dumps(payload, ensure_ascii=False))
        except WebSocketDisconnect as exc:
            raise _Disconnected from exc

    async def _write_loop(self) -> None:
        """Send the outbox in order. A send that cannot complete for ``send_timeout_s`` means the
        client stopped reading: the connection is closed with 4429."""
        while True:
            item = await self.session.outbox.get()
            if item is None:
                return
            try:
                if isinstance(item, OutAudio):
                    sending = self.ws.send_bytes(item.data)
                else:
                    sending = self.ws.send_text(json.dumps(item.payload, ensure_ascii=False))
                await asyncio.wait_for(sending, self.send_timeout_s)
            except asyncio.TimeoutError as exc:
                raise SlowReaderError(
                    f"the client read no audio for {self.send_timeout_s:g} s while "
                    f"{self.session.outbox.audio_seconds:.1f} s more waited: read the socket as audio "
                    "arrives (buffer it for playback on your side)"
                ) from exc
            except WebSocketDisconnect as exc:
                raise _Disconnected from exc

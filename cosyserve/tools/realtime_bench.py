"""``cosyserve bench --realtime``: text streamed in at an LLM's pace, audio played as it arrives.

The real server (in this process, uvicorn on 127.0.0.1 with an ephemeral port; or ``--url`` for a
running one) is driven over ``WS /v1/audio/speech/stream-input`` by a client that sends the text
word by word at ``--words_per_s`` (15 by default, a typical LLM token rate), then ``close``. Per
run it reports:

* ``first_audio_after_sentence_s``: from sending the word that completes the first sentence to
  receiving the first audio of the answer: what a voice agent's user waits once the LLM has
  written a sentence.
* ``underrun_s`` / ``underruns``: a player that starts with the first audio and plays in real
  time has nothing to play for this long in total (in this many gaps over 10 ms) before the
  answer's end: the stream fell behind playback.
* ``first_audio_s`` (from the first word sent), ``audio_s``, ``feed_s`` (how long the text took to
  arrive) and ``done_s`` (first word to last audio).

Figures are medians over ``--runs`` (after one warm-up run). Without ``--model_dir`` the
embedded default voice speaks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

PATH = "/v1/audio/speech/stream-input"
DEFAULT_TEXT = (
    "Sure, here is the forecast for today. The morning starts cool and clear, with a light breeze "
    "from the west. Around noon, clouds build up over the hills, and a short shower is likely in "
    "the afternoon. The evening turns dry again, so a walk after dinner should be pleasant. "
    "Tomorrow looks brighter and a little warmer."
)
GAP_S = 0.01  # shorter silences are scheduling jitter, not audible underruns
_SENTENCE_END = re.compile(r"[.!?。！？;；][\"'”’)]*$")


@dataclass
class RunResult:
    first_audio_after_sentence_s: float | None = None
    first_audio_s: float | None = None
    underrun_s: float = 0.0
    underruns: int = 0
    audio_s: float = 0.0
    feed_s: float = 0.0
    done_s: float = 0.0
    segments: int = 0
    error: str | None = None
    arrivals: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        out = {
            "first_audio_after_sentence_s": r(self.first_audio_after_sentence_s),
            "first_audio_s": r(self.first_audio_s),
            "underrun_s": r(self.underrun_s),
            "underruns": self.underruns,
            "audio_s": r(self.audio_s),
            "feed_s": r(self.feed_s),
            "done_s": r(self.done_s),
            "segments": self.segments,
        }
        if self.error:
            out["error"] = self.error
        return out


def playback_underruns(arrivals: list[tuple[float, float]], gap_s: float = GAP_S) -> tuple[float, int]:
    """Total silence (and number of gaps longer than ``gap_s``) of a real-time player that starts
    with the first audio: ``arrivals`` are (arrival time, seconds of audio) in order."""
    if not arrivals:
        return 0.0, 0
    play_head = arrivals[0][0]
    total, gaps = 0.0, 0
    for arrived, seconds in arrivals:
        if arrived > play_head:
            wait = arrived - play_head
            total += wait
            gaps += wait > gap_s
            play_head = arrived
        play_head += seconds
    return total, gaps


def words(text: str) -> list[str]:
    """LLM-like pieces: each word with the space before it."""
    return re.findall(r"\s*\S+", text)


async def run_once(
    url: str,
    voice: str,
    text: str,
    words_per_s: float,
    api_key: str | None = None,
    segment_by: str = "sentence",
) -> RunResult:
    import websockets

    result = RunResult()
    pieces = words(text)
    first_sentence = next((i for i, p in enumerate(pieces) if _SENTENCE_END.search(p)), len(pieces) - 1)
    uri = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/") + PATH
    async with websockets.connect(uri, max_size=None, open_timeout=30) as ws:
        config: dict[str, Any] = {
            "type": "config",
            "voice": voice,
            "response_format": "pcm",
            "segment_by": segment_by,
        }
        if api_key:
            config["api_key"] = api_key
        await ws.send(json.dumps(config))
        started = json.loads(await ws.recv())
        if started.get("type") != "session.started":
            raise RuntimeError(f"the server refused the session: {started}")
        bytes_per_s = 2 * int(started["sample_rate"])
        t0 = time.perf_counter()
        sentence_sent_at: float | None = None

        async def feed() -> None:
            nonlocal sentence_sent_at
            for i, piece in enumerate(pieces):
                target = t0 + i / words_per_s
                await asyncio.sleep(max(0.0, target - time.perf_counter()))
                await ws.send(json.dumps({"type": "text", "text": piece}))
                if i == first_sentence:
                    sentence_sent_at = time.perf_counter()
            result.feed_s = time.perf_counter() - t0
            await ws.send(json.dumps({"type": "close"}))

        feeder = asyncio.create_task(feed())
        try:
            async for message in ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    if message:
                        result.arrivals.append((now, len(message) / bytes_per_s))
                    continue
                event = json.loads(message)
                if event["type"] == "segment.started":
                    result.segments += 1
                elif event["type"] == "error":
                    result.error = event["error"]["message"]
        finally:
            feeder.cancel()
    if result.arrivals:
        first_at = result.arrivals[0][0]
        result.first_audio_s = first_at - t0
        if sentence_sent_at is not None:
            result.first_audio_after_sentence_s = first_at - sentence_sent_at
        result.done_s = result.arrivals[-1][0] - t0
    result.audio_s = sum(seconds for _, seconds in result.arrivals)
    result.underrun_s, result.underruns = playback_underruns(result.arrivals)
    return result


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def aggregate(runs: list[RunResult], **context: Any) -> dict[str, Any]:
    keys = ("first_audio_after_sentence_s", "first_audio_s", "underrun_s", "audio_s", "feed_s", "done_s")
    summaries = [r.summary() for r in runs]
    out: dict[str, Any] = {"mode": "realtime", **context, "runs": len(runs)}
    for key in keys:
        out[key] = _median([s[key] for s in summaries])
    out["underruns"] = max((r.underruns for r in runs), default=0)
    out["per_run"] = summaries
    return out


class _InProcessServer:
    """The real app under uvicorn on 127.0.0.1 (an ephemeral port) in a background thread."""

    def __init__(self, settings: Any):
        import uvicorn

        from cosyserve.server.app import build_backend, create_app

        backend, report = build_backend(settings)
        self.backend = backend
        self.app = create_app(settings, backend=backend, launch_report=report)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self) -> _InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.02)
        port = int(self.server.servers[0].sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _default_voice(backend: Any) -> str:
    voices = backend.voices()
    english = [v.id for v in voices if v.kind != "saved" and (v.language or "").startswith("en")]
    builtin = [v.id for v in voices if v.kind != "saved"]
    if not (english or builtin):
        raise SystemExit("cosyserve bench --realtime: the model has no built-in voice; give --voice")
    return (english or builtin)[0]


def realtime_main(args: argparse.Namespace) -> int:
    """``cosyserve bench --realtime`` (see the module doc)."""
    from cosyserve.errors import CosyserveError
    from cosyserve.settings import Settings

    text = args.text or DEFAULT_TEXT
    runs = max(1, int(args.runs))

    async def measure(url: str, voice: str) -> list[RunResult]:
        async def once() -> RunResult:
            return await run_once(url, voice, text, args.words_per_s, args.api_key, args.segment_by)

        await once()  # warm-up
        return [await once() for _ in range(runs)]

    try:
        if args.url:
            if not args.voice:
                print("cosyserve bench --realtime --url: give --voice as well", file=sys.stderr)
                return 2
            backend_name, voice = "remote", args.voice
            results = asyncio.run(measure(args.url, voice))
        else:
            settings = Settings(
                model_dir=args.model_dir,
                api_key=None,
                cors_origins=[],
                host="127.0.0.1",
                realtime_idle_timeout_s=120.0,
            )
            with _InProcessServer(settings) as server:
                backend_name = server.backend.name
                voice = args.voice or _default_voice(server.backend)
                print(
                    f"realtime benchmark: {backend_name}, voice {voice}, {args.words_per_s:g} words/s, "
                    f"{runs} runs + 1 warm-up",
                    file=sys.stderr,
                    flush=True,
                )
                results = asyncio.run(measure(server.url, voice))
    except (CosyserveError, OSError, RuntimeError) as exc:
        message = exc.message if isinstance(exc, CosyserveError) else str(exc)
        print(f"cosyserve bench --realtime: {message}", file=sys.stderr)
        return 1
    report = aggregate(
        results,
        backend=backend_name,
        model_dir=args.model_dir,
        voice=voice,
        words_per_s=args.words_per_s,
        segment_by=args.segment_by,
        text_words=len(words(text)),
    )
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(report))
    return 0 if all(r.error is None and r.arrivals for r in results) else 1


def format_report(report: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        f"realtime: {report['backend']} ({report['voice']}), text fed at {report['words_per_s']:g} words/s, "
        f"segments by {report['segment_by']}, median of {report['runs']} runs",
        f"  first audio after the first sentence  {fmt(report['first_audio_after_sentence_s'])} s",
        f"  first audio after the first word      {fmt(report['first_audio_s'])} s",
        f"  playback underruns                    {fmt(report['underrun_s'])} s in {report['underruns']} gaps",
        f"  audio                                 {fmt(report['audio_s'])} s (text arrived over {fmt(report['feed_s'])} s)",
    ]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("realtime (--realtime)")
    group.add_argument(
        "--realtime",
        action="store_true",
        help="stream text in over the WebSocket at an LLM's pace; report first audio after the first "
        "sentence and playback underruns (embedded voice without --model_dir)",
    )
    group.add_argument(
        "--words_per_s", "--words-per-s", type=float, default=15.0, help="text feed rate (default 15)"
    )
    group.add_argument(
        "--segment_by",
        "--segment-by",
        choices=("sentence", "clause"),
        default="sentence",
        help="segments end at sentences (default) or, for earlier audio, at clauses",
    )
    group.add_argument("--text", default=None, help="the text to feed (default: a five-sentence forecast)")
    group.add_argument(
        "--api_key", "--api-key", default=None, help="the running server's API key (with --url)"
    )

"""SIGTERM with streams in flight, on a real `cosyserve serve` process: within the shutdown
timeout requests finish; at the deadline the server ends what still runs itself, cleanly: raw
PCM and MP3 bodies complete (a final frame, a proper end of the chunked body), SSE ends with an
error event, a request still waiting for its first audio gets a 503, and the log says how many
were cut, with no traceback and no task cancelled by uvicorn."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import audio_duration

REPO = Path(__file__).resolve().parents[2]
LONG = " ".join(f"Sentence {i}." for i in range(200))  # 200 segments: minutes of fake synthesis
TIMEOUT_S = 2.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(120)
def test_sigterm_cuts_streams_cleanly_at_the_deadline() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.server.serve_fake", str(port), str(TIMEOUT_S)],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.1)

        results: dict[str, object] = {}
        started = threading.Barrier(5)

        def stream(name: str, method: str, path: str, **kwargs) -> None:
            try:
                with (
                    httpx.Client(base_url=base, timeout=60) as client,
                    client.stream(method, path, **kwargs) as response,
                ):
                    pieces = []
                    for piece in response.iter_bytes():
                        pieces.append(piece)
                        if len(pieces) == 1:
                            started.wait(30)
                    results[name] = (response.status_code, b"".join(pieces))
            except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
                results[name] = exc

        def waiting() -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                time.sleep(0.3)  # submitted while the streams run
                started.wait(30)
                results["waiting"] = client.post(
                    "/inference_sft", data={"tts_text": "[hang] never.", "spk_id": "alice", "format": "wav"}
                )

        speech = {"model": "tts-1", "input": LONG, "voice": "alice", "stream": True}
        threads = [
            threading.Thread(
                target=stream,
                args=("pcm", "POST", "/inference_sft"),
                kwargs={"data": {"tts_text": LONG, "spk_id": "alice"}},
            ),
            threading.Thread(
                target=stream,
                args=("mp3", "POST", "/v1/audio/speech"),
                kwargs={"json": {**speech, "response_format": "mp3"}},
            ),
            threading.Thread(
                target=stream,
                args=("sse", "POST", "/v1/audio/speech"),
                kwargs={"json": {**speech, "response_format": "pcm", "stream_format": "sse"}},
            ),
            threading.Thread(target=waiting),
        ]
        for thread in threads:
            thread.start()
        started.wait(30)  # every stream has audio; the file request is in flight
        time.sleep(0.3)
        signalled = time.monotonic()
        server.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        _, log = server.communicate(timeout=60)
        took = time.monotonic() - signalled
    finally:
        if server.poll() is None:
            server.kill()

    # uvicorn re-raises the signal it handled once it has shut down
    assert server.returncode in (0, -signal.SIGTERM), log[-3000:]
    assert took < TIMEOUT_S + 4, f"shutdown took {took:.1f} s"
    for name in ("pcm", "mp3", "sse"):
        assert not isinstance(results[name], Exception), f"{name}: {results[name]!r}"
    status, pcm = results["pcm"]
    assert status == 200 and len(pcm) % 2 == 0 and audio_duration(pcm, "pcm") > 0
    status, mp3 = results["mp3"]
    assert status == 200 and audio_duration(mp3, "mp3") > 0.2  # decodes to its last frame
    status, sse = results["sse"]
    events = [json.loads(line[6:]) for line in sse.decode().splitlines() if line.startswith("data: ")]
    assert events[0]["type"] == "speech.audio.delta"
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "shutting_down"
    waited = results["waiting"]
    assert waited.status_code == 503 and waited.json()["error"]["code"] == "shutting_down"
    assert "Traceback" not in log and "Cancel" not in log, log[-3000:]
    assert log.count("cut by the shutdown deadline") == 3, log[-3000:]
    assert "3 streams and 1 requests waiting for audio were cut" in log, log[-3000:]

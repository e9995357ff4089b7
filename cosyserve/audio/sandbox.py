"""Decoding of client audio outside the server process.

FFmpeg's demuxers and decoders (through PyAV) parse whatever a client uploads; a crash in them
(PyAV's planar conversion of 8+ channels once segfaulted the server) or a decode that runs wild
must not take the server down. :class:`DecodeSandbox` keeps a few persistent worker processes
(:mod:`cosyserve.audio.decode_worker`), hands each upload to an idle one and waits with a
deadline. A worker that crashes or overruns is killed and replaced; only the request that caused
it fails, with a 400 that says so. The workers start once (not per request), so a decode costs
the pipe transfer on top of the decode itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosyserve.audio.decode_worker import FRAME, read_message
from cosyserve.errors import DecoderUnavailableError, InvalidRequestError

logger = logging.getLogger(__name__)

DEFAULT_WORKERS = 2
DEFAULT_TIMEOUT_S = 20.0
DEFAULT_MEMORY_MB = 1024
# One thread per worker is plenty for numpy here; fewer threads, less memory reserved.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class SandboxStats:
    decodes: int = 0  # answered by a worker (decoded or refused)
    refused: int = 0  # of those, refused with a reason (not audio, too long, ...)
    crashes: int = 0  # workers that died on an upload
    timeouts: int = 0  # workers killed for running past the deadline
    started: int = 0  # worker processes started
    seconds: float = 0.0  # summed wall time of decodes (transfer included)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "decodes": self.decodes,
                "refused": self.refused,
                "crashes": self.crashes,
                "timeouts": self.timeouts,
                "workers_started": self.started,
                "mean_decode_ms": round(1000 * self.seconds / self.decodes, 2) if self.decodes else None,
            }


class _Worker:
    def __init__(self, command: Sequence[str]):
        env = {**os.environ, **_WORKER_ENV}
        self.process = subprocess.Popen(
            list(command),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
            start_new_session=True,  # a terminal's Ctrl-C goes to the server, which closes us
        )
        self.timed_out = False

    def kill(self) -> None:
        self.timed_out = True
        self._kill()

    def _kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(OSError):  # it exited meanwhile
                self.process.kill()
        self.process.wait()

    def close(self) -> None:
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            self._kill()
        finally:
            if self.process.stdout is not None:
                self.process.stdout.close()


class DecodeSandbox:
    """Decodes uploads in up to ``workers`` worker processes (thread-safe, blocking calls).

    ``timeout_s``: a decode running longer kills its worker; ``memory_mb``: each worker's
    address-space limit; ``command``: the worker's command line (tests swap in a crashing one).
    """

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        memory_mb: int = DEFAULT_MEMORY_MB,
        command: Sequence[str] | None = None,
    ):
        if workers < 1:
            raise ValueError(f"a sandbox needs at least one worker, got {workers}")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.command = list(
            command or [sys.executable, "-m", "cosyserve.audio.decode_worker", str(memory_mb)]
        )
        self.stats = SandboxStats()
        self._slots = threading.BoundedSemaphore(self.workers)
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker now (they import numpy and PyAV while the server starts)."""
        with self._lock:
            while not self._closed and len(self._idle) < self.workers:
                self._idle.append(self._spawn())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()

    def _spawn(self) -> _Worker:
        try:
            worker = _Worker(self.command)
        except OSError as exc:
            raise DecoderUnavailableError(f"cannot start an audio decoder process: {exc}") from exc
        with self.stats._lock:
            self.stats.started += 1
        return worker

    # ---- decoding ------------------------------------------------------------------------

    def decode(self, data: bytes, max_duration_s: float | None = None) -> tuple[np.ndarray, int]:
        """Decode ``data`` to float32 mono at its own rate, as
        :func:`cosyserve.audio.io.decode_audio` does, in a worker process."""
        if not data:
            raise InvalidRequestError("the audio upload is empty")
        started = time.perf_counter()
        with self._slots:
            worker = self._take()
            try:
                header, payload = self._exchange(worker, data, max_duration_s)
            except BaseException:
                worker.close()
                raise
            self._give_back(worker)
        with self.stats._lock:
            self.stats.decodes += 1
            self.stats.seconds += time.perf_counter() - started
            if not header.get("ok"):
                self.stats.refused += 1
        if not header.get("ok"):
            raise InvalidRequestError(str(header.get("message") or "cannot decode the audio upload"))
        audio = np.frombuffer(payload, dtype="<f4").astype(np.float32)  # a writable copy
        return audio, int(header["sample_rate"])

    def _take(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise DecoderUnavailableError("the audio decoder is shut down (the server is stopping)")
            while self._idle:
                worker = self._idle.pop()
                if worker.process.poll() is None:
                    return worker
                worker.close()  # died while idle (killed from outside): replace it
        return self._spawn()

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
                return
        worker.close()

    def _exchange(
        self, worker: _Worker, data: bytes, max_duration_s: float | None
    ) -> tuple[dict[str, Any], bytes]:
        process = worker.process
        assert process.stdin is not None and process.stdout is not None  # noqa: S101 - Popen(PIPE)
        header = json.dumps({"max_duration_s": max_duration_s}).encode()
        # The deadline kills the worker, which also unblocks a write or read stuck on its pipes.
        timer = threading.Timer(self.timeout_s, worker.kill)
        timer.daemon = True
        timer.start()
        try:
            process.stdin.write(FRAME.pack(len(header), len(data)))
            process.stdin.write(header)
            process.stdin.write(data)
            process.stdin.flush()
            reply = read_message(process.stdout)
        except (OSError, EOFError, ValueError):
            reply = None
        finally:
            timer.cancel()
        if reply is not None:
            return reply
        worker._kill()
        return self._lost(worker, len(data))

    def _lost(self, worker: _Worker, size: int) -> Any:
        code = worker.process.returncode
        if worker.timed_out:
            with self.stats._lock:
                self.stats.timeouts += 1
            logger.warning(
                "audio decoder overran %.0f s on an upload of %d bytes; restarted", self.timeout_s, size
            )
            raise InvalidRequestError(
                f"the audio upload ({size} bytes) took longer than {self.timeout_s:g} s to decode: "
                "send a shorter recording in a common format (wav, flac, mp3, ogg)"
            )
        with self.stats._lock:
            self.stats.crashes += 1
        how = _describe_exit(code)
        logger.warning("audio decoder crashed (%s) on an upload of %d bytes; restarted", how, size)
        raise InvalidRequestError(
            f"cannot decode the audio upload ({size} bytes): the decoder crashed on it ({how}); "
            "the file is corrupt or not a plain audio recording"
        )

    def describe(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "timeout_s": self.timeout_s,
            "idle": len(self._idle),
            **self.stats.as_dict(),
        }


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"

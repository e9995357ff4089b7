"""Streaming token -> waveform pieces shared by the CosyVoice families.

* :func:`fade_in_out` / :func:`hamming`: upstream's cross-fade (float64 numpy window).
* :func:`apply_speed` / :class:`StreamingMelResampler`: speed change of a mel, whole
  (upstream's ``F.interpolate``) or incrementally over a stream of committed frames (the same
  interpolation, so chunk boundaries do not change the result).
* :class:`StreamingVocoder`: HiFT over a stream of committed mel frames with upstream's HiFT cache
  (mel context, source continuation, speech cross-fade); the cache sizes are the family's.

All randomness comes from a per-request ``torch.Generator`` or is injected (tests).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cosyserve.nn.hift import HiFTGenerator

logger = logging.getLogger(__name__)


def speed_frames(frames: int, speed: float) -> int:
    """Frames after speed change: ``int(T / speed)`` (upstream's ``F.interpolate`` size)."""
    return int(frames / speed)


def apply_speed(mel: Tensor, speed: float) -> Tensor:
    """Non-stream speed change: ``F.interpolate(mel, size=int(T / speed), mode='linear')``."""
    if speed == 1.0:
        return mel
    return F.interpolate(mel, size=speed_frames(mel.shape[2], speed), mode="linear")


def hamming(n: int) -> np.ndarray:
    """``np.hamming(n)``: float64, as upstream's cross-fade windows."""
    return np.hamming(n)


def fade_in_out(fade_in: Tensor, fade_out: Tensor, window: np.ndarray) -> Tensor:
    """Cross-fade the head of ``fade_in`` with the tail of ``fade_out`` over ``len(window)/2``.

    Computed in float64 (upstream multiplies float32 tensors by a float64 numpy window) and
    stored back in the tensor's dtype.
    """
    n = window.shape[0] // 2
    w = torch.from_numpy(window).to(fade_in.device)
    out = fade_in.clone()
    out[..., :n] = (fade_in[..., :n].double() * w[:n] + fade_out[..., -n:].double() * w[n:]).to(fade_in.dtype)
    return out


def speech_to_numpy(speech: Tensor) -> np.ndarray:
    """``[1, L]`` speech -> float32 numpy ``[L]`` on the CPU."""
    return speech[0].detach().float().cpu().numpy()


def module_device(module: object) -> torch.device:
    """The device of a module's first parameter (CPU for stand-ins without parameters)."""
    params = getattr(module, "parameters", None)
    if params is not None:
        for p in params():
            return p.device
    return torch.device("cpu")


class StreamingMelResampler:
    """Incremental ``F.interpolate(mode='linear', align_corners=False)`` with scale ``speed``.

    Output frame ``j`` reads input position ``max(0, (j + 0.5) * speed - 0.5)``, interpolating
    the two neighbouring frames; it is emitted as soon as both exist, so chunk boundaries do
    not change the result. ``finish`` emits up to ``int(T_in / speed)`` frames in total (the
    non-stream frame count), clamping at the last input frame.
    """

    def __init__(self, speed: float):
        if not (speed > 0 and math.isfinite(speed)):
            raise ValueError(f"speed must be a positive number, got {speed!r}")
        self.speed = float(speed)
        self._buf: Tensor | None = None  # the input frames still needed, [1, C, n]
        self._buf_start = 0  # absolute index of _buf[..., 0]
        self._n_in = 0
        self._n_out = 0

    def _src(self, j: int) -> float:
        return max(0.0, (j + 0.5) * self.speed - 0.5)

    def _emit(self, stop: int) -> Tensor | None:
        """Frames ``_n_out .. stop-1`` (all of whose inputs are buffered)."""
        if stop <= self._n_out:
            return None
        assert self._buf is not None
        pos = torch.tensor([self._src(j) for j in range(self._n_out, stop)], dtype=torch.float64)
        i0 = pos.floor().long()
        lam = (pos - i0).to(self._buf.device)
        i1 = torch.clamp(i0 + 1, max=self._n_in - 1)
        x = self._buf.double()
        idx0, idx1 = (i0 - self._buf_start).to(x.device), (i1 - self._buf_start).to(x.device)
        out = x[..., idx0] * (1 - lam) + x[..., idx1] * lam
        self._n_out = stop
        # Drop input frames no later output needs.
        keep_from = min(int(math.floor(self._src(stop))) - self._buf_start, self._buf.shape[-1])
        if keep_from > 0:
            self._buf = self._buf[..., keep_from:]
            self._buf_start += keep_from
        return out.to(self._buf.dtype)

    def push(self, mel: Tensor) -> Tensor | None:
        """Add input frames ``[1, C, n]``; returns the output frames now complete (or None)."""
        self._buf = mel if self._buf is None else torch.cat([self._buf, mel], dim=-1)
        self._n_in += mel.shape[-1]
        stop = self._n_out
        # Output j is complete once floor(src(j)) + 1 < n_in.
        while math.floor(self._src(stop)) + 1 < self._n_in:
            stop += 1
        return self._emit(stop)

    def finish(self, mel: Tensor | None = None) -> Tensor | None:
        """Add the last input frames and emit the remaining output frames."""
        if mel is not None and mel.shape[-1] > 0:
            self._buf = mel if self._buf is None else torch.cat([self._buf, mel], dim=-1)
            self._n_in += mel.shape[-1]
        if self._n_in == 0:
            return None
        return self._emit(speed_frames(self._n_in, self.speed))


@dataclass
class VocoderStep:
    """One HiFT call of a stream (tensors as upstream names them; for tests and tracing)."""

    hift_mel: Tensor  # mel given to HiFT (cache frames prepended)
    hift_cache_source: Tensor  # [1, 1, 0 or source_cache_len]
    hift_source: Tensor  # source used (head replaced by the cache)
    hift_speech: Tensor  # raw HiFT output, before the speech cross-fade
    out: Tensor  # samples released by this step [1, n]


class StreamingVocoder:
    """The HiFT half of streaming: committed mel frames in, speech out.

    Keeps upstream's HiFT cache (the last `mel_cache_len` mel frames, the last `source_cache_len`
    source and speech samples: 20 / 5120 in v1, 8 / 3840 in CosyVoice2): every call sees that
    much mel of left context, continues the source, and cross-fades its first `source_cache_len`
    samples with the withheld tail of the previous call (``hamming(2 source_cache_len)``).
    """

    def __init__(
        self,
        hift: HiFTGenerator,
        generator: torch.Generator | None = None,
        hift_noises: Sequence[tuple[Tensor, Tensor]] | None = None,
        *,
        mel_cache_len: int,
        source_cache_len: int,
    ):
        self.hift = hift
        self.generator = generator
        self._noises = list(hift_noises or [])
        self.mel_cache_len = mel_cache_len
        self.source_cache_len = source_cache_len
        self.speech_window = hamming(2 * source_cache_len)
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None  # (mel, source, speech)
        self._pending: Tensor | None = None
        self.finished = False

    def _run(self, mel: Tensor, finalize: bool) -> VocoderStep:
        if self._cache is not None:
            cache_mel, cache_source, cache_speech = self._cache
            mel = torch.cat([cache_mel, mel], dim=2)
        else:
            cache_source = torch.zeros(1, 1, 0, device=mel.device)
        phase, sine_noise = self._noises.pop(0) if self._noises else (None, None)
        speech, source = self.hift.inference(
            mel, cache_source=cache_source, generator=self.generator, phase=phase, sine_noise=sine_noise
        )
        raw = speech
        if self._cache is not None:
            speech = fade_in_out(speech, cache_speech, self.speech_window)
        if finalize:
            self._cache, out = None, speech
        else:
            n = self.source_cache_len
            self._cache = (mel[:, :, -self.mel_cache_len :], source[:, :, -n:], speech[:, -n:])
            out = speech[:, :-n]
        return VocoderStep(mel, cache_source, source, raw, out)

    def push(self, mel: Tensor | None, finalize: bool = False) -> VocoderStep | None:
        """Vocode newly committed frames ``[1, 80, n]``; None while waiting for more frames."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        if mel is not None and mel.shape[-1] > 0:
            self._pending = mel if self._pending is None else torch.cat([self._pending, mel], dim=2)
        pending = self._pending
        n = 0 if pending is None else pending.shape[-1]
        if finalize:
            self.finished = True
            if n == 0:
                # Nothing new (possible with speed change): release the withheld tail as is.
                if self._cache is None:
                    return None
                tail = self._cache[2]
                self._cache = None
                empty = tail.new_zeros(1, 80, 0)
                return VocoderStep(empty, tail.new_zeros(1, 1, 0), tail.new_zeros(1, 1, 0), tail, tail)
        elif n == 0 or (self._cache is None and n < self.mel_cache_len):
            # The first call must be long enough to fill the caches.
            return None
        assert pending is not None
        self._pending = None
        return self._run(pending, finalize)

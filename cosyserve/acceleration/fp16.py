"""The FP16 guard: a NaN/inf or flat flow output switches the flow back to FP32 for good."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------ FP16 guard


def mel_problem(mel: Tensor, min_std: float = 1e-3) -> str | None:
    """Why a flow output is unusable (None when fine): NaN/inf, or flat (a silent mel)."""
    if mel.numel() == 0:
        return None
    if not bool(torch.isfinite(mel).all()):
        return "NaN/inf in the flow output"
    if float(mel.float().std()) < min_std:
        return "flat flow output (silence)"
    return None


def audio_problem(audio: np.ndarray, min_rms: float = 1e-5, min_samples: int = 11025) -> str | None:
    """Why an audio chunk is unusable: NaN/inf, or digital silence over half a second or more."""
    if audio.size == 0:
        return None
    if not np.all(np.isfinite(audio)):
        return "NaN/inf audio"
    if audio.size >= min_samples and float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < min_rms:
        return "silent audio"
    return None


class FlowPrecisionGuard:
    """Wraps the CFM's ``solve_euler``: each output is checked; the first bad one switches the flow
    to FP32 for good (LLM unchanged) and that chunk is recomputed in FP32 from the same inputs."""

    def __init__(self, backend: CosyVoiceBackend, fp32_runner: Callable[..., Tensor] | None = None):
        self.backend = backend
        self.flow = backend.model.flow
        self.solve = self.flow.decoder.solve_euler  # the bound method, before we shadow it
        self.fp32_runner = fp32_runner  # estimator runner for FP32 (None: the eager estimator)
        self.tripped = False
        self.reason = ""
        self._lock = threading.Lock()

    def __call__(
        self, z: Tensor, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int | None = None
    ) -> Tensor:
        out = self.solve(z, mu, mask, spks, cond, n_timesteps)
        if self.tripped:
            return out
        problem = mel_problem(out)
        if problem is None:
            return out
        self.trip(problem)
        return self.solve(z.float(), mu.float(), mask.float(), spks.float(), cond.float(), n_timesteps)

    def trip(self, reason: str) -> None:
        with self._lock:
            if self.tripped:
                return
            self.tripped = True
            self.reason = f"flow switched to FP32 ({reason})"
            logger.warning("FP16 guard: %s; the LLM stays in FP16", self.reason)
            self.flow.float()
            self.flow.decoder.estimator_runner = self.fp32_runner
            self.backend.options.extra["fp16_guard"] = self.reason

    @torch.inference_mode()
    def probe(self, tokens: int = 60) -> str | None:
        """Warm-up check: one short flow run on random tokens; trips the guard when it is bad."""
        flow = self.flow
        device = next(flow.parameters()).device
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, flow.cfg.vocab_size, (1, tokens), generator=gen).to(device)
        speakers = getattr(self.backend, "speakers", None) or {}
        embedding = (
            next(iter(speakers.values()))
            if speakers
            else torch.randn(1, flow.cfg.spk_embed_dim, generator=gen)
        )
        flow.inference(ids, embedding=embedding.to(device), generator=gen)
        return self.reason or None


def install_fp16_guard(backend: CosyVoiceBackend, probe: bool = True) -> FlowPrecisionGuard:
    """Install the FP16 guard on the backend's flow (idempotent) and, by default, probe once."""
    decoder = backend.model.flow.decoder
    existing = decoder.__dict__.get("solve_euler")
    if isinstance(existing, FlowPrecisionGuard):
        return existing
    guard = FlowPrecisionGuard(backend)
    decoder.__dict__["solve_euler"] = guard  # instance attribute shadows the method
    backend.__dict__["fp16_guard"] = guard
    if probe:
        guard.probe()
    return guard


def guard_chunk(backend: Any, audio: np.ndarray) -> np.ndarray:
    """Per-chunk hook for the backend: returns the chunk, made safe.

    With an FP16 guard installed, a NaN/inf or digitally silent chunk switches the flow to FP32
    for the following chunks and NaN/inf samples become 0. Without one (FP32 plans) this is a
    no-op. Cost: one isfinite pass over the chunk.
    """
    guard: FlowPrecisionGuard | None = getattr(backend, "fp16_guard", None)
    if guard is None:
        return audio
    problem = audio_problem(audio)
    if problem is None:
        return audio
    guard.trip(problem)
    return np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)

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
    from cosyserve.interfaces import AccelTargets

from cosyserve.audio.checks import audio_problem

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


class FlowPrecisionGuard:
    """Wraps the CFM's ``solve_euler``: each output is checked; the first bad one switches the flow
    to FP32 for good (LLM unchanged) and that chunk is recomputed in FP32 from the same inputs.
    As the backend's ``audio_guard`` it also checks every audio chunk (:meth:`check_chunk`)."""

    def __init__(self, targets: AccelTargets, fp32_runner: Callable[..., Tensor] | None = None):
        self.targets = targets
        self.flow = targets.flow
        self.cfm = targets.cfm
        self.solve = self.cfm.solve_euler  # the bound method, before we shadow it
        self.fp32_runner = fp32_runner  # estimator runner for FP32 (None: the eager estimator)
        self.tripped = False
        self.reason = ""
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """``solve_euler``'s arguments, whatever the family's signature (tensors first)."""
        out = self.solve(*args, **kwargs)
        if self.tripped:
            return out
        problem = mel_problem(out)
        if problem is None:
            return out
        self.trip(problem)
        return self.solve(*(a.float() if isinstance(a, Tensor) else a for a in args), **kwargs)

    def trip(self, reason: str) -> None:
        with self._lock:
            if self.tripped:
                return
            self.tripped = True
            self.reason = f"flow switched to FP32 ({reason})"
            logger.warning("FP16 guard: %s; the LLM stays in FP16", self.reason)
            self.flow.float()
            self.cfm.estimator_runner = self.fp32_runner
            self.targets.extra["fp16_guard"] = self.reason

    @torch.inference_mode()
    def probe(self) -> str | None:
        """Warm-up check: one short flow run; trips the guard when it is bad."""
        if self.targets.probe_flow is not None:
            self.targets.probe_flow()
        return self.reason or None

    def check_chunk(self, audio: np.ndarray) -> np.ndarray:
        """Every audio chunk, made safe: a NaN/inf or digitally silent chunk switches the flow to
        FP32 for the following chunks and NaN/inf samples become 0 (one isfinite pass)."""
        problem = audio_problem(audio)
        if problem is None:
            return audio
        self.trip(problem)
        return np.nan_to_num(audio, nan=0.0, posinf=0.0, neginf=0.0)


def install_fp16_guard(backend: Any, targets: AccelTargets, probe: bool = True) -> FlowPrecisionGuard:
    """Install the FP16 guard on the flow's sampler and as the backend's per-chunk ``audio_guard``
    (idempotent) and, by default, probe once."""
    existing = targets.cfm.__dict__.get("solve_euler")
    if isinstance(existing, FlowPrecisionGuard):
        return existing
    guard = FlowPrecisionGuard(targets)
    targets.cfm.__dict__["solve_euler"] = guard  # instance attribute shadows the method
    backend.audio_guard = guard.check_chunk
    if probe:
        guard.probe()
    return guard

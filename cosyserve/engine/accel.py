"""Acceleration backends applied to a loaded CosyVoice backend according to an AccelPlan.

Each step either succeeds and reports what it did, or raises with a clear reason so the launcher
falls back to the next plan.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cosyserve.errors import BackendUnavailableError

if TYPE_CHECKING:
    from cosyserve.engine.cosyvoice import CosyVoiceBackend
    from cosyserve.engine.factory import AccelPlan

logger = logging.getLogger(__name__)


def preflight(plan: AccelPlan) -> None:
    """Fail fast, before loading the model, when the plan cannot work on this machine."""
    import torch

    if plan.device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError("CUDA is not available (CPU-only torch build or no GPU)")
    if plan.trt:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError(
                "TensorRT is not installed (pip install 'cosyserve[gpu]' on a CUDA machine)"
            ) from exc
    if plan.jit or plan.onnx_cpu or plan.int8_llm:
        raise BackendUnavailableError(f"plan {plan.name}: acceleration not available in this build yet")


def apply_plan(backend: CosyVoiceBackend, plan: AccelPlan) -> list[str]:
    """Apply the plan's accelerations to a loaded backend; returns what was applied."""
    applied: list[str] = []
    if plan.fp16:
        applied.append("fp16")
    return applied

"""The launcher's plan choice and its fallback chain, each step taken for a simulated reason:
TensorRT missing, CUDA out of memory, NaN audio, silent audio; and the FP16 guard keeping a
plan alive by moving the flow alone back to FP32.

"CUDA" is simulated on the tiny model: the preflight's CUDA check is patched to pass and the
backend is built on the CPU, so the real create_backend / build_cosyvoice / warm_up code runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from cosyserve.acceleration import apply as accel
from cosyserve.acceleration import launcher as factory
from cosyserve.acceleration.launcher import PLANS, AccelPlan, Hardware, create_backend, plan_chain
from cosyserve.errors import CosyserveError, ModelDirectoryError

NO_AUTO_FLAGS = dict(auto=False, force_config=None, fp16=True, load_jit=True, load_trt=True, trt_concurrent=3)


def settings(model_dir: Path | str | None = None, **kw: Any) -> SimpleNamespace:
    base = dict(
        model_dir=str(model_dir) if model_dir else None,
        auto=True,
        force_config=None,
        voices_dir=None,
        stream_first_hop=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


# ------------------------------------------------------------------------------------ plan choice


@pytest.mark.parametrize(
    "vram,first,contexts",
    [(24.0, "trt_jit_fp16", 2), (6.0, "trt_jit_fp16", 1), (3.0, "jit_fp16", 1), (1.5, "jit", 1)],
)
def test_gpu_tiers(vram: float, first: str, contexts: int) -> None:
    chain, why = plan_chain(Hardware(cuda=True, gpu_name="GPU", vram_gb=vram), settings())
    assert chain[0].name == first and chain[0].trt_concurrent == contexts
    assert [p.name for p in chain][-2:] == ["cpu_fast", "eager"]  # the GPU chain ends on the CPU
    assert "GPU" in why


def test_cpu_machine_picks_cpu_fast() -> None:
    chain, why = plan_chain(Hardware(cuda=False, cpu_count=2), settings())
    assert [p.name for p in chain] == ["cpu_fast", "eager"]
    assert "no CUDA GPU" in why
    assert not chain[0].int8  # int8 is opt-in only


def test_forced_and_explicit_configs() -> None:
    chain, why = plan_chain(Hardware(), settings(force_config="cpu_int8"))
    assert [p.name for p in chain] == ["cpu_int8"] and "forced" in why
    with pytest.raises(CosyserveError, match="unknown --force_config"):
        plan_chain(Hardware(), settings(force_config="warp_drive"))
    chain, _ = plan_chain(Hardware(cuda=True, vram_gb=16), settings(**NO_AUTO_FLAGS))
    assert chain[0].trt and chain[0].fp16 and chain[0].trt_concurrent == 3 and chain[-1].name == "eager"
    chain, _ = plan_chain(Hardware(cuda=False), settings(**NO_AUTO_FLAGS))
    assert not chain[0].trt and not chain[0].fp16  # GPU-only flags are dropped on a CPU machine


# ------------------------------------------------------------------------------------ fallbacks


Behaviour = Callable[[Any, AccelPlan], None]


def _nan_audio(backend: Any, plan: AccelPlan) -> None:
    hift = backend.model.hift
    real = hift.inference

    def nan_inference(*args: Any, **kwargs: Any) -> Any:
        speech, source = real(*args, **kwargs)
        return torch.full_like(speech, float("nan")), source

    hift.inference = nan_inference  # e.g. an FP16 vocoder overflowing


def _silent_audio(backend: Any, plan: AccelPlan) -> None:
    hift = backend.model.hift
    real = hift.inference

    def silent_inference(*args: Any, **kwargs: Any) -> Any:
        speech, source = real(*args, **kwargs)
        return torch.zeros_like(speech), source

    hift.inference = silent_inference


def _cuda_oom(backend: Any, plan: AccelPlan) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def simulate_gpu(monkeypatch: pytest.MonkeyPatch, behaviours: dict[str, Behaviour]) -> list[str]:
    """A 16 GB "GPU" whose plans run on the CPU; `behaviours[plan]` breaks a plan after its real
    CPU-equivalent accelerations are applied. Returns the plans that were built."""
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend

    built: list[str] = []
    monkeypatch.setattr(
        factory, "detect_hardware", lambda: Hardware(cuda=True, gpu_name="Sim GPU", vram_gb=16)
    )
    monkeypatch.setattr(accel, "_cuda_available", lambda: True)
    real_from_dir = CosyVoiceBackend.from_dir.__func__

    def from_dir(cls: Any, model_dir: Any, options: Any = None) -> Any:
        options = replace(options, device="cpu", fp16=False)
        return real_from_dir(cls, model_dir, options)

    monkeypatch.setattr(CosyVoiceBackend, "from_dir", classmethod(from_dir))
    real_apply = accel.apply_plan

    def apply_plan(backend: Any, plan: AccelPlan) -> list[str]:
        built.append(plan.name)
        # What a CPU can do of this plan: FP16 guard yes, CUDA graphs / TensorRT no.
        cpu_plan = replace(plan, device="cpu", jit=False, trt=False) if plan.device == "cuda" else plan
        applied = real_apply(backend, cpu_plan)
        if plan.name in behaviours:
            behaviours[plan.name](backend, plan)
        return applied

    monkeypatch.setattr(accel, "apply_plan", apply_plan)
    return built


def test_fallback_chain_takes_each_step(tiny_model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cosyserve.acceleration.trt import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here: its absence cannot be the first fallback")
    built = simulate_gpu(monkeypatch, {"jit_fp16": _cuda_oom, "jit": _nan_audio, "cuda_eager": _silent_audio})
    backend, report = create_backend(settings(tiny_model_copy))
    steps = [(f["plan"], f["reason"]) for f in report["fallbacks"]]
    assert [p for p, _ in steps] == ["trt_jit_fp16", "jit_fp16", "jit", "cuda_eager"]
    reasons = dict(steps)
    assert (
        "TensorRT is not installed" in reasons["trt_jit_fp16"] and "cosyserve[gpu]" in reasons["trt_jit_fp16"]
    )
    assert "OutOfMemoryError" in reasons["jit_fp16"]
    assert "NaN" in reasons["jit"]
    assert "silent" in reasons["cuda_eager"]
    assert report["plan"] == "cpu_fast"
    assert built == ["jit_fp16", "jit", "cuda_eager", "cpu_fast"]  # TensorRT failed before any load
    assert backend.options.extra["plan"] == "cpu_fast"
    applied = backend.options.extra["accelerations"]
    assert any(a.startswith("cpu threads") for a in applied) and any(a.startswith("malloc") for a in applied)


def test_fp16_guard_keeps_the_plan(tiny_model_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FP16 NaN in the flow does not cost the plan: the guard moves the flow alone to FP32 at the
    warm-up probe, and the warm-up synthesis then passes."""

    built = simulate_gpu(monkeypatch, {})
    real_apply = accel.apply_plan  # the simulate_gpu wrapper

    def apply_with_nan_estimator(backend: Any, plan: AccelPlan) -> list[str]:
        backend.model.flow.decoder.estimator_runner = lambda x, *rest: torch.full_like(x, float("nan"))
        return real_apply(backend, plan)

    monkeypatch.setattr(accel, "apply_plan", apply_with_nan_estimator)
    monkeypatch.setattr(accel, "preflight", lambda plan: None)  # as if TensorRT were installed
    monkeypatch.setattr(factory, "detect_hardware", lambda: Hardware(cuda=True, gpu_name="Sim", vram_gb=3))
    backend, report = create_backend(settings(tiny_model_copy))
    assert report["plan"] == "jit_fp16" and report["fallbacks"] == []
    assert built == ["jit_fp16"]
    applied = backend.options.extra["accelerations"]
    assert any(a.startswith("fp16 guard: flow switched to FP32 (NaN") for a in applied)
    assert backend.audio_guard is not None and "fp16_guard" in backend.options.extra


def test_broken_model_dir_fails_every_plan_at_once(
    tiny_model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = simulate_gpu(monkeypatch, {})
    (tiny_model_copy / "flow.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelDirectoryError, match="flow.pt"):
        create_backend(settings(tiny_model_copy))
    assert built == []  # no plan got as far as its accelerations


def test_every_plan_failing_is_one_clear_error(
    tiny_model_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(factory, "detect_hardware", lambda: Hardware(cpu_count=2))

    def broken(backend: Any, plan: AccelPlan) -> list[str]:
        raise RuntimeError(f"{plan.name} is broken")

    monkeypatch.setattr(accel, "apply_plan", broken)
    with pytest.raises(CosyserveError, match="no configuration could serve .*eager is broken"):
        create_backend(settings(tiny_model_copy))


def test_warm_up_refuses_bad_audio() -> None:
    from cosyserve.api import AudioChunk, SynthesisInfo, VoiceInfo
    from cosyserve.interfaces import Backend, GeneratorJob

    class OneChunk(Backend):
        def __init__(self, audio: np.ndarray):
            self.audio = audio

        def voices(self) -> list[VoiceInfo]:
            return [VoiceInfo("v", "sft")]

        def open(self, request):
            return GeneratorJob(iter([AudioChunk(self.audio, 22050, final=True)]), SynthesisInfo())

    assert factory.warm_up(OneChunk(np.full(1000, 0.1, np.float32))) >= 0
    for bad, why in (
        (np.zeros(0, np.float32), "no audio"),
        (np.zeros(100, np.float32), "silent"),
        (np.array([0.1, np.nan], np.float32), "NaN"),
    ):
        with pytest.raises(CosyserveError, match=why):
            factory.warm_up(OneChunk(bad))


def test_cpu_plans_are_known() -> None:
    assert PLANS["cpu_fast"].cpu_tuning and not PLANS["cpu_fast"].onnx_cpu and not PLANS["cpu_fast"].int8
    assert PLANS["cpu_onnx"].onnx_cpu and not PLANS["cpu_onnx"].int8
    assert PLANS["cpu_int8"].int8 and not PLANS["cpu_int8"].onnx_cpu  # torch int8 estimator, not ORT
    assert not PLANS["eager"].cpu_tuning  # the baseline: plain PyTorch
    accel.preflight(PLANS["cpu_fast"])
    accel.preflight(PLANS["cpu_onnx"])
    accel.preflight(PLANS["eager"])

"""The launcher's brain: detect the hardware, choose an acceleration plan, build the backend, and
fall back down the chain when a step fails at start or at warm-up.

VRAM tiers (the seed's): 8 GB+ → TensorRT + JIT + FP16 with 2 TensorRT contexts; 4–8 GB →
TensorRT + JIT + FP16; 2–4 GB → JIT + FP16; under 2 GB → JIT; no GPU → the best CPU path.
Every plan that is tried and dropped is recorded with its reason (``/performance_info``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from cosyserve.audio.checks import audio_problem
from cosyserve.errors import CosyserveError, ModelConfigError, ModelDirectoryError
from cosyserve.interfaces import Backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AccelPlan:
    name: str
    device: str  # "cuda" | "cpu"
    fp16: bool = False
    jit: bool = False
    trt: bool = False
    trt_concurrent: int = 1
    onnx_cpu: bool = False  # ONNX Runtime for the flow estimator (CPU)
    int8: bool = False  # opt-in dynamic int8 weights for the LLM and the flow estimator (CPU)
    cpu_tuning: bool = True  # CPU threads and allocator policy (off: plain PyTorch, the baseline)
    packed_llm: bool = False  # FP32 LLM linears fused and packed for oneDNN (CPU decode steps)
    bf16: bool = False  # opt-in bfloat16 LLM and estimator linears (CPUs with AVX512-BF16/AMX)
    # the torch estimator's time conditioning precomputed for the sampler's step times, the weights
    # it comes from freed (CosyVoice3's DiT: its adaptive norms, ~40 % of its parameters)
    time_table: bool = False


PLANS: dict[str, AccelPlan] = {
    "trt_jit_fp16": AccelPlan("trt_jit_fp16", "cuda", fp16=True, jit=True, trt=True),
    "jit_fp16": AccelPlan("jit_fp16", "cuda", fp16=True, jit=True),
    "jit": AccelPlan("jit", "cuda", jit=True),
    "cuda_eager": AccelPlan("cuda_eager", "cuda"),
    # CPU: measured on the 2-core VM (README), the torch estimator is as fast as ONNX Runtime's and
    # lighter (ORT holds its own weights and arena), so the default CPU plan keeps torch; cpu_onnx
    # is there for machines where ONNX Runtime wins (`cosyserve bench --test_all` shows both).
    "cpu_fast": AccelPlan("cpu_fast", "cpu", packed_llm=True, time_table=True),
    "cpu_onnx": AccelPlan("cpu_onnx", "cpu", onnx_cpu=True, packed_llm=True),
    "cpu_bf16": AccelPlan("cpu_bf16", "cpu", bf16=True, time_table=True),
    "cpu_int8": AccelPlan("cpu_int8", "cpu", int8=True, time_table=True),
    "eager": AccelPlan("eager", "cpu", cpu_tuning=False),
}
GPU_CHAIN = ["trt_jit_fp16", "jit_fp16", "jit", "cuda_eager", "cpu_fast", "eager"]
CPU_CHAIN = ["cpu_fast", "eager"]


@dataclass
class Hardware:
    cuda: bool = False
    gpu_name: str | None = None
    vram_gb: float = 0.0
    cpu_count: int = 1
    tensorrt: bool = False
    onnx_providers: list[str] = field(default_factory=list)


def detect_hardware() -> Hardware:
    import torch

    hw = Hardware(cpu_count=os.cpu_count() or 1)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        hw.cuda, hw.gpu_name, hw.vram_gb = True, props.name, props.total_memory / 1024**3
    try:
        import tensorrt  # noqa: F401

        hw.tensorrt = True
    except ImportError:
        hw.tensorrt = False
    try:
        import onnxruntime

        hw.onnx_providers = list(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return hw


def plan_chain(hw: Hardware, settings: Any) -> tuple[list[AccelPlan], str]:
    """The ordered plans to try and why the first was chosen."""
    forced = getattr(settings, "force_config", None)
    if forced:
        if forced not in PLANS:
            raise CosyserveError(f"unknown --force_config {forced!r}; choose one of {', '.join(PLANS)}")
        return [PLANS[forced]], f"forced by --force_config {forced}"
    if not getattr(settings, "auto", True):
        # Explicit flags, as the seed's server takes them.
        device = "cuda" if hw.cuda else "cpu"
        plan = AccelPlan(
            "custom",
            device,
            fp16=bool(settings.fp16) and hw.cuda,
            jit=bool(settings.load_jit),
            trt=bool(settings.load_trt) and hw.cuda,
            trt_concurrent=int(settings.trt_concurrent),
        )
        return [plan, PLANS["eager"]], "explicit flags (--no-auto)"
    if not hw.cuda:
        return [PLANS[n] for n in CPU_CHAIN], f"no CUDA GPU: best CPU path on {hw.cpu_count} cores"
    vram = hw.vram_gb
    if vram >= 8:
        first, why = "trt_jit_fp16", f"{vram:.0f} GB VRAM (8 GB+): TensorRT + JIT + FP16, 2 TensorRT contexts"
    elif vram >= 4:
        first, why = "trt_jit_fp16", f"{vram:.1f} GB VRAM (4-8 GB): TensorRT + JIT + FP16"
    elif vram >= 2:
        first, why = "jit_fp16", f"{vram:.1f} GB VRAM (2-4 GB): JIT + FP16"
    else:
        first, why = "jit", f"{vram:.1f} GB VRAM (<2 GB): JIT"
    chain = [PLANS[n] for n in GPU_CHAIN[GPU_CHAIN.index(first) :]]
    if vram >= 8:
        chain[0] = replace(chain[0], trt_concurrent=2)
    return chain, f"{hw.gpu_name}: {why}"


def warm_up(backend: Backend) -> float:
    """One short real synthesis through the backend (its own warm-up request); returns seconds.
    Raises when the output is missing, NaN/inf or silent: the configuration is broken."""
    from cosyserve.engine.batching import synthesize_alone

    t0 = time.perf_counter()
    audio = synthesize_alone(backend, backend.warmup_request())
    problem = "no audio" if audio.size == 0 else audio_problem(audio, min_rms=1e-4, min_samples=0)
    if problem is not None:
        raise CosyserveError(f"warm-up produced {problem}")
    return time.perf_counter() - t0


def open_family(model_dir: str | Path) -> ModuleType:
    """The family package of a model directory, its config checked once (a bad config is the
    directory's fault, not a plan's: it fails the launch at once, with the file named)."""
    from cosyserve import families

    entry = families.detect(model_dir)
    module = entry.load()
    if not hasattr(module, "open_backend"):
        raise ModelConfigError(
            f"{model_dir}: this is a {entry.title} model directory ({entry.config_file}); cosyserve "
            f"recognises {entry.title} but does not support it yet"
        )
    module.load_config(model_dir)
    return module


def build_backend(family: ModuleType, model_dir: str, plan: AccelPlan, settings: Any) -> Backend:
    from cosyserve.acceleration.apply import apply_plan, preflight
    from cosyserve.families.base import FamilyOptions
    from cosyserve.runtime.memory import release_free_memory, tune_cpu_allocator

    preflight(plan)  # cheap checks (packages, devices) before the model is loaded
    # Before loading, so the load's own allocations already follow the CPU allocator policy.
    allocator = tune_cpu_allocator() if plan.device == "cpu" and plan.cpu_tuning else None

    options = FamilyOptions(
        device=plan.device,
        fp16=plan.fp16,
        voices_dir=getattr(settings, "voices_dir", None),
        stream_first_hop=getattr(settings, "stream_first_hop", None),
    )
    backend = family.open_backend(model_dir, options)
    applied = apply_plan(backend, plan) + ([allocator] if allocator else [])
    release_free_memory()  # what loading and quantising freed
    backend.options.extra.update({"plan": plan.name, "accelerations": applied})
    return backend


def create_backend(settings: Any) -> tuple[Backend, dict[str, Any]]:
    """Build the backend the settings ask for; returns it with the launcher report."""
    report: dict[str, Any] = {"fallbacks": []}
    model_dir = getattr(settings, "model_dir", None)
    if not model_dir:
        from cosyserve.families.piper.backend import EmbeddedBackend

        backend = EmbeddedBackend()
        report.update(
            plan="embedded",
            reason="no --model_dir: the embedded default voice",
            warmup_s=round(warm_up(backend), 3),
        )
        logger.info("no --model_dir given: serving the embedded default voice")
        return backend, report

    from cosyserve.hub import resolve_model_dir

    local_dir = str(resolve_model_dir(model_dir))
    family = open_family(local_dir)
    hw = detect_hardware()
    chain, why = plan_chain(hw, settings)
    report["hardware"] = asdict(hw)
    report["reason"] = why
    logger.info("hardware: %s; plan chain: %s (%s)", hw, " -> ".join(p.name for p in chain), why)
    last_error: Exception | None = None
    for plan in chain:
        try:
            t0 = time.perf_counter()
            backend = build_backend(family, local_dir, plan, settings)
            warm_s = warm_up(backend)
            report.update(plan=plan.name, plan_detail=asdict(plan), warmup_s=round(warm_s, 3))
            logger.info(
                "serving with plan %s (built and warmed in %.1f s)", plan.name, time.perf_counter() - t0
            )
            return backend, report
        except ModelDirectoryError:
            raise  # a broken model directory fails every plan alike
        except Exception as exc:  # noqa: BLE001 - every other failure means: try the next plan
            last_error = exc
            reason = f"{type(exc).__name__}: {exc}"
            report["fallbacks"].append({"plan": plan.name, "reason": reason})
            logger.warning("plan %s failed (%s); falling back", plan.name, reason)
            _free_cuda()
    raise CosyserveError(f"no configuration could serve {model_dir}: {last_error}")


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass

"""Acceleration backends applied to a loaded CosyVoice backend according to an AccelPlan.

Each step either succeeds and reports what it did, or raises with a clear reason so the launcher
falls back to the next plan. What each plan field does:

* ``device="cpu"`` with ``cpu_tuning`` (every CPU plan but the ``eager`` baseline): torch
  intra-op threads = physical cores, inter-op threads = 1, the allocator policy of
  :func:`tune_cpu_allocator` (HiFT's own mmaps only with ``COSYSERVE_VOCODER_MMAP=1``), and the
  position projections' weights paged out between steps (:func:`keep_paged_out`).
* ``time_table`` (``cpu_fast``, ``cpu_bf16``, ``cpu_int8``): where the torch estimator can
  (CosyVoice3's DiT), its time conditioning is computed once for the sampler's step times and the
  weights it comes from are freed (~540 MB full size); done first, so later conversions skip them.
* ``packed_llm`` (``cpu_fast``, ``cpu_onnx``): the LLM's projections fused and its FP32 linear
  layers packed for oneDNN (:mod:`.acceleration.packed`: the decode step streams its weights faster).
* ``onnx_cpu`` (``cpu_onnx``): the flow estimator runs on ONNX Runtime (the model
  directory's ``flow.decoder.estimator.fp32.onnx`` when it matches the weights, else exported
  once); the eager estimator's weights are then released. The vocoder stays eager (see
  ``CPU_ORT_VOCODER``).
* ``bf16`` (the opt-in ``cpu_bf16`` plan, CPUs that multiply bfloat16 natively: AVX512-BF16,
  AMX): the LLM's and the flow estimator's linear layers packed in bfloat16 for oneDNN (half the
  bytes per decode step, AMX tiles for the estimator), but for the LLM's speech head and the DiT's
  output projection; the estimator is checked against FP32 at load (``ESTIMATOR_BF16_RTOL``).
* ``int8`` (the opt-in ``cpu_int8`` plan): dynamic int8 weights for the linear layers of the LLM
  and of the flow estimator (torch; each packed for the kernel that suits it, see
  :mod:`.acceleration.quant`); the estimator is checked against FP32 at load (see
  ``cosyserve bench`` for the measured deviation of both).
* ``jit``: the official TorchScript files when present and matching; on CUDA also the LLM decode
  step as a CUDA graph and (without TensorRT) a torch.compile'd estimator.
* ``trt``: a TensorRT engine for the estimator (built from the ONNX and cached per GPU/precision),
  ``trt_concurrent`` execution contexts.
* ``fp16``: the LLM and flow in half precision (done at load), guarded: every flow output is
  checked (finite, not flat) and the flow alone goes back to FP32 the first time one is bad
  (upstream issues #1113/#1114: NaN/silent v1 flow in FP16). :func:`guard_chunk` is the same
  check on every audio chunk, for the backend to call.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from cosyserve.acceleration.fp16 import install_fp16_guard
from cosyserve.acceleration.packed import bf16_native, pack_estimator_bf16, pack_llm
from cosyserve.errors import AcceleratorUnavailableError
from cosyserve.interfaces import AccelTargets
from cosyserve.nn.cfm import euler_times
from cosyserve.nn.checkpoint import detach_from_checkpoint
from cosyserve.runtime.memory import (
    allocator_tuned,
    keep_paged_out,
    release_free_heap_pages,
    vocoder_allocation,
)
from cosyserve.runtime.threads import configure_cpu_threads

if TYPE_CHECKING:
    from cosyserve.acceleration.launcher import AccelPlan

logger = logging.getLogger(__name__)

# Measured on the 2-core VM with the full-size model (`cosyserve bench`, warm processes): ONNX
# Runtime runs the estimator ~1.3-2x faster than eager torch, but the HiFT conv stack slower than
# the eager channels-last (oneDNN) path (best of 8: 2.2 s vs 1.2 s for 5 s of audio), so the
# vocoder stays eager unless COSYSERVE_ORT_VOCODER=1.
CPU_ORT_VOCODER = os.environ.get("COSYSERVE_ORT_VOCODER", "0") == "1"

# COSYSERVE_VOCODER_MMAP=1: HiFT's large activations get their own mmaps (see
# install_vocoder_allocation). Measured on CosyVoice2 cpu_fast (2-core VM, one session): peak RSS
# 2,524 -> 2,375 MiB for HiFT 1.12 -> 1.49 s per 5 s of audio, so it is off unless memory is tighter
# than time.
VOCODER_MMAP = os.environ.get("COSYSERVE_VOCODER_MMAP", "0") == "1"


# The bf16 estimator's accepted error against FP32 (as int8's: max |bf16 - fp32| / max |fp32| on
# the load-time check).
ESTIMATOR_BF16_RTOL = 5e-2


def install_vocoder_allocation(hift: torch.nn.Module, blocks: tuple[type, ...] = ()) -> None:
    """Run every ``hift.inference`` call under :func:`vocoder_allocation` (instance attribute),
    and hand the heap's free pages back after each of its residual ``blocks``: the signal-length
    tensors they free would otherwise stay resident as reused heap chunks until the step ends
    (measured: HiFT's peak -50 MB at 5 s of audio, for ~3 % of its time)."""
    for module in hift.modules():
        if blocks and isinstance(module, blocks):
            module.register_forward_hook(lambda *_: release_free_heap_pages())
    inference = hift.inference

    @functools.wraps(inference)
    def allocated(*args: Any, **kwargs: Any) -> Any:
        with vocoder_allocation():
            return inference(*args, **kwargs)

    hift.__dict__["inference"] = allocated


# ------------------------------------------------------------------------------------ preflight


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def preflight(plan: AccelPlan) -> None:
    """Fail fast, before loading the model, when the plan cannot work on this machine."""
    if plan.device == "cuda" and not _cuda_available():
        raise AcceleratorUnavailableError("CUDA is not available (CPU-only torch build or no GPU)")
    if plan.fp16 and plan.device != "cuda":
        raise AcceleratorUnavailableError(
            "fp16 needs a CUDA device (the CPU path runs FP32, or int8 with cpu_int8)"
        )
    if plan.trt:
        if plan.device != "cuda":
            raise AcceleratorUnavailableError("TensorRT needs a CUDA device")
        from cosyserve.acceleration.trt import require_tensorrt

        require_tensorrt()
    if plan.onnx_cpu:
        if importlib.util.find_spec("onnxruntime") is None:
            raise AcceleratorUnavailableError("onnxruntime is not installed (pip install onnxruntime)")
        if plan.device != "cpu":
            raise AcceleratorUnavailableError("the ONNX Runtime estimator path is the CPU path")
    if plan.bf16:
        if plan.device != "cpu":
            raise AcceleratorUnavailableError("the bf16 plan is a CPU plan (GPUs run fp16)")
        if not bf16_native():
            raise AcceleratorUnavailableError(
                "this CPU has no native bfloat16 (AVX512-BF16 or AMX): bf16 would be slower than FP32"
            )
    if plan.int8:
        if plan.device != "cpu":
            raise AcceleratorUnavailableError("int8 dynamic quantisation runs on CPU only")
        if not torch.backends.quantized.supported_engines or torch.backends.quantized.supported_engines == [
            "none"
        ]:
            raise AcceleratorUnavailableError(
                "this torch build has no quantized CPU engine (fbgemm/onednn/qnnpack)"
            )


# ------------------------------------------------------------------------------------ apply


def _release_estimator_weights(targets: AccelTargets) -> None:
    """Free the eager estimator's weights once a checked runner replaces it (~330 MB full size);
    its structure stays (on the meta device), so calling it fails loudly instead of silently."""
    targets.cfm.estimator.to(device="meta")
    detach_from_checkpoint(targets.flow)
    logger.info("eager estimator weights released (the accelerated runner serves the estimator)")


def _release_vocoder_conv_weights(vocoder: torch.nn.Module) -> None:
    """Free the HiFT conv stack's torch weights once ONNX Runtime runs it (f0 predictor and
    source module stay: they still run in torch)."""
    for name in ("conv_pre", "ups", "source_downs", "source_resblocks", "resblocks", "conv_post"):
        module = getattr(vocoder, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device="meta")
    detach_from_checkpoint(vocoder)


def apply_plan(backend: Any, plan: AccelPlan) -> list[str]:
    """Apply the plan's accelerations to a loaded backend (through the parts its family names in
    ``backend.accel_targets()``); returns what was applied."""
    applied: list[str] = []
    targets: AccelTargets = backend.accel_targets()
    model_dir, cfm = targets.model_dir, targets.cfm
    if plan.device == "cpu" and plan.cpu_tuning:
        applied.append(configure_cpu_threads(getattr(backend.options, "num_threads", None)))
        if allocator_tuned() and VOCODER_MMAP:
            install_vocoder_allocation(targets.vocoder, targets.vocoder_blocks)
            applied.append("malloc: vocoder blocks mmap'd (COSYSERVE_VOCODER_MMAP=1)")
        if allocator_tuned():
            keep_paged_out(targets.cold_weights)
    if plan.time_table:  # before the conversions below: they skip the freed layers
        applied += _freeze_time_conditioning(cfm)
    if plan.packed_llm:  # FP32 CPU plans only; pack_llm leaves any other LLM as it is
        count = pack_llm(targets.llm)
        if count:
            applied.append(f"packed fp32 llm ({count} linear layers, oneDNN)")
    if plan.bf16:
        from cosyserve.acceleration.quant import convert_estimator_checked

        if cfm.estimator_runner is not None:
            raise AcceleratorUnavailableError("bf16 packs the torch estimator; this plan replaced it")
        count, err = convert_estimator_checked(
            cfm.estimator, pack_estimator_bf16, ESTIMATOR_BF16_RTOL, "bf16"
        )
        applied.append(f"bf16 flow estimator ({count} linear layers, oneDNN; error {err:.1e})")
        count = pack_llm(targets.llm, torch.bfloat16)
        applied.append(f"bf16 llm ({count} linear layers, oneDNN; speech head fp32)")
    if plan.fp16:
        applied.append("fp16 (llm, flow)")
    if plan.jit:
        from cosyserve.acceleration import jit

        if targets.torchscript:
            applied += jit.load_torchscript_parts(model_dir, targets.llm, targets.flow, plan.fp16)
        if plan.device == "cuda":
            if targets.graphed_decode:
                jit.install_graphed_decoder(targets.llm)
                applied.append("cuda-graph llm decode step")
            if not plan.trt:
                applied.append(jit.compile_estimator(cfm))
    if plan.trt:
        applied.append(_install_trt(targets, plan))
    if plan.onnx_cpu:
        from cosyserve.acceleration.onnx_export import install_ort_hift, load_or_export_estimator

        threads = torch.get_num_threads()
        runner, desc = load_or_export_estimator(model_dir, cfm.estimator, threads)
        cfm.estimator_runner = runner
        # Chunk-aware flows (CosyVoice2) still stream through the torch estimator: keep it then.
        if not getattr(cfm, "serves_eager_estimator", False):
            _release_estimator_weights(targets)
        applied.append(desc)
        if CPU_ORT_VOCODER:
            _, desc = install_ort_hift(model_dir, targets.vocoder, threads)
            _release_vocoder_conv_weights(targets.vocoder)
            applied.append(desc)
    if plan.int8:
        from cosyserve.acceleration.quant import quantize_estimator_int8, quantize_llm_int8

        if cfm.estimator_runner is not None:
            raise AcceleratorUnavailableError("int8 quantises the torch estimator; this plan replaced it")
        # The FP32 weights are paged out layer by layer as they are quantised; what stays float
        # (convolutions, embeddings, norms) stays memory-mapped, resident only where it is read.
        count, err = quantize_estimator_int8(cfm.estimator)
        applied.append(f"int8 flow estimator ({count} linear layers, dynamic; error {err:.1e})")
        count = quantize_llm_int8(targets.llm)
        applied.append(f"int8 llm ({count} linear layers, dynamic)")
    if plan.fp16:
        guard = install_fp16_guard(backend, targets)
        applied.append("fp16 guard" if not guard.tripped else f"fp16 guard: {guard.reason}")
    return applied


def _freeze_time_conditioning(cfm: Any) -> list[str]:
    """Precompute the torch estimator's time conditioning for the sampler's step times and free
    its weights, where the estimator can (CosyVoice3's DiT); nothing for the others."""
    freeze = getattr(cfm.estimator, "freeze_time_conditioning", None)
    if cfm.estimator_runner is not None or not callable(freeze):
        return []
    n = cfm.cfg.n_timesteps
    freed = freeze(euler_times(n))
    return [
        f"time conditioning precomputed for the {n} Euler steps ({freed / 2**20:.0f} MiB of weights freed)"
    ]


def _install_trt(targets: AccelTargets, plan: AccelPlan) -> str:
    from cosyserve.acceleration import trt
    from cosyserve.acceleration.onnx_export import (
        ESTIMATOR_ONNX,
        artifact_dir,
        check_estimator,
        export_estimator,
        find_artifact,
    )

    model_dir = targets.model_dir
    estimator = targets.cfm.estimator
    onnx_path = find_artifact(model_dir, ESTIMATOR_ONNX)
    if onnx_path is None:
        onnx_path = export_estimator(estimator, artifact_dir(model_dir) / ESTIMATOR_ONNX)
    runner, desc = trt.load_or_build(
        onnx_path, artifact_dir(model_dir), fp16=plan.fp16, concurrent=plan.trt_concurrent
    )
    # FP16 engines are checked loosely here; the FP16 guard catches NaN/flat output at run time.
    check_estimator(runner, estimator, runner.path.name, rtol=5e-2 if plan.fp16 else 1e-3)
    targets.cfm.estimator_runner = runner
    return desc

"""Acceleration backends applied to a loaded CosyVoice backend according to an AccelPlan.

Each step either succeeds and reports what it did, or raises with a clear reason so the launcher
falls back to the next plan. What each plan field does:

* ``device="cpu"`` with ``cpu_tuning`` (every CPU plan but the ``eager`` baseline): torch
  intra-op threads = physical cores, inter-op threads = 1, the allocator policy of
  :func:`tune_cpu_allocator`, and the position projections' weights paged out between steps
  (:func:`keep_paged_out`).
* ``onnx_cpu`` (``cpu_onnx``): the flow estimator runs on ONNX Runtime (the model
  directory's ``flow.decoder.estimator.fp32.onnx`` when it matches the weights, else exported
  once); the eager estimator's weights are then released. The vocoder stays eager (see
  ``CPU_ORT_VOCODER``).
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

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from cosyserve.errors import BackendUnavailableError
from cosyserve.models.hift import ResBlock
from cosyserve.models.loader import detach_from_checkpoint
from cosyserve.models.transformer import RelPositionMultiHeadedAttention

if TYPE_CHECKING:
    from cosyserve.engine.cosyvoice import CosyVoiceBackend
    from cosyserve.engine.factory import AccelPlan

logger = logging.getLogger(__name__)

# Measured on the 2-core VM with the full-size model (`cosyserve bench`, warm processes): ONNX
# Runtime runs the estimator ~1.3-2x faster than eager torch, but the HiFT conv stack slower than
# the eager channels-last (oneDNN) path (best of 8: 2.2 s vs 1.2 s for 5 s of audio), so the
# vocoder stays eager unless COSYSERVE_ORT_VOCODER=1.
CPU_ORT_VOCODER = os.environ.get("COSYSERVE_ORT_VOCODER", "0") == "1"


# ------------------------------------------------------------------------------------ CPU


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (topo / "core_id").read_text().strip()
            package = (topo / "physical_package_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def configure_cpu_threads(threads: int | None = None) -> str:
    """torch intra-op threads = physical cores (more only adds contention), inter-op = 1 (nothing
    in the pipeline runs independent ops in parallel)."""
    n = int(threads) if threads else physical_cores()
    torch.set_num_threads(n)
    # Only settable before the first inter-op work in the process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return f"cpu threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"


# glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8
_HEAP_BLOCKS = 32 << 20  # blocks below this come from the heap (glibc's own ceiling for its threshold)
_VOCODER_BLOCKS = 256 << 10  # while vocoding: blocks from this size get their own mmap
_libc: Any = None  # set by tune_cpu_allocator on glibc; the functions below are no-ops until then


def tune_cpu_allocator() -> str | None:
    """Fast activations, bounded memory (Linux/glibc only).

    Measured on the full-size model (2-core VM): serving every block >= 256 KB with its own mmap
    keeps peak RSS lowest but costs 20 % end to end (each activation page-faults afresh: the torch
    estimator 0.65 -> 1.2 s per call, HiFT 1.3 -> 1.9 s); serving them from the heap is fast, but
    the heap keeps what it frees, and HiFT's 14 MB activations fragment it (+150-250 MB peak). So:
    blocks come from the heap (2 arenas), except while HiFT runs (:func:`vocoder_allocation`), and
    :func:`release_free_memory` hands free heap pages back after each audio step and after loading.
    ``COSYSERVE_MALLOC_TUNING=0`` leaves the allocator alone."""
    global _libc
    if os.environ.get("COSYSERVE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_ARENA_MAX, 2) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS) == 1
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None
    if not ok:
        return None
    _libc = libc
    return "malloc: heap blocks, mmap'd while vocoding, free heap returned after each audio step"


_MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (older kernels: EINVAL, nothing happens)
# Weights read only to fill a cache (the relative-position projections): paged out between steps.
_cold_weights: weakref.WeakSet[Tensor] = weakref.WeakSet()


def keep_paged_out(tensors: Iterable[Tensor]) -> int:
    """Page these CPU tensors out at every :func:`release_free_memory` (when the allocator policy
    is on); returns how many. Meant for weights that are read rarely, e.g. only when a cache grows:
    memory-mapped from the checkpoint, their pages leave RSS and are read back from the file if
    they are ever needed again."""
    count = 0
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.numel():
            _cold_weights.add(tensor)
            count += 1
    return count


def page_out(tensor: Tensor) -> None:
    """Ask the kernel to reclaim the whole pages under a CPU tensor (``MADV_PAGEOUT``). Never loses
    data: clean file-backed pages are dropped (and re-read on access), anonymous pages go to swap
    or, without swap, stay."""
    if _libc is None:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # only pages the tensor fills
    if last > first:
        _libc.madvise(first, last - first, _MADV_PAGEOUT)


def release_free_heap_pages() -> None:
    """``malloc_trim`` alone (no page-out), when :func:`tune_cpu_allocator` enabled it."""
    if _libc is not None:
        _libc.malloc_trim(0)


def page_out_cold_weights() -> None:
    """Page out the tensors given to :func:`keep_paged_out` (microseconds when they are already out)."""
    for tensor in list(_cold_weights):
        page_out(tensor)


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim``) and page out the cold weights, when
    :func:`tune_cpu_allocator` enabled it. Cheap (a few ms); called between steps, never inside one."""
    if _libc is not None:
        release_free_heap_pages()
        page_out_cold_weights()


@contextlib.contextmanager
def vocoder_allocation() -> Iterator[None]:
    """While HiFT runs, new blocks >= 256 KB get their own mmap (returned when freed) instead of
    growing the heap. Free heap chunks that fit are still reused, and stay resident once freed
    again, so the heap's free pages are handed back first (the flow's activations, just freed)."""
    if _libc is None:
        yield
        return
    release_free_heap_pages()
    _libc.mallopt(_M_MMAP_THRESHOLD, _VOCODER_BLOCKS)
    try:
        yield
    finally:
        _libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_BLOCKS)


def install_vocoder_allocation(hift: torch.nn.Module) -> None:
    """Run every ``hift.inference`` call under :func:`vocoder_allocation` (instance attribute),
    and hand the heap's free pages back after each of its residual blocks: the signal-length
    tensors they free would otherwise stay resident as reused heap chunks until the step ends
    (measured: HiFT's peak -50 MB at 5 s of audio, for ~3 % of its time)."""
    for module in hift.modules():
        if isinstance(module, ResBlock):
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
        raise BackendUnavailableError("CUDA is not available (CPU-only torch build or no GPU)")
    if plan.fp16 and plan.device != "cuda":
        raise BackendUnavailableError(
            "fp16 needs a CUDA device (the CPU path runs FP32, or int8 with cpu_int8)"
        )
    if plan.trt:
        if plan.device != "cuda":
            raise BackendUnavailableError("TensorRT needs a CUDA device")
        from cosyserve.engine.acceleration.trt import require_tensorrt

        require_tensorrt()
    if plan.onnx_cpu:
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailableError("onnxruntime is not installed (pip install onnxruntime)")
        if plan.device != "cpu":
            raise BackendUnavailableError("the ONNX Runtime estimator path is the CPU path")
    if plan.int8:
        if plan.device != "cpu":
            raise BackendUnavailableError("int8 dynamic quantisation runs on CPU only")
        if not torch.backends.quantized.supported_engines or torch.backends.quantized.supported_engines == [
            "none"
        ]:
            raise BackendUnavailableError(
                "this torch build has no quantized CPU engine (fbgemm/onednn/qnnpack)"
            )


# ------------------------------------------------------------------------------------ apply


def _release_estimator_weights(flow: torch.nn.Module) -> None:
    """Free the eager estimator's weights once a checked runner replaces it (~330 MB full size);
    its structure stays (on the meta device), so calling it fails loudly instead of silently."""
    estimator = flow.decoder.estimator
    estimator.to(device="meta")
    detach_from_checkpoint(flow)
    logger.info("eager estimator weights released (the accelerated runner serves the estimator)")


def _release_hift_conv_weights(hift: torch.nn.Module) -> None:
    """Free the HiFT conv stack's torch weights once ONNX Runtime runs it (f0 predictor and
    source module stay: they still run in torch)."""
    for name in ("conv_pre", "ups", "source_downs", "source_resblocks", "resblocks", "conv_post"):
        module = getattr(hift, name, None)
        if isinstance(module, torch.nn.Module):
            module.to(device="meta")
    detach_from_checkpoint(hift)


def apply_plan(backend: CosyVoiceBackend, plan: AccelPlan) -> list[str]:
    """Apply the plan's accelerations to a loaded backend; returns what was applied."""
    applied: list[str] = []
    model = backend.model
    model_dir = model.files.root
    flow = model.flow
    if plan.device == "cpu" and plan.cpu_tuning:
        applied.append(configure_cpu_threads(getattr(backend.options, "num_threads", None)))
        if _libc is not None and not plan.int8:
            # FP32 plans sit near their memory target; int8 has ~700 MB to spare and keeps HiFT fast.
            install_vocoder_allocation(model.hift)
        if _libc is not None:
            # The position projections' weights (~80 MB, full size) are read only when a position
            # cache grows; between requests they need not stay resident.
            keep_paged_out(
                m.linear_pos.weight
                for net in (model.llm, flow)
                for m in net.modules()
                if isinstance(m, RelPositionMultiHeadedAttention)
            )
    if plan.fp16:
        applied.append("fp16 (llm, flow)")
    if plan.jit:
        from cosyserve.engine.acceleration import jit

        applied += jit.load_torchscript_parts(model_dir, model.llm, flow, plan.fp16)
        if plan.device == "cuda":
            jit.install_graphed_decoder(model.llm)
            applied.append("cuda-graph llm decode step")
            if not plan.trt:
                applied.append(jit.compile_estimator(flow))
    if plan.trt:
        applied.append(_install_trt(backend, plan))
    if plan.onnx_cpu:
        from cosyserve.engine.acceleration.onnx_export import install_ort_hift, load_or_export_estimator

        threads = torch.get_num_threads()
        runner, desc = load_or_export_estimator(model_dir, flow.decoder.estimator, threads)
        flow.decoder.estimator_runner = runner
        _release_estimator_weights(flow)
        applied.append(desc)
        if CPU_ORT_VOCODER:
            _, desc = install_ort_hift(model_dir, model.hift, threads)
            _release_hift_conv_weights(model.hift)
            applied.append(desc)
    if plan.int8:
        from cosyserve.engine.acceleration.quant import quantize_estimator_int8, quantize_llm_int8

        if flow.decoder.estimator_runner is not None:
            raise BackendUnavailableError("int8 quantises the torch estimator; this plan replaced it")
        # The FP32 weights are paged out layer by layer as they are quantised; what stays float
        # (convolutions, embeddings, norms) stays memory-mapped, resident only where it is read.
        count, err = quantize_estimator_int8(flow.decoder.estimator)
        applied.append(f"int8 flow estimator ({count} linear layers, dynamic; error {err:.1e})")
        count = quantize_llm_int8(model.llm)
        applied.append(f"int8 llm ({count} linear layers, dynamic)")
    if plan.fp16:
        guard = install_fp16_guard(backend)
        applied.append("fp16 guard" if not guard.tripped else f"fp16 guard: {guard.reason}")
    return applied


def _install_trt(backend: CosyVoiceBackend, plan: AccelPlan) -> str:
    from cosyserve.engine.acceleration import trt
    from cosyserve.engine.acceleration.onnx_export import (
        ESTIMATOR_ONNX,
        artifact_dir,
        check_estimator,
        export_estimator,
        find_artifact,
    )

    model_dir = backend.model.files.root
    estimator = backend.model.flow.decoder.estimator
    onnx_path = find_artifact(model_dir, ESTIMATOR_ONNX)
    if onnx_path is None:
        onnx_path = export_estimator(estimator, artifact_dir(model_dir) / ESTIMATOR_ONNX)
    runner, desc = trt.load_or_build(
        onnx_path, artifact_dir(model_dir), fp16=plan.fp16, concurrent=plan.trt_concurrent
    )
    # FP16 engines are checked loosely here; the FP16 guard catches NaN/flat output at run time.
    check_estimator(runner, estimator, runner.path.name, rtol=5e-2 if plan.fp16 else 1e-3)
    backend.model.flow.decoder.estimator_runner = runner
    return desc


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

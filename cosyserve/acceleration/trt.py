"""TensorRT for the flow-decoder estimator: engine build from the ONNX, engine cache, a pool of
execution contexts, and a runner that plugs into the CFM's estimator slot.

Written against the TensorRT 10 tensor API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``). The shape profile is upstream's: batch 2 (one CFG pair), 4-3000 frames,
optimised for 500: ``x``/``mu``/``cond`` ``(2, 80, T)``, ``mask`` ``(2, 1, T)``, ``t`` ``(2,)``,
``spks`` ``(2, 80)``. ``max_batch`` > 2 widens the batch range (our ONNX has a dynamic batch) so
several requests' Euler steps can share one call.

Engines are cached next to the ONNX as ``flow.decoder.estimator.{fp16|fp32}.{gpu}.plan``; one
that cannot be deserialised (another TensorRT version or GPU) is rebuilt.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cosyserve.acceleration.onnx_export import ESTIMATOR_INPUTS, ESTIMATOR_OUTPUT
from cosyserve.errors import AcceleratorUnavailableError

logger = logging.getLogger(__name__)

INSTALL_ADVICE = (
    "TensorRT is not installed: on a CUDA machine, pip install 'cosyserve[gpu]' (tensorrt-cu12 >= 10), "
    "or run without --load_trt (the plan falls back to JIT/FP16 without TensorRT)"
)
MIN_FRAMES, OPT_FRAMES, MAX_FRAMES = 4, 500, 3000
CFG_BATCH = 2
WORKSPACE_BYTES = 4 << 30  # upstream's 4 GiB builder workspace


def require_tensorrt() -> Any:
    """The `tensorrt` module (version 10+), or AcceleratorUnavailableError with advice."""
    try:
        import tensorrt
    except ImportError as exc:
        raise AcceleratorUnavailableError(INSTALL_ADVICE) from exc
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer, CUDA mismatch)
        raise AcceleratorUnavailableError(f"TensorRT is installed but cannot be imported: {exc}") from exc
    major = int(str(getattr(tensorrt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise AcceleratorUnavailableError(
            f"TensorRT {tensorrt.__version__} is too old: cosyserve needs TensorRT 10+ (tensor API)"
        )
    return tensorrt


def tensorrt_version() -> str | None:
    try:
        return str(require_tensorrt().__version__)
    except AcceleratorUnavailableError:
        return None


def gpu_slug(name: str | None = None) -> str:
    if name is None:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "nogpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def engine_name(fp16: bool, gpu_name: str | None = None) -> str:
    return f"flow.decoder.estimator.{'fp16' if fp16 else 'fp32'}.{gpu_slug(gpu_name)}.plan"


def profile_shapes(
    name: str, shape: tuple[int, ...], max_batch: int = CFG_BATCH
) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) for one estimator input given its ONNX shape (-1 = dynamic)."""
    table = {
        "x": (None, 80, "T"),
        "mu": (None, 80, "T"),
        "cond": (None, 80, "T"),
        "mask": (None, 1, "T"),
        "t": (None,),
        "spks": (None, 80),
    }
    if name not in table:
        raise AcceleratorUnavailableError(f"unexpected estimator input {name!r}")
    dims = table[name]
    out = []
    for lo_hi in ((CFG_BATCH, MIN_FRAMES), (CFG_BATCH, OPT_FRAMES), (max_batch, MAX_FRAMES)):
        batch, frames = lo_hi
        row = []
        for i, d in enumerate(dims):
            static = shape[i] if i < len(shape) and shape[i] not in (-1, None) else None
            if d is None:
                row.append(static if static is not None else batch)
            elif d == "T":
                row.append(frames)
            else:
                row.append(d)
        out.append(tuple(row))
    return tuple(out)  # type: ignore[return-value]


def build_engine(
    onnx_path: str | os.PathLike[str],
    plan_path: str | os.PathLike[str],
    *,
    fp16: bool,
    max_batch: int = CFG_BATCH,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Parse the ONNX, build a serialised engine with upstream's profile, write it atomically."""
    trt = require_tensorrt()
    say = progress or logger.info
    plan_path = Path(plan_path)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise AcceleratorUnavailableError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        lo, opt, hi = profile_shapes(tensor.name, tuple(tensor.shape), max_batch)
        profile.set_shape(tensor.name, lo, opt, hi)
        if fp16:
            tensor.dtype = trt.DataType.HALF  # as upstream: half I/O, no casts around the engine
    if fp16:
        for i in range(network.num_outputs):
            network.get_output(i).dtype = trt.DataType.HALF
    config.add_optimization_profile(profile)
    say(f"building TensorRT engine ({'fp16' if fp16 else 'fp32'}) from {onnx_path}: this takes minutes")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AcceleratorUnavailableError(
            f"TensorRT could not build an engine from {onnx_path} (see its log above)"
        )
    tmp = plan_path.with_name(plan_path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, plan_path)
    say(f"wrote {plan_path} ({plan_path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    return plan_path


_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32}


class TrtEstimator:
    """An :data:`~cosyserve.families.cosyvoice1.flow.EstimatorFn` on a TensorRT engine with a pool of
    ``concurrent`` execution contexts (each with its own CUDA stream), so that several engine
    threads can run the estimator at once; a caller waits when all contexts are busy."""

    def __init__(
        self, plan_path: str | os.PathLike[str], concurrent: int = 1, device: str | torch.device = "cuda"
    ):
        trt = require_tensorrt()
        self.trt = trt
        self.path = Path(plan_path)
        self.device = torch.device(device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise AcceleratorUnavailableError(
                f"{self.path}: cannot be loaded (built by another TensorRT version or for another GPU); "
                "delete it or run `cosyserve precompile` again"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in self.inputs]
        if sorted(self.inputs) != sorted(ESTIMATOR_INPUTS) or len(outputs) != 1:
            raise AcceleratorUnavailableError(f"{self.path}: I/O {names} is not the estimator's")
        self.output = outputs[0] if outputs[0] == ESTIMATOR_OUTPUT else outputs[0]
        self.dtypes = {n: _TORCH_DTYPES[self.engine.get_tensor_dtype(n).name] for n in names}
        batch = tuple(self.engine.get_tensor_shape("x"))[0]
        self.static_batch: int | None = None if batch == -1 else int(batch)
        self.pool: queue.Queue[tuple[Any, torch.cuda.Stream]] = queue.Queue()
        for i in range(max(1, concurrent)):
            context = self.engine.create_execution_context()
            if context is None:
                raise AcceleratorUnavailableError(
                    f"could not create TensorRT execution context {i + 1} of {concurrent} "
                    "(out of GPU memory?): lower --trt_concurrent"
                )
            self.pool.put((context, torch.cuda.Stream(self.device)))
        self.concurrent = max(1, concurrent)

    def _execute(self, arrays: dict[str, Tensor], out: Tensor) -> None:
        context, stream = self.pool.get()
        try:
            caller = torch.cuda.current_stream(self.device)
            stream.wait_stream(caller)  # the inputs were written on the caller's stream
            for name in self.inputs:
                tensor = arrays[name]
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            context.set_tensor_address(self.output, out.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            # The context goes back to the pool only when its work is done (its shapes are state).
            stream.synchronize()
        finally:
            self.pool.put((context, stream))

    def __call__(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        arrays = {
            name: a.to(device=self.device, dtype=self.dtypes[name]).contiguous()
            for name, a in zip(ESTIMATOR_INPUTS, (x, mask, mu, t, spks, cond))
        }
        total = x.shape[0]
        out = torch.empty((total, *x.shape[1:]), device=self.device, dtype=self.dtypes[self.output])
        if self.static_batch is None or self.static_batch == total:
            self._execute(arrays, out)
        else:
            half = total // 2
            for i in range(half):  # CFG pairs: rows i and half + i
                rows = torch.tensor([i, half + i], device=self.device)
                pair_out = torch.empty((2, *x.shape[1:]), device=self.device, dtype=out.dtype)
                self._execute({k: v.index_select(0, rows).contiguous() for k, v in arrays.items()}, pair_out)
                out[i], out[half + i] = pair_out[0], pair_out[1]
        return out.to(dtype=x.dtype)


def load_or_build(
    onnx_path: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    fp16: bool,
    concurrent: int = 1,
    max_batch: int = CFG_BATCH,
    progress: Callable[[str], None] | None = None,
) -> tuple[TrtEstimator, str]:
    """Load the cached engine for this GPU and precision, building it first when missing or stale."""
    require_tensorrt()
    plan = Path(directory) / engine_name(fp16)
    how = "cached"
    if not plan.is_file():
        build_engine(onnx_path, plan, fp16=fp16, max_batch=max_batch, progress=progress)
        how = "built"
    try:
        runner = TrtEstimator(plan, concurrent)
    except AcceleratorUnavailableError as exc:
        if how == "built" or "cannot be loaded" not in str(exc):
            raise
        logger.warning("%s; rebuilding", exc)
        build_engine(onnx_path, plan, fp16=fp16, max_batch=max_batch, progress=progress)
        runner, how = TrtEstimator(plan, concurrent), "rebuilt"
    return runner, f"tensorrt estimator ({plan.name}, {how}, {concurrent} context(s))"

"""ONNX export of the flow-decoder estimator (and the HiFT conv stack) and ONNX Runtime runners.

The estimator file has upstream's name and I/O (``flow.decoder.estimator.fp32.onnx``: inputs
``x, mask, mu, t, spks, cond``, output ``estimator_out``) so official model directories' files are
used as they are and ours can be used by upstream. Ours has a dynamic time axis and a dynamic
batch (2 = one CFG pair, 2B = B requests batched); upstream's has a static batch of 2, which
:class:`OrtEstimator` handles by running the CFG pairs one by one.

Every file, found or exported, is checked against the eager estimator on a random input before it
is used (a stale file from other weights must never be served silently).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.errors import AccelerationMismatchError, AcceleratorUnavailableError

logger = logging.getLogger(__name__)

ESTIMATOR_INPUTS = ("x", "mask", "mu", "t", "spks", "cond")
ESTIMATOR_OUTPUT = "estimator_out"
ESTIMATOR_ONNX = "flow.decoder.estimator.fp32.onnx"
HIFT_ONNX = "hift.decoder.fp32.onnx"  # ours only: the HiFT conv stack (no STFT), see HiFTConvStack
DEFAULT_OPSET = 18  # onnxruntime >= 1.17 runs it on CPU; TensorRT 10 parses it
MEL_CHANNELS = 80


# ------------------------------------------------------------------------------------ paths


def _writable(directory: Path) -> bool:
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".cosyserve-write-test"):
            return True
    except OSError:
        return False


def cache_root() -> Path:
    """Where artifacts go when the model directory is read-only (``$COSYSERVE_CACHE`` or ~/.cache)."""
    env = os.environ.get("COSYSERVE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cosyserve"


def artifact_dir(model_dir: str | os.PathLike[str]) -> Path:
    """The model directory when writable (upstream keeps its .onnx/.plan files there), else a cache
    folder keyed by the directory and its flow checkpoint (so new weights get new artifacts)."""
    root = Path(model_dir).resolve()
    if _writable(root):
        return root
    flow = root / "flow.pt"
    stat = flow.stat() if flow.exists() else None
    key = f"{root}|{stat.st_size if stat else 0}|{int(stat.st_mtime) if stat else 0}"
    out = cache_root() / "accel" / hashlib.sha1(key.encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    return out


def find_artifact(model_dir: str | os.PathLike[str], name: str) -> Path | None:
    """`name` in the model directory (official files) or in its artifact folder."""
    for folder in (Path(model_dir), artifact_dir(model_dir)):
        path = folder / name
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


# ------------------------------------------------------------------------------------ export


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    # The TorchScript-based exporter is the one that needs no onnxscript; silence its notices.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _cpu_float(module: nn.Module) -> nn.Module:
    """The module itself when it is already CPU float32, else a CPU float32 copy (export source)."""
    params = list(module.parameters())
    if params and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return module
    import copy

    return copy.deepcopy(module).to(device="cpu", dtype=torch.float32)


def estimator_example(batch: int = 2, frames: int = 37, seed: int = 0) -> tuple[Tensor, ...]:
    """A random estimator input `(x, mask, mu, t, spks, cond)` on CPU, float32; row 1 is masked
    after `frames * 2 // 3` frames (so masked frames are exercised)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, MEL_CHANNELS, frames, generator=gen)
    mask = torch.ones(batch, 1, frames)
    if batch > 1:
        mask[1, :, frames * 2 // 3 :] = 0
    mu = torch.randn(batch, MEL_CHANNELS, frames, generator=gen)
    t = torch.rand(batch, generator=gen)
    spks = torch.randn(batch, MEL_CHANNELS, generator=gen)
    cond = torch.randn(batch, MEL_CHANNELS, frames, generator=gen)
    return x, mask, mu, t, spks, cond


def _atomic_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def export_estimator(
    estimator: nn.Module,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    stream_weights: bool = False,
) -> Path:
    """Export the ConditionalDecoder to ONNX (float32, dynamic time axis, dynamic batch).

    ``stream_weights``: export the graph alone and append the weights to the file one tensor at a
    time (:func:`_write_streamed`): peak memory is the module plus one tensor, where the exporter
    holds up to three more copies of the weights (the graph's protobuf, its serialisation, a
    re-parse). Same inputs, outputs and numbers.

    Written to ``path + '.partial'`` then renamed, so an interrupted export leaves no broken file.
    """
    path = Path(path)
    source = _cpu_float(estimator).eval()
    time_axis = {2: "seq_len"}
    batch_axis = {0: "batch"} if dynamic_batch else {}
    dynamic_axes = {
        "x": {**batch_axis, **time_axis},
        "mask": {**batch_axis, **time_axis},
        "mu": {**batch_axis, **time_axis},
        "cond": {**batch_axis, **time_axis},
        ESTIMATOR_OUTPUT: {**batch_axis, **time_axis},
    }
    if dynamic_batch:
        dynamic_axes["t"] = {0: "batch"}
        dynamic_axes["spks"] = {0: "batch"}
    tmp = _atomic_path(path)
    t0 = time.perf_counter()
    graph_only = io.BytesIO()
    with _quiet_export(), torch.no_grad():
        torch.onnx.export(
            source,
            estimator_example(),
            graph_only if stream_weights else str(tmp),
            dynamo=False,
            export_params=not stream_weights,
            opset_version=opset,
            # Folding would turn weights into unnamed new constants; _write_streamed folds the
            # weight transposes itself.
            do_constant_folding=not stream_weights,
            input_names=list(ESTIMATOR_INPUTS),
            output_names=[ESTIMATOR_OUTPUT],
            dynamic_axes=dynamic_axes,
        )
    if stream_weights:
        _write_streamed(graph_only.getvalue(), source, tmp)
    os.replace(tmp, path)
    logger.info("exported the flow estimator to %s in %.1f s", path, time.perf_counter() - t0)
    return path


def _write_streamed(graph_bytes: bytes, module: nn.Module, path: Path) -> None:
    """Write a model exported with ``export_params=False`` (``graph_bytes``: the weights are graph
    inputs named like the module's parameters and buffers) with the weights as initializers,
    serialising one tensor at a time.

    A protobuf parser merges repeated occurrences of a message field, so the file is the model
    without its weights followed by one ``ModelProto(graph=GraphProto(initializer=[w]))`` per
    weight: readers see one graph. ``Transpose`` nodes applied to a weight (linear layers) are
    folded into a transposed initializer, as the exporter's constant folding would store them.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_model_from_string(graph_bytes)
    graph = model.graph
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    weights = [i.name for i in graph.input if i.name not in ESTIMATOR_INPUTS]
    unknown = [name for name in weights if name not in tensors]
    if unknown:
        raise ValueError(f"exported graph inputs {unknown[:5]} are not parameters or buffers of the module")
    folded: dict[str, tuple[str, list[int]]] = {}  # Transpose output -> (weight, perm)
    nodes = []
    for node in graph.node:
        perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
        if node.op_type == "Transpose" and node.input[0] in tensors and perm:
            folded[node.output[0]] = (node.input[0], perm[0])
        else:
            nodes.append(node)
    used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(nodes)
    data_inputs = [i for i in graph.input if i.name in ESTIMATOR_INPUTS]
    del graph.input[:]
    graph.input.extend(data_inputs)

    def initializer(name: str, value: np.ndarray) -> bytes:
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return onnx.ModelProto(graph=onnx.GraphProto(initializer=[tensor])).SerializeToString()

    with open(path, "wb") as f:
        f.write(model.SerializeToString())
        for name in weights:
            if name in used:
                f.write(initializer(name, tensors[name].detach().numpy()))
        for name, (weight, perm) in folded.items():
            f.write(initializer(name, tensors[weight].detach().numpy().transpose(perm)))


# ------------------------------------------------------------------------------------ runtime


def ort_session(path: str | os.PathLike[str], threads: int, providers: list[str] | None = None) -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise AcceleratorUnavailableError("onnxruntime is not installed (pip install onnxruntime)") from exc
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    # Spinning workers would steal the cores torch needs between estimator calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Memory: prepacked weight copies (+128 MB for the full-size estimator) bought no measurable
    # speed on CPU (0.8 s per estimator call either way). The arena stays: without it every
    # intermediate is a fresh mmap and the flow ran 2x slower in page faults.
    options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return onnxruntime.InferenceSession(
            os.fspath(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AcceleratorUnavailableError(f"{path}: cannot be opened by onnxruntime: {first[:300]}") from exc


def _as_numpy(x: Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


class OrtEstimator:
    """An :data:`~cosyserve.families.cosyvoice1.flow.EstimatorFn` running the estimator ONNX on ONNX Runtime.

    Thread-safe (ONNX Runtime sessions may run concurrently). A model with a static batch of 2
    (upstream's export) runs a batch of 2B as B calls on the CFG pairs (rows i and B + i).
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 1, providers: list[str] | None = None):
        self.path = Path(path)
        self.session = ort_session(path, threads, providers)
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(ESTIMATOR_INPUTS):
            raise AcceleratorUnavailableError(
                f"{path}: inputs {names} are not the estimator's {list(ESTIMATOR_INPUTS)}"
            )
        batch = self.session.get_inputs()[names.index("x")].shape[0]
        self.static_batch: int | None = batch if isinstance(batch, int) else None

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.session.get_outputs()[0].name], feed)[0]

    def __call__(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        arrays = dict(zip(ESTIMATOR_INPUTS, (_as_numpy(a) for a in (x, mask, mu, t, spks, cond))))
        total = x.shape[0]
        if self.static_batch is None or self.static_batch == total:
            out = self._run(arrays)
        else:
            if self.static_batch != 2 or total % 2:
                raise ValueError(f"estimator ONNX has a static batch {self.static_batch}, got {total}")
            half = total // 2
            out = np.empty((total, *arrays["x"].shape[1:]), np.float32)
            for i in range(half):
                rows = [i, half + i]  # solve_euler puts the conditional rows first, then the CFG rows
                res = self._run({k: v[rows] for k, v in arrays.items()})
                out[i], out[half + i] = res[0], res[1]
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


@torch.inference_mode()
def compare_estimators(
    runner: Any, estimator: nn.Module, *, frames: tuple[int, ...] = (37, 8), batch: int = 2
) -> float:
    """Max |runner - eager| over random inputs (odd lengths, a masked row), relative to max |eager|
    (at least 1). Both run on the eager estimator's device and dtype."""
    param = next(estimator.parameters())
    worst = 0.0
    for i, n in enumerate(frames):
        args = tuple(
            a.to(device=param.device, dtype=param.dtype) for a in estimator_example(batch, n, seed=i)
        )
        ref = estimator(*args).float()
        got = runner(*args).float()
        scale = max(1.0, float(ref.abs().max()))
        worst = max(worst, float((got - ref).abs().max()) / scale)
    return worst


def check_estimator(runner: Any, estimator: nn.Module, what: str, rtol: float = 1e-3) -> float:
    """Raise AccelerationMismatchError when `runner` disagrees with the eager estimator."""
    err = compare_estimators(runner, estimator)
    if not np.isfinite(err) or err > rtol:
        raise AccelerationMismatchError(
            f"{what} does not match the eager estimator (max relative error {err:.2e} > {rtol:g}); "
            "it was exported from other weights or is broken - delete it to re-export"
        )
    logger.info("%s matches the eager estimator (max relative error %.1e)", what, err)
    return err


def load_or_export_estimator(
    model_dir: str | os.PathLike[str],
    estimator: nn.Module,
    threads: int,
    *,
    providers: list[str] | None = None,
) -> tuple[OrtEstimator, str]:
    """An ORT runner for the estimator: the directory's ONNX file when it matches the weights, else a
    fresh export (into the artifact folder). Returns the runner and a one-line description."""
    found = find_artifact(model_dir, ESTIMATOR_ONNX)
    if found is not None:
        try:
            runner = OrtEstimator(found, threads, providers)
            check_estimator(runner, estimator, str(found))
            return runner, f"onnxruntime estimator ({found.name}, found)"
        except AcceleratorUnavailableError as exc:
            logger.warning("%s; exporting a fresh one", exc)
    target = artifact_dir(model_dir) / ESTIMATOR_ONNX
    if found is not None and found.resolve() == target.resolve():
        target = target.with_name("flow.decoder.estimator.fp32.cosyserve.onnx")  # keep theirs
    export_estimator(estimator, target)
    runner = OrtEstimator(target, threads, providers)
    check_estimator(runner, estimator, str(target))
    return runner, f"onnxruntime estimator ({target.name}, exported)"


# ------------------------------------------------------------------------------------ HiFT


class HiFTConvStack(nn.Module):
    """HiFT's network from `mel` and the source STFT to `conv_post` (what ONNX can express: the
    STFT/iSTFT and the f0/source stay in torch). Same operations as ``decode_conv_post(fast=False)``."""

    def __init__(self, hift: nn.Module):
        super().__init__()
        self.hift = hift

    def forward(self, mel: Tensor, s_stft: Tensor) -> Tensor:
        h = self.hift
        x = h.conv_pre(mel)
        for i in range(h.num_upsamples):
            x = F.leaky_relu(x, h.cfg.lrelu_slope)
            x = h.ups[i](x)
            if i == h.num_upsamples - 1:
                x = torch.cat([x[..., 1:2], x], dim=-1)
            x = x + h.source_resblocks[i](h.source_downs[i](s_stft))
            xs = h.resblocks[i * h.num_kernels](x)
            for j in range(1, h.num_kernels):
                xs = xs + h.resblocks[i * h.num_kernels + j](x)
            x = xs / h.num_kernels
        return h.conv_post(F.leaky_relu(x))


def export_hift(hift: nn.Module, path: str | os.PathLike[str], *, opset: int = DEFAULT_OPSET) -> Path:
    path = Path(path)
    stack = HiFTConvStack(_cpu_float(hift)).eval()
    frames = 23
    mel = torch.randn(1, MEL_CHANNELS, frames, generator=torch.Generator().manual_seed(0))
    s_stft = torch.randn(1, hift.n_fft + 2, frames * hift.upsample_factor // hift.hop + 1)
    tmp = _atomic_path(path)
    # Grad mode on: Snake's inference path slices time in a Python loop, which tracing would freeze.
    with _quiet_export(), torch.enable_grad():
        torch.onnx.export(
            stack,
            (mel, s_stft),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=["mel", "s_stft"],
            output_names=["conv_post"],
            dynamic_axes={
                "mel": {2: "frames"},
                "s_stft": {2: "stft_frames"},
                "conv_post": {2: "stft_frames"},
            },
        )
    os.replace(tmp, path)
    return path


class OrtHiFTDecoder:
    """Replaces ``HiFTGenerator.decode_conv_post`` with the ONNX conv stack (CPU)."""

    def __init__(self, hift: nn.Module, path: str | os.PathLike[str], threads: int = 1):
        self.hift = hift
        self.path = Path(path)
        self.session = ort_session(path, threads)

    def __call__(self, mel: Tensor, source: Tensor, fast: bool | None = None) -> Tensor:
        s_stft = self.hift._stft(source)
        out = self.session.run(None, {"mel": _as_numpy(mel), "s_stft": _as_numpy(s_stft)})[0]
        return torch.from_numpy(out).to(device=mel.device, dtype=mel.dtype)


@torch.inference_mode()
def compare_hift(decoder: OrtHiFTDecoder, hift: nn.Module, frames: int = 29) -> float:
    gen = torch.Generator().manual_seed(0)
    mel = torch.randn(1, MEL_CHANNELS, frames, generator=gen)
    source = torch.randn(1, 1, frames * hift.upsample_factor, generator=gen) * 0.1
    ref = hift.decode_conv_post(mel, source, fast=False)
    got = decoder(mel, source)
    return float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))


@dataclass
class HiFTPatch:
    """Undo information for :func:`install_ort_hift`."""

    hift: nn.Module

    def remove(self) -> None:
        self.hift.__dict__.pop("decode_conv_post", None)


def install_ort_hift(
    model_dir: str | os.PathLike[str], hift: nn.Module, threads: int
) -> tuple[HiFTPatch, str]:
    """Route HiFT's conv stack through ONNX Runtime (export on first use, checked against eager)."""
    path = find_artifact(model_dir, HIFT_ONNX)
    how = "found"
    if path is None:
        path = export_hift(hift, artifact_dir(model_dir) / HIFT_ONNX)
        how = "exported"
    decoder = OrtHiFTDecoder(hift, path, threads)
    err = compare_hift(decoder, hift)
    if not np.isfinite(err) or err > 1e-3:
        raise AccelerationMismatchError(f"{path}: does not match the eager HiFT (relative error {err:.2e})")
    hift.__dict__["decode_conv_post"] = decoder  # instance attribute shadows the method
    return HiFTPatch(hift), f"onnxruntime vocoder ({path.name}, {how})"

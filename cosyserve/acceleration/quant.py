"""Opt-in dynamic int8 quantisation (CPU, the ``cpu_int8`` plan): the LLM's linear layers and the
flow estimator's.

Weights become int8 (per output channel), activations are quantised on the fly per call. The LLM
decode step is memory-bound (every step streams ~176M weights through the caches), so int8
weights cut its time and the model's RSS by about 4x on those layers. ``linear_pos`` stays float:
its weight is read directly by the relative-position cache, and it runs once per position anyway.

The two networks want different kernels (measured on the 2-core VM, full-size model): the LLM's
one-row decode GEMVs are fastest in fbgemm (20.8 ms per step vs 38 ms in oneDNN), the estimator's
~860-row GEMMs in oneDNN (AMX/VNNI: 0.38 s per 430-frame call vs 0.65 s fbgemm and 0.58-0.72 s for
ONNX Runtime's int8 graph). The packed weights carry their kernel, so each network is packed with
its own engine.

Once the weights are int8 the step's fixed costs show (a 1024x1024 int8 GEMV is ~40 us), so the
attention's q/k/v projections are fused into one layer first (one activation quantisation and one
call instead of three), and every quantised layer calls the kernel directly
(:class:`Int8Linear`) rather than through ``torch.ao``'s Python dispatch.

:func:`llm_deviation` measures what int8 changes: log-probs on a teacher-forced sequence, and the
tokens a seeded sampling run picks.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cosyserve.acceleration.packed import convert_linears
from cosyserve.errors import AccelerationMismatchError, AcceleratorUnavailableError
from cosyserve.runtime.memory import page_out

logger = logging.getLogger(__name__)

# The int8 estimator's accepted error against FP32: max |int8 - fp32| / max |fp32| on the load-time
# check (measured figures: README, Performance).
ESTIMATOR_INT8_RTOL = 5e-2

# CPU flags of a u8 x s8 dot product that accumulates in 32 bits (VNNI, AMX).
_INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def int8_dot_product(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU has VNNI or AMX (read from `cpuinfo`; assumed absent where there is none).

    Without them, x86 int8 kernels (fbgemm and oneDNN alike) sum u8 x s8 products in pairs into
    saturating 16 bits (vpmaddubsw): 255 * 127 * 2 overflows, 127 * 127 * 2 does not. So full
    8-bit activations are only correct with VNNI/AMX; elsewhere they must be 7-bit."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return not _INT8_DOT_FLAGS.isdisjoint(line.partition(":")[2].split())
    return False


def reduce_range_for(engine: str) -> bool:
    """Whether `engine`'s layers quantise activations to 7 bits (True) rather than 8.

    7 bits unless oneDNN runs on VNNI/AMX (see :func:`int8_dot_product`), where 8 bits halve its
    error; fbgemm keeps torch.ao's default of 7."""
    return engine != "onednn" or not int8_dot_product()


class Int8Linear(nn.Module):
    """A dynamic int8 linear layer: the packed weights of a ``torch.ao`` dynamic ``Linear``,
    called through the resolved operator (same kernel, same numerics, less per-call overhead)."""

    def __init__(self, packed: Any, in_features: int, out_features: int, reduce_range: bool = True):
        super().__init__()
        self.packed = packed
        self.in_features = in_features
        self.out_features = out_features
        # True: 7-bit activations, torch.ao's default; 8 bits overflow without VNNI (see
        # reduce_range_for)
        self.reduce_range = reduce_range

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.quantized.linear_dynamic.default(x, self.packed, self.reduce_range)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype=qint8"


def _quantize_linears(root: nn.Module, names: list[str], engine: str) -> None:
    """Replace the named nn.Linear modules of `root` with :class:`Int8Linear`, in place, packed for
    `engine`'s kernels.

    One layer at a time, with torch.ao's own conversion (same numerics as ``quantize_dynamic``):
    each FP32 weight is paged out once its int8 copy exists, so loading the int8 plan never holds
    the whole FP32 model and its int8 copy at once (the weights are memory-mapped from the
    checkpoint: the pages just leave RSS)."""
    _check_cpu(root)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import per_channel_dynamic_qconfig
    except ImportError as exc:  # a torch build without the quantisation package
        raise AcceleratorUnavailableError(f"this torch build has no dynamic quantisation ({exc})") from exc
    engines = torch.backends.quantized.supported_engines
    if engine not in engines:
        engine = "x86" if "x86" in engines else torch.backends.quantized.engine
    modules = dict(root.named_modules())
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # chooses the packing (and so the kernel) of each layer
    try:
        for name in names:
            linear = modules[name]
            linear.qconfig = per_channel_dynamic_qconfig
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                packed = DynamicLinear.from_float(linear)._packed_params._packed_params
            parent, _, attr = name.rpartition(".")
            int8 = Int8Linear(packed, linear.in_features, linear.out_features, reduce_range_for(engine))
            setattr(modules[parent] if parent else root, attr, int8)
            page_out(linear.weight)
    finally:
        torch.backends.quantized.engine = previous


def quantize_llm_int8(llm: nn.Module) -> int:
    """Replace the LLM's linear layers (in place) with dynamic int8 ones; returns how many.

    The projections that read the same input are fused first (q/k/v, and Qwen2's gate/up: see
    the module docstring). CPU only: the quantised kernels are fbgemm/oneDNN (x86) or qnnpack (Arm).
    """
    _check_cpu(llm)
    to_int8 = functools.partial(_quantize_linears, engine="x86")  # fbgemm: the fastest one-row GEMV
    count = convert_linears(llm, to_int8)
    logger.info("int8: %d linear layers of the LLM quantised (dynamic, per channel)", count)
    return count


def quantize_estimator_int8(estimator: nn.Module) -> tuple[int, float]:
    """Replace the flow estimator's linear layers (attention and feed-forward projections, time
    MLP; convolutions stay float) with dynamic int8 ones, in place; returns how many and the
    relative error measured against the FP32 estimator on random inputs (raises
    AccelerationMismatchError above ``ESTIMATOR_INT8_RTOL``)."""
    _check_cpu(estimator)

    def quantize(module: nn.Module) -> int:
        names = [name for name, m in module.named_modules() if type(m) is nn.Linear and not m.weight.is_meta]
        _quantize_linears(module, names, engine="onednn")  # oneDNN: the fastest many-row GEMM
        return len(names)

    count, err = convert_estimator_checked(estimator, quantize, ESTIMATOR_INT8_RTOL, "int8")
    logger.info(
        "int8: %d linear layers of the flow estimator quantised (%d-bit activations, error %.1e)",
        count,
        7 if any(m.reduce_range for m in estimator.modules() if isinstance(m, Int8Linear)) else 8,
        err,
    )
    return count, err


@torch.inference_mode()
def convert_estimator_checked(
    estimator: nn.Module, convert: Callable[[nn.Module], int], rtol: float, what: str
) -> tuple[int, float]:
    """Run ``convert(estimator)`` (in place; returns how many layers it changed) and measure the
    converted estimator against its FP32 self on random inputs: max |new - fp32| / max |fp32|.
    Raises AccelerationMismatchError above ``rtol``; returns (count, error)."""
    from cosyserve.acceleration.onnx_export import estimator_example

    examples = [estimator_example(2, frames, seed=i) for i, frames in enumerate((37, 8))]
    times = getattr(estimator, "frozen_times", None)  # an estimator that serves only these t values
    if times is not None:
        examples = [(*args[:3], times[[i, -1 - i]], *args[4:]) for i, args in enumerate(examples)]
    references = [estimator(*args) for args in examples]
    count = convert(estimator)
    err = max(
        float((estimator(*args) - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        for args, ref in zip(examples, references)
    )
    if not err <= rtol:  # also catches NaN
        raise AccelerationMismatchError(
            f"the {what} estimator deviates from FP32 by {err:.2e} (max relative; accepted {rtol:g})"
        )
    return count, err


def _check_cpu(module: nn.Module) -> None:
    params = list(module.parameters())
    device = next((p.device for p in params if not p.is_meta), params[0].device)  # not freed ones
    if device.type != "cpu":
        raise AcceleratorUnavailableError(
            f"int8 dynamic quantisation runs on CPU only (the model is on {device})"
        )


@dataclass
class Int8Deviation:
    """How far the int8 LLM is from FP32 (see :func:`llm_deviation`)."""

    logp_max_abs: float  # max |logp_int8 - logp_fp32| over all steps and vocab
    logp_mean_abs: float  # mean |.| over all steps and vocab
    kl_mean: float  # mean KL(p_fp32 || p_int8) per step, nats
    top1_agreement: float  # fraction of steps whose argmax token is the same
    sampled_agreement: float  # fraction of positions where seeded sampling picked the same token
    steps: int

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


@torch.inference_mode()
def teacher_forced_logp(llm: nn.Module, prefix: Tensor, tokens: list[int]) -> Tensor:
    """Log-probs `[len(tokens) + 1, V]` of the LLM fed `tokens` one by one after `prefix`."""
    logp, cache = llm.prefill(prefix, capacity=prefix.shape[1] + len(tokens) + 1)
    rows = [logp[0].float()]
    for tok in tokens:
        rows.append(llm.decode_step(torch.tensor([tok]), cache)[0].float())
    return torch.stack(rows)


@torch.inference_mode()
def llm_deviation(
    llm_fp32: nn.Module,
    llm_int8: nn.Module,
    text_ids: Tensor,
    embedding: Tensor | None,
    steps: int = 50,
    seed: int = 0,
) -> Int8Deviation:
    """Compare an int8 LLM with its FP32 original on one input.

    Tokens are sampled by the FP32 model (seeded), then both models are teacher-forced on them;
    the int8 model's own seeded sampling is compared position by position.
    """
    ref_tokens = list(llm_fp32.generate(text_ids, embedding=embedding, generator=seed, num_tokens=steps))
    q_tokens = list(llm_int8.generate(text_ids, embedding=embedding, generator=seed, num_tokens=steps))
    prefix = llm_fp32.build_prefix(text_ids, embedding=embedding)
    a = teacher_forced_logp(llm_fp32, prefix, ref_tokens)
    b = teacher_forced_logp(llm_int8, llm_int8.build_prefix(text_ids, embedding=embedding), ref_tokens)
    diff = (a - b).abs()
    kl = (a.exp() * (a - b)).sum(dim=-1)
    same = sum(1 for x, y in zip(ref_tokens, q_tokens) if x == y)
    return Int8Deviation(
        logp_max_abs=float(diff.max()),
        logp_mean_abs=float(diff.mean()),
        kl_mean=float(kl.mean()),
        top1_agreement=float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        sampled_agreement=same / max(1, len(ref_tokens)),
        steps=len(ref_tokens),
    )


def quantized_copy(llm: nn.Module) -> nn.Module:
    """An int8 copy of a CPU FP32 LLM (the original is left as it is)."""
    clone = copy.deepcopy(llm)
    quantize_llm_int8(clone)
    return clone

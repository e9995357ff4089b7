"""FP32 linear layers with oneDNN-packed weights (CPU): the LLM's decode step of the FP32 plans.

A decode step multiplies one row (or a few, batched) by every weight matrix of the LLM: it is
bound by how fast the weights stream from memory. torch's ``F.linear`` hands such products to
MKL's GEMV; oneDNN's inner-product kernels on weights reordered once into its blocked layout
stream the same FP32 weights much faster on the CPUs we measured (README, Performance). Same
precision: FP32 products and sums, only the summation order differs (~1e-6 relative).

The projections that read the same input are fused first (q/k/v; gate/up in Qwen2), so each step
makes fewer, larger calls. The memory-mapped FP32 originals are paged out as their packed copies
are made, so loading never holds both copies of the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cosyserve.runtime.memory import page_out

logger = logging.getLogger(__name__)

# Linear layers of an LLM that stay plain nn.Linear under every plan (suffixes of module names): the
# relative-position projections' weights are read directly by their cache, the speaker projection
# runs once per request.
KEEP_PLAIN = ("linear_pos", "spk_embed_affine_layer")
# Output projections that stay float32 under the bf16 plan: the LLM's speech head (its log-probs
# drive sampling) and the DiT estimator's mel projection.
FP32_HEADS = ("llm_decoder", "proj_out")


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear operators."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def bf16_native(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) and torch's oneDNN can use
    it: without them oneDNN emulates bf16, slower than FP32."""
    try:
        flags = Path(cpuinfo).read_text().split()
    except OSError:
        return False
    if not ({"avx512_bf16", "amx_bf16"} & set(flags)) or not packing_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported()) if supported is not None else True


class PackedLinear(nn.Module):
    """``F.linear`` on a weight held in oneDNN's blocked layout (CPU).

    ``dtype=torch.bfloat16`` (the ``cpu_bf16`` plan) stores the weight in bfloat16 and multiplies
    in it (fp32 accumulation inside oneDNN); inputs and outputs stay float32 around the call.
    ``rows_hint``: the typical row count the layout is chosen for (1: decode steps)."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        dtype: torch.dtype = torch.float32,
        rows_hint: int | None = 1,
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            weight.detach().to(dtype).contiguous(), rows_hint
        )
        self.bias = None if bias is None else bias.detach().to(dtype).clone()

    @classmethod
    def from_linear(
        cls, linear: nn.Module, dtype: torch.dtype = torch.float32, rows_hint: int | None = 1
    ) -> PackedLinear:
        return cls(linear.weight, linear.bias, dtype, rows_hint)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.dtype:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedLinear:
        # oneDNN tensors have no storage to copy generically; clone() copies the packed layout
        clone = object.__new__(PackedLinear)
        nn.Module.__init__(clone)
        clone.in_features, clone.out_features, clone.dtype = self.in_features, self.out_features, self.dtype
        clone.packed = self.packed.clone()
        clone.bias = None if self.bias is None else self.bias.clone()
        return clone

    def extra_repr(self) -> str:
        kind = "" if self.dtype == torch.float32 else f", dtype={self.dtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=onednn{kind}"


def convert_linears(llm: nn.Module, convert: Callable[[nn.Module, list[str]], None]) -> int:
    """Fuse a model's projections (an LLM's, an estimator's: every module's ``fuse_projections()``)
    and hand its replaceable linear layers to ``convert(root, names)`` (which replaces them in
    place), one fusing module at a time: the separate memory-mapped weights are paged out as soon as
    their fused copy is converted, so the whole model is never held twice. Returns how many layers
    were converted."""
    count = 0
    for module in list(llm.modules()):
        fuse = getattr(module, "fuse_projections", None)
        if not callable(fuse):
            continue
        before = [p for p in module.parameters() if p.device.type == "cpu"]
        fuse()
        names = llm_linears(module)
        convert(module, names)
        count += len(names)
        for p in before:
            page_out(p)
    names = llm_linears(llm)
    convert(llm, names)
    return count + len(names)


def pack_linears(
    root: nn.Module, names: list[str], dtype: torch.dtype = torch.float32, rows_hint: int | None = 1
) -> None:
    """Replace the named nn.Linear modules of `root` with :class:`PackedLinear`, in place, one at
    a time (each FP32 original is paged out once packed)."""
    modules = dict(root.named_modules())
    with torch.no_grad():
        for name in names:
            linear = modules[name]
            parent, _, attr = name.rpartition(".")
            packed = PackedLinear.from_linear(linear, dtype, rows_hint)
            setattr(modules[parent] if parent else root, attr, packed)
            page_out(linear.weight)


def llm_linears(llm: nn.Module) -> list[str]:
    """Names of the LLM's nn.Linear modules that plans may replace (all but :data:`KEEP_PLAIN` and
    those whose weights a plan freed)."""
    return [
        name
        for name, module in llm.named_modules()
        if type(module) is nn.Linear and not name.endswith(KEEP_PLAIN) and not module.weight.is_meta
    ]


def pack_llm(llm: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Fuse the LLM's projections and pack its FP32 linear layers (``dtype`` bfloat16: in bf16,
    but for the speech head, whose log-probs drive sampling); returns how many were packed, 0 where
    oneDNN is missing (plain torch then)."""
    if not packing_available():
        logger.warning("this torch build has no oneDNN packed linear: the LLM runs on plain F.linear")
        return 0
    first = next(llm.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.float32:
        return 0
    return convert_linears(llm, pack_linears if dtype == torch.float32 else pack_linears_bf16)


def pack_linears_bf16(root: nn.Module, names: list[str]) -> None:
    """:func:`pack_linears` in bfloat16, but for the output heads (:data:`FP32_HEADS`), packed in FP32."""
    # No row hint: oneDNN's one-row bf16 layout streams slower than its default.
    pack_linears(root, [n for n in names if not n.endswith(FP32_HEADS)], torch.bfloat16, rows_hint=None)
    pack_linears(root, [n for n in names if n.endswith(FP32_HEADS)])


def pack_estimator_bf16(estimator: nn.Module) -> int:
    """Fuse the flow estimator's q/k/v projections and pack its linear layers in bfloat16 for oneDNN
    (the many-row GEMMs of every Euler step), its output projection in FP32; returns how many.
    Convolutions, norms and attention stay float32."""
    return convert_linears(estimator, pack_linears_bf16)

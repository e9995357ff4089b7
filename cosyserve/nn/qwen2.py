"""The Qwen2 decoder of CosyVoice2 / CosyVoice3, in plain PyTorch (no ``transformers`` at run time).

Numerics follow transformers' ``Qwen2ForCausalLM`` (the reference runs it with ``inputs_embeds`` and
reads ``hidden_states[-1]``, the output after the final norm):

* RMSNorm in float32: ``w * (x * rsqrt(mean(x^2) + eps))``;
* rotary embeddings on the whole head dimension, rotate-half (non-interleaved) pairs ``(i, i + d/2)``,
  ``inv_freq = 1 / theta^(2i/d)``, angle = position * inv_freq in float32;
* grouped-query attention: q/k/v projections with bias, o_proj without, ``num_key_value_heads``
  key/value heads shared by ``num_attention_heads / num_key_value_heads`` query heads, scale
  ``1/sqrt(head_dim)``, causal;
* SwiGLU MLP ``down(silu(gate(x)) * up(x))``; pre-norm residual blocks; final RMSNorm.

Module and parameter names match the checkpoint's ``llm.model.model.*`` keys (``embed_tokens``,
``layers.{i}.self_attn.q_proj``, ..., ``norm``). The text-vocabulary ``lm_head`` is not part of
:class:`Qwen2ForCausalLM` here: CosyVoice discards its logits, so loaders accept the checkpoint
key without keeping the tensor (see :data:`LM_HEAD_KEY`).

Incremental decoding uses :class:`~cosyserve.nn.conformer.KVCache` (the cache the batching runner
already drives for v1): preallocated per-layer keys/values ``[B, kv_heads, capacity, head_dim]``,
growth by doubling, rows right-aligned with ``pad[b]`` leading padding slots. Row ``b``'s real
position of slot ``s`` is ``s - pad[b]``, so rows of different lengths decode together and each
row's numbers equal its solo run (padding is masked out of attention, positions are per row).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.errors import ModelConfigError
from cosyserve.nn.conformer import KVCache

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LM_HEAD_KEY = "lm_head.weight"  # in Qwen2ForCausalLM's state dict; never used for speech tokens
_ROPE_GROW_MIN = 512  # positions of the rotary table computed at least at once


@dataclass(frozen=True)
class Qwen2Config:
    """The backbone dimensions (``CosyVoice-BlankEN/config.json``); defaults = CosyVoice2-0.5B."""

    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 151936
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _positive_int(raw: dict[str, Any], name: str, source: str, default: Any = None) -> int:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"{source}: '{name}' must be a positive integer, got {value!r}")
    return value


def _number(raw: dict[str, Any], name: str, source: str, default: Any = None) -> float:
    value = raw.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ModelConfigError(f"{source}: '{name}' must be a positive number, got {value!r}")
    return float(value)


def _rope_theta(raw: dict[str, Any], source: str) -> float:
    """``rope_theta`` from the transformers-4.x layout (top level) or the 5.x ``rope_parameters``."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    for name, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ModelConfigError(f"{source}: '{name}' must be a mapping, got {block!r}")
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type != "default":
            raise ModelConfigError(
                f"{source}: rope type {rope_type!r} in '{name}' is not supported (only 'default' rotary "
                "embeddings, as CosyVoice's Qwen2 uses)"
            )
    if "rope_theta" in raw:
        return _number(raw, "rope_theta", source)
    if isinstance(params, dict) and "rope_theta" in params:
        return _number(params, "rope_theta", f"{source}: rope_parameters")
    raise ModelConfigError(
        f"{source}: no rotary base: expected 'rope_theta' at the top level (transformers 4.x layout) or "
        "inside 'rope_parameters' (transformers 5.x layout)"
    )


def qwen2_config_from_dict(raw: Mapping[str, Any], source: str = CONFIG_FILE) -> Qwen2Config:
    """Map a parsed ``config.json`` into :class:`Qwen2Config` (clear ModelConfigError otherwise)."""
    if not isinstance(raw, Mapping):
        raise ModelConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    model_type = raw.get("model_type", "qwen2")
    if model_type != "qwen2":
        raise ModelConfigError(f"{source}: model_type {model_type!r} is not a Qwen2 backbone ('qwen2')")
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelConfigError(f"{source}: hidden_act {act!r} is not supported (Qwen2 uses 'silu')")
    if raw.get("use_sliding_window", False):
        raise ModelConfigError(f"{source}: use_sliding_window=true is not supported")
    hidden = _positive_int(raw, "hidden_size", source)
    heads = _positive_int(raw, "num_attention_heads", source)
    kv_heads = _positive_int(raw, "num_key_value_heads", source, heads)
    if heads % kv_heads:
        raise ModelConfigError(
            f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    head_dim = raw.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise ModelConfigError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads")
        head_dim = hidden // heads
    head_dim = _positive_int({"head_dim": head_dim}, "head_dim", source)
    if head_dim % 2:
        raise ModelConfigError(f"{source}: head_dim {head_dim} must be even (rotary pairs)")
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=_positive_int(raw, "intermediate_size", source),
        num_hidden_layers=_positive_int(raw, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_positive_int(raw, "vocab_size", source),
        rms_norm_eps=_number(raw, "rms_norm_eps", source, 1e-6),
        rope_theta=_rope_theta(raw, source),
        max_position_embeddings=_positive_int(raw, "max_position_embeddings", source, 32768),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def load_qwen2_config(path: str | os.PathLike[str]) -> Qwen2Config:
    """Read ``config.json`` (a file, or a folder holding one) into :class:`Qwen2Config`."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":  # a folder, present or not: name the file in errors
        path = path / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelConfigError(f"{path}: missing (the Qwen2 backbone's dimensions are read from it)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{path}: not a readable JSON file ({exc})") from exc
    return qwen2_config_from_dict(raw, str(path))


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``w * (x * rsqrt(mean(x^2) + eps))`` computed in float32 (``F.rms_norm``: the values of
    the reference's step-by-step computation, in fewer Python-level calls)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * h.to(x.dtype)


class RotaryTable(nn.Module):
    """cos/sin of ``position * inv_freq`` for positions ``[0, size)``, grown by doubling.

    Rows are ``[cos(a_0) .. cos(a_{d/2-1}), cos(a_0) .. cos(a_{d/2-1})]`` (rotate-half layout), the
    float32 values transformers computes for the same positions. The sine table is stored with the
    sign rotate-half puts on the first half (:func:`apply_rotary`).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)
        self.register_buffer("cos", torch.zeros(0, head_dim), persistent=False)
        self.register_buffer("signed_sin", torch.zeros(0, head_dim), persistent=False)

    def ensure(self, size: int) -> None:
        if size <= self.cos.shape[0]:
            return
        size = max(size, 2 * self.cos.shape[0], _ROPE_GROW_MIN)
        positions = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
        angles = positions[:, None] * self.inv_freq.float()[None, :]
        sin = angles.sin()
        self.cos = torch.cat((angles, angles), dim=-1).cos()
        self.signed_sin = torch.cat((-sin, sin), dim=-1)

    def lookup(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions `[B, n]` (or `[n]`, shared by the rows) -> cos, signed sin `[B|1, n, 1, head_dim]`
        (broadcast over the heads of `[B, n, heads, head_dim]`)."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        self.ensure(int(positions.max()) + 1)
        cos = self.cos[positions].unsqueeze(2)
        sin = self.signed_sin[positions].unsqueeze(2)
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin


def apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``: the roll gives
    ``[x2, x1]`` and the table carries the minus sign (the same products, in fewer calls)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.head_dim**-0.5
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # see fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q/k/v by one projection (one weight pass and one call per step); once."""
        if self.qkv_proj is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        ref = self.q_proj.weight
        out_features = sum(p.out_features for p in parts)
        fused = nn.Linear(ref.shape[1], out_features, bias=True, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
        del self.q_proj, self.k_proj, self.v_proj
        self.qkv_proj = fused

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int, allowed: Tensor | None
    ) -> Tensor:
        """Write the n new keys/values at slots ``cache.length ..`` and attend over every slot."""
        batch, n, _ = x.shape
        hd, heads, kv_heads = self.head_dim, self.heads, self.kv_heads
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(batch, n, heads + 2 * kv_heads, hd)
            q, k = apply_rotary(qkv[:, :, : heads + kv_heads], cos, sin).split((heads, kv_heads), dim=2)
            v = qkv[:, :, heads + kv_heads :]
        else:
            q = apply_rotary(self.q_proj(x).view(batch, n, heads, hd), cos, sin)
            k = apply_rotary(self.k_proj(x).view(batch, n, kv_heads, hd), cos, sin)
            v = self.v_proj(x).view(batch, n, kv_heads, hd)
        start = cache.length
        end = start + n
        cache.k[layer][:, :, start:end] = k.transpose(1, 2)
        cache.v[layer][:, :, start:end] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            cache.k[layer][:, :, :end],
            cache.v[layer][:, :, :end],
            attn_mask=allowed,
            scale=self.scaling,
            enable_gqa=heads != kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, n, heads * hd))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # see fuse_projections()

    def fuse_projections(self) -> None:
        """Replace gate/up by one `[2I, D]` projection; once."""
        if self.gate_up_proj is not None:
            return
        ref = self.gate_proj.weight
        fused = nn.Linear(ref.shape[1], 2 * ref.shape[0], bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        del self.gate_proj, self.up_proj
        self.gate_up_proj = fused

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache, layer: int, allowed: Tensor | None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------
# The decoder stack
# --------------------------------------------------------------------------------------------


class Qwen2Model(nn.Module):
    """``embed_tokens``, the decoder layers and the final ``norm`` (``Qwen2ForCausalLM.model``).

    Works on input EMBEDDINGS (CosyVoice mixes text, speech and special rows); :meth:`embed` gives
    the text rows. The output of every forward is after the final norm.
    """

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the table of text embeddings may be stored narrower)."""
        return self.norm.weight.dtype

    def embed(self, ids: Tensor | Sequence[int]) -> Tensor:
        """Text token ids `[...]` -> embeddings `[..., D]` in the compute dtype.

        Only the rows asked for are read: the table may stay memory-mapped and in the checkpoint's
        dtype (151,936 rows full size, of which a request touches a few dozen).
        """
        weight = self.embed_tokens.weight
        ids = torch.as_tensor(ids, dtype=torch.long, device=weight.device)
        return F.embedding(ids, weight).to(self.dtype)

    def new_cache(
        self,
        batch: int = 1,
        capacity: int = 256,
        *,
        pad: Tensor | Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache; ``pad[b]`` leading padding slots per row for a left-padded prefill."""
        ref = self.norm.weight
        return KVCache(
            self.cfg.num_hidden_layers,
            batch,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
            capacity,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
            pad=pad,
        )

    def forward_chunk(self, xs: Tensor, cache: KVCache) -> Tensor:
        """Append n positions ``xs [B, n, D]`` (embeddings) to ``cache``; return ``[B, n, D]`` after
        the final norm. A prefill is a chunk on an empty cache, a decode step a chunk of one.

        Rows are right-aligned: row b's leading ``cache.pad[b]`` slots are padding (masked out of
        every attention); its positions count from its first real slot.
        """
        batch, n, _ = xs.shape
        if batch != cache.batch_size:
            raise ValueError(f"input batch {batch} != cache batch {cache.batch_size}")
        cache.reserve(n)
        start = cache.length
        total = start + n
        device = xs.device
        slots = torch.arange(start, total, device=device)
        if cache.pad is None:
            positions = slots
        else:
            positions = (slots.unsqueeze(0) - cache.pad.unsqueeze(1)).clamp_min(0)
        cos, sin = self.rotary.lookup(positions, xs.dtype)
        allowed = self._attention_mask(cache, start, n, device)
        x = xs
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, allowed)
        cache.length = total
        return self.norm(x)

    @staticmethod
    def _attention_mask(cache: KVCache, start: int, n: int, device: torch.device) -> Tensor | None:
        """`[B|1, 1, n, total]` bool (True = may attend), or None when everything is visible."""
        total = start + n
        keys = cache.key_mask(total)  # [B, 1, 1, total] or None
        if n == 1:
            return keys
        key_slots = torch.arange(total, device=device)
        query_slots = torch.arange(start, total, device=device)
        allowed = key_slots.unsqueeze(0) <= query_slots.unsqueeze(1)  # causal [n, total]
        if keys is None:
            return allowed
        # A padded query would see no key at all (NaN rows that reach the cache of the next layer
        # as 0 * NaN): let it see itself. Its output is never used.
        own = key_slots.unsqueeze(0) == query_slots.unsqueeze(1)
        return (allowed & keys) | own

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        """Full causal forward over ``[B, T, D]`` (no padding) -> ``[B, T, D]`` after the final norm."""
        cache = self.new_cache(inputs_embeds.shape[0], inputs_embeds.shape[1])
        return self.forward_chunk(inputs_embeds, cache)


class Qwen2ForCausalLM(nn.Module):
    """The ``llm.model`` level of the checkpoint: ``model`` = :class:`Qwen2Model`.

    The text ``lm_head`` is deliberately absent (its logits are discarded by CosyVoice); a
    checkpoint's ``lm_head.weight`` is accepted by the family loaders and dropped unread.
    """

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.model = Qwen2Model(cfg)


def drop_lm_head(
    state_dict: Mapping[str, Tensor], key: str, cfg: Qwen2Config, source: str
) -> dict[str, Tensor]:
    """``state_dict`` without ``key`` (the unused text head), after checking its shape if present.

    The tensor is never read, so a memory-mapped checkpoint never pages it in.
    """
    out = dict(state_dict)
    head = out.pop(key, None)
    if head is not None and tuple(head.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelConfigError(
            f"{source}: '{key}' has shape {list(head.shape)}, expected {[cfg.vocab_size, cfg.hidden_size]} "
            "(vocab_size x hidden_size of config.json)"
        )
    return out

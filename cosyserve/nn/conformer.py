"""WeNet/ESPnet-style encoder stack with relative-position self-attention.

One class, :class:`Encoder`, built from :class:`~cosyserve.nn.config.EncoderConfig`, covers the
three uses in CosyVoice v1: the LLM's text encoder (Conformer blocks, SiLU FFN, causal), the LLM
itself (Transformer blocks, `linear_legacy` input, ReLU FFN, causal) and the flow encoder (Conformer
blocks, full attention). Parameter names match the official checkpoints, so
``load_state_dict(strict=True)`` works on them.

Numerics (see the parity README): the input layer is Linear -> LayerNorm(1e-5) [-> ReLU], then
``x * sqrt(d)``; blocks are pre-norm (LayerNorm eps 1e-12); attention scores are
``((q + u) . k + (q + v) . P[i - j]) / sqrt(d_k)`` where ``P = linear_pos(table)`` over the
`rel_pos_espnet` sinusoid table. ``P`` does not depend on the input, so each attention layer keeps
it, grown lazily, instead of recomputing it every step (upstream's decode bottleneck).

Incremental decoding goes through :class:`KVCache`: preallocated per-layer key/value tensors for a
batch of sequences, right-aligned (left-padded) so that every row appends its next position in the
same slot. Relative positions only depend on slot distances, which are the same in every row, so
the rows of a batch share one position window; per-row padding is a key mask.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.config import EncoderConfig

logger = logging.getLogger(__name__)

_BLOCK_NORMS = {"conformer": ("norm_mha", "norm_ff"), "transformer": ("norm1", "norm2")}
_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "relu": nn.ReLU}
_POS_GROW_MIN = 256  # rows of the position cache allocated at least at once


def rel_position_table(r_hi: int, r_lo: int, d_model: int) -> Tensor:
    """Sinusoid rows for relative positions r_hi, r_hi - 1, ..., r_lo (descending, float32).

    Row r is ``[sin(r w_0), cos(r w_0), sin(r w_1), ...]`` with ``w_i = exp(-2i ln(10000) / d)``,
    computed in the same float32 order as upstream's `EspnetRelPositionalEncoding`.
    """
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    position = torch.arange(r_hi, r_lo - 1, -1, dtype=torch.float32).unsqueeze(1)
    angles = position * div_term
    table = torch.empty(position.shape[0], d_model, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class KVCache:
    """Keys and values of every layer for a batch of sequences, with room to grow.

    ``k[layer]`` / ``v[layer]`` are ``[B, heads, capacity, d_k]``; slots ``[0, length)`` are filled.
    Row ``b`` holds its sequence right-aligned in slots ``[pad[b], length)``: the leading
    ``pad[b]`` slots are padding (masked out of attention). Every forward appends the same number
    of positions to all rows, which keeps batched decode of ragged requests a plain tensor op.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        heads: int,
        head_dim: int,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        pad: Tensor | Sequence[int] | None = None,
    ):
        shape = (batch, heads, max(int(capacity), 1), head_dim)
        # Zeros, not empty: padded slots are read (then masked), and 0 * NaN would leak through.
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0
        self.pad: Tensor | None = None
        if pad is not None:
            pad_t = torch.as_tensor(pad, dtype=torch.long, device=device).reshape(batch)
            self.pad = pad_t if bool((pad_t > 0).any()) else None

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def seq_lengths(self) -> Tensor:
        """Real (unpadded) positions per row, `[B]` int64 (on the cache's device)."""
        lengths = torch.full((self.batch_size,), self.length, dtype=torch.long, device=self.k[0].device)
        return lengths if self.pad is None else lengths - self.pad

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions (doubling growth, so appends stay amortised O(1))."""
        need = self.length + extra
        if need <= self.capacity:
            return
        new_cap = max(need, 2 * self.capacity, 16)
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], new_cap, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new

    def key_mask(self, total: int) -> Tensor | None:
        """`[B, 1, 1, total]` True where the slot holds a real position; None when nothing is padded."""
        if self.pad is None:
            return None
        slots = torch.arange(total, device=self.pad.device)
        return (slots.unsqueeze(0) >= self.pad.unsqueeze(1))[:, None, None, :]

    def select(self, rows: Sequence[int] | Tensor) -> KVCache:
        """A new cache with only `rows` (e.g. to drop finished requests), common padding trimmed."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.k[0].device)
        pad = self.pad.index_select(0, idx) if self.pad is not None else None
        trim = int(pad.min()) if pad is not None and idx.numel() else 0
        out = KVCache.__new__(KVCache)
        out.k = [t.index_select(0, idx)[:, :, trim:].contiguous() for t in self.k]
        out.v = [t.index_select(0, idx)[:, :, trim:].contiguous() for t in self.v]
        out.length = self.length - trim
        out.pad = None
        if pad is not None:
            pad = pad - trim
            out.pad = pad if bool((pad > 0).any()) else None
        return out

    @staticmethod
    def stack(caches: Sequence[KVCache], extra_capacity: int = 0) -> KVCache:
        """Concatenate caches along the batch, right-aligning rows of different lengths."""
        if not caches:
            raise ValueError("KVCache.stack needs at least one cache")
        first = caches[0]
        length = max(c.length for c in caches)
        batch = sum(c.batch_size for c in caches)
        _, heads, _, head_dim = first.k[0].shape
        device, dtype = first.k[0].device, first.k[0].dtype
        out = KVCache(
            first.num_layers, batch, heads, head_dim, length + extra_capacity, dtype=dtype, device=device
        )
        pads = []
        row = 0
        for c in caches:
            shift = length - c.length
            rows = slice(row, row + c.batch_size)
            for dst, src in ((out.k, c.k), (out.v, c.v)):
                for layer in range(first.num_layers):
                    dst[layer][rows, :, shift:length] = src[layer][:, :, : c.length]
            own = c.pad if c.pad is not None else torch.zeros(c.batch_size, dtype=torch.long, device=device)
            pads.append(own + shift)
            row += c.batch_size
        out.length = length
        pad = torch.cat(pads)
        out.pad = pad if bool((pad > 0).any()) else None
        return out


class RelPositionMultiHeadedAttention(nn.Module):
    """Multi-head self-attention with ESPnet relative positions (Transformer-XL style u/v biases)."""

    def __init__(self, n_head: int, n_feat: int, causal: bool):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention size {n_feat} is not divisible by {n_head} heads")
        self.h = n_head
        self.d_k = n_feat // n_head
        self.causal = causal
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.linear_qkv: nn.Module | None = None  # see fuse_qkv()
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)
        # linear_pos(table) as [h, rows, d_k] for r = _pos_hi .. _pos_lo (descending).
        self.register_buffer("_pos_proj", torch.zeros(n_head, 0, self.d_k), persistent=False)
        self._pos_hi = -1
        self._pos_lo = 0
        self._pos_key: tuple | None = None
        # New weights invalidate the cache (the version counter below misses inference tensors).
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.reset_positions())

    def fuse_qkv(self) -> nn.Linear:
        """Replace linear_q/k/v by one `[3d, d]` projection (one weight pass and one call instead
        of three per decode step; the int8 plan quantises it). Returns the fused layer."""
        parts = (self.linear_q, self.linear_k, self.linear_v)
        ref = parts[0].weight
        fused = nn.Linear(ref.shape[1], 3 * ref.shape[0], device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in parts]))
            fused.bias.copy_(torch.cat([m.bias for m in parts]))
        del self.linear_q, self.linear_k, self.linear_v
        self.linear_qkv = fused
        return fused

    def fuse_projections(self) -> None:
        """:meth:`fuse_qkv` once (the hook acceleration plans call on every module that has it)."""
        if self.linear_qkv is None:
            self.fuse_qkv()

    # -- the projected position table ----------------------------------------------------------

    def reset_positions(self) -> None:
        """Drop the projected position cache (call after changing linear_pos.weight in place)."""
        self._pos_key = None

    def _weight_key(self) -> tuple:
        w = self.linear_pos.weight
        # Inference tensors have no version counter; then only data_ptr/dtype/device and the
        # load_state_dict hook detect a change.
        version = None if w.is_inference() else w._version
        return (version, w.data_ptr(), w.dtype, w.device)

    def _project_rows(self, r_hi: int, r_lo: int) -> Tensor:
        w = self.linear_pos.weight
        table = rel_position_table(r_hi, r_lo, self.h * self.d_k).to(device=w.device, dtype=w.dtype)
        return self.linear_pos(table).view(-1, self.h, self.d_k).transpose(0, 1)

    def position_window(self, r_hi: int, r_lo: int) -> Tensor:
        """`linear_pos(table)` for relative positions r_hi .. r_lo (descending), `[h, rows, d_k]`."""
        if torch.is_grad_enabled() and self.linear_pos.weight.requires_grad:
            return self._project_rows(r_hi, r_lo)  # training: keep the autograd graph, no caching
        key = self._weight_key()
        if key != self._pos_key:  # first use, or the weights changed: start over
            self._pos_proj = self._pos_proj.new_zeros(self.h, 0, self.d_k).to(self.linear_pos.weight)
            self._pos_hi, self._pos_lo, self._pos_key = -1, 0, key
        if r_hi > self._pos_hi or r_lo < self._pos_lo:
            self._grow_positions(r_hi, r_lo)
        start = self._pos_hi - r_hi
        return self._pos_proj[:, start : start + r_hi - r_lo + 1]

    def _grow_positions(self, r_hi: int, r_lo: int) -> None:
        # Grow geometrically and only project the new rows (row projections are independent).
        hi = max(r_hi, 2 * self._pos_hi + 1, _POS_GROW_MIN - 1)
        lo = 0 if self.causal and r_lo >= 0 else min(r_lo, -hi)
        parts = []
        if self._pos_hi < 0:
            parts.append(self._project_rows(hi, lo))
        else:
            if hi > self._pos_hi:
                parts.append(self._project_rows(hi, self._pos_hi + 1))
            parts.append(self._pos_proj)
            if lo < self._pos_lo:
                parts.append(self._project_rows(self._pos_lo - 1, lo))
        self._pos_proj = torch.cat(parts, dim=1).contiguous() if len(parts) > 1 else parts[0].contiguous()
        self._pos_hi, self._pos_lo = hi, lo
        logger.debug("relative position cache grown to r in [%d, %d]", lo, hi)

    def _position_scores(self, q_v: Tensor, total: int) -> Tensor:
        """`(q + v) . P[r]` for n queries at slots total-n .. total-1 over keys 0 .. total-1.

        Returns `[B, h, n, total]`. One matmul against the shared position window, then a strided
        view picks r = i - j per query (the rel_shift trick, without copies).
        """
        batch, heads, n, d_k = q_v.shape
        r_lo = 0 if (self.causal or n == 1) else -(n - 1)
        window = self.position_window(total - 1, r_lo)  # [h, W, d_k]
        q_flat = q_v.transpose(0, 1).reshape(heads, batch * n, d_k)
        scores = torch.bmm(q_flat, window.transpose(1, 2))  # [h, B*n, W]
        if n == 1:
            return scores.view(heads, batch, 1, total).transpose(0, 1)
        if r_lo == 0:  # causal: the r < 0 columns would be masked anyway; pad them with zeros
            scores = F.pad(scores, (0, n - 1))
        width = total + n - 1
        scores = scores.contiguous()
        # [h, B, n, W] storage; query q (slot total-n+q) needs columns (n-1-q) .. (n-1-q)+total-1.
        return scores.as_strided(
            (batch, heads, n, total),
            (n * width, batch * n * width, width - 1, 1),
            scores.storage_offset() + n - 1,
        )

    # -- attention -----------------------------------------------------------------------------

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x `[B, n, d]` -> q, k, v, each `[B, n, h, d_k]` (fused or separate projections)."""
        batch, n, _ = x.shape
        if self.linear_qkv is not None:
            q, k, v = self.linear_qkv(x).view(batch, n, 3, self.h, self.d_k).unbind(2)
            return q, k, v
        return (
            self.linear_q(x).view(batch, n, self.h, self.d_k),
            self.linear_k(x).view(batch, n, self.h, self.d_k),
            self.linear_v(x).view(batch, n, self.h, self.d_k),
        )

    def forward(
        self,
        x: Tensor,
        allowed: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """x `[B, n, d]`; allowed: bool, broadcastable to `[B, h, n, T]`, True = may attend.

        With a cache, the n new keys/values are written at slots ``cache.length ..`` (the caller
        advances ``cache.length`` after the last layer) and the queries attend to all T slots.
        """
        batch, n, _ = x.shape
        q, k, v = self.project_qkv(x)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        if cache is not None:
            start = cache.length
            end = start + n
            cache.k[layer][:, :, start:end] = k
            cache.v[layer][:, :, start:end] = v
            k = cache.k[layer][:, :, :end]
            v = cache.v[layer][:, :, :end]
        total = k.shape[2]
        q_u = (q + self.pos_bias_u).transpose(1, 2)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        scores = torch.matmul(q_u, k.transpose(-2, -1))
        scores = (scores + self._position_scores(q_v, total)) / math.sqrt(self.d_k)
        if allowed is not None:
            blocked = ~allowed
            scores = scores.masked_fill(blocked, float("-inf"))
            # Fully blocked rows (padded queries) give NaN in softmax; zero them like upstream.
            attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, n, self.h * self.d_k)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported FFN activation {activation!r}; known: {sorted(_ACTIVATIONS)}")
        self.w_1 = nn.Linear(d_model, d_ff)
        self.activation = _ACTIVATIONS[activation]()
        self.w_2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class LinearInput(nn.Module):
    """`linear` / `linear_legacy` input layer: Linear -> LayerNorm [-> ReLU], then x * sqrt(d).

    The rel-pos table is not added to x (the attention consumes it), so nothing else happens here.
    """

    def __init__(self, idim: int, odim: int, legacy: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5)]
        if legacy:
            layers.append(nn.ReLU())
        self.out = nn.Sequential(*layers)
        self.xscale = math.sqrt(odim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x) * self.xscale


class EncoderLayer(nn.Module):
    """Pre-norm block: ``x += MHA(LN(x)); x += FFN(LN(x))`` (norm names differ per block type)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.block_type not in _BLOCK_NORMS:
            raise ValueError(f"unsupported block type {cfg.block_type!r}; known: {sorted(_BLOCK_NORMS)}")
        d = cfg.output_size
        self.self_attn = RelPositionMultiHeadedAttention(cfg.attention_heads, d, cfg.causal)
        self.feed_forward = PositionwiseFeedForward(d, cfg.linear_units, cfg.activation)
        self._norm_names = _BLOCK_NORMS[cfg.block_type]
        for name in self._norm_names:
            self.add_module(name, nn.LayerNorm(d, eps=1e-12))

    def forward(self, x: Tensor, allowed: Tensor | None, cache: KVCache | None, layer: int) -> Tensor:
        norm_attn, norm_ff = (self._modules[name] for name in self._norm_names)
        x = x + self.self_attn(norm_attn(x), allowed, cache, layer)
        return x + self.feed_forward(norm_ff(x))


class Encoder(nn.Module):
    """Input layer, N relative-position blocks, final LayerNorm (`after_norm`, eps 1e-5)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.input_layer not in ("linear", "linear_legacy"):
            raise ValueError(f"unsupported input layer {cfg.input_layer!r}; known: linear, linear_legacy")
        self.cfg = cfg
        self.causal = cfg.causal
        self.embed = LinearInput(cfg.input_size, cfg.output_size, legacy=cfg.input_layer == "linear_legacy")
        self.encoders = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_blocks))
        self.after_norm = nn.LayerNorm(cfg.output_size, eps=1e-5)

    @property
    def output_size(self) -> int:
        return self.cfg.output_size

    def forward(self, xs: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Full-sequence forward.

        xs `[B, T, input_size]`; mask: None (no padding), `[B]` int lengths (right padding) or a
        `[B, T]` bool validity mask. Returns (output `[B, T, d]`, validity mask `[B, 1, T]`), like
        upstream; padded positions of the output are meaningless.
        """
        batch, total, _ = xs.shape
        valid = _validity_mask(mask, batch, total, xs.device)
        allowed = valid[:, None, None, :]
        if self.causal:
            allowed = allowed & torch.ones(total, total, dtype=torch.bool, device=xs.device).tril()
        elif bool(valid.all()):
            allowed = None  # nothing to mask: skip the masked softmax
        x = self.embed(xs)
        for i, layer in enumerate(self.encoders):
            x = layer(x, allowed, None, i)
        return self.after_norm(x), valid.unsqueeze(1)

    # -- incremental decoding -----------------------------------------------------------------

    def new_cache(
        self,
        batch: int = 1,
        capacity: int = 256,
        *,
        pad: Tensor | Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty cache; `pad[b]` leading padding slots per row for a left-padded prefill."""
        ref = self.after_norm.weight
        heads = self.cfg.attention_heads
        return KVCache(
            len(self.encoders),
            batch,
            heads,
            self.cfg.output_size // heads,
            capacity,
            dtype=dtype or ref.dtype,
            device=device or ref.device,
            pad=pad,
        )

    def forward_chunk(self, xs: Tensor, cache: KVCache) -> Tensor:
        """Append n positions `xs [B, n, input_size]` to `cache`; return their outputs `[B, n, d]`.

        The prefill is a chunk on an empty cache, a decode step a chunk of one (a query at
        absolute slot T-1 over T cached keys). Causal encoders mask future slots within the chunk.
        """
        batch, n, _ = xs.shape
        if batch != cache.batch_size:
            raise ValueError(f"input batch {batch} != cache batch {cache.batch_size}")
        cache.reserve(n)
        total = cache.length + n
        allowed = cache.key_mask(total)
        if self.causal and n > 1:
            slots = torch.arange(total, device=xs.device)
            future_ok = slots.unsqueeze(0) <= (slots[cache.length :]).unsqueeze(1)  # [n, total]
            allowed = future_ok if allowed is None else allowed & future_ok
        x = self.embed(xs)
        for i, layer in enumerate(self.encoders):
            x = layer(x, allowed, cache, i)
        cache.length = total
        return self.after_norm(x)

    def forward_step(self, xs: Tensor, cache: KVCache) -> Tensor:
        """One decode step: `xs [B, 1, input_size]` -> `[B, 1, d]` (alias of forward_chunk)."""
        return self.forward_chunk(xs, cache)

    @torch.inference_mode()
    def precompute_positions(self, max_len: int) -> None:
        """Fill every layer's projected position cache up to `max_len` keys (avoids growth later)."""
        r_lo = 0 if self.causal else -(max_len - 1)
        for layer in self.encoders:
            layer.self_attn.position_window(max_len - 1, r_lo)


def chunk_attention_mask(size: int, chunk: int, device: torch.device | str | None = None) -> Tensor | None:
    """Block-causal attention for chunk-wise streaming: `[size, size]` bool, query i may attend to
    key j iff ``j < (i // chunk + 1) * chunk`` (its own chunk and every earlier one; upstream's
    `subsequent_chunk_mask` with all left chunks). None when `chunk <= 0` (full attention)."""
    if chunk <= 0:
        return None
    pos = torch.arange(size, device=device)
    limit = (torch.div(pos, chunk, rounding_mode="floor") + 1) * chunk
    return pos.unsqueeze(0) < limit.unsqueeze(1)


# Upstream class names: the same network, configured by EncoderConfig.
ConformerEncoder = Encoder
TransformerEncoder = Encoder


def _validity_mask(mask: Tensor | None, batch: int, total: int, device: torch.device) -> Tensor:
    if mask is None:
        return torch.ones(batch, total, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        if mask.shape != (batch, total):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, time) = {(batch, total)}")
        return mask.to(device)
    lengths = mask.to(device=device, dtype=torch.long).reshape(batch)
    return torch.arange(total, device=device).unsqueeze(0) < lengths.unsqueeze(1)

"""The DiT flow-matching estimator of CosyVoice3 (upstream `cosyvoice.flow.DiT.dit.DiT`).

``(x, mask, mu, t, spks, cond) -> v``, all channels-first like the other estimators: x, mu, cond
``[B, 80, T]``, mask ``[B, 1, T]`` (1 = frame, 0 = padding), t ``[B]``, spks ``[B, 80]``.

* time: sinusoidal embedding of ``1000 t`` (256 wide) -> Linear -> SiLU -> Linear.
* input: ``Linear(cat[x, cond, mu, spks])`` plus a causal convolutional position embedding (two
  grouped convolutions, kernel 31, left-padded, each followed by Mish).
* blocks: adaptive LayerNorm (shift/scale/gate from the time embedding) around self-attention and
  a GELU-tanh feed-forward. Rotary positions (x-transformers ``RotaryEmbedding(dim_head)``,
  interleaved pairs) rotate only the first ``dim_head`` channels of q and k: head 0 gets positions,
  the other heads are position-free (upstream applies the rotation before splitting heads).
* attention mask: key padding, or with ``streaming=True`` additionally chunks of
  ``static_chunk_size`` frames (a frame sees every frame of its own and all earlier chunks).
* output: adaptive LayerNorm (scale first, then shift) -> Linear to 80 mel channels.

Everything the time embedding feeds (each block's six modulation vectors, the final scale/shift)
depends on ``t`` alone, and the sampler calls the estimator with the same few ``t`` values for
every request and every streaming chunk: on CPU those vectors are computed once per ``t`` value
and reused (:meth:`DiT.time_conditioning`): the adaptive norms' ~25 MB of weights per block are not
re-read at every call (measured in the README, Performance). A CPU plan goes further
(:meth:`DiT.freeze_time_conditioning`): it computes the vectors of the sampler's own t values once
and frees the weights they come from, ~40 % of the DiT's parameters.

Module names match upstream's, so ``flow.pt``'s ``decoder.estimator.*`` keys load strictly. Every
operation is a plain tensor op (no Python loop over frames, no data-dependent control flow while
tracing), so the module exports to ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.runtime.memory import page_out

__all__ = ["DiT", "DiTConfig", "attention_masks"]

_LN_EPS = 1e-6
_TIME_FREQ_DIM = 256
_TIME_CACHE_SIZE = 64  # time values kept (a sampler uses n_timesteps of them)

# Every block's modulation vectors and the final norm's (scale, shift) for one call's t values.
TimeConditioning = tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...]]


@dataclass
class DiTConfig:
    """The DiT flow-matching estimator (`cosyvoice.flow.DiT.dit.DiT`)."""

    dim: int = 1024
    depth: int = 22
    heads: int = 16
    dim_head: int = 64
    ff_mult: int = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    # Attention chunk (frames) of streaming calls: chunk_size tokens x token_mel_ratio.
    static_chunk_size: int = 50
    conv_pos_kernel: int = 31
    conv_pos_groups: int = 16  # Conv1d(dim, dim, 31, groups=16), fixed upstream

    @property
    def in_channels(self) -> int:
        """Width of the input projection: x, cond, mu and the speaker vector side by side."""
        return 2 * self.mel_dim + self.mu_dim + self.spk_dim


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _layer_norm(x: Tensor, dim: int) -> Tensor:
    """LayerNorm without affine parameters (``dim`` a Python int: traced shapes stay constant)."""
    return F.layer_norm(x, (dim,), eps=_LN_EPS)


def _modulate(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with per-row ``[B, H]`` scale and shift, in one pass over x."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_dim: int = _TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoidal(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
        args = 1000 * t.unsqueeze(1) * freqs.unsqueeze(0)
        return torch.cat((args.sin(), args.cos()), dim=-1).to(t.dtype)

    def forward(self, t: Tensor) -> Tensor:
        return self.time_mlp(self.sinusoidal(t))


class CausalConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel_size: int, groups: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: Tensor) -> Tensor:
        """``[B, T, H]`` -> ``[B, T, H]``; frame i sees frames i-2(k-1) .. i."""
        y = x.transpose(1, 2)
        y = self.conv1(F.pad(y, (self.kernel_size - 1, 0)))
        y = self.conv2(F.pad(y, (self.kernel_size - 1, 0)))
        return y.transpose(1, 2)


class InputEmbedding(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.in_channels, cfg.dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(cfg.dim, cfg.conv_pos_kernel, cfg.conv_pos_groups)

    def forward(self, x: Tensor, cond: Tensor, mu: Tensor, spks: Tensor) -> Tensor:
        """Time-major ``[B, T, 80]`` inputs and ``spks`` ``[B, 80]`` -> ``[B, T, H]``."""
        spks = spks.unsqueeze(1).expand(-1, x.shape[1], -1)
        h = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        # h first: the sum takes h's (contiguous) layout, not the transposed convolution output's,
        # and every later op inherits it.
        return h + self.conv_pos_embed(h)


class RotaryEmbedding(nn.Module):
    """x-transformers' rotary embedding: ``theta_{p,i} = p * inv_freq[i]`` on interleaved pairs.

    ``inv_freq`` is a checkpoint buffer (``rotary_embed.inv_freq``): the loaded values are used,
    as upstream does, even where a checkpoint stored them rounded.
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim_head
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim_head, 2).float() / dim_head)))
        # The pair swap (a, b) -> (b, a) as constant gather indices 1, 0, 3, 2, ...
        self.register_buffer("pair_swap", torch.arange(dim_head) ^ 1, persistent=False)

    def cos_sin(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``cos``, ``sin`` ``[T, dim_head]`` with each frequency repeated for its pair (``sin``
        carries the sign of the pair rotation ``(a, b) -> (-b, a)``), and the pair-swap indices
        (see :func:`_apply_rotary`)."""
        pos = torch.arange(seq_len, device=self.inv_freq.device).type_as(self.inv_freq)
        freqs = pos[:, None] * self.inv_freq[None, :]
        freqs = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        sign = torch.tensor([-1.0, 1.0], device=freqs.device).repeat(self.dim // 2)
        return freqs.cos().to(dtype), (freqs.sin() * sign).to(dtype), self.pair_swap


def _apply_rotary(x: Tensor, cos: Tensor, signed_sin: Tensor, swap: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``[B, T, C]`` (upstream: before the head split):
    pair (a, b) -> (a cos - b sin, b cos + a sin), with the pair swap as a constant gather.

    In place when allowed (x is a fresh projection output): only those channels are rewritten."""
    n = cos.shape[-1]
    head = x[..., :n]
    rotated = head * cos + head[..., swap] * signed_sin
    if torch.is_grad_enabled() or _exporting():
        return torch.cat([rotated, x[..., n:]], dim=-1)
    x[..., :n] = rotated
    return x


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self._qkv: tuple[Tensor, Tensor] | None = None  # see fuse_qkv
        self.to_qkv: nn.Module | None = None  # see fuse_projections

    def fuse_projections(self) -> None:
        """Replace q/k/v by one module ``to_qkv`` (for plans that convert linear layers); once.
        Upstream's state-dict keys no longer load into the block after this."""
        if self.to_qkv is not None:
            return
        fused = self._fused()  # fuse_qkv's tensors are reused as they are: no copy
        with torch.inference_mode(False), torch.no_grad():
            if fused is None:
                linears = (self.to_q, self.to_k, self.to_v)
                fused = torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears])
            weight, bias = fused
            to_qkv = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
            to_qkv.weight = nn.Parameter(weight, requires_grad=False)
            to_qkv.bias = nn.Parameter(bias, requires_grad=False)
        del self.to_q, self.to_k, self.to_v
        self._qkv = None
        self.to_qkv = to_qkv

    def fuse_qkv(self) -> bool:
        """Store the q, k and v projections side by side in one weight and one bias, the three
        parameters becoming views of them (no extra memory), so one GEMM computes all three:
        bit-identical outputs (checked by the tests), fewer passes over the activations.

        Call it after loading and after moving the module: anything that replaces the parameters
        (``.to()``, quantisation) silently returns the projections to three separate GEMMs.
        Returns whether fusing applied (plain float ``nn.Linear`` projections only)."""
        if self.to_qkv is not None:
            return True
        linears = (self.to_q, self.to_k, self.to_v)
        if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
            self._qkv = None
            return False
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat([m.weight for m in linears])
            bias = torch.cat([m.bias for m in linears])
            n = weight.shape[0] // 3
            for i, m in enumerate(linears):
                separate = m.weight
                m.weight = nn.Parameter(weight[i * n : (i + 1) * n], requires_grad=m.weight.requires_grad)
                m.bias = nn.Parameter(bias[i * n : (i + 1) * n], requires_grad=m.bias.requires_grad)
                page_out(separate)  # read once by the cat: memory-mapped pages would stay in RSS
        self._qkv = (weight, bias)
        return True

    def _fused(self) -> tuple[Tensor, Tensor] | None:
        """The fused weight and bias while the three parameters still are views of them (once they
        are replaced, e.g. quantised, the fused tensors are dropped: they would only hold memory)."""
        if self._qkv is None:
            return None
        weight, bias = self._qkv
        n = weight.shape[0] // 3
        for i, m in enumerate((self.to_q, self.to_k, self.to_v)):
            w, b = getattr(m, "weight", None), getattr(m, "bias", None)
            if (
                type(m) is not nn.Linear
                or w is None
                or b is None
                or w.data_ptr() != weight[i * n].data_ptr()
                or b.data_ptr() != bias[i * n :].data_ptr()
                or w.dtype != weight.dtype
            ):
                self._qkv = None
                return None
        return weight, bias

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor, Tensor],
        attn_mask: Tensor | None,
        keep: Tensor | None,
    ) -> Tensor:
        b, t, _ = x.shape
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        elif (fused := None if _exporting() else self._fused()) is not None:
            q, k, v = F.linear(x, *fused).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q = _apply_rotary(q, *rope)
        k = _apply_rotary(k, *rope)
        q, k, v = (y.view(b, t, self.heads, self.dim_head).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.to_out[0](out.transpose(1, 2).reshape(b, t, self.heads * self.dim_head))
        if keep is not None:
            out = out.masked_fill(~keep[..., None], 0.0)
        return out


class AdaLayerNormZero(nn.Module):
    """SiLU(time) -> Linear(H, 6H): shift/scale/gate of the attention and feed-forward halves."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim * 6)

    def forward(self, temb: Tensor) -> tuple[Tensor, ...]:
        return torch.chunk(self.linear(F.silu(temb)), 6, dim=1)


class AdaLayerNormZeroFinal(nn.Module):
    """SiLU(time) -> Linear(H, 2H) -> (scale, shift) (scale first), applied to LayerNorm(x)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(dim, dim * 2)

    def modulation(self, temb: Tensor) -> tuple[Tensor, ...]:
        """(scale, shift) ``[B, H]`` from the time embedding."""
        return torch.chunk(self.linear(F.silu(temb)), 2, dim=1)

    def forward(self, x: Tensor, modulation: tuple[Tensor, ...]) -> Tensor:
        scale, shift = modulation
        return _modulate(_layer_norm(x, self.dim), scale, shift)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = dim * mult
        # Keys ff.0.0 / ff.2 as upstream (index 1 was a dropout).
        self.ff = nn.Sequential(
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
            nn.Identity(),
            nn.Linear(inner, dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.dim = cfg.dim
        self.attn_norm = AdaLayerNormZero(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.dim_head)
        self.ff = FeedForward(cfg.dim, cfg.ff_mult)

    def forward(
        self,
        x: Tensor,
        modulation: tuple[Tensor, ...],
        rope: tuple[Tensor, Tensor, Tensor],
        attn_mask: Tensor | None,
        keep: Tensor | None,
    ) -> Tensor:
        """``modulation``: this block's ``attn_norm(temb)`` (see :meth:`DiT.time_conditioning`)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        attn = self.attn(_modulate(_layer_norm(x, self.dim), scale_msa, shift_msa), rope, attn_mask, keep)
        x = torch.addcmul(x, gate_msa[:, None], attn)
        ff = self.ff(_modulate(_layer_norm(x, self.dim), scale_mlp, shift_mlp))
        return torch.addcmul(x, gate_mlp[:, None], ff)


def attention_masks(mask: Tensor, streaming: bool, chunk_size: int) -> tuple[Tensor | None, Tensor | None]:
    """The boolean SDPA mask ``[B, 1, T, T]`` (True = attend) and the frames whose attention output
    is kept ``[B, T]`` (upstream zeroes the others: the last query row's mask), from ``mask``
    ``[B, 1, T]``. Both None when every frame is valid and attention is full (no mask needed).

    Rows that would attend to nothing attend to everything instead, as upstream's
    ``add_optional_chunk_mask`` does (only fully padded rows can have them).
    """
    key = mask[:, 0, :].bool()
    chunked = streaming and chunk_size > 0
    if not chunked and not _exporting() and bool(key.all()):
        return None, None
    t = key.shape[1]
    if chunked:
        pos = torch.arange(t, device=key.device)
        visible = pos[None, :] < (torch.div(pos, chunk_size, rounding_mode="floor") + 1)[:, None] * chunk_size
        allowed = key[:, None, :] & visible[None]
    else:
        allowed = key[:, None, :].expand(-1, t, -1)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None], allowed[:, -1, :]


class DiT(nn.Module):
    """The CosyVoice3 flow estimator; see the module docstring."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.static_chunk_size = cfg.static_chunk_size
        self.time_embed = TimestepEmbedding(cfg.dim)
        self.input_embed = InputEmbedding(cfg)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = AdaLayerNormZeroFinal(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)
        self._time_cache: dict[tuple, TimeConditioning] = {}
        # Set by freeze_time_conditioning: the only t values served, their weights freed.
        self._time_table: dict[float, TimeConditioning] | None = None
        self.register_load_state_dict_pre_hook(self._before_load)

    def _before_load(self, *_: object) -> None:
        if self._time_table is not None:
            raise RuntimeError(
                "this DiT's time-conditioning weights were freed (freeze_time_conditioning): "
                "load the checkpoint into a fresh model"
            )
        # Weights loaded in place keep their tensors (and so the cache key): forget the entries.
        self._time_cache.clear()

    def forward(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor,
        cond: Tensor,
        streaming: bool = False,
    ) -> Tensor:
        """The velocity ``[B, 80, T]``; see the module docstring for the inputs."""
        b, _, frames = x.shape
        if t.dim() == 0:
            t = t.repeat(b)
        blocks, final = self.time_conditioning(t)
        h = self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)
        rope = self.rotary_embed.cos_sin(frames, h.dtype)
        attn_mask, keep = attention_masks(mask, streaming, self.static_chunk_size)
        for block, modulation in zip(self.transformer_blocks, blocks):
            h = block(h, modulation, rope, attn_mask, keep)
        return self.proj_out(self.norm_out(h, final)).transpose(1, 2)

    def _time_conditioning(self, t: Tensor) -> TimeConditioning:
        temb = self.time_embed(t)
        return [block.attn_norm(temb) for block in self.transformer_blocks], self.norm_out.modulation(temb)

    def _time_modules(self) -> list[nn.Module]:
        """What the time conditioning is computed from."""
        return [self.time_embed, self.norm_out.linear, *(b.attn_norm.linear for b in self.transformer_blocks)]

    @torch.inference_mode()
    def freeze_time_conditioning(self, times: Tensor) -> int:
        """Compute the time conditioning of each t in ``times`` (the sampler's step times, see
        :func:`cosyserve.nn.cfm.euler_times`) once, then free the time MLP's and the adaptive norms'
        weights (their pages handed back, the modules left on the meta device); returns the bytes
        freed. From then on only those t values are served: any other raises RuntimeError. CPU only
        (the table holds CPU tensors); a second call does nothing."""
        if self._time_table is not None:
            return 0
        if any(p.device.type != "cpu" for m in self._time_modules() for p in m.parameters()):
            raise RuntimeError("freeze_time_conditioning needs the time-conditioning weights on the CPU")
        times = times.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        table = {float(t): self._time_conditioning(t.reshape(1)) for t in times}
        freed = 0
        for module in self._time_modules():
            for p in module.parameters():
                freed += p.numel() * p.element_size()
                page_out(p)  # memory-mapped pages leave RSS; heap copies are freed below
            module.to(device="meta")
        self._time_cache.clear()
        self._time_table = table
        return freed

    @property
    def frozen_times(self) -> Tensor | None:
        """The t values served since :meth:`freeze_time_conditioning` (None: any t)."""
        return None if self._time_table is None else torch.tensor(list(self._time_table), dtype=torch.float32)

    def _frozen_conditioning(self, t: Tensor) -> TimeConditioning:
        assert self._time_table is not None
        if t.dtype != torch.float32:
            raise RuntimeError(f"this DiT's time conditioning was precomputed for float32 t, got {t.dtype}")
        entries = []
        for value in t.tolist():
            entry = self._time_table.get(value)
            if entry is None:
                raise RuntimeError(
                    f"t = {value} is not one of the {len(self._time_table)} Euler step times this DiT's "
                    "time conditioning was precomputed for (its weights were freed by the plan)"
                )
            entries.append(entry)
        if all(e is entries[0] for e in entries):
            blocks, final = entries[0]
            return _expanded(blocks, final, len(entries))
        # Rows at different steps in one call: each row's vectors, stacked.
        blocks = [tuple(map(torch.cat, zip(*rows))) for rows in zip(*(e[0] for e in entries))]
        return blocks, tuple(map(torch.cat, zip(*(e[1] for e in entries))))

    def time_conditioning(self, t: Tensor) -> TimeConditioning:
        """Every block's modulation vectors and the final norm's, ``[B, H]`` each, for times ``t``
        ``[B]``: on CPU, computed once per time value (every row of a call shares it: the CFG pair,
        requests batched at the same Euler step) and kept while the weights they come from stay;
        after :meth:`freeze_time_conditioning`, looked up in its table."""
        if self._time_table is not None:
            return self._frozen_conditioning(t)
        cacheable = (
            t.device.type == "cpu" and not torch.is_grad_enabled() and not _exporting() and t.numel() > 0
        )
        if not cacheable or bool(t.ne(t[0]).any()):
            return self._time_conditioning(t)
        key = (float(t[0]), t.dtype, self._conditioning_weights())
        entry = self._time_cache.get(key)
        if entry is None:
            if len(self._time_cache) >= _TIME_CACHE_SIZE:
                self._time_cache.clear()
            entry = self._time_cache[key] = self._time_conditioning(t[:1])
        return _expanded(*entry, t.shape[0])

    def _conditioning_weights(self) -> tuple:
        """What the time conditioning is computed from: a new tensor or module (loading, ``.to()``,
        quantisation) is another key, so a cached entry never outlives its weights."""
        return tuple(
            (id(m), *((p.data_ptr(), p.dtype) for p in m.parameters())) for m in self._time_modules()
        )

    def fuse_qkv(self) -> bool:
        """Fuse every block's q/k/v projections (see :meth:`Attention.fuse_qkv`)."""
        return all([block.attn.fuse_qkv() for block in self.transformer_blocks])

    # Stage outputs, for tests and diagnostics.
    def embed_inputs(self, x: Tensor, mu: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        return self.input_embed(x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spks)


def _expanded(blocks: list[tuple[Tensor, ...]], final: tuple[Tensor, ...], rows: int) -> TimeConditioning:
    """One time value's conditioning (``[1, H]`` vectors) as ``[rows, H]`` views."""
    return [tuple(v.expand(rows, -1) for v in m) for m in blocks], tuple(v.expand(rows, -1) for v in final)

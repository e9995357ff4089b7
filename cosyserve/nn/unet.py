"""The flow-matching vector-field estimator of CosyVoice v1: a 1-D U-Net (`ConditionalDecoder`).

Module and parameter names follow the official checkpoint (`decoder.estimator.*` in `flow.pt`), so
a state dict loads with ``strict=True``. Numerics follow the upstream Matcha-TTS / diffusers blocks:
GroupNorm(8) + Mish conv blocks, pre-norm transformer blocks with exact GELU, and an additive key
mask ``(1 - mask) * -1e10`` in attention.

The forward is written for tracing/export: no Python branching on tensor shapes or values, every
per-call constant (time embedding, masks, attention biases) is computed once per call, not per
block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.config import EstimatorConfig

# Upstream `mask_to_bias`: masked keys get this additive score (exp underflows to exactly 0).
MASK_BIAS = -1.0e10


def timestep_embedding(t: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding `[sin(scale t f), cos(scale t f)]`, `f_k = exp(-k ln(1e4) / (half - 1))`."""
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -step)
    # Same float32 operation order as upstream: (scale * t) first, then * f.
    emb = scale * t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (keys `linear_1`, `linear_2`)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class Block1D(nn.Module):
    """`Conv1d(k3)(x * mask) -> GroupNorm(8) -> Mish`, then `* mask` (keys `block.0`, `block.1`)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out), nn.Mish()
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        conv, norm = self.block[0], self.block[1]
        h = conv(x * mask)
        h = F.group_norm(h, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.mish(h) * mask


class ResnetBlock1D(nn.Module):
    """`h = Block(x); h += Linear(Mish(t_emb)); h = Block(h); out = h + Conv1x1(x * mask)`."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8):
        super().__init__()
        # Key `mlp.1` (index 0 is the parameter-free Mish, applied once per call by the caller).
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups)
        self.block2 = Block1D(dim_out, dim_out, groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: Tensor, mask: Tensor, t_act: Tensor) -> Tensor:
        """`t_act` is `Mish(time embedding)` `[B, time_emb_dim]`, shared by every resnet."""
        h = self.block1(x, mask) + self.mlp[1](t_act).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Attention(nn.Module):
    """Self-attention with diffusers key names: `to_q/to_k/to_v` (no bias), `to_out.0`."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_qkv: nn.Module | None = None  # see fuse_projections

    def fuse_projections(self) -> None:
        """Replace q/k/v by one module ``to_qkv`` (one GEMM; for plans that convert linear layers);
        once. Upstream's state-dict keys no longer load into the block after this."""
        if self.to_qkv is not None:
            return
        ref = self.to_q.weight
        to_qkv = nn.Linear(ref.shape[1], 3 * ref.shape[0], bias=False, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            to_qkv.weight.copy_(torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]))
        del self.to_q, self.to_k, self.to_v
        self.to_qkv = to_qkv

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """`x` `[B, T, C]`; `bias` `[B, 1, 1, T]` additive key mask."""
        b = x.shape[0]
        if self.to_qkv is not None:
            qkv = self.to_qkv(x).view(b, -1, 3 * self.heads, self.head_dim).transpose(1, 2)
            q, k, v = qkv.chunk(3, dim=1)
        else:
            q = self.to_q(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
            k = self.to_k(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
            v = self.to_v(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)
        # Scale defaults to 1/sqrt(head_dim), as in diffusers.
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](o.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim))


class GELUProj(nn.Module):
    """diffusers `GELU`: Linear (key `proj`) followed by exact (erf) GELU."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    """Keys `net.0.proj`, `net.2`: Linear(C, 4C) -> GELU -> Linear(4C, C)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELUProj(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """diffusers BasicTransformerBlock, self-attention only: `x += Attn(LN1 x); x += FF(LN3 x)`."""

    def __init__(self, dim: int, heads: int, head_dim: int, act_fn: str = "gelu"):
        super().__init__()
        if act_fn != "gelu":
            raise ValueError(f"estimator act_fn {act_fn!r} is not supported (CosyVoice v1 uses 'gelu')")
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x), bias)
        return x + self.ff(self.norm3(x))


class Downsample1D(nn.Module):
    """Conv1d(k3, stride 2, p1) (key `conv`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """ConvTranspose1d(k4, stride 2, p1) (key `conv`): length 2T."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _transformers(dim: int, cfg: EstimatorConfig) -> nn.ModuleList:
    return nn.ModuleList(
        TransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim, cfg.act_fn) for _ in range(cfg.n_blocks)
    )


def _run_transformers(blocks: nn.ModuleList, x: Tensor, bias: Tensor) -> Tensor:
    """Channels-first in and out; the blocks run time-major `[B, T, C]`."""
    h = x.transpose(1, 2).contiguous()
    for block in blocks:
        h = block(h, bias)
    return h.transpose(1, 2).contiguous()


class ConditionalDecoder(nn.Module):
    """The CFM estimator: `forward(x, mask, mu, t, spks, cond) -> [B, out_channels, T]`.

    Input is the channel concat `[x, mu, spks over time, cond]` (`in_channels` = 4 x 80).
    Frames where `mask == 0` come out exactly 0. Any batch size and any length T (odd too).
    """

    def __init__(self, cfg: EstimatorConfig):
        super().__init__()
        self.cfg = cfg
        channels = tuple(cfg.channels)
        self.in_channels = cfg.in_channels
        self.out_channels = cfg.out_channels
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, time_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            is_last = i == len(channels) - 1
            down = self._same_length_conv(out_ch) if is_last else Downsample1D(out_ch)
            self.down_blocks.append(
                nn.ModuleList([self._resnet(in_ch, out_ch, time_dim), _transformers(out_ch, cfg), down])
            )

        self.mid_blocks = nn.ModuleList(
            nn.ModuleList(
                [self._resnet(channels[-1], channels[-1], time_dim), _transformers(channels[-1], cfg)]
            )
            for _ in range(cfg.num_mid_blocks)
        )

        up_channels = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up_channels) - 1):
            in_ch, out_ch = up_channels[i] * 2, up_channels[i + 1]
            is_last = i == len(up_channels) - 2
            up = self._same_length_conv(out_ch) if is_last else Upsample1D(out_ch)
            self.up_blocks.append(
                nn.ModuleList([self._resnet(in_ch, out_ch, time_dim), _transformers(out_ch, cfg), up])
            )

        self.final_block = self._conv_block(up_channels[-1], up_channels[-1])
        self.final_proj = nn.Conv1d(up_channels[-1], cfg.out_channels, 1)

    # The blocks a variant may replace (the causal U-Net of CosyVoice2 does), keys unchanged.
    def _resnet(self, dim: int, dim_out: int, time_dim: int) -> nn.Module:
        return ResnetBlock1D(dim, dim_out, time_dim)

    def _same_length_conv(self, dim: int) -> nn.Module:
        """The k3 conv that stands in for the down/up-sampling at the last level."""
        return nn.Conv1d(dim, dim, 3, padding=1)

    def _conv_block(self, dim: int, dim_out: int) -> nn.Module:
        return Block1D(dim, dim_out)

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        """x, mu, cond `[B, 80, T]`; mask `[B, 1, T]`; t `[B]`; spks `[B, 80]`."""
        masks = self.level_masks(mask)
        biases = [((1.0 - m) * MASK_BIAS).unsqueeze(1) for m in masks]
        return self.run_unet(x, mask, mu, t, spks, cond, masks, biases)

    def level_masks(self, mask: Tensor) -> list[Tensor]:
        """The frame mask at each resolution (every down level halves it)."""
        masks = [mask]
        for _ in range(len(self.down_blocks) - 1):
            masks.append(masks[-1][:, :, ::2])
        return masks

    def run_unet(
        self,
        x: Tensor,
        mask: Tensor,
        mu: Tensor,
        t: Tensor,
        spks: Tensor,
        cond: Tensor,
        masks: Sequence[Tensor],
        biases: Sequence[Tensor],
    ) -> Tensor:
        """The network body, given one frame mask and one additive attention bias per resolution
        (shared by all blocks at that resolution)."""
        t_emb = self.time_mlp(timestep_embedding(t, self.in_channels))
        t_act = F.mish(t_emb)  # the `mlp.0` Mish of every resnet, computed once
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)

        skips = []
        for level, (resnet, blocks, down) in enumerate(self.down_blocks):
            m = masks[level]
            h = _run_transformers(blocks, resnet(h, m, t_act), biases[level])
            skips.append(h)
            h = down(h * m)

        m, bias = masks[-1], biases[-1]
        for resnet, blocks in self.mid_blocks:
            h = _run_transformers(blocks, resnet(h, m, t_act), bias)

        for i, (resnet, blocks, up) in enumerate(self.up_blocks):
            level = len(masks) - 1 - i
            m, skip = masks[level], skips[level]
            # The transposed conv gives 2 * ceil(T/2) frames: crop to the skip's length.
            h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
            h = _run_transformers(blocks, resnet(h, m, t_act), biases[level])
            h = up(h * m)

        h = self.final_block(h, mask)
        return self.final_proj(h * mask) * mask

"""The chunk-aware flow-matching estimator of CosyVoice2: `CausalConditionalDecoder`.

The v1 U-Net of :mod:`cosyserve.nn.unet` (same module tree, same `decoder.estimator.*` keys, same
time embedding, resnets and transformer blocks) with three changes:

* every k3 convolution of the conv blocks is causal (left zero pad of 2, never looks ahead), and
  so are the convolutions that stand in for down/up-sampling at the last level;
* the conv blocks normalise with LayerNorm over the channels (keys `block.0` conv, `block.2`
  norm; `block.1`/`block.3` are upstream's parameter-free transposes) instead of GroupNorm;
* attention: a streaming call (`streaming=True`) attends block-causally over chunks of
  `static_chunk_size` frames (and never to padded keys); otherwise every query sees every real
  key. Masked scores get the additive bias -1e10, as upstream. A query row with no key left to
  see is opened to every key (upstream does the same; such rows are padding and masked later).

With one channel level (the published model: `channels: [256]`) there is no down/up-sampling.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.nn.config import CausalEstimatorConfig
from cosyserve.nn.conformer import chunk_attention_mask
from cosyserve.nn.unet import MASK_BIAS, ConditionalDecoder, ResnetBlock1D


class CausalConv1d(nn.Conv1d):
    """Conv1d (stride 1) with `kernel_size - 1` zeros padded on the left only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation)
        self.causal_padding = (kernel_size - 1) * dilation

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class CausalBlock1D(nn.Module):
    """`CausalConv1d(k3)(x * mask) -> LayerNorm(channels) -> Mish`, then `* mask`."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # Indices 1 and 3 are upstream's transposes (no parameters): kept so the keys line up.
        self.block = nn.Sequential(
            CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out), nn.Identity(), nn.Mish()
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        conv, norm = self.block[0], self.block[2]
        h = conv(x * mask).transpose(1, 2)
        h = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps).transpose(1, 2)
        return F.mish(h) * mask


class CausalResnetBlock1D(ResnetBlock1D):
    """The v1 resnet (time projection `mlp.1`, 1x1 `res_conv`) around two causal conv blocks."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__(dim, dim_out, time_emb_dim)
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)


def attention_bias(mask: Tensor, chunk: int) -> Tensor:
    """Additive attention bias from a frame mask `[B, 1, T]`: `[B, 1, T, T]` block-causal over
    `chunk` frames when `chunk > 0`, else `[B, 1, 1, T]` (every query sees every real key)."""
    keys = mask.bool()  # [B, 1, T]
    allowed = keys
    chunked = chunk_attention_mask(mask.shape[-1], chunk, mask.device)
    if chunked is not None:
        allowed = keys & chunked  # [B, T, T]
    # A row with nothing to attend to is opened up (upstream's add_optional_chunk_mask).
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return ((1.0 - allowed.to(mask.dtype)) * MASK_BIAS).unsqueeze(1)


class CausalConditionalDecoder(ConditionalDecoder):
    """The CFM estimator of CosyVoice2: `forward(x, mask, mu, t, spks, cond, streaming=False)`.

    Frames where `mask == 0` come out exactly 0. Any batch size and any length T.
    """

    def __init__(self, cfg: CausalEstimatorConfig):
        super().__init__(cfg)
        self.static_chunk_size = cfg.static_chunk_size

    def _resnet(self, dim: int, dim_out: int, time_dim: int) -> nn.Module:
        return CausalResnetBlock1D(dim, dim_out, time_dim)

    def _same_length_conv(self, dim: int) -> nn.Module:
        return CausalConv1d(dim, dim, 3)

    def _conv_block(self, dim: int, dim_out: int) -> nn.Module:
        return CausalBlock1D(dim, dim_out)

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
        """x, mu, cond `[B, 80, T]`; mask `[B, 1, T]`; t `[B]`; spks `[B, 80]`."""
        masks = self.level_masks(mask)
        # Upstream uses the same chunk size (in frames) at every resolution.
        chunk = self.static_chunk_size if streaming else 0
        biases = [attention_bias(m, chunk) for m in masks]
        return self.run_unet(x, mask, mu, t, spks, cond, masks, biases)

    def streaming_estimator(self) -> StreamingEstimator:
        """This estimator with block-causal attention, as a 6-argument estimator function."""
        return StreamingEstimator(self)


class StreamingEstimator(nn.Module):
    """`CausalConditionalDecoder(..., streaming=True)` with the plain 6-argument signature, for the
    places that call an estimator as `(x, mask, mu, t, spks, cond)` (the CFM's runner hook, export)."""

    def __init__(self, decoder: CausalConditionalDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, x: Tensor, mask: Tensor, mu: Tensor, t: Tensor, spks: Tensor, cond: Tensor) -> Tensor:
        return self.decoder(x, mask, mu, t, spks, cond, streaming=True)


__all__ = [
    "CausalBlock1D",
    "CausalConditionalDecoder",
    "CausalConv1d",
    "CausalResnetBlock1D",
    "StreamingEstimator",
    "attention_bias",
]

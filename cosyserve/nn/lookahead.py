"""The pre-lookahead layer of the CosyVoice2/3 flows (upstream `PreLookaheadLayer`).

Each token embedding sees the next `pre_lookahead_len` tokens: ``conv1`` (kernel len + 1, no
padding) over the sequence right-padded with `len` look-ahead frames (zeros, or the real next
tokens while streaming), leaky ReLU (0.01), left zero-pad 2, ``conv2`` (kernel 3), plus the input
(residual). Module names match the checkpoints (``pre_lookahead_layer.conv1/conv2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PreLookaheadLayer(nn.Module):
    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 1):
        super().__init__()
        self.in_channels = in_channels
        self.channels = channels
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """inputs `[B, T, C]` time-major; `context` `[B, n, C]` (n <= pre_lookahead_len): the tokens
        that follow `inputs` (streaming), used instead of zeros. Returns `[B, T, C]`."""
        x = inputs.transpose(1, 2)
        look = self.pre_lookahead_len
        if context is not None and context.shape[1] > 0:
            if context.shape[1] > look:
                raise ValueError(f"context has {context.shape[1]} frames, at most {look} are looked ahead")
            x = torch.cat([x, context.transpose(1, 2)], dim=2)
            look -= context.shape[1]
        x = F.leaky_relu(self.conv1(F.pad(x, (0, look))), 0.01)
        x = self.conv2(F.pad(x, (self.conv2.kernel_size[0] - 1, 0)))
        return x.transpose(1, 2) + inputs

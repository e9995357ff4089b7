"""The pre-lookahead layer of the chunk-aware flows (CosyVoice2, CosyVoice3).

Each token embedding is refined by a convolution over itself and the next `lookahead` tokens, so
a token at the end of a streamed chunk needs `lookahead` tokens of the next chunk as context::

    y = x + conv2(left_pad(leaky_relu(conv1(right_pad(x)), 0.01), kernel2 - 1))

`right_pad` appends the context tokens' embeddings when they are given (a streaming chunk that is
not the last) and zeros otherwise (the final call). Key names `conv1`, `conv2` follow the
official checkpoints (`encoder.pre_lookahead_layer.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PreLookaheadLayer(nn.Module):
    def __init__(self, channels: int, hidden_channels: int | None = None, lookahead: int = 3):
        super().__init__()
        if lookahead < 1:
            raise ValueError(f"lookahead must be at least 1 token, got {lookahead}")
        self.lookahead = lookahead
        hidden = hidden_channels or channels
        self.conv1 = nn.Conv1d(channels, hidden, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(hidden, channels, kernel_size=3)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x `[B, T, C]` (time-major, as the encoder runs); context `[B, n, C]` with n <= lookahead
        tokens that follow x (None or n = 0: zeros). Returns `[B, T, C]`."""
        h = x.transpose(1, 2)
        n_context = 0 if context is None else context.shape[1]
        if n_context > self.lookahead:
            raise ValueError(f"{n_context} context tokens given, the layer looks ahead {self.lookahead}")
        if n_context:
            h = torch.cat([h, context.transpose(1, 2)], dim=2)  # type: ignore[union-attr]
        h = F.pad(h, (0, self.lookahead - n_context))
        h = F.leaky_relu(self.conv1(h), 0.01)
        h = self.conv2(F.pad(h, (self.conv2.kernel_size[0] - 1, 0)))
        return h.transpose(1, 2) + x

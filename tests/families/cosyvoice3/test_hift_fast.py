"""The vocoder's fast path: the upsampling stages as transposed convolutions equal upstream's
nearest upsampling followed by a causal convolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cosyserve.families.cosyvoice3.hift import _upsample, causal_conv, upsampling_as_transposed
from cosyserve.nn.hift import WNConv1d, to_fast_layout


@pytest.mark.parametrize(("kernel", "rate"), [(16, 8), (11, 5), (7, 3), (2, 5), (1, 1), (3, 1)])
def test_upsampling_as_transposed_equals_upsample_then_causal_conv(kernel: int, rate: int) -> None:
    torch.manual_seed(kernel * 10 + rate)
    conv = WNConv1d(6, 4, kernel)
    x = torch.randn(2, 6, 13)
    with torch.no_grad():
        expected = causal_conv(conv, _upsample(x, rate), kernel - 1)
        weight = upsampling_as_transposed(conv.weight, rate)
        got = F.conv_transpose1d(x, weight, conv.bias, stride=rate)[..., : x.shape[-1] * rate]
    assert weight.shape == (6, 4, kernel + rate - 1)
    assert got.shape == expected.shape == (2, 4, 13 * rate)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fast_decode_follows_replaced_upsampling_weights() -> None:
    """The transposed weights are made from the current parameters (e.g. after a reload)."""
    from cosyserve.families.cosyvoice3.config import CausalHiFTConfig
    from cosyserve.families.cosyvoice3.hift import CausalHiFTGenerator

    torch.manual_seed(0)
    hift = CausalHiFTGenerator(CausalHiFTConfig(base_channels=32)).eval()
    hift.prepare_fast_path()
    x = torch.randn(1, 32, 1, 9)
    with torch.no_grad():
        hift.ups[0].weight = torch.nn.Parameter(torch.randn_like(hift.ups[0].weight))
        fast = hift.upsample_stage(0, to_fast_layout(x.squeeze(2)), fast=True).squeeze(2)
        reference = hift.upsample_stage(0, x.squeeze(2), fast=False)
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)

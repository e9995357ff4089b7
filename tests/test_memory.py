"""Memory savings that must not change results: HiFT's in-place channels-last weights, the
allocator tuning switch, and int8 layers that do not pin the FP32 checkpoint."""

from __future__ import annotations

import sys

import pytest
import torch

from cosyserve.engine.accel import tune_cpu_allocator


def test_hift_fast_path_relays_weights_in_place(tiny_model_dir) -> None:
    from cosyserve.models.loader import load_model_directory

    hift = load_model_directory(tiny_model_dir).hift
    convs = [  # the decode stack's convolutions (the f0 predictor runs eagerly)
        m
        for name, m in hift.named_modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and not name.startswith("f0_predictor")
    ]
    before = {id(c): c.weight.detach().clone() for c in convs}
    mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(0))
    noise = hift.draw_noise(40 * hift.upsample_factor, torch.Generator().manual_seed(1))
    hift.fast = False
    slow, _ = hift.inference(mel, phase=noise[0], sine_noise=noise[1])
    hift.fast = True
    fast, _ = hift.inference(mel, phase=noise[0], sine_noise=noise[1])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    relaid = 0
    for conv in convs:
        assert "_fast_weight_cache" not in conv.__dict__  # no second copy kept anywhere
        assert torch.equal(conv.weight, before[id(conv)])  # same values, same shape
        relaid += conv.weight.unsqueeze(2).is_contiguous(memory_format=torch.channels_last)
    assert relaid == len(convs)
    # The eager path still runs on the relaid weights.
    hift.fast = False
    torch.testing.assert_close(hift.inference(mel, phase=noise[0], sine_noise=noise[1])[0], slow)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSYSERVE_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is None
    monkeypatch.delenv("COSYSERVE_MALLOC_TUNING")
    assert "malloc" in (tune_cpu_allocator() or "malloc (not glibc)")


def test_int8_layers_do_not_keep_checkpoint_biases(tiny_model_dir) -> None:
    from cosyserve.engine.acceleration.quant import quantizable_linears, quantize_llm_int8
    from cosyserve.models.loader import load_model_directory

    llm = load_model_directory(tiny_model_dir).llm
    modules = dict(llm.named_modules())
    names = quantizable_linears(llm)
    mapped = {modules[n].bias.untyped_storage().data_ptr() for n in names if modules[n].bias is not None}
    quantize_llm_int8(llm)
    quantized = dict(llm.named_modules())
    kept = set()
    for name in names:
        _, bias = quantized[name]._packed_params._weight_bias()
        if bias is not None:
            kept.add(bias.untyped_storage().data_ptr())
    assert mapped and not (kept & mapped)

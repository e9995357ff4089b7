"""Parity of the HiFT vocoder against upstream recordings: every `hift_*` array of each parity
set, plus the checkpoint key styles. Tolerances from the set's README."""

from __future__ import annotations

import pytest
import torch

from cosyserve.nn.hift import (
    HiFTGenerator,
    convert_hift_state_dict,
    load_hift,
    to_legacy_weight_norm_state_dict,
)
from tests.helpers.parity import ParitySet, assert_close, assert_rel_rms

pytestmark = pytest.mark.parity

ATOL_F0, RTOL_F0 = 1e-2, 1e-4
ATOL_SOURCE = 1e-4  # from the stored f0 / phase / noise
ATOL_DECODE = 1e-4  # decode given the stored source
ATOL_CONV_POST = 1e-3
ATOL_SOURCE = 5e-3  # own f0 and source: f0 rounding is integrated by the phase cumsum
REL_RMS_FREE_RUNNING = 1e-2  # speech from our own f0 and source: only a relative bound (README)

_HIFTS: dict[str, HiFTGenerator] = {}


def hift_checkpoint(ps: ParitySet) -> dict[str, torch.Tensor]:
    return torch.load(ps.path / "hift.pt", weights_only=True)


def load_set_hift(ps: ParitySet) -> HiFTGenerator:
    """The set's HiFT with its (legacy weight-norm) `hift.pt` loaded strictly, built once per set."""
    if ps.name not in _HIFTS:
        _HIFTS[ps.name] = load_hift(hift_checkpoint(ps), ps.config.hift)
    return _HIFTS[ps.name]


def test_f0(parity_set: ParitySet) -> None:
    hift = load_set_hift(parity_set)
    with torch.inference_mode():
        f0 = hift.f0_predictor(parity_set.t("hift_mel"))
    assert_close(parity_set, "hift_f0", f0, parity_set.t("hift_f0"), ATOL_F0, RTOL_F0)


def test_source_from_stored_f0(parity_set: ParitySet) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    with torch.inference_mode():
        source, uv = hift.source_from_f0(ps.t("hift_f0"), ps.t("hift_phase"), ps.t("hift_sine_noise"))
    assert_close(ps, "hift_uv", uv, ps.t("hift_uv"), 0.0)
    assert_close(ps, "hift_source (stored f0)", source, ps.t("hift_source"), ATOL_SOURCE)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_decode_given_source(parity_set: ParitySet, fast: bool) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    mel, source = ps.t("hift_mel"), ps.t("hift_source")
    with torch.inference_mode():
        conv_post = hift.decode_conv_post(mel, source, fast=fast)
        speech = hift.decode(mel, source, fast=fast)
    tag = "fast" if fast else "reference"
    assert_close(ps, f"hift_conv_post ({tag})", conv_post, ps.t("hift_conv_post"), ATOL_CONV_POST)
    assert_close(ps, f"hift_speech decode ({tag})", speech, ps.t("hift_speech"), ATOL_DECODE)


def test_fast_layout_matches_reference_path(parity_set: ParitySet) -> None:
    """The channels-last path against the plain eager one on the same inputs."""
    ps = parity_set
    hift = load_set_hift(ps)
    with torch.inference_mode():
        fast = hift.decode(ps.t("hift_mel"), ps.t("hift_source"), fast=True)
        ref = hift.decode(ps.t("hift_mel"), ps.t("hift_source"), fast=False)
    assert torch.allclose(fast, ref, rtol=0, atol=1e-5), (fast - ref).abs().max()


def test_end_to_end_from_mel(parity_set: ParitySet) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    speech, source = hift.inference(
        ps.t("hift_mel"), phase=ps.t("hift_phase"), sine_noise=ps.t("hift_sine_noise")
    )
    assert_close(ps, "hift_source (end to end)", source, ps.t("hift_source"), ATOL_SOURCE)
    assert_rel_rms(ps, "hift_speech (free running)", speech, ps.t("hift_speech"), REL_RMS_FREE_RUNNING)


def _parametrizations_style(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight_g"):
            out[k[: -len(".weight_g")] + ".parametrizations.weight.original0"] = v
        elif k.endswith(".weight_v"):
            out[k[: -len(".weight_v")] + ".parametrizations.weight.original1"] = v
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("style", ["parametrizations", "generator_prefix", "both"])
def test_weight_norm_key_styles(parity_set: ParitySet, style: str) -> None:
    legacy = hift_checkpoint(parity_set)
    assert any(k.endswith(".weight_g") for k in legacy), "fixture is expected in the legacy format"
    variant = dict(legacy)
    if style in ("parametrizations", "both"):
        variant = _parametrizations_style(variant)
    if style in ("generator_prefix", "both"):
        variant = {"generator." + k: v for k, v in variant.items()}
    ref, conv = convert_hift_state_dict(legacy), convert_hift_state_dict(variant)
    assert ref.keys() == conv.keys()
    for k in ref:
        assert torch.equal(ref[k], conv[k]), k
    a = load_hift(legacy, parity_set.config.hift)
    b = load_hift(variant, parity_set.config.hift)
    with torch.inference_mode():
        mel, source = parity_set.t("hift_mel"), parity_set.t("hift_source")
        assert torch.equal(a.decode(mel, source), b.decode(mel, source))


def test_weight_norm_fold_is_torch_weight_norm(parity_set: ParitySet) -> None:
    """Folding equals what torch's weight-norm parametrization computes, bit for bit."""
    legacy = hift_checkpoint(parity_set)
    folded = convert_hift_state_dict(legacy)
    conv = torch.nn.Conv1d(1, 1, 1)
    for key in [k for k in legacy if k.endswith(".weight_g")][:5] + ["ups.0.weight_g"]:
        prefix = key[: -len(".weight_g")]
        g, v = legacy[prefix + ".weight_g"], legacy[prefix + ".weight_v"]
        conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(1, 1, 1))
        with torch.no_grad():
            conv.parametrizations.weight.original0.data = g.clone()
            conv.parametrizations.weight.original1.data = v.clone()
        assert torch.equal(conv.weight, folded[prefix + ".weight"]), prefix


def test_runtime_module_has_no_weight_norm(parity_set: ParitySet) -> None:
    hift = load_set_hift(parity_set)
    names = [k for k, _ in hift.named_parameters()]
    assert not any("weight_g" in k or "weight_v" in k or "parametrizations" in k for k in names)
    for m in hift.modules():
        assert not hasattr(m, "parametrizations")


def test_legacy_writer_round_trip(parity_set: ParitySet) -> None:
    """to_legacy_weight_norm_state_dict writes the official key set; folding it gives the weights back."""
    ps = parity_set
    hift = load_set_hift(ps)
    legacy = to_legacy_weight_norm_state_dict(hift)
    assert set(legacy) == set(hift_checkpoint(ps))
    for k, v in hift_checkpoint(ps).items():
        assert legacy[k].shape == v.shape, k
    back = load_hift(legacy, ps.config.hift)
    for (k, a), (_, b) in zip(hift.state_dict().items(), back.state_dict().items()):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), k
    with torch.inference_mode():
        mel, source = ps.t("hift_mel"), ps.t("hift_source")
        assert torch.allclose(hift.decode(mel, source), back.decode(mel, source), atol=1e-5)

"""Parity of the 24 kHz HiFT (SineGen2 source) against upstream recordings: every `hift_*` array
of each parity set, stage by stage. Tolerances from the set's README (v1's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyserve.nn.hift import HiFTGenerator, convert_hift_state_dict, load_hift
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL_F0, RTOL_F0 = 1e-2, 1e-4
ATOL_SOURCE = 1e-4  # from the stored f0 / initial phases / noise
ATOL_DECODE = 1e-4  # decode given the stored source
ATOL_END_TO_END_SOURCE = 5e-3  # own f0: the phase integration accumulates f0 rounding
MAX_RELATIVE_RMS = 1e-2  # free-running speech (own f0 and source)

_HIFTS: dict[str, HiFTGenerator] = {}


def hift_checkpoint(ps: ParitySet) -> dict[str, torch.Tensor]:
    return torch.load(ps.path / "hift.pt", weights_only=True)


def load_set_hift(ps: ParitySet) -> HiFTGenerator:
    """The set's HiFT with its (legacy weight-norm) `hift.pt` loaded strictly, built once per set."""
    if ps.name not in _HIFTS:
        _HIFTS[ps.name] = load_hift(hift_checkpoint(ps), ps.config.hift)
    return _HIFTS[ps.name]


def rand_ini(ps: ParitySet, key: str) -> torch.Tensor:
    """Upstream's SineGen2 `rand_ini` `[1, H]` (cycles) in our layout `[1, H, 1]`."""
    return ps.t(key)[:, :, None]


def sine_noise(ps: ParitySet, key: str) -> torch.Tensor:
    """Upstream's sine noise `[1, L, H]` in our layout `[1, H, L]`."""
    return ps.t(key).transpose(1, 2)


def relative_rms(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor) -> float:
    a = np.asarray(actual, np.float64).ravel()
    e = np.asarray(expected, np.float64).ravel()
    assert a.shape == e.shape, f"{a.shape} != {e.shape}"
    return float(np.sqrt(np.mean((a - e) ** 2)) / np.sqrt(np.mean(e**2)))


def test_configured_for_24k(parity_set: ParitySet) -> None:
    """The set's yaml makes the type-2 sine source and the frame hop the mel extractor uses."""
    hift = load_set_hift(parity_set)
    cfg = parity_set.config
    assert hift.sine_type == 2
    assert hift.upsample_factor == cfg.mel.hop_size
    assert (
        parity_set.arrays["hift_speech"].shape[-1]
        == hift.upsample_factor * parity_set.arrays["hift_mel"].shape[-1]
    )
    phase, noise = hift.draw_noise(hift.upsample_factor, torch.Generator().manual_seed(0))
    assert phase.shape == (1, hift.n_harmonics, 1) and noise.shape == (
        1,
        hift.n_harmonics,
        hift.upsample_factor,
    )
    # SineGen2's initial phases are in cycles, the fundamental's is 0.
    assert phase[0, 0, 0] == 0 and bool(((phase >= 0) & (phase < 1)).all())


def test_f0(parity_set: ParitySet) -> None:
    hift = load_set_hift(parity_set)
    with torch.inference_mode():
        f0 = hift.f0_predictor(parity_set.t("hift_mel"))
    assert_close(parity_set, "hift_f0", f0, parity_set.t("hift_f0"), ATOL_F0, RTOL_F0)


def test_source_from_stored_f0(parity_set: ParitySet) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    with torch.inference_mode():
        source, _ = hift.source_from_f0(
            ps.t("hift_f0"), rand_ini(ps, "hift_rand_ini"), sine_noise(ps, "hift_sine_noise")
        )
    assert_close(ps, "hift_source (stored f0)", source, ps.t("hift_source"), ATOL_SOURCE)


def test_initial_phases_do_not_reach_the_source(parity_set: ParitySet) -> None:
    """Upstream quirk, kept: SineGen2 adds the initial phases to the first sample only, and the
    linear down-sampling never reads that sample, so they change nothing (the noise does)."""
    ps = parity_set
    hift = load_set_hift(ps)
    f0, phases, noise = ps.t("hift_f0"), rand_ini(ps, "hift_rand_ini"), sine_noise(ps, "hift_sine_noise")
    shifted = phases.clone()
    shifted[:, 1:] = (shifted[:, 1:] + 0.25) % 1
    with torch.inference_mode():
        source, _ = hift.source_from_f0(f0, phases, noise)
        same, _ = hift.source_from_f0(f0, shifted, noise)
        other, _ = hift.source_from_f0(f0, phases, noise.roll(1, dims=-1))
    assert torch.equal(source, same)
    assert (other - source).abs().max() > 100 * ATOL_SOURCE


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_decode_given_source(parity_set: ParitySet, fast: bool) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    with torch.inference_mode():
        speech = hift.decode(ps.t("hift_mel"), ps.t("hift_source"), fast=fast)
    tag = "fast" if fast else "reference"
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
    """Free running from the mel (own f0 and source, the recorded random draws injected)."""
    ps = parity_set
    hift = load_set_hift(ps)
    speech, source = hift.inference(
        ps.t("hift_mel"), phase=rand_ini(ps, "hift_rand_ini"), sine_noise=sine_noise(ps, "hift_sine_noise")
    )
    assert_close(ps, "hift_source (end to end)", source, ps.t("hift_source"), ATOL_END_TO_END_SOURCE)
    assert relative_rms(speech, ps.t("hift_speech")) <= MAX_RELATIVE_RMS


def test_checkpoint_key_styles_load_the_same(parity_set: ParitySet) -> None:
    """Legacy `weight_g/v` (the fixture) and `parametrizations.weight.original0/1` (the
    state-dict shapes of the published model) fold to the same weights."""
    legacy = hift_checkpoint(parity_set)
    assert any(k.endswith(".weight_g") for k in legacy), "fixture is expected in the legacy format"
    renamed = {
        k.replace(".weight_g", ".parametrizations.weight.original0").replace(
            ".weight_v", ".parametrizations.weight.original1"
        ): v
        for k, v in legacy.items()
    }
    a, b = convert_hift_state_dict(legacy), convert_hift_state_dict(renamed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

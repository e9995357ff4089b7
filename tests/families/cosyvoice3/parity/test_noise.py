"""The fixed noise of CosyVoice3: the flow's seed-0 buffer against each parity set's recorded head,
the vocoder's construction-time buffers of the real (full-size) model against the recorded recipe
figures, the lazy block generation against one-shot draws, and the global RNG left alone."""

from __future__ import annotations

import json

import pytest
import torch

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice3.config import load_model_config
from cosyserve.families.cosyvoice3.noise import (
    FLOW_NOISE_FRAMES,
    HIFT_NOISE_COLUMNS,
    HIFT_NOISE_SAMPLES,
    FixedHiFTNoise,
    NoiseRecipe,
    ReferenceHiFTNoise,
    check_flow_frames,
    reference_flow_noise,
)
from tests.families.cosyvoice3.parity.test_hift import set_noise
from tests.helpers.parity import REPO_ROOT, ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ARCH_DIR = REPO_ROOT.parent / "shared" / "models" / "cosyvoice3-0.5b-arch"


def full_size_recipe() -> tuple[NoiseRecipe, dict]:
    """The real model's recipe (from its yaml) and the figures recorded with the reference."""
    figures = ARCH_DIR / "hift_noise_full_size.json"
    if not figures.is_file():
        pytest.skip(f"{figures} is not available")
    recipe = NoiseRecipe.from_config(load_model_config(ARCH_DIR / "cosyvoice3.yaml"))
    return recipe, json.loads(figures.read_text())


def test_flow_noise_is_seed0_randn(parity_set: ParitySet) -> None:
    ps = parity_set
    head = ps.t("flow_rand_noise_head")
    noise = reference_flow_noise()
    assert tuple(noise.shape) == (1, 80, FLOW_NOISE_FRAMES)
    assert_close(ps, "flow_rand_noise_head", noise[:, :, : head.shape[2]], head, 0.0)


def test_noise_never_touches_the_global_rng() -> None:
    before = torch.get_rng_state()
    reference_flow_noise.__wrapped__()
    noise = ReferenceHiFTNoise(block_samples=1000)
    noise.sine_waves(2500, 3100)
    assert torch.equal(before, torch.get_rng_state())


def test_full_size_vocoder_noise_matches_the_reference() -> None:
    """rand_ini and the first samples of sine_waves of the real model, as recorded by replaying
    the yaml construction with the reference (recipe_matches_yaml_construction)."""
    recipe, figures = full_size_recipe()
    assert recipe.f0_cond_channels == 512 and recipe.vocab_size == 6561
    noise = ReferenceHiFTNoise(recipe)
    expected_ini = torch.tensor(figures["rand_ini"], dtype=torch.float32)[None]
    assert torch.equal(noise.rand_ini, expected_ini)
    head = torch.tensor(figures["sine_waves_first_4_samples"], dtype=torch.float32)
    assert torch.equal(noise.sine_waves(0, head.shape[0]), head)


def test_the_recipe_depends_on_the_config() -> None:
    """Other widths consume the RNG differently: the recipe must be read from the model's yaml."""
    recipe, figures = full_size_recipe()
    smaller = NoiseRecipe(**{**recipe.__dict__, "f0_cond_channels": 64})
    other = ReferenceHiFTNoise(smaller).rand_ini
    assert not torch.equal(other, torch.tensor(figures["rand_ini"], dtype=torch.float32)[None])


def test_blocks_equal_one_shot_draw() -> None:
    """Lazy blocks (small ones here) give the one-shot buffer's values at any range, including
    ranges across block boundaries and ranges before blocks already passed."""
    recipe = NoiseRecipe(vocab_size=50, input_size=8, spk_embed_dim=12, output_size=8, f0_cond_channels=16)
    generator = torch.Generator().manual_seed(0)
    rand_ini = recipe.replay(generator)
    one_shot = torch.rand(1, 7000, HIFT_NOISE_COLUMNS, generator=generator)[0]
    noise = ReferenceHiFTNoise(recipe, block_samples=1000)
    assert torch.equal(noise.rand_ini, rand_ini)
    for start, stop in ((0, 5), (990, 1010), (3500, 6999), (1, 2001), (0, 7000), (6000, 6000), (42, 43)):
        assert torch.equal(noise.sine_waves(start, stop), one_shot[start:stop]), (start, stop)


@pytest.mark.slow
def test_blocks_equal_the_whole_full_size_buffer() -> None:
    """The real size: torch.rand(1, 7200000, 9) drawn at once (259 MB, briefly) equals the blocks
    at its middle and its very end."""
    recipe, _ = full_size_recipe()
    generator = torch.Generator().manual_seed(0)
    recipe.replay(generator)
    whole = torch.rand(1, HIFT_NOISE_SAMPLES, HIFT_NOISE_COLUMNS, generator=generator)[0]
    noise = ReferenceHiFTNoise(recipe)
    middle = HIFT_NOISE_SAMPLES // 2 + 123
    assert torch.equal(noise.sine_waves(middle, middle + 30000), whole[middle : middle + 30000])
    assert torch.equal(noise.sine_waves(HIFT_NOISE_SAMPLES - 5, HIFT_NOISE_SAMPLES), whole[-5:])
    del whole
    assert len(noise._states) == HIFT_NOISE_SAMPLES // noise.block_samples + 1


def test_lengths_beyond_the_buffers_are_refused(parity_set: ParitySet) -> None:
    check_flow_frames(FLOW_NOISE_FRAMES)
    with pytest.raises(InvalidRequestError, match="300 s"):
        check_flow_frames(FLOW_NOISE_FRAMES + 1)
    with pytest.raises(InvalidRequestError, match="too long"):
        ReferenceHiFTNoise().sine_waves(HIFT_NOISE_SAMPLES - 1, HIFT_NOISE_SAMPLES + 1)
    tape = set_noise(parity_set)
    n = parity_set.t("hift_sine_waves_u8").shape[1]
    assert tape.sine_waves(0, n).shape == (n, HIFT_NOISE_COLUMNS)
    with pytest.raises(InvalidRequestError):
        tape.sine_waves(0, n + 1)


def test_fixture_tape_values(parity_set: ParitySet) -> None:
    """The harness's tape: u8 / 256, uniform in [0, 1) like the buffer it replaces."""
    ps = parity_set
    tape = set_noise(ps)
    values = tape.sine_waves(0, 100)
    assert torch.equal(values, ps.t("hift_sine_waves_u8")[0, :100].float() / 256)
    assert isinstance(tape, FixedHiFTNoise) and float(tape.rand_ini[0, 0]) == 0.0

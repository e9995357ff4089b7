"""Parity of the causal HiFT vocoder against upstream recordings: every `hift_*` array of each
parity set (finalize and non-finalize calls), stage by stage, plus checkpoint key styles and the
streaming vocoder against upstream's whole re-synthesis. The sets' noise tapes replace the
construction-time buffers (as the harness did). Tolerances from the set's README: f0 1e-6
relative (float64), source and speech given the stored source 1e-4; free-running speech as
relative RMS <= 1e-2."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cosyserve.errors import ModelDirectoryError
from cosyserve.families.cosyvoice3.hift import (
    CausalHiFTGenerator,
    StreamingVocoder,
    causal_conv,
    convert_causal_hift_state_dict,
    load_causal_hift,
    load_causal_hift_file,
    to_legacy_state_dict,
)
from cosyserve.families.cosyvoice3.noise import FixedHiFTNoise
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL_F0, RTOL_F0 = 1e-9, 1e-6
ATOL_SOURCE = 1e-4
ATOL_DECODE = 1e-4  # speech given the stored source (and from a stored mel: f0 is float64-exact)
ATOL_CONV = 1e-3  # conv_pre / conv_post (log-magnitudes before exp)
MAX_REL_RMS = 1e-2  # free-running speech

_HIFTS: dict[str, CausalHiFTGenerator] = {}


@pytest.fixture
def one_thread():
    """For tests that compare two of our own paths (no fixture summation order to match): many
    small convolutions, which on a busy 2-core machine spend far longer synchronising two
    threads than computing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def hift_checkpoint(ps: ParitySet) -> dict[str, torch.Tensor]:
    return torch.load(ps.path / "hift.pt", weights_only=True)


def load_set_hift(ps: ParitySet) -> CausalHiFTGenerator:
    """The set's vocoder with its (legacy weight-norm) `hift.pt` loaded strictly, built once per set."""
    if ps.name not in _HIFTS:
        _HIFTS[ps.name] = load_causal_hift(hift_checkpoint(ps), ps.config.hift)
    return _HIFTS[ps.name]


def set_noise(ps: ParitySet) -> FixedHiFTNoise:
    """The harness's replacement of the construction-time noise: `hift_rand_ini` and
    `hift_sine_waves_u8 / 256`."""
    return FixedHiFTNoise(ps.t("hift_rand_ini"), ps.t("hift_sine_waves_u8").float() / 256)


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double().reshape(-1), expected.double().reshape(-1)
    assert a.shape == e.shape, f"length {a.shape} != fixture {e.shape}"
    return float((a - e).norm() / e.norm().clamp_min(1e-12))


@pytest.mark.parametrize("finalize", [True, False], ids=["final", "nonfinal"])
def test_f0_in_float64(parity_set: ParitySet, finalize: bool) -> None:
    ps = parity_set
    f0 = load_set_hift(ps).predict_f0(ps.t("hift_mel"), finalize)
    assert f0.dtype == torch.float64
    key = "hift_f0" if finalize else "hift_nf_f0"
    assert_close(ps, key, f0, ps.t(key), ATOL_F0, RTOL_F0)


@pytest.mark.parametrize("finalize", [True, False], ids=["final", "nonfinal"])
def test_source_from_stored_f0(parity_set: ParitySet, finalize: bool) -> None:
    """Frame-rate source (what runs) and the literal sample-rate reference path."""
    ps = parity_set
    hift, noise = load_set_hift(ps), set_noise(ps)
    prefix = "hift_" if finalize else "hift_nf_"
    f0 = ps.t(prefix + "f0").float()
    with torch.inference_mode():
        source = hift.source_from_f0(f0, noise)
        reference = hift.source_reference(f0, noise)
    assert_close(ps, prefix + "source (stored f0)", source, ps.t(prefix + "source"), ATOL_SOURCE)
    assert_close(ps, prefix + "source (reference path)", reference, ps.t(prefix + "source"), ATOL_SOURCE)


def test_rand_ini_has_no_effect(parity_set: ParitySet) -> None:
    """Upstream quirk: rand_ini only touches sample 0, which the downsampling never reads."""
    ps = parity_set
    hift, noise = load_set_hift(ps), set_noise(ps)
    other = FixedHiFTNoise(torch.rand(1, 9), ps.t("hift_sine_waves_u8").float() / 256)
    with torch.inference_mode():
        a = hift.source_reference(ps.t("hift_f0").float(), noise)
        b = hift.source_reference(ps.t("hift_f0").float(), other)
    assert torch.equal(a, b)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_decode_given_source(parity_set: ParitySet, fast: bool) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    mel, source = ps.t("hift_mel"), ps.t("hift_source")
    with torch.inference_mode():
        conv_pre = causal_conv(hift.conv_pre, F.pad(mel, (0, hift.look_right)), 0)
        conv_post = hift.decode_conv_post(mel, source, finalize=True, fast=fast)
        speech = hift.decode(mel, source, finalize=True, fast=fast)
    tag = "fast" if fast else "reference"
    assert_close(ps, f"hift_conv_pre ({tag})", conv_pre, ps.t("hift_conv_pre"), ATOL_CONV)
    assert_close(ps, f"hift_conv_post ({tag})", conv_post, ps.t("hift_conv_post"), ATOL_CONV)
    assert_close(ps, f"hift_speech given source ({tag})", speech, ps.t("hift_speech"), ATOL_DECODE)


@pytest.mark.usefixtures("one_thread")
def test_fast_layout_matches_reference_path(parity_set: ParitySet) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    with torch.inference_mode():
        for finalize in (True, False):
            fast = hift.decode(ps.t("hift_mel"), ps.t("hift_source"), finalize, fast=True)
            ref = hift.decode(ps.t("hift_mel"), ps.t("hift_source"), finalize, fast=False)
            torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("finalize", [True, False], ids=["final", "nonfinal"])
def test_inference_from_mel(parity_set: ParitySet, finalize: bool) -> None:
    """The free-running path (own f0, own source) from the stored mel, stage by stage."""
    ps = parity_set
    hift = load_set_hift(ps)
    prefix = "hift_" if finalize else "hift_nf_"
    speech, source = hift.inference(ps.t("hift_mel"), set_noise(ps), finalize)
    assert_close(ps, prefix + "source (from mel)", source, ps.t(prefix + "source"), ATOL_SOURCE)
    assert speech.shape == ps.t(prefix + "speech").shape
    assert rel_rms(speech, ps.t(prefix + "speech")) <= MAX_REL_RMS
    # f0 is float64-exact here, so the source and hence the speech match as given the source.
    assert_close(ps, prefix + "speech (from mel)", speech, ps.t(prefix + "speech"), ATOL_DECODE)


@pytest.mark.usefixtures("one_thread")
def test_non_final_is_a_prefix_of_final(parity_set: ParitySet) -> None:
    """Causality: a non-final call's samples are the start of the final call's."""
    ps = parity_set
    hift, noise = load_set_hift(ps), set_noise(ps)
    final, _ = hift.inference(ps.t("hift_mel"), noise, finalize=True)
    partial, _ = hift.inference(ps.t("hift_mel"), noise, finalize=False)
    assert partial.shape[1] == (ps.t("hift_mel").shape[2] - hift.held_back_frames) * hift.samples_per_frame
    torch.testing.assert_close(partial, final[:, : partial.shape[1]], rtol=0, atol=1e-5)


def _upstream_stream(hift: CausalHiFTGenerator, noise: FixedHiFTNoise, chunks: list[torch.Tensor]) -> list:
    """Upstream's streaming vocoder: the whole accumulated mel every call, yield the new tail."""
    outs, acc, offset = [], None, 0
    for i, chunk in enumerate(chunks):
        acc = chunk if acc is None else torch.cat([acc, chunk], dim=2)
        speech, _ = hift.inference(acc, noise, finalize=i == len(chunks) - 1)
        outs.append(speech[:, offset:])
        offset += outs[-1].shape[1]
    return outs


def _stream_mel(ps: ParitySet) -> torch.Tensor:
    """A long mel within the noise tape: the stored flow mels side by side."""
    hift = load_set_hift(ps)
    limit = ps.t("hift_sine_waves_u8").shape[1] // hift.samples_per_frame
    mel = torch.cat([ps.t("flow_ns_mel"), ps.t("flow_zs_mel"), ps.t("flow_chunk_mel")], dim=2)
    return mel[:, :, :limit]


def _splits(frames: int, first: int) -> list[list[int]]:
    """Chunkings of `frames` whose first chunk has `first` frames (upstream's non-final call
    needs at least the 8 held-back frames plus one): small and large chunks, a single frame."""
    out = []
    for sizes in ([first, 1, 17, 40], [frames // 2 + 7]):
        head = [max(s, first) if i == 0 else s for i, s in enumerate(sizes)]
        out.append([*head, frames - sum(head)])
    return out


@pytest.mark.usefixtures("one_thread")
def test_streaming_vocoder_equals_whole_resynthesis(parity_set: ParitySet) -> None:
    """Running only the new frames plus the decoder's receptive field gives upstream's samples."""
    ps = parity_set
    hift, noise = load_set_hift(ps), set_noise(ps)
    mel = _stream_mel(ps)
    for sizes in _splits(mel.shape[2], hift.held_back_frames + 1):
        chunks = list(torch.split(mel, sizes, dim=2))
        expected = _upstream_stream(hift, noise, chunks)
        vocoder = StreamingVocoder(hift, noise)
        got = [vocoder.push(c, finalize=i == len(chunks) - 1) for i, c in enumerate(chunks)]
        assert [g.shape[1] for g in got] == [e.shape[1] for e in expected], sizes
        err = max((g - e).abs().max().item() for g, e in zip(got, expected) if e.numel())
        assert err <= ATOL_DECODE, (sizes, err)
    assert sum(g.shape[1] for g in got) == mel.shape[2] * hift.samples_per_frame


@pytest.mark.usefixtures("one_thread")
def test_streaming_vocoder_frame_by_frame(parity_set: ParitySet) -> None:
    """Pushes smaller than the held-back frames release nothing until enough frames are in; the
    samples of a frame-by-frame stream are the whole utterance's (causality); the kept mel stays
    bounded by the context the next call reads."""
    ps = parity_set
    hift, noise = load_set_hift(ps), set_noise(ps)
    mel = _stream_mel(ps)[:, :, : hift.held_back_frames + 16]
    vocoder = StreamingVocoder(hift, noise)
    bound = max(vocoder.context, vocoder.f0_context) + hift.held_back_frames + 1
    outs = []
    for i in range(mel.shape[2]):
        outs.append(vocoder.push(mel[:, :, i : i + 1]))
        assert vocoder._mel is not None and vocoder._mel.shape[2] <= bound
    assert all(o.shape[1] == 0 for o in outs[: hift.held_back_frames])
    assert all(o.shape[1] == hift.samples_per_frame for o in outs[hift.held_back_frames :])
    outs.append(vocoder.push(None, finalize=True))
    whole, _ = hift.inference(mel, noise, finalize=True)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=0, atol=ATOL_DECODE)
    with pytest.raises(RuntimeError):
        vocoder.push(mel[:, :, :1])


@pytest.mark.usefixtures("one_thread")
def test_streaming_vocoder_context_is_needed(parity_set: ParitySet) -> None:
    """The equality above is not vacuous: a third of the computed context breaks it."""
    ps = parity_set
    hift, noise = load_set_hift(ps), set_noise(ps)
    mel = _stream_mel(ps)
    context = hift.decoder_context_frames()
    sizes = [2 * context, mel.shape[2] - 2 * context]
    if sizes[1] <= context:
        pytest.skip("the noise tape is too short for this check")
    chunks = list(torch.split(mel, sizes, dim=2))
    expected = _upstream_stream(hift, noise, chunks)
    vocoder = StreamingVocoder(hift, noise, context_frames=context // 3)
    got = [vocoder.push(c, finalize=i == 1) for i, c in enumerate(chunks)]
    assert (got[1] - expected[1]).abs().max() > 10 * ATOL_DECODE


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


@pytest.mark.parametrize("style", ["parametrizations", "generator_prefix"])
def test_weight_norm_key_styles(parity_set: ParitySet, style: str) -> None:
    legacy = hift_checkpoint(parity_set)
    assert any(k.endswith(".weight_g") for k in legacy), "fixture is expected in the legacy format"
    variant = (
        _parametrizations_style(legacy)
        if style == "parametrizations"
        else {"generator." + k: v for k, v in legacy.items()}
    )
    ref, conv = convert_causal_hift_state_dict(legacy), convert_causal_hift_state_dict(variant)
    assert ref.keys() == conv.keys()
    assert all(torch.equal(ref[k], conv[k]) for k in ref)


def test_f0_weights_are_folded_in_float64(parity_set: ParitySet) -> None:
    """Upstream casts the f0 predictor (weight-norm parametrization included) to float64, so its
    effective weights are g * v / |v| computed in float64, not float32 rounded up."""
    legacy = hift_checkpoint(parity_set)
    folded = convert_causal_hift_state_dict(legacy)
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(1, 1, 1)).double()
    prefix = "f0_predictor.condnet.0"
    with torch.no_grad():
        conv.parametrizations.weight.original0.data = legacy[prefix + ".weight_g"].double()
        conv.parametrizations.weight.original1.data = legacy[prefix + ".weight_v"].double()
    assert folded[prefix + ".weight"].dtype == torch.float64
    assert torch.equal(conv.weight, folded[prefix + ".weight"])
    assert folded["conv_pre.weight"].dtype == torch.float32


@pytest.mark.usefixtures("one_thread")
def test_legacy_writer_round_trip(parity_set: ParitySet) -> None:
    ps = parity_set
    hift = load_set_hift(ps)
    legacy = to_legacy_state_dict(hift)
    original = hift_checkpoint(ps)
    assert set(legacy) == set(original)
    assert all(legacy[k].shape == v.shape and legacy[k].dtype == torch.float32 for k, v in original.items())
    back = load_causal_hift(legacy, ps.config.hift)
    with torch.inference_mode():
        a = hift.decode(ps.t("hift_mel"), ps.t("hift_source"))
        b = back.decode(ps.t("hift_mel"), ps.t("hift_source"))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_load_from_file(parity_set: ParitySet) -> None:
    ps = parity_set
    hift = load_causal_hift_file(ps.path / "hift.pt", ps.config.hift)
    reference = load_set_hift(ps).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in hift.state_dict().items())
    assert hift.f0_predictor.classifier.weight.dtype == torch.float64
    wider = dataclasses.replace(ps.config.hift, base_channels=2 * ps.config.hift.base_channels)
    with pytest.raises(ModelDirectoryError, match=r"hift\.pt.*wrong shape"):
        load_causal_hift_file(ps.path / "hift.pt", wider)

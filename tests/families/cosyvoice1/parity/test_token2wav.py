"""Parity of the model-level token -> waveform stage (`speed_*`, `stream_*` arrays): upstream's
`CosyVoiceModel.tts` over given tokens, non-stream with speed and stream=True.

Depths: the streaming state machine alone (replayed flow and HiFT outputs, so every cross-fade and
cache is checked tightly); tokens through our flow, then our HiFT decoding OUR mels with the STORED
sources through the same cache and cross-fade path (tight: 1e-4); and the free-running path (our own
f0 and source) stage by stage, speech only as a relative RMS error, since the sine source integrates
f0 and a 1-ulp mel difference drifts its phase (the fixture README's tolerance section)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cosyserve.families.cosyvoice1.flow import MaskedDiffWithXvec
from cosyserve.families.cosyvoice1.token2wav import StreamingToken2Wav, apply_speed, speed_frames, token2wav
from tests.families.cosyvoice1.parity.test_hift import (
    ATOL_DECODE,
    ATOL_F0,
    ATOL_SOURCE,
    REL_RMS_FREE_RUNNING,
    RTOL_F0,
    load_set_hift,
)
from tests.helpers.parity import ParitySet, assert_close, assert_rel_rms

pytestmark = pytest.mark.parity

ATOL_MEL = 2e-4  # flow mels
ATOL_EXACT = 1e-6  # our own float arithmetic on stored inputs (fades, interpolation)

_FLOWS: dict[str, MaskedDiffWithXvec] = {}


def load_set_flow(ps: ParitySet) -> MaskedDiffWithXvec:
    if ps.name not in _FLOWS:
        flow = MaskedDiffWithXvec(ps.config.flow)
        flow.load_state_dict(torch.load(ps.path / "flow.pt", weights_only=True), strict=True)
        _FLOWS[ps.name] = flow.eval()
    return _FLOWS[ps.name]


def stream_chunks(ps: ParitySet) -> list[str]:
    """`stream_cK_` prefixes present in the set, in order."""
    ks = sorted(int(m.group(1)) for k in ps.arrays if (m := re.fullmatch(r"stream_c(\d+)_tokens", k)))
    if not ks:
        pytest.skip("no streaming arrays in this set")
    return [f"stream_c{k}_" for k in ks]


def recorded_speed(ps: ParitySet) -> float:
    """The speed of the `speed_*` run, from the manifest's description of `speed_tokens`."""
    desc = ps.manifest.get("arrays", {}).get("speed_tokens", {}).get("desc", "")
    m = re.search(r"speed=([0-9.]+)", desc)
    if not m:
        pytest.skip("the set's manifest does not say which speed the speed_* arrays use")
    speed = float(m.group(1))
    assert speed_frames(ps.arrays["speed_flow_mel"].shape[-1], speed) == ps.arrays["speed_hift_mel"].shape[-1]
    return speed


def hift_noise(ps: ParitySet, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return ps.t(prefix + "hift_phase"), ps.t(prefix + "hift_sine_noise")


class ReplayFlow:
    """Stands in for the flow: checks what it is given and returns the recorded mel / cache."""

    input_frame_rate = 50

    def __init__(self, ps: ParitySet, prefixes: list[str], key_mel: str = "flow_mel"):
        self.ps, self.prefixes, self.key_mel = ps, list(prefixes), key_mel
        self.calls = 0

    def prepare(
        self,
        tokens,
        prompt_tokens=None,
        prompt_feat=None,
        embedding=None,
        flow_cache=None,
        noise=None,
        generator=None,
    ):
        ps, p = self.ps, self.prefixes[self.calls]
        self.calls += 1
        assert torch.equal(tokens.cpu(), ps.t(p + "tokens")), f"{p}tokens"
        if p + "flow_cache_in" in ps.arrays:
            expected = ps.t(p + "flow_cache_in")
            got = torch.zeros(1, 80, 0, 2) if flow_cache is None else flow_cache
            assert torch.equal(got, expected), f"{p}flow_cache_in"
        cache = ps.t(p + "flow_cache_out") if p + "flow_cache_out" in ps.arrays else torch.zeros(1, 80, 0, 2)
        return SimpleNamespace(mel=ps.t(p + self.key_mel), cache=cache)

    def decode(self, items):
        return [item.mel for item in items]


class ReplayHiFT:
    """Stands in for HiFT: checks mel / cache_source and returns the recorded speech / source."""

    def __init__(self, ps: ParitySet, prefixes: list[str]):
        self.ps, self.prefixes, self.calls = ps, list(prefixes), 0

    def inference(self, mel, cache_source=None, generator=None, phase=None, sine_noise=None):
        ps, p = self.ps, self.prefixes[self.calls]
        self.calls += 1
        err = (mel - ps.t(p + "hift_mel")).abs().max().item()
        assert err <= ATOL_EXACT, f"{p}hift_mel: max abs error {err:.3g}"
        assert torch.equal(cache_source, ps.t(p + "hift_cache_source")), f"{p}hift_cache_source"
        return ps.t(p + "hift_speech"), ps.t(p + "hift_source")


def run_stream(streamer: StreamingToken2Wav, tokens: list[int]) -> list[np.ndarray]:
    chunks = streamer.push(tokens)
    chunks.append(streamer.finish())
    return chunks


# ------------------------------------------------------------------------------------- speed
def test_speed_interpolation(parity_set: ParitySet) -> None:
    ps = parity_set
    mel = apply_speed(ps.t("speed_flow_mel"), recorded_speed(ps))
    assert_close(ps, "speed_hift_mel", mel, ps.t("speed_hift_mel"), ATOL_EXACT)


def test_speed_speech_from_flow_mel(parity_set: ParitySet) -> None:
    ps = parity_set
    speech = token2wav(
        ReplayFlow(ps, ["speed_"]),
        load_set_hift(ps),
        ps.t("speed_tokens"),
        embedding=ps.t("spk_embedding"),
        speed=recorded_speed(ps),
        hift_noise=hift_noise(ps, "speed_"),
    )
    assert_rel_rms(
        ps, "speed_speech (stored flow mel)", speech, ps.t("speed_speech")[0], REL_RMS_FREE_RUNNING
    )


def test_speed_end_to_end_from_tokens(parity_set: ParitySet) -> None:
    ps = parity_set
    flow, hift = load_set_flow(ps), load_set_hift(ps)
    with torch.inference_mode():
        mel, _ = flow.inference(
            ps.t("speed_tokens"), embedding=ps.t("spk_embedding"), noise=ps.t("speed_flow_noise")
        )
    assert_close(ps, "speed_flow_mel", mel, ps.t("speed_flow_mel"), ATOL_MEL)
    speech = token2wav(
        flow,
        hift,
        ps.t("speed_tokens"),
        embedding=ps.t("spk_embedding"),
        speed=recorded_speed(ps),
        flow_noise=ps.t("speed_flow_noise"),
        hift_noise=hift_noise(ps, "speed_"),
    )
    assert_rel_rms(ps, "speed_speech (end to end)", speech, ps.t("speed_speech")[0], REL_RMS_FREE_RUNNING)


# ------------------------------------------------------------------------------------ stream
def test_stream_state_machine(parity_set: ParitySet) -> None:
    """Chunking, flow cache hand-over, mel fade, HiFT cache and speech fade, with the flow and
    HiFT outputs replayed: everything after them is our own arithmetic on stored arrays."""
    ps = parity_set
    prefixes = stream_chunks(ps)
    flow, hift = ReplayFlow(ps, prefixes), ReplayHiFT(ps, prefixes)
    streamer = StreamingToken2Wav(flow, hift, embedding=ps.t("spk_embedding"), record=True)  # type: ignore[arg-type]
    chunks = run_stream(streamer, ps.t("stream_tokens")[0].tolist())
    assert flow.calls == hift.calls == len(prefixes)
    assert len(chunks) == len(prefixes)
    assert streamer.trace is not None
    for p, chunk, rec in zip(prefixes, chunks, streamer.trace):
        assert rec.vocoder is not None
        assert_close(
            ps, f"{p}hift_mel (state machine)", rec.vocoder.hift_mel, ps.t(p + "hift_mel"), ATOL_EXACT
        )
        assert_close(ps, f"{p}out (state machine)", chunk, ps.t(p + "out")[0], ATOL_EXACT)
    assert_close(
        ps, "stream_speech (state machine)", np.concatenate(chunks), ps.t("stream_speech")[0], ATOL_EXACT
    )


def test_stream_token_by_token_same_chunks(parity_set: ParitySet) -> None:
    """Tokens arriving one at a time (as from the LLM) give the same flow calls and chunks."""
    ps = parity_set
    prefixes = stream_chunks(ps)
    streamer = StreamingToken2Wav(ReplayFlow(ps, prefixes), ReplayHiFT(ps, prefixes))  # type: ignore[arg-type]
    chunks: list[np.ndarray] = []
    for tok in ps.t("stream_tokens")[0].tolist():
        chunks += streamer.push([tok])
    chunks.append(streamer.finish())
    for p, chunk in zip(prefixes, chunks, strict=True):
        assert np.allclose(chunk, ps.t(p + "out")[0].numpy(), rtol=0, atol=ATOL_EXACT), p


def test_stream_hift_per_chunk(parity_set: ParitySet) -> None:
    """Each chunk's HiFT call from its recorded inputs: f0, source, raw speech; decode given source."""
    ps = parity_set
    hift = load_set_hift(ps)
    for p in stream_chunks(ps):
        mel, cache_source = ps.t(p + "hift_mel"), ps.t(p + "hift_cache_source")
        with torch.inference_mode():
            f0 = hift.f0_predictor(mel)
            decoded = hift.decode(mel, ps.t(p + "hift_source"))
        speech, source = hift.inference(
            mel,
            cache_source=cache_source,
            phase=ps.t(p + "hift_phase"),
            sine_noise=ps.t(p + "hift_sine_noise"),
        )
        assert_close(ps, f"{p}hift_f0", f0, ps.t(p + "hift_f0"), ATOL_F0, RTOL_F0)
        assert_close(
            ps, f"{p}hift_speech (decode given source)", decoded, ps.t(p + "hift_speech"), ATOL_DECODE
        )
        assert_close(ps, f"{p}hift_source", source, ps.t(p + "hift_source"), ATOL_SOURCE)
        assert_rel_rms(ps, f"{p}hift_speech", speech, ps.t(p + "hift_speech"), REL_RMS_FREE_RUNNING)
        n = cache_source.shape[-1]
        assert torch.equal(source[..., :n], cache_source)


def _check_stream_run(ps: ParitySet, streamer: StreamingToken2Wav, prefixes: list[str], tag: str) -> None:
    """The free-running stream, stage by stage: HiFT's input mel, f0-driven source, then the speech
    only as a relative error."""
    chunks = run_stream(streamer, ps.t("stream_tokens")[0].tolist())
    assert streamer.trace is not None and len(streamer.trace) == len(prefixes) == len(chunks)
    for p, rec, chunk in zip(prefixes, streamer.trace, chunks):
        step = rec.vocoder
        assert step is not None
        assert_close(ps, f"{p}hift_mel ({tag})", step.hift_mel, ps.t(p + "hift_mel"), ATOL_MEL)
        assert_close(
            ps,
            f"{p}hift_cache_source ({tag})",
            step.hift_cache_source,
            ps.t(p + "hift_cache_source"),
            ATOL_SOURCE,
        )
        assert_close(ps, f"{p}hift_source ({tag})", step.hift_source, ps.t(p + "hift_source"), ATOL_SOURCE)
        assert_rel_rms(ps, f"{p}out ({tag})", chunk, ps.t(p + "out")[0], REL_RMS_FREE_RUNNING)
    assert_rel_rms(
        ps, f"stream_speech ({tag})", np.concatenate(chunks), ps.t("stream_speech")[0], REL_RMS_FREE_RUNNING
    )


class StoredSourceHiFT:
    """Our HiFT decoding whatever mel it is given (our flow's, through our fades and caches) with
    the chunk's STORED source: every sample after the flow is then exact up to float rounding, so
    a boundary, cache or cross-fade mistake shows far above the 1e-4 tolerance."""

    def __init__(self, ps: ParitySet, prefixes: list[str]):
        self.ps, self.prefixes, self.calls = ps, list(prefixes), 0
        self.hift = load_set_hift(ps)

    def inference(self, mel, cache_source=None, generator=None, phase=None, sine_noise=None):
        ps, p = self.ps, self.prefixes[self.calls]
        self.calls += 1
        source = ps.t(p + "hift_source")
        # The cache handed in is the previous chunk's (stored) source tail: the hand-over is exact.
        assert torch.equal(cache_source, ps.t(p + "hift_cache_source")), f"{p}hift_cache_source"
        with torch.inference_mode():
            return self.hift.decode(mel, source), source


def test_stream_from_tokens_with_stored_sources(parity_set: ParitySet) -> None:
    ps = parity_set
    prefixes = stream_chunks(ps)
    streamer = StreamingToken2Wav(
        load_set_flow(ps),
        StoredSourceHiFT(ps, prefixes),  # type: ignore[arg-type]
        embedding=ps.t("spk_embedding"),
        flow_noises=[ps.t(p + "flow_noise") for p in prefixes],
        record=True,
    )
    chunks = run_stream(streamer, ps.t("stream_tokens")[0].tolist())
    assert streamer.trace is not None and len(chunks) == len(prefixes)
    for p, rec, chunk in zip(prefixes, streamer.trace, chunks):
        assert rec.vocoder is not None
        assert_close(ps, f"{p}hift_mel (our flow)", rec.vocoder.hift_mel, ps.t(p + "hift_mel"), ATOL_MEL)
        assert_close(ps, f"{p}out (our mel, stored source)", chunk, ps.t(p + "out")[0], ATOL_DECODE)
    assert_close(
        ps,
        "stream_speech (our mel, stored source)",
        np.concatenate(chunks),
        ps.t("stream_speech")[0],
        ATOL_DECODE,
    )


def test_stream_from_flow_mels(parity_set: ParitySet) -> None:
    ps = parity_set
    prefixes = stream_chunks(ps)
    streamer = StreamingToken2Wav(
        ReplayFlow(ps, prefixes),
        load_set_hift(ps),
        embedding=ps.t("spk_embedding"),  # type: ignore[arg-type]
        hift_noises=[hift_noise(ps, p) for p in prefixes],
        record=True,
    )
    _check_stream_run(ps, streamer, prefixes, "stored flow mels")


def test_stream_end_to_end_from_tokens(parity_set: ParitySet) -> None:
    ps = parity_set
    prefixes = stream_chunks(ps)
    streamer = StreamingToken2Wav(
        load_set_flow(ps),
        load_set_hift(ps),
        embedding=ps.t("spk_embedding"),
        flow_noises=[ps.t(p + "flow_noise") for p in prefixes],
        hift_noises=[hift_noise(ps, p) for p in prefixes],
        record=True,
    )
    _check_stream_run(ps, streamer, prefixes, "end to end")
    assert streamer.trace is not None
    for p, rec in zip(prefixes, streamer.trace):
        assert torch.equal(rec.tokens, ps.t(p + "tokens"))
        assert_close(ps, f"{p}flow_mel (end to end)", rec.flow_mel, ps.t(p + "flow_mel"), ATOL_MEL)
        assert_close(
            ps, f"{p}flow_cache_out (end to end)", rec.flow_cache_out, ps.t(p + "flow_cache_out"), ATOL_MEL
        )

"""Parity of CosyVoice2's model-level token -> waveform (`tts_*` arrays): upstream's
`CosyVoice2Model.tts` over given tokens, non-stream (`ns`) and stream=True (`st`: SFT, `stzs`:
zero-shot), chunk by chunk.

The HiFT sine noise of these runs is not recorded (only `*_hift_rand_ini`, which SineGen2 never
reads), so free-running speech cannot match sample for sample. The end-to-end path is checked
stage by stage instead: the flow calls (token counts, flags), our mel, our f0, then each streamed
`out` decoded from OUR mel with the STORED source through our HiFT cache and cross-fade path.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from cosyserve.families.cosyvoice2.token2wav import (
    MEL_CACHE_LEN,
    ChunkedSegment,
    FlowCall,
    HopSchedule,
    StreamingToken2Wav,
    token2wav,
)
from cosyserve.nn.streaming import apply_speed, speed_frames
from tests.families.cosyvoice2.parity.test_flow import load_flow
from tests.families.cosyvoice2.parity.test_hift import ATOL_DECODE, ATOL_F0, RTOL_F0, load_set_hift
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ATOL_MEL = 2e-4  # flow mels
ATOL_EXACT = 1e-6  # our own float arithmetic on stored inputs (slicing, cache, fades)
# The incremental resampler places frames at float64 positions, F.interpolate with its float32
# scale: positions drift apart by ~1e-8 frame per frame (x the mel's slope).
ATOL_RESAMPLE = 1e-4

# The recorded runs, as the set's README describes them: (speech tokens, zero-shot prompt?, stream?)
RUNS = {
    "ns": ("tts_tokens_zs", True, False),
    "st": ("tts_tokens_sft", False, True),
    "stzs": ("tts_tokens_zs", True, True),
}
STREAM_RUNS = [run for run, (_, _, stream) in RUNS.items() if stream]


def chunk_prefixes(ps: ParitySet, run: str) -> list[str]:
    """`tts_<run>_cK_` prefixes present in the set, in chunk order."""
    ks = sorted(int(m.group(1)) for k in ps.arrays if (m := re.fullmatch(rf"tts_{run}_c(\d+)_flow_ntok", k)))
    if not ks:
        pytest.skip(f"no tts_{run}_* arrays in this set")
    return [f"tts_{run}_c{k}_" for k in ks]


def run_inputs(ps: ParitySet, run: str) -> tuple[list[int], dict]:
    tokens_key, zero_shot, _ = RUNS[run]
    if zero_shot:
        prompt = {
            "prompt_tokens": ps.t("tts_prompt_tokens"),
            "prompt_feat": ps.t("tts_prompt_feat"),
            "embedding": ps.t("tts_embedding"),
        }
    else:
        prompt = {"embedding": ps.t("spk_embedding")}
    return ps.t(tokens_key)[0].tolist(), prompt


class ReplayFlow:
    """Stands in for the flow: checks each call (tokens, flags) and returns the recorded mel."""

    def __init__(self, ps: ParitySet, run: str, prefixes: list[str]):
        self.ps, self.prefixes, self.calls = ps, list(prefixes), 0
        self.tokens = run_inputs(ps, run)[0]
        self.token_mel_ratio = ps.config.flow.token_mel_ratio
        self.pre_lookahead_len = ps.config.flow.pre_lookahead_len

    def prepare(self, tokens, prompt_tokens, prompt_feat, embedding, streaming=False, finalize=True) -> str:
        ps, p = self.ps, self.prefixes[self.calls]
        self.calls += 1
        n = int(ps.arrays[p + "flow_ntok"][0])
        assert tokens[0].tolist() == self.tokens[:n], f"{p}flow_ntok"
        assert [int(streaming), int(finalize)] == ps.arrays[p + "flow_flags"].tolist(), f"{p}flow_flags"
        return p

    def decode(self, items, n_timesteps=None) -> list[torch.Tensor]:
        return [self.ps.t(p + "flow_mel") for p in items]


class StoredSourceHiFT:
    """Stands in for HiFT: checks the mel and the cached source it is given, and decodes the mel
    with the STORED source through the real HiFT (so everything around it is ours)."""

    def __init__(self, ps: ParitySet, prefixes: list[str], atol_mel: float, tag: str):
        self.ps, self.prefixes, self.calls = ps, list(prefixes), 0
        self.hift = load_set_hift(ps)
        self.upsample_factor = self.hift.upsample_factor
        self.atol_mel, self.tag = atol_mel, tag

    def inference(self, mel, cache_source=None, generator=None, phase=None, sine_noise=None):
        ps, p = self.ps, self.prefixes[self.calls]
        self.calls += 1
        assert_close(ps, f"{p}hift_mel ({self.tag})", mel, ps.t(p + "hift_mel"), self.atol_mel)
        assert torch.equal(cache_source, ps.t(p + "hift_cache_source")), f"{p}hift_cache_source"
        source = ps.t(p + "hift_source")
        assert source.shape[-1] == mel.shape[-1] * self.upsample_factor, f"{p}hift_source not recorded"
        with torch.inference_mode():
            return self.hift.decode(mel, source), source


def run_stream(streamer: StreamingToken2Wav, tokens: list[int], one_by_one: bool = False) -> list[np.ndarray]:
    chunks: list[np.ndarray] = []
    for piece in [[t] for t in tokens] if one_by_one else [tokens]:
        chunks += streamer.push(piece)
    chunks.append(streamer.finish())
    return chunks


def check_outs(ps: ParitySet, prefixes: list[str], chunks: list[np.ndarray], tag: str) -> None:
    assert len(chunks) == len(prefixes)
    for p, chunk in zip(prefixes, chunks):
        assert_close(ps, f"{p}out ({tag})", chunk, ps.t(p + "out")[0], ATOL_DECODE)
    whole = np.concatenate([ps.arrays[p + "out"][0] for p in prefixes])
    assert_close(
        ps, f"tts_{prefixes[0].split('_')[1]} speech ({tag})", np.concatenate(chunks), whole, ATOL_DECODE
    )


# ------------------------------------------------------------------------------------ stream
@pytest.mark.parametrize("one_by_one", [False, True], ids=["all_tokens", "token_by_token"])
@pytest.mark.parametrize("run", STREAM_RUNS)
def test_stream_state_machine(parity_set: ParitySet, run: str, one_by_one: bool) -> None:
    """Hop schedule, prompt pad, lookahead, offset slicing, HiFT cache and speech cross-fade on
    the recorded flow mels: every flow call, HiFT mel, cached source and streamed `out`."""
    ps = parity_set
    prefixes = chunk_prefixes(ps, run)
    tokens, prompt = run_inputs(ps, run)
    flow = ReplayFlow(ps, run, prefixes)
    hift = StoredSourceHiFT(ps, prefixes, ATOL_EXACT, "state machine")
    streamer = StreamingToken2Wav(flow, hift, **prompt)  # type: ignore[arg-type]
    chunks = run_stream(streamer, tokens, one_by_one)
    assert flow.calls == hift.calls == len(prefixes)
    check_outs(ps, prefixes, [c for c in chunks if c.size], "state machine")


@pytest.mark.parametrize("run", STREAM_RUNS)
def test_stream_end_to_end_from_tokens(parity_set: ParitySet, run: str) -> None:
    """Our flow (every call re-run over all tokens so far) and our HiFT cache path; each `out`
    decoded from our mel with the stored source."""
    ps = parity_set
    prefixes = chunk_prefixes(ps, run)
    tokens, prompt = run_inputs(ps, run)
    streamer = StreamingToken2Wav(
        load_flow(ps), StoredSourceHiFT(ps, prefixes, ATOL_MEL, "end to end"), record=True, **prompt
    )  # type: ignore[arg-type]
    chunks = run_stream(streamer, tokens)
    assert streamer.trace is not None and len(streamer.trace) == len(prefixes)
    for p, rec in zip(prefixes, streamer.trace):
        assert len(rec.call.tokens) == int(ps.arrays[p + "flow_ntok"][0])
        assert [int(rec.call.streaming), int(rec.call.finalize)] == ps.arrays[p + "flow_flags"].tolist()
        assert_close(ps, f"{p}flow_mel (end to end)", rec.flow_mel, ps.t(p + "flow_mel"), ATOL_MEL)
    check_outs(ps, prefixes, chunks, "end to end")


@pytest.mark.parametrize("run", STREAM_RUNS)
def test_stream_free_running_hift(parity_set: ParitySet, run: str) -> None:
    """Our HiFT free running (own f0 and source; the recorded initial phases injected): per chunk
    f0 from our mel, the source continued from our previous chunk, the chunk sizes."""
    ps = parity_set
    prefixes = chunk_prefixes(ps, run)
    tokens, prompt = run_inputs(ps, run)
    hift = load_set_hift(ps)
    streamer = StreamingToken2Wav(
        load_flow(ps),
        hift,
        generator=torch.Generator().manual_seed(0),
        hift_noises=[(ps.t(p + "hift_rand_ini")[:, :, None], None) for p in prefixes],
        record=True,
        **prompt,
    )
    chunks = run_stream(streamer, tokens)
    assert streamer.trace is not None
    previous_source = None
    for p, rec, chunk in zip(prefixes, streamer.trace, chunks, strict=True):
        step = rec.vocoder
        assert step is not None
        assert_close(ps, f"{p}hift_mel (free running)", step.hift_mel, ps.t(p + "hift_mel"), ATOL_MEL)
        with torch.inference_mode():
            f0 = hift.f0_predictor(step.hift_mel)
        assert_close(ps, f"{p}hift_f0 (free running)", f0, ps.t(p + "hift_f0"), ATOL_F0, RTOL_F0)
        n = ps.arrays[p + "hift_cache_source"].shape[-1]
        assert step.hift_cache_source.shape[-1] == n
        if previous_source is not None:
            assert torch.equal(step.hift_source[..., :n], previous_source[..., -n:])
        previous_source = step.hift_source
        assert chunk.shape == ps.arrays[p + "out"][0].shape
        assert np.all(np.abs(chunk) <= ps.config.hift.audio_limit)


# ------------------------------------------------------------------------------- non-stream
def test_nonstream_end_to_end(parity_set: ParitySet) -> None:
    """One flow call (full attention, finalize), HiFT over all of it, nothing cached."""
    ps = parity_set
    (p,) = chunk_prefixes(ps, "ns")
    tokens, prompt = run_inputs(ps, "ns")
    assert ps.arrays[p + "flow_flags"].tolist() == [0, 1]
    assert int(ps.arrays[p + "flow_ntok"][0]) == len(tokens)
    assert ps.arrays[p + "hift_cache_source"].shape[-1] == 0
    flow, hift = load_flow(ps), load_set_hift(ps)
    with torch.inference_mode():
        mel = flow.inference(torch.tensor([tokens]), **prompt)
        f0 = hift.f0_predictor(mel)
    assert_close(ps, f"{p}flow_mel", mel, ps.t(p + "flow_mel"), ATOL_MEL)
    assert_close(ps, f"{p}hift_mel", mel, ps.t(p + "hift_mel"), ATOL_MEL)
    assert_close(ps, f"{p}hift_f0", f0, ps.t(p + "hift_f0"), ATOL_F0, RTOL_F0)
    speech = token2wav(
        flow,
        hift,
        torch.tensor([tokens]),
        generator=torch.Generator().manual_seed(0),
        hift_noise=(ps.t(p + "hift_rand_ini")[:, :, None], None),
        **prompt,
    )
    assert speech.shape == ps.arrays[p + "out"][0].shape
    source = ps.t(p + "hift_source")
    if source.shape[-1] == mel.shape[-1] * hift.upsample_factor:  # recorded in this set?
        with torch.inference_mode():
            decoded = hift.decode(mel, source)
        assert_close(ps, f"{p}out (decoded, stored source)", decoded[0], ps.t(p + "out")[0], ATOL_DECODE)


def test_nonstream_speed(parity_set: ParitySet) -> None:
    """Speed change without streaming: upstream's interpolation of the whole flow mel."""
    ps = parity_set
    (p,) = chunk_prefixes(ps, "ns")
    tokens, prompt = run_inputs(ps, "ns")
    captured: list[torch.Tensor] = []
    hift = load_set_hift(ps)

    class Capture:
        upsample_factor = hift.upsample_factor

        def inference(self, mel, cache_source=None, generator=None, phase=None, sine_noise=None):
            captured.append(mel)
            return hift.inference(mel, generator=torch.Generator().manual_seed(0))

    speed = 1.5
    speech = token2wav(ReplayFlow(ps, "ns", [p]), Capture(), torch.tensor([tokens]), speed=speed, **prompt)  # type: ignore[arg-type]
    frames = speed_frames(ps.arrays[p + "flow_mel"].shape[-1], speed)
    assert captured[0].shape[-1] == frames and speech.shape == (frames * hift.upsample_factor,)
    assert torch.equal(captured[0], apply_speed(ps.t(p + "flow_mel"), speed))


# ------------------------------------------------------------------------------ beyond upstream
def test_stream_speed_commits_the_resampled_frames(parity_set: ParitySet) -> None:
    """Speed while streaming: the frames vocoded are the committed mel stream resampled as a
    whole (the chunking does not change them), and every frame is vocoded exactly once."""
    ps = parity_set
    run = STREAM_RUNS[0]
    prefixes = chunk_prefixes(ps, run)
    tokens, prompt = run_inputs(ps, run)
    hift = load_set_hift(ps)
    vocoded: list[torch.Tensor] = []

    class Capture:
        upsample_factor = hift.upsample_factor

        def inference(self, mel, cache_source=None, generator=None, phase=None, sine_noise=None):
            vocoded.append(mel)
            return hift.inference(mel, cache_source=cache_source, generator=torch.Generator().manual_seed(0))

    speed = 0.8
    streamer = StreamingToken2Wav(ReplayFlow(ps, run, prefixes), Capture(), speed=speed, **prompt)  # type: ignore[arg-type]
    chunks = run_stream(streamer, tokens)
    ratio = ps.config.flow.token_mel_ratio
    committed, offset = [], 0
    for p in prefixes:
        committed.append(ps.t(p + "flow_mel")[:, :, offset * ratio :])
        offset = int(ps.arrays[p + "flow_ntok"][0]) - ps.config.flow.pre_lookahead_len
    expected = apply_speed(torch.cat(committed, dim=2), speed)
    # Every HiFT call but the first starts with the cached context frames.
    new = torch.cat([vocoded[0]] + [m[:, :, MEL_CACHE_LEN:] for m in vocoded[1:]], dim=2)
    assert new.shape == expected.shape
    assert torch.allclose(new, expected, rtol=0, atol=ATOL_RESAMPLE), (new - expected).abs().max()
    assert sum(c.size for c in chunks) == expected.shape[-1] * hift.upsample_factor


def test_batched_stream_chunks_match_solo(parity_set: ParitySet) -> None:
    """Two requests' streams with their flow calls in one Euler loop (the batching runner's
    split: prepare, decode together, complete) give each request's solo audio."""
    ps = parity_set
    run = STREAM_RUNS[0]
    tokens, _ = run_inputs(ps, run)
    flow, hift = load_flow(ps), load_set_hift(ps)
    embeddings = [ps.t("spk_embedding"), ps.t("tts_embedding")]

    def segments() -> list[ChunkedSegment]:
        return [
            ChunkedSegment(flow, hift, embedding=e, generator=torch.Generator().manual_seed(i))
            for i, e in enumerate(embeddings)
        ]

    solo_mels: list[list[torch.Tensor]] = []
    solo: list[list[np.ndarray]] = []
    for segment in segments():
        calls = segment.add(tokens) + [segment.remainder()]
        mels = [segment.run_flow(c) for c in calls]
        solo_mels.append(mels)
        solo.append([segment.complete(c, m) for c, m in zip(calls, mels)])

    pair = segments()
    rounds = list(zip(*(s.add(tokens) + [s.remainder()] for s in pair), strict=True))
    assert len(rounds) == len(chunk_prefixes(ps, run))
    batched: list[list[np.ndarray]] = [[], []]
    for k, calls in enumerate(rounds):
        assert len({s.frames(c) for s, c in zip(pair, calls)}) == 1
        mels = flow.decode([s.prepare(c) for s, c in zip(pair, calls)])
        for i, (s, c, mel) in enumerate(zip(pair, calls, mels)):
            # The Euler loop's rows are independent: only float rounding differs.
            assert torch.allclose(mel, solo_mels[i][k], rtol=0, atol=1e-5)
            batched[i].append(s.complete(c, mel))
    # HiFT's phase integration amplifies those last bits (see the README): a relative bound.
    for one, many in zip(solo, batched):
        for a, b in zip(one, many, strict=True):
            assert a.shape == b.shape
            assert np.sqrt(np.mean((a - b) ** 2)) <= 1e-2 * np.sqrt(np.mean(a**2))


class _Counting:
    """A minimal flow for schedule tests (no networks)."""

    token_mel_ratio = 2
    pre_lookahead_len = 3


def _calls(segment: ChunkedSegment, n_tokens: int) -> list[FlowCall]:
    calls = [c for t in range(n_tokens) for c in segment.add(t)]
    final = segment.remainder()
    return calls + ([final] if final is not None else [])


@pytest.mark.parametrize(
    ("n_prompt", "first_hop", "n_tokens", "expected"),
    [
        # upstream's schedule: hop 25 (+ pad to a multiple of 25 with the prompt), then 50, 100
        (0, 25, 300, [(28, 0), (78, 25), (178, 75), (278, 175), (300, 275)]),
        (17, 25, 70, [(36, 0), (70, 33)]),
        # a smaller first hop for lower latency: 10, 20, 40, 80, then the 100 cap
        (0, 10, 200, [(13, 0), (33, 10), (73, 30), (153, 70), (200, 150)]),
        (0, 25, 27, [(27, 0)]),  # too short for a chunk: one final call
    ],
)
def test_hop_schedule(n_prompt: int, first_hop: int, n_tokens: int, expected: list[tuple[int, int]]) -> None:
    hift = type("H", (), {"upsample_factor": 480})()
    segment = ChunkedSegment(
        _Counting(),  # type: ignore[arg-type]
        hift,  # type: ignore[arg-type]
        prompt_tokens=torch.zeros(1, n_prompt, dtype=torch.long),
        embedding=torch.zeros(1, 192),
        first_hop=first_hop,
    )
    calls = _calls(segment, n_tokens)
    assert [(len(c.tokens), c.token_offset) for c in calls] == expected
    assert all(c.streaming and not c.finalize for c in calls[:-1])
    assert not calls[-1].streaming and calls[-1].finalize
    assert calls[-1].tokens == tuple(range(n_tokens))


def test_hop_schedule_refuses_bad_hops() -> None:
    with pytest.raises(ValueError, match="first_hop"):
        HopSchedule(first_hop=0)

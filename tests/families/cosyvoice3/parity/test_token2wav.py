"""Parity of the model-level token -> waveform stage (`tts_*` arrays): upstream's
`CosyVoice3Model.tts` over given tokens, non-stream (with speed) and stream, and llm_job's silent
token filter.

Two depths per run: stored flow mels through our sinks and vocoder (the call schedule, mel cuts,
speed change and the cached streaming vocoder, checked tightly: f0 is float64-exact from a stored
mel, so the speech matches as given the source), and tokens through our flow and vocoder end to
end (mels 2e-4, streaming chunks 1e-3; speech as relative RMS <= 1e-2, lengths exact)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cosyserve.families.cosyvoice3.token2wav import (
    ChunkedToken2Wav,
    SilentTokenFilter,
    StreamingToken2Wav,
    WholeToken2Wav,
    first_hop,
    token2wav,
)
from cosyserve.nn.streaming import StreamingMelResampler
from tests.families.cosyvoice3.parity.test_flow import ATOL_MEL, ATOL_STREAM_MEL, load_set_flow
from tests.families.cosyvoice3.parity.test_hift import (
    ATOL_DECODE,
    MAX_REL_RMS,
    load_set_hift,
    one_thread,  # noqa: F401 - fixture
    rel_rms,
    set_noise,
)
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(600)]

ATOL_EXACT = 1e-6  # our interpolation of a stored mel


@dataclass
class Run:
    """One recorded `tts_<name>_c<k>_*` run."""

    name: str
    chunks: int
    prompt_tokens: torch.Tensor
    prompt_feat: torch.Tensor
    tokens: torch.Tensor
    embedding: torch.Tensor
    speed: float
    streaming: bool

    def key(self, k: int, what: str) -> str:
        return f"tts_{self.name}_c{k}_{what}"


def _speed_of(ps: ParitySet, name: str) -> float:
    key = f"tts_{name}_c0_hift_mel"
    if key not in ps.arrays:
        return 1.0
    found = re.search(r"speed=([0-9.]+)", ps.manifest["arrays"][key]["desc"])
    if found is None:
        pytest.skip(f"{key}: the manifest does not say the speed")
    return float(found.group(1))


def runs(ps: ParitySet) -> list[Run]:
    names: dict[str, int] = {}
    for key in ps.arrays:
        found = re.fullmatch(r"tts_(\w+?)_c(\d+)_flow_ntok", key)
        if found:
            names[found.group(1)] = max(names.get(found.group(1), 0), int(found.group(2)) + 1)
    out = []
    for name, chunks in sorted(names.items()):

        def pick(what: str, name: str = name) -> torch.Tensor:
            key = f"tts_{name}_{what}"
            return ps.t(key if key in ps.arrays else f"tts_{what}")

        streaming = chunks > 1 or bool(ps.arrays[f"tts_{name}_c0_flow_flags"][0])
        out.append(
            Run(
                name,
                chunks,
                pick("prompt_tokens"),
                pick("prompt_feat"),
                pick("tokens"),
                ps.t("tts_embedding"),
                _speed_of(ps, name),
                streaming,
            )
        )
    assert out, "the set has no tts_* runs"
    return out


def _sink(ps: ParitySet, run: Run) -> WholeToken2Wav | ChunkedToken2Wav:
    cls = ChunkedToken2Wav if run.streaming else WholeToken2Wav
    return cls(
        load_set_flow(ps),
        load_set_hift(ps),
        set_noise(ps),
        run.prompt_tokens,
        run.prompt_feat,
        run.embedding,
        run.speed,
        record=True,
    )


def _calls(sink: WholeToken2Wav | ChunkedToken2Wav, tokens: list[int]) -> list[tuple[list[int], bool]]:
    """The flow calls the sink schedules for `tokens`: (tokens given to the flow, finalize)."""
    if isinstance(sink, WholeToken2Wav):
        return [(tokens, True)]
    calls = [(chunk, False) for chunk in (sink.add(t) for t in tokens) if chunk is not None]
    return [*calls, (sink.remainder(), True)]


def test_stream_schedule(parity_set: ParitySet) -> None:
    """Tokens per flow call and the [streaming, finalize] flags: the hop schedule 25 -> 50 -> 100
    with the first hop padded to whole attention chunks, 3 look-ahead tokens."""
    ps = parity_set
    for run in runs(ps):
        sink = _sink(ps, run)
        calls = _calls(sink, run.tokens[0].tolist())
        assert len(calls) == run.chunks, run.name
        for k, (tokens, finalize) in enumerate(calls):
            assert len(tokens) == int(ps.arrays[run.key(k, "flow_ntok")][0]), (run.name, k)
            flags = [int(run.streaming and not finalize), int(finalize)]
            assert flags == ps.arrays[run.key(k, "flow_flags")].tolist(), (run.name, k)


def test_first_hop_fills_attention_chunks(parity_set: ParitySet) -> None:
    hop = parity_set.config.chunk_size
    for prompt in (0, 1, hop - 1, hop, hop + 1, 3 * hop + 7):
        first = first_hop(prompt, hop)
        assert hop <= first < 2 * hop and (prompt + first) % hop == 0


@pytest.mark.usefixtures("one_thread")
def test_sinks_on_stored_mels(parity_set: ParitySet) -> None:
    """The stored flow mels through our sinks: mel cuts, speed, vocoder input frames, the length
    upstream's whole re-synthesis has at each call, and the released samples."""
    ps = parity_set
    for run in runs(ps):
        sink = _sink(ps, run)
        calls = _calls(sink, run.tokens[0].tolist())
        for k, (_, finalize) in enumerate(calls):
            out = sink.complete(ps.t(run.key(k, "flow_mel")), finalize)
            record = sink.trace[-1]
            if isinstance(sink, ChunkedToken2Wav):
                assert record.flow_ntok == int(ps.arrays[run.key(k, "flow_ntok")][0]), (run.name, k)
            assert list(record.hift_in_frames) == ps.arrays[run.key(k, "hift_in_frames")].tolist(), (
                run.name,
                k,
            )
            assert record.hift_speech_len == int(ps.arrays[run.key(k, "hift_speech_len")][0]), (run.name, k)
            if run.key(k, "hift_mel") in ps.arrays:
                assert_close(
                    ps, run.key(k, "hift_mel"), record.hift_mel, ps.t(run.key(k, "hift_mel")), ATOL_EXACT
                )
            assert_close(
                ps, run.key(k, "out") + " (stored mel)", out[None], ps.t(run.key(k, "out")), ATOL_DECODE
            )


@pytest.mark.usefixtures("one_thread")  # bounds far above summation-order effects; see one_thread
def test_tokens_end_to_end(parity_set: ParitySet) -> None:
    """Tokens through our flow and vocoder: flow mels per call; speech lengths exact, values as
    relative RMS (free-running: f0 integrates mel rounding into the phase)."""
    ps = parity_set
    for run in runs(ps):
        sink = _sink(ps, run)
        flow = load_set_flow(ps)
        for k, (tokens, finalize) in enumerate(_calls(sink, run.tokens[0].tolist())):
            mel = flow.decode([sink.prepare(tokens, finalize)])[0]
            atol = ATOL_STREAM_MEL if run.streaming and not finalize else ATOL_MEL
            assert_close(ps, run.key(k, "flow_mel"), mel, ps.t(run.key(k, "flow_mel")), atol)
            out = sink.complete(mel, finalize)
            expected = ps.t(run.key(k, "out"))
            assert out.shape[0] == expected.shape[1], (run.name, k)
            assert rel_rms(torch.from_numpy(out)[None], expected) <= MAX_REL_RMS, (run.name, k)


@pytest.mark.usefixtures("one_thread")
def test_batch1_drivers(parity_set: ParitySet) -> None:
    """token2wav() and StreamingToken2Wav (the first run of each kind)."""
    ps = parity_set
    flow, hift, noise = load_set_flow(ps), load_set_hift(ps), set_noise(ps)
    kinds = {}
    for run in runs(ps):
        kinds.setdefault(run.streaming, run)
    for streaming, run in kinds.items():
        args = (run.prompt_tokens, run.prompt_feat, run.embedding)
        if streaming:
            stream = StreamingToken2Wav(flow, hift, noise, *args, speed=run.speed)
            chunks = stream.push(run.tokens[0].tolist())
            chunks.append(stream.finish())
        else:
            chunks = [token2wav(flow, hift, noise, run.tokens, *args, speed=run.speed)]
        expected = [ps.t(run.key(k, "out")) for k in range(run.chunks)]
        assert [c.shape[0] for c in chunks] == [e.shape[1] for e in expected], run.name
        for got, want in zip(chunks, expected):
            assert rel_rms(torch.from_numpy(got)[None], want) <= MAX_REL_RMS, run.name


@pytest.mark.usefixtures("one_thread")
def test_speed_while_streaming(parity_set: ParitySet) -> None:
    """Beyond upstream: a stream with speed != 1 resamples the committed mel stream (linear
    interpolation at scale `speed`, v1's StreamingMelResampler) into int(T / speed) frames, and
    the chunk boundaries do not change the result."""
    ps = parity_set
    stream_runs = [r for r in runs(ps) if r.streaming and r.chunks > 1]
    if not stream_runs:
        pytest.skip("the set has no multi-chunk stream")
    run, speed = stream_runs[0], 1.3
    hift, noise = load_set_hift(ps), set_noise(ps)

    def stream(speed: float) -> tuple[ChunkedToken2Wav, list[np.ndarray]]:
        sink = ChunkedToken2Wav(
            load_set_flow(ps),
            hift,
            noise,
            run.prompt_tokens,
            run.prompt_feat,
            run.embedding,
            speed,
            record=True,
        )
        calls = _calls(sink, run.tokens[0].tolist())
        outs = [sink.complete(ps.t(run.key(k, "flow_mel")), fin) for k, (_, fin) in enumerate(calls)]
        return sink, outs

    sped, outs = stream(speed)
    plain, _ = stream(1.0)
    committed = torch.cat([r.hift_mel for r in sped.trace], dim=2)
    whole = torch.cat([r.hift_mel for r in plain.trace], dim=2)  # the unsped vocoder input
    torch.testing.assert_close(committed, StreamingMelResampler(speed).finish(whole), rtol=0, atol=ATOL_EXACT)
    audio = np.concatenate(outs)
    assert audio.shape[0] == int(whole.shape[2] / speed) * hift.samples_per_frame
    expected, _ = hift.inference(committed, noise, finalize=True)
    np.testing.assert_allclose(audio, expected[0].numpy(), rtol=0, atol=ATOL_DECODE)


def test_silent_token_filter(parity_set: ParitySet) -> None:
    """llm_job drops a silent token once the run of consecutive silent tokens exceeds 5; the
    filtered tokens then synthesise as recorded (non-stream, the tts_* prompt)."""
    ps = parity_set
    kept = SilentTokenFilter().filter(ps.arrays["tts_silent_teacher"].tolist())
    assert kept == ps.arrays["tts_silent_kept"][0].tolist()
    out = token2wav(
        load_set_flow(ps),
        load_set_hift(ps),
        set_noise(ps),
        torch.tensor([kept]),
        ps.t("tts_prompt_tokens"),
        ps.t("tts_prompt_feat"),
        ps.t("tts_embedding"),
    )
    expected = ps.t("tts_silent_out")
    assert out.shape[0] == expected.shape[1]
    assert rel_rms(torch.from_numpy(out)[None], expected) <= MAX_REL_RMS


def test_silent_filter_rule() -> None:
    f = SilentTokenFilter(silent={7}, max_run=2)
    assert f.filter([7, 7, 7, 7, 1, 7, 7, 7]) == [7, 7, 1, 7, 7]

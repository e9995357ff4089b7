"""Model-level parity of the served path: the `tts_*` runs through the CosyVoice2 backend's own
request machinery (its mode inputs, the SpeechTask, the batch runner, its engine sinks), with the
LLM's tokens teacher-forced to the recorded ones.

As in test_token2wav.py, HiFT's sine noise of these runs is not recorded: each streamed `out` is
decoded from the mel our pipeline gives HiFT with the STORED source (the HiFT cache path is ours),
and the non-stream run is checked up to HiFT's input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.api import PromptAudio, SynthesisRequest
from cosyserve.engine.batching import run_alone
from cosyserve.families.base import FamilyOptions, SampledDecoder, SegmentPlan
from cosyserve.families.cosyvoice2.backend import CosyVoice2Backend
from cosyserve.families.cosyvoice2.token2wav import ChunkedSink, WholeSink
from cosyserve.voices.prompt import PromptFeatures
from tests.families.cosyvoice2.parity.test_token2wav import (
    ATOL_MEL,
    RUNS,
    StoredSourceHiFT,
    check_outs,
    chunk_prefixes,
    run_inputs,
)
from tests.helpers.parity import ParitySet, assert_close
from tests.helpers.tiny_v2 import make_tiny_v2_dir

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

_BACKENDS: dict[str, CosyVoice2Backend] = {}


@pytest.fixture
def backend(parity_set: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> CosyVoice2Backend:
    """A servable directory made from the set (its weights; tokenizer and stand-ins added)."""
    if parity_set.name not in _BACKENDS:
        root = tmp_path_factory.mktemp(f"served_{parity_set.name}")
        model_dir = make_tiny_v2_dir(root / "model", source=parity_set.path)
        options = FamilyOptions(device="cpu", voices_dir=root / "voices")
        _BACKENDS[parity_set.name] = CosyVoice2Backend.from_dir(model_dir, options)
    return _BACKENDS[parity_set.name]


class TeacherSampler:
    """Chooses the recorded tokens in order, then stops (a TokenSampler's interface)."""

    def __init__(self, tokens: list[int]):
        self.tokens = iter(tokens)
        self.finished = False

    def choose(self, logp: torch.Tensor) -> int | None:
        token = next(self.tokens, None)
        self.finished = token is None
        return token


class CapturingHiFT:
    """HiFT as is, recording the mel it is given."""

    def __init__(self, hift):
        self.hift, self.mels = hift, []
        self.upsample_factor = hift.upsample_factor

    def inference(self, mel, **kwargs):
        self.mels.append(mel)
        return self.hift.inference(mel, **kwargs)


@pytest.fixture
def teacher_forced(backend: CosyVoice2Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Make every planned segment decode the given tokens and vocode with the given HiFT."""

    def install(tokens: list[int], hift) -> None:
        plan_segment = backend.plan_segment

        def plan(*args, **kwargs) -> SegmentPlan:
            plan = plan_segment(*args, **kwargs)
            if isinstance(plan.sink, ChunkedSink):
                plan.sink.segment.vocoder.hift = hift
            else:
                assert isinstance(plan.sink, WholeSink)
                plan.sink.segment.hift = hift
            prefix = plan.decoder.take_prefix()  # the mode's real LLM input, unused
            return SegmentPlan(SampledDecoder(prefix, TeacherSampler(tokens)), plan.sink)  # type: ignore[arg-type]

        monkeypatch.setattr(backend, "plan_segment", plan)

    yield install


def request_for(ps: ParitySet, run: str, backend: CosyVoice2Backend, stream: bool) -> SynthesisRequest:
    _, zero_shot, _ = RUNS[run]
    if not zero_shot:  # the SFT run used spk2info's first speaker (the README's spk_embedding)
        voice = next(v for v, e in backend.speakers.items() if torch.equal(e, ps.t("spk_embedding")))
        return SynthesisRequest(text="Hello.", voice=voice, stream=stream, seed=0)
    return SynthesisRequest(
        text="Hello.",
        mode="zero_shot",
        prompt=PromptAudio(np.zeros(24000, np.float32), 24000, "A transcript."),
        stream=stream,
        seed=0,
    )


def recorded_prompt(ps: ParitySet, backend: CosyVoice2Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """The zero-shot runs' prompt features, as the prompt encoder's result."""
    features = PromptFeatures(
        ps.t("tts_embedding"), ps.t("tts_prompt_tokens"), ps.t("tts_prompt_feat"), "A transcript."
    )
    monkeypatch.setattr(backend.prompt_encoder, "encode", lambda prompt: features)


@pytest.mark.parametrize("run", ["st", "stzs"])
def test_streamed_run_through_the_backend(
    parity_set: ParitySet,
    run: str,
    backend: CosyVoice2Backend,
    teacher_forced,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ps = parity_set
    prefixes = chunk_prefixes(ps, run)
    tokens, _ = run_inputs(ps, run)
    recorded_prompt(ps, backend, monkeypatch)
    hift = StoredSourceHiFT(ps, prefixes, ATOL_MEL, "served")
    teacher_forced(tokens, hift)
    task = backend.open(request_for(ps, run, backend, stream=True))
    chunks = [c.audio for c in run_alone(task) if c is not None and c.audio.size]
    assert task.segment_tokens == [tokens] and hift.calls == len(prefixes)
    check_outs(ps, prefixes, chunks, "served")


def test_nonstream_run_through_the_backend(
    parity_set: ParitySet, backend: CosyVoice2Backend, teacher_forced, monkeypatch: pytest.MonkeyPatch
) -> None:
    ps = parity_set
    (p,) = chunk_prefixes(ps, "ns")
    tokens, _ = run_inputs(ps, "ns")
    recorded_prompt(ps, backend, monkeypatch)
    hift = CapturingHiFT(backend.model.hift)
    teacher_forced(tokens, hift)
    task = backend.open(request_for(ps, "ns", backend, stream=False))
    chunks = [c.audio for c in run_alone(task) if c is not None]
    (mel,) = hift.mels
    assert_close(ps, f"{p}hift_mel (served)", mel, ps.t(p + "hift_mel"), ATOL_MEL)
    assert np.concatenate(chunks).shape == ps.arrays[p + "out"][0].shape


def test_the_served_directory_keeps_the_sets_numbers(
    parity_set: ParitySet, backend: CosyVoice2Backend
) -> None:
    """The tokenizer rows and flow rows the test directory adds come after the set's own."""
    state = torch.load(Path(parity_set.path) / "flow.pt", weights_only=True)
    rows = state["input_embedding.weight"].shape[0]
    torch.testing.assert_close(
        backend.model.flow.input_embedding.weight[:rows],
        state["input_embedding.weight"].float(),
        rtol=0,
        atol=0,
    )

"""End-to-end parity of the CosyVoice3 backend (`e2e_*` arrays): the reference's ``CosyVoice3`` API
runs (zero-shot, zero-shot streaming, cross-lingual, instruct2, zero-shot with its text streamed
in, voice conversion) reproduced
through OUR serving path: ``CosyVoice3Backend.open`` -> the request's task (``plan_segment``, the
batch runner, the sinks), with the harness's substitutions injected: the stand-in prompt features
for the ONNX front-end models, the LLM's uniform tape, the set's vocoder noise tape.

Checked per run: the model input ids, every LLM output (exact: the tape must be consumed
exactly), the flow calls ([tokens, streaming, finalize]), the last flow mel (2e-4) and every
yielded chunk (lengths exact; free-running speech as relative RMS <= 1e-2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.api import IteratorTextStream, PromptAudio, SynthesisRequest, TextStreamRequest
from cosyserve.engine.batching import run_alone
from cosyserve.families.base import FamilyOptions
from cosyserve.families.cosyvoice2.frontend import ModelInput
from cosyserve.families.cosyvoice2.llm import SpeechTokenSampler, UniformTape
from cosyserve.families.cosyvoice3.backend import CosyVoice3Backend, Sink
from cosyserve.families.cosyvoice3.loader import load_model_directory
from cosyserve.interfaces import BatchTask
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures
from tests.families.cosyvoice3.conftest import build_v3_model_dir
from tests.families.cosyvoice3.parity.test_flow import ATOL_MEL
from tests.families.cosyvoice3.parity.test_hift import MAX_REL_RMS, one_thread, rel_rms, set_noise  # noqa: F401
from tests.families.cosyvoice3.parity.test_llm import _tape
from tests.helpers.parity import ParitySet, assert_close

pytestmark = [pytest.mark.parity, pytest.mark.timeout(600)]

FILL = 6564


class StandinEncoder(PromptEncoder):
    """The harness's ``_extract_*`` replacements: the set's stand-in features for any recording."""

    def __init__(self, model_dir: Path, ps: ParitySet):
        super().__init__(model_dir, speech_tokenizer_file="speech_tokenizer_v3.onnx")
        self.ps = ps

    def encode(self, prompt: PromptAudio) -> PromptFeatures:
        self.check_prompt(prompt)
        ps = self.ps
        return PromptFeatures(
            embedding=ps.t("audio_prompt_embedding"),
            speech_tokens=ps.t("audio_prompt_speech_tokens"),
            speech_feat=ps.t("audio_prompt_feat"),
            text=prompt.text,
        )

    def source_tokens(self, recording: PromptAudio) -> torch.Tensor:
        self.check_prompt(recording)
        return self.ps.t("audio_source_speech_tokens")


class ReplayBackend(CosyVoice3Backend):
    """Draws from the run's tape; every sink records its calls."""

    tape: UniformTape | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sinks: list[Sink] = []

    def token_sampler(self, generator: torch.Generator) -> SpeechTokenSampler:
        return SpeechTokenSampler(self.llm.cfg.sampling, generator, uniform=self.tape)

    def make_sink(self, request: SynthesisRequest, inputs: ModelInput, drop_silent: bool = True) -> Sink:
        sink = super().make_sink(request, inputs, drop_silent)
        sink.trace = []  # keep a CallRecord per flow + vocoder call
        self.sinks.append(sink)
        return sink


_BACKENDS: dict[str, ReplayBackend] = {}


@pytest.fixture
def backend(parity_set: ParitySet, tmp_path_factory: pytest.TempPathFactory) -> ReplayBackend:
    ps = parity_set
    if ps.name not in _BACKENDS:
        model_dir = build_v3_model_dir(ps.path, tmp_path_factory.mktemp(f"e2e_{ps.name}") / "model")
        model = load_model_directory(model_dir)
        model.noise = set_noise(ps)  # the harness replaced the construction-time vocoder noise
        options = FamilyOptions(device="cpu", voices_dir=model_dir / "voices")
        replay = ReplayBackend(model, options)
        replay.prompt_encoder = StandinEncoder(model_dir, ps)
        _BACKENDS[ps.name] = replay
    replay = _BACKENDS[ps.name]
    replay.sinks.clear()
    return replay


def recording(text: str | None = None) -> PromptAudio:
    """Any recording: the stand-in encoder replaces its features."""
    return PromptAudio(np.zeros(32000, np.float32) + 0.01, 16000, text)


@dataclass
class Run:
    name: str
    request: SynthesisRequest


def runs(ps: ParitySet) -> dict[str, Run]:
    modes = ps.frontend["modes"]
    zs, xl, ins = modes["zero_shot"], modes["cross_lingual"], modes["instruct2"]
    zs_prompt = recording(zs["prompt_text"])
    return {
        "zs": Run("zs", SynthesisRequest(zs["tts_text"], mode="zero_shot", prompt=zs_prompt)),
        "zsst": Run(
            "zsst", SynthesisRequest(zs["tts_text"], mode="zero_shot", prompt=zs_prompt, stream=True)
        ),
        "xl": Run("xl", SynthesisRequest(xl["tts_text"], mode="cross_lingual", prompt=recording())),
        "in": Run(
            "in",
            SynthesisRequest(
                ins["tts_text"], mode="instruct2", prompt=recording(), instruct=ins["instruct_text"]
            ),
        ),
    }


def collect(task: BatchTask) -> list[np.ndarray]:
    return [chunk.audio for chunk in run_alone(task) if chunk is not None and chunk.audio.size]


def check_audio(ps: ParitySet, name: str, sinks: list[Sink], chunks: list[np.ndarray]) -> None:
    """Flow calls, the last flow mel and the yielded chunks against `e2e_<name>_*`."""
    a = ps.arrays
    (sink,) = sinks
    calls = [[r.flow_ntok, int(r.flow_flags[0]), int(r.flow_flags[1])] for r in sink.trace]
    assert calls == a[f"e2e_{name}_flow_calls"].tolist()
    assert_close(
        ps, f"e2e_{name}_flow_mel_last", sink.trace[-1].flow_mel, ps.t(f"e2e_{name}_flow_mel_last"), ATOL_MEL
    )
    expected = [ps.t(k) for k in sorted(k for k in a if k.startswith(f"e2e_{name}_out"))]
    assert [c.shape[0] for c in chunks] == [e.shape[1] for e in expected]
    for got, want in zip(chunks, expected):
        assert rel_rms(torch.from_numpy(got)[None], want) <= MAX_REL_RMS


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["zs", "zsst", "xl", "in"])
def test_api_runs_through_the_backend(parity_set: ParitySet, backend: ReplayBackend, name: str) -> None:
    ps = parity_set
    a = ps.arrays
    run = runs(ps)[name]
    task = backend.open(run.request)
    backend.tape = _tape(a[f"e2e_{name}_llm_u"])
    chunks = collect(task)

    prompt = backend.prompt_encoder.encode(run.request.prompt)  # type: ignore[arg-type]
    inputs = backend.frontend.voice_input(
        run.request.mode, task.info.segments[0], prompt, run.request.instruct
    )
    assert [inputs.text_ids] == a[f"e2e_{name}_text_ids"].tolist()
    if f"e2e_{name}_prompt_text_ids" in a:
        assert [inputs.prompt_text_ids] == a[f"e2e_{name}_prompt_text_ids"].tolist()
    else:
        assert inputs.prompt_text_ids == []
    steps = a[f"e2e_{name}_llm_step_tokens"].tolist()
    assert task.segment_tokens == [[t for t in steps[:-1] if t != FILL]]
    assert len(backend.tape) == 0, "the tape was not consumed exactly"
    check_audio(ps, name, backend.sinks, chunks)


@pytest.mark.usefixtures("one_thread")
def test_voice_conversion(parity_set: ParitySet, backend: ReplayBackend) -> None:
    """inference_vc: the source's tokens through the flow in the prompt's voice, no LLM, the prompt
    mel not trimmed to 2 frames per token (the reference's quirk: 53 frames for 26 tokens)."""
    ps = parity_set
    task = backend.convert_voice(recording(), prompt=recording())
    chunks = collect(task)
    assert task.segment_tokens == [ps.arrays["audio_source_speech_tokens"].reshape(-1).tolist()]
    check_audio(ps, "vc", backend.sinks, chunks)


@pytest.mark.usefixtures("one_thread")
def test_text_streamed_in(parity_set: ParitySet, backend: ReplayBackend) -> None:
    """inference_zero_shot with a text generator (bistream): the text arrives in pieces while the
    model speaks (a TextStreamRequest), each piece's ids handed on one by one as the reference's
    text generator yields them; text and prompt speech mixed 5:15, fills forced."""
    ps = parity_set
    a = ps.arrays
    zs = ps.frontend["modes"]["zero_shot"]
    pieces = ["收到好友从远方寄来的", "生日礼物，", "让我很开心。"]
    assert "".join(pieces) == zs["tts_text"]
    request = TextStreamRequest(
        text="", text_stream=IteratorTextStream(pieces), mode="zero_shot", prompt=recording(zs["prompt_text"])
    )
    task = backend.open(request)
    backend.tape = _tape(a["e2e_bi_llm_u"])
    chunks = collect(task)
    steps = a["e2e_bi_llm_step_tokens"].tolist()
    assert task.segment_tokens == [[t for t in steps[:-1] if t != FILL]]
    assert len(backend.tape) == 0, "the tape was not consumed exactly"
    prompt = backend.prompt_encoder.encode(request.prompt)  # type: ignore[arg-type]
    inputs = backend.frontend.voice_input("zero_shot", None, prompt)
    assert [inputs.prompt_text_ids] == a["e2e_bi_prompt_text_ids"].tolist()
    check_audio(ps, "bi", backend.sinks, chunks)

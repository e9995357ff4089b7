"""The CosyVoice2 backend on a tiny directory: loading (and refusing broken directories), every
mode, streaming, batching against solo runs, saved voices across families, warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.acceleration.launcher import open_family, warm_up
from cosyserve.api import PromptAudio, SynthesisRequest
from cosyserve.engine.batching import BatchConfig, BatchRunner
from cosyserve.errors import ModelConfigError, ModelDirectoryError, UnknownVoiceError, UnsupportedModeError
from cosyserve.families.base import FamilyOptions, request_generators
from cosyserve.families.cosyvoice2.backend import CosyVoice2Backend
from cosyserve.families.cosyvoice2.token2wav import StreamingToken2Wav
from cosyserve.voices.prompt import PromptFeatures, warmup_prompt
from cosyserve.voices.store import VoiceFamilyError, VoiceStore
from tests.test_batching import assert_same, audio_of, drive, solo

pytestmark = pytest.mark.timeout(600)

SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 2 mel frames x 480 samples at 24 kHz


def prompt(text: str | None = "A prompt transcript.") -> PromptAudio:
    recording = warmup_prompt(2.5)
    return PromptAudio(recording.audio, recording.sample_rate, text)


def check_audio(audio: np.ndarray, tokens: int) -> None:
    """Finite, not silent, one 24 kHz frame pair per speech token."""
    assert tokens > 0
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert float(np.sqrt(np.mean(audio**2))) > 1e-3
    assert audio.size == SAMPLES_PER_TOKEN * tokens


# ---------------------------------------------------------------------------------------- loading


def test_the_directory_opens_through_its_family(tiny_v2_model_dir: Path, tmp_path: Path) -> None:
    family = open_family(tiny_v2_model_dir)
    backend = family.open_backend(tiny_v2_model_dir, FamilyOptions(device="cpu", voices_dir=tmp_path))
    assert isinstance(backend, CosyVoice2Backend)
    assert backend.sample_rate == SAMPLE_RATE
    assert backend.modes == {"sft", "zero_shot", "cross_lingual", "instruct2"}
    shipped = torch.load(tiny_v2_model_dir / "spk2info.pt", map_location="cpu", weights_only=True)
    assert sorted(backend.speakers) == sorted(shipped) and backend.accepts_text_stream
    info = backend.describe()
    assert (info["family"], info["sample_rate"], info["modes"]) == (
        "cosyvoice2",
        SAMPLE_RATE,
        ["cross_lingual", "instruct2", "sft", "zero_shot"],
    )
    assert not (tiny_v2_model_dir / "CosyVoice-BlankEN" / "model.safetensors").exists()
    # What acceleration plans may touch: no TorchScript exports, no (v1) CUDA-graph decode step.
    targets = backend.accel_targets()
    assert targets.cfm is backend.model.flow.decoder and targets.llm is backend.llm
    assert not targets.torchscript and not targets.graphed_decode
    assert tuple(targets.probe_flow().shape) == (1, 80, 120)  # 60 tokens x 2 frames


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("llm.pt", r"missing llm\.pt"),
        ("CosyVoice-BlankEN/merges.txt", r"missing CosyVoice-BlankEN/vocab\.json \+ merges\.txt"),
        ("CosyVoice-BlankEN/config.json", r"missing CosyVoice-BlankEN/config\.json"),
    ],
)
def test_missing_files_are_named(tiny_v2_model_copy: Path, remove: str, message: str) -> None:
    (tiny_v2_model_copy / remove).unlink()
    with pytest.raises(ModelDirectoryError, match=message):
        CosyVoice2Backend.from_dir(tiny_v2_model_copy)


def test_broken_checkpoint_and_mismatched_vocabularies(tiny_v2_model_copy: Path) -> None:
    flow = tiny_v2_model_copy / "flow.pt"
    flow.write_bytes(flow.read_bytes()[:1000])
    with pytest.raises(ModelDirectoryError, match=r"flow\.pt: not a readable PyTorch checkpoint"):
        CosyVoice2Backend.from_dir(tiny_v2_model_copy)
    config_path = tiny_v2_model_copy / "CosyVoice-BlankEN" / "config.json"
    config = json.loads(config_path.read_text())
    rows = torch.load(tiny_v2_model_copy / "llm.pt", weights_only=True)[
        "llm.model.model.embed_tokens.weight"
    ].shape[0]
    config["vocab_size"] = rows + 1000  # a backbone config bigger than the checkpoint's table
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        ModelConfigError, match=rf"has shape \[{rows}, \d+\], expected \[{rows + 1000}, .*config\.json"
    ):
        CosyVoice2Backend.from_dir(tiny_v2_model_copy)


def test_wrong_weights_are_refused_strictly(tiny_v2_model_copy: Path) -> None:
    state = torch.load(tiny_v2_model_copy / "llm.pt", weights_only=True)
    state["llm_decoder.extra"] = torch.zeros(1)
    torch.save(state, tiny_v2_model_copy / "llm.pt")
    with pytest.raises(ModelDirectoryError, match=r"llm\.pt: does not match .*llm_decoder\.extra"):
        CosyVoice2Backend.from_dir(tiny_v2_model_copy)


def test_a_v1_directory_is_not_opened_as_cosyvoice2(tiny_model_dir: Path) -> None:
    from cosyserve.families.cosyvoice2.loader import find_model_files

    with pytest.raises(ModelConfigError, match="CosyVoice model directory .* not a CosyVoice2 one"):
        find_model_files(tiny_model_dir)


def test_without_speakers_and_cloning_models_there_is_no_voice(tiny_v2_model_copy: Path) -> None:
    for name in ("spk2info.pt", "campplus.onnx"):
        (tiny_v2_model_copy / name).unlink()
    with pytest.raises(ModelDirectoryError, match="no voice to speak with"):
        CosyVoice2Backend.from_dir(tiny_v2_model_copy)


# ------------------------------------------------------------------------------------------ modes

MODES = {
    "sft": SynthesisRequest(text="Hello there, how are you?", voice="中文女", seed=1),
    "zero_shot": SynthesisRequest(text="你好，世界。", mode="zero_shot", prompt=prompt(), seed=2),
    "cross_lingual": SynthesisRequest(
        text="Good morning.", mode="cross_lingual", prompt=prompt(None), seed=3
    ),
    "instruct2 (recording)": SynthesisRequest(
        text="Good morning.", mode="instruct2", instruct="Speak happily.", prompt=prompt(None), seed=4
    ),
    "instruct2 (built-in speaker)": SynthesisRequest(
        text="Good morning.", mode="instruct2", instruct="用四川话说这句话", voice="英文男", seed=5
    ),
}


@pytest.mark.parametrize("case", list(MODES))
def test_every_mode_speaks(backend: CosyVoice2Backend, case: str) -> None:
    task, chunks = solo(backend, MODES[case])
    check_audio(audio_of(chunks), task.info.speech_tokens)
    assert all(c.sample_rate == SAMPLE_RATE for c in chunks) and chunks[-1].final


def test_the_modes_hand_the_llm_what_the_reference_does(backend: CosyVoice2Backend) -> None:
    """Prefix layouts per mode: zero-shot adds the transcript and the prompt's speech tokens,
    cross-lingual nothing, instruct2 the instruction with <|endofprompt|> and no speech."""
    frontend = backend.frontend
    features = backend.prompt_encoder.encode(prompt())
    generators = request_generators(0)
    lengths = {}
    for mode in ("zero_shot", "cross_lingual", "instruct2"):
        request = SynthesisRequest(text="Hello.", mode=mode, prompt=prompt(), instruct="Speak slowly.")
        plan = backend.plan_segment(request, "Hello.", features, generators, None)
        lengths[mode] = plan.decoder.take_prefix().shape[1]
    text = len(frontend.tokenize("Hello."))
    tokens = min(features.speech_feat.shape[1] // 2, features.speech_tokens.shape[1])
    transcript = len(frontend.tokenize(frontend.prompt_text("A prompt transcript.")))
    instruct = len(frontend.tokenize("Speak slowly.<|endofprompt|>"))
    assert lengths == {
        "zero_shot": 2 + transcript + text + tokens,
        "cross_lingual": 2 + text,
        "instruct2": 2 + instruct + text,
    }


def test_refused_modes_and_voices(backend: CosyVoice2Backend) -> None:
    with pytest.raises(UnsupportedModeError, match="does not support instruct"):
        backend.open(SynthesisRequest(text="Hi.", voice="中文女", mode="instruct", instruct="Slowly."))
    with pytest.raises(UnknownVoiceError):
        backend.open(SynthesisRequest(text="Hi.", voice="nobody"))


def test_streaming_chunks_are_the_batch_1_stream(backend: CosyVoice2Backend) -> None:
    """A streamed request's chunks, concatenated, are the batch-1 streamer's output for its tokens
    (same audio noise), and as long as the non-stream audio of the same tokens."""
    request = SynthesisRequest(text="Hello there, how are you today?", voice="中文女", seed=7, stream=True)
    task, chunks = solo(backend, request)
    assert len(chunks) >= 3  # 25 -> 50 -> 100 token hops
    (tokens,) = task.segment_tokens
    model = backend.model
    streamer = StreamingToken2Wav(
        model.flow, model.hift, embedding=backend.speakers["中文女"], generator=request_generators(7)[1]
    )
    expected = np.concatenate([*streamer.push(tokens), streamer.finish()])
    np.testing.assert_array_equal(audio_of(chunks), expected)
    check_audio(audio_of(chunks), len(tokens))


# --------------------------------------------------------------------------------------- batching

MIXED = [
    (SynthesisRequest(text="Hello there.", voice="中文女", seed=1), None),
    (SynthesisRequest(text="你好，世界。", mode="zero_shot", prompt=prompt(), seed=6, stream=True), 80),
    (SynthesisRequest(text="A longer sentence with more words.", voice="英文男", seed=2, stream=True), 90),
    (SynthesisRequest(text="Short.", voice="英文女", seed=3, speed=1.3), 30),
    (SynthesisRequest(text="Good.", mode="instruct2", instruct="Speak happily.", voice="中文男", seed=5), 40),
]


def test_batched_equals_unbatched(backend: CosyVoice2Backend) -> None:
    refs = [solo(backend, request, n) for request, n in MIXED]
    tasks = [backend.open(request, num_tokens=n) for request, n in MIXED]
    sizes: list[int] = []
    runner = BatchRunner(
        backend,
        BatchConfig(max_batch=3, token_budget=400, flow_batch=4),
        on_step=lambda s: sizes.append(s.llm_batch),
    )
    out = drive(runner, {0: tasks[:2], 5: [tasks[2]], 12: tasks[3:]})
    assert max(sizes) == 3
    for task, (ref_task, ref_chunks) in zip(tasks, refs):
        assert_same(task, out[id(task)], ref_task, ref_chunks)


def test_equal_calls_share_an_euler_loop(backend: CosyVoice2Backend) -> None:
    """Two streams of one length: their chunks (equal frames and attention kind) run together."""
    requests = [
        SynthesisRequest(text="Hello there.", voice=voice, seed=seed, stream=True)
        for voice, seed in (("中文女", 1), ("英文男", 2))
    ]
    refs = [solo(backend, r, 60) for r in requests]
    tasks = [backend.open(r, num_tokens=60) for r in requests]
    stats = []
    runner = BatchRunner(backend, BatchConfig(token_budget=1000, flow_batch=4), on_step=stats.append)
    out = drive(runner, {0: tasks})
    assert max(s.audio_items for s in stats) == 2 and sum(s.flow_calls for s in stats) == 2
    for task, (ref_task, ref_chunks) in zip(tasks, refs):
        assert task.segment_tokens == ref_task.segment_tokens
        chunks = out[id(task)]
        assert [c.audio.size for c in chunks] == [c.audio.size for c in ref_chunks]
        # A batch-2 Euler loop differs from batch 1 in the last float bits, which HiFT's phase
        # integration amplifies (parity README): a relative bound.
        got, want = audio_of(chunks), audio_of(ref_chunks)
        assert np.sqrt(np.mean((got - want) ** 2)) <= 1e-2 * np.sqrt(np.mean(want**2))


# ----------------------------------------------------------------------------------- saved voices


def test_saved_voices_and_other_families(backend: CosyVoice2Backend) -> None:
    info = backend.add_voice("v2_voice", prompt())
    assert info.kind == "saved" and "v2_voice" in [v.id for v in backend.voices()]
    task, chunks = solo(backend, SynthesisRequest(text="Hello.", voice="v2_voice", seed=1))
    check_audio(audio_of(chunks), task.info.speech_tokens)
    task, chunks = solo(
        backend,
        SynthesisRequest(text="Hello.", voice="v2_voice", mode="instruct2", instruct="Whisper.", seed=1),
    )
    check_audio(audio_of(chunks), task.info.speech_tokens)

    # A voice saved by a CosyVoice v1 model (and an old untagged one) in the same directory.
    v1_store = VoiceStore(backend.voice_store.root)
    features = PromptFeatures(
        torch.zeros(1, 192), torch.zeros(1, 50, dtype=torch.long), torch.zeros(1, 86, 80)
    )
    v1_store.save("v1_voice", features)
    assert "v1_voice" not in [v.id for v in backend.voices()]
    for call in (
        lambda: backend.open(SynthesisRequest(text="Hi.", voice="v1_voice")),
        lambda: backend.resolve_voice("v1_voice"),
    ):
        with pytest.raises(VoiceFamilyError, match="made with a cosyvoice1 model") as err:
            call()
        assert err.value.status_code == 409
    # ... and the reverse: this model's voice is refused by a v1 store.
    with pytest.raises(VoiceFamilyError, match="made with a cosyvoice2 model"):
        v1_store.get("v2_voice")
    backend.delete_voice("v2_voice")
    v1_store.delete("v1_voice")


def test_warm_up_without_a_built_in_speaker(tiny_v2_model_copy: Path, tmp_path: Path) -> None:
    """No spk2info.pt: the warm-up clones a generated prompt recording (then a saved voice)."""
    (tiny_v2_model_copy / "spk2info.pt").unlink()
    backend = CosyVoice2Backend.from_dir(tiny_v2_model_copy, FamilyOptions(device="cpu", voices_dir=tmp_path))
    assert backend.speakers == {} and "sft" in backend.modes
    request = backend.warmup_request()
    assert request.mode == "zero_shot" and request.prompt is not None and request.prompt.text
    assert warm_up(backend) > 0
    backend.add_voice("mine", prompt())
    assert backend.warmup_request().voice == "mine"


def test_hub_name_maps_to_the_official_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fnmatch

    from cosyserve import hub

    calls = []

    def fake_download(repo_id, cache_dir=None, local_files_only=False, allow_patterns=None, revision=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_download)
    assert hub.resolve_model_dir("CosyVoice2-0.5B") == tmp_path
    ((repo, patterns),) = calls
    assert repo == "FunAudioLLM/CosyVoice2-0.5B"
    fetched = [
        name
        for name in (
            "cosyvoice2.yaml",
            "llm.pt",
            "spk2info.pt",
            "speech_tokenizer_v2.onnx",
            "flow.decoder.estimator.fp32.onnx",
            "CosyVoice-BlankEN/config.json",
            "CosyVoice-BlankEN/vocab.json",
            "CosyVoice-BlankEN/merges.txt",
            "CosyVoice-BlankEN/tokenizer_config.json",
            "CosyVoice-BlankEN/model.safetensors",
        )
        if any(fnmatch.fnmatch(name, p) for p in patterns)
    ]
    assert fetched[-1] != "CosyVoice-BlankEN/model.safetensors" and len(fetched) == 9


@pytest.mark.parametrize("plan", ["cpu_onnx", "cpu_int8"])
def test_cpu_plans_serve_streams(tiny_v2_model_copy: Path, tmp_path: Path, plan: str) -> None:
    """The CPU plans apply to this family; ONNX Runtime serves the full-attention estimator calls
    and the torch estimator (kept) the block-causal streamed chunks."""
    from types import SimpleNamespace

    from cosyserve.acceleration.launcher import PLANS, build_backend

    backend = build_backend(
        open_family(tiny_v2_model_copy),
        str(tiny_v2_model_copy),
        PLANS[plan],
        SimpleNamespace(voices_dir=tmp_path, stream_first_hop=None),
    )
    cfm = backend.model.flow.decoder
    assert (cfm.estimator_runner is not None) == (plan == "cpu_onnx")
    assert next(cfm.estimator.parameters()).device.type == "cpu"  # not released to "meta"
    task, chunks = solo(
        backend, SynthesisRequest(text="Hello there.", voice="中文女", seed=1, stream=True), 60
    )
    assert len(chunks) >= 2
    check_audio(audio_of(chunks), 60)


def test_the_library_opens_a_cosyvoice2_directory(tiny_v2_model_dir: Path, tmp_path: Path) -> None:
    from cosyserve.synthesizer import Synthesizer

    tts = Synthesizer(str(tiny_v2_model_dir), device="cpu", voices_dir=tmp_path, num_threads=1)
    assert tts.sample_rate == SAMPLE_RATE and tts.backend.family == "cosyvoice2"
    recording = prompt(None)
    for kwargs in ({"voice": "中文女"}, {"prompt": (recording.audio, recording.sample_rate)}):
        audio, info = tts.synthesize_to_array("Good morning.", instruct="Speak happily.", seed=1, **kwargs)
        assert info.speech_tokens > 0  # instruct= means instruct2 on this family
        check_audio(audio, info.speech_tokens)

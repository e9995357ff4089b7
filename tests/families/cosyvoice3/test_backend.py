"""The CosyVoice3 backend on a tiny v3 model directory: loading (official layout, clear errors), every
mode giving real 24 kHz audio of the length its tokens make, saved voices, streaming, batching
(batched equals solo), voice conversion, the library API and the launcher."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.api import PromptAudio, SynthesisRequest
from cosyserve.engine.batching import BatchConfig, BatchRunner, StepStats, run_alone
from cosyserve.errors import InvalidRequestError, ModelConfigError, ModelDirectoryError, UnsupportedModeError
from cosyserve.families.cosyvoice3.backend import CosyVoice3Backend
from cosyserve.families.cosyvoice3.llm import SilentTokenFilter
from cosyserve.families.cosyvoice3.loader import find_model_files, load_model_directory
from cosyserve.families.cosyvoice3.token2wav import StreamingToken2Wav
from cosyserve.voices.prompt import warmup_prompt
from tests.test_batching import assert_same, audio_of, drive, solo

pytestmark = pytest.mark.timeout(300)

SAMPLES_PER_TOKEN = 2 * 480  # 2 mel frames per token, 480 samples per frame at 24 kHz
TEXT = "收到好友从远方寄来的生日礼物，让我很开心。"


def prompt(text: str | None = "希望你以后能够做的比我还好呦。") -> PromptAudio:
    recording = warmup_prompt()
    recording.text = text
    return recording


def check_audio(audio: np.ndarray, tokens: list[int]) -> None:
    """Finite, not silent, 960 samples per speech token the flow got (after the silent filter)."""
    assert audio.dtype == np.float32 and np.isfinite(audio).all()
    assert float(np.sqrt(np.mean(audio**2))) > 1e-3 and np.abs(audio).max() <= 0.99 + 1e-6
    assert audio.size == SAMPLES_PER_TOKEN * len(SilentTokenFilter().filter(tokens))


def test_opens_the_official_layout(tiny_v3_backend: CosyVoice3Backend, tiny_v3_model_dir: Path) -> None:
    backend = tiny_v3_backend
    assert backend.family == "cosyvoice3" and backend.sample_rate == 24000
    assert backend.modes == {"zero_shot", "cross_lingual", "instruct2"}
    assert backend.voices() == [] and backend.speakers == {}
    info = backend.describe()
    assert info["family"] == "cosyvoice3" and info["zero_shot"] is True and info["voice_conversion"] is True
    assert info["parameters"]["llm"] > 0 and info["estimator_onnx"] is True  # make-model ships it
    files = find_model_files(tiny_v3_model_dir)
    assert files.speech_tokenizer.name == "speech_tokenizer_v3.onnx"
    assert (
        backend.config.llm is not None
        and backend.config.llm.backbone.hidden_size == backend.llm.cfg.llm_input_size
    )


def test_loader_errors_name_the_files(tiny_v3_model_dir: Path, tmp_path: Path, tiny_model_dir: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_v3_model_dir, copy, ignore=shutil.ignore_patterns("voices"))
    (copy / "campplus.onnx").unlink()
    (copy / "CosyVoice-BlankEN" / "merges.txt").unlink()
    with pytest.raises(
        ModelDirectoryError, match=r"missing campplus\.onnx, CosyVoice-BlankEN/vocab\.json \+ merges\.txt"
    ) as info:
        find_model_files(copy)
    assert str(copy.resolve()) in str(info.value)
    with pytest.raises(ModelConfigError, match="CosyVoice model directory .*not a CosyVoice3 one"):
        find_model_files(tiny_model_dir)
    with pytest.raises(ModelDirectoryError, match="not found"):
        find_model_files(tmp_path / "nowhere")


def test_the_backbone_weights_are_never_read(tiny_v3_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_v3_model_dir, copy, ignore=shutil.ignore_patterns("voices"))
    (copy / "CosyVoice-BlankEN" / "model.safetensors").write_bytes(b"not a safetensors file")
    (copy / "llm.pt").unlink()
    with pytest.raises(ModelDirectoryError, match=r"missing llm\.pt"):
        load_model_directory(copy)
    shutil.copyfile(tiny_v3_model_dir / "llm.pt", copy / "llm.pt")
    model = load_model_directory(copy)  # llm.pt supersedes the safetensors, which stays unread
    assert model.llm.vocab.eos == model.config.llm.speech_token_size + 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "request_",
    [
        SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=1),
        SynthesisRequest(
            "Hello there, and welcome [breath] to the show.",
            mode="cross_lingual",
            prompt=prompt(None),
            seed=2,
        ),
        SynthesisRequest(TEXT, mode="instruct2", prompt=prompt(None), instruct="请用广东话表达。", seed=3),
    ],
    ids=["zero_shot", "cross_lingual", "instruct2"],
)
def test_modes_give_audio(tiny_v3_backend: CosyVoice3Backend, request_: SynthesisRequest) -> None:
    task, chunks = solo(tiny_v3_backend, request_, num_tokens=30)
    assert [c.final for c in chunks] == [True] and all(c.sample_rate == 24000 for c in chunks)
    assert task.segment_tokens[0] and len(task.segment_tokens[0]) == 30
    check_audio(audio_of(chunks), task.segment_tokens[0])


def test_the_llm_decides_the_length(tiny_v3_backend: CosyVoice3Backend) -> None:
    request = SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=11)
    task, chunks = solo(tiny_v3_backend, request)
    tokens = task.segment_tokens[0]
    n_text = len(tiny_v3_backend.frontend.tokenize(TEXT))
    assert 0 < len(tokens) <= 20 * n_text  # the reference's max_token_text_ratio
    check_audio(audio_of(chunks), tokens)


def test_saved_voice(tiny_v3_backend: CosyVoice3Backend) -> None:
    backend = tiny_v3_backend
    info = backend.add_voice("narrator", prompt())
    try:
        assert info.kind == "saved" and [v.id for v in backend.voices()] == ["narrator"]
        # By name (what /inference_sft and the OpenAI route send): zero-shot with the transcript.
        task, chunks = solo(backend, SynthesisRequest(TEXT, voice="narrator", seed=4), num_tokens=20)
        check_audio(audio_of(chunks), task.segment_tokens[0])
        ref_task, ref_chunks = solo(
            backend, SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=4), num_tokens=20
        )
        assert_same(task, chunks, ref_task, ref_chunks)
        task, chunks = solo(
            backend,
            SynthesisRequest(TEXT, mode="instruct2", voice="narrator", instruct="Speak slowly.", seed=5),
            20,
        )
        check_audio(audio_of(chunks), task.segment_tokens[0])
    finally:
        backend.delete_voice("narrator")


def test_requests_without_a_voice_are_refused(tiny_v3_backend: CosyVoice3Backend) -> None:
    backend = tiny_v3_backend
    with pytest.raises(UnsupportedModeError, match="no built-in speakers"):
        backend.check_request(SynthesisRequest(TEXT, voice="中文女"))
    with pytest.raises(UnsupportedModeError, match="does not support instruct"):
        backend.check_request(SynthesisRequest(TEXT, voice="x", mode="instruct", instruct="Slowly."))
    with pytest.raises(InvalidRequestError, match="needs a voice"):
        backend.check_request(SynthesisRequest(TEXT, mode="instruct2", instruct="Slowly."))


def test_streaming_chunks_make_the_stream(tiny_v3_backend: CosyVoice3Backend) -> None:
    """The stream's chunks are the batch-1 streaming driver's over the same tokens (the tokens a
    non-streaming request with the same seed gets), and as long as the non-streamed audio."""
    backend = tiny_v3_backend
    request = SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=6, stream=True)
    task, chunks = solo(backend, request, num_tokens=110)
    assert len(chunks) >= 3 and [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    tokens = task.segment_tokens[0]
    whole_task, whole = solo(backend, SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=6), 110)
    assert whole_task.segment_tokens[0] == tokens
    assert audio_of(chunks).size == audio_of(whole).size

    features = backend.prompt_encoder.encode(prompt())
    inputs = backend.frontend.voice_input(request.mode, task.info.segments[0], features)
    model = backend.model
    driver = StreamingToken2Wav(
        model.flow,
        model.hift,
        model.noise,
        inputs.flow_prompt_speech_tokens,
        inputs.prompt_speech_feat,
        inputs.flow_embedding,
    )
    expected = [c for c in driver.push(SilentTokenFilter().filter(tokens)) if c.size] + [driver.finish()]
    assert [c.audio.size for c in chunks] == [e.size for e in expected]
    np.testing.assert_allclose(audio_of(chunks), np.concatenate(expected), atol=1e-6, rtol=0)


MIXED = [
    (SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=21), 40),
    (SynthesisRequest("Good morning, everyone.", mode="cross_lingual", prompt=prompt(None), seed=22), 40),
    (SynthesisRequest(TEXT, mode="instruct2", prompt=prompt(None), instruct="用四川话说这句话", seed=23), 40),
    (SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=24, stream=True), 90),
    (SynthesisRequest("Short one.", mode="cross_lingual", prompt=prompt(None), seed=25, speed=1.3), 17),
]


def run_batched(backend: CosyVoice3Backend, flow_batch: int) -> tuple[list, list[StepStats]]:
    """MIXED through one runner: rows joining at different steps and leaving at different steps."""
    tasks = [backend.open(r, num_tokens=n) for r, n in MIXED]
    stats: list[StepStats] = []
    config = BatchConfig(max_batch=3, token_budget=1000, flow_batch=flow_batch)
    out = drive(BatchRunner(backend, config, on_step=stats.append), {0: tasks[:3], 5: tasks[3:]})
    return [(task, out[id(task)]) for task in tasks], stats


def test_batched_equals_unbatched(tiny_v3_backend: CosyVoice3Backend) -> None:
    """Ragged prefixes in one Qwen2 KV cache, rows joining and leaving: every request gets its
    solo tokens and audio."""
    torch.set_num_threads(1)
    refs = [solo(tiny_v3_backend, r, n) for r, n in MIXED]
    results, stats = run_batched(tiny_v3_backend, flow_batch=1)
    assert max(s.llm_batch for s in stats) == 3
    for (task, chunks), (ref_task, ref_chunks) in zip(results, refs):
        assert_same(task, chunks, ref_task, ref_chunks)


def test_equal_frames_share_one_euler_loop(tiny_v3_backend: CosyVoice3Backend) -> None:
    """Calls with equal batch keys (frames, attention mode) share the DiT's Euler loop; a batched
    GEMM rounds differently, and the vocoder's f0 integrates that into its phase, so the speech is
    compared as the parity sets compare free-running speech (relative RMS <= 1e-2)."""
    torch.set_num_threads(1)
    refs = [solo(tiny_v3_backend, r, n) for r, n in MIXED]
    results, stats = run_batched(tiny_v3_backend, flow_batch=4)
    assert any(s.audio_items >= 2 and s.flow_calls == 1 for s in stats)
    for (task, chunks), (ref_task, ref_chunks) in zip(results, refs):
        assert task.segment_tokens == ref_task.segment_tokens
        assert [c.audio.size for c in chunks] == [c.audio.size for c in ref_chunks]
        audio, ref = audio_of(chunks), audio_of(ref_chunks)
        assert np.linalg.norm(audio - ref) <= 1e-2 * np.linalg.norm(ref)


def test_voice_conversion(tiny_v3_backend: CosyVoice3Backend) -> None:
    backend = tiny_v3_backend
    source = PromptAudio(np.sin(np.linspace(0, 900, 40000)).astype(np.float32) * 0.1, 16000)
    target = warmup_prompt(seconds=2.03)  # an odd number of mel frames per token pair
    task = backend.convert_voice(source, prompt=target)
    chunks = [c for c in run_alone(task) if c is not None]
    tokens = backend.prompt_encoder.source_tokens(source).reshape(-1).tolist()
    assert task.segment_tokens == [tokens]
    features = backend.prompt_encoder.encode(target)
    # Not trimmed: the flow makes 2 frames per token of prompt + source, less the prompt's mel.
    frames = 2 * (features.speech_tokens.shape[1] + len(tokens)) - features.speech_feat.shape[1]
    assert audio_of(chunks).size == 480 * frames
    check_audio(audio_of(chunks)[: 480 * 2 * len(tokens)], tokens)
    # Streaming keeps the reference's cut of each call's mel at 2 frames per token of offset, so
    # the untrimmed prompt's odd frame (d = 2 x tokens - frames) repeats (or goes) at every call.
    task = backend.convert_voice(source, prompt=target, stream=True)
    streamed = [c for c in run_alone(task) if c is not None]
    calls = len(streamed)  # each flow call released a chunk (every hop is longer than the look-ahead)
    d = 2 * features.speech_tokens.shape[1] - features.speech_feat.shape[1]
    assert calls > 1 and d in (-1, 1)
    assert audio_of(streamed).size == 480 * (frames + d * (calls - 1))
    with pytest.raises(InvalidRequestError, match="one target voice"):
        backend.convert_voice(source)


def test_synthesizer_and_launcher(tiny_v3_model_dir: Path, tmp_path: Path) -> None:
    from cosyserve import Synthesizer
    from cosyserve.acceleration.launcher import open_family, warm_up

    tts = Synthesizer(tiny_v3_model_dir, device="cpu", voices_dir=tmp_path)
    assert tts.sample_rate == 24000
    audio, info = tts.synthesize_to_array(
        TEXT, prompt=(warmup_prompt().audio, 16000), prompt_text="你好。", seed=1
    )
    assert audio.size and info.audio_seconds > 0 and info.segments
    instructed, _ = tts.synthesize_to_array(
        TEXT, prompt=(warmup_prompt().audio, 16000), instruct="Slowly.", seed=1
    )
    assert instructed.size and np.isfinite(instructed).all()
    family = open_family(tiny_v3_model_dir)
    assert family.__name__ == "cosyserve.families.cosyvoice3"
    assert warm_up(tts.backend) > 0  # a generated prompt recording: no built-in speaker needed


def test_fp16_guard_wraps_the_dit_sampler(tiny_v3_model_dir: Path, tmp_path: Path) -> None:
    """The FP16 plan's guard sits on the DiT CFM's solve_euler (which takes the streaming flag):
    guarded calls equal unguarded ones, streaming or not, and a bad mel trips it."""
    from cosyserve.acceleration.fp16 import install_fp16_guard
    from cosyserve.families.base import FamilyOptions

    backend = CosyVoice3Backend.from_dir(tiny_v3_model_dir, FamilyOptions(device="cpu", voices_dir=tmp_path))
    flow = backend.model.flow
    features = backend.prompt_encoder.encode(prompt())
    tokens = torch.arange(40).reshape(1, -1) * 37

    def mels() -> list[torch.Tensor]:
        return [
            flow.decode([flow.prepare(tokens, None, None, features.embedding, streaming=s, finalize=not s)])[
                0
            ]
            for s in (False, True)
        ]

    plain = mels()
    guard = install_fp16_guard(backend, backend.accel_targets())
    assert not guard.tripped and backend.audio_guard is not None
    for guarded, ref in zip(mels(), plain):
        torch.testing.assert_close(guarded, ref, rtol=0, atol=0)
    silent = backend.audio_guard(np.zeros(24000, np.float32))
    assert guard.tripped and not silent.any()


def test_a_full_attention_estimator_runner_leaves_streaming_to_the_dit(
    tiny_v3_model_dir: Path, tmp_path: Path
) -> None:
    """An ONNX / TensorRT runner has no chunk-masked attention: streaming calls run the eager DiT,
    and once a plan released its weights they are refused with a clear error."""
    from cosyserve.families.base import FamilyOptions

    backend = CosyVoice3Backend.from_dir(tiny_v3_model_dir, FamilyOptions(device="cpu", voices_dir=tmp_path))
    cfm = backend.model.flow.decoder
    request = SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=8, stream=True)
    _, reference = solo(backend, request, num_tokens=60)
    calls: list[int] = []

    def full_attention(x, mask, mu, t, spks, cond):  # the 6 inputs of an exported estimator
        calls.append(x.shape[0])
        return cfm.estimator(x, mask, mu, t, spks, cond)

    cfm.estimator_runner = full_attention
    _, chunks = solo(backend, request, num_tokens=60)
    assert len(chunks) > 1 and calls  # the final (full-attention) call went to the runner
    np.testing.assert_array_equal(audio_of(chunks), audio_of(reference))
    cfm.estimator.to(device="meta")
    with pytest.raises(UnsupportedModeError, match="chunk-masked attention"):
        solo(backend, request, num_tokens=60)


def test_stop_ids_while_text_streams_in_are_never_drawn(tiny_v3_backend: CosyVoice3Backend) -> None:
    """The reference fails a request whose LLM draws EOS (or any stop id but FILL) while text is
    still streaming in (its ignore_eos masks SOS, not EOS); here those ids are masked in that
    phase. Whole-text decoding still stops on any stop id, EOS included, from the first token."""
    from cosyserve.families.cosyvoice2.llm import SpeechTokenSampler

    lm = tiny_v3_backend.llm
    vocab = lm.vocab
    prompt_ids = tiny_v3_backend.frontend.tokenize("You are a helpful assistant.<|endofprompt|>")
    state = lm.bistream(prompt_ids)
    state.push_text(tiny_v3_backend.frontend.tokenize("收到好友从远方寄来的生日礼物，让我很开心。"))
    state.take_inputs()
    assert state.output_due and state.phase == "text" and state.forced_token is None
    logp = torch.full((vocab.head_size,), -30.0)
    logp[vocab.eos] = 0.0  # EOS takes (almost) all the mass
    logp[[7, 8]] = -5.0
    sampler = SpeechTokenSampler(lm.cfg.sampling, generator=0)
    token = sampler.choose(logp.log_softmax(0), state)
    assert token in (7, 8) and state.accept(token) == token
    whole = lm.unistream([1, 2, 3], prompt_ids, max_len=10)
    whole.take_inputs()
    assert sampler.choose(logp.log_softmax(0), whole) == vocab.eos  # min_len unenforced: the quirk


def test_built_in_speakers_when_the_directory_has_spk2info(tmp_path: Path) -> None:
    """Upstream serves spk2info.pt speakers when a CosyVoice3 directory has one (the published one
    has none): SFT with the embedding alone, the text in the cross-lingual form."""
    from cosyserve.text.qwen_tokenizer import ENDOFPROMPT
    from cosyserve.tools.make_model import make_model
    from tests.conftest import TINY_SEED, TINY_V3_CONFIG

    out = tmp_path / "CosyVoice3-tiny-spk"
    make_model(TINY_V3_CONFIG, out, seed=TINY_SEED, speakers=2)
    backend = CosyVoice3Backend.from_dir(out)
    speaker = next(iter(backend.speakers))
    assert len(backend.speakers) == 2 and "sft" in backend.modes
    assert speaker in [v.id for v in backend.voices()]
    assert backend.warmup_request().voice == speaker and backend.warmup_request().prompt is None

    frontend, embedding = backend.frontend, backend.speakers[speaker]
    sft = frontend.speaker_input("sft", TEXT, embedding)
    assert sft.text_ids == frontend.tokenize(f"You are a helpful assistant.{ENDOFPROMPT}{TEXT}")
    assert sft.prompt_text_ids == [] and sft.flow_prompt_speech_tokens.numel() == 0
    assert sft.prompt_speech_feat is None and torch.equal(sft.flow_embedding, embedding)
    instruct = frontend.speaker_input("instruct2", TEXT, embedding, "Speak slowly.")
    assert instruct.text_ids == frontend.tokenize(TEXT)
    assert instruct.prompt_text_ids == frontend.tokenize(
        f"You are a helpful assistant. Speak slowly.{ENDOFPROMPT}"
    )
    streamed = frontend.speaker_input("sft", None, embedding)
    assert streamed.text_ids is None
    assert streamed.prompt_text_ids == frontend.tokenize(f"You are a helpful assistant.{ENDOFPROMPT}")

    for stream in (False, True):
        task, chunks = solo(
            backend, SynthesisRequest(TEXT, voice=speaker, stream=stream, seed=6), num_tokens=30
        )
        check_audio(audio_of(chunks), task.segment_tokens[0])
    task, chunks = solo(
        backend, SynthesisRequest(TEXT, mode="instruct2", voice=speaker, instruct="Speak slowly.", seed=7), 20
    )
    check_audio(audio_of(chunks), task.segment_tokens[0])
    with pytest.raises(
        UnsupportedModeError, match="neither a built-in speaker of this CosyVoice3 model nor a saved voice"
    ):
        backend.check_request(SynthesisRequest(TEXT, voice="nobody"))


@pytest.mark.parametrize("plan", ["cpu_fast", "cpu_int8", "cpu_bf16"])
def test_cpu_plans_free_the_time_conditioning_weights(
    tiny_v3_model_dir: Path, tmp_path: Path, plan: str
) -> None:
    """The CPU plans precompute the DiT's time conditioning for the sampler's step times and free its
    weights: the flow gives the eager plan's mel (cpu_fast: the same FP32 values), streaming or not, and
    a stream still synthesises."""
    from types import SimpleNamespace

    from cosyserve.acceleration.launcher import PLANS, build_backend, open_family
    from cosyserve.acceleration.packed import bf16_native

    if plan == "cpu_bf16" and not bf16_native():
        pytest.skip("cpu_bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX)")

    def build(name: str) -> CosyVoice3Backend:
        settings = SimpleNamespace(voices_dir=tmp_path, stream_first_hop=None)
        return build_backend(open_family(tiny_v3_model_dir), str(tiny_v3_model_dir), PLANS[name], settings)

    eager, backend = build("eager"), build(plan)
    dit = backend.model.flow.decoder.estimator
    assert any(
        a.startswith("time conditioning precomputed for the 10 Euler steps")
        for a in backend.options.extra["accelerations"]
    )
    assert (
        dit.time_embed.time_mlp[0].weight.is_meta
        and dit.transformer_blocks[0].attn_norm.linear.weight.is_meta
    )
    assert not eager.model.flow.decoder.estimator.time_embed.time_mlp[0].weight.is_meta
    features = backend.prompt_encoder.encode(prompt())
    tokens = torch.arange(40).reshape(1, -1) * 37
    tolerance = 1e-6 if plan == "cpu_fast" else 0.05
    for streaming in (False, True):
        mels = [
            b.model.flow.decode(
                [
                    b.model.flow.prepare(
                        tokens, None, None, features.embedding, streaming=streaming, finalize=not streaming
                    )
                ]
            )[0]
            for b in (eager, backend)
        ]
        err = float((mels[1] - mels[0]).abs().max()) / max(1.0, float(mels[0].abs().max()))
        assert err < tolerance, (streaming, err)
    request = SynthesisRequest(TEXT, mode="zero_shot", prompt=prompt(), seed=8, stream=True)
    task, chunks = solo(backend, request, num_tokens=60)
    assert len(chunks) > 1
    check_audio(audio_of(chunks), task.segment_tokens[0])

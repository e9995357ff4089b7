"""Prompt encoding (zero-shot frontend) with tiny deterministic ONNX stand-ins that have the
official I/O names, so the wiring (layouts, dtypes, lengths) is checked against a NumPy
re-computation of the same stand-in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from cosyserve.api import PromptAudio
from cosyserve.audio.io import resample
from cosyserve.errors import InvalidRequestError, UnsupportedModeError
from cosyserve.nn.config import MelConfig
from cosyserve.nn.features import MelExtractor, campplus_features, whisper_log_mel
from cosyserve.voices.prompt import (
    CAMPPLUS_FILE,
    SPEECH_TOKENIZER_FILE,
    PromptEncoder,
    PromptFeatures,
    align_prompt_lengths,
)

K = 64  # stand-in tokenizer vocabulary


def _weights(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_campplus(path: Path) -> np.ndarray:
    """input [B, T, 80] -> mean over T -> @ W [80, 192] -> output [B, 192]."""
    w = _weights(1, (80, 192))
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["output"]),
        ],
        "campplus_standin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", 80])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 192])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    _save(graph, path)
    return w


def write_speech_tokenizer(path: Path) -> np.ndarray:
    """feats [B, 128, T], feats_length [B] int32 -> every 2nd frame, argmax(frame @ W) as int32
    indices [B, ceil(T/2)] (the real model also emits 50 Hz tokens from 100 Hz frames)."""
    w = _weights(2, (128, K))
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["feats"], ["ft"], perm=[0, 2, 1]),
            helper.make_node("Slice", ["ft", "starts", "ends", "axes", "steps"], ["half"]),
            helper.make_node("MatMul", ["half", "W"], ["logits"]),
            helper.make_node("ArgMax", ["logits"], ["idx64"], axis=2, keepdims=0),
            helper.make_node("Cast", ["idx64"], ["indices"], to=TensorProto.INT32),
            helper.make_node("Div", ["feats_length", "two"], ["indices_lens"]),
        ],
        "speech_tokenizer_standin",
        [
            helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["B", 128, "T"]),
            helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["B"]),
        ],
        [
            helper.make_tensor_value_info("indices", TensorProto.INT32, ["B", "N"]),
            helper.make_tensor_value_info("indices_lens", TensorProto.INT32, ["B"]),
        ],
        initializer=[
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([0], np.int64), "starts"),
            numpy_helper.from_array(np.array([1 << 30], np.int64), "ends"),
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array([2], np.int64), "steps"),
            numpy_helper.from_array(np.array([2], np.int32), "two"),
        ],
    )
    _save(graph, path)
    return w


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    d = tmp_path_factory.mktemp("prompt_models")
    return d, write_campplus(d / CAMPPLUS_FILE), write_speech_tokenizer(d / SPEECH_TOKENIZER_FILE)


def _speech_like(sr: int, seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = 120 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(0.3 / h * np.sin(h * phase) for h in range(1, 8)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("sr", [16000, 22050, 44100])
def test_encode_matches_reference_computation(onnx_dir, sr: int):
    model_dir, w_spk, w_tok = onnx_dir
    audio = _speech_like(sr, 2.3)
    enc = PromptEncoder(model_dir, MelConfig(), device="cpu", onnx_threads=1)
    assert not enc.loaded  # lazy: nothing is created before the first zero-shot request
    out = enc.encode(PromptAudio(audio=audio, sample_rate=sr, text="hello there"))
    assert enc.loaded and enc.available
    assert isinstance(out, PromptFeatures) and out.text == "hello there"

    wav16 = resample(audio, sr, 16000)
    wav22 = resample(audio, sr, 22050)
    # embedding: campplus(input=[1, frames, 80] mean-normalised fbank)
    assert out.embedding.shape == (1, 192) and out.embedding.dtype == torch.float32
    expected_emb = campplus_features(wav16).numpy().mean(axis=0) @ w_spk
    np.testing.assert_allclose(out.embedding[0].numpy(), expected_emb, rtol=1e-4, atol=1e-4)
    # tokens: tokenizer(feats=[1, 128, frames] whisper log-mel, feats_length=[frames] int32)
    feat = whisper_log_mel(torch.from_numpy(wav16)[None]).numpy()
    assert feat.shape[2] == len(wav16) // 160
    expected_tok = np.argmax(feat[0].T[::2] @ w_tok, axis=1)
    assert out.speech_tokens.dtype == torch.int64 and out.speech_tokens.shape == (1, len(expected_tok))
    assert np.mean(out.speech_tokens[0].numpy() == expected_tok) > 0.98  # argmax ties/rounding
    # prompt mel at 22,050 Hz, time-major
    mel = MelExtractor(MelConfig())
    assert out.speech_feat.shape == (1, mel.num_frames(len(wav22)), 80)
    torch.testing.assert_close(out.speech_feat, mel(torch.from_numpy(wav22)[None]).transpose(1, 2))
    # v1: no trimming; ~50 tokens/s vs ~86 frames/s
    assert abs(out.speech_tokens.shape[1] / 2.3 - 50) < 2
    assert abs(out.speech_feat.shape[1] / 2.3 - 22050 / 256) < 2


def test_cross_lingual_prompt_has_no_text_and_to_device(onnx_dir):
    enc = PromptEncoder(onnx_dir[0])
    out = enc.encode(PromptAudio(audio=_speech_like(24000, 1.2), sample_rate=24000, text="   "))
    assert out.text is None
    moved = out.to("cpu")
    assert moved.embedding.device.type == "cpu" and torch.equal(moved.speech_tokens, out.speech_tokens)
    assert out.duration_s == out.speech_tokens.shape[1] / 50
    enc.close()
    assert not enc.loaded
    # stereo [channels, n] is mixed down rather than rejected
    stereo = np.stack([_speech_like(16000, 1.5), _speech_like(16000, 1.5, seed=1)])
    assert enc.encode(PromptAudio(audio=stereo, sample_rate=16000)).speech_tokens.shape[1] > 0


@pytest.mark.parametrize(
    "audio,sr,message",
    [
        (np.zeros(15000, np.float32), 16000, "at least 1 s"),
        (np.zeros(31 * 8000, np.float32), 8000, "limit is 30 s"),
        (np.full(20000, np.nan, np.float32), 16000, "NaN"),
        (np.zeros((3, 3, 20000), np.float32), 16000, "mono"),
        (np.zeros(20000, np.float32), 0, "sample rate"),
    ],
    ids=["short", "long", "nan", "shape", "rate"],
)
def test_bad_prompts_are_rejected_before_loading(onnx_dir, audio, sr, message):
    enc = PromptEncoder(onnx_dir[0])
    with pytest.raises(InvalidRequestError, match=message):
        enc.encode(PromptAudio(audio=audio, sample_rate=sr, text="x"))
    assert not enc.loaded


def test_missing_onnx_files(tmp_path: Path):
    enc = PromptEncoder(tmp_path)
    assert not enc.available and set(enc.missing_files) == {CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE}
    with pytest.raises(UnsupportedModeError, match="campplus.onnx"):
        enc.encode(PromptAudio(audio=_speech_like(16000, 1.5), sample_rate=16000, text="hi"))


def test_align_prompt_lengths():
    feat, tok = torch.zeros(1, 87, 80), torch.zeros(1, 50, dtype=torch.int64)
    f, t = align_prompt_lengths(feat, tok, None)  # v1: unchanged
    assert f is feat and t is tok
    f, t = align_prompt_lengths(feat, tok, 2)  # CosyVoice2 rule: n = min(87 // 2, 50) = 43
    assert f.shape[1] == 86 and t.shape[1] == 43
    f, t = align_prompt_lengths(torch.zeros(1, 120, 80), tok, 2)
    assert f.shape[1] == 100 and t.shape[1] == 50


def test_with_generated_model_dir(tiny_model_dir: Path):
    """The model directories written by cosyserve.tools.make_model carry ONNX stand-ins."""
    enc = PromptEncoder(tiny_model_dir)
    assert enc.available, enc.missing_files
    out = enc.encode(PromptAudio(audio=_speech_like(16000, 1.5), sample_rate=16000, text="hi"))
    assert out.embedding.shape == (1, 192) and out.embedding.dtype == torch.float32
    assert out.speech_tokens.dim() == 2 and out.speech_tokens.dtype == torch.int64
    assert out.speech_feat.shape[0] == 1 and out.speech_feat.shape[2] == 80


def test_with_project_onnx_standins(tmp_path: Path):
    """The stand-ins that `cosyserve make-model` writes go through the same path."""
    standins = pytest.importorskip("cosyserve.tools.onnx_standins")
    standins.write_standins(tmp_path)
    enc = PromptEncoder(tmp_path)
    out = enc.encode(PromptAudio(audio=_speech_like(22050, 2.0), sample_rate=22050, text="hi"))
    assert out.embedding.shape == (1, 192) and out.embedding.dtype == torch.float32
    n_frames = 2 * 16000 // 160
    assert out.speech_tokens.shape == (1, (n_frames + 1) // 2) and out.speech_tokens.dtype == torch.int64
    assert int(out.speech_tokens.min()) >= 0 and int(out.speech_tokens.max()) < 4096
    assert out.speech_feat.shape == (1, MelExtractor().num_frames(44100), 80)

"""Checks of a directory written by `cosyserve make-model` for CosyVoice2 / CosyVoice3, shared by
the families' tests (tiny directories) and the full-size builds."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
import torch
from torch import nn

from cosyserve.acceleration.onnx_export import (
    ESTIMATOR_INPUTS,
    ESTIMATOR_OUTPUT,
    OrtEstimator,
    compare_estimators,
)

T = TypeVar("T", bound=Callable[..., object])

BACKBONE_FILES = (
    "config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
)
MEL_FRAMES_PER_SECOND = 100  # the speech tokenizer's whisper log-mel


def relative_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def official_files(config_file: str, speech_tokenizer: str, speakers: bool) -> set[str]:
    """The files of a published CosyVoice2/3 directory (without model.safetensors) plus our README."""
    names = {
        config_file,
        "llm.pt",
        "flow.pt",
        "hift.pt",
        "campplus.onnx",
        speech_tokenizer,
        "flow.decoder.estimator.fp32.onnx",
        "README.md",
        *(f"CosyVoice-BlankEN/{n}" for n in BACKBONE_FILES),
    }
    return names | {"spk2info.pt"} if speakers else names


def checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    state = torch.load(path, weights_only=True, mmap=True)
    return {k: list(v.shape) for k, v in state.items()}


def as_built_hift_names(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Legacy weight-norm names -> the `parametrizations` names of state_dict_shapes.json."""
    renamed = {}
    for key, shape in shapes.items():
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        renamed[key.replace(".weight_v", ".parametrizations.weight.original1")] = shape
    return renamed


def check_backbone_config(model_dir: Path, source: Path, endoftext_id: int) -> dict:
    """CosyVoice-BlankEN/config.json: the source's dims in the transformers-4.x layout."""
    written = json.loads((model_dir / "CosyVoice-BlankEN" / "config.json").read_text())
    src = json.loads(source.read_text())
    assert "rope_parameters" not in written and written["rope_theta"] == 1_000_000.0
    assert written["torch_dtype"] == "float32" and "dtype" not in written
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert written[key] == src[key], key
    for key in ("num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
        assert written[key] == src[key], key
    assert written["bos_token_id"] == written["eos_token_id"] == endoftext_id
    generation = json.loads((model_dir / "CosyVoice-BlankEN" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == endoftext_id
    return written


def check_standins(model_dir: Path, speech_tokenizer: str, vocab_size: int, token_rate: int) -> None:
    """Both front-end stand-ins run in onnxruntime with the official I/O, fed as upstream feeds them."""
    import onnxruntime

    cam = onnxruntime.InferenceSession(str(model_dir / "campplus.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = cam.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape[2] == 80
    fbank = np.random.default_rng(0).standard_normal((1, 123, 80)).astype(np.float32)
    (emb,) = cam.run(None, {inp.name: fbank})
    assert emb.shape == (1, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()

    tok = onnxruntime.InferenceSession(str(model_dir / speech_tokenizer), providers=["CPUExecutionProvider"])
    ins = tok.get_inputs()
    assert [i.name for i in ins] == ["feats", "feats_length"]
    assert ins[0].type == "tensor(float)" and ins[0].shape[1] == 128 and ins[1].type == "tensor(int32)"
    assert [o.name for o in tok.get_outputs()] == ["indices"]
    frames = 2 * MEL_FRAMES_PER_SECOND  # 2 s of log-mel
    feat = np.random.default_rng(1).standard_normal((1, 128, frames)).astype(np.float32)
    ids = tok.run(None, {ins[0].name: feat, ins[1].name: np.array([frames], dtype=np.int32)})[0]
    assert ids.shape == (1, 2 * token_rate)
    assert ids.min() >= 0 and ids.max() < vocab_size and len(np.unique(ids)) > 10


def check_estimator_onnx(model_dir: Path, estimator: nn.Module) -> float:
    """The exported estimator has the official I/O and computes what the torch estimator computes
    (dynamic batch: one CFG pair and two requests; odd lengths; a masked row)."""
    runner = OrtEstimator(model_dir / "flow.decoder.estimator.fp32.onnx", threads=2)
    assert [i.name for i in runner.session.get_inputs()] == list(ESTIMATOR_INPUTS)
    assert [o.name for o in runner.session.get_outputs()] == [ESTIMATOR_OUTPUT]
    assert runner.static_batch is None
    err = max(
        compare_estimators(runner, estimator, frames=(37, 8), batch=2),
        compare_estimators(runner, estimator, frames=(61,), batch=4),
    )
    assert err < 1e-4, err
    return err


def check_audio(wav: np.ndarray, samples: int) -> None:
    """Finite, the expected length, not silent and not clipped noise."""
    assert wav.shape == (samples,) and np.isfinite(wav).all()
    assert np.abs(wav).max() > 0.01 and wav.std() > 1e-3
    assert (np.abs(wav) >= 0.99).mean() < 0.05


def full_size(test: T) -> T:
    """A full-size build: slow, and only with ``COSYSERVE_FULL_SIZE=1`` (a minute, GBs of disk)."""
    marks = (
        pytest.mark.slow,
        pytest.mark.timeout(900),
        pytest.mark.skipif(os.environ.get("COSYSERVE_FULL_SIZE") != "1", reason="set COSYSERVE_FULL_SIZE=1"),
    )
    for mark in marks:
        test = mark(test)
    return test


def build_full_size(arch: Path, config_file: str, out: Path) -> dict:
    """make-model on an architecture folder of ``shared/models``; every checkpoint key and shape
    equals its ``state_dict_shapes.json`` (hift: legacy weight-norm names). Returns the written files."""
    from cosyserve.tools.make_model import make_model

    if not (arch / config_file).exists():
        pytest.skip(f"{arch / config_file} not available")
    started = time.perf_counter()
    written = {f.name: f for f in make_model(arch / config_file, out)}
    print(f"{arch.name} written in {time.perf_counter() - started:.0f} s")
    shapes = json.loads((arch / "state_dict_shapes.json").read_text())
    assert checkpoint_shapes(out / "llm.pt") == shapes["llm"]
    assert checkpoint_shapes(out / "flow.pt") == shapes["flow"]
    assert as_built_hift_names(checkpoint_shapes(out / "hift.pt")) == shapes["hift"]
    return written

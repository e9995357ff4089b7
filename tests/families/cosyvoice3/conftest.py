"""A tiny CosyVoice3 model directory in the official layout, built once per test run, and a CPU
backend on it.

Until ``cosyserve make-model`` writes v3 directories, ``tiny_v3_model_dir`` is the first parity
set's networks and tokenizer files (random weights, reduced dims) plus small ONNX stand-ins of
``campplus.onnx`` and ``speech_tokenizer_v3.onnx`` (25 tokens/s, ids in [0, 6561)).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers.parity import discover_sets

# What an official directory holds (model.safetensors is never read: left out).
_MODEL_FILES = ("cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt")
_BACKBONE_FILES = (
    "config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
)


def build_v3_model_dir(source: Path, out: Path) -> Path:
    """The parity set ``source`` as a servable model directory at ``out``."""
    from cosyserve.tools.onnx_standins import write_standins

    (out / "CosyVoice-BlankEN").mkdir(parents=True)
    for name in _MODEL_FILES:
        shutil.copyfile(source / name, out / name)
    for name in _BACKBONE_FILES:
        if (source / "CosyVoice-BlankEN" / name).is_file():
            shutil.copyfile(source / "CosyVoice-BlankEN" / name, out / "CosyVoice-BlankEN" / name)
    write_standins(out, seed=3, vocab_size=6561, tokenizer_file="speech_tokenizer_v3.onnx", frame_stride=4)
    return out


@pytest.fixture(scope="session")
def tiny_v3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sets = discover_sets("cosyvoice3")
    if not sets:
        pytest.skip("no cosyvoice3 parity set to build a tiny model from")
    return build_v3_model_dir(sets[0], tmp_path_factory.mktemp("tiny_v3") / "CosyVoice3-tiny")


@pytest.fixture(scope="session")
def tiny_v3_backend(tiny_v3_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice3.backend import CosyVoice3Backend

    options = FamilyOptions(device="cpu", voices_dir=tmp_path_factory.mktemp("v3_voices"))
    return CosyVoice3Backend.from_dir(tiny_v3_model_dir, options)

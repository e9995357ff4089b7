"""The CPU backend on the tiny CosyVoice3 directory (``tiny_v3_model_dir``, written by
``cosyserve make-model``), and :func:`build_v3_model_dir`: a parity set as a servable directory
(its networks and tokenizer files plus ONNX stand-ins of ``campplus.onnx`` and
``speech_tokenizer_v3.onnx``, 25 tokens/s), for the end-to-end parity tests that need the set's
weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
    write_standins(
        out, seed=3, vocab_size=6561, tokenizer_file="speech_tokenizer_v3.onnx", frames_per_token=4
    )
    return out


@pytest.fixture(scope="session")
def tiny_v3_backend(tiny_v3_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice3.backend import CosyVoice3Backend

    options = FamilyOptions(device="cpu", voices_dir=tmp_path_factory.mktemp("v3_voices"))
    return CosyVoice3Backend.from_dir(tiny_v3_model_dir, options)

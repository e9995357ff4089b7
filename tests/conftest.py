"""Shared fixtures: tiny random-weight model directories (v1, CosyVoice2, CosyVoice3), generated
once per test run by `cosyserve make-model` from `tests/families/<family>/tiny.yaml`.

* `tiny_config_path`: `tests/families/cosyvoice1/tiny.yaml` (official class paths, very small dims).
* `tiny_model_dir`: session-scoped directory in the official format written by
  `cosyserve make-model` from that yaml (llm.pt, flow.pt, hift.pt with weight_g/weight_v,
  spk2info.pt with the seven SFT speakers, ONNX stand-ins). Treat it as read-only: tests that
  change or damage files use `tiny_model_copy`.
* `tiny_model_copy`: a fresh per-test copy of it (in tmp_path) that a test may modify.
* `tiny_loaded_model`: session-scoped `LoadedModel` of `tiny_model_dir` (do not mutate it).
* `tiny_backend`: session-scoped CPU backend of `tiny_model_dir` with its own voice store (tests
  that change options or the networks build their own).
* `tiny_v2_model_dir`, `tiny_v3_model_dir`: session-scoped CosyVoice2 / CosyVoice3 directories in
  the official layout (yaml, llm.pt, flow.pt, hift.pt, spk2info.pt (v2: seven speakers here, one as published), ONNX
  stand-ins, the estimator ONNX, CosyVoice-BlankEN/ with a small byte-level BPE tokenizer: the
  tiny text vocabularies (4,096 rows) are smaller than Qwen2's). Read-only: copy before changing.
* `tiny_v2_model_copy`, `tiny_v2_backend`: a per-test copy and a session CPU backend of the
  CosyVoice2 one (`tiny_v3_backend` lives in `tests/families/cosyvoice3/conftest.py`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FAMILIES_DIR = Path(__file__).parent / "families"
TINY_CONFIG = FAMILIES_DIR / "cosyvoice1" / "tiny.yaml"
TINY_V2_CONFIG = FAMILIES_DIR / "cosyvoice2" / "tiny.yaml"
TINY_V3_CONFIG = FAMILIES_DIR / "cosyvoice3" / "tiny.yaml"
TINY_SEED = 1234


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return TINY_CONFIG


def _make_tiny(factory: pytest.TempPathFactory, config: Path, name: str, speakers: int | None = None) -> Path:
    from cosyserve.tools.make_model import make_model

    out = factory.mktemp(name.lower()) / name
    make_model(config, out, seed=TINY_SEED, speakers=speakers)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny(tmp_path_factory, TINY_CONFIG, "CosyVoice-tiny-SFT")


@pytest.fixture(scope="session")
def tiny_v2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # seven built-in speakers (the published directory has one): tests batch different voices
    return _make_tiny(tmp_path_factory, TINY_V2_CONFIG, "CosyVoice2-tiny", speakers=7)


@pytest.fixture(scope="session")
def tiny_v3_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_tiny(tmp_path_factory, TINY_V3_CONFIG, "CosyVoice3-tiny")


@pytest.fixture
def tiny_model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model with only the official files: acceleration artifacts that
    earlier tests exported into the shared directory are left behind, so no test depends on order."""
    dest = tmp_path / tiny_model_dir.name
    shutil.copytree(
        tiny_model_dir,
        dest,
        ignore=shutil.ignore_patterns("flow.decoder.estimator.*", "hift.decoder.*", "*.plan", "*.zip"),
    )
    return dest


@pytest.fixture(scope="session")
def tiny_loaded_model(tiny_model_dir: Path):  # -> LoadedModel (imported lazily: torch is slow to import)
    from cosyserve.families.cosyvoice1.loader import load_model_directory

    return load_model_directory(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # -> CosyVoiceBackend
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend

    options = FamilyOptions(device="cpu", voices_dir=tmp_path_factory.mktemp("voices"))
    return CosyVoiceBackend.from_dir(tiny_model_dir, options)


@pytest.fixture
def tiny_v2_model_copy(tiny_v2_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny CosyVoice2 model (official files only) that a test may modify."""
    dest = tmp_path / tiny_v2_model_dir.name
    shutil.copytree(tiny_v2_model_dir, dest, ignore=shutil.ignore_patterns("voices", "*.plan", "*.zip"))
    return dest


@pytest.fixture(scope="session")
def tiny_v2_backend(
    tiny_v2_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
):  # -> CosyVoice2Backend
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice2.backend import CosyVoice2Backend

    options = FamilyOptions(device="cpu", voices_dir=tmp_path_factory.mktemp("v2_voices"))
    return CosyVoice2Backend.from_dir(tiny_v2_model_dir, options)

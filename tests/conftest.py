"""Shared fixtures: a tiny random-weight CosyVoice v1 model directory, generated once per test run.

* `tiny_config_path`: `tests/data/tiny_cosyvoice.yaml` (official class paths, very small dims).
* `tiny_model_dir`: session-scoped directory in the official format written by
  `cosyserve make-model` from that yaml (llm.pt, flow.pt, hift.pt with weight_g/weight_v,
  spk2info.pt with the seven SFT speakers, ONNX stand-ins). Treat it as read-only: tests that
  change or damage files use `tiny_model_copy`.
* `tiny_model_copy`: a fresh per-test copy of it (in tmp_path) that a test may modify.
* `tiny_loaded_model`: session-scoped `LoadedModel` of `tiny_model_dir` (do not mutate it).
* `tiny_backend`: session-scoped CPU backend of `tiny_model_dir` with its own voice store (tests
  that change options or the networks build their own).
* `tiny_v2_model_dir`, `tiny_v2_model_copy`, `tiny_v2_backend`: the same for a tiny CosyVoice2
  directory (built from the CosyVoice2 parity set, see `tests/helpers/tiny_v2.py`; skipped
  without it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TINY_CONFIG = Path(__file__).parent / "data" / "tiny_cosyvoice.yaml"
TINY_SEED = 1234


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cosyserve.tools.make_model import make_model

    out = tmp_path_factory.mktemp("tiny_model") / "CosyVoice-tiny-SFT"
    make_model(TINY_CONFIG, out, seed=TINY_SEED)
    return out


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


@pytest.fixture(scope="session")
def tiny_v2_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_v2 import make_tiny_v2_dir

    return make_tiny_v2_dir(tmp_path_factory.mktemp("tiny_v2_model") / "CosyVoice2-tiny")


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

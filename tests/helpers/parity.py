"""Parity fixtures: ``$COSYSERVE_PARITY_DIR`` (default: ``shared/parity`` beside the repository) holds a
folder per family (``cosyvoice1/``, ``cosyvoice2/``, ...), each with ``set_*`` directories recorded
with the reference implementation. Every set of a family is a parameter of that family's parity
tests (see ``tests/families/conftest.py``), so a new set in the same format is picked up without
code changes. :func:`assert_close` records the max abs error of every stage; the table is printed
at the end of the run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PARITY_DIR = REPO_ROOT.parent / "shared" / "parity"

_ERRORS: list[tuple[str, str, float, float]] = []  # (family/set, stage, max abs error, atol)


def parity_root() -> Path:
    return Path(os.environ.get("COSYSERVE_PARITY_DIR", DEFAULT_PARITY_DIR))


def discover_sets(family: str) -> list[Path]:
    """The ``set_*`` directories of one family's fixtures."""
    root = parity_root() / family
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("set_"))


@dataclass
class ParitySet:
    path: Path
    name: str = field(init=False)
    family: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = self.path.name
        self.family = self.path.parent.name

    @cached_property
    def arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.path / "fixtures.npz") as npz:
            return {k: npz[k] for k in npz.files}

    def t(self, key: str) -> torch.Tensor:
        """An array as a torch tensor (float32 / int64 as stored)."""
        return torch.from_numpy(self.arrays[key].copy())

    @cached_property
    def frontend(self) -> dict:
        return json.loads((self.path / "frontend.json").read_text(encoding="utf-8"))

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text(encoding="utf-8"))

    @cached_property
    def config(self):
        """The set's model config, read by its family's own loader."""
        from cosyserve.families import import_family

        return import_family(self.family).load_config(self.path)


def parametrize_sets(metafunc: pytest.Metafunc, family: str) -> None:
    """Make every set of ``family`` a parameter of the test's ``parity_set`` argument."""
    sets = discover_sets(family)
    metafunc.parametrize(
        "parity_set",
        [ParitySet(p) for p in sets]
        or [pytest.param(None, marks=pytest.mark.skip(f"no {family} parity sets"))],
        ids=[p.name for p in sets] or ["none"],
        scope="session",
    )


def assert_close(
    parity_set: ParitySet,
    stage: str,
    actual: torch.Tensor | np.ndarray,
    expected: torch.Tensor | np.ndarray,
    atol: float,
    rtol: float = 0.0,
) -> float:
    """Compare one stage against its fixture; record and return the max abs error."""
    a = (
        actual.detach().cpu().double().numpy()
        if isinstance(actual, torch.Tensor)
        else np.asarray(actual, np.float64)
    )
    e = (
        expected.detach().cpu().double().numpy()
        if isinstance(expected, torch.Tensor)
        else np.asarray(expected, np.float64)
    )
    assert a.shape == e.shape, f"{stage}: shape {a.shape} != fixture {e.shape}"
    err = float(np.max(np.abs(a - e))) if a.size else 0.0
    _ERRORS.append((f"{parity_set.family}/{parity_set.name}", stage, err, atol))
    bound = atol + rtol * np.abs(e)
    worst = np.max(np.abs(a - e) - bound) if a.size else -1.0
    assert worst <= 0, f"{stage}: max abs error {err:.3g} exceeds atol {atol:g} (rtol {rtol:g})"
    return err


def assert_rel_rms(
    parity_set: ParitySet,
    stage: str,
    actual: torch.Tensor | np.ndarray,
    expected: torch.Tensor | np.ndarray,
    bound: float = 1e-2,
) -> float:
    """Free-running comparison (e.g. speech from our own f0 and source): the relative RMS error
    ``||a - e|| / ||e||``, since a 1-ulp mel difference drifts the sine source's phase. Lengths must
    be identical."""
    a = np.asarray(actual.detach().cpu().double() if isinstance(actual, torch.Tensor) else actual, np.float64)
    e = np.asarray(
        expected.detach().cpu().double() if isinstance(expected, torch.Tensor) else expected, np.float64
    )
    assert a.shape == e.shape, f"{stage}: shape {a.shape} != fixture {e.shape}"
    rel = float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-12))
    _ERRORS.append((f"{parity_set.family}/{parity_set.name}", f"{stage} [rel. RMS]", rel, bound))
    assert rel <= bound, f"{stage}: relative RMS error {rel:.3g} exceeds {bound:g}"
    return rel


def report_errors(terminalreporter) -> None:
    """The table of max abs errors per stage, for the end of the run."""
    if not _ERRORS:
        return
    terminalreporter.section("parity: max abs error per stage")
    for set_name, stage, err, atol in _ERRORS:
        terminalreporter.write_line(f"{set_name:8s} {stage:40s} {err:10.3g}  (atol {atol:g})")

"""Family tests live in ``tests/families/<family>/``; a test there that takes ``parity_set`` runs once
per fixture set of that family (``$COSYSERVE_PARITY_DIR/<family>/set_*``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.parity import parametrize_sets, report_errors

_FAMILIES_DIR = Path(__file__).parent


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "parity_set" in metafunc.fixturenames:
        family = Path(metafunc.definition.fspath).relative_to(_FAMILIES_DIR).parts[0]
        parametrize_sets(metafunc, family)


@pytest.fixture(autouse=True, scope="session")
def _deterministic_threads():
    # Fixtures were recorded with 2 threads; other counts change float summation order slightly.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter) -> None:
    report_errors(terminalreporter)

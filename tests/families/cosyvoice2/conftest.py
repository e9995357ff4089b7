"""The CosyVoice2 backend tests' model: the session's tiny CosyVoice2 backend, run on one thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def backend(tiny_v2_backend) -> Iterator:  # -> CosyVoice2Backend
    # Tiny networks: a second thread only adds synchronisation (costly on a busy machine).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_v2_backend
    torch.set_num_threads(previous)

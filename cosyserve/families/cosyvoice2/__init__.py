"""CosyVoice2 (CosyVoice2-0.5B): a Qwen2 LLM over 25 Hz speech tokens (text streamed in or whole),
a chunk-aware causal flow (pre-lookahead, up-sampling conformer, causal U-Net estimator with a fixed
noise buffer) and HiFT at 24 kHz with SineGen2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_FILE = "cosyvoice2.yaml"


def load_config(model_dir: str | Path) -> Any:
    """The directory's `cosyvoice2.yaml` (and `CosyVoice-BlankEN/config.json`) as typed configs."""
    from cosyserve.families.cosyvoice2.config import load_model_config

    return load_model_config(Path(model_dir))


def open_backend(model_dir: str | Path, options: Any = None) -> Any:
    """Load the directory as a :class:`~.backend.CosyVoice2Backend` (``options``: FamilyOptions)."""
    from cosyserve.families.cosyvoice2.backend import CosyVoice2Backend

    return CosyVoice2Backend.from_dir(model_dir, options)

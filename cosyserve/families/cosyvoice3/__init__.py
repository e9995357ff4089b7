"""CosyVoice3 (Fun-CosyVoice3-0.5B): the CosyVoice2 Qwen2 LLM with a 6,761-way speech head, a DiT flow
estimator behind a pre-lookahead layer, and a causal HiFT at 24 kHz; no built-in speakers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_FILE = "cosyvoice3.yaml"


def load_config(model_dir: str | Path) -> Any:
    """The directory's `cosyvoice3.yaml` (and `CosyVoice-BlankEN/config.json`) as typed configs."""
    from cosyserve.families.cosyvoice3.config import load_model_config

    return load_model_config(Path(model_dir))


def open_backend(model_dir: str | Path, options: Any = None) -> Any:
    """Load the directory as a :class:`~.backend.CosyVoice3Backend` (``options``: FamilyOptions)."""
    from cosyserve.families.cosyvoice3.backend import CosyVoice3Backend

    return CosyVoice3Backend.from_dir(model_dir, options)

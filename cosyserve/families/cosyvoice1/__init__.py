"""CosyVoice v1 (CosyVoice-300M, -SFT, -Instruct): whisper-tokenised text, a conformer text encoder and
transformer LLM, 50 Hz speech tokens, a conformer flow with a U-Net estimator, HiFT at 22.05 kHz."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_FILE = "cosyvoice.yaml"


def load_config(model_dir: str | Path) -> Any:
    """The directory's `cosyvoice.yaml` as a typed :class:`~.config.ModelConfig` (nothing executed)."""
    from cosyserve.families.cosyvoice1.config import load_model_config

    return load_model_config(Path(model_dir) / CONFIG_FILE)


def open_backend(model_dir: str | Path, options: Any = None) -> Any:
    """Load the directory as a :class:`~.backend.CosyVoiceBackend` (``options``: FamilyOptions)."""
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend

    return CosyVoiceBackend.from_dir(model_dir, options)

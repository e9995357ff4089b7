"""Is this audio usable? One check for the launcher's warm-up and the FP16 guard's every chunk."""

from __future__ import annotations

import numpy as np


def audio_problem(audio: np.ndarray, min_rms: float = 1e-5, min_samples: int = 11025) -> str | None:
    """Why audio is unusable (None when fine): NaN/inf, or digital silence (RMS under ``min_rms``)
    over at least ``min_samples`` samples; shorter audio is never called silent."""
    if audio.size == 0:
        return None
    if not np.all(np.isfinite(audio)):
        return "NaN/inf audio"
    if audio.size >= min_samples and float(np.sqrt(np.mean(np.square(audio, dtype=np.float64)))) < min_rms:
        return "silent audio"
    return None

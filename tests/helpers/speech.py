"""Audio decoding and word error rate for the ASR-based tests.

Compressed bodies (mp3, opus, aac, flac, wav) are decoded and resampled with PyAV; raw PCM
(s16le mono) with numpy and soxr. Text is normalised before scoring so that "3" and "three",
"Hello," and "hello" count as the same word.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache

import numpy as np

ASR_RATE = 16_000


def decode_body(body: bytes, fmt: str, sample_rate: int | None = None, rate: int = ASR_RATE) -> np.ndarray:
    """float32 mono at ``rate`` from a response body; ``sample_rate`` is needed for raw PCM."""
    if fmt in ("pcm", "stream"):
        if not sample_rate:
            raise ValueError("raw PCM needs its sample rate (the X-Sample-Rate header)")
        import soxr

        pcm = np.frombuffer(body[: len(body) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
        return soxr.resample(pcm, sample_rate, rate).astype(np.float32) if sample_rate != rate else pcm
    import av

    parts: list[np.ndarray] = []
    with av.open(io.BytesIO(body), mode="r") as container:
        stream = next(s for s in container.streams if s.type == "audio")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                parts.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):  # drain the resampler's delay
            parts.append(out.to_ndarray().reshape(-1))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


@lru_cache(maxsize=1)
def _inflect_engine():  # -> inflect.engine; imported lazily, it is slow to import
    import inflect

    return inflect.engine()


def _number_words(match: re.Match[str]) -> str:
    digits = match.group(0).replace(",", "")
    return " " + _inflect_engine().number_to_words(digits, andword="") + " "


def normalise(text: str) -> list[str]:
    """Lower-case words without punctuation; numbers spelled out; hyphens split words."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"\d[\d,]*(\.\d+)?", _number_words, text)
    text = re.sub(r"[-–—/]", " ", text)
    text = re.sub(r"'", "", text)  # "o'clock" == "oclock", "it's" == "its"
    text = re.sub(r"[^\w\s]", " ", text)
    return text.split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after :func:`normalise`."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, hyp_word in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
        previous = current
    return previous[-1] / len(ref)

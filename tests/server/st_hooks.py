"""Schemathesis hooks for tests/server/test_schemathesis.py (loaded by the `st` process through
SCHEMATHESIS_HOOKS): a generated upload is random bytes, which the server rightly refuses, so a
quarter of the bodies that carry a recording get a real one and reach the model (zero-shot,
cross-lingual, saved voices) instead of stopping at the decoder."""

from __future__ import annotations

import base64
import io
import struct
from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st

_AUDIO_FIELDS = ("prompt_wav", "audio")


def _wav(seconds: float = 1.5, sample_rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    samples = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    out = io.BytesIO()
    out.write(b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt ")
    out.write(struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16))
    out.write(b"data" + struct.pack("<I", len(samples)) + samples)
    return out.getvalue()


_RECORDING = _wav()
_BASE64 = base64.b64encode(_RECORDING).decode("ascii")


def _with_recording(body: Any, use: bool) -> Any:
    if not use or not isinstance(body, dict):
        return body
    out = dict(body)
    for field in _AUDIO_FIELDS:
        value = out.get(field)
        if isinstance(value, bytes):
            out[field] = _RECORDING
        elif isinstance(value, str):
            out[field] = _BASE64
    return out


@schemathesis.hook
def flatmap_body(context: schemathesis.HookContext, body: Any) -> Any:
    return st.sampled_from([False, False, False, True]).map(lambda use: _with_recording(body, use))

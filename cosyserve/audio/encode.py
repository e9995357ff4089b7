"""Streaming audio encoders for the HTTP layer: one per response format.

Every encoder takes float32 mono chunks of any size and returns the bytes that are ready to
send; ``flush()`` returns the rest. ``wav`` and ``pcm`` are written by hand (16-bit PCM); the
compressed formats go through PyAV (FFmpeg), which re-frames the samples to the codec's frame
size. Formats whose codec cannot take the model's sample rate (Opus: 8/12/16/24/48 kHz) are
resampled with ``soxr`` to the nearest legal rate at or above it.

A streamed body cannot go back and patch its headers, so a streamed WAV carries "unknown"
(maximal) sizes and a streamed MP3 has no gapless (LAME) tag; :func:`encode_all` writes into a
seekable buffer and so gets exact headers.
"""

from __future__ import annotations

import io
import logging
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MEDIA_TYPES: dict[str, str] = {
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
}
FORMATS: tuple[str, ...] = tuple(MEDIA_TYPES)

_INT16_MAX = 32767.0
# A streamed WAV cannot know its length; players and FFmpeg read "maximal" sizes as "until EOF".
_UNKNOWN_SIZE = 0xFFFFFFFF


def _as_mono_float(chunk: Any) -> np.ndarray:
    audio = np.asarray(chunk, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(audio)):
        # One NaN from a model must not turn the whole response into noise or an encoder error.
        audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(audio, -1.0, 1.0)


def float_to_int16(audio: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] → int16, rounded (not truncated) so a round trip is within 1/2 LSB."""
    return np.round(_as_mono_float(audio) * _INT16_MAX).astype("<i2")


def wav_header(sample_rate: int, num_samples: int | None = None, channels: int = 1) -> bytes:
    """A 44-byte canonical 16-bit PCM WAV header; ``num_samples=None`` writes unknown sizes."""
    block_align = 2 * channels
    if num_samples is None:
        data_size = riff_size = _UNKNOWN_SIZE
    else:
        data_size = num_samples * block_align
        riff_size = min(36 + data_size, _UNKNOWN_SIZE)
        data_size = min(data_size, _UNKNOWN_SIZE)
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff_size,
        b"WAVE",
        b"fmt ",
        16,  # fmt chunk size
        1,  # PCM
        channels,
        sample_rate,
        sample_rate * block_align,  # byte rate
        block_align,
        16,  # bits per sample
        b"data",
        data_size,
    )


class StreamEncoder(ABC):
    """Encode float32 mono chunks into one response body, piece by piece."""

    format: str
    sample_rate: int  # of the input audio

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @abstractmethod
    def encode(self, chunk: np.ndarray) -> bytes:
        """Take one chunk (any length, may be empty); return the bytes ready to send now."""

    @abstractmethod
    def flush(self) -> bytes:
        """Finish the stream and return the remaining bytes. Later calls return ``b""``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release codec resources without finishing (e.g. the client went away)."""


class PCMEncoder(StreamEncoder):
    """Raw signed 16-bit little-endian mono samples, no header."""

    format = "pcm"

    def __init__(self, sample_rate: int):
        self.sample_rate = sample_rate
        self._finished = False

    def encode(self, chunk: np.ndarray) -> bytes:
        if self._finished:
            raise RuntimeError("encoder already flushed")
        return float_to_int16(chunk).tobytes()

    def flush(self) -> bytes:
        self._finished = True
        return b""


class WAVEncoder(PCMEncoder):
    """16-bit PCM WAV whose header (sent before the first samples) says "size unknown"."""

    format = "wav"

    def __init__(self, sample_rate: int):
        super().__init__(sample_rate)
        self._header_sent = False

    def _header(self) -> bytes:
        if self._header_sent:
            return b""
        self._header_sent = True
        return wav_header(self.sample_rate)

    def encode(self, chunk: np.ndarray) -> bytes:
        return self._header() + super().encode(chunk)

    def flush(self) -> bytes:
        # An empty request still gets a valid (empty) WAV body.
        header = self._header()
        super().flush()
        return header


@dataclass(frozen=True)
class _CodecSpec:
    container: str  # FFmpeg muxer name
    codec: str  # FFmpeg encoder name
    sample_format: str  # the sample format we hand the encoder
    rates: tuple[int, ...] | None = None  # legal sample rates; None = any
    bit_rate: int | None = None
    container_options: dict[str, str] = field(default_factory=dict)


_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
_AAC_RATES = (7350, 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)

_SPECS: dict[str, _CodecSpec] = {
    "mp3": _CodecSpec("mp3", "libmp3lame", "fltp", _MP3_RATES, 64_000),
    "aac": _CodecSpec("adts", "aac", "fltp", _AAC_RATES, 64_000),
    # Ogg buffers a page per second by default: 100 ms pages keep streaming latency low at
    # ~2 kbit/s of page overhead.
    "opus": _CodecSpec("ogg", "libopus", "flt", _OPUS_RATES, 32_000, {"page_duration": "100000"}),
    "flac": _CodecSpec("flac", "flac", "s16"),
}


def codec_sample_rate(fmt: str, sample_rate: int) -> int:
    """The rate the body of ``fmt`` is encoded at: the input rate, or the nearest legal one above."""
    spec = _SPECS.get(fmt)
    if spec is None or spec.rates is None or sample_rate in spec.rates:
        return sample_rate
    higher = [r for r in spec.rates if r >= sample_rate]
    return min(higher) if higher else max(spec.rates)


class _Drain:
    """A write-only file for PyAV: collects what the muxer writes until we take it.

    It has no ``seek``, so FFmpeg knows it cannot patch headers and writes a streamable body.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


class AVEncoder(StreamEncoder):
    """MP3 / AAC (ADTS) / Opus (Ogg) / FLAC through PyAV.

    ``seekable=True`` writes into an in-memory file that FFmpeg may seek in (exact headers:
    FLAC STREAMINFO length, MP3 gapless tag); everything then comes out of ``flush()``.
    """

    def __init__(self, fmt: str, sample_rate: int, bit_rate: int | None = None, seekable: bool = False):
        import av  # lazily: only the compressed formats need FFmpeg

        if fmt not in _SPECS:
            raise ValueError(f"no PyAV encoder for {fmt!r}; known: {', '.join(_SPECS)}")
        self.format = fmt
        self.sample_rate = sample_rate
        self._spec = spec = _SPECS[fmt]
        self.codec_rate = codec_sample_rate(fmt, sample_rate)
        self._resampler = None
        if self.codec_rate != sample_rate:
            import soxr

            self._resampler = soxr.ResampleStream(sample_rate, self.codec_rate, 1, dtype="float32")
        self._seekable_out: io.BytesIO | None = io.BytesIO() if seekable else None
        self._drain = _Drain()
        self._container = av.open(
            self._seekable_out if seekable else self._drain,
            mode="w",
            format=spec.container,
            # Hand each muxed packet to our file at once instead of filling a 32 KiB buffer first.
            container_options={"flush_packets": "1", **spec.container_options},
        )
        self._stream = self._container.add_stream(spec.codec, rate=self.codec_rate, layout="mono")
        self._stream.codec_context.format = spec.sample_format
        if bit_rate or spec.bit_rate:
            self._stream.codec_context.bit_rate = bit_rate or spec.bit_rate
        self._pts = 0
        self._finished = False
        self._av = av

    def _take(self) -> bytes:
        return b"" if self._seekable_out is not None else self._drain.take()

    def _encode_frame(self, audio: np.ndarray | None) -> None:
        frame = None
        if audio is not None:
            if self._spec.sample_format == "s16":
                data = float_to_int16(audio)[None, :]
            else:
                data = audio[None, :]
            frame = self._av.AudioFrame.from_ndarray(data, format=self._spec.sample_format, layout="mono")
            frame.sample_rate = self.codec_rate
            frame.pts = self._pts
            self._pts += len(audio)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)

    def encode(self, chunk: np.ndarray) -> bytes:
        if self._finished:
            raise RuntimeError("encoder already flushed")
        audio = _as_mono_float(chunk)
        if self._resampler is not None and len(audio):
            audio = self._resampler.resample_chunk(audio)
        if len(audio):
            self._encode_frame(audio)
        return self._take()

    def flush(self) -> bytes:
        if self._finished:
            return b""
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if len(tail):
                self._encode_frame(np.asarray(tail, dtype=np.float32))
        self._encode_frame(None)  # drain the codec's look-ahead
        self._container.close()
        self._finished = True
        if self._seekable_out is not None:
            return self._seekable_out.getvalue()
        return self._drain.take()

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            try:
                self._container.close()
            except Exception:  # closing a half-written stream is best effort
                logger.debug("closing an unfinished %s encoder failed", self.format, exc_info=True)


def make_encoder(fmt: str, sample_rate: int, bit_rate: int | None = None) -> StreamEncoder:
    """A fresh streaming encoder for one response body in ``fmt`` (one of :data:`FORMATS`)."""
    fmt = fmt.lower()
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if fmt == "wav":
        return WAVEncoder(sample_rate)
    if fmt == "pcm":
        return PCMEncoder(sample_rate)
    if fmt in _SPECS:
        return AVEncoder(fmt, sample_rate, bit_rate=bit_rate)
    raise ValueError(f"unknown audio format {fmt!r}; choose one of {', '.join(FORMATS)}")


def encode_all(audio: np.ndarray, sample_rate: int, fmt: str, bit_rate: int | None = None) -> bytes:
    """Encode a whole clip at once, with exact headers (WAV sizes, FLAC length, MP3 gapless tag)."""
    fmt = fmt.lower()
    if fmt == "wav":
        samples = float_to_int16(audio)
        return wav_header(sample_rate, len(samples)) + samples.tobytes()
    if fmt in _SPECS:
        encoder = AVEncoder(fmt, sample_rate, bit_rate=bit_rate, seekable=True)
        encoder.encode(audio)
        return encoder.flush()
    encoder_ = make_encoder(fmt, sample_rate, bit_rate=bit_rate)
    return encoder_.encode(audio) + encoder_.flush()

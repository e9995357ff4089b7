"""Decoding of uploaded prompt audio and sample-rate conversion.

Any container/codec FFmpeg reads (wav, flac, mp3, ogg/opus/vorbis, m4a/aac, webm, ...) is decoded
through PyAV to float32 mono (channels averaged, as upstream's ``load_wav`` does) and optionally
resampled with soxr. Every failure on user data becomes an :class:`InvalidRequestError` whose
message says what is wrong with the upload; nothing here lets a decoder stack trace escape.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import av
import numpy as np
import soxr

from cosyserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

AudioSource = bytes | bytearray | memoryview | str | Path


def resample(audio: np.ndarray, sr_in: int, sr_out: int, quality: str = "HQ") -> np.ndarray:
    """Band-limited resampling of float mono audio with soxr (``HQ``: 20-bit, linear phase)."""
    audio = np.asarray(audio, dtype=np.float32)
    if sr_in <= 0 or sr_out <= 0:
        raise InvalidRequestError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out or audio.size == 0:
        return audio
    if audio.ndim != 1:
        raise ValueError(f"resample expects mono 1-D audio, got shape {audio.shape}")
    return np.ascontiguousarray(soxr.resample(audio, sr_in, sr_out, quality=quality), dtype=np.float32)


def _open_container(data: AudioSource):
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise InvalidRequestError(f"audio file not found: {path}")
        return av.open(str(path), mode="r")
    raw = bytes(data)
    if not raw:
        raise InvalidRequestError("the audio upload is empty")
    return av.open(io.BytesIO(raw), mode="r")


def _describe(data: AudioSource) -> str:
    return f"file {data}" if isinstance(data, (str, Path)) else f"upload ({len(data)} bytes)"


def decode_audio(
    data: AudioSource,
    target_sr: int | None = None,
    max_duration_s: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``data`` (bytes or a path) to float32 mono.

    Returns ``(audio, sample_rate)``: ``sample_rate`` is ``target_sr`` when given (the audio is
    resampled to it), else the stream's own rate. ``max_duration_s`` stops decoding early and
    rejects longer audio, so a huge upload cannot fill memory.
    """
    what = _describe(data)
    try:
        container = _open_container(data)
    except InvalidRequestError:
        raise
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"cannot read the audio {what}: not a supported audio format ({exc})"
        ) from exc

    try:
        with container:
            if not container.streams.audio:
                raise InvalidRequestError(f"the audio {what} contains no audio stream")
            stream = container.streams.audio[0]
            # Convert whatever sample format the codec gives (s16, s32p, fltp, ...) to planar
            # float32 at the stream's own rate and layout; channels are averaged below.
            converter = av.AudioResampler(format="fltp")
            chunks: list[np.ndarray] = []
            sample_rate = 0
            total = 0
            for frame in container.decode(stream):
                if not sample_rate:
                    sample_rate = int(frame.sample_rate)
                elif int(frame.sample_rate) != sample_rate:
                    raise InvalidRequestError(f"the audio {what} changes sample rate mid-stream")
                for out in converter.resample(frame):
                    planes = out.to_ndarray()  # [channels, samples] float32
                    chunks.append(planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0])
                    total += planes.shape[1]
                if max_duration_s is not None and sample_rate and total > max_duration_s * sample_rate:
                    raise InvalidRequestError(
                        f"the audio {what} is longer than the {max_duration_s:g} s limit"
                    )
            for out in converter.resample(None):  # flush
                planes = out.to_ndarray()
                chunks.append(planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0])
    except InvalidRequestError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, IndexError) as exc:
        raise InvalidRequestError(
            f"cannot decode the audio {what}: the data is corrupt or truncated ({exc})"
        ) from exc

    if not chunks or not sample_rate:
        raise InvalidRequestError(f"the audio {what} decodes to no samples")
    audio = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    if audio.size == 0:
        raise InvalidRequestError(f"the audio {what} decodes to no samples")
    if max_duration_s is not None and audio.size > max_duration_s * sample_rate:
        raise InvalidRequestError(f"the audio {what} is longer than the {max_duration_s:g} s limit")
    if not np.all(np.isfinite(audio)):
        raise InvalidRequestError(f"the audio {what} contains NaN or infinite samples")
    logger.debug("decoded %s: %d samples at %d Hz", what, audio.size, sample_rate)
    if target_sr is not None and target_sr != sample_rate:
        audio = resample(audio, sample_rate, target_sr)
        sample_rate = int(target_sr)
    return audio, sample_rate

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
from typing import Any

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


# Limits checked from the header before decoding (and again on every decoded frame, since a
# header can lie): a voice prompt needs no more than this, and FFmpeg handles all of it.
MAX_CHANNELS = 32
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000
# Some containers only estimate their duration (VBR mp3 without a Xing header, from the bit
# rate): refuse before decoding only a declared duration clearly over the limit; the decoded
# length is then checked exactly.
_DECLARED_DURATION_SLACK = 1.5


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


def _check_format(what: str, channels: int, sample_rate: int) -> None:
    """Refuse channel counts and sample rates no voice recording has (0: not known yet)."""
    if channels > MAX_CHANNELS:
        raise InvalidRequestError(
            f"the audio {what} has {channels} channels; at most {MAX_CHANNELS} are accepted "
            "(send a mono or stereo recording)"
        )
    if sample_rate and not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidRequestError(
            f"the audio {what} has a sample rate of {sample_rate} Hz; accepted: "
            f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz (16 kHz or more is best for a voice prompt)"
        )


def _declared_seconds(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _mono(frame: Any) -> np.ndarray:
    """Mean of the channels of a packed float32 frame ([1, samples * channels] interleaved)."""
    channels = frame.layout.nb_channels
    packed = frame.to_ndarray().reshape(-1)
    if channels == 1:
        return packed
    return packed.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def decode_audio(
    data: AudioSource,
    target_sr: int | None = None,
    max_duration_s: float | None = None,
) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of ``data`` (bytes or a path) to float32 mono.

    Returns ``(audio, sample_rate)``: ``sample_rate`` is ``target_sr`` when given (the audio is
    resampled to it), else the stream's own rate. ``max_duration_s`` stops decoding early and
    rejects longer audio, so a huge upload cannot fill memory. Channel counts over
    :data:`MAX_CHANNELS` and sample rates outside :data:`MIN_SAMPLE_RATE`-:data:`MAX_SAMPLE_RATE`
    are refused from the header, before decoding, and again if a decoded frame disagrees.
    """
    what = _describe(data)
    try:
        container = _open_container(data)
    except InvalidRequestError:
        raise
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError, MemoryError) as exc:
        raise InvalidRequestError(
            f"cannot read the audio {what}: not a supported audio format ({exc})"
        ) from exc

    chunks: list[np.ndarray] = []
    sample_rate = 0
    try:
        with container:
            if not container.streams.audio:
                raise InvalidRequestError(f"the audio {what} contains no audio stream")
            stream = container.streams.audio[0]
            codec = stream.codec_context
            if codec is None:
                raise InvalidRequestError(f"the audio {what} uses a codec this server cannot decode")
            _check_format(what, int(codec.channels or 0), int(codec.sample_rate or 0))
            declared = _declared_seconds(container, stream)
            if (
                max_duration_s is not None
                and declared is not None
                and declared > max_duration_s * _DECLARED_DURATION_SLACK
            ):
                raise InvalidRequestError(
                    f"the audio {what} is {declared:.1f} s long; the limit is {max_duration_s:g} s"
                )
            # Packed float32 in the frame's own layout, averaged here: PyAV's to_ndarray() on
            # planar frames of 8 or more channels crashes the process, packed frames are safe.
            converter: av.AudioResampler | None = None
            layout = ""
            total = 0
            for frame in container.decode(stream):
                rate = int(frame.sample_rate)
                _check_format(what, frame.layout.nb_channels, rate)
                if converter is None:
                    sample_rate, layout = rate, frame.layout.name
                    converter = av.AudioResampler(format="flt", layout=frame.layout, rate=rate)
                elif rate != sample_rate:
                    raise InvalidRequestError(f"the audio {what} changes sample rate mid-stream")
                elif frame.layout.name != layout:
                    raise InvalidRequestError(f"the audio {what} changes its channel layout mid-stream")
                for out in converter.resample(frame):
                    chunks.append(_mono(out))
                    total += out.samples
                if max_duration_s is not None and total > max_duration_s * sample_rate:
                    raise InvalidRequestError(
                        f"the audio {what} is longer than the {max_duration_s:g} s limit"
                    )
            if converter is not None:
                for out in converter.resample(None):  # flush
                    chunks.append(_mono(out))
    except InvalidRequestError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError, IndexError, MemoryError) as exc:
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

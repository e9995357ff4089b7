"""Every response format, streamed in ragged chunks and one-shot, decodes back through PyAV with
the right rate and duration; lossless formats give back the exact 16-bit samples, lossy ones keep
a sine's pitch."""

from __future__ import annotations

import io
import struct
import wave

import av
import numpy as np
import pytest

from cosyserve.audio.encode import (
    FORMATS,
    MEDIA_TYPES,
    codec_sample_rate,
    encode_all,
    float_to_int16,
    make_encoder,
)

RATES = (22050, 24000)  # the embedded voice's and CosyVoice's
LOSSLESS = ("wav", "pcm", "flac")
# Samples a streamed lossy body may decode to beyond the input, at the input rate: the codec's
# start-up delay (AAC priming 1024; LAME 576 + decoder 529) plus padding of the last frame.
STREAM_SLACK = {"mp3": 2048, "aac": 2048, "opus": 0}


def sine(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def decode(body: bytes, fmt: str, rate: int) -> tuple[np.ndarray, int]:
    """Decode a body to float32 mono and the rate the decoder reports."""
    if fmt == "pcm":
        return np.frombuffer(body, "<i2").astype(np.float32) / 32767.0, rate
    with av.open(io.BytesIO(body)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.channels == 1
        pieces = []
        for frame in container.decode(stream):
            data = frame.to_ndarray().reshape(-1)
            if data.dtype == np.int16:
                data = data.astype(np.float32) / 32767.0
            elif data.dtype == np.int32:
                data = data.astype(np.float32) / 2147483647.0
            pieces.append(data.astype(np.float32))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32), stream.codec_context.sample_rate


def stream_encode(audio: np.ndarray, rate: int, fmt: str, seed: int = 0) -> tuple[bytes, int]:
    """Encode in random chunk sizes (1 sample to 5000); also return bytes emitted before flush."""
    rng = np.random.default_rng(seed)
    encoder = make_encoder(fmt, rate)
    body = b""
    i = 0
    while i < len(audio):
        n = int(rng.integers(1, 5000))
        body += encoder.encode(audio[i : i + n])
        i += n
    before_flush = len(body)
    return body + encoder.flush(), before_flush


def expected_rate(fmt: str, rate: int) -> int:
    return 48000 if fmt == "opus" else rate  # FFmpeg's Opus decoder always outputs 48 kHz


def test_media_types_cover_formats() -> None:
    assert set(MEDIA_TYPES) == set(FORMATS) == {"wav", "pcm", "mp3", "opus", "aac", "flac"}
    assert MEDIA_TYPES["mp3"] == "audio/mpeg"


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_roundtrip(fmt: str, rate: int) -> None:
    audio = sine(rate, 1.3)
    body, before_flush = stream_encode(audio, rate, fmt)
    assert before_flush > 0, "a streaming encoder must emit bytes before flush()"
    decoded, decoded_rate = decode(body, fmt, rate)
    assert decoded_rate == expected_rate(fmt, rate)
    # Compare lengths in input-rate samples.
    extra = len(decoded) * rate / decoded_rate - len(audio)
    if fmt in LOSSLESS:
        assert extra == 0
        np.testing.assert_allclose(decoded, audio, atol=1.0 / 32767)
    else:
        assert -1 <= extra <= STREAM_SLACK[fmt], f"{fmt}: {extra} samples off"


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_shot_roundtrip(fmt: str) -> None:
    rate = 22050
    audio = sine(rate, 0.9, freq=300.0)
    decoded, decoded_rate = decode(encode_all(audio, rate, fmt), fmt, rate)
    assert decoded_rate == expected_rate(fmt, rate)
    extra = len(decoded) * rate / decoded_rate - len(audio)
    if fmt in LOSSLESS:
        np.testing.assert_array_equal(np.round(decoded * 32767).astype(np.int16), float_to_int16(audio))
    elif fmt == "aac":
        assert 0 <= extra <= 2048  # ADTS cannot signal the encoder's priming
    else:
        assert abs(extra) <= 1  # mp3 gets a gapless tag, ogg/opus its granule positions


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac"])
@pytest.mark.parametrize("freq", [440.0, 1000.0])
def test_lossy_keeps_pitch(fmt: str, freq: float) -> None:
    rate = 22050
    audio = sine(rate, 1.0, freq=freq)
    body, _ = stream_encode(audio, rate, fmt, seed=1)
    decoded, decoded_rate = decode(body, fmt, rate)
    spectrum = np.abs(np.fft.rfft(decoded * np.hanning(len(decoded))))
    peak = np.fft.rfftfreq(len(decoded), 1.0 / decoded_rate)[int(np.argmax(spectrum))]
    assert abs(peak - freq) < 3.0, f"{fmt}: dominant {peak:.1f} Hz, expected {freq}"
    # and the level survives too
    rms_in = np.sqrt(np.mean(audio**2))
    rms_out = np.sqrt(np.mean(decoded**2)) * np.sqrt(len(decoded) * rate / decoded_rate / len(audio))
    assert abs(rms_out / rms_in - 1) < 0.1


def test_streaming_wav_header_is_unknown_size_and_one_shot_exact() -> None:
    rate = 22050
    audio = sine(rate, 0.25)
    body, _ = stream_encode(audio, rate, "wav")
    (riff_size,) = struct.unpack("<I", body[4:8])
    (data_size,) = struct.unpack("<I", body[40:44])
    assert body[:4] == b"RIFF" and body[36:40] == b"data"
    assert riff_size == data_size == 0xFFFFFFFF
    assert len(body) == 44 + 2 * len(audio)

    one_shot = encode_all(audio, rate, "wav")
    assert struct.unpack("<I", one_shot[4:8])[0] == len(one_shot) - 8
    with wave.open(io.BytesIO(one_shot)) as reader:
        assert reader.getframerate() == rate
        assert reader.getnchannels() == 1 and reader.getsampwidth() == 2
        assert reader.getnframes() == len(audio)


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_stream_and_flush_semantics(fmt: str) -> None:
    encoder = make_encoder(fmt, 22050)
    body = encoder.encode(np.zeros(0, np.float32)) + encoder.flush()
    assert encoder.flush() == b""
    if fmt == "wav":
        assert len(body) == 44  # a valid, empty WAV
    elif fmt == "pcm":
        assert body == b""
    with pytest.raises(RuntimeError):
        encoder.encode(np.zeros(10, np.float32))


@pytest.mark.parametrize("fmt", ["wav", "flac", "opus"])
def test_non_finite_and_out_of_range_input_is_sanitised(fmt: str) -> None:
    rate = 24000
    audio = sine(rate, 0.5)
    audio[100:110] = np.nan
    audio[200] = np.inf
    audio[300:310] = 3.0
    decoded, _ = decode(encode_all(audio, rate, fmt), fmt, rate)
    assert np.all(np.isfinite(decoded))
    assert np.max(np.abs(decoded)) <= 1.2


def test_close_without_flush_and_bad_arguments() -> None:
    encoder = make_encoder("mp3", 22050)
    encoder.encode(sine(22050, 0.2))
    encoder.close()  # a client that disconnected: no exception, nothing more to send
    with pytest.raises(ValueError, match="unknown audio format"):
        make_encoder("ogg-vorbis", 22050)
    with pytest.raises(ValueError):
        make_encoder("wav", 0)


def test_codec_sample_rate() -> None:
    assert codec_sample_rate("opus", 22050) == 24000
    assert codec_sample_rate("opus", 24000) == 24000
    assert codec_sample_rate("opus", 44100) == 48000
    assert codec_sample_rate("mp3", 22050) == 22050
    assert codec_sample_rate("flac", 22050) == 22050
    assert codec_sample_rate("wav", 16000) == 16000

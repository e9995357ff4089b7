"""Prompt-audio decoding: every common container, stereo mixdown, resampling, clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest

from cosyserve.audio.io import decode_audio, resample
from cosyserve.errors import InvalidRequestError

# (container format, codec, file suffix, encoder sample format, sample rate)
FORMATS = [
    ("wav", "pcm_s16le", "wav", "s16", 22050),
    ("flac", "flac", "flac", "s16", 44100),
    ("mp3", "libmp3lame", "mp3", "fltp", 44100),
    ("ogg", "libopus", "opus", "flt", 48000),
    ("ipod", "aac", "m4a", "fltp", 24000),  # "ipod" is FFmpeg's muxer for .m4a
]


def _tone(sr: int, seconds: float, freq: float, channels: int) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    left = 0.4 * np.sin(2 * np.pi * freq * t)
    if channels == 1:
        return left[None].astype(np.float32)
    # right channel in antiphase: a correct mixdown (mean) of this pair is silence
    return np.stack([left, -left]).astype(np.float32)


def encode(fmt: str, codec: str, sample_fmt: str, sr: int, audio: np.ndarray) -> bytes:
    """Encode ``audio`` ([channels, samples] float32) into an in-memory file with PyAV."""
    buf = io.BytesIO()
    layout = "mono" if audio.shape[0] == 1 else "stereo"
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=sr, layout=layout)
        stream.format = sample_fmt
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=sr)
        block = 1024
        for start in range(0, audio.shape[1], block):
            piece = np.ascontiguousarray(audio[:, start : start + block])
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
            frame.sample_rate = sr
            for f in resampler.resample(frame):
                for packet in stream.encode(f):
                    out.mux(packet)
        for f in resampler.resample(None):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,codec,suffix,sample_fmt,sr", FORMATS, ids=[f[2] for f in FORMATS])
def test_decode_each_container(tmp_path: Path, fmt: str, codec: str, suffix: str, sample_fmt: str, sr: int):
    seconds = 1.5
    data = encode(fmt, codec, sample_fmt, sr, _tone(sr, seconds, 440.0, channels=1))
    path = tmp_path / f"prompt.{suffix}"
    path.write_bytes(data)
    for source in (data, path, str(path)):
        audio, got_sr = decode_audio(source)
        assert audio.dtype == np.float32 and audio.ndim == 1
        # opus always decodes at 48 kHz; the others keep their rate
        assert got_sr == sr
        # lossy codecs add encoder delay/padding (a few ms): allow 100 ms
        assert abs(len(audio) / got_sr - seconds) < 0.1, (suffix, len(audio) / got_sr)
        mid = audio[len(audio) // 4 : 3 * len(audio) // 4]
        assert 0.2 < np.sqrt(np.mean(mid**2)) < 0.35  # 0.4 peak sine: rms 0.283

    audio16, sr16 = decode_audio(data, target_sr=16000)
    assert sr16 == 16000
    assert abs(len(audio16) / 16000 - seconds) < 0.1


def test_stereo_is_mixed_down():
    sr = 16000
    stereo = _tone(sr, 1.0, 300.0, channels=2)  # right = -left: the mean is silence
    audio, got_sr = decode_audio(encode("wav", "pcm_s16le", "s16", sr, stereo))
    assert got_sr == sr and audio.ndim == 1 and len(audio) == sr
    assert np.max(np.abs(audio)) < 1e-3

    half = np.stack([stereo[0], np.zeros_like(stereo[0])])  # left only: mixdown halves it
    audio, _ = decode_audio(encode("flac", "flac", "s16", sr, half))
    np.testing.assert_allclose(audio, stereo[0] / 2, atol=1e-4)


def test_wav_roundtrip_is_exact_to_16_bit():
    sr = 22050
    tone = _tone(sr, 1.0, 1000.0, channels=1)
    audio, _ = decode_audio(encode("wav", "pcm_s16le", "s16", sr, tone))
    np.testing.assert_allclose(audio, tone[0], atol=1.0 / 32768 + 1e-7)


def test_resample_preserves_tone_and_length():
    sr_in, sr_out = 44100, 16000
    tone = _tone(sr_in, 2.0, 1000.0, channels=1)[0]
    out = resample(tone, sr_in, sr_out)
    assert out.dtype == np.float32 and abs(len(out) - 2 * sr_out) <= 1
    t = np.arange(len(out)) / sr_out
    expected = 0.4 * np.sin(2 * np.pi * 1000.0 * t)
    inner = slice(200, -200)  # ignore the filter's edge transients
    np.testing.assert_allclose(out[inner], expected[inner], atol=2e-3)
    # content above the new Nyquist is removed, not aliased
    high = _tone(sr_in, 1.0, 12000.0, channels=1)[0]
    assert np.sqrt(np.mean(resample(high, sr_in, sr_out)[200:-200] ** 2)) < 1e-3
    assert resample(tone, sr_in, sr_in) is not None and len(resample(tone, sr_in, sr_in)) == len(tone)


def test_max_duration_is_enforced():
    data = encode("wav", "pcm_s16le", "s16", 16000, _tone(16000, 3.0, 200.0, channels=1))
    with pytest.raises(InvalidRequestError, match="longer than"):
        decode_audio(data, max_duration_s=2.0)
    audio, _ = decode_audio(data, max_duration_s=5.0)
    assert len(audio) == 48000


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"this is not audio at all" * 20, "cannot"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "cannot"),  # truncated header
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_unreadable_data_is_a_clear_error(data: bytes, message: str):
    with pytest.raises(InvalidRequestError, match=message) as info:
        decode_audio(data)
    assert "Traceback" not in info.value.message


def test_missing_file_and_truncated_mp3(tmp_path: Path):
    with pytest.raises(InvalidRequestError, match="not found"):
        decode_audio(tmp_path / "missing.wav")
    data = encode("mp3", "libmp3lame", "fltp", 22050, _tone(22050, 1.0, 440.0, channels=1))
    # A cut-off stream still decodes what is there or fails cleanly; never another exception.
    try:
        audio, _ = decode_audio(data[: len(data) // 2])
        assert len(audio) > 0
    except InvalidRequestError:
        pass


def test_video_without_audio_is_rejected():
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(InvalidRequestError, match="no audio stream"):
        decode_audio(buf.getvalue())

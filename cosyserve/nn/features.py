"""Audio feature extractors of the CosyVoice v1 frontend, numerically identical to upstream.

Three spectrogram flavours feed three different networks:

* :class:`MelExtractor`: the 22,050 Hz, 80-bin natural-log mel of Matcha-TTS
  (``matcha.utils.audio.mel_spectrogram``): the flow's prompt features.
* :func:`whisper_log_mel`: Whisper's 128-bin log10 mel of 16 kHz audio
  (``whisper.audio.log_mel_spectrogram``): the input of ``speech_tokenizer_v1.onnx``.
* :func:`kaldi_fbank` / :func:`campplus_features`: the Kaldi-compatible 80-bin log fbank of
  ``torchaudio.compliance.kaldi.fbank`` (its defaults, dither 0), mean-normalised over time: the
  input of ``campplus.onnx``.

None of librosa, whisper or torchaudio is needed at run time: the filterbanks are recomputed
here (the slaney filterbank reproduces ``librosa.filters.mel`` bit for bit, float32).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from cosyserve.nn.config import MelConfig

# --------------------------------------------------------------------------------------------
# Slaney mel filterbank (librosa.filters.mel with htk=False, norm="slaney", dtype float32)
# --------------------------------------------------------------------------------------------

_SLANEY_F_SP = 200.0 / 3  # linear part: 66.67 Hz per mel
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_MIN_LOG_MEL = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel_slaney(freqs: np.ndarray | float) -> np.ndarray:
    """Slaney's auditory-toolbox mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(freqs, dtype=np.float64)
    mels = f / _SLANEY_F_SP
    log_part = f >= _SLANEY_MIN_LOG_HZ
    # np.where evaluates both branches; clamp the log argument so the unused branch stays finite.
    safe = np.maximum(f, _SLANEY_MIN_LOG_HZ)
    return np.where(log_part, _SLANEY_MIN_LOG_MEL + np.log(safe / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP, mels)


def mel_to_hz_slaney(mels: np.ndarray | float) -> np.ndarray:
    m = np.asarray(mels, dtype=np.float64)
    freqs = _SLANEY_F_SP * m
    log_part = m >= _SLANEY_MIN_LOG_MEL
    return np.where(log_part, _SLANEY_MIN_LOG_HZ * np.exp(_SLANEY_LOGSTEP * (m - _SLANEY_MIN_LOG_MEL)), freqs)


@lru_cache(maxsize=16)
def _slaney_mel_filterbank_cached(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
    mel_min, mel_max = hz_to_mel_slaney(fmin), hz_to_mel_slaney(fmax)
    mel_f = mel_to_hz_slaney(np.linspace(mel_min, mel_max, n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:n_mels] / fdiff[:n_mels, None]
    upper = ramps[2 : n_mels + 2] / fdiff[1 : n_mels + 1, None]
    # librosa stores the triangles in float32 first and applies the (float64) slaney area
    # normalisation afterwards; keeping both roundings makes the result bit-identical.
    weights = np.maximum(0.0, np.minimum(lower, upper)).astype(np.float32)
    enorm = 2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels])
    weights = (weights * enorm[:, None]).astype(np.float32)
    weights.flags.writeable = False
    return weights


def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
    """``[n_mels, n_fft // 2 + 1]`` float32, equal to ``librosa.filters.mel(sr=..., n_fft=...,
    n_mels=..., fmin=..., fmax=...)`` (slaney scale and area normalisation). Read-only (cached)."""
    if fmax is None:
        fmax = sample_rate / 2.0
    return _slaney_mel_filterbank_cached(int(sample_rate), int(n_fft), int(n_mels), float(fmin), float(fmax))


# --------------------------------------------------------------------------------------------
# 22,050 Hz prompt mel (Matcha-TTS mel_spectrogram)
# --------------------------------------------------------------------------------------------


class MelExtractor:
    """The flow's mel extractor: ``[B, samples]`` (or ``[samples]``) -> ``[B, num_mels, frames]``.

    frames = (samples + 2 * (n_fft - hop) // 2 - n_fft) // hop + 1 (reflect padding, no centring).
    """

    def __init__(self, config: MelConfig | None = None):
        self.config = config or MelConfig()
        c = self.config
        self._basis_np = slaney_mel_filterbank(c.sampling_rate, c.n_fft, c.num_mels, c.fmin, c.fmax)
        self._cache: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            basis = torch.from_numpy(self._basis_np.copy()).to(device=device, dtype=dtype)
            window = torch.hann_window(self.config.win_size, device=device, dtype=dtype)
            self._cache[key] = (basis, window)
        return self._cache[key]

    def num_frames(self, num_samples: int) -> int:
        c = self.config
        pad = (c.n_fft - c.hop_size) // 2
        return (num_samples + 2 * pad - c.n_fft) // c.hop_size + 1

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> torch.Tensor:
        c = self.config
        squeeze = wav.dim() == 1
        y = wav.unsqueeze(0) if squeeze else wav
        if not y.is_floating_point():
            y = y.float()
        pad = (c.n_fft - c.hop_size) // 2
        if y.shape[-1] <= pad:
            raise ValueError(f"audio too short for the mel extractor: {y.shape[-1]} samples (need > {pad})")
        basis, window = self._constants(y.device, y.dtype)
        y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            y,
            c.n_fft,
            hop_length=c.hop_size,
            win_length=c.win_size,
            window=window,
            center=c.center,
            pad_mode="reflect",
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        # Same operation order as Matcha (re^2 + im^2 summed, + 1e-9, sqrt) for bit-parity.
        spec = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
        mel = torch.log(torch.clamp(torch.matmul(basis, spec), min=1e-5))
        return mel.squeeze(0) if squeeze else mel


# --------------------------------------------------------------------------------------------
# Whisper log-mel (speech tokenizer input)
# --------------------------------------------------------------------------------------------

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160


@lru_cache(maxsize=8)
def _whisper_constants(n_mels: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    filters = torch.from_numpy(slaney_mel_filterbank(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels).copy())
    return filters.to(device), torch.hann_window(WHISPER_N_FFT).to(device)


@torch.no_grad()
def whisper_log_mel(audio: torch.Tensor | np.ndarray, n_mels: int = 128) -> torch.Tensor:
    """``whisper.audio.log_mel_spectrogram(audio, n_mels)`` for 16 kHz audio.

    ``[samples]`` -> ``[n_mels, samples // 160]``; ``[B, samples]`` -> ``[B, n_mels, frames]``.
    As in Whisper, the "max - 8" dynamic-range floor uses the maximum over the whole input.
    """
    x = (
        torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        if isinstance(audio, np.ndarray)
        else audio
    )
    filters, window = _whisper_constants(n_mels, str(x.device))
    stft = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2  # Whisper drops the last (centred-padding) frame
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# --------------------------------------------------------------------------------------------
# Kaldi fbank (campplus input)
# --------------------------------------------------------------------------------------------

_FLOAT_EPS = float(np.finfo(np.float32).eps)  # Kaldi's std::numeric_limits<float>::epsilon()


def _kaldi_mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 1127.0 * (1.0 + freq / 700.0).log()
    return 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=8)
def _kaldi_mel_banks(
    num_bins: int, padded_window_size: int, sample_rate: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Kaldi's triangular mel banks (no VTLN), ``[num_bins, padded // 2 + 1]`` float32, with the
    zero column for the Nyquist bin already appended."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad fbank frequency range {low_freq}..{high_freq} Hz for Nyquist {nyquist} Hz")
    fft_bin_width = sample_rate / padded_window_size
    mel_low, mel_high = _kaldi_mel(low_freq), _kaldi_mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    # torchaudio computes these in float32 (int arange times python floats); follow it exactly.
    b = torch.arange(num_bins).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = _kaldi_mel(fft_bin_width * torch.arange(float(padded_window_size // 2))).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.max(torch.zeros(1), torch.min(up, down))
    return torch.nn.functional.pad(banks, (0, 1), mode="constant", value=0.0)


@lru_cache(maxsize=8)
def _povey_window(size: int) -> torch.Tensor:
    # "like hann but goes to zero at the edges": symmetric hann ** 0.85
    return torch.hann_window(size, periodic=False).pow(0.85)


@torch.no_grad()
def kaldi_fbank(
    waveform: torch.Tensor | np.ndarray,
    num_mel_bins: int = 80,
    sample_rate: float = 16000.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
) -> torch.Tensor:
    """``torchaudio.compliance.kaldi.fbank(waveform, num_mel_bins=..., dither=0,
    sample_frequency=...)`` with every other option at its default: povey window, DC offset
    removal, pre-emphasis, snip_edges, FFT size rounded up to a power of two, power spectrum,
    ``log(max(x, float eps))``. ``waveform``: ``[samples]`` or ``[1, samples]`` (float, any scale;
    upstream passes [-1, 1] audio). Returns ``[frames, num_mel_bins]`` float32 (CPU)."""
    x = (
        torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if isinstance(waveform, np.ndarray)
        else waveform
    )
    x = x.detach().to("cpu", torch.float32).contiguous()  # as_strided below assumes stride 1
    if x.dim() == 2:
        x = x[0]  # channel -1/0 of torchaudio: the first (mono) channel
    shift = int(sample_rate * frame_shift_ms * 0.001)
    size = int(sample_rate * frame_length_ms * 0.001)
    padded = 1 if size == 0 else 2 ** (size - 1).bit_length()
    if x.numel() < size:
        return torch.empty((0, num_mel_bins), dtype=torch.float32)
    num_frames = 1 + (x.numel() - size) // shift
    frames = x.as_strided((num_frames, size), (shift, 1))
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC offset per frame
    if preemphasis != 0.0:
        # x[j] -= k * x[j-1], with x[-1] := x[0] (replicate padding)
        previous = torch.nn.functional.pad(frames.unsqueeze(0), (1, 0), mode="replicate").squeeze(0)
        frames = frames - preemphasis * previous[:, :-1]
    frames = frames * _povey_window(size).unsqueeze(0)
    if padded != size:
        frames = torch.nn.functional.pad(frames, (0, padded - size))
    spectrum = torch.fft.rfft(frames).abs().pow(2.0)
    banks = _kaldi_mel_banks(num_mel_bins, padded, float(sample_rate), float(low_freq), float(high_freq))
    energies = torch.mm(spectrum, banks.T)
    return torch.max(energies, torch.tensor(_FLOAT_EPS)).log()


def campplus_features(wav16k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """CAM++ speaker-encoder input: 80-bin Kaldi fbank of 16 kHz audio, minus its time mean,
    ``[frames, 80]`` (upstream ``_extract_spk_embedding``)."""
    feat = kaldi_fbank(wav16k, num_mel_bins=80, sample_rate=16000.0)
    return feat - feat.mean(dim=0, keepdim=True)

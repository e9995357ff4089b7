"""Feature extraction parity: the flow's 22,050 Hz mel, Whisper's 128-bin log-mel (speech
tokenizer input) against upstream fixtures; the Kaldi fbank (CAM++ input) against values
recorded once from ``torchaudio.compliance.kaldi.fbank`` (torchaudio is not a dependency)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosyserve.nn.config import MelConfig
from cosyserve.nn.features import (
    MelExtractor,
    campplus_features,
    kaldi_fbank,
    slaney_mel_filterbank,
    whisper_log_mel,
)
from tests.helpers.parity import assert_close

pytestmark = pytest.mark.parity


def test_feat_mel(parity_set):
    extractor = MelExtractor(parity_set.config.mel)
    wav = parity_set.t("feat_wav")
    mel = extractor(wav)
    assert mel.shape[-1] == extractor.num_frames(wav.shape[-1])
    # measured on set A: 2.9e-6 (different CPU/FFT kernel than the recording machine)
    assert_close(parity_set, "feat_mel", mel, parity_set.t("feat_mel"), atol=1e-4)


def test_whisper_logmel128(parity_set):
    feat = whisper_log_mel(parity_set.t("whisper_wav16k"), n_mels=128)
    # measured on set A: 1.4e-5, in bins at the "max - 8" floor where float32 FFT rounding is
    # relatively largest (a float64 computation is 5e-6 away from the fixture too)
    assert_close(parity_set, "whisper_logmel128", feat, parity_set.t("whisper_logmel128"), atol=1e-4)
    # numpy input and the unbatched form agree with the batched tensor path
    np.testing.assert_array_equal(whisper_log_mel(parity_set.arrays["whisper_wav16k"]).numpy(), feat.numpy())


# ------------------------------------------------------------------ filterbanks


def test_slaney_filterbank_matches_whisper_asset():
    """Entries of whisper's mel_filters.npz (= librosa.filters.mel(sr=16000, n_fft=400,
    n_mels=128)), compared exactly; the whole matrix was checked bit-identical when written."""
    fb = slaney_mel_filterbank(16000, 400, 128)
    assert fb.shape == (128, 201) and fb.dtype == np.float32
    assert fb[0].max() == np.float32(0.012373987)
    assert fb[127].sum() == np.float32(0.024936043)
    np.testing.assert_array_equal(fb[64][fb[64] > 0][:2], np.array([0.0067496826, 0.018091518], np.float32))
    assert abs(float(fb.sum()) - 3.1909857) < 1e-5
    assert not fb.flags.writeable  # cached: nobody may modify it


def test_slaney_filterbank_matches_librosa():
    librosa = pytest.importorskip("librosa")
    for sr, n_fft, n_mels, fmin, fmax in [
        (16000, 400, 128, 0.0, None),
        (16000, 400, 80, 0.0, None),
        (22050, 1024, 80, 0.0, 8000.0),
        (24000, 1920, 80, 0.0, None),
    ]:
        ours = slaney_mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        np.testing.assert_array_equal(ours, ref)


def test_mel_extractor_shapes_and_device_cache():
    ex = MelExtractor(MelConfig())
    for n in (1024, 22050, 22050 * 3 + 17):
        out = ex(torch.zeros(n))
        assert out.shape == (80, ex.num_frames(n))
        assert torch.isfinite(out).all()  # silence hits the 1e-5 clamp, never log(0)
    batch = ex(torch.randn(2, 5000) * 0.1)
    assert batch.shape == (2, 80, ex.num_frames(5000))
    with pytest.raises(ValueError, match="too short"):
        ex(torch.zeros(100))


# ------------------------------------------------------------------ kaldi fbank (campplus)


def _fbank_signal() -> np.ndarray:
    t = np.arange(8000) / 16000.0
    x = 0.5 * np.sin(2 * np.pi * 220 * t) + 0.25 * np.sin(2 * np.pi * 1375 * t)
    return (x + 0.05 * np.sin(2 * np.pi * 5000 * t) + 0.02).astype(np.float32)


# torchaudio 2.11 kaldi.fbank(x[None], num_mel_bins=80, dither=0, sample_frequency=16000)
_REF_ROW0 = [
    -4.991852283477783,
    -3.163374662399292,
    -13.958300590515137,
    -6.146289825439453,
    -10.508610725402832,
    -15.450582504272461,
    -14.518036842346191,
    -12.24599552154541,
]
_REF_ROW_LAST = [
    -6.007806777954102,
    -3.1737961769104004,
    -13.016960144042969,
    -6.132684707641602,
    -10.534126281738281,
    -15.620030403137207,
    -14.567435264587402,
    -12.25068473815918,
]
_REF_MEAN = -9.509066084966374
_REF_CMN_ROW3 = [
    1.0588183403015137,
    0.2935190200805664,
    4.076957702636719e-05,
    -0.056593894958496094,
    0.0015878677368164062,
]


def _check(actual: np.ndarray, expected: list[float]) -> None:
    expected_arr = np.array(expected)
    # Bins far below the peak (log energy < -8) carry float32 FFT rounding of the loud bins,
    # which differs between FFT kernels; loud bins must agree tightly.
    tol = np.where(expected_arr > -8, 1e-4, 2e-2)
    assert np.all(np.abs(actual - expected_arr) <= tol), (actual, expected_arr)


def test_kaldi_fbank_reference_values():
    feat = kaldi_fbank(_fbank_signal())
    assert feat.shape == (48, 80) and feat.dtype == torch.float32  # 1 + (8000 - 400) // 160 frames
    _check(feat[0, ::10].numpy(), _REF_ROW0)
    _check(feat[-1, ::10].numpy(), _REF_ROW_LAST)
    assert abs(float(feat.double().mean()) - _REF_MEAN) < 1e-3
    cmn = campplus_features(_fbank_signal())
    assert abs(cmn.mean(dim=0)).max() < 1e-5
    np.testing.assert_allclose(cmn[3, ::16].numpy(), _REF_CMN_ROW3, atol=2e-4)
    # [1, n] input (upstream's layout) and tensor input give the same result
    torch.testing.assert_close(kaldi_fbank(torch.from_numpy(_fbank_signal())[None]), feat, rtol=0, atol=0)
    assert kaldi_fbank(np.zeros(300, np.float32)).shape == (0, 80)  # shorter than one frame


def test_kaldi_fbank_matches_torchaudio():
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    rng = np.random.default_rng(0)
    for wav in (_fbank_signal(), (0.3 * rng.standard_normal(24321)).astype(np.float32)):
        ref = kaldi.fbank(torch.from_numpy(wav)[None], num_mel_bins=80, dither=0, sample_frequency=16000)
        torch.testing.assert_close(kaldi_fbank(wav), ref, rtol=0, atol=1e-5)

"""CosyVoice3's vocoder: `CausalHiFTGenerator` (HiFT with causal convolutions) at 24 kHz.

mel ``[1, 80, T]`` -> f0 ``[1, T]`` (`CausalConvRNNF0Predictor`, run in float64 as upstream) ->
excitation ``[1, 1, 480 T]`` (SineGen2, causal variant) -> ``decode(mel, source)`` -> waveform.

* Every convolution is causal (zero padding on the left) except two right look-aheads: the f0
  predictor's first convolution (3 frames) and ``conv_pre`` (``conv_pre_look_right`` = 4 frames).
  ``finalize=True`` pads those with zeros (end of the utterance); ``finalize=False`` uses the last
  frames of the input as look-ahead only, and the output stops 8 frames before the input's end
  (3 + 4 look-ahead frames, and the last frame's iSTFT overlap).
* Source (causal SineGen2): per frame, the harmonic phase increments ``(f0 h / sr) % 1`` are
  accumulated over frames (``cumsum``, CPU: double accumulator), times ``2 pi * 480``; the sine is
  then held for the frame's 480 samples (nearest upsampling of the phase). Noise is a fixed
  construction-time buffer of uniform values indexed by absolute sample position, so identical
  calls give identical audio (see :mod:`cosyserve.families.cosyvoice3.noise`).
* Decode: as HiFT (upsampling by nearest repeat + causal conv, source branch from the STFT of the
  source, Snake residual blocks, iSTFT head), all causal.

:class:`StreamingVocoder` vocodes a growing mel exactly as upstream's streaming (which re-runs the
whole accumulated mel each chunk and yields the new tail) but runs only the new frames plus the
receptive field of the decoder (:func:`decoder_context_frames`), keeping f0 and phase state.

Weights: ``hift.pt`` stores weight-normalised convolutions; they are folded into plain weights at
load time (:func:`convert_causal_hift_state_dict`), the f0 predictor's in float64 as upstream
computes them there.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosyserve.errors import ModelDirectoryError
from cosyserve.families.cosyvoice3.config import CONFIG_FILE, CausalHiFTConfig
from cosyserve.families.cosyvoice3.noise import HiFTNoise
from cosyserve.nn.checkpoint import detach_from_checkpoint, load_into, read_checkpoint, skip_random_init
from cosyserve.nn.hift import (
    Snake,
    WNConv1d,
    _periodic_hann,
    convert_hift_state_dict,
    fast_weight,
    split_weight_norm,
    to_fast_layout,
    to_legacy_weight_norm_state_dict,
)

logger = logging.getLogger(__name__)

_F0_PREFIX = "f0_predictor."


# --------------------------------------------------------------------------------- convolutions
def causal_conv(conv: nn.Conv1d, x: Tensor, left: int) -> Tensor:
    """``conv`` (built with padding 0) over ``x`` left-padded with ``left`` zeros.

    ``x`` is ``[B, C, T]`` (eager reference: explicit pad, as upstream) or the fast layout
    ``[B, C, 1, T]`` channels-last (see :mod:`cosyserve.nn.hift`): there the convolution pads
    both sides and the surplus outputs at the end are cut, which for batch 1 is a contiguous
    prefix, so no padded copy of the activations is made.
    """
    stride, dilation = conv.stride[0], conv.dilation[0]
    if x.dim() == 3:
        return F.conv1d(F.pad(x, (left, 0)), conv.weight, conv.bias, stride, 0, dilation)
    frames = x.shape[-1]
    out = F.conv2d(
        x, fast_weight(conv), conv.bias, stride=(1, stride), padding=(0, left), dilation=(1, dilation)
    )
    kernel_span = dilation * (conv.kernel_size[0] - 1) + 1
    return out[..., : (frames + left - kernel_span) // stride + 1]


def _upsample(x: Tensor, rate: int) -> Tensor:
    """Nearest-neighbour upsampling of the time axis (``nn.Upsample(scale_factor=rate)``)."""
    scale = float(rate) if x.dim() == 3 else (1.0, float(rate))
    return F.interpolate(x, scale_factor=scale, mode="nearest")


def upsampling_as_transposed(weight: Tensor, rate: int) -> Tensor:
    """The weight ``[in, out, k + rate - 1]`` of a transposed convolution (stride ``rate``) equal to
    nearest upsampling by ``rate`` followed by the causal convolution ``weight`` ``[out, in, k]``.

    Upsampled by repetition, each input step feeds ``rate`` consecutive positions, so output ``m``
    receives input ``i`` through the taps ``j`` with ``i rate <= m - (k - 1) + j < (i + 1) rate``:
    tap ``d = m - i rate`` of the transposed kernel is the sum of ``weight[j]`` over
    ``k - 1 - d <= j < k - 1 - d + rate``. The same products then cost ``(k + rate - 1) / rate``
    multiply-adds per output step instead of ``k`` (CosyVoice3: 2.9 vs 16, 3 vs 11, 3 vs 7)."""
    k = weight.shape[-1]
    prefix = F.pad(weight.double().cumsum(-1), (1, 0))  # prefix[..., n] = sum of weight[..., :n]
    d = torch.arange(k + rate - 1, device=weight.device)
    lo = (k - 1 - d).clamp(min=0)
    hi = (k - 1 - d + rate).clamp(max=k)
    return (prefix[..., hi] - prefix[..., lo]).transpose(0, 1).to(weight.dtype)


class CausalResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations and causal convolutions: for each dilation d,
    ``x += conv2(snake2(conv1_d(snake1(x))))`` with left padding ``(k - 1) d`` and ``k - 1``."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.kernel_size = kernel_size
        self.dilations = tuple(dilations)
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d) for d in self.dilations
        )
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel_size) for _ in self.dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in self.dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in self.dilations)

    @property
    def left_context(self) -> int:
        """Input steps before an output step that it depends on."""
        return sum((self.kernel_size - 1) * (d + 1) for d in self.dilations)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        for d, act1, conv1, act2, conv2 in zip(
            self.dilations, self.activations1, self.convs1, self.activations2, self.convs2
        ):
            x = causal_conv(conv2, act2(causal_conv(conv1, act1(x), (k - 1) * d)), k - 1).add_(x)
        return x


class CausalConvRNNF0Predictor(nn.Module):
    """``condnet``: weight-norm Conv1d k=4 looking 3 frames ahead -> ELU -> 4 x [causal Conv1d
    k=3 -> ELU]; then ``|Linear|`` per frame: mel -> f0 in Hz. Run in float64 (upstream casts
    the module and the mel on every call)."""

    def __init__(self, in_channels: int, cond_channels: int, num_class: int = 1, look_right: int = 3):
        super().__init__()
        self.look_right = look_right
        layers: list[nn.Module] = [WNConv1d(in_channels, cond_channels, look_right + 1), nn.ELU()]
        for _ in range(4):
            layers += [WNConv1d(cond_channels, cond_channels, 3), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    @property
    def left_context(self) -> int:
        """Frames before an output frame that it depends on."""
        return sum(m.kernel_size[0] - 1 for m in list(self.condnet)[2::2])

    def forward(self, mel: Tensor, finalize: bool = True) -> Tensor:
        """mel ``[B, 80, T]`` -> f0 ``[B, T]`` (finalize) or ``[B, T - 3]`` (the last 3 frames
        are look-ahead only), in the module's dtype."""
        x = mel.to(self.classifier.weight.dtype)
        if finalize:
            x = F.pad(x, (0, self.look_right))
        convs = list(self.condnet)[0::2]
        x = F.elu(F.conv1d(x, convs[0].weight, convs[0].bias))
        for conv in convs[1:]:
            x = F.elu(F.conv1d(F.pad(x, (conv.kernel_size[0] - 1, 0)), conv.weight, conv.bias))
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))


class SourceModule(nn.Module):
    """Merges the 9 harmonic/noise channels into one excitation: ``tanh(Linear(9 -> 1))``."""

    def __init__(self, n_harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(n_harmonics, 1)

    def forward(self, sine_waves: Tensor) -> Tensor:
        """``[B, L, 9]`` -> ``[B, 1, L]``."""
        return torch.tanh(self.l_linear(sine_waves)).transpose(1, 2)


# --------------------------------------------------------------------------------- the generator
class CausalHiFTGenerator(nn.Module):
    """The CosyVoice3 vocoder (state-dict compatible with upstream after
    :func:`convert_causal_hift_state_dict`)."""

    def __init__(self, cfg: CausalHiFTConfig | None = None):
        super().__init__()
        cfg = cfg or CausalHiFTConfig()
        self.cfg = cfg
        self.n_harmonics = cfg.nb_harmonics + 1
        self.n_fft = cfg.istft_n_fft
        self.hop = cfg.istft_hop_len
        self.samples_per_frame = cfg.samples_per_frame
        self.stft_per_frame = self.samples_per_frame // self.hop  # conv_post frames per mel frame
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = len(cfg.upsample_rates)
        self.look_right = cfg.conv_pre_look_right
        base = cfg.base_channels

        self.f0_predictor = CausalConvRNNF0Predictor(
            cfg.f0_predictor.in_channels,
            cfg.f0_predictor.cond_channels,
            cfg.f0_predictor.num_class,
            cfg.f0_look_right,
        ).double()
        self.m_source = SourceModule(self.n_harmonics)
        self.conv_pre = WNConv1d(cfg.in_channels, base, self.look_right + 1)
        self.ups = nn.ModuleList(
            WNConv1d(base // 2**i, base // 2 ** (i + 1), k) for i, k in enumerate(cfg.upsample_kernel_sizes)
        )
        # Source branch: the source's STFT brought to each upsampling stage's frame rate.
        down_rates = [1, *list(cfg.upsample_rates)[::-1][:-1]]
        cum_rates = [int(r) for r in np.cumprod(down_rates)[::-1]]
        self.source_strides = cum_rates
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(cum_rates, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)
        ):
            ch = base // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1))
            else:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, u * 2, u))
            self.source_resblocks.append(CausalResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(CausalResBlock(ch, k, tuple(d)))
        self.conv_post = WNConv1d(ch, self.n_fft + 2, 7)
        self.register_buffer("stft_window", _periodic_hann(self.n_fft), persistent=False)
        # Channels-last convolutions; False = eager reference layout (upstream's operations).
        self.fast = True
        # Fast path: the upsampling stages as transposed convolutions, by stage (key: the source
        # weight's storage, device and dtype).
        self._transposed: dict[int, tuple[tuple[int, torch.device, torch.dtype], Tensor]] = {}

    # ----------------------------------------------------------------------------- f0
    @torch.inference_mode()
    def predict_f0(self, mel: Tensor, finalize: bool = True) -> Tensor:
        """f0 ``[B, T]`` (``[B, T - 3]`` unless finalize) in float64, as upstream computes it."""
        if self.f0_predictor.classifier.weight.dtype != torch.float64:
            # Upstream casts the predictor to float64 on every call; a module-wide .to(dtype)
            # must not leave it in another precision.
            logger.warning(
                "f0 predictor was cast to %s; back to float64", self.f0_predictor.classifier.weight.dtype
            )
            self.f0_predictor.double()
        return self.f0_predictor(mel, finalize)

    # ----------------------------------------------------------------------------- source
    def frame_sines(self, f0: Tensor, rand_ini: Tensor | None = None) -> Tensor:
        """Per-frame harmonic sines ``[B, T, 9]`` (times ``nsf_alpha``) from frame f0 ``[B, T]``.

        The phase accumulates over every frame of ``f0`` (from the utterance's first frame).
        ``rand_ini`` is accepted for fidelity and has no effect: upstream adds it to sample 0 of
        the per-sample phase increments, which the linear downsampling by 480 never reads.
        """
        cfg = self.cfg
        harmonics = torch.arange(1, self.n_harmonics + 1, dtype=torch.float32, device=f0.device)
        # (f0 h / sr) % 1 at sample rate is constant within a frame, and the downsampling reads
        # two equal samples with weight 1/2 each: exactly the frame value.
        rad = (f0.float()[:, :, None] * harmonics / cfg.sampling_rate) % 1
        del rand_ini
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        return torch.sin(phase * self.samples_per_frame) * cfg.nsf_alpha

    def source_from_f0(
        self, f0: Tensor, noise: HiFTNoise, first_frame: int = 0, sines: Tensor | None = None
    ) -> Tensor:
        """Excitation ``[B, 1, 480 (T - first_frame)]`` for frames ``first_frame ..`` of ``f0``
        ``[B, T]`` (all frames from the utterance start: the phase integrates over them).

        Same float32 operations as upstream per sample: ``sine * uv + amp * noise`` with
        ``amp = uv * sigma + (1 - uv) * alpha / 3`` and ``noise`` the buffer at the samples'
        absolute positions, then ``tanh(l_linear(.))``.
        """
        cfg = self.cfg
        n = self.samples_per_frame
        if sines is None:
            sines = self.frame_sines(f0, noise.rand_ini)
        f0 = f0.float()[:, first_frame:]
        sines = sines[:, first_frame:]
        uv = (f0 > cfg.nsf_voiced_threshold).float()[:, :, None]  # [B, T, 1]
        amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        start, stop = first_frame * n, (first_frame + f0.shape[1]) * n
        uniform = noise.sine_waves(start, stop).to(f0.device)  # [L, 9]
        voiced = (sines * uv).repeat_interleave(n, dim=1)  # [B, L, 9]
        mixed = voiced + amp.repeat_interleave(n, dim=1) * uniform
        return self.m_source(mixed)

    def source_reference(self, f0: Tensor, noise: HiFTNoise) -> Tensor:
        """The source exactly as upstream computes it (at sample rate, ``F.interpolate`` down and
        up): the eager reference for :meth:`source_from_f0` (tests)."""
        cfg = self.cfg
        n = self.samples_per_frame
        f0_up = F.interpolate(f0.float()[:, None], scale_factor=float(n), mode="nearest").transpose(1, 2)
        harmonics = torch.arange(1, self.n_harmonics + 1, dtype=torch.float32, device=f0.device)
        rad = (f0_up * harmonics / cfg.sampling_rate) % 1
        rad[:, 0, :] = rad[:, 0, :] + noise.rand_ini.to(rad.device)
        rad = F.interpolate(rad.transpose(1, 2), scale_factor=1 / n, mode="linear").transpose(1, 2)
        phase = torch.cumsum(rad, dim=1) * 2 * np.pi
        phase = F.interpolate(phase.transpose(1, 2) * n, scale_factor=float(n), mode="nearest").transpose(
            1, 2
        )
        sines = torch.sin(phase) * cfg.nsf_alpha
        uv = (f0_up > cfg.nsf_voiced_threshold).float()
        amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        mixed = sines * uv + amp * noise.sine_waves(0, sines.shape[1]).to(f0.device)[None]
        return self.m_source(mixed)

    # ----------------------------------------------------------------------------- decode
    def _stft(self, source: Tensor) -> Tensor:
        spec = torch.stft(
            source.squeeze(1), self.n_fft, self.hop, self.n_fft, window=self.stft_window, return_complex=True
        )
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: Tensor, phase: Tensor) -> Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop, self.n_fft, window=self.stft_window)

    def prepare_fast_path(self) -> None:
        """Re-lay the decoder's conv weights out for the fast path now (at load time) rather than
        inside the first synthesis."""
        if not self.fast:
            return
        for name, module in self.named_modules():
            # (the upsampling stages run on their transposed weights there)
            if isinstance(module, nn.Conv1d) and not name.startswith(("f0_predictor", "ups.")):
                fast_weight(module)
        for i in range(self.num_upsamples):
            self._transposed_weight(i)

    def decode_conv_post(
        self, mel: Tensor, source: Tensor, finalize: bool = True, fast: bool | None = None
    ) -> Tensor:
        """Everything up to ``conv_post``: ``[B, n_fft + 2, frames]`` (log-magnitude, phase).

        mel ``[B, 80, T]``, source ``[B, 1, 480 T]``. ``finalize=False``: the last
        ``conv_pre_look_right`` mel frames are look-ahead only and their source STFT frames are
        dropped (output for ``T - look_right`` frames).
        """
        fast = self.fast if fast is None else fast
        s_stft = self._stft(source)
        x = mel
        if finalize:
            x = F.pad(x, (0, self.look_right))
        else:
            s_stft = s_stft[:, :, : -self.stft_per_frame * self.look_right]
        if fast:
            x, s_stft = to_fast_layout(x), to_fast_layout(s_stft)
        x = causal_conv(self.conv_pre, x, 0)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.cfg.lrelu_slope)
            x = self.upsample_stage(i, x, fast)
            if i == self.num_upsamples - 1:
                x = torch.cat([x[..., 1:2], x], dim=-1)  # ReflectionPad1d((1, 0))
            down = self.source_downs[i]
            si = causal_conv(down, s_stft, down.stride[0] - 1)
            x = self.source_resblocks[i](si).add_(x)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs += self.resblocks[i * self.num_kernels + j](x)
            x = xs.div_(self.num_kernels)
        x = F.leaky_relu(x)  # default slope 0.01 here, as upstream
        x = causal_conv(self.conv_post, x, self.conv_post.kernel_size[0] - 1)
        return x.squeeze(2) if fast else x

    def upsample_stage(self, i: int, x: Tensor, fast: bool) -> Tensor:
        """Upsampling stage ``i``: nearest upsampling then a causal convolution (upstream), or on
        the fast path the equal transposed convolution (:func:`upsampling_as_transposed`)."""
        ups, rate = self.ups[i], self.cfg.upsample_rates[i]
        if not fast:
            return causal_conv(ups, _upsample(x, rate), ups.kernel_size[0] - 1)
        out = F.conv_transpose2d(x, self._transposed_weight(i), ups.bias, stride=(1, rate))
        return out[..., : x.shape[-1] * rate]  # a contiguous prefix in channels-last, batch 1

    def _transposed_weight(self, i: int) -> Tensor:
        """Stage ``i``'s transposed weight ``[in, out, 1, k + rate - 1]`` channels-last, made from
        the current ``ups[i].weight`` (again if that tensor was replaced)."""
        weight = self.ups[i].weight
        cached = self._transposed.get(i)
        if cached is None or cached[0] != (weight.data_ptr(), weight.device, weight.dtype):
            t = upsampling_as_transposed(weight.detach(), self.cfg.upsample_rates[i])
            t = t.unsqueeze(2).contiguous(memory_format=torch.channels_last)
            cached = self._transposed[i] = ((weight.data_ptr(), weight.device, weight.dtype), t)
        return cached[1]

    def decode(self, mel: Tensor, source: Tensor, finalize: bool = True, fast: bool | None = None) -> Tensor:
        """mel ``[B, 80, T]`` + source ``[B, 1, 480 T]`` -> waveform ``[B, 480 T]`` (finalize) or
        ``[B, 480 (T - look_right - 1)]``."""
        x = self.decode_conv_post(mel, source, finalize, fast)
        n_mag = self.n_fft // 2 + 1
        speech = self._istft(torch.exp(x[:, :n_mag, :]), torch.sin(x[:, n_mag:, :]))
        if not finalize:
            speech = speech[:, : -self.samples_per_frame]
        return torch.clamp(speech, -self.cfg.audio_limit, self.cfg.audio_limit)

    # ----------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def inference(self, mel: Tensor, noise: HiFTNoise, finalize: bool = True) -> tuple[Tensor, Tensor]:
        """Upstream's ``inference(speech_feat, finalize)``: mel ``[B, 80, T]`` -> (speech, source).

        finalize: speech ``[B, 480 T]``; otherwise the last 3 frames are the f0 look-ahead, then
        the last 4 of the rest ``conv_pre``'s, and speech is ``[B, 480 (T - 8)]``.
        """
        f0 = self.predict_f0(mel, finalize).float()
        source = self.source_from_f0(f0, noise)
        if not finalize:
            mel = mel[:, :, : -self.f0_predictor.look_right]
        return self.decode(mel, source, finalize), source

    @property
    def held_back_frames(self) -> int:
        """Frames at the end of a non-final call's input that it gives no samples for (8)."""
        return self.f0_predictor.look_right + self.look_right + 1

    def decoder_context_frames(self) -> int:
        """Mel frames before a sample that the decoder reads (an upper bound): how much left
        context :class:`StreamingVocoder` re-runs so that new samples equal a whole re-synthesis.

        Sum over the path back from the output: iSTFT and ``conv_post``; per stage the residual
        blocks, the upsampling convolution (and its nearest repeat), the reflection pad; the
        largest source branch (its residual blocks, strided downsampling, the source STFT)."""
        rate = 1
        stage_rates = []
        for r in self.cfg.upsample_rates:
            rate *= r
            stage_rates.append(rate)
        final_rate = stage_rates[-1]  # conv_post frames per mel frame
        reach = (self.n_fft // self.hop + self.conv_post.kernel_size[0]) / final_rate
        branch = 0.0
        for i, r in enumerate(stage_rates):
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            reach += max(b.left_context for b in blocks) / r
            reach += self.ups[i].kernel_size[0] / r + 1 / (stage_rates[i - 1] if i else 1)
            down = self.source_downs[i]
            source = self.source_resblocks[i].left_context / r
            source += down.kernel_size[0] / final_rate + self.n_fft / self.samples_per_frame
            branch = max(branch, source)
        reach += 1 / final_rate + branch
        return math.ceil(reach) + 1


# --------------------------------------------------------------------------------- streaming
class StreamingVocoder:
    """Vocodes a mel that grows chunk by chunk, with upstream's streaming semantics.

    Upstream calls ``hift.inference(all_mel_so_far, finalize)`` every chunk and yields the samples
    beyond those already yielded: ``480 (M - 8)`` in total after a non-final chunk of ``M``
    accumulated frames, ``480 M`` after the final one. The network is causal, so here each call
    runs only frames ``[s - C, M)`` (``s`` = first frame not yet released, ``C`` =
    :meth:`CausalHiFTGenerator.decoder_context_frames`), with the f0 of earlier frames cached
    (f0 frame i needs frames i-8 .. i+3) and the phase integrated from the first frame. The
    released samples equal upstream's up to float rounding of the shorter convolutions.
    """

    def __init__(self, hift: CausalHiFTGenerator, noise: HiFTNoise, context_frames: int | None = None):
        self.hift = hift
        self.noise = noise
        self.context = hift.decoder_context_frames() if context_frames is None else context_frames
        self.look_f0 = hift.f0_predictor.look_right
        self.f0_context = hift.f0_predictor.left_context
        self.n = hift.samples_per_frame
        self._mel: Tensor | None = None
        self._mel_start = 0
        self._frames = 0  # accumulated mel frames
        self._f0: Tensor | None = None  # exact f0 of frames [0, _f0.shape[1])
        self.samples_out = 0
        self.finished = False

    @property
    def frames(self) -> int:
        return self._frames

    def _append(self, mel: Tensor) -> None:
        self._mel = mel if self._mel is None else torch.cat([self._mel, mel], dim=2)
        self._frames += mel.shape[2]

    def _update_f0(self, finalize: bool) -> Tensor:
        """f0 of every frame that has its look-ahead (all frames when finalize), float32."""
        assert self._mel is not None
        done = 0 if self._f0 is None else self._f0.shape[1]
        first = max(done - self.f0_context, self._mel_start)  # recompute from here (left context)
        window = self._mel[:, :, first - self._mel_start :]
        f0 = self.hift.predict_f0(window, finalize).float()[:, done - first :]
        self._f0 = f0 if self._f0 is None else torch.cat([self._f0, f0], dim=1)
        return self._f0

    @torch.inference_mode()
    def push(self, mel: Tensor | None, finalize: bool = False) -> Tensor:
        """Append mel frames ``[B, 80, n]``; returns the newly released samples ``[B, m]``
        (possibly none: a non-final call releases nothing until 8 frames beyond the last are in)."""
        if self.finished:
            raise RuntimeError("the vocoder stream is already finished")
        if mel is not None and mel.shape[2] > 0:
            self._append(mel)
        if self._mel is None:
            self.finished = finalize
            return torch.zeros(1, 0)
        total = self._frames
        end = total if finalize else total - self.hift.held_back_frames  # frames released after
        first_new = self.samples_out // self.n
        if end <= first_new:
            if finalize:
                self.finished = True
            return self._mel.new_zeros(self._mel.shape[0], 0)
        f0 = self._update_f0(finalize)
        start = max(first_new - self.context, self._mel_start)
        sines = self.hift.frame_sines(f0)
        decode_end = total if finalize else total - self.look_f0  # decoder input frames
        source = self.hift.source_from_f0(f0[:, :decode_end], self.noise, start, sines[:, :decode_end])
        mel_window = self._mel[:, :, start - self._mel_start : decode_end - self._mel_start]
        speech = self.hift.decode(mel_window, source, finalize)
        out = speech[:, self.samples_out - start * self.n : (end - start) * self.n]
        self.samples_out = end * self.n
        self.finished = finalize
        # Keep what the next call reads: decoder context before its first new frame and the
        # f0 predictor's left context before its first uncomputed frame.
        keep_from = max(min(end - self.context, self._f0.shape[1] - self.f0_context), self._mel_start)
        self._mel = self._mel[:, :, keep_from - self._mel_start :]
        self._mel_start = keep_from
        return out


# --------------------------------------------------------------------------------- state dicts
def _fold_float64(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Fold weight norm in float64 (upstream runs the f0 predictor, parametrization included, in
    float64); other tensors are cast to float64."""
    plain, pairs = split_weight_norm(sd)
    out = {key: value.double() for key, value in plain.items()}
    for prefix, (g, v) in pairs.items():
        out[f"{prefix}.weight"] = torch._weight_norm(v.double(), g.double(), 0)
    return out


def convert_causal_hift_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint (legacy ``weight_g``/``weight_v`` or ``parametrizations`` names, optional
    ``generator.`` prefix) -> runtime state dict with plain weights (f0 predictor in float64)."""
    sd = {(k[len("generator.") :] if k.startswith("generator.") else k): v for k, v in state_dict.items()}
    f0 = {k: v for k, v in sd.items() if k.startswith(_F0_PREFIX)}
    rest = convert_hift_state_dict({k: v for k, v in sd.items() if not k.startswith(_F0_PREFIX)})
    rest.update(_fold_float64(f0))
    return rest


def to_legacy_state_dict(module: CausalHiFTGenerator) -> dict[str, Tensor]:
    """Runtime module -> official-format state dict (``weight_g``/``weight_v``, float32)."""
    return {k: v.float() for k, v in to_legacy_weight_norm_state_dict(module).items()}


def load_causal_hift(
    state_dict: Mapping[str, Tensor],
    cfg: CausalHiFTConfig | None = None,
    device: str | torch.device = "cpu",
) -> CausalHiFTGenerator:
    """Build a :class:`CausalHiFTGenerator` and load a checkpoint state dict (any key style), strict."""
    model = CausalHiFTGenerator(cfg)
    model.load_state_dict(convert_causal_hift_state_dict(state_dict), strict=True)
    return model.to(device).eval()


def load_causal_hift_file(
    path: str | os.PathLike[str], cfg: CausalHiFTConfig, device: str | torch.device = "cpu"
) -> CausalHiFTGenerator:
    """Build the vocoder and load ``hift.pt`` strictly (weight norm folded, f0 predictor in
    float64). Raises ModelDirectoryError naming the file."""
    path = Path(path)
    try:
        state_dict = convert_causal_hift_state_dict(read_checkpoint(path))
    except KeyError as exc:
        raise ModelDirectoryError(f"{path}: {exc.args[0]}") from exc
    with skip_random_init():
        model = CausalHiFTGenerator(cfg)
    load_into(model, state_dict, path, config_name=CONFIG_FILE)
    del state_dict
    # As for HiFT: the folding read every weight_v page; copying the few adopted tensors unmaps the
    # checkpoint instead of leaving its ~80 MB resident.
    detach_from_checkpoint(model)
    model.to(device).eval()
    model.prepare_fast_path()
    return model

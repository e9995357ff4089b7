"""HiFT vocoder of CosyVoice: neural source filter + iSTFT head (HiFTNet).

mel ``[1, 80, T]`` -> f0 ``[1, T]`` (ConvRNNF0Predictor) -> harmonic-plus-noise excitation
``[1, 1, hop T]`` -> ``decode(mel, source)`` -> waveform ``[1, hop T]``, where ``hop`` is the
product of the upsampling rates and the iSTFT hop. One generator, configured from the yaml, serves

* CosyVoice v1: 22,050 Hz, upsampling [8, 8] (256 samples per frame), the "type 1" sine source
  (upstream's SineGen, the phase integrated sample by sample: :func:`sine_type1`);
* CosyVoice2: 24,000 Hz, upsampling [8, 5, 3] (480 samples per frame), the "type 2" sine source
  (upstream's SineGen2: the phase increments are linearly down-sampled to the frame rate,
  integrated there and linearly up-sampled back: :func:`sine_type2`),

as upstream picks the source by the sampling rate.

Checkpoints store weight-normalised convolutions (legacy ``weight_g``/``weight_v`` or the newer
``parametrizations.weight.original0/1``). :func:`convert_hift_state_dict` folds them into plain
``weight`` tensors at load time, so the runtime module carries no weight-norm machinery;
:func:`to_legacy_weight_norm_state_dict` writes them back in the official format.

Randomness (initial harmonic phases, additive noise) is either injected or drawn from a
per-request :class:`torch.Generator`; the global RNG is never touched.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cosyserve.errors import ModelDirectoryError
from cosyserve.nn.checkpoint import detach_from_checkpoint, load_into, read_checkpoint, skip_random_init
from cosyserve.nn.config import F0PredictorConfig, HiFTConfig

logger = logging.getLogger(__name__)

_SNAKE_CHUNK_ELEMS = 256 * 1024  # 1 MiB of float32 per slice: two slices fit in L2
_LEGACY_G, _LEGACY_V = ".weight_g", ".weight_v"
_PARAM_G, _PARAM_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


def _conv(conv: nn.Conv1d | nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1-D (transposed) convolution to ``[B, C, T]`` or to the fast layout
    ``[B, C, 1, T]`` in channels-last memory, where oneDNN runs the dilated kernels several
    times faster (no per-call layout reorders of the activations)."""
    if x.dim() == 3:
        return conv(x)
    w = fast_weight(conv)
    if isinstance(conv, nn.ConvTranspose1d):
        return F.conv_transpose2d(
            x,
            w,
            conv.bias,
            stride=(1, conv.stride[0]),
            padding=(0, conv.padding[0]),
            dilation=(1, conv.dilation[0]),
        )
    return F.conv2d(
        x,
        w,
        conv.bias,
        stride=(1, conv.stride[0]),
        padding=(0, conv.padding[0]),
        dilation=(1, conv.dilation[0]),
    )


def fast_weight(conv: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in, 1, k]`` channels-last.

    The first call re-lays the parameter itself out (same ``[out, in, k]`` shape and values, other
    strides), so the fast path keeps no second copy of the ~70 MB conv weights."""
    weight = conv.weight
    w = weight.unsqueeze(2)
    if w.is_contiguous(memory_format=torch.channels_last) or (
        torch.is_grad_enabled() and weight.requires_grad
    ):
        return w  # already laid out, or training: leave the autograd parameter alone
    # Outside inference mode, so the parameter stays a normal tensor when called from inference.
    with torch.inference_mode(False), torch.no_grad():
        weight.data = weight.data.unsqueeze(2).contiguous(memory_format=torch.channels_last).squeeze(2)
    return conv.weight.unsqueeze(2)


def to_fast_layout(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


class WNConv1d(nn.Conv1d):
    """A Conv1d that is weight-normalised in checkpoints (plain ``weight`` at run time)."""


class WNConvTranspose1d(nn.ConvTranspose1d):
    """A ConvTranspose1d that is weight-normalised in checkpoints (norm over dim 0 = input)."""


class Snake(nn.Module):
    """``x + 1/(alpha + 1e-9) * sin(alpha x)^2`` with a per-channel linear-scale alpha."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.view(1, -1, *([1] * (x.dim() - 2)))
        inv_alpha = 1.0 / (alpha + 1e-9)
        if torch.is_grad_enabled():
            return x + inv_alpha * torch.sin(x * alpha).pow(2)
        # Same float32 operations as above (x*a, sin, square, *inv, +x), done in place on
        # time slices of about 1 MiB: the five passes then stay in cache instead of streaming
        # the vocoder's largest tensors through memory five times.
        out = torch.empty_like(x)
        # One slice on accelerators: there, every extra slice is another kernel launch.
        step = max(256, _SNAKE_CHUNK_ELEMS // x.shape[1]) if x.device.type == "cpu" else x.shape[-1]
        for start in range(0, x.shape[-1], step):
            xs, t = x[..., start : start + step], out[..., start : start + step]
            torch.mul(xs, alpha, out=t)
            t.sin_().square_().mul_(inv_alpha).add_(xs)
        return out


class ResBlock(nn.Module):
    """HiFi-GAN residual block with Snake activations: for each dilation d,
    ``x += conv2(snake2(conv1_d(snake1(x))))``."""

    def __init__(self, channels: int, kernel_size: int, dilations: Iterable[int]):
        super().__init__()
        dilations = list(dilations)
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for act1, conv1, act2, conv2 in zip(self.activations1, self.convs1, self.activations2, self.convs2):
            x = _conv(conv2, act2(_conv(conv1, act1(x)))).add_(x)
        return x


class ConvRNNF0Predictor(nn.Module):
    """5 x (weight-norm Conv1d k3 -> ELU), then ``|Linear|`` per frame: mel -> f0 in Hz."""

    def __init__(self, cfg: F0PredictorConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [
                WNConv1d(cfg.in_channels if i == 0 else cfg.cond_channels, cfg.cond_channels, 3, padding=1),
                nn.ELU(),
            ]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cfg.cond_channels, cfg.num_class)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.condnet(mel).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


class SourceModule(nn.Module):
    """Merges the harmonics of the sine source into one excitation: ``tanh(Linear(H+1 -> 1))``."""

    def __init__(self, n_harmonics: int):
        super().__init__()
        self.l_linear = nn.Linear(n_harmonics, 1)

    def forward(self, sine_waves: torch.Tensor) -> torch.Tensor:
        # sine_waves [1, H+1, L] -> [1, 1, L]
        return torch.tanh(self.l_linear(sine_waves.transpose(1, 2))).transpose(1, 2)


def sine_type1(
    f_mat: torch.Tensor, phase: torch.Tensor, sampling_rate: int, amplitude: float
) -> torch.Tensor:
    """Upstream SineGen (v1): ``amplitude * sin(2 pi (cumsum(f / sr) % 1) + phase)`` per sample.

    f_mat ``[1, H, L]`` harmonic frequencies in Hz; phase ``[1, H, 1]`` in radians."""
    theta = 2 * np.pi * (torch.cumsum(f_mat / sampling_rate, dim=-1) % 1)
    return amplitude * torch.sin(theta + phase)


def sine_type2(
    f_mat: torch.Tensor, phase: torch.Tensor, sampling_rate: int, upsample: int, amplitude: float
) -> torch.Tensor:
    """Upstream SineGen2 (CosyVoice2): the per-sample phase increments ``(f / sr) % 1`` (cycles),
    the initial phases added to the first sample only, are linearly down-sampled by ``upsample``
    to the frame rate, integrated there (``cumsum * 2 pi``), scaled back by ``upsample`` and
    linearly up-sampled to the sample rate; ``amplitude * sin`` of that.

    f_mat ``[1, H, L]`` in Hz; phase ``[1, H, 1]`` in cycles. Same interpolation arguments as
    upstream (``scale_factor`` 1/upsample and upsample, not sizes: they set the sample grid).
    As upstream, the initial phases change nothing: the down-sampling interpolates between the
    two samples in the middle of each frame, so it never reads sample 0.
    """
    rad = (f_mat / sampling_rate) % 1
    rad[:, :, :1] += phase
    rad = F.interpolate(rad, scale_factor=1 / upsample, mode="linear")
    theta = torch.cumsum(rad, dim=-1) * 2 * np.pi
    theta = F.interpolate(theta * upsample, scale_factor=upsample, mode="linear")
    return torch.sin(theta) * amplitude


def _periodic_hann(n: int) -> torch.Tensor:
    # Computed in float64 like scipy.signal.get_window("hann", n, fftbins=True), then float32.
    fac = np.linspace(-np.pi, np.pi, n + 1)[:-1]
    return torch.from_numpy((0.5 + 0.5 * np.cos(fac)).astype(np.float32))


class HiFTGenerator(nn.Module):
    """The CosyVoice v1 HiFT vocoder (state-dict compatible with upstream after
    :func:`convert_hift_state_dict`)."""

    def __init__(self, cfg: HiFTConfig | None = None):
        super().__init__()
        cfg = cfg or HiFTConfig()
        self.cfg = cfg
        # Upstream's rule: the v1 rate uses the type-1 sine source, every other rate type 2.
        self.sine_type = 1 if cfg.sampling_rate == 22050 else 2
        self.n_harmonics = cfg.nb_harmonics + 1
        self.n_fft = cfg.istft_n_fft
        self.hop = cfg.istft_hop_len
        self.upsample_factor = int(np.prod(cfg.upsample_rates)) * cfg.istft_hop_len
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.num_upsamples = len(cfg.upsample_rates)
        base = cfg.base_channels

        self.f0_predictor = ConvRNNF0Predictor(cfg.f0_predictor)
        self.m_source = SourceModule(self.n_harmonics)
        self.conv_pre = WNConv1d(cfg.in_channels, base, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(base // 2**i, base // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        # Source branch: downsample the source STFT to each upsampling stage's frame rate.
        down_rates = [1, *list(cfg.upsample_rates)[::-1][:-1]]
        cum_rates = np.cumprod(down_rates)[::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(
            zip(cum_rates, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)
        ):
            ch = base // 2 ** (i + 1)
            u = int(u)
            if u == 1:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1))
            else:
                self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList()
        for i in range(self.num_upsamples):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d))
        self.conv_post = WNConv1d(ch, self.n_fft + 2, 7, padding=3)
        self.register_buffer("stft_window", _periodic_hann(self.n_fft), persistent=False)
        # Channels-last convolutions (see _conv); False = eager reference layout.
        self.fast = True

    # ----------------------------------------------------------------------------- source
    def draw_noise(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial phases ``[1, H, 1]`` (fundamental at 0) and standard-normal ``sine_noise``
        ``[1, H, num_samples]``, from ``generator`` (a fresh one if None).

        The phases are in the unit of the sine source: radians ~ U(-pi, pi) for type 1 (v1),
        cycles ~ U[0, 1) for type 2 (upstream SineGen2's ``rand_ini``)."""
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        # Drawn where the generator lives (a CPU generator may serve a GPU model), then moved.
        gdev, device = generator.device, self.stft_window.device
        phase = torch.rand(1, self.n_harmonics, 1, generator=generator, device=gdev)
        if self.sine_type == 1:
            phase = phase * (2 * math.pi) - math.pi
        phase[:, 0, :] = 0
        noise = torch.randn(1, self.n_harmonics, num_samples, generator=generator, device=gdev)
        return phase.to(device), noise.to(device)

    def upsample_f0(self, f0: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour upsampling of ``[1, T]`` frame f0 to ``[1, 1, T * 256]`` samples."""
        return f0[:, None, :].repeat_interleave(self.upsample_factor, dim=-1)

    def source_from_f0(
        self, f0: torch.Tensor, phase: torch.Tensor, sine_noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Harmonic-plus-noise excitation ``[1, 1, L]`` and voiced flag ``[1, L, 1]`` from frame f0.

        ``phase`` ``[1, H, 1]`` and ``sine_noise`` ``[1, H, L]`` as :meth:`draw_noise` makes them.
        The float32 operation order is upstream's (see :func:`sine_type1` / :func:`sine_type2`):
        the phase integration accumulates any rounding difference.
        """
        cfg = self.cfg
        f0_up = self.upsample_f0(f0)  # [1, 1, L]
        harmonics = torch.arange(1, self.n_harmonics + 1, dtype=f0_up.dtype, device=f0_up.device)
        f_mat = f0_up * harmonics[None, :, None]  # [1, H, L] Hz
        if self.sine_type == 1:
            sine = sine_type1(f_mat, phase, cfg.sampling_rate, cfg.nsf_alpha)
        else:
            sine = sine_type2(f_mat, phase, cfg.sampling_rate, self.upsample_factor, cfg.nsf_alpha)
        uv = (f0_up > cfg.nsf_voiced_threshold).to(f0_up.dtype)
        noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
        sine = sine * uv + noise_amp * sine_noise
        return self.m_source(sine), uv.transpose(1, 2)

    # ----------------------------------------------------------------------------- decode
    def _stft(self, source: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(
            source.squeeze(1), self.n_fft, self.hop, self.n_fft, window=self.stft_window, return_complex=True
        )
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop, self.n_fft, window=self.stft_window)

    def prepare_fast_path(self) -> None:
        """Re-lay the decode stack's conv weights out for the fast path now, at load time, rather
        than inside the first synthesis (where the replaced layouts would add to its memory peak)."""
        if not self.fast:
            return
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)) and not name.startswith("f0_predictor"):
                fast_weight(module)

    def decode_conv_post(
        self, mel: torch.Tensor, source: torch.Tensor, fast: bool | None = None
    ) -> torch.Tensor:
        """Everything up to conv_post: ``[1, n_fft + 2, L / hop + 1]`` (log-magnitude, phase).

        ``fast`` (default: ``self.fast``) runs the convolutions in the channels-last layout;
        ``fast=False`` is the plain eager reference path (same operations as upstream).
        """
        fast = self.fast if fast is None else fast
        s_stft = self._stft(source)
        x = mel
        if fast:
            x, s_stft = to_fast_layout(x), to_fast_layout(s_stft)
        x = _conv(self.conv_pre, x)
        for i in range(self.num_upsamples):
            x = F.leaky_relu(x, self.cfg.lrelu_slope)
            x = _conv(self.ups[i], x)
            if i == self.num_upsamples - 1:
                x = torch.cat([x[..., 1:2], x], dim=-1)  # reflection pad of one sample on the left
            x = self.source_resblocks[i](_conv(self.source_downs[i], s_stft)).add_(x)
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs += self.resblocks[i * self.num_kernels + j](x)
            x = xs.div_(self.num_kernels)
        x = F.leaky_relu(x)  # default slope 0.01 here, as upstream
        x = _conv(self.conv_post, x)
        return x.squeeze(2) if fast else x

    def decode(self, mel: torch.Tensor, source: torch.Tensor, fast: bool | None = None) -> torch.Tensor:
        """mel ``[1, 80, T]`` + source ``[1, 1, 256 T]`` -> waveform ``[1, 256 T]``."""
        x = self.decode_conv_post(mel, source, fast)
        n_mag = self.n_fft // 2 + 1
        speech = self._istft(torch.exp(x[:, :n_mag, :]), torch.sin(x[:, n_mag:, :]))
        return torch.clamp(speech, -self.cfg.audio_limit, self.cfg.audio_limit)

    # ----------------------------------------------------------------------------- inference
    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        phase: torch.Tensor | None = None,
        sine_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel ``[1, 80, T]`` -> (speech ``[1, L]``, source ``[1, 1, L]``), L = 256 T.

        ``phase`` ``[1, H, 1]`` and ``sine_noise`` ``[1, H, L]`` are used when given, otherwise
        drawn from ``generator``. ``cache_source`` replaces the head of the source (streaming:
        keeps the excitation continuous across chunks).
        """
        f0 = self.f0_predictor(mel)
        num_samples = f0.shape[-1] * self.upsample_factor
        if phase is None or sine_noise is None:
            drawn_phase, drawn_noise = self.draw_noise(num_samples, generator)
            phase = drawn_phase if phase is None else phase
            sine_noise = drawn_noise if sine_noise is None else sine_noise
        source, _ = self.source_from_f0(f0, phase, sine_noise)
        if cache_source is not None and cache_source.shape[-1] > 0:
            source[:, :, : cache_source.shape[-1]] = cache_source
        return self.decode(mel, source), source


# --------------------------------------------------------------------------------- state dicts
def _weight_norm_names(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if isinstance(m, (WNConv1d, WNConvTranspose1d))]


def convert_hift_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint -> runtime state dict: strips a leading ``generator.`` and folds weight norm
    (legacy ``weight_g``/``weight_v`` or ``parametrizations.weight.original0/1``) into ``weight``.

    Folding uses ``torch._weight_norm(v, g, 0)``, the kernel both torch weight-norm APIs call, so
    the result is bit-identical to upstream's effective weights (a hand-written ``g * v / |v|``
    differs in the last bit, which the source phase integration would amplify).
    """
    sd = {(k[len("generator.") :] if k.startswith("generator.") else k): v for k, v in state_dict.items()}
    out, pairs = split_weight_norm(sd)
    for prefix, (g, v) in pairs.items():
        out[f"{prefix}.weight"] = torch._weight_norm(v.float(), g.float(), 0)
    return out


def split_weight_norm(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A state dict's plain tensors (in order) and its weight-norm ``(g, v)`` pairs by module
    prefix (legacy ``weight_g``/``weight_v`` or ``parametrizations`` names); KeyError for a pair
    with one half missing."""
    plain: dict[str, torch.Tensor] = {}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for g_suffix, v_suffix in ((_LEGACY_G, _LEGACY_V), (_PARAM_G, _PARAM_V)):
            if key.endswith(g_suffix):
                halves.setdefault(key[: -len(g_suffix)], {})["g"] = value
                break
            if key.endswith(v_suffix):
                halves.setdefault(key[: -len(v_suffix)], {})["v"] = value
                break
        else:
            plain[key] = value
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for prefix, gv in halves.items():
        if set(gv) != {"g", "v"}:
            raise KeyError(f"weight-norm pair incomplete for {prefix!r}: have {sorted(gv)}")
        pairs[prefix] = (gv["g"], gv["v"])
    return plain, pairs


def to_legacy_weight_norm_state_dict(module: HiFTGenerator) -> dict[str, torch.Tensor]:
    """Runtime module -> official-format state dict (``weight_g``/``weight_v`` names).

    ``v = weight`` and ``g = |weight|`` (norm over every dim but 0), so folding gives back
    ``weight`` up to float rounding.
    """
    wn = set(_weight_norm_names(module))
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "weight" and prefix in wn:
            w = value.detach().clone()
            out[prefix + _LEGACY_G] = torch.norm_except_dim(w, 2, 0)
            out[prefix + _LEGACY_V] = w
        else:
            out[key] = value.detach().clone()
    return out


def load_hift(
    state_dict: Mapping[str, torch.Tensor], cfg: HiFTConfig | None = None, device: str | torch.device = "cpu"
) -> HiFTGenerator:
    """Build a :class:`HiFTGenerator` and load a checkpoint state dict (any key style), strict."""
    model = HiFTGenerator(cfg)
    model.load_state_dict(convert_hift_state_dict(state_dict), strict=True)
    return model.to(device).eval()


def load_hift_file(
    path: str | os.PathLike[str],
    cfg: HiFTConfig,
    device: str | torch.device = "cpu",
    config_name: str = "the model config",
) -> HiFTGenerator:
    """Build the vocoder and load ``hift.pt``: memory-mapped, weight norm folded, strict (a
    :class:`ModelDirectoryError` naming the file otherwise); eval mode on ``device``."""
    path = Path(path)
    try:
        # Strips `generator.` and folds weight norm (weight_g/weight_v or parametrizations.*).
        state_dict = convert_hift_state_dict(read_checkpoint(path))
    except (KeyError, RuntimeError) as exc:
        raise ModelDirectoryError(f"{path}: broken weight-norm tensors: {exc}") from exc
    with skip_random_init():
        model = HiFTGenerator(cfg)
    load_into(model, state_dict, path, " (after folding weight_g/weight_v)", config_name)
    del state_dict
    # Folding made new tensors for most weights; copy the rest too, so the checkpoint (whose
    # weight_v pages the folding read) is unmapped instead of staying resident.
    detach_from_checkpoint(model)
    if torch.device(device).type == "cpu":
        model.prepare_fast_path()
    return model.to(device).eval()

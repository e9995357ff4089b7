"""Typed architecture configuration of a CosyVoice v1 model directory.

These dataclasses are what the networks are built from. They are filled from `cosyvoice.yaml`
by :mod:`cosyserve.nn.yaml_reader` (which never executes anything named in the file); the
defaults are the published CosyVoice-300M-SFT sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncoderConfig:
    """A WeNet-style encoder stack with relative-position self-attention.

    Used three times: the LLM's text encoder (Conformer, SiLU FFN, causal), the LLM itself
    (Transformer, ReLU FFN, `linear_legacy` input layer, causal) and the flow encoder
    (Conformer, SiLU FFN, full attention).
    """

    input_size: int = 512
    output_size: int = 1024
    attention_heads: int = 16
    linear_units: int = 4096
    num_blocks: int = 6
    input_layer: str = "linear"  # "linear" | "linear_legacy" (adds a ReLU after the LayerNorm)
    activation: str = "swish"  # FFN activation: "swish" (Conformer) | "relu" (Transformer)
    # Norm names of the block: "conformer" -> norm_mha/norm_ff, "transformer" -> norm1/norm2.
    block_type: str = "conformer"
    causal: bool = False  # static_chunk_size == 1: lower-triangular attention mask
    pos_enc_max_len: int = 5000


@dataclass
class SamplingConfig:
    top_p: float = 0.8
    top_k: int = 25
    win_size: int = 10
    tau_r: float = 0.1


@dataclass
class EstimatorConfig:
    """The flow-matching U-Net (ConditionalDecoder)."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256, 256)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"


@dataclass
class CFMConfig:
    inference_cfg_rate: float = 0.7
    t_scheduler: str = "cosine"
    solver: str = "euler"
    n_timesteps: int = 10
    temperature: float = 1.0


@dataclass
class F0PredictorConfig:
    num_class: int = 1
    in_channels: int = 80
    cond_channels: int = 512


@dataclass
class HiFTConfig:
    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 22050
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 8)
    upsample_kernel_sizes: tuple[int, ...] = (16, 16)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_predictor: F0PredictorConfig = field(default_factory=F0PredictorConfig)


@dataclass
class MelConfig:
    """The 22,050 Hz mel extractor (`feat_extractor`) used for prompt features."""

    n_fft: int = 1024
    num_mels: int = 80
    sampling_rate: int = 22050
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0
    center: bool = False

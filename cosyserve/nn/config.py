"""Typed configuration of the networks the CosyVoice families share, and the mapping of their
yaml nodes.

These dataclasses are what the shared networks are built from. They are filled from a model
directory's yaml (`cosyvoice.yaml`, `cosyvoice2.yaml`, ...) by :mod:`cosyserve.nn.yaml_reader`
(which never executes anything named in the file); the defaults are the published
CosyVoice-300M-SFT sizes. The ``map_*`` functions at the end turn the yaml nodes that every family
writes the same way (flow-matching parameters, U-Net estimator, HiFT, mel extractor) into them;
each family maps the rest of its file itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from cosyserve.nn.yaml_reader import MISSING, ConfigContext, ConfigNode, Tagged

logger = logging.getLogger(__name__)


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
class CausalEstimatorConfig(EstimatorConfig):
    """The chunk-aware U-Net (CausalConditionalDecoder, CosyVoice2): causal convolutions, and in
    streaming calls block-causal attention over chunks of `static_chunk_size` frames."""

    channels: tuple[int, ...] = (256,)
    static_chunk_size: int = 50  # frames; 0 = full attention even when streaming
    # Read for completeness only: upstream's forward always attends to every left chunk.
    num_decoding_left_chunks: int = -1


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
    """The mel extractor (`feat_extractor`) of prompt features; the defaults are v1's (22,050 Hz)."""

    n_fft: int = 1024
    num_mels: int = 80
    sampling_rate: int = 22050
    hop_size: int = 256
    win_size: int = 1024
    fmin: float = 0.0
    fmax: float = 8000.0
    center: bool = False


# --------------------------------------------------------------------------------------------
# Mapping of the yaml nodes every family writes the same way
# --------------------------------------------------------------------------------------------

HIFT_GENERATOR = "cosyvoice.hifigan.generator.HiFTGenerator"
CONV_RNN_F0_PREDICTOR = "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"
MEL_SPECTROGRAM = "matcha.utils.audio.mel_spectrogram"
DICT_CONFIGS = ("omegaconf.DictConfig", "omegaconf.OmegaConf.create")


def map_cfm_params(ctx: ConfigContext, value: Any) -> dict[str, Any]:
    """The `cfm_params` mapping of a flow decoder (`!new:omegaconf.DictConfig {content: {...}}`
    upstream; a plain mapping is accepted too)."""
    if isinstance(value, Tagged) and value.target in DICT_CONFIGS:
        content = value.kwargs.get("content", value.args[0] if value.args else {})
        if isinstance(content, dict):
            return content
    if isinstance(value, dict):
        return value
    ctx.fail(f"'flow.decoder.cfm_params' must be a mapping or !new:omegaconf.DictConfig, got {value!r}")
    raise AssertionError  # unreachable; fail() raises


def map_cfm_config(ctx: ConfigContext, decoder: ConfigNode) -> CFMConfig:
    """Solver settings from a `flow.decoder` node (ConditionalCFM or CausalConditionalCFM)."""
    decoder.require("n_spks", decoder.int("n_spks", 1), (1,))
    params = ConfigNode(
        ctx,
        f"{decoder.key}.cfm_params",
        Tagged("new", "dict", kwargs=map_cfm_params(ctx, decoder.kwargs.get("cfm_params", MISSING))),
    )
    solver = params.str("solver", "euler")
    params.require("solver", solver, ("euler",))
    t_scheduler = params.str("t_scheduler", "cosine")
    params.require("t_scheduler", t_scheduler, ("cosine", "linear"))
    return CFMConfig(
        inference_cfg_rate=params.float("inference_cfg_rate"),
        t_scheduler=t_scheduler,
        solver=solver,
    )


def map_estimator_config(est: ConfigNode) -> EstimatorConfig:
    """A `flow.decoder.estimator` node (ConditionalDecoder or CausalConditionalDecoder): the
    U-Net fields both share, with upstream's constructor defaults."""
    act_fn = est.str("act_fn", "snake")
    est.require("act_fn", act_fn, ("gelu",))
    return EstimatorConfig(
        in_channels=est.int("in_channels"),
        out_channels=est.int("out_channels"),
        channels=est.ints("channels", (256, 256)),
        attention_head_dim=est.int("attention_head_dim", 64),
        n_blocks=est.int("n_blocks", 1),
        num_mid_blocks=est.int("num_mid_blocks", 2),
        num_heads=est.int("num_heads", 4),
        act_fn=act_fn,
    )


def map_hift_config(ctx: ConfigContext, value: Any) -> HiFTConfig:
    """The `hift` node (HiFTGenerator at any sampling rate: 22,050 Hz means SineGen, others SineGen2)."""
    node = ctx.node("hift", value, (HIFT_GENERATOR,))
    istft = node.kwargs.get("istft_params", {"n_fft": 16, "hop_len": 4})
    if not isinstance(istft, dict):
        ctx.fail(f"'hift.istft_params' must be a mapping with n_fft and hop_len, got {istft!r}")
    istft_node = ConfigNode(ctx, "hift.istft_params", Tagged("new", "dict", kwargs=istft))
    f0 = node.child("f0_predictor", (CONV_RNN_F0_PREDICTOR,))
    cfg = HiFTConfig(**hift_fields(node, istft_node), f0_predictor=map_f0_predictor_config(f0))
    check_hift_stages(ctx, cfg)
    if cfg.sampling_rate <= 0:
        ctx.fail(f"'hift.sampling_rate' must be positive, got {cfg.sampling_rate}")
    return cfg


def hift_fields(node: ConfigNode, istft: ConfigNode) -> dict[str, Any]:
    """The :class:`HiFTConfig` fields but `f0_predictor`, read from a `hift` node and its
    `istft_params` node, with upstream's constructor defaults (HiFT and the causal HiFT alike)."""
    return dict(
        in_channels=node.int("in_channels", 80),
        base_channels=node.int("base_channels", 512),
        nb_harmonics=node.int("nb_harmonics", 8),
        sampling_rate=node.int("sampling_rate", 22050),
        nsf_alpha=node.float("nsf_alpha", 0.1),
        nsf_sigma=node.float("nsf_sigma", 0.003),
        nsf_voiced_threshold=node.float("nsf_voiced_threshold", 10.0),
        upsample_rates=node.ints("upsample_rates", (8, 8)),
        upsample_kernel_sizes=node.ints("upsample_kernel_sizes", (16, 16)),
        istft_n_fft=istft.int("n_fft"),
        istft_hop_len=istft.int("hop_len"),
        resblock_kernel_sizes=node.ints("resblock_kernel_sizes", (3, 7, 11)),
        resblock_dilation_sizes=node.int_lists("resblock_dilation_sizes", ((1, 3, 5), (1, 3, 5), (1, 3, 5))),
        source_resblock_kernel_sizes=node.ints("source_resblock_kernel_sizes", (7, 11)),
        source_resblock_dilation_sizes=node.int_lists(
            "source_resblock_dilation_sizes", ((1, 3, 5), (1, 3, 5))
        ),
        lrelu_slope=node.float("lrelu_slope", 0.1),
        audio_limit=node.float("audio_limit", 0.99),
    )


def map_f0_predictor_config(f0: ConfigNode) -> F0PredictorConfig:
    """A `hift.f0_predictor` node (ConvRNNF0Predictor or its causal variant)."""
    return F0PredictorConfig(
        num_class=f0.int("num_class", 1),
        in_channels=f0.int("in_channels", 80),
        cond_channels=f0.int("cond_channels", 512),
    )


def check_hift_stages(ctx: ConfigContext, cfg: HiFTConfig) -> None:
    """Fail unless the HiFT's per-stage lists agree in length."""
    if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
        ctx.fail("'hift.upsample_rates' and 'hift.upsample_kernel_sizes' differ in length")
    if len(cfg.resblock_kernel_sizes) != len(cfg.resblock_dilation_sizes):
        ctx.fail("'hift.resblock_kernel_sizes' and 'hift.resblock_dilation_sizes' differ in length")
    if len(cfg.source_resblock_kernel_sizes) != len(cfg.source_resblock_dilation_sizes):
        ctx.fail(
            "'hift.source_resblock_kernel_sizes' and 'hift.source_resblock_dilation_sizes' differ in length"
        )
    if len(cfg.source_resblock_kernel_sizes) != len(cfg.upsample_rates):
        ctx.fail("'hift.source_resblock_kernel_sizes' needs one entry per upsample stage")


def map_mel_config(ctx: ConfigContext, value: Any, default: MelConfig, family: str) -> MelConfig:
    """The `feat_extractor` node (matcha's mel_spectrogram); `default` (logged) when the file has none."""
    if value is MISSING:
        logger.warning("%s: no 'feat_extractor'; using the %s mel defaults", ctx.source, family)
        return default
    node = ctx.node("feat_extractor", value, (MEL_SPECTROGRAM,), ("name",))
    return MelConfig(
        n_fft=node.int("n_fft"),
        num_mels=node.int("num_mels"),
        sampling_rate=node.int("sampling_rate"),
        hop_size=node.int("hop_size"),
        win_size=node.int("win_size"),
        fmin=node.float("fmin"),
        fmax=node.float("fmax"),
        center=node.bool("center", False),
    )

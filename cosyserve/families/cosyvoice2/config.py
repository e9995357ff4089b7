"""CosyVoice2's configuration: typed configs of its audio networks (the chunk-aware flow, HiFT at
24 kHz, the prompt mel extractor) mapped from a parsed `cosyvoice2.yaml` (see
:mod:`cosyserve.nn.yaml_reader`; nothing named in the file is executed).

The blocks every family writes the same way (flow-matching parameters, U-Net estimator, HiFT,
mel extractor) are mapped by the shared ``map_*`` functions of :mod:`cosyserve.nn.config`; this
module maps what is CosyVoice2's own (`CausalMaskedDiffWithXvec`, `UpsampleConformerEncoder`,
`CausalConditionalDecoder`) and checks that the parts agree with each other.

The LLM (`Qwen2LM` over a Qwen2 backbone whose dimensions live in `CosyVoice-BlankEN/config.json`)
is mapped by :func:`cosyserve.families.cosyvoice2.llm.qwen2_lm_config`: :func:`load_model_config`
reads both files of a model directory into one :class:`CosyVoice2Config`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosyserve.families.cosyvoice2.llm import Qwen2LMConfig, load_backbone_config, qwen2_lm_config
from cosyserve.nn.config import (
    CausalEstimatorConfig,
    CFMConfig,
    EncoderConfig,
    HiFTConfig,
    MelConfig,
    map_cfm_config,
    map_estimator_config,
    map_hift_config,
    map_mel_config,
)
from cosyserve.nn.qwen2 import Qwen2Config
from cosyserve.nn.yaml_reader import MISSING, ConfigContext, ConfigNode, Tagged, load_yaml_tree

logger = logging.getLogger(__name__)

CONFIG_FILE = "cosyvoice2.yaml"

CAUSAL_MASKED_DIFF_WITH_XVEC = "cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
UPSAMPLE_CONFORMER_ENCODER = "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder"
CAUSAL_CONDITIONAL_CFM = "cosyvoice.flow.flow_matching.CausalConditionalCFM"
CAUSAL_CONDITIONAL_DECODER = "cosyvoice.flow.decoder.CausalConditionalDecoder"

# What upstream's UpsampleConformerEncoder builds whatever the yaml says.
UP_STRIDE = 2  # the nearest x2 up-layer (token rate -> mel frame rate)
NUM_UP_BLOCKS = 4  # conformer blocks after the up-layer
ENCODER_LOOKAHEAD = 3  # tokens the pre-lookahead layer reads ahead
FIXED_NOISE_CHANNELS = 80  # upstream's CausalConditionalCFM.rand_noise is [1, 80, 15000]


@dataclass
class UpsampleEncoderConfig(EncoderConfig):
    """`UpsampleConformerEncoder`: embed -> pre-lookahead -> `num_blocks` conformer blocks -> x2
    up-layer -> up_embed -> `num_up_blocks` blocks -> after_norm. Streaming calls attend
    block-causally over `static_chunk_size` tokens (x `up_stride` frames after the up-layer)."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    static_chunk_size: int = 25  # tokens; 0 = full attention even when streaming
    pre_lookahead_len: int = ENCODER_LOOKAHEAD
    up_stride: int = UP_STRIDE
    num_up_blocks: int = NUM_UP_BLOCKS


@dataclass
class CausalFlowConfig:
    """`CausalMaskedDiffWithXvec`: 25 Hz speech tokens -> 50 Hz mel (`token_mel_ratio` frames per token)."""

    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3  # the last tokens of a non-final streaming call are context only
    encoder: UpsampleEncoderConfig = field(default_factory=UpsampleEncoderConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)
    estimator: CausalEstimatorConfig = field(
        default_factory=lambda: CausalEstimatorConfig(
            channels=(256,), n_blocks=4, num_mid_blocks=12, num_heads=8, attention_head_dim=64
        )
    )


def _hift_24k() -> HiFTConfig:
    return HiFTConfig(
        sampling_rate=24000,
        upsample_rates=(8, 5, 3),
        upsample_kernel_sizes=(16, 11, 7),
        source_resblock_kernel_sizes=(7, 7, 11),
        source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
    )


def _mel_24k() -> MelConfig:
    return MelConfig(n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920)


@dataclass
class CosyVoice2Config:
    """Everything inference needs from `cosyvoice2.yaml` (defaults: the published CosyVoice2-0.5B)."""

    family: str = "cosyvoice2"
    sample_rate: int = 24000
    flow: CausalFlowConfig = field(default_factory=CausalFlowConfig)
    hift: HiFTConfig = field(default_factory=_hift_24k)
    mel: MelConfig = field(default_factory=_mel_24k)
    # The yaml's `llm` node with the backbone's `CosyVoice-BlankEN/config.json`; None only for a
    # yaml mapped without its backbone config (config_from_tree without `backbone`).
    llm: Qwen2LMConfig | None = None
    # The rest of the inference keys, parsed but unmapped (the text side maps them).
    get_tokenizer: Any = None
    allowed_special: Any = "all"


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------


def _upsample_encoder_config(node: ConfigNode) -> UpsampleEncoderConfig:
    # Upstream constructor defaults (cosyvoice/transformer/upsample_encoder.py) where the file is silent.
    input_layer = node.str("input_layer", "conv2d")
    node.require("input_layer", input_layer, ("linear",))
    node.require("pos_enc_layer_type", node.str("pos_enc_layer_type", "rel_pos"), ("rel_pos_espnet",))
    node.require(
        "selfattention_layer_type", node.str("selfattention_layer_type", "rel_selfattn"), ("rel_selfattn",)
    )
    activation = node.str("activation_type", "swish")
    node.require("activation_type", activation, ("swish",))
    node.require("normalize_before", node.bool("normalize_before", True), (True,))
    node.require("key_bias", node.bool("key_bias", True), (True,))
    node.require("global_cmvn", node.kwargs.get("global_cmvn"), (None,))
    node.require("macaron_style", node.bool("macaron_style", True), (False,))
    node.require("use_cnn_module", node.bool("use_cnn_module", True), (False,))
    # use_dynamic_chunk randomises the attention chunk per call: training only.
    node.require("use_dynamic_chunk", node.bool("use_dynamic_chunk", False), (False,))
    chunk = node.int("static_chunk_size", 0)
    if chunk < 0:
        node.ctx.fail(f"'{node.key}.static_chunk_size' must be >= 0, got {chunk}")

    input_size = node.int("input_size")
    output_size = node.int("output_size", 256)
    heads = node.int("attention_heads", 4)
    if heads <= 0 or output_size % heads:
        node.ctx.fail(f"'{node.key}': output_size {output_size} is not divisible by attention_heads {heads}")
    # The up-layer's output goes through `up_embed`, a Linear(input_size -> output_size).
    if input_size != output_size:
        node.ctx.fail(
            f"'{node.key}': input_size ({input_size}) must equal output_size ({output_size}) "
            "(the up-sampled encoder output is embedded again with the input layer's shape)"
        )
    return UpsampleEncoderConfig(
        input_size=input_size,
        output_size=output_size,
        attention_heads=heads,
        linear_units=node.int("linear_units", 2048),
        num_blocks=node.int("num_blocks", 6),
        input_layer=input_layer,
        activation=activation,
        block_type="conformer",
        causal=False,
        static_chunk_size=chunk,
    )


def _flow_config(ctx: ConfigContext, value: Any) -> CausalFlowConfig:
    node = ctx.node("flow", value, (CAUSAL_MASKED_DIFF_WITH_XVEC,))
    node.require("output_type", node.str("output_type", "mel"), ("mel",))
    encoder = _upsample_encoder_config(node.child("encoder", (UPSAMPLE_CONFORMER_ENCODER,)))

    decoder = node.child("decoder", (CAUSAL_CONDITIONAL_CFM,))
    cfm = map_cfm_config(ctx, decoder)
    if cfm.t_scheduler != "cosine":
        ctx.fail(
            f"'flow.decoder.cfm_params.t_scheduler' = {cfm.t_scheduler!r} is not supported (supported: 'cosine')"
        )
    est = decoder.child("estimator", (CAUSAL_CONDITIONAL_DECODER,))
    shared = map_estimator_config(est)
    chunk = est.int("static_chunk_size", 50)
    if chunk < 0:
        ctx.fail(f"'flow.decoder.estimator.static_chunk_size' must be >= 0, got {chunk}")
    estimator = CausalEstimatorConfig(
        **{f: getattr(shared, f) for f in shared.__dataclass_fields__},
        static_chunk_size=chunk,
        num_decoding_left_chunks=est.int("num_decoding_left_chunks", 2),
    )

    cfg = CausalFlowConfig(
        input_size=node.int("input_size", 512),
        output_size=node.int("output_size", 80),
        spk_embed_dim=node.int("spk_embed_dim", 192),
        vocab_size=node.int("vocab_size", 4096),
        input_frame_rate=node.int("input_frame_rate", 50),
        token_mel_ratio=node.int("token_mel_ratio", 2),
        pre_lookahead_len=node.int("pre_lookahead_len", 3),
        encoder=encoder,
        cfm=cfm,
        estimator=estimator,
    )
    if encoder.input_size != cfg.input_size:
        ctx.fail(f"'flow.encoder.input_size' ({encoder.input_size}) != 'flow.input_size' ({cfg.input_size})")
    # The encoder's up-layer makes exactly `up_stride` frames per token and its lookahead layer reads
    # exactly 3 tokens ahead (both hard-coded upstream); the flow's own settings must say the same.
    if cfg.token_mel_ratio != encoder.up_stride:
        ctx.fail(
            f"'flow.token_mel_ratio' = {cfg.token_mel_ratio} is not supported: the up-sampling encoder "
            f"makes {encoder.up_stride} mel frames per token"
        )
    if cfg.pre_lookahead_len != encoder.pre_lookahead_len:
        ctx.fail(
            f"'flow.pre_lookahead_len' = {cfg.pre_lookahead_len} is not supported: the encoder's "
            f"pre-lookahead layer reads {encoder.pre_lookahead_len} tokens ahead"
        )
    if cfg.output_size != FIXED_NOISE_CHANNELS:
        ctx.fail(
            f"'flow.output_size' = {cfg.output_size} is not supported: the flow's fixed noise has "
            f"{FIXED_NOISE_CHANNELS} mel bins"
        )
    if cfg.input_frame_rate <= 0:
        ctx.fail(f"'flow.input_frame_rate' must be positive, got {cfg.input_frame_rate}")
    # x, mu, spks and cond are stacked on the channel axis of the estimator.
    if estimator.in_channels != 4 * cfg.output_size or estimator.out_channels != cfg.output_size:
        ctx.fail(
            f"'flow.decoder.estimator' in/out channels ({estimator.in_channels}/{estimator.out_channels}) "
            f"do not match flow.output_size {cfg.output_size} (expected {4 * cfg.output_size}/{cfg.output_size})"
        )
    return cfg


def config_from_tree(
    tree: dict[str, Any], source: str = "<string>", backbone: Qwen2Config | None = None
) -> CosyVoice2Config:
    """Map a parsed (inert) `cosyvoice2.yaml` tree into :class:`CosyVoice2Config` (the LLM too when
    the backbone's config is given)."""
    ctx = ConfigContext(source)
    flow = _flow_config(ctx, tree.get("flow", MISSING))
    hift = map_hift_config(ctx, tree.get("hift", MISSING))

    top = ConfigNode(ctx, "<top level>", Tagged("new", "top", kwargs=tree))
    sample_rate = top.int("sample_rate", hift.sampling_rate)
    if sample_rate != hift.sampling_rate:
        ctx.fail(f"'sample_rate' ({sample_rate}) != 'hift.sampling_rate' ({hift.sampling_rate})")
    if flow.output_size != hift.in_channels:
        ctx.fail(f"'flow.output_size' ({flow.output_size}) != 'hift.in_channels' ({hift.in_channels})")
    for key, flow_key, want in (
        ("token_frame_rate", "flow.input_frame_rate", flow.input_frame_rate),
        ("token_mel_ratio", "flow.token_mel_ratio", flow.token_mel_ratio),
    ):
        if key in tree and top.int(key) != want:
            ctx.fail(f"'{key}' ({top.int(key)}) != '{flow_key}' ({want})")
    mel = map_mel_config(ctx, tree.get("feat_extractor", MISSING), _mel_24k(), "CosyVoice2")
    # One mel frame of the flow is one HiFT frame: hop sizes and frame rates must agree.
    hift_hop = hift.istft_hop_len
    for rate in hift.upsample_rates:
        hift_hop *= rate
    if mel.sampling_rate != sample_rate or mel.hop_size != hift_hop:
        ctx.fail(
            f"'feat_extractor' ({mel.sampling_rate} Hz, hop {mel.hop_size}) does not match the vocoder "
            f"({sample_rate} Hz, {hift_hop} samples per mel frame)"
        )
    if flow.input_frame_rate * flow.token_mel_ratio * mel.hop_size != sample_rate:
        ctx.fail(
            f"'flow.input_frame_rate' ({flow.input_frame_rate} Hz) x token_mel_ratio ({flow.token_mel_ratio}) "
            f"is not the mel frame rate ({sample_rate} / {mel.hop_size} Hz)"
        )
    return CosyVoice2Config(
        family="cosyvoice2",
        sample_rate=sample_rate,
        flow=flow,
        hift=hift,
        mel=mel,
        llm=qwen2_lm_config(tree, backbone, source) if backbone is not None else None,
        get_tokenizer=tree.get("get_tokenizer"),
        allowed_special=tree.get("allowed_special", "all"),
    )


def load_model_config(model_dir: str | os.PathLike[str]) -> CosyVoice2Config:
    """Read a model directory's `cosyvoice2.yaml` (or that file, given directly) and the backbone's
    `CosyVoice-BlankEN/config.json` beside it, without executing anything. Raises
    :class:`~cosyserve.errors.ModelConfigError` naming the file and the key for unreadable files,
    unknown classes under the inference keys and unsupported options."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / CONFIG_FILE
    tree = load_yaml_tree(path)
    return config_from_tree(tree, str(path), load_backbone_config(path.parent))

"""CosyVoice v1's configuration: the typed configs of its networks and the mapping of a parsed
`cosyvoice.yaml` into them (see :mod:`cosyserve.nn.yaml_reader` for the safe reader)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from cosyserve.families import detect_from_tree
from cosyserve.nn.config import (
    CFMConfig,
    EncoderConfig,
    EstimatorConfig,
    HiFTConfig,
    MelConfig,
    SamplingConfig,
    map_cfm_config,
    map_estimator_config,
    map_hift_config,
    map_mel_config,
)
from cosyserve.nn.yaml_reader import (
    MISSING,
    ConfigContext,
    ConfigNode,
    Tagged,
    load_yaml_tree,
    parse_yaml_tree,
)

logger = logging.getLogger(__name__)


@dataclass
class LLMConfig:
    text_encoder_input_size: int = 512
    llm_input_size: int = 1024
    llm_output_size: int = 1024
    text_token_size: int = 51866
    speech_token_size: int = 4096
    spk_embed_dim: int = 192
    text_encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(
            input_size=512,
            output_size=1024,
            attention_heads=16,
            linear_units=4096,
            num_blocks=6,
            input_layer="linear",
            activation="swish",
            block_type="conformer",
            causal=True,
        )
    )
    llm: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(
            input_size=1024,
            output_size=1024,
            attention_heads=16,
            linear_units=4096,
            num_blocks=14,
            input_layer="linear_legacy",
            activation="relu",
            block_type="transformer",
            causal=True,
        )
    )
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Decoding length limits relative to the number of TTS text tokens.
    min_token_text_ratio: float = 2.0
    max_token_text_ratio: float = 20.0


@dataclass
class LengthRegulatorConfig:
    channels: int = 80
    sampling_ratios: tuple[int, ...] = (1, 1, 1, 1)


@dataclass
class FlowConfig:
    input_size: int = 512
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 4096
    input_frame_rate: int = 50
    encoder: EncoderConfig = field(
        default_factory=lambda: EncoderConfig(
            input_size=512,
            output_size=512,
            attention_heads=8,
            linear_units=2048,
            num_blocks=6,
            input_layer="linear",
            activation="swish",
            block_type="conformer",
            causal=False,
        )
    )
    length_regulator: LengthRegulatorConfig = field(default_factory=LengthRegulatorConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)


@dataclass
class TokenizerConfig:
    multilingual: bool = True
    num_languages: int = 100
    language: str = "en"
    task: str = "transcribe"
    allowed_special: str = "all"


@dataclass
class ModelConfig:
    """Everything inference needs from `cosyvoice.yaml`."""

    family: str = "cosyvoice1"
    sample_rate: int = 22050
    llm: LLMConfig = field(default_factory=LLMConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    mel: MelConfig = field(default_factory=MelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


# --------------------------------------------------------------------------------------------
# Family detection
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# Mapping into the typed configs
# --------------------------------------------------------------------------------------------

TRANSFORMER_LM = "cosyvoice.llm.llm.TransformerLM"
CONFORMER_ENCODER = "cosyvoice.transformer.encoder.ConformerEncoder"
TRANSFORMER_ENCODER = "cosyvoice.transformer.encoder.TransformerEncoder"
MASKED_DIFF_WITH_XVEC = "cosyvoice.flow.flow.MaskedDiffWithXvec"
INTERPOLATE_REGULATOR = "cosyvoice.flow.length_regulator.InterpolateRegulator"
CONDITIONAL_CFM = "cosyvoice.flow.flow_matching.ConditionalCFM"
CONDITIONAL_DECODER = "cosyvoice.flow.decoder.ConditionalDecoder"
RAS_SAMPLING = "cosyvoice.utils.common.ras_sampling"
WHISPER_TOKENIZERS = ("whisper.tokenizer.get_tokenizer", "cosyvoice.tokenizer.tokenizer.get_tokenizer")


def _encoder_config(node: ConfigNode) -> EncoderConfig:
    conformer = node.tagged.target == CONFORMER_ENCODER
    # Upstream defaults (cosyvoice/transformer/encoder.py): the two classes differ here.
    pos_default = "rel_pos" if conformer else "abs_pos"
    attn_default = "rel_selfattn" if conformer else "selfattn"
    act_default = "swish" if conformer else "relu"

    input_layer = node.str("input_layer", "conv2d")
    node.require("input_layer", input_layer, ("linear", "linear_legacy"))
    node.require("pos_enc_layer_type", node.str("pos_enc_layer_type", pos_default), ("rel_pos_espnet",))
    node.require(
        "selfattention_layer_type", node.str("selfattention_layer_type", attn_default), ("rel_selfattn",)
    )
    activation = node.str("activation_type", act_default)
    node.require("activation_type", activation, ("swish", "relu"))
    node.require("normalize_before", node.bool("normalize_before", True), (True,))
    node.require("key_bias", node.bool("key_bias", True), (True,))
    node.require("global_cmvn", node.kwargs.get("global_cmvn"), (None,))
    if conformer:
        node.require("macaron_style", node.bool("macaron_style", True), (False,))
        node.require("use_cnn_module", node.bool("use_cnn_module", True), (False,))
        node.require("causal", node.bool("causal", False), (False,), " (it only affects the conv module)")
    # static_chunk_size: 0 = full attention, 1 = lower-triangular (causal); larger chunks would be
    # block-causal attention, which no CosyVoice v1 model uses.
    chunk = node.int("static_chunk_size", 0)
    node.require("static_chunk_size", chunk, (0, 1))
    # use_dynamic_chunk randomises the attention chunk per call in upstream's forward: training only.
    node.require("use_dynamic_chunk", node.bool("use_dynamic_chunk", False), (False,))

    output_size = node.int("output_size", 256)
    heads = node.int("attention_heads", 4)
    if heads <= 0 or output_size % heads:
        node.ctx.fail(f"'{node.key}': output_size {output_size} is not divisible by attention_heads {heads}")
    return EncoderConfig(
        input_size=node.int("input_size"),
        output_size=output_size,
        attention_heads=heads,
        linear_units=node.int("linear_units", 2048),
        num_blocks=node.int("num_blocks", 6),
        input_layer=input_layer,
        activation=activation,
        block_type="conformer" if conformer else "transformer",
        causal=chunk == 1,
    )


_ENCODERS = (CONFORMER_ENCODER, TRANSFORMER_ENCODER)


def _llm_config(ctx: ConfigContext, value: Any) -> LLMConfig:
    node = ctx.node("llm", value, (TRANSFORMER_LM,))
    text_encoder = _encoder_config(node.child("text_encoder", _ENCODERS))
    llm = _encoder_config(node.child("llm", _ENCODERS))
    sampling_node = ctx.node("llm.sampling", node.kwargs.get("sampling", MISSING), (RAS_SAMPLING,), ("name",))
    sampling = SamplingConfig(
        top_p=sampling_node.float("top_p", 0.8),
        top_k=sampling_node.int("top_k", 25),
        win_size=sampling_node.int("win_size", 10),
        tau_r=sampling_node.float("tau_r", 0.1),
    )
    cfg = LLMConfig(
        text_encoder_input_size=node.int("text_encoder_input_size"),
        llm_input_size=node.int("llm_input_size"),
        llm_output_size=node.int("llm_output_size"),
        text_token_size=node.int("text_token_size"),
        speech_token_size=node.int("speech_token_size"),
        spk_embed_dim=node.int("spk_embed_dim", 192),
        text_encoder=text_encoder,
        llm=llm,
        sampling=sampling,
    )
    # Upstream would only fail at the first forward pass; say it now.
    if text_encoder.input_size != cfg.text_encoder_input_size:
        ctx.fail(
            f"'llm.text_encoder.input_size' ({text_encoder.input_size}) != "
            f"'llm.text_encoder_input_size' ({cfg.text_encoder_input_size})"
        )
    if llm.input_size != cfg.llm_input_size:
        ctx.fail(f"'llm.llm.input_size' ({llm.input_size}) != 'llm.llm_input_size' ({cfg.llm_input_size})")
    if llm.output_size != cfg.llm_output_size:
        ctx.fail(
            f"'llm.llm.output_size' ({llm.output_size}) != 'llm.llm_output_size' ({cfg.llm_output_size})"
        )
    return cfg


def _flow_config(ctx: ConfigContext, value: Any) -> FlowConfig:
    node = ctx.node("flow", value, (MASKED_DIFF_WITH_XVEC,))
    node.require("output_type", node.str("output_type", "mel"), ("mel",))
    encoder = _encoder_config(node.child("encoder", _ENCODERS))

    lr = node.child("length_regulator", (INTERPOLATE_REGULATOR,))
    channels = lr.int("channels")
    out_channels = lr.kwargs.get("out_channels")
    if out_channels is not None:
        lr.require("out_channels", lr.int("out_channels"), (channels,))
    lr.require("groups", lr.int("groups", 1), (1,))
    length_regulator = LengthRegulatorConfig(channels=channels, sampling_ratios=lr.ints("sampling_ratios"))

    decoder = node.child("decoder", (CONDITIONAL_CFM,))
    cfm = map_cfm_config(ctx, decoder)
    estimator = map_estimator_config(decoder.child("estimator", (CONDITIONAL_DECODER,)))

    cfg = FlowConfig(
        input_size=node.int("input_size", 512),
        output_size=node.int("output_size", 80),
        spk_embed_dim=node.int("spk_embed_dim", 192),
        vocab_size=node.int("vocab_size", 4096),
        input_frame_rate=node.int("input_frame_rate", 50),
        encoder=encoder,
        length_regulator=length_regulator,
        cfm=cfm,
        estimator=estimator,
    )
    if encoder.input_size != cfg.input_size:
        ctx.fail(f"'flow.encoder.input_size' ({encoder.input_size}) != 'flow.input_size' ({cfg.input_size})")
    if length_regulator.channels != cfg.output_size:
        ctx.fail(
            f"'flow.length_regulator.channels' ({length_regulator.channels}) != "
            f"'flow.output_size' ({cfg.output_size})"
        )
    # x, mu, spks and cond are stacked on the channel axis of the estimator.
    if estimator.in_channels != 4 * cfg.output_size or estimator.out_channels != cfg.output_size:
        ctx.fail(
            f"'flow.decoder.estimator' in/out channels ({estimator.in_channels}/{estimator.out_channels}) "
            f"do not match flow.output_size {cfg.output_size} (expected {4 * cfg.output_size}/{cfg.output_size})"
        )
    return cfg


def _tokenizer_config(ctx: ConfigContext, value: Any, allowed_special: Any) -> TokenizerConfig:
    if not isinstance(allowed_special, str):
        ctx.fail(f"'allowed_special' must be a string, got {allowed_special!r}")
    if value is MISSING:
        logger.warning("%s: no 'get_tokenizer'; using the CosyVoice v1 whisper tokenizer", ctx.source)
        return TokenizerConfig(allowed_special=allowed_special)
    node = ctx.node("get_tokenizer", value, WHISPER_TOKENIZERS, ("name",))
    language = node._get("language", None)
    task = node._get("task", None)
    return TokenizerConfig(
        multilingual=node.bool("multilingual"),
        num_languages=node.int("num_languages", 99),  # whisper's default
        language=language if language is not None else "en",
        task=task if task is not None else "transcribe",
        allowed_special=allowed_special,
    )


def config_from_tree(tree: dict[str, Any], source: str = "<string>") -> ModelConfig:
    """Map a parsed (inert) tree into :class:`ModelConfig`; see the module docstring."""
    ctx = ConfigContext(source)
    family = detect_from_tree(tree)
    if family is not None and family.name != "cosyvoice1":
        ctx.fail(
            f"this describes a {family.title} model (its llm/flow/hift classes), not a CosyVoice v1 "
            f"one; a {family.title} directory ships {family.config_file}"
        )
    llm = _llm_config(ctx, tree.get("llm", MISSING))
    flow = _flow_config(ctx, tree.get("flow", MISSING))
    hift = map_hift_config(ctx, tree.get("hift", MISSING))

    top = ConfigNode(ctx, "<top level>", Tagged("new", "top", kwargs=tree))
    sample_rate = top.int("sample_rate", hift.sampling_rate)
    if sample_rate != hift.sampling_rate:
        ctx.fail(f"'sample_rate' ({sample_rate}) != 'hift.sampling_rate' ({hift.sampling_rate})")
    if llm.speech_token_size != flow.vocab_size:
        ctx.fail(
            f"'llm.speech_token_size' ({llm.speech_token_size}) != 'flow.vocab_size' ({flow.vocab_size})"
        )
    if llm.spk_embed_dim != flow.spk_embed_dim:
        ctx.fail(f"'llm.spk_embed_dim' ({llm.spk_embed_dim}) != 'flow.spk_embed_dim' ({flow.spk_embed_dim})")
    if flow.output_size != hift.in_channels:
        ctx.fail(f"'flow.output_size' ({flow.output_size}) != 'hift.in_channels' ({hift.in_channels})")
    return ModelConfig(
        family="cosyvoice1",
        sample_rate=sample_rate,
        llm=llm,
        flow=flow,
        hift=hift,
        mel=map_mel_config(
            ctx, tree.get("feat_extractor", MISSING), MelConfig(sampling_rate=sample_rate), "CosyVoice v1"
        ),
        tokenizer=_tokenizer_config(
            ctx, tree.get("get_tokenizer", MISSING), tree.get("allowed_special", "all")
        ),
    )


def parse_model_config(text: str, source: str = "<string>") -> ModelConfig:
    """Parse `cosyvoice.yaml` text into :class:`ModelConfig` without executing anything."""
    return config_from_tree(parse_yaml_tree(text, source), source)


def load_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read a model directory's `cosyvoice.yaml` into :class:`ModelConfig` without executing anything.

    Raises :class:`ModelConfigError` (naming the file and the key) for unreadable YAML, unknown
    classes under inference keys, unsupported options and models of another family.
    """
    tree = load_yaml_tree(path)
    return config_from_tree(tree, str(path))

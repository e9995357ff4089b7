"""CosyVoice3's configuration: the typed configs of its audio networks (the DiT flow and the causal
HiFT) and the mapping of a parsed `cosyvoice3.yaml` into them.

The yaml is read with :mod:`cosyserve.nn.yaml_reader` (nothing it names is imported or run). Values
the file omits take the upstream constructor defaults; the dataclass defaults are the published
Fun-CosyVoice3-0.5B-2512 sizes. The LLM part (``CosyVoice3LM`` over Qwen2) is mapped by the LLM
code (:func:`~cosyserve.families.cosyvoice3.llm.cosyvoice3_llm_config`) from the yaml and the
backbone's ``CosyVoice-BlankEN/config.json``: :attr:`ModelConfig.llm` is None when that file is not
beside the yaml (the audio side never reads it; the loader requires it).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosyserve.families.cosyvoice2.llm import BACKBONE_DIR, Qwen2LMConfig
from cosyserve.families.cosyvoice3.llm import cosyvoice3_llm_config
from cosyserve.nn.config import (
    CFMConfig,
    HiFTConfig,
    MelConfig,
    check_hift_stages,
    hift_fields,
    map_f0_predictor_config,
)
from cosyserve.nn.dit import DiTConfig
from cosyserve.nn.qwen2 import Qwen2Config, load_qwen2_config
from cosyserve.nn.yaml_reader import (
    MISSING,
    ConfigContext,
    ConfigNode,
    Tagged,
    load_yaml_tree,
    parse_yaml_tree,
)

logger = logging.getLogger(__name__)

CONFIG_FILE = "cosyvoice3.yaml"

# Upstream class paths this family's inference keys name.
MASKED_DIFF_WITH_DIT = "cosyvoice.flow.flow.CausalMaskedDiffWithDiT"
PRE_LOOKAHEAD_LAYER = "cosyvoice.transformer.upsample_encoder.PreLookaheadLayer"
CAUSAL_CFM = "cosyvoice.flow.flow_matching.CausalConditionalCFM"
DIT = "cosyvoice.flow.DiT.dit.DiT"
CAUSAL_HIFT_GENERATOR = "cosyvoice.hifigan.generator.CausalHiFTGenerator"
CAUSAL_F0_PREDICTOR = "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor"
MEL_SPECTROGRAM = "matcha.utils.audio.mel_spectrogram"
DICT_CONFIGS = ("omegaconf.DictConfig", "omegaconf.OmegaConf.create")

# Upstream's SineGen2 draws its fixed noise as (1, 300 * 24000, 9): one column per harmonic of
# an 8-harmonic source, whatever the yaml says, so other harmonic counts cannot run there.
NOISE_HARMONICS = 9


@dataclass
class PreLookaheadConfig:
    """`PreLookaheadLayer`: conv k=len+1 over the token embedding and `len` look-ahead tokens."""

    in_channels: int = 80
    channels: int = 1024
    pre_lookahead_len: int = 3


@dataclass
class FlowConfig:
    """`CausalMaskedDiffWithDiT`: speech tokens -> mel through a pre-lookahead layer and a DiT CFM."""

    input_size: int = 80
    output_size: int = 80
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    pre_lookahead: PreLookaheadConfig = field(default_factory=PreLookaheadConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)


@dataclass
class CausalHiFTConfig(HiFTConfig):
    """`CausalHiFTGenerator`: HiFT with causal convolutions, a right look-ahead of
    `conv_pre_look_right` frames at its input and `CausalConvRNNF0Predictor` (3 frames)."""

    sampling_rate: int = 24000
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    conv_pre_look_right: int = 4
    f0_look_right: int = 3  # CausalConv1d(k=4, causal_type='right') at the f0 predictor's input

    @property
    def samples_per_frame(self) -> int:
        """Output samples per mel frame: the product of the upsampling rates times the iSTFT hop."""
        n = self.istft_hop_len
        for r in self.upsample_rates:
            n *= r
        return n


@dataclass
class ModelConfig:
    """Everything inference needs from `cosyvoice3.yaml`."""

    family: str = "cosyvoice3"
    sample_rate: int = 24000
    token_frame_rate: int = 25
    token_mel_ratio: int = 2
    chunk_size: int = 25  # streaming: tokens per DiT attention chunk
    # The CosyVoice3LM / Qwen2 part (None without the backbone's config.json beside the yaml).
    llm: Qwen2LMConfig | None = None
    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: CausalHiFTConfig = field(default_factory=CausalHiFTConfig)
    mel: MelConfig = field(
        default_factory=lambda: MelConfig(
            n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920, fmin=0.0, fmax=12000.0
        )
    )


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------


def _mapping_node(ctx: ConfigContext, key: str, value: Any) -> ConfigNode:
    """A plain mapping (or `!new:omegaconf.DictConfig {content: ...}`) as a ConfigNode."""
    if isinstance(value, Tagged) and value.target in DICT_CONFIGS:
        value = value.kwargs.get("content", value.args[0] if value.args else {})
    if not isinstance(value, dict):
        ctx.fail(f"'{key}' must be a mapping, got {value!r}")
    return ConfigNode(ctx, key, Tagged("new", "dict", kwargs=value))


def _pre_lookahead_config(node: ConfigNode) -> PreLookaheadConfig:
    cfg = PreLookaheadConfig(
        in_channels=node.int("in_channels"),
        channels=node.int("channels"),
        pre_lookahead_len=node.int("pre_lookahead_len", 1),
    )
    if cfg.pre_lookahead_len < 1 or cfg.channels < 1:
        node.ctx.fail(f"'{node.key}': channels and pre_lookahead_len must be positive")
    return cfg


def _dit_config(node: ConfigNode) -> DiTConfig:
    node.require("long_skip_connection", node.bool("long_skip_connection", False), (False,))
    mel_dim = node.int("mel_dim", 80)
    mu_dim = node.kwargs.get("mu_dim")
    if node.kwargs.get("spk_dim") is None:
        # Upstream then drops the speaker vector from the input; the CFM always passes one.
        node.ctx.fail(f"'{node.key}.spk_dim' is missing: a DiT without a speaker input is not supported")
    cfg = DiTConfig(
        dim=node.int("dim"),
        depth=node.int("depth", 8),
        heads=node.int("heads", 8),
        dim_head=node.int("dim_head", 64),
        ff_mult=node.int("ff_mult", 4),
        mel_dim=mel_dim,
        mu_dim=mel_dim if mu_dim is None else node.int("mu_dim"),
        spk_dim=node.int("spk_dim"),
        static_chunk_size=node.int("static_chunk_size", 50),
    )
    # num_decoding_left_chunks is accepted and ignored, as upstream's DiT ignores it (all left
    # chunks are always visible).
    node.int("num_decoding_left_chunks", 2)
    if cfg.dim <= 0 or cfg.depth <= 0 or cfg.heads <= 0 or cfg.dim_head <= 0 or cfg.ff_mult <= 0:
        node.ctx.fail(f"'{node.key}': dim, depth, heads, dim_head and ff_mult must be positive")
    if cfg.dim % cfg.conv_pos_groups:
        node.ctx.fail(
            f"'{node.key}.dim' ({cfg.dim}) must be divisible by {cfg.conv_pos_groups} "
            "(the grouped convolutions of its position embedding)"
        )
    if cfg.static_chunk_size < 0:
        node.ctx.fail(f"'{node.key}.static_chunk_size' must be >= 0, got {cfg.static_chunk_size}")
    return cfg


def _flow_config(ctx: ConfigContext, value: Any) -> FlowConfig:
    node = ctx.node("flow", value, (MASKED_DIFF_WITH_DIT,))
    node.require("output_type", node.str("output_type", "mel"), ("mel",))
    output_size = node.int("output_size", 80)
    pre = _pre_lookahead_config(node.child("pre_lookahead_layer", (PRE_LOOKAHEAD_LAYER,)))

    decoder = node.child("decoder", (CAUSAL_CFM,))
    decoder.require("n_spks", decoder.int("n_spks", 1), (1,))
    params = _mapping_node(ctx, "flow.decoder.cfm_params", decoder.kwargs.get("cfm_params", MISSING))
    solver = params.str("solver", "euler")
    params.require("solver", solver, ("euler",))
    t_scheduler = params.str("t_scheduler", "cosine")
    params.require("t_scheduler", t_scheduler, ("cosine",))
    cfm = CFMConfig(
        inference_cfg_rate=params.float("inference_cfg_rate", 0.7),
        t_scheduler=t_scheduler,
        solver=solver,
    )
    dit = _dit_config(decoder.child("estimator", (DIT,)))

    cfg = FlowConfig(
        input_size=node.int("input_size", 512),
        output_size=output_size,
        spk_embed_dim=node.int("spk_embed_dim", 192),
        vocab_size=node.int("vocab_size", 4096),
        input_frame_rate=node.int("input_frame_rate", 50),
        token_mel_ratio=node.int("token_mel_ratio", 2),
        pre_lookahead_len=node.int("pre_lookahead_len", 3),
        pre_lookahead=pre,
        cfm=cfm,
        dit=dit,
    )
    # Upstream would only fail at the first forward pass; say it now.
    if pre.in_channels != cfg.input_size:
        ctx.fail(
            f"'flow.pre_lookahead_layer.in_channels' ({pre.in_channels}) != 'flow.input_size' ({cfg.input_size})"
        )
    if pre.pre_lookahead_len != cfg.pre_lookahead_len:
        ctx.fail(
            f"'flow.pre_lookahead_layer.pre_lookahead_len' ({pre.pre_lookahead_len}) != "
            f"'flow.pre_lookahead_len' ({cfg.pre_lookahead_len})"
        )
    if dit.mu_dim != cfg.input_size:
        ctx.fail(f"'flow.decoder.estimator.mu_dim' ({dit.mu_dim}) != 'flow.input_size' ({cfg.input_size})")
    if dit.mel_dim != cfg.output_size or dit.spk_dim != cfg.output_size:
        ctx.fail(
            f"'flow.decoder.estimator' mel_dim/spk_dim ({dit.mel_dim}/{dit.spk_dim}) must equal "
            f"'flow.output_size' ({cfg.output_size})"
        )
    if cfg.token_mel_ratio < 1:
        ctx.fail(f"'flow.token_mel_ratio' must be >= 1, got {cfg.token_mel_ratio}")
    return cfg


def _hift_config(ctx: ConfigContext, value: Any) -> CausalHiFTConfig:
    node = ctx.node("hift", value, (CAUSAL_HIFT_GENERATOR,))
    istft = _mapping_node(
        ctx, "hift.istft_params", node.kwargs.get("istft_params", {"n_fft": 16, "hop_len": 4})
    )
    f0 = node.child("f0_predictor", (CAUSAL_F0_PREDICTOR,))
    cfg = CausalHiFTConfig(
        **hift_fields(node, istft),
        conv_pre_look_right=node.int("conv_pre_look_right", 4),
        f0_predictor=map_f0_predictor_config(f0),
    )
    if cfg.sampling_rate == 22050:
        # Upstream picks the non-causal SineGen ("type 1") at 22050 Hz, which has no fixed noise.
        ctx.fail("'hift.sampling_rate' 22050 selects the v1 sine generator; the causal HiFT needs SineGen2")
    if cfg.nb_harmonics + 1 != NOISE_HARMONICS:
        ctx.fail(
            f"'hift.nb_harmonics' = {cfg.nb_harmonics} is not supported: the causal HiFT's fixed noise "
            f"buffers have {NOISE_HARMONICS} columns (8 harmonics)"
        )
    if cfg.f0_predictor.num_class != 1:
        ctx.fail(
            f"'hift.f0_predictor.num_class' must be 1 (one f0 per frame), got {cfg.f0_predictor.num_class}"
        )
    if cfg.f0_predictor.in_channels != cfg.in_channels:
        ctx.fail(
            f"'hift.f0_predictor.in_channels' ({cfg.f0_predictor.in_channels}) != "
            f"'hift.in_channels' ({cfg.in_channels})"
        )
    if cfg.conv_pre_look_right < 1:
        ctx.fail(f"'hift.conv_pre_look_right' must be >= 1, got {cfg.conv_pre_look_right}")
    check_hift_stages(ctx, cfg)
    if cfg.base_channels % 2 ** len(cfg.upsample_rates):
        ctx.fail(
            f"'hift.base_channels' ({cfg.base_channels}) must be divisible by 2**{len(cfg.upsample_rates)} "
            "(each upsampling stage halves the channels)"
        )
    return cfg


def _mel_config(ctx: ConfigContext, value: Any, sample_rate: int) -> MelConfig:
    if value is MISSING:
        logger.warning("%s: no 'feat_extractor'; using the CosyVoice3 mel defaults", ctx.source)
        return ModelConfig().mel
    node = ctx.node("feat_extractor", value, (MEL_SPECTROGRAM,), ("name",))
    sampling_rate = node.int("sampling_rate")
    fmax = node.kwargs.get("fmax")
    return MelConfig(
        n_fft=node.int("n_fft"),
        num_mels=node.int("num_mels"),
        sampling_rate=sampling_rate,
        hop_size=node.int("hop_size"),
        win_size=node.int("win_size"),
        fmin=node.float("fmin"),
        # fmax null = Nyquist (librosa's mel filters read None that way).
        fmax=sampling_rate / 2.0 if fmax is None else node.float("fmax"),
        center=node.bool("center", False),
    )


def config_from_tree(
    tree: dict[str, Any], source: str = "<string>", backbone: Qwen2Config | None = None
) -> ModelConfig:
    """Map a parsed (inert) `cosyvoice3.yaml` tree into :class:`ModelConfig`; with the Qwen2
    ``backbone`` config, the LLM part too."""
    ctx = ConfigContext(source)
    flow = _flow_config(ctx, tree.get("flow", MISSING))
    hift = _hift_config(ctx, tree.get("hift", MISSING))

    top = ConfigNode(ctx, "<top level>", Tagged("new", "top", kwargs=tree))
    sample_rate = top.int("sample_rate", hift.sampling_rate)
    if sample_rate != hift.sampling_rate:
        ctx.fail(f"'sample_rate' ({sample_rate}) != 'hift.sampling_rate' ({hift.sampling_rate})")
    if flow.output_size != hift.in_channels:
        ctx.fail(f"'flow.output_size' ({flow.output_size}) != 'hift.in_channels' ({hift.in_channels})")
    token_frame_rate = top.int("token_frame_rate", flow.input_frame_rate)
    token_mel_ratio = top.int("token_mel_ratio", flow.token_mel_ratio)
    if token_mel_ratio != flow.token_mel_ratio:
        ctx.fail(f"'token_mel_ratio' ({token_mel_ratio}) != 'flow.token_mel_ratio' ({flow.token_mel_ratio})")
    mel = _mel_config(ctx, tree.get("feat_extractor", MISSING), sample_rate)
    if mel.sampling_rate != sample_rate or mel.hop_size != hift.samples_per_frame:
        ctx.fail(
            f"'feat_extractor' ({mel.sampling_rate} Hz, hop {mel.hop_size}) does not match the vocoder "
            f"({sample_rate} Hz, {hift.samples_per_frame} samples per frame)"
        )
    if mel.num_mels != flow.output_size:
        ctx.fail(f"'feat_extractor.num_mels' ({mel.num_mels}) != 'flow.output_size' ({flow.output_size})")
    return ModelConfig(
        sample_rate=sample_rate,
        token_frame_rate=token_frame_rate,
        token_mel_ratio=token_mel_ratio,
        chunk_size=top.int("chunk_size", 25),
        llm=None if backbone is None else cosyvoice3_llm_config(tree, backbone, source),
        flow=flow,
        hift=hift,
        mel=mel,
    )


def parse_model_config(
    text: str, source: str = "<string>", backbone: Qwen2Config | None = None
) -> ModelConfig:
    """Parse `cosyvoice3.yaml` text into :class:`ModelConfig` without executing anything."""
    return config_from_tree(parse_yaml_tree(text, source), source, backbone)


def load_model_config(model_dir: str | os.PathLike[str]) -> ModelConfig:
    """Read a model directory's `cosyvoice3.yaml` (or that file itself) into :class:`ModelConfig`,
    the LLM part included when ``CosyVoice-BlankEN/config.json`` is beside it.

    Raises :class:`~cosyserve.errors.ModelConfigError` naming the file and the key for unreadable
    YAML or JSON, unknown classes under the inference keys and unsupported options.
    """
    path = Path(model_dir)
    if path.is_dir():
        path = path / CONFIG_FILE
    backbone_config = path.parent / BACKBONE_DIR / "config.json"
    backbone = load_qwen2_config(backbone_config) if backbone_config.is_file() else None
    return config_from_tree(load_yaml_tree(path), str(path), backbone)

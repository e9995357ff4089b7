"""A safe reader for CosyVoice's HyperPyYAML `cosyvoice.yaml`, and its mapping to :class:`ModelConfig`.

Upstream loads the file with `hyperpyyaml.load_hyperpyyaml`, which imports and calls whatever
the tags name (`!new:`, `!name:`, `!apply:`). A model directory downloaded from the internet must
not be able to run code, so here every tag becomes an inert :class:`Tagged` record (the dotted
path is only a string) and `!ref` is resolved by looking keys up in the document. Only then are
the inference keys (`llm`, `flow`, `hift`, `get_tokenizer`, `allowed_special`, `feat_extractor`,
`sample_rate`) mapped into the typed dataclasses; the class path under each key identifies the
architecture, and the upstream constructor defaults are applied where the file omits a value.
Training-only keys (data pipeline, optimiser, discriminator, ...) are parsed inertly and ignored.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import operator
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cosyserve.errors import ModelConfigError
from cosyserve.models.config import (
    CFMConfig,
    EncoderConfig,
    EstimatorConfig,
    F0PredictorConfig,
    FlowConfig,
    HiFTConfig,
    LengthRegulatorConfig,
    LLMConfig,
    MelConfig,
    ModelConfig,
    SamplingConfig,
    TokenizerConfig,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Ref",
    "Tagged",
    "config_from_tree",
    "detect_family",
    "load_model_config",
    "load_yaml_tree",
    "parse_model_config",
    "parse_yaml_tree",
]


# --------------------------------------------------------------------------------------------
# Inert YAML nodes
# --------------------------------------------------------------------------------------------


@dataclass
class Tagged:
    """An inert `!new:` / `!name:` / `!apply:` (or any other tag) node. Nothing is imported."""

    kind: str  # "new" | "name" | "apply" | "include" | "tag"
    target: str  # dotted path (for "tag": the full tag)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"!{self.kind}:{self.target}"


@dataclass
class Ref:
    """`!ref <key>` (or an expression / string interpolation of several refs); resolved later."""

    expr: str
    copy: bool = False


class Placeholder:
    """HyperPyYAML's `!PLACEHOLDER`: a value the user must override. Never used at inference."""

    def __repr__(self) -> str:
        return "!PLACEHOLDER"


def _construct_tagged(kind: str) -> Callable[[yaml.SafeLoader, str, yaml.Node], Tagged]:
    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if isinstance(node, yaml.MappingNode):
            kwargs = {str(k): v for k, v in loader.construct_mapping(node, deep=True).items()}
        elif isinstance(node, yaml.SequenceNode):
            args = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
            if value not in ("", None):
                args = [value]
        return Tagged(kind=kind, target=suffix, args=args, kwargs=kwargs)

    return construct


def _construct_other_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Tagged:
    # Any tag we do not know (e.g. in a training-only section) stays an inert record; mapping it
    # to an inference field is an error later, with the key named.
    tagged = _construct_tagged("tag")(loader, suffix, node)
    tagged.target = "!" + suffix
    return tagged


def _construct_ref(loader: yaml.SafeLoader, node: yaml.Node) -> Ref:
    return Ref(str(loader.construct_scalar(node)))


def _construct_copy(loader: yaml.SafeLoader, node: yaml.Node) -> Ref:
    return Ref(str(loader.construct_scalar(node)), copy=True)


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    if isinstance(node, yaml.SequenceNode):
        return tuple(loader.construct_sequence(node, deep=True))
    text = str(loader.construct_scalar(node)).strip()
    try:
        value = ast.literal_eval(text if text.startswith("(") else f"({text},)")
    except (ValueError, SyntaxError) as exc:
        raise yaml.constructor.ConstructorError(None, None, f"bad !tuple {text!r}", node.start_mark) from exc
    return tuple(value) if isinstance(value, tuple) else (value,)


def _construct_placeholder(loader: yaml.SafeLoader, node: yaml.Node) -> Placeholder:
    return Placeholder()


class _InertLoader(yaml.SafeLoader):
    """SafeLoader plus HyperPyYAML's tags, all of which build inert records."""


# YAML 1.2 floats such as `1e-06` (no dot): HyperPyYAML (ruamel, YAML 1.2) reads them as numbers.
_InertLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)
# Order matters: PyYAML tries multi-constructor prefixes in insertion order, "!" is the catch-all.
_InertLoader.add_multi_constructor("!new:", _construct_tagged("new"))
_InertLoader.add_multi_constructor("!name:", _construct_tagged("name"))
_InertLoader.add_multi_constructor("!apply:", _construct_tagged("apply"))
_InertLoader.add_multi_constructor("!include:", _construct_tagged("include"))
_InertLoader.add_constructor("!ref", _construct_ref)
_InertLoader.add_constructor("!copy", _construct_copy)
_InertLoader.add_constructor("!tuple", _construct_tuple)
_InertLoader.add_constructor("!PLACEHOLDER", _construct_placeholder)
_InertLoader.add_multi_constructor("!", _construct_other_tag)


# --------------------------------------------------------------------------------------------
# !ref resolution
# --------------------------------------------------------------------------------------------

_REF_RE = re.compile(r"<([^<>]+)>")
_KEY_PART_RE = re.compile(r"\[([^\[\]]+)\]|\.?([^.\[\]]+)")

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARYOPS: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval_arithmetic(text: str) -> Any:
    """Evaluate a plain arithmetic expression over number literals (HyperPyYAML's `!ref <a> * <b>`).

    Walks the AST itself, so nothing but numbers and + - * / // % ** can be evaluated.
    Raises ValueError for anything else.
    """

    def walk(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, (int, float))
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:  # no 10**10**10 bombs
                raise ValueError("exponent too large")
            return _BINOPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARYOPS:
            return _UNARYOPS[type(node.op)](walk(node.operand))
        raise ValueError(f"not arithmetic: {ast.dump(node)}")

    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(str(exc)) from exc
    return walk(tree)


class _Resolver:
    def __init__(self, root: dict[str, Any], source: str):
        self.root = root
        self.source = source
        self.done: dict[str, Any] = {}
        self.active: list[str] = []

    def lookup(self, key: str) -> Any:
        if key in self.done:
            return self.done[key]
        if key in self.active:
            chain = " -> ".join([*self.active, key])
            raise ModelConfigError(f"{self.source}: circular !ref: {chain}")
        self.active.append(key)
        try:
            node: Any = self.root
            for bracket, plain in _KEY_PART_RE.findall(key.strip()):
                part = (bracket or plain).strip().strip("'\"")
                if isinstance(node, Ref):  # only refs on the path; never the whole container
                    node = self.resolve_ref(node)
                if isinstance(node, Tagged):
                    node = node.kwargs
                if isinstance(node, dict) and part in node:
                    node = node[part]
                elif isinstance(node, (list, tuple)) and part.lstrip("-").isdigit():
                    node = node[int(part)]
                else:
                    raise ModelConfigError(f"{self.source}: !ref <{key}> names a key that does not exist")
            value = self.resolve(node)
        finally:
            self.active.pop()
        self.done[key] = value
        return value

    def resolve_ref(self, ref: Ref) -> Any:
        refs = _REF_RE.findall(ref.expr)
        if not refs:
            raise ModelConfigError(f"{self.source}: !ref {ref.expr!r} contains no <key>")
        if ref.expr.strip() == f"<{refs[0]}>":
            return self.lookup(refs[0])  # plain reference: the object itself (shared, like upstream)
        # Several refs or text around them: substitute, then arithmetic if it is arithmetic,
        # otherwise string interpolation (HyperPyYAML's behaviour for e.g. paths).
        text = _REF_RE.sub(lambda m: str(self.lookup(m.group(1))), ref.expr)
        try:
            return _eval_arithmetic(text)
        except (ValueError, ZeroDivisionError, OverflowError, TypeError):
            return text

    def resolve(self, node: Any) -> Any:
        if isinstance(node, Ref):
            return self.resolve_ref(node)
        if isinstance(node, dict):
            for key, value in node.items():
                node[key] = self.resolve(value)
            return node
        if isinstance(node, list):
            for i, value in enumerate(node):
                node[i] = self.resolve(value)
            return node
        if isinstance(node, Tagged):
            self.resolve(node.args)
            self.resolve(node.kwargs)
            return node
        return node


def parse_yaml_tree(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse HyperPyYAML text into plain Python data with inert :class:`Tagged` nodes, refs resolved."""
    try:
        root = yaml.load(text, Loader=_InertLoader)  # noqa: S506 - _InertLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ModelConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(root, dict):
        raise ModelConfigError(f"{source}: expected a mapping at the top level, got {type(root).__name__}")
    return _Resolver(root, source).resolve(root)


def load_yaml_tree(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a HyperPyYAML file safely (see :func:`parse_yaml_tree`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ModelConfigError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc
    return parse_yaml_tree(text, source=str(path))


# --------------------------------------------------------------------------------------------
# Family detection
# --------------------------------------------------------------------------------------------

_FAMILY_MARKERS: tuple[tuple[str, frozenset[str]], ...] = (
    (
        "CosyVoice3",
        frozenset(
            {
                "cosyvoice.llm.llm.CosyVoice3LM",
                "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
                "cosyvoice.flow.DiT.dit.DiT",
                "cosyvoice.hifigan.generator.CausalHiFTGenerator",
                "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor",
            }
        ),
    ),
    (
        "CosyVoice2",
        frozenset(
            {
                "cosyvoice.llm.llm.Qwen2LM",
                "cosyvoice.llm.llm.Qwen2Encoder",
                "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
                "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
                "cosyvoice.flow.flow_matching.CausalConditionalCFM",
                "cosyvoice.flow.decoder.CausalConditionalDecoder",
                "cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer",
            }
        ),
    ),
)

_INFERENCE_KEYS = ("llm", "flow", "hift", "get_tokenizer", "feat_extractor")


def _iter_tagged(node: Any, path: str) -> Iterable[tuple[str, Tagged]]:
    if isinstance(node, Tagged):
        yield path, node
        for i, arg in enumerate(node.args):
            yield from _iter_tagged(arg, f"{path}[{i}]")
        for key, value in node.kwargs.items():
            yield from _iter_tagged(value, f"{path}.{key}")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _iter_tagged(value, f"{path}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _iter_tagged(value, f"{path}[{i}]")


def detect_family(tree: dict[str, Any]) -> tuple[str, str, str] | None:
    """Return (family, key, class) if the inference keys name a class of a newer family, else None."""
    for key in _INFERENCE_KEYS:
        for where, tagged in _iter_tagged(tree.get(key), key):
            for family, markers in _FAMILY_MARKERS:
                if tagged.target in markers:
                    return family, where, tagged.target
    return None


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
HIFT_GENERATOR = "cosyvoice.hifigan.generator.HiFTGenerator"
CONV_RNN_F0_PREDICTOR = "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor"
RAS_SAMPLING = "cosyvoice.utils.common.ras_sampling"
MEL_SPECTROGRAM = "matcha.utils.audio.mel_spectrogram"
WHISPER_TOKENIZERS = ("whisper.tokenizer.get_tokenizer", "cosyvoice.tokenizer.tokenizer.get_tokenizer")
DICT_CONFIGS = ("omegaconf.DictConfig", "omegaconf.OmegaConf.create")

_MISSING = object()


class _Node:
    """Typed access to one `!new:` / `!name:` node's keyword arguments, with upstream defaults."""

    def __init__(self, ctx: _Context, key: str, tagged: Tagged):
        self.ctx = ctx
        self.key = key
        self.tagged = tagged
        self.kwargs = tagged.kwargs
        if tagged.args:
            ctx.fail(f"'{key}' ({tagged.target}): positional arguments are not supported, use key: value")

    def _get(self, name: str, default: Any) -> Any:
        value = self.kwargs.get(name, default)
        if value is _MISSING:
            self.ctx.fail(f"'{self.key}' ({self.tagged.target}) is missing the required argument '{name}'")
        if isinstance(value, (Tagged, Placeholder)):
            self.ctx.fail(f"'{self.key}.{name}' must be a plain value, got {value!r}")
        return value

    def _bad(self, name: str, value: Any, want: str) -> None:
        self.ctx.fail(f"'{self.key}.{name}' must be {want}, got {value!r}")

    def int(self, name: str, default: Any = _MISSING) -> int:
        value = self._get(name, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            self._bad(name, value, "an integer")
        return value

    def float(self, name: str, default: Any = _MISSING) -> float:
        value = self._get(name, default)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):  # "1e-06" read as a string by YAML 1.1 rules
                value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self._bad(name, value, "a number")
        return float(value)

    def bool(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self._bad(name, value, "true or false")
        return value

    def str(self, name: str, default: Any = _MISSING) -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            self._bad(name, value, "a string")
        return value

    def ints(self, name: str, default: Any = _MISSING) -> tuple[int, ...]:
        value = self._get(name, default)
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            self._bad(name, value, "a list of integers")
        return tuple(value)

    def int_lists(self, name: str, default: Any = _MISSING) -> tuple[tuple[int, ...], ...]:
        value = self._get(name, default)
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(row, (list, tuple))
            and all(isinstance(v, int) and not isinstance(v, bool) for v in row)
            for row in value
        )
        if not ok:
            self._bad(name, value, "a list of lists of integers")
        return tuple(tuple(row) for row in value)

    def require(self, name: str, value: Any, allowed: Iterable[Any], what: str = "") -> None:
        allowed = tuple(allowed)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            self.ctx.fail(f"'{self.key}.{name}' = {value!r} is not supported{what} (supported: {choices})")

    def child(self, name: str, classes: tuple[str, ...], default: Any = _MISSING) -> _Node:
        value = self.kwargs.get(name, default)
        return self.ctx.node(f"{self.key}.{name}", value, classes)


class _Context:
    def __init__(self, source: str):
        self.source = source

    def fail(self, message: str) -> None:
        raise ModelConfigError(f"{self.source}: {message}")

    def node(
        self, key: str, value: Any, classes: tuple[str, ...], kinds: tuple[str, ...] = ("new",)
    ) -> _Node:
        if value is _MISSING or value is None:
            self.fail(f"the inference key '{key}' is missing (expected !{kinds[0]}:{classes[0]})")
        if not isinstance(value, Tagged) or value.kind not in kinds:
            self.fail(f"'{key}' must be a !{kinds[0]}:{classes[0]} node, got {value!r}")
        if value.target not in classes:
            self.fail(
                f"'{key}' names the unknown class '{value.target}' (supported here: {', '.join(classes)})"
            )
        return _Node(self, key, value)


def _encoder_config(node: _Node) -> EncoderConfig:
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


def _llm_config(ctx: _Context, value: Any) -> LLMConfig:
    node = ctx.node("llm", value, (TRANSFORMER_LM,))
    text_encoder = _encoder_config(node.child("text_encoder", _ENCODERS))
    llm = _encoder_config(node.child("llm", _ENCODERS))
    sampling_node = ctx.node(
        "llm.sampling", node.kwargs.get("sampling", _MISSING), (RAS_SAMPLING,), ("name",)
    )
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


def _cfm_params(ctx: _Context, value: Any) -> dict[str, Any]:
    # `cfm_params: !new:omegaconf.DictConfig {content: {...}}` upstream; accept a plain mapping too.
    if isinstance(value, Tagged) and value.target in DICT_CONFIGS:
        content = value.kwargs.get("content", value.args[0] if value.args else {})
        if isinstance(content, dict):
            return content
    if isinstance(value, dict):
        return value
    ctx.fail(f"'flow.decoder.cfm_params' must be a mapping or !new:omegaconf.DictConfig, got {value!r}")
    raise AssertionError  # unreachable; fail() raises


def _flow_config(ctx: _Context, value: Any) -> FlowConfig:
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
    decoder.require("n_spks", decoder.int("n_spks", 1), (1,))
    params_node = _Node(
        ctx,
        "flow.decoder.cfm_params",
        Tagged("new", "dict", kwargs=_cfm_params(ctx, decoder.kwargs.get("cfm_params", _MISSING))),
    )
    solver = params_node.str("solver", "euler")
    params_node.require("solver", solver, ("euler",))
    t_scheduler = params_node.str("t_scheduler", "cosine")
    params_node.require("t_scheduler", t_scheduler, ("cosine", "linear"))
    cfm = CFMConfig(
        inference_cfg_rate=params_node.float("inference_cfg_rate"),
        t_scheduler=t_scheduler,
        solver=solver,
    )

    est = decoder.child("estimator", (CONDITIONAL_DECODER,))
    act_fn = est.str("act_fn", "snake")
    est.require("act_fn", act_fn, ("gelu",))
    estimator = EstimatorConfig(
        in_channels=est.int("in_channels"),
        out_channels=est.int("out_channels"),
        channels=est.ints("channels", (256, 256)),
        attention_head_dim=est.int("attention_head_dim", 64),
        n_blocks=est.int("n_blocks", 1),
        num_mid_blocks=est.int("num_mid_blocks", 2),
        num_heads=est.int("num_heads", 4),
        act_fn=act_fn,
    )

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


def _hift_config(ctx: _Context, value: Any) -> HiFTConfig:
    node = ctx.node("hift", value, (HIFT_GENERATOR,))
    istft = node.kwargs.get("istft_params", {"n_fft": 16, "hop_len": 4})
    if not isinstance(istft, dict):
        ctx.fail(f"'hift.istft_params' must be a mapping with n_fft and hop_len, got {istft!r}")
    istft_node = _Node(ctx, "hift.istft_params", Tagged("new", "dict", kwargs=istft))
    f0 = node.child("f0_predictor", (CONV_RNN_F0_PREDICTOR,))
    cfg = HiFTConfig(
        in_channels=node.int("in_channels", 80),
        base_channels=node.int("base_channels", 512),
        nb_harmonics=node.int("nb_harmonics", 8),
        sampling_rate=node.int("sampling_rate", 22050),
        nsf_alpha=node.float("nsf_alpha", 0.1),
        nsf_sigma=node.float("nsf_sigma", 0.003),
        nsf_voiced_threshold=node.float("nsf_voiced_threshold", 10.0),
        upsample_rates=node.ints("upsample_rates", (8, 8)),
        upsample_kernel_sizes=node.ints("upsample_kernel_sizes", (16, 16)),
        istft_n_fft=istft_node.int("n_fft"),
        istft_hop_len=istft_node.int("hop_len"),
        resblock_kernel_sizes=node.ints("resblock_kernel_sizes", (3, 7, 11)),
        resblock_dilation_sizes=node.int_lists("resblock_dilation_sizes", ((1, 3, 5), (1, 3, 5), (1, 3, 5))),
        source_resblock_kernel_sizes=node.ints("source_resblock_kernel_sizes", (7, 11)),
        source_resblock_dilation_sizes=node.int_lists(
            "source_resblock_dilation_sizes", ((1, 3, 5), (1, 3, 5))
        ),
        lrelu_slope=node.float("lrelu_slope", 0.1),
        audio_limit=node.float("audio_limit", 0.99),
        f0_predictor=F0PredictorConfig(
            num_class=f0.int("num_class", 1),
            in_channels=f0.int("in_channels", 80),
            cond_channels=f0.int("cond_channels", 512),
        ),
    )
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
    return cfg


def _mel_config(ctx: _Context, value: Any, sample_rate: int) -> MelConfig:
    if value is _MISSING:
        logger.warning("%s: no 'feat_extractor'; using the CosyVoice v1 mel defaults", ctx.source)
        return MelConfig(sampling_rate=sample_rate)
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


def _tokenizer_config(ctx: _Context, value: Any, allowed_special: Any) -> TokenizerConfig:
    if not isinstance(allowed_special, str):
        ctx.fail(f"'allowed_special' must be a string, got {allowed_special!r}")
    if value is _MISSING:
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
    ctx = _Context(source)
    found = detect_family(tree)
    if found is not None:
        family, key, target = found
        ctx.fail(
            f"this looks like a {family} model ('{key}' is {target}); {family} is not supported yet - "
            "cosyserve currently runs CosyVoice v1 models (CosyVoice-300M, -SFT, -Instruct)"
        )
    llm = _llm_config(ctx, tree.get("llm", _MISSING))
    flow = _flow_config(ctx, tree.get("flow", _MISSING))
    hift = _hift_config(ctx, tree.get("hift", _MISSING))

    top = _Node(ctx, "<top level>", Tagged("new", "top", kwargs=tree))
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
        mel=_mel_config(ctx, tree.get("feat_extractor", _MISSING), sample_rate),
        tokenizer=_tokenizer_config(
            ctx, tree.get("get_tokenizer", _MISSING), tree.get("allowed_special", "all")
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

"""The safe HyperPyYAML reader and its mapping into ModelConfig."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cosyserve.errors import ModelConfigError
from cosyserve.families.cosyvoice1.config import (
    FlowConfig,
    LengthRegulatorConfig,
    LLMConfig,
    ModelConfig,
    TokenizerConfig,
    load_model_config,
    parse_model_config,
)
from cosyserve.nn.config import (
    CFMConfig,
    EncoderConfig,
    EstimatorConfig,
    F0PredictorConfig,
    HiFTConfig,
    MelConfig,
    SamplingConfig,
)
from cosyserve.nn.yaml_reader import Tagged, parse_yaml_tree

SHARED = Path(__file__).resolve().parents[2] / "shared"
SET_A_YAML = SHARED / "parity" / "cosyvoice1" / "set_a" / "cosyvoice.yaml"
FULL_YAML = SHARED / "models" / "cosyvoice-300m-sft-arch" / "cosyvoice.yaml"
TINY_YAML = Path(__file__).parent / "families" / "cosyvoice1" / "tiny.yaml"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_set_a_every_field() -> None:
    """Every field of the reduced parity yaml, against the dims its README lists."""
    cfg = load_model_config(_need(SET_A_YAML))
    expected = ModelConfig(
        family="cosyvoice1",
        sample_rate=22050,
        llm=LLMConfig(
            text_encoder_input_size=32,
            llm_input_size=96,
            llm_output_size=128,
            text_token_size=51866,
            speech_token_size=4096,
            spk_embed_dim=192,
            text_encoder=EncoderConfig(
                input_size=32,
                output_size=128,
                attention_heads=4,
                linear_units=256,
                num_blocks=2,
                input_layer="linear",
                activation="swish",
                block_type="conformer",
                causal=True,
                pos_enc_max_len=5000,
            ),
            llm=EncoderConfig(
                input_size=96,
                output_size=128,
                attention_heads=4,
                linear_units=256,
                num_blocks=2,
                input_layer="linear_legacy",
                activation="relu",
                block_type="transformer",
                causal=True,
                pos_enc_max_len=5000,
            ),
            sampling=SamplingConfig(top_p=0.8, top_k=25, win_size=10, tau_r=0.1),
            min_token_text_ratio=2.0,
            max_token_text_ratio=20.0,
        ),
        flow=FlowConfig(
            input_size=64,
            output_size=80,
            spk_embed_dim=192,
            vocab_size=4096,
            input_frame_rate=50,
            encoder=EncoderConfig(
                input_size=64,
                output_size=128,
                attention_heads=4,
                linear_units=256,
                num_blocks=2,
                input_layer="linear",
                activation="swish",
                block_type="conformer",
                causal=False,
                pos_enc_max_len=5000,
            ),
            length_regulator=LengthRegulatorConfig(channels=80, sampling_ratios=(1, 1, 1, 1)),
            cfm=CFMConfig(
                inference_cfg_rate=0.7, t_scheduler="cosine", solver="euler", n_timesteps=10, temperature=1.0
            ),
            estimator=EstimatorConfig(
                in_channels=320,
                out_channels=80,
                channels=(64, 64),
                attention_head_dim=32,
                n_blocks=2,
                num_mid_blocks=2,
                num_heads=4,
                act_fn="gelu",
            ),
        ),
        hift=HiFTConfig(
            in_channels=80,
            base_channels=64,
            nb_harmonics=8,
            sampling_rate=22050,
            nsf_alpha=0.1,
            nsf_sigma=0.003,
            nsf_voiced_threshold=10.0,
            upsample_rates=(8, 8),
            upsample_kernel_sizes=(16, 16),
            istft_n_fft=16,
            istft_hop_len=4,
            resblock_kernel_sizes=(3, 7, 11),
            resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
            source_resblock_kernel_sizes=(7, 11),
            source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5)),
            lrelu_slope=0.1,
            audio_limit=0.99,
            f0_predictor=F0PredictorConfig(num_class=1, in_channels=80, cond_channels=64),
        ),
        mel=MelConfig(
            n_fft=1024,
            num_mels=80,
            sampling_rate=22050,
            hop_size=256,
            win_size=1024,
            fmin=0.0,
            fmax=8000.0,
            center=False,
        ),
        tokenizer=TokenizerConfig(
            multilingual=True, num_languages=100, language="en", task="transcribe", allowed_special="all"
        ),
    )
    # Field by field first, so a failure names the field.
    for f in dataclasses.fields(ModelConfig):
        assert getattr(cfg, f.name) == getattr(expected, f.name), f.name
    assert cfg == expected
    # Types matter to the network code (tuples, not lists; floats where floats).
    assert isinstance(cfg.flow.estimator.channels, tuple)
    assert isinstance(cfg.hift.resblock_dilation_sizes[0], tuple)
    assert isinstance(cfg.hift.nsf_voiced_threshold, float)


def test_full_size_is_the_published_default() -> None:
    cfg = load_model_config(_need(FULL_YAML))
    assert cfg == ModelConfig()  # config.py's defaults are the published CosyVoice-300M-SFT sizes
    assert cfg.llm.llm.num_blocks == 14 and cfg.llm.text_encoder.output_size == 1024
    assert cfg.flow.estimator.num_mid_blocks == 12 and cfg.hift.base_channels == 512


def test_tiny_template_parses() -> None:
    cfg = load_model_config(_need(TINY_YAML))
    assert cfg.family == "cosyvoice1"
    assert cfg.llm.llm.block_type == "transformer" and cfg.llm.llm.causal


def test_apply_and_new_are_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = SET_A_YAML.read_text() if SET_A_YAML.exists() else TINY_YAML.read_text()
    text += (
        f'\n__evil1: !apply:os.system ["touch {marker}"]\n'
        f'__evil2: !new:subprocess.Popen {{args: ["touch", "{marker}"]}}\n'
        f"__evil3: !name:builtins.exec [\"open('{marker}', 'w')\"]\n"
        f"__evil4: !!python/object/apply:os.system ['touch {marker}']\n"
    )
    # The python/object tag is not a HyperPyYAML tag: SafeLoader semantics make it inert too.
    cfg = parse_model_config(text.replace("!!python/object/apply:os.system", "!python_apply"), "evil.yaml")
    assert cfg.family == "cosyvoice1"
    tree = parse_yaml_tree(text.replace("!!python/object/apply:os.system", "!python_apply"))
    assert isinstance(tree["__evil1"], Tagged) and tree["__evil1"].target == "os.system"
    assert tree["__evil2"].kind == "new" and tree["__evil2"].target == "subprocess.Popen"
    assert not marker.exists()
    # A real !!python tag is refused (yaml.SafeLoader), not executed.
    with pytest.raises(ModelConfigError, match="not valid YAML"):
        parse_model_config(text, "evil.yaml")
    assert not marker.exists()


def test_ref_expressions_and_interpolation() -> None:
    tree = parse_yaml_tree(
        """
a: 3
b: !ref <a>
c: !ref <a> * <b> + 1
d: !ref <root>/sub
root: /x
e: !ref <m[k]>
m: {k: 7}
t: !tuple (1, 2)
"""
    )
    assert tree["b"] == 3 and tree["c"] == 10 and tree["d"] == "/x/sub" and tree["e"] == 7
    assert tree["t"] == (1, 2)


def test_ref_to_missing_key_and_cycles() -> None:
    with pytest.raises(ModelConfigError, match="does not exist"):
        parse_yaml_tree("a: !ref <nope>")
    with pytest.raises(ModelConfigError, match="circular"):
        parse_yaml_tree("a: !ref <b>\nb: !ref <a>")


def test_unknown_class_names_key_and_class() -> None:
    text = (
        _need(SET_A_YAML)
        .read_text()
        .replace("!new:cosyvoice.flow.length_regulator.InterpolateRegulator", "!new:mypkg.MyRegulator")
    )
    with pytest.raises(ModelConfigError) as err:
        parse_model_config(text, "x.yaml")
    assert "flow.length_regulator" in err.value.message and "mypkg.MyRegulator" in err.value.message


def test_unknown_top_class() -> None:
    text = (
        _need(SET_A_YAML)
        .read_text()
        .replace("!new:cosyvoice.hifigan.generator.HiFTGenerator", "!new:cosyvoice.hifigan.generator.Other")
    )
    with pytest.raises(ModelConfigError, match=r"'hift'.*cosyvoice\.hifigan\.generator\.Other"):
        parse_model_config(text)


@pytest.mark.parametrize(
    ("old", "new", "family"),
    [
        ("!new:cosyvoice.llm.llm.TransformerLM", "!new:cosyvoice.llm.llm.Qwen2LM", "CosyVoice2"),
        (
            "!new:cosyvoice.flow.flow.MaskedDiffWithXvec",
            "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
            "CosyVoice2",
        ),
        (
            "!new:cosyvoice.hifigan.generator.HiFTGenerator",
            "!new:cosyvoice.hifigan.generator.CausalHiFTGenerator",
            "CosyVoice3",
        ),
    ],
)
def test_other_family(old: str, new: str, family: str) -> None:
    text = _need(SET_A_YAML).read_text().replace(old, new)
    with pytest.raises(ModelConfigError, match=f"describes a {family} model"):
        parse_model_config(text)


def test_upstream_defaults_applied() -> None:
    text = _need(SET_A_YAML).read_text()
    # Omitting use_cnn_module / macaron_style means upstream's default True: a conv module we do not have.
    bad = text.replace("        use_cnn_module: False\n        macaron_style: False\n", "", 1)
    with pytest.raises(ModelConfigError, match="macaron_style"):
        parse_model_config(bad)
    # A TransformerEncoder without explicit layer types gets abs_pos / selfattn upstream.
    bad = text.replace(
        "        input_layer: 'linear_legacy'\n        pos_enc_layer_type: 'rel_pos_espnet'\n",
        "        input_layer: 'linear_legacy'\n",
    )
    with pytest.raises(ModelConfigError, match="pos_enc_layer_type.*abs_pos"):
        parse_model_config(bad)
    # Explicit activation_type overrides the class default.
    ok = text.replace(
        "        input_layer: 'linear_legacy'\n",
        "        input_layer: 'linear_legacy'\n        activation_type: 'swish'\n",
    )
    assert parse_model_config(ok).llm.llm.activation == "swish"
    # static_chunk_size > 1 is block attention: refused with the key named.
    with pytest.raises(ModelConfigError, match=r"llm\.llm\.static_chunk_size"):
        parse_model_config(
            text.replace(
                "        static_chunk_size: 1\n    sampling", "        static_chunk_size: 4\n    sampling"
            )
        )


def test_missing_inference_key() -> None:
    text = _need(SET_A_YAML).read_text()
    start = text.index("hift: !new:")
    end = text.index("# processor functions")
    with pytest.raises(ModelConfigError, match="'hift' is missing"):
        parse_model_config(text[:start] + text[end:])


def test_bad_value_type() -> None:
    text = _need(SET_A_YAML).read_text().replace("base_channels: 64", "base_channels: many")
    with pytest.raises(ModelConfigError, match=r"hift\.base_channels.*integer"):
        parse_model_config(text)


def test_not_yaml_and_not_mapping(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match="not valid YAML"):
        parse_model_config("a: [1, 2\n")
    with pytest.raises(ModelConfigError, match="mapping at the top level"):
        parse_model_config("- 1\n- 2\n")
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_config(tmp_path / "missing.yaml")

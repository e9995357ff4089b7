"""`cosyvoice2.yaml` -> CosyVoice2Config: the audio side (flow, HiFT, mel), read safely."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from cosyserve.errors import ModelConfigError
from cosyserve.families import import_family
from cosyserve.families.cosyvoice2.config import (
    CausalFlowConfig,
    CosyVoice2Config,
    UpsampleEncoderConfig,
    config_from_tree,
    load_model_config,
)
from cosyserve.families.cosyvoice2.llm import Qwen2LMConfig
from cosyserve.nn.config import CausalEstimatorConfig, CFMConfig, HiFTConfig, MelConfig
from cosyserve.nn.qwen2 import Qwen2Config
from cosyserve.nn.yaml_reader import parse_yaml_tree

pytestmark = pytest.mark.timeout(60)

SHARED = Path(__file__).resolve().parents[3].parent / "shared"
SET_A = SHARED / "parity" / "cosyvoice2" / "set_a"
FULL = SHARED / "models" / "cosyvoice2-0.5b-arch"


_weights = shutil.ignore_patterns("*.safetensors")


def _need(path: Path) -> Path:
    if not (path / "cosyvoice2.yaml").exists():
        pytest.skip(f"{path} not available")
    return path


def test_full_size_is_the_published_default() -> None:
    """The published architecture maps to the dataclass defaults (which describe CosyVoice2-0.5B)."""
    cfg = load_model_config(_need(FULL))
    default = CosyVoice2Config()
    assert (cfg.family, cfg.sample_rate, cfg.flow, cfg.hift, cfg.mel) == (
        default.family,
        default.sample_rate,
        default.flow,
        default.hift,
        default.mel,
    )
    # The LLM: the yaml's Qwen2LM node with the backbone of CosyVoice-BlankEN/config.json.
    assert cfg.llm == Qwen2LMConfig(
        llm_input_size=896, llm_output_size=896, speech_token_size=6561, mix_ratio=(5, 15)
    )
    assert cfg.llm.backbone == Qwen2Config()


def test_set_a_every_field() -> None:
    """The reduced parity yaml, against the dims its README lists (through the family package)."""
    cfg = import_family("cosyvoice2").load_config(_need(SET_A))
    assert cfg.flow == CausalFlowConfig(
        input_size=512,
        output_size=80,
        spk_embed_dim=192,
        vocab_size=4096,
        input_frame_rate=25,
        token_mel_ratio=2,
        pre_lookahead_len=3,
        encoder=UpsampleEncoderConfig(
            input_size=512,
            output_size=512,
            attention_heads=8,
            linear_units=64,
            num_blocks=1,
            input_layer="linear",
            activation="swish",
            block_type="conformer",
            causal=False,
            static_chunk_size=25,
        ),
        cfm=CFMConfig(inference_cfg_rate=0.7, t_scheduler="cosine", solver="euler"),
        estimator=CausalEstimatorConfig(
            in_channels=320,
            out_channels=80,
            channels=(64,),
            attention_head_dim=16,
            n_blocks=1,
            num_mid_blocks=2,
            num_heads=4,
            act_fn="gelu",
            static_chunk_size=50,  # !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks=-1,
        ),
    )
    assert cfg.hift == HiFTConfig(
        base_channels=64,
        sampling_rate=24000,
        upsample_rates=(8, 5, 3),
        upsample_kernel_sizes=(16, 11, 7),
        source_resblock_kernel_sizes=(7, 7, 11),
        source_resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        f0_predictor=HiFTConfig().f0_predictor.__class__(num_class=1, in_channels=80, cond_channels=64),
    )
    assert cfg.mel == MelConfig(n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920)
    assert cfg.sample_rate == 24000


def _set_a_text() -> str:
    return (_need(SET_A) / "cosyvoice2.yaml").read_text(encoding="utf-8")


def _with(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("use_cnn_module: False", "use_cnn_module: True", r"flow\.encoder\.use_cnn_module"),
        (
            "pos_enc_layer_type: 'rel_pos_espnet'",
            "pos_enc_layer_type: 'abs_pos'",
            r"pos_enc_layer_type.*abs_pos",
        ),
        ("pre_lookahead_len: 3", "pre_lookahead_len: 2", r"flow\.pre_lookahead_len.*reads 3 tokens ahead"),
        (
            "token_mel_ratio: !ref <token_mel_ratio>",
            "token_mel_ratio: 3",
            r"flow\.token_mel_ratio.*2 mel frames",
        ),
        ("act_fn: 'gelu'", "act_fn: 'snake'", r"estimator\.act_fn.*snake"),
        ("solver: 'euler'", "solver: 'midpoint'", r"cfm_params\.solver"),
        ("t_scheduler: 'cosine'", "t_scheduler: 'linear'", r"t_scheduler.*'linear'"),
        ("hop_size: 480", "hop_size: 256", r"feat_extractor.*hop 256.*480 samples per mel frame"),
        (
            "sampling_rate: !ref <sample_rate>",  # the first one is hift's
            "sampling_rate: 22050",
            r"'sample_rate' \(24000\) != 'hift\.sampling_rate' \(22050\)",
        ),
        ("sample_rate: 24000", "sample_rate: 22050", r"input_frame_rate.*is not the mel frame rate"),
        (
            "decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM",
            "decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM",
            r"flow\.decoder.*ConditionalCFM",
        ),
    ],
)
def test_unsupported_values_name_the_key(old: str, new: str, message: str) -> None:
    text = _with(_set_a_text(), old, new)
    with pytest.raises(ModelConfigError, match=message) as err:
        config_from_tree(parse_yaml_tree(text, "cosyvoice2.yaml"), "cosyvoice2.yaml")
    assert err.value.message.startswith("cosyvoice2.yaml: ")


def test_nothing_named_in_the_file_is_executed(tmp_path: Path) -> None:
    text = _with(
        _set_a_text(), "__set_seed1: !apply:random.seed [1986]", "__set_seed1: !apply:os.system ['exit 1']"
    )
    (tmp_path / "cosyvoice2.yaml").write_text(text, encoding="utf-8")
    shutil.copytree(SET_A / "CosyVoice-BlankEN", tmp_path / "CosyVoice-BlankEN", ignore=_weights)
    cfg = load_model_config(tmp_path)  # a directory or the file itself
    assert cfg == load_model_config(tmp_path / "cosyvoice2.yaml")
    assert cfg.flow == load_model_config(_need(SET_A)).flow


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ModelConfigError, match=re.escape(str(tmp_path / "cosyvoice2.yaml"))):
        load_model_config(tmp_path)


def test_set_a_llm_reads_the_backbone_config() -> None:
    cfg = load_model_config(_need(SET_A))
    assert cfg.llm is not None
    assert (cfg.llm.llm_input_size, cfg.llm.speech_token_size, cfg.llm.mix_ratio) == (64, 6561, (5, 15))
    backbone = cfg.llm.backbone
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads) == (64, 2, 4)
    assert (backbone.num_key_value_heads, backbone.intermediate_size, backbone.vocab_size) == (2, 128, 4096)


def test_missing_backbone_config_is_a_config_error(tmp_path: Path) -> None:
    shutil.copy(_need(SET_A) / "cosyvoice2.yaml", tmp_path)
    with pytest.raises(ModelConfigError, match=r"CosyVoice-BlankEN/config\.json: missing"):
        load_model_config(tmp_path)

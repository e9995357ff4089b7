"""`cosyvoice3.yaml` -> typed configs of the audio side: the published architecture, every parity
set (dims agree with the checkpoints), and clear ModelConfigError messages for what cannot run."""

from __future__ import annotations

import pytest
import torch

from cosyserve.errors import ModelConfigError
from cosyserve.families import detect, import_family
from cosyserve.families.cosyvoice3.config import load_model_config, parse_model_config
from tests.helpers.parity import REPO_ROOT, discover_sets

pytestmark = pytest.mark.timeout(120)

ARCH_YAML = REPO_ROOT.parent / "shared" / "models" / "cosyvoice3-0.5b-arch" / "cosyvoice3.yaml"
SETS = discover_sets("cosyvoice3")


def arch_text() -> str:
    if not ARCH_YAML.is_file():
        pytest.skip(f"{ARCH_YAML} is not available")
    return ARCH_YAML.read_text(encoding="utf-8")


def test_published_architecture() -> None:
    cfg = parse_model_config(arch_text(), "arch.yaml")
    dit = cfg.flow.dit
    assert (dit.dim, dit.depth, dit.heads, dit.dim_head, dit.ff_mult) == (1024, 22, 16, 64, 2)
    assert dit.in_channels == 320 and dit.static_chunk_size == 50
    assert cfg.flow.pre_lookahead.channels == 1024 and cfg.flow.pre_lookahead_len == 3
    assert (cfg.flow.vocab_size, cfg.flow.token_mel_ratio, cfg.flow.input_frame_rate) == (6561, 2, 25)
    assert cfg.flow.cfm.inference_cfg_rate == 0.7
    hift = cfg.hift
    assert hift.sampling_rate == 24000 and hift.samples_per_frame == 480
    assert hift.upsample_rates == (8, 5, 3) and hift.source_resblock_kernel_sizes == (7, 7, 11)
    assert hift.f0_predictor.cond_channels == 512 and hift.conv_pre_look_right == 4
    assert cfg.mel.hop_size == 480 and cfg.mel.fmax == 12000.0  # fmax: null = Nyquist
    assert cfg.llm is None  # the text alone: no backbone config.json beside it


def test_published_directory_config_has_the_llm() -> None:
    """load_config(dir) = the yaml and CosyVoice-BlankEN/config.json: the whole typed config."""
    arch_text()
    cfg = import_family("cosyvoice3").load_config(ARCH_YAML.parent)
    llm = cfg.llm
    assert llm is not None and (llm.llm_input_size, llm.speech_token_size, llm.mix_ratio) == (
        896,
        6561,
        (5, 15),
    )
    backbone = llm.backbone
    assert (backbone.num_hidden_layers, backbone.num_attention_heads, backbone.num_key_value_heads) == (
        24,
        14,
        2,
    )
    assert backbone.rope_theta == 1e6 and backbone.tie_word_embeddings
    assert (llm.sampling.top_p, llm.sampling.top_k, llm.sampling.win_size) == (0.8, 25, 10)
    assert cfg.flow == parse_model_config(arch_text()).flow


@pytest.mark.parametrize("path", SETS, ids=[p.name for p in SETS])
def test_parity_sets_agree_with_their_checkpoints(path) -> None:
    cfg = import_family(detect(path).name).load_config(path)
    assert cfg == load_model_config(path / "cosyvoice3.yaml")
    assert cfg.llm is not None
    llm = torch.load(path / "llm.pt", weights_only=True)
    assert llm["speech_embedding.weight"].shape == (cfg.llm.speech_token_size + 200, cfg.llm.llm_input_size)
    flow = torch.load(path / "flow.pt", weights_only=True)
    dit = cfg.flow.dit
    assert flow["decoder.estimator.input_embed.proj.weight"].shape == (dit.dim, dit.in_channels)
    assert flow["decoder.estimator.rotary_embed.inv_freq"].shape == (dit.dim_head // 2,)
    blocks = {k.split(".")[3] for k in flow if k.startswith("decoder.estimator.transformer_blocks.")}
    assert len(blocks) == dit.depth
    assert flow["pre_lookahead_layer.conv1.weight"].shape[0] == cfg.flow.pre_lookahead.channels
    hift = torch.load(path / "hift.pt", weights_only=True)
    assert hift["conv_pre.weight_v"].shape[0] == cfg.hift.base_channels


def _variant(old: str, new: str) -> str:
    text = arch_text()
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
            "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
            "'flow'",
        ),
        ("nb_harmonics: 8", "nb_harmonics: 7", "noise"),
        ("dim: 1024\n", "dim: 1000\n", "divisible by 16"),
        ("sample_rate: 24000", "sample_rate: 22050", "SineGen2"),
        (
            "    sampling_rate: !ref <sample_rate>\n    nsf_alpha",
            "    sampling_rate: 16000\n    nsf_alpha",
            "16000",
        ),
        (
            "            ff_mult: 2\n",
            "            ff_mult: 2\n            long_skip_connection: true\n",
            "long_skip",
        ),
        ("    conv_pre_look_right: 4", "    conv_pre_look_right: 0", "conv_pre_look_right"),
        ("t_scheduler: 'cosine'", "t_scheduler: 'linear'", "t_scheduler"),
        ("in_channels: 80\n        channels: 1024", "in_channels: 96\n        channels: 1024", "input_size"),
    ],
)
def test_unsupported_options_are_refused(old: str, new: str, message: str) -> None:
    text = _variant(old, new)
    with pytest.raises(ModelConfigError, match=message) as info:
        parse_model_config(text, "variant.yaml")
    assert "variant.yaml" in str(info.value)


def test_missing_vocoder_and_bad_yaml() -> None:
    text = arch_text()
    without_hift = text[: text.index("hift: !new:")] + text[text.index("# gan related module") :]
    without_hift = without_hift.replace("generator: !ref <hift>", "generator: null")
    with pytest.raises(ModelConfigError, match="'hift' is missing"):
        parse_model_config(without_hift, "x.yaml")
    with pytest.raises(ModelConfigError, match="not valid YAML"):
        parse_model_config("flow: [unclosed", "x.yaml")


def test_config_file_or_directory(tmp_path) -> None:
    (tmp_path / "cosyvoice3.yaml").write_text(arch_text(), encoding="utf-8")
    assert load_model_config(tmp_path) == load_model_config(tmp_path / "cosyvoice3.yaml")
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_model_config(tmp_path / "missing")

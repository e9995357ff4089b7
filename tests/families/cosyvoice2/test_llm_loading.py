"""Loading the CosyVoice2/3 LLM from a model directory: the yaml's ``llm`` node plus
``CosyVoice-BlankEN/config.json`` into typed configs (clear errors), and ``llm.pt`` loaded strictly
with the unused text head dropped and the text table adopted in its stored dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosyserve.errors import ModelConfigError, ModelDirectoryError
from cosyserve.families.cosyvoice2.llm import Qwen2LM, load_llm, load_llm_config, qwen2_lm_config
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM
from cosyserve.families.cosyvoice3.llm import load_llm as load_llm3
from cosyserve.nn.qwen2 import qwen2_config_from_dict
from cosyserve.nn.yaml_reader import parse_yaml_tree

pytestmark = pytest.mark.timeout(120)

BACKBONE = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "model_type": "qwen2",
}


def llm_yaml(lm_class: str = "Qwen2LM", size: int = 32, sampling: str = "ras_sampling") -> str:
    return f"""
llm_input_size: {size}
llm_output_size: {size}
qwen_pretrain_path: ''
llm: !new:cosyvoice.llm.llm.{lm_class}
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.{sampling}
        top_p: 0.7
        top_k: 20
        win_size: 10
        tau_r: 0.1
"""


def write_model_dir(root: Path, family: str) -> tuple[Path, Qwen2LM]:
    """A tiny model directory in the official layout, llm.pt stored as float16 with a tied head."""
    yaml_name, lm_class = (
        ("cosyvoice3.yaml", "CosyVoice3LM") if family == "cosyvoice3" else ("cosyvoice2.yaml", "Qwen2LM")
    )
    (root / "CosyVoice-BlankEN").mkdir(parents=True)
    (root / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(BACKBONE), encoding="utf-8")
    (root / yaml_name).write_text(llm_yaml(lm_class), encoding="utf-8")
    cfg = qwen2_lm_config(
        parse_yaml_tree(llm_yaml(lm_class)),
        qwen2_config_from_dict(BACKBONE),
        "x",
        (f"cosyvoice.llm.llm.{lm_class}",),
    )
    torch.manual_seed(3)
    model = (CosyVoice3LM(cfg, endofprompt_id=250) if family == "cosyvoice3" else Qwen2LM(cfg)).eval()
    with torch.no_grad():  # fp16-representable weights, as the published files store them
        for p in model.parameters():
            p.copy_(p.half().float())
    state = {k: v.half() for k, v in model.state_dict().items()}
    state["llm.model.lm_head.weight"] = state["llm.model.model.embed_tokens.weight"]  # tied: same storage
    torch.save(state, root / "llm.pt")
    return root, model


def test_config_from_yaml_and_config_json(tmp_path: Path) -> None:
    root, _ = write_model_dir(tmp_path / "m", "cosyvoice2")
    cfg = load_llm_config(root)
    assert (cfg.llm_input_size, cfg.speech_token_size, cfg.mix_ratio) == (32, 6561, (5, 15))
    assert (cfg.sampling.top_p, cfg.sampling.top_k) == (0.7, 20)
    assert cfg.backbone.vocab_size == 300 and cfg.backbone.head_dim == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (llm_yaml(size=64), "hidden_size"),
        (llm_yaml("TransformerLM"), "unknown class"),
        (llm_yaml("CosyVoice3LM"), "unknown class"),
        (llm_yaml(sampling="nucleus_sampling"), "unknown class"),
        (llm_yaml().replace("[5, 15]", "[5]"), "mix_ratio"),
    ],
)
def test_config_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        qwen2_lm_config(parse_yaml_tree(text), qwen2_config_from_dict(BACKBONE), "cosyvoice2.yaml")


def test_missing_backbone_config_is_a_clear_error(tmp_path: Path) -> None:
    root, _ = write_model_dir(tmp_path / "m", "cosyvoice2")
    (root / "CosyVoice-BlankEN" / "config.json").unlink()
    with pytest.raises(ModelConfigError, match="config.json"):
        load_llm(root)


@pytest.mark.parametrize("family", ["cosyvoice2", "cosyvoice3"])
def test_llm_pt_loads_strictly_and_reproduces_the_network(tmp_path: Path, family: str) -> None:
    root, reference = write_model_dir(tmp_path / "m", family)
    model = load_llm3(root, endofprompt_id=250) if family == "cosyvoice3" else load_llm(root)
    assert type(model) is type(reference)
    assert model.backbone.embed_tokens.weight.dtype == torch.float16  # adopted as stored
    assert model.llm_decoder.weight.dtype == torch.float32  # compute weights in float32
    assert not any("lm_head" in k for k in model.state_dict())
    text = [5, 17, 151, 42, 250]  # 250 stands in for <|endofprompt|> (CosyVoice3 needs one)
    with torch.inference_mode():
        prefix = model.build_prefix(text, [7, 8], [100, 200, 300])
        torch.testing.assert_close(prefix, reference.build_prefix(text, [7, 8], [100, 200, 300]))
        cache_a, cache_b = model.new_cache(), reference.new_cache()
        torch.testing.assert_close(
            model.log_probs(model.prefill_hidden(prefix, cache_a)),
            reference.log_probs(reference.prefill_hidden(prefix, cache_b)),
            atol=1e-6,
            rtol=0,
        )


def test_mismatching_checkpoints_are_clear_errors(tmp_path: Path) -> None:
    root, _ = write_model_dir(tmp_path / "m", "cosyvoice2")
    state = torch.load(root / "llm.pt", weights_only=True)
    state["llm.model.lm_head.weight"] = torch.zeros(10, 32, dtype=torch.float16)
    torch.save(state, root / "llm.pt")
    with pytest.raises(ModelConfigError, match="lm_head"):
        load_llm(root)
    state.pop("llm.model.lm_head.weight")
    state["speech_embedding.weight"] = torch.zeros(6000, 32, dtype=torch.float16)
    torch.save(state, root / "llm.pt")
    with pytest.raises(ModelDirectoryError, match="speech_embedding.weight"):
        load_llm(root)

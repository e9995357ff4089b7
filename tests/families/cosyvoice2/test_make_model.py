"""`cosyserve make-model` for CosyVoice2: the tiny directory (`tiny_v2_model_dir`) is in the
official CosyVoice2-0.5B layout, its checkpoints have the keys and shapes the reference's modules
have (the parity set's, recorded with upstream) and load strictly, its tokenizer, ONNX stand-ins
and estimator ONNX work, and it makes audio. The full-size build is at the end (opt-in)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cosyserve.cli import main as cli_main
from cosyserve.errors import ModelConfigError, ModelDirectoryError
from cosyserve.families.cosyvoice2.config import load_model_config
from cosyserve.families.cosyvoice2.flow import CausalMaskedDiffWithXvec
from cosyserve.families.cosyvoice2.llm import load_llm
from cosyserve.families.cosyvoice2.token2wav import token2wav
from cosyserve.nn.checkpoint import load_into, read_checkpoint
from cosyserve.nn.hift import HiFTGenerator, load_hift
from cosyserve.text.qwen_tokenizer import COSYVOICE2_SPECIAL_TOKENS, load_qwen_tokenizer
from cosyserve.tools.make_model import make_model
from cosyserve.tools.qwen_tokenizer_files import qwen2_ranks_available
from tests.conftest import TINY_SEED, TINY_V2_CONFIG
from tests.helpers import make_model_checks as checks
from tests.helpers.parity import DEFAULT_PARITY_DIR, REPO_ROOT

pytestmark = pytest.mark.timeout(300)

SET_A = DEFAULT_PARITY_DIR / "cosyvoice2" / "set_a"
ARCH = REPO_ROOT.parent / "shared" / "models" / "cosyvoice2-0.5b-arch"
BACKBONE_SOURCE = TINY_V2_CONFIG.parent / "CosyVoice-BlankEN" / "config.json"


def load_flow(model_dir: Path) -> CausalMaskedDiffWithXvec:
    """flow.pt loaded strictly (memory-mapped) into the network the yaml describes."""
    flow = CausalMaskedDiffWithXvec(load_model_config(model_dir).flow)
    load_into(flow, read_checkpoint(model_dir / "flow.pt"), model_dir / "flow.pt")
    return flow.eval()


def load_vocoder(model_dir: Path) -> HiFTGenerator:
    return load_hift(read_checkpoint(model_dir / "hift.pt"), load_model_config(model_dir).hift)


def test_official_layout(tiny_v2_model_dir: Path) -> None:
    d = tiny_v2_model_dir
    assert checks.relative_files(d) == checks.official_files(
        "cosyvoice2.yaml", "speech_tokenizer_v2.onnx", True
    )
    assert (d / "cosyvoice2.yaml").read_bytes() == TINY_V2_CONFIG.read_bytes()
    hift = torch.load(d / "hift.pt", weights_only=True)
    # Legacy weight-norm names, as in the published hift.pt.
    assert "conv_pre.weight_g" in hift and "conv_pre.weight_v" in hift and "conv_pre.weight" not in hift
    spk = torch.load(d / "spk2info.pt", weights_only=True)  # the fixture asks for seven speakers
    assert len(spk) == 7 and all(v["embedding"].shape == (1, 192) for v in spk.values())


def test_checkpoints_have_the_reference_keys_and_shapes(tiny_v2_model_dir: Path) -> None:
    """Same architecture as parity set A (upstream's modules): same keys, same shapes except the
    vocabulary sizes the tiny config changes (text rows: 4,096 both; flow tokens: 6,561 vs 4,096)."""
    if not (SET_A / "llm.pt").exists():
        pytest.skip("cosyvoice2 parity set A not available")
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        ours, reference = (
            checks.checkpoint_shapes(tiny_v2_model_dir / name),
            checks.checkpoint_shapes(SET_A / name),
        )
        assert set(ours) == set(reference), name
        differ = {k for k in ours if ours[k] != reference[k]}
        assert differ <= {"input_embedding.weight"}, (name, differ)
    llm = torch.load(tiny_v2_model_dir / "llm.pt", weights_only=True, mmap=True)
    table, head = llm["llm.model.model.embed_tokens.weight"], llm["llm.model.lm_head.weight"]
    assert head.data_ptr() == table.data_ptr()  # tied, stored once, as published


def test_loads_strictly_and_makes_audio(tiny_v2_model_dir: Path) -> None:
    d = tiny_v2_model_dir
    tokenizer = load_qwen_tokenizer(d, "cosyvoice2")
    llm, flow, hift = load_llm(d), load_flow(d), load_vocoder(d)
    embedding = next(iter(torch.load(d / "spk2info.pt", weights_only=True).values()))["embedding"]
    text = tokenizer.encode("Hi there.")
    with torch.inference_mode():
        tokens = list(llm.generate(text, generator=0))
        streamed = list(llm.generate_bistream([text[:2], text[2:]], generator=0))
        mel = flow.inference(torch.tensor([tokens[:50]]), embedding=embedding)
        f0 = hift.f0_predictor(mel)
    # EOS is as likely as a speech token: decoding runs to the length limit (20 per text token).
    assert len(tokens) == len(streamed) == 20 * len(text)
    assert all(0 <= t < 6561 for t in tokens + streamed) and len(set(tokens)) > 50
    assert (f0 > 10).all()  # voiced: the harmonic source runs
    wav = token2wav(
        flow,
        hift,
        torch.tensor([tokens[:50]]),
        embedding=embedding,
        generator=torch.Generator().manual_seed(0),
    )
    checks.check_audio(wav, 50 * 2 * 480)


def test_tokenizer(tiny_v2_model_dir: Path) -> None:
    """The small byte-level BPE (the tiny text vocabulary is smaller than Qwen2's): every id, the
    CosyVoice2 specials included, below the text vocabulary; any text round-trips."""
    tokenizer = load_qwen_tokenizer(tiny_v2_model_dir, "cosyvoice2")
    config = checks.check_backbone_config(
        tiny_v2_model_dir, BACKBONE_SOURCE, tokenizer.token_id("<|endoftext|>")
    )
    assert tokenizer.vocab_size <= config["vocab_size"] == 4096
    for token in COSYVOICE2_SPECIAL_TOKENS:
        assert tokenizer.encode(f"a{token}b")[1:-1] == [tokenizer.token_id(token)]
    text = "Voice 42: 你好，世界! Ünïcödé 😀"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and max(ids) < tokenizer.token_id("<|endoftext|>")
    assert len(tokenizer.encode(" the")) == 1  # merges were learnt


def test_onnx_files(tiny_v2_model_dir: Path) -> None:
    checks.check_standins(tiny_v2_model_dir, "speech_tokenizer_v2.onnx", vocab_size=6561, token_rate=25)
    checks.check_estimator_onnx(tiny_v2_model_dir, load_flow(tiny_v2_model_dir).decoder.estimator)


def test_same_seed_same_files(tiny_v2_model_dir: Path, tmp_path: Path) -> None:
    make_model(TINY_V2_CONFIG, tmp_path / "again", seed=TINY_SEED, speakers=7)
    files = checks.relative_files(tiny_v2_model_dir)
    assert checks.relative_files(tmp_path / "again") == files
    for name in sorted(files):
        assert (tmp_path / "again" / name).read_bytes() == (tiny_v2_model_dir / name).read_bytes(), name


def test_speakers_option_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    make_model(TINY_V2_CONFIG, out, speakers=9)
    spk = torch.load(out / "spk2info.pt", weights_only=True)
    assert list(spk) == [
        "中文女",
        "中文男",
        "日语男",
        "粤语女",
        "英文女",
        "英文男",
        "韩语女",
        "speaker_8",
        "speaker_9",
    ]
    with pytest.raises(ModelDirectoryError, match="--force"):
        make_model(TINY_V2_CONFIG, out)
    make_model(TINY_V2_CONFIG, out, overwrite=True, speakers=0)
    assert not (out / "spk2info.pt").exists()  # no built-in speakers left behind
    make_model(TINY_V2_CONFIG, out, overwrite=True)
    assert len(torch.load(out / "spk2info.pt", weights_only=True)) == 1  # as published
    with pytest.raises(ModelConfigError, match="--speakers"):
        make_model(TINY_V2_CONFIG, tmp_path / "n", speakers=-1)


def test_config_errors(tmp_path: Path) -> None:
    """Refused before anything is written: a backbone config that is missing or disagrees with
    the yaml, a tokenizer that cannot fit, a file name that contradicts the classes."""
    lone = tmp_path / "lone" / "cosyvoice2.yaml"
    lone.parent.mkdir()
    lone.write_bytes(TINY_V2_CONFIG.read_bytes())
    with pytest.raises(ModelConfigError, match="--backbone_config"):
        make_model(lone, tmp_path / "a")
    wide = json.loads(BACKBONE_SOURCE.read_text()) | {"hidden_size": 128}
    (tmp_path / "wide.json").write_text(json.dumps(wide))
    with pytest.raises(ModelConfigError, match="hidden_size"):
        make_model(lone, tmp_path / "b", backbone_config=tmp_path / "wide.json")
    small = json.loads(BACKBONE_SOURCE.read_text()) | {"vocab_size": 200}
    (tmp_path / "small.json").write_text(json.dumps(small))
    with pytest.raises(ModelConfigError, match="too small"):
        make_model(lone, tmp_path / "c", backbone_config=tmp_path / "small.json")
    with pytest.raises(ModelConfigError, match="at least 151,663"):
        make_model(lone, tmp_path / "d", backbone_config=BACKBONE_SOURCE, tokenizer="qwen2")
    misnamed = tmp_path / "cosyvoice3.yaml"
    misnamed.write_bytes(TINY_V2_CONFIG.read_bytes())
    with pytest.raises(ModelConfigError, match="CosyVoice2's"):
        make_model(misnamed, tmp_path / "e", backbone_config=BACKBONE_SOURCE)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["make-model", "--config", str(TINY_V2_CONFIG), "--out", str(out), "--speakers", "2"]
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "CosyVoice-BlankEN/vocab.json" in text and "2 speakers" in text and "total parameters" in text
    assert cli_main([*args, "--tokenizer", "qwen2", "--force"]) == 1
    assert "151,663" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ full size


@checks.full_size
def test_full_size(tmp_path: Path) -> None:
    """The published architecture (~640 M parameters): every checkpoint key and shape of
    state_dict_shapes.json, strict loads, the Qwen2 tokenizer, the estimator ONNX."""
    out = tmp_path / "full"
    written = checks.build_full_size(ARCH, "cosyvoice2.yaml", out)
    assert written["llm.pt"].parameters == 505_803_812 and written["llm.pt"].entries == 295
    assert written["flow.pt"].parameters == 112_549_360 and written["flow.pt"].entries == 1121
    assert written["hift.pt"].checkpoint_values == 20_821_295 and written["hift.pt"].entries == 328
    load_vocoder(out)
    llm = load_llm(out)
    assert llm.backbone.embed_tokens.weight.shape == (151_936, 896)
    del llm
    checks.check_estimator_onnx(out, load_flow(out).decoder.estimator)
    tokenizer = load_qwen_tokenizer(out, "cosyvoice2")
    checks.check_backbone_config(
        out, ARCH / "CosyVoice-BlankEN" / "config.json", tokenizer.token_id("<|endoftext|>")
    )
    if qwen2_ranks_available():
        assert tokenizer.endofprompt_id == 151646  # what upstream hard-codes
    assert torch.isfinite(torch.load(out / "spk2info.pt", weights_only=True)["中文女"]["embedding"]).all()

"""`cosyserve make-model`: the generated directory is in the official format and loads strictly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.cli import main as cli_main
from cosyserve.errors import ModelConfigError, ModelDirectoryError
from cosyserve.tools.make_model import SFT_SPEAKERS, make_model


def test_official_layout(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {
        "cosyvoice.yaml",
        "llm.pt",
        "flow.pt",
        "hift.pt",
        "spk2info.pt",
        "campplus.onnx",
        "speech_tokenizer_v1.onnx",
    } <= names
    assert not any(n.endswith(".partial") for n in names)
    hift = torch.load(tiny_model_dir / "hift.pt", weights_only=True)
    # Legacy weight-norm names, as in the published hift.pt.
    assert "conv_pre.weight_g" in hift and "conv_pre.weight_v" in hift and "conv_pre.weight" not in hift
    assert hift["conv_pre.weight_g"].shape == (hift["conv_pre.weight_v"].shape[0], 1, 1)
    spk = torch.load(tiny_model_dir / "spk2info.pt", weights_only=True)
    assert list(spk) == list(SFT_SPEAKERS)
    assert all(set(v) == {"embedding"} and v["embedding"].shape == (1, 192) for v in spk.values())


def test_onnx_standins_run(tiny_model_dir: Path) -> None:
    import onnxruntime

    cam = onnxruntime.InferenceSession(
        str(tiny_model_dir / "campplus.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,) = cam.get_inputs()
    assert inp.name == "input" and inp.type == "tensor(float)" and inp.shape[2] == 80
    fbank = np.random.default_rng(0).standard_normal((1, 123, 80)).astype(np.float32)
    (emb,) = cam.run(None, {inp.name: fbank})
    assert emb.shape == (1, 192) and emb.dtype == np.float32

    tok = onnxruntime.InferenceSession(
        str(tiny_model_dir / "speech_tokenizer_v1.onnx"), providers=["CPUExecutionProvider"]
    )
    ins = tok.get_inputs()
    assert [i.name for i in ins] == ["feats", "feats_length"]
    assert ins[0].type == "tensor(float)" and ins[0].shape[1] == 128 and ins[1].type == "tensor(int32)"
    assert [o.name for o in tok.get_outputs()] == ["indices"]
    # Exactly how upstream's frontend calls it: inputs by position, length as int32 [1].
    feat = np.random.default_rng(1).standard_normal((1, 128, 100)).astype(np.float32)
    ids = tok.run(None, {ins[0].name: feat, ins[1].name: np.array([feat.shape[2]], dtype=np.int32)})[0]
    assert ids.shape == (1, 50) and ids.min() >= 0 and ids.max() < 4096
    assert len(np.unique(ids)) > 10


def test_tiny_model_makes_finite_non_silent_audio(tiny_loaded_model) -> None:
    m = tiny_loaded_model
    emb = m.speakers["英文女"]
    with torch.inference_mode():
        tokens = list(
            m.llm.generate(torch.tensor([[1000, 2000, 3000, 40]]), embedding=emb, generator=0, num_tokens=45)
        )
        assert len(tokens) == 45 and all(0 <= t < 4096 for t in tokens)
        mel, _ = m.flow.inference(
            torch.tensor([tokens]), embedding=emb, generator=torch.Generator().manual_seed(0)
        )
        speech, _ = m.hift.inference(mel, generator=torch.Generator().manual_seed(0))
        f0 = m.hift.f0_predictor(mel)
    assert torch.isfinite(mel).all() and torch.isfinite(speech).all()
    assert speech.shape[-1] == 256 * mel.shape[-1]
    assert speech.abs().max() > 0.01 and speech.std() > 1e-3  # not silent
    assert (speech.abs() >= 0.99).float().mean() < 0.05  # not clipped noise either
    assert (f0 > 10).all()  # voiced: the harmonic source path runs


def test_same_seed_same_files(tiny_model_dir: Path, tiny_config_path: Path, tmp_path: Path) -> None:
    from tests.conftest import TINY_SEED

    out = tmp_path / "again"
    make_model(tiny_config_path, out, seed=TINY_SEED)
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        a = torch.load(out / name, weights_only=True)
        b = torch.load(tiny_model_dir / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a = torch.load(out / "spk2info.pt", weights_only=True)
    b = torch.load(tiny_model_dir / "spk2info.pt", weights_only=True)
    assert all(torch.equal(a[k]["embedding"], b[k]["embedding"]) for k in a)
    for name in ("campplus.onnx", "speech_tokenizer_v1.onnx"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_refuses_to_overwrite(tiny_model_copy: Path, tiny_config_path: Path) -> None:
    with pytest.raises(ModelDirectoryError, match="--force"):
        make_model(tiny_config_path, tiny_model_copy)
    make_model(tiny_config_path, tiny_model_copy, seed=5, overwrite=True)


def test_cli(tiny_config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert cli_main(["make-model", "--config", str(tiny_config_path), "--out", str(out), "--seed", "7"]) == 0
    text = capsys.readouterr().out
    assert "llm.pt" in text and "parameters" in text and "total parameters" in text
    assert cli_main(["make-model", "--config", str(tiny_config_path), "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size(tmp_path: Path) -> None:
    """The published architecture: parameter counts of PARAMS.md, strict load (~1.7 GB, a minute)."""
    arch = Path(__file__).resolve().parents[2] / "shared" / "models" / "cosyvoice-300m-sft-arch"
    if not (arch / "cosyvoice.yaml").exists():
        pytest.skip("full-size architecture yaml not available")
    written = {f.name: f for f in make_model(arch / "cosyvoice.yaml", tmp_path / "full")}
    assert written["llm.pt"].parameters == 310_718_465 and written["llm.pt"].entries == 401
    assert written["flow.pt"].parameters == 104_874_752 and written["flow.pt"].entries == 1185
    assert written["hift.pt"].checkpoint_values == 20_460_591 and written["hift.pt"].entries == 227
    assert written["hift.pt"].parameters == 20_447_517
    import json

    shapes = json.loads((arch / "state_dict_shapes.json").read_text())
    for name in ("llm.pt", "flow.pt", "hift.pt"):
        sd = torch.load(tmp_path / "full" / name, weights_only=True, mmap=True)
        assert {k: list(v.shape) for k, v in sd.items()} == shapes[name], name
        del sd
    from cosyserve.families.cosyvoice1.loader import load_model_directory

    load_model_directory(tmp_path / "full")


def test_speakers_option(tiny_config_path: Path, tmp_path: Path) -> None:
    """`--speakers N`: the first N published names; v1 needs at least one (its loader requires spk2info.pt)."""
    make_model(tiny_config_path, tmp_path / "two", speakers=2)
    assert list(torch.load(tmp_path / "two" / "spk2info.pt", weights_only=True)) == list(SFT_SPEAKERS[:2])
    with pytest.raises(ModelConfigError, match="at least one"):
        make_model(tiny_config_path, tmp_path / "none", speakers=0)
    assert not (tmp_path / "none").exists()

"""Opening model directories (loader.py) and finding/downloading them (hub.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cosyserve import hub
from cosyserve.errors import DownloadError, ModelConfigError, ModelDirectoryError
from cosyserve.families.cosyvoice1.loader import (
    REQUIRED_FILES,
    find_model_files,
    load_model_directory,
    read_checkpoint,
    read_speakers,
)
from cosyserve.tools.make_model import SFT_SPEAKERS

# ------------------------------------------------------------------------------ loader


def test_loads_strict(tiny_loaded_model) -> None:
    m = tiny_loaded_model
    assert m.config.family == "cosyvoice1"
    assert list(m.speakers) == list(SFT_SPEAKERS)
    assert all(e.shape == (1, 192) and e.dtype == torch.float32 for e in m.speakers.values())
    assert not m.llm.training and not m.flow.training and not m.hift.training
    assert m.files.supports_zero_shot and m.supports_zero_shot


def test_missing_zero_shot_files_are_optional(tiny_model_copy: Path) -> None:
    (tiny_model_copy / "campplus.onnx").unlink()
    files = find_model_files(tiny_model_copy)
    assert files.campplus is None and files.speech_tokenizer is not None and not files.supports_zero_shot
    m = load_model_directory(tiny_model_copy)  # SFT still loads
    assert not m.supports_zero_shot


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_missing_file(tiny_model_copy: Path, name: str) -> None:
    (tiny_model_copy / name).unlink()
    with pytest.raises(ModelDirectoryError, match=f"missing {name}"):
        find_model_files(tiny_model_copy)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelDirectoryError, match="not found"):
        find_model_files(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelDirectoryError, match="not a directory"):
        find_model_files(tmp_path / "file")


@pytest.mark.parametrize("name", ["llm.pt", "flow.pt", "hift.pt"])
def test_truncated_checkpoint(tiny_model_copy: Path, name: str) -> None:
    path = tiny_model_copy / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelDirectoryError) as err:
        load_model_directory(tiny_model_copy)
    assert name in err.value.message and "truncated or corrupt" in err.value.message


def test_garbage_and_empty_checkpoint(tmp_path: Path) -> None:
    garbage = tmp_path / "llm.pt"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    with pytest.raises(ModelDirectoryError, match="llm.pt: .*checkpoint"):
        read_checkpoint(garbage)
    empty = tmp_path / "flow.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelDirectoryError, match="flow.pt: .*checkpoint"):
        read_checkpoint(empty)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # would run on unpickling without weights_only
            return (print, ("pwned",))

    path = tmp_path / "llm.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ModelDirectoryError, match="refusing to unpickle"):
        read_checkpoint(path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "llm.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ModelDirectoryError, match="expected a state dict"):
        read_checkpoint(path)
    torch.save({"a": torch.zeros(1), "b": 3}, path)
    with pytest.raises(ModelDirectoryError, match="not tensors"):
        read_checkpoint(path)


def test_wrong_shape(tiny_model_copy: Path) -> None:
    path = tiny_model_copy / "flow.pt"
    sd = torch.load(path, weights_only=True)
    sd["encoder_proj.weight"] = torch.zeros(80, 7)
    torch.save(sd, path)
    with pytest.raises(ModelDirectoryError) as err:
        load_model_directory(tiny_model_copy)
    msg = err.value.message
    assert "flow.pt" in msg and "encoder_proj.weight" in msg and "expected [80, 32], got [80, 7]" in msg


def test_missing_and_unexpected_keys(tiny_model_copy: Path) -> None:
    path = tiny_model_copy / "llm.pt"
    sd = torch.load(path, weights_only=True)
    del sd["llm_decoder.weight"]
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, path)
    with pytest.raises(ModelDirectoryError) as err:
        load_model_directory(tiny_model_copy)
    msg = err.value.message
    assert "llm.pt" in msg and "1 missing keys (llm_decoder.weight)" in msg and "extra.weight" in msg


def test_checkpoint_of_another_size(tiny_model_copy: Path) -> None:
    """A yaml that does not match its weights: one message, a few keys listed."""
    set_a = Path(__file__).resolve().parents[2] / "shared" / "parity" / "cosyvoice1" / "set_a"
    if not (set_a / "hift.pt").exists():
        pytest.skip("parity set A not available")
    shutil.copyfile(set_a / "hift.pt", tiny_model_copy / "hift.pt")
    with pytest.raises(ModelDirectoryError, match=r"hift.pt: does not match .*wrong shape.*more\)"):
        load_model_directory(tiny_model_copy)


def test_hift_parametrizations_format_and_generator_prefix(tiny_model_copy: Path, tiny_loaded_model) -> None:
    path = tiny_model_copy / "hift.pt"
    sd = torch.load(path, weights_only=True)
    renamed = {}
    for k, v in sd.items():
        k = k.replace(".weight_g", ".parametrizations.weight.original0")
        k = k.replace(".weight_v", ".parametrizations.weight.original1")
        renamed["generator." + k] = v
    torch.save(renamed, path)
    m = load_model_directory(tiny_model_copy)
    ref = tiny_loaded_model.hift.state_dict()
    for k, v in m.hift.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_other_family_yaml(tiny_model_copy: Path) -> None:
    cfg = tiny_model_copy / "cosyvoice.yaml"
    cfg.write_text(cfg.read_text().replace("cosyvoice.llm.llm.TransformerLM", "cosyvoice.llm.llm.Qwen2LM"))
    with pytest.raises(ModelConfigError, match="describes a CosyVoice2 model"):
        load_model_directory(tiny_model_copy)


def test_cosyvoice2_directory(tiny_model_copy: Path) -> None:
    (tiny_model_copy / "cosyvoice.yaml").rename(tiny_model_copy / "cosyvoice2.yaml")
    with pytest.raises(ModelConfigError, match="CosyVoice2 model directory.*not a CosyVoice v1"):
        find_model_files(tiny_model_copy)


def test_unreadable_spk2info(tiny_model_copy: Path) -> None:
    path = tiny_model_copy / "spk2info.pt"
    path.write_bytes(b"garbage")
    with pytest.raises(ModelDirectoryError, match="spk2info.pt"):
        load_model_directory(tiny_model_copy)
    torch.save({"a": {"emb": torch.zeros(1, 192)}}, path)
    with pytest.raises(ModelDirectoryError, match="spk2info.pt: speaker 'a' has no 'embedding'"):
        read_speakers(path)
    torch.save({"a": {"embedding": torch.zeros(1, 80)}}, path)
    with pytest.raises(ModelDirectoryError, match=r"expected a float tensor \[1, 192\]"):
        read_speakers(path)
    torch.save(
        {"a": {"embedding": torch.ones(192)}, "b": {"embedding": torch.ones(1, 1, 192).double()}}, path
    )
    speakers = read_speakers(path)
    assert {k: tuple(v.shape) for k, v in speakers.items()} == {"a": (1, 192), "b": (1, 192)}
    assert speakers["b"].dtype == torch.float32


# ------------------------------------------------------------------------------ hub


def test_local_directory_is_used_as_is(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("must not download")

    monkeypatch.setattr("huggingface_hub.snapshot_download", boom)
    assert hub.resolve_model_dir(tiny_model_dir) == tiny_model_dir.resolve()
    assert hub.resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_missing_local_path_is_not_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ModelDirectoryError, match="not found"):
        hub.resolve_model_dir(tmp_path / "missing" / "CosyVoice-300M-SFT")
    with pytest.raises(ModelDirectoryError, match="not found"):
        hub.resolve_model_dir("./pretrained_models/CosyVoice-300M-SFT")


def test_name_mapping() -> None:
    assert hub.hub_ids("CosyVoice-300M-SFT") == ("FunAudioLLM/CosyVoice-300M-SFT", "iic/CosyVoice-300M-SFT")
    assert hub.hub_ids("cosyvoice-300m-instruct") == (
        "FunAudioLLM/CosyVoice-300M-Instruct",
        "iic/CosyVoice-300M-Instruct",
    )
    assert hub.hub_ids("FunAudioLLM/CosyVoice-300M") == ("FunAudioLLM/CosyVoice-300M", "iic/CosyVoice-300M")
    assert hub.hub_ids("iic/CosyVoice-300M-SFT") == (
        "FunAudioLLM/CosyVoice-300M-SFT",
        "iic/CosyVoice-300M-SFT",
    )
    assert hub.hub_ids("me/my-finetune") == ("me/my-finetune", "me/my-finetune")
    with pytest.raises(DownloadError, match="unknown model name 'CosyVoice-9B'"):
        hub.hub_ids("CosyVoice-9B")


def test_download_is_called_with_the_mapped_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    got = hub.resolve_model_dir("CosyVoice-300M-SFT", cache_dir=tmp_path / "cache", local_files_only=True)
    assert got == tmp_path
    repo_id, kwargs = calls[0]
    assert repo_id == "FunAudioLLM/CosyVoice-300M-SFT"
    assert kwargs["local_files_only"] is True and kwargs["cache_dir"] == str(tmp_path / "cache")
    assert "llm.pt" in kwargs["allow_patterns"] and "campplus.onnx" in kwargs["allow_patterns"]


def test_no_network_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError(
            "Cannot find the requested files in the disk cache and outgoing traffic is off"
        )

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    monkeypatch.setattr(hub, "_modelscope_snapshot_download", lambda: None)
    with pytest.raises(DownloadError) as err:
        hub.resolve_model_dir("CosyVoice-300M-SFT")
    msg = err.value.message
    assert "FunAudioLLM/CosyVoice-300M-SFT" in msg and "cannot be reached" in msg
    assert "ModelScope iic/CosyVoice-300M-SFT: the optional `modelscope` package is not installed" in msg
    assert "pass its path" in msg and "local-dir" in msg


def test_connection_error_falls_back_to_modelscope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_net(repo_id, **kwargs):
        raise ConnectionError("Failed to establish a new connection")

    ms_calls = []

    def ms_download(repo_id, **kwargs):
        ms_calls.append(repo_id)
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_net)
    monkeypatch.setattr(hub, "_modelscope_snapshot_download", lambda: ms_download)
    assert hub.resolve_model_dir("CosyVoice-300M-SFT") == tmp_path
    assert ms_calls == ["iic/CosyVoice-300M-SFT"]
    with pytest.raises(DownloadError, match="no network connection"):
        hub.resolve_model_dir("CosyVoice-300M-SFT", source="huggingface")


def test_bad_source() -> None:
    with pytest.raises(DownloadError, match="unknown download source"):
        hub.resolve_model_dir("CosyVoice-300M-SFT", source="ftp")


def test_fast_build_keeps_computed_buffers(tiny_model_dir) -> None:
    """Loading skips the random initialisers; computed (non-persistent) buffers must be unaffected."""
    from cosyserve.families.cosyvoice1.loader import build_network, load_model_directory

    # A fresh load: the shared session model's lazily grown caches depend on earlier tests.
    fresh = load_model_directory(tiny_model_dir)
    for name in ("llm", "flow", "hift"):
        reference = dict(build_network(name, fresh.config).named_buffers())
        loaded = dict(getattr(fresh, name).named_buffers())
        assert loaded.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"
    assert torch.nn.init.normal_.__module__ == "torch.nn.init"  # restored after loading


def test_weights_are_adopted_from_the_mapped_checkpoint(tiny_model_dir: Path) -> None:
    """No second copy at load: parameters *are* the memory-mapped checkpoint's tensors, until
    detach_from_checkpoint gives them their own memory (same values)."""
    from cosyserve.families.cosyvoice1.loader import detach_from_checkpoint

    def in_flow_checkpoint_mapping(tensor: torch.Tensor) -> bool:
        address = tensor.untyped_storage().data_ptr()
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5] == str((tiny_model_dir / "flow.pt").resolve()):
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= address < high:
                    return True
        return False

    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc/self/maps (Linux)")
    model = load_model_directory(tiny_model_dir)
    expected = read_checkpoint(tiny_model_dir / "flow.pt")["encoder_proj.weight"].clone()
    assert in_flow_checkpoint_mapping(model.flow.encoder_proj.weight)
    detach_from_checkpoint(model.flow)
    assert not in_flow_checkpoint_mapping(model.flow.encoder_proj.weight)
    assert torch.equal(model.flow.encoder_proj.weight, expected)


def test_half_precision_checkpoint_loads_as_float32(tiny_model_copy: Path, tiny_loaded_model) -> None:
    state = read_checkpoint(tiny_model_copy / "llm.pt")
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tiny_model_copy / "llm.pt"
    )
    model = load_model_directory(tiny_model_copy)
    loaded = model.llm.llm_decoder.weight
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, tiny_loaded_model.llm.llm_decoder.weight, atol=1e-3, rtol=1e-3)


def test_download_patterns_take_the_tokenizer_and_skip_the_backbone_weights() -> None:
    from fnmatch import fnmatch

    def fetched(path: str) -> bool:
        return any(fnmatch(path, pattern) for pattern in hub.DOWNLOAD_PATTERNS)

    for path in (
        "cosyvoice2.yaml",
        "llm.pt",
        "speech_tokenizer_v2.onnx",
        "flow.decoder.estimator.fp32.onnx",
        "CosyVoice-BlankEN/config.json",
        "CosyVoice-BlankEN/vocab.json",
        "CosyVoice-BlankEN/merges.txt",
        "CosyVoice-BlankEN/tokenizer_config.json",
    ):
        assert fetched(path), path
    for path in (
        "CosyVoice-BlankEN/model.safetensors",
        "llm.llm.fp16.zip",
        "flow.decoder.estimator.fp16.plan",
    ):
        assert not fetched(path), path
    assert "Fun-CosyVoice3-0.5B-2512" in hub.KNOWN_MODELS

"""Saved-voice store: round trip, restart, atomic writes, name validation."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.errors import InsufficientStorageError, InvalidRequestError, UnknownVoiceError
from cosyserve.voices.prompt import PromptFeatures
from cosyserve.voices.store import VOICE_SUFFIX, SavedVoice, VoiceFamilyError, VoiceStore, VoiceStoreError

BUILTIN = ["中文女", "中文男", "英文女", "英文男"]


def features(seed: int = 0, text: str | None = "希望你以后能够做的比我还好呦。") -> PromptFeatures:
    g = torch.Generator().manual_seed(seed)
    return PromptFeatures(
        embedding=torch.randn(1, 192, generator=g),
        speech_tokens=torch.randint(0, 4096, (1, 37), generator=g),
        speech_feat=torch.randn(1, 64, 80, generator=g),
        text=text,
    )


def assert_same(a: PromptFeatures, b: PromptFeatures) -> None:
    assert torch.equal(a.embedding, b.embedding)
    assert torch.equal(a.speech_tokens, b.speech_tokens) and b.speech_tokens.dtype == torch.int64
    assert torch.equal(a.speech_feat, b.speech_feat)
    assert a.text == b.text


def files(root: Path) -> list[str]:
    # ".lock" is the store's cross-process lock file: empty, kept, never a voice.
    return sorted(p.name for p in root.iterdir() if p.name != ".lock")


def test_save_list_get_delete(tmp_path: Path):
    store = VoiceStore(tmp_path / "voices", reserved_names=BUILTIN)
    assert store.list() == [] and len(store) == 0
    f = features()
    before = time.time()
    saved = store.save("alice", f, source={"filename": "alice.wav", "duration_s": 3.2})
    assert isinstance(saved, SavedVoice) and saved.name == "alice" and saved.created_at >= before - 1
    assert_same(f, saved.features)
    store.save("bob-2.v1", features(1, text=None))

    infos = store.list()
    assert [i.id for i in infos] == ["alice", "bob-2.v1"]
    assert all(i.kind == "saved" for i in infos)
    assert "3.2 s" in infos[0].description
    assert "alice" in store and "carol" not in store and "../alice" not in store

    got = store.get("alice")
    assert_same(f, got.features)
    assert got.source == {"filename": "alice.wav", "duration_s": 3.2}
    assert store.get("bob-2.v1").text is None

    store.delete("alice")
    assert store.names() == ["bob-2.v1"]
    with pytest.raises(UnknownVoiceError):
        store.get("alice")
    with pytest.raises(UnknownVoiceError):
        store.delete("alice")
    assert files(tmp_path / "voices") == [f"bob-2.v1{VOICE_SUFFIX}"]  # nothing else left behind


def test_survives_restart_and_unicode_names(tmp_path: Path):
    store = VoiceStore(tmp_path, reserved_names=BUILTIN)
    f = features(3)
    store.save("我的声音", f, source={"sample_rate": 48000})
    created = store.get("我的声音").created_at

    reopened = VoiceStore(tmp_path, reserved_names=BUILTIN)
    assert reopened.names() == ["我的声音"]
    voice = reopened.get("我的声音")
    assert_same(f, voice.features)
    assert voice.created_at == created and voice.source == {"sample_rate": 48000}


def test_existing_name_needs_overwrite(tmp_path: Path):
    store = VoiceStore(tmp_path)
    store.save("alice", features(0))
    with pytest.raises(InvalidRequestError, match="already exists"):
        store.save("alice", features(1))
    with pytest.raises(InvalidRequestError, match="already exists"):
        store.save("ALICE", features(1))  # case-insensitive file systems would merge them
    store.save("alice", features(1), overwrite=True)
    assert_same(features(1), store.get("alice").features)


def test_crash_mid_write_keeps_old_voice(tmp_path: Path, monkeypatch):
    store = VoiceStore(tmp_path)
    store.save("alice", features(0))

    def crash(f, arrays):
        f.write(b"PK\x03\x04 half of a zip archive")  # some bytes reach the disk...
        raise OSError(errno.ENOSPC, "No space left on device")  # ...then the write fails

    monkeypatch.setattr(VoiceStore, "_write_payload", staticmethod(crash))
    # A typed error (507 over HTTP), not a bare OSError
    with pytest.raises(InsufficientStorageError, match="disk holding saved voices is full"):
        store.save("alice", features(1), overwrite=True)
    with pytest.raises(InsufficientStorageError):
        store.save("bob", features(2))
    monkeypatch.undo()

    assert files(tmp_path) == [f"alice{VOICE_SUFFIX}"]  # no temporary file, no half "bob"
    fresh = VoiceStore(tmp_path)
    assert fresh.names() == ["alice"]
    assert_same(features(0), fresh.get("alice").features)


def test_interrupted_process_leaves_only_a_temporary(tmp_path: Path):
    # A killed process leaves its temporary file: never listed, cleaned up once stale.
    store = VoiceStore(tmp_path)
    store.save("alice", features(0))
    tmp = tmp_path / ".tmp-abc123.npz"
    tmp.write_bytes(b"partial")
    assert VoiceStore(tmp_path).names() == ["alice"]
    assert tmp.exists()  # recent: might belong to a live writer
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    VoiceStore(tmp_path)
    assert not tmp.exists()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "../evil",
        "a/b",
        "a\\b",
        ".hidden",
        "..",
        "name.",
        "with space",
        "x" * 65,
        "semi;colon",
        "中文女",
        "英文男",
        "nul\x00byte",
        "-dash-first",
        "newline\n",
    ],
)
def test_bad_names(tmp_path: Path, name: str):
    store = VoiceStore(tmp_path / "v", reserved_names=BUILTIN)
    with pytest.raises(InvalidRequestError):
        store.save(name, features())
    assert store.names() == []
    assert files(tmp_path) == ["v"]  # nothing written outside the store either


def test_unknown_and_corrupt_voices(tmp_path: Path):
    store = VoiceStore(tmp_path)
    for name in ("nobody", "../etc/passwd", "", None):
        with pytest.raises(UnknownVoiceError):
            store.get(name)  # type: ignore[arg-type]
    (tmp_path / f"broken{VOICE_SUFFIX}").write_bytes(b"not a zip")
    store.save("ok", features())
    with pytest.raises(VoiceStoreError, match="unreadable"):
        store.get("broken")
    assert [i.id for i in store.list()] == ["ok"]  # the corrupt one is skipped, not fatal


def test_no_pickle_in_files(tmp_path: Path):
    store = VoiceStore(tmp_path)
    store.save("alice", features(), source={"note": "é"})
    with np.load(tmp_path / f"alice{VOICE_SUFFIX}", allow_pickle=False) as npz:
        assert set(npz.files) == {"embedding", "speech_tokens", "speech_feat", "meta"}
        assert npz["speech_tokens"].dtype == np.int64


def test_cache_sees_changes_from_another_store(tmp_path: Path):
    a, b = VoiceStore(tmp_path), VoiceStore(tmp_path)
    a.save("alice", features(0))
    assert_same(features(0), b.get("alice").features)
    a.save("alice", features(5), overwrite=True)
    assert_same(features(5), b.get("alice").features)
    a.delete("alice")
    with pytest.raises(UnknownVoiceError):
        b.get("alice")


def test_voices_belong_to_their_model_family(tmp_path: Path):
    """A voice's tokens and mel only mean something to the family that made them: each store
    serves its own family's voices; files saved before the tag existed are CosyVoice v1 voices."""
    import json

    v1, v2 = VoiceStore(tmp_path), VoiceStore(tmp_path, family="cosyvoice2")
    v1.save("old", features(0))
    v2.save("new", features(1))
    # A file written before voices were tagged: its meta has no family.
    path = tmp_path / f"old{VOICE_SUFFIX}"
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"][()]))
    assert meta.pop("family") == "cosyvoice1"
    arrays["meta"] = np.array(json.dumps(meta))
    with open(path, "wb") as f:
        np.savez(f, **arrays)

    assert [v.id for v in v1.list()] == ["old"] and [v.id for v in v2.list()] == ["new"]
    assert_same(features(0), v1.get("old").features)
    assert v2.get("new").family == "cosyvoice2"
    with pytest.raises(VoiceFamilyError, match="'old' was made with a cosyvoice1 model") as err:
        v2.get("old")
    assert err.value.status_code == 409
    with pytest.raises(VoiceFamilyError, match="cosyvoice2 model"):
        v1.get("new")
    with pytest.raises(InvalidRequestError, match="already exists"):  # one name space for both
        v2.save("old", features(2))

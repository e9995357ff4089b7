"""One voice directory shared by several processes (server replicas, pods on one network volume):
saves racing on one name leave exactly one complete voice, and every process sees the others'
saves, replacements and deletions at its next lookup."""

from __future__ import annotations

import errno
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve.errors import InvalidRequestError, UnknownVoiceError
from cosyserve.voices.prompt import PromptFeatures
from cosyserve.voices.store import VOICE_SUFFIX, VoiceExistsError, VoiceStore

ROUNDS = 12


def features(seed: int, frames: int = 400) -> PromptFeatures:
    # Big enough (~130 KB) that a torn write would be visible as a mix of the two payloads.
    g = torch.Generator().manual_seed(seed)
    return PromptFeatures(
        embedding=torch.randn(1, 192, generator=g),
        speech_tokens=torch.randint(0, 4096, (1, frames // 2), generator=g),
        speech_feat=torch.randn(1, frames, 80, generator=g),
        text=f"speaker {seed}",
    )


def _race(root: str, seed: int, overwrite: bool, barrier, results) -> None:
    """One contender: each round, wait for the other, then save the round's name."""
    store = VoiceStore(root)
    for round_ in range(ROUNDS):
        barrier.wait(timeout=60)
        name = "shared" if overwrite else f"voice{round_}"
        try:
            store.save(name, features(seed * 1000 + round_), overwrite=overwrite)
            results.put((round_, seed, "saved"))
        except VoiceExistsError:
            results.put((round_, seed, "exists"))


def _run_contenders(root: Path, overwrite: bool) -> list[tuple[int, int, str]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(root), seed, overwrite, barrier, results)) for seed in (1, 2)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
            assert p.exitcode == 0, f"contender exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [results.get(timeout=5) for _ in range(2 * ROUNDS)]


def _is_one_of(saved: PromptFeatures, candidates: list[PromptFeatures]) -> bool:
    return any(
        torch.equal(saved.speech_feat, c.speech_feat)
        and torch.equal(saved.embedding, c.embedding)
        and torch.equal(saved.speech_tokens, c.speech_tokens)
        and saved.text == c.text
        for c in candidates
    )


@pytest.mark.timeout(180)
def test_two_processes_saving_one_name_leave_one_complete_voice(tmp_path: Path) -> None:
    outcomes = _run_contenders(tmp_path, overwrite=False)
    store = VoiceStore(tmp_path)
    for round_ in range(ROUNDS):
        this_round = sorted(o[2] for o in outcomes if o[0] == round_)
        assert this_round == ["exists", "saved"], f"round {round_}: {this_round}"
        winner = next(o[1] for o in outcomes if o[0] == round_ and o[2] == "saved")
        # The stored voice is the winner's, whole: not the loser's, not a mix.
        assert _is_one_of(store.get(f"voice{round_}").features, [features(winner * 1000 + round_)])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


@pytest.mark.timeout(180)
def test_concurrent_overwrites_leave_one_complete_voice(tmp_path: Path) -> None:
    outcomes = _run_contenders(tmp_path, overwrite=True)
    assert all(o[2] == "saved" for o in outcomes)
    last_round = [features(seed * 1000 + ROUNDS - 1) for seed in (1, 2)]
    assert _is_one_of(VoiceStore(tmp_path).get("shared").features, last_round)


def test_other_processes_changes_are_seen_at_the_next_lookup(tmp_path: Path) -> None:
    writer, reader = VoiceStore(tmp_path), VoiceStore(tmp_path)
    writer.save("alice", features(1))
    assert reader.names() == ["alice"] and "alice" in reader
    assert _is_one_of(reader.get("alice").features, [features(1)])
    writer.save("alice", features(2), overwrite=True)
    assert _is_one_of(reader.get("alice").features, [features(2)])
    writer.delete("alice")
    assert "alice" not in reader and reader.list() == []
    with pytest.raises(UnknownVoiceError):
        reader.get("alice")
    assert reader._cache == {}  # the deleted voice's tensors are not kept


def test_a_name_taken_by_another_process_is_a_conflict(tmp_path: Path) -> None:
    a, b = VoiceStore(tmp_path), VoiceStore(tmp_path)
    a.save("Bob", features(1))
    for name in ("Bob", "bob"):
        with pytest.raises(VoiceExistsError, match="already exists") as caught:
            b.save(name, features(2))
        assert caught.value.status_code == 409 and isinstance(caught.value, InvalidRequestError)
    assert _is_one_of(a.get("Bob").features, [features(1)])


def test_saves_work_where_hard_links_do_not(tmp_path: Path, monkeypatch) -> None:
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    store = VoiceStore(tmp_path)
    store.save("carol", features(3))
    with pytest.raises(VoiceExistsError):
        store.save("carol", features(4))
    assert _is_one_of(store.get("carol").features, [features(3)])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".lock")) == [
        f"carol{VOICE_SUFFIX}"
    ]


def test_new_voice_file_is_complete_before_it_appears(tmp_path: Path) -> None:
    # The voice's name only ever points at a finished archive: linked from a fsynced temporary.
    store = VoiceStore(tmp_path)
    store.save("dave", features(5))
    with np.load(tmp_path / f"dave{VOICE_SUFFIX}", allow_pickle=False) as npz:
        assert npz["speech_feat"].shape == (1, 400, 80)
    assert os.stat(tmp_path / f"dave{VOICE_SUFFIX}").st_nlink == 1  # the temporary is gone

"""Faults the server must survive: a request whose data breaks a batched engine step (only that
request fails, the others finish exactly as they would have alone), a voice store killed with
SIGKILL in the middle of saves (every acknowledged save intact, no partial file listed), and a
voice store on a full or read-only file system (a typed 507/503, the store unchanged)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyserve import errors
from cosyserve.api import SynthesisRequest

REPO = Path(__file__).resolve().parents[1]
TOKENS = 24


# --------------------------------------------------------------------------------------------
# An exception inside a batched step
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tiny_model_dir, tmp_path_factory):
    from cosyserve.families.base import FamilyOptions
    from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend

    options = FamilyOptions(device="cpu", voices_dir=tmp_path_factory.mktemp("voices"), num_tokens=TOKENS)
    return CosyVoiceBackend.from_dir(tiny_model_dir, options)


def _poison_after(task, tokens: int) -> None:
    """From its ``tokens``-th token on, the task feeds the LLM a token id past the embedding
    table: the next batched decode step raises (an IndexError inside torch)."""
    next_input = task.next_input

    def poisoned():
        return 10**7 if task.info.speech_tokens >= tokens else next_input()

    task.next_input = poisoned


async def _run(backend, requests: list[SynthesisRequest], poison: set[int]) -> list[object]:
    from cosyserve.engine.batching import BatchConfig, BatchingPolicy
    from cosyserve.engine.loop import EngineLoop

    policy = BatchingPolicy(backend, BatchConfig(max_batch=8, flow_batch=8))
    opened = policy.start

    def start(item) -> None:
        opened(item)
        if item.request.seed in poison:
            _poison_after(item.job, 3)

    policy.start = start  # type: ignore[method-assign]
    engine = EngineLoop(backend, max_active=8, max_queue=8, policy=policy)
    handles = [engine.submit(r) for r in requests]

    async def collect(handle) -> object:
        try:
            audio, _ = await handle.collect()
            return audio
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            return exc

    try:
        return await asyncio.wait_for(asyncio.gather(*(collect(h) for h in handles)), 120)
    finally:
        await engine.shutdown(5)


@pytest.mark.timeout(300)
def test_a_request_that_breaks_a_batched_step_fails_alone(backend) -> None:
    torch.set_num_threads(1)
    requests = [
        SynthesisRequest(text="The first request speaks.", voice="英文女", seed=11),
        SynthesisRequest(text="The second one breaks.", voice="英文女", seed=12),
        SynthesisRequest(text="The third request speaks.", voice="英文男", seed=13),
    ]
    alone = [asyncio.run(_run(backend, [r], set()))[0] for r in (requests[0], requests[2])]
    together = asyncio.run(_run(backend, requests, poison={12}))
    assert isinstance(together[1], errors.SynthesisFailedError), together[1]
    assert "IndexError" in together[1].message and "request id" in together[1].message
    for solo, batched in zip(alone, (together[0], together[2])):
        assert isinstance(batched, np.ndarray) and len(batched) == len(solo) > 0
        np.testing.assert_allclose(batched, solo, atol=2e-4)


# --------------------------------------------------------------------------------------------
# SIGKILL while saving voices
# --------------------------------------------------------------------------------------------

_SAVER = textwrap.dedent(
    """
    import sys, torch
    from cosyserve.voices.prompt import PromptFeatures
    from cosyserve.voices.store import VoiceStore

    store = VoiceStore(sys.argv[1])
    i = int(sys.argv[2])  # each run its own names: the killed save may have completed
    while True:
        n = 50 + i % 200  # different sizes: the kill lands at different points of a write
        features = PromptFeatures(
            embedding=torch.full((1, 192), float(i)),
            speech_tokens=torch.arange(n)[None],
            speech_feat=torch.full((1, 2 * n, 80), float(i)),
            text=f"voice {i}",
        )
        store.save(f"v{i}", features)
        print(i, n, flush=True)  # acknowledged: save() returned
        i += 1
    """
)


@pytest.mark.timeout(240)
def test_sigkill_during_saves_keeps_every_acknowledged_voice(tmp_path) -> None:
    from cosyserve.voices.store import VoiceStore

    root = tmp_path / "voices"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    acknowledged: dict[str, int] = {}
    for round_ in range(4):
        saver = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(root), str(100_000 * round_)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert saver.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        # Let it acknowledge a few saves, then kill it at an arbitrary point of the next one.
        while len(lines) < 3 + round_ and time.monotonic() < deadline:
            lines.append(saver.stdout.readline())
        time.sleep(0.003 * round_)
        saver.send_signal(signal.SIGKILL)
        rest, _ = saver.communicate(timeout=30)
        for line in [*lines, *rest.splitlines()]:
            if line.strip():
                index, n = map(int, line.split())
                acknowledged[f"v{index}"] = n
        assert saver.returncode == -signal.SIGKILL

        store = VoiceStore(root)
        names = store.names()
        assert set(acknowledged) <= set(names), "an acknowledged save was lost"
        assert all(not name.startswith(".") for name in names), "a temporary file is listed"
        for info in store.list():  # every listed voice loads whole
            voice = store.get(info.id)
            index = int(info.id[1:])
            assert voice.features.speech_tokens.shape[1] == 50 + index % 200
            assert float(voice.features.embedding[0, 0]) == float(index)
        assert {v.id for v in store.list()} == set(names), "a listed voice does not load"
        # The killed save left at most its own temporary file, which a new store ignores.
        assert len([p for p in root.iterdir() if p.name.startswith(".tmp-")]) <= round_ + 1


# --------------------------------------------------------------------------------------------
# A full or read-only file system under the voice store
# --------------------------------------------------------------------------------------------


def _features(value: float = 1.0):
    from cosyserve.voices.prompt import PromptFeatures

    return PromptFeatures(
        embedding=torch.full((1, 192), value),
        speech_tokens=torch.arange(60)[None],
        speech_feat=torch.zeros((1, 120, 80)),
        text="hello",
    )


@pytest.mark.parametrize(
    ("code", "error", "status"),
    [
        (errno.ENOSPC, "InsufficientStorageError", 507),
        (errno.EDQUOT, "InsufficientStorageError", 507),
        (errno.EROFS, "StorageUnavailableError", 503),
        (errno.EACCES, "StorageUnavailableError", 503),
        (errno.EIO, "StorageUnavailableError", 503),
    ],
)
def test_store_on_a_failing_file_system_is_a_typed_error_and_unchanged(
    tmp_path, monkeypatch, code, error, status
) -> None:
    from cosyserve.voices import store as store_module
    from cosyserve.voices.store import VoiceStore

    store = VoiceStore(tmp_path / "voices")
    store.save("kept", _features(2.0))
    before = sorted(p.name for p in store.root.iterdir())

    def failing_fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    # Data is written, then fsync reports the device's refusal (as a full disk does).
    monkeypatch.setattr(store_module.os, "fsync", failing_fsync)
    error = getattr(errors, error)
    with pytest.raises(error) as info:
        store.save("new", _features())
    assert info.value.status_code == status and "new" in info.value.message
    assert str(store.root) not in info.value.message  # no server paths in what the client reads

    def failing_unlink(self, *args, **kwargs) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(error):
        store.delete("kept")
    monkeypatch.undo()
    assert sorted(p.name for p in store.root.iterdir()) == before  # no partial file left
    assert store.names() == ["kept"] and float(store.get("kept").features.embedding[0, 0]) == 2.0


def test_store_errors_reach_the_client_as_507_and_503(tmp_path, monkeypatch) -> None:
    """Through the HTTP layer: POST /v1/voices and DELETE answer the store's status and cause."""
    from fastapi.testclient import TestClient

    from cosyserve.server.app import create_app
    from cosyserve.voices import store as store_module
    from cosyserve.voices.store import VoiceStore
    from tests.server.conftest import make_settings, wav_bytes
    from tests.server.fakes import FakeBackend

    class StoreBackend(FakeBackend):
        """The fake model, with saved voices in a real VoiceStore."""

        def __init__(self, root: Path):
            super().__init__()
            self.store = VoiceStore(root)

        def voices(self):
            return super().voices() + self.store.list()

        def add_voice(self, name, prompt):
            return self.store.save(name, _features()).info()

        def delete_voice(self, name):
            self.store.delete(name)

    backend = StoreBackend(tmp_path / "voices")
    backend.store.save("kept", _features())
    with TestClient(create_app(make_settings(decode_workers=0), backend=backend)) as client:
        monkeypatch.setattr(
            store_module.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
        )
        files = {"audio": ("me.wav", wav_bytes(2.0), "audio/wav")}
        response = client.post("/v1/voices", data={"name": "new"}, files=files)
        assert response.status_code == 507, response.text
        assert response.json()["error"]["code"] == "insufficient_storage"
        monkeypatch.setattr(
            Path, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "read-only"))
        )
        response = client.delete("/v1/voices/kept")
        assert response.status_code == 503, response.text
        assert "cannot be written" in response.json()["error"]["message"]
        assert "Retry-After" in response.headers
        monkeypatch.undo()
        assert [v["id"] for v in client.get("/v1/voices").json()["data"] if v["kind"] == "saved"] == ["kept"]

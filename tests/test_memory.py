"""Memory savings that must not change results: HiFT's in-place channels-last weights, the
allocator tuning (its switch, and freed heap memory going back to the system), cold weights paged
out, and int8 quantisation that never holds the FP32 and int8 copies of a layer at once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cosyserve.runtime.memory import tune_cpu_allocator


def test_hift_fast_path_relays_weights_in_place(tiny_model_dir) -> None:
    from cosyserve.families.cosyvoice1.loader import load_model_directory

    hift = load_model_directory(tiny_model_dir).hift
    convs = [  # the decode stack's convolutions (the f0 predictor runs eagerly)
        m
        for name, m in hift.named_modules()
        if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and not name.startswith("f0_predictor")
    ]
    before = {id(c): c.weight.detach().clone() for c in convs}
    mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(0))
    noise = hift.draw_noise(40 * hift.upsample_factor, torch.Generator().manual_seed(1))
    hift.fast = False
    slow, _ = hift.inference(mel, phase=noise[0], sine_noise=noise[1])
    hift.fast = True
    fast, _ = hift.inference(mel, phase=noise[0], sine_noise=noise[1])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    relaid = 0
    for conv in convs:
        assert "_fast_weight_cache" not in conv.__dict__  # no second copy kept anywhere
        assert torch.equal(conv.weight, before[id(conv)])  # same values, same shape
        relaid += conv.weight.unsqueeze(2).is_contiguous(memory_format=torch.channels_last)
    assert relaid == len(convs)
    # The eager path still runs on the relaid weights.
    hift.fast = False
    torch.testing.assert_close(hift.inference(mel, phase=noise[0], sine_noise=noise[1])[0], slow)


def test_vocoder_allocation_returns_heap_pages_per_residual_block(tiny_model_dir, monkeypatch) -> None:
    from cosyserve.acceleration import apply as accel
    from cosyserve.families.cosyvoice1.loader import load_model_directory
    from cosyserve.nn.hift import ResBlock
    from cosyserve.runtime import memory

    hift = load_model_directory(tiny_model_dir).hift
    mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(0))
    noise = hift.draw_noise(40 * hift.upsample_factor, torch.Generator().manual_seed(1))
    plain, _ = hift.inference(mel, phase=noise[0], sine_noise=noise[1])
    trims = []
    monkeypatch.setattr(memory, "_libc", None)  # the entry trim and the mmap threshold: glibc only
    monkeypatch.setattr(accel, "release_free_heap_pages", lambda: trims.append(1))
    accel.install_vocoder_allocation(hift, (ResBlock,))
    got, _ = hift.inference(mel, phase=noise[0], sine_noise=noise[1])
    assert torch.equal(got, plain)  # the allocation policy never changes the audio
    assert len(trims) == sum(isinstance(m, ResBlock) for m in hift.modules()) > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_allocator_tuning_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COSYSERVE_MALLOC_TUNING", "0")
    assert tune_cpu_allocator() is None
    monkeypatch.delenv("COSYSERVE_MALLOC_TUNING")
    assert "malloc" in (tune_cpu_allocator() or "malloc (not glibc)")


# The allocator tests run in a fresh interpreter: how glibc serves a block depends on the free
# chunks earlier tests left in the heap.
_ALLOCATOR_PROBE = """
import json, os, sys, torch
from cosyserve.runtime.memory import keep_paged_out, release_free_memory, tune_cpu_allocator, vocoder_allocation

def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

survivors = []

def freed(block, blocks=64):
    # Blocks each followed by a small heap block that survives: freed, they are holes in the heap.
    big = []
    for _ in range(blocks):
        big.append(torch.ones(block, dtype=torch.uint8))
        survivors.append(torch.ones(64 << 10, dtype=torch.uint8))
    held = rss_mb()
    big.clear()
    return held - rss_mb()

out = {"tuned": tune_cpu_allocator() is not None}
out["heap_kept"] = freed(1 << 20)
held = rss_mb()
release_free_memory()
out["trim_returned"] = held - rss_mb()
with vocoder_allocation():  # larger than any free heap chunk: their own mmaps
    out["vocoder_returned"] = freed(3 << 20)

def rss_file_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:")) / 1024

# Cold weights: a memory-mapped checkpoint tensor leaves RSS and reads back unchanged; an
# anonymous one keeps its values.
path = os.path.join(sys.argv[1], "w.pt")
torch.save({"w": torch.randn(8 << 20)}, path)  # 32 MB
mapped = torch.load(path, mmap=True, weights_only=True)["w"]
anon = torch.randn(1 << 20)
total, anon_total = float(mapped.sum()), float(anon.sum())
held = rss_file_mb()
keep_paged_out([mapped, anon])
release_free_memory()
out["cold_returned"] = held - rss_file_mb()
out["cold_intact"] = float(mapped.sum()) == total and float(anon.sum()) == anon_total

# int8: each memory-mapped FP32 weight leaves RSS once its layer is quantised.
from cosyserve.acceleration.quant import _quantize_linears
layers = torch.nn.Sequential(torch.nn.Linear(2048, 4096), torch.nn.Linear(4096, 2048))  # 2 x 32 MB
path = os.path.join(sys.argv[1], "layers.pt")
torch.save(layers.state_dict(), path)
# `checkpoint` stays referenced, as a model's float tensors keep its checkpoint mapped.
checkpoint = torch.load(path, mmap=True, weights_only=True)
layers.load_state_dict(checkpoint, assign=True)
sum(float(p.sum()) for p in layers.parameters())  # the FP32 pages are resident, as after reading them
held = rss_file_mb()
_quantize_linears(layers, ["0", "1"], engine="x86")
out["int8_fp32_returned"] = held - rss_file_mb()
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / malloc_trim")
def test_freed_heap_memory_goes_back_and_vocoder_blocks_are_not_kept(tmp_path: Path) -> None:
    env = {**os.environ, "COSYSERVE_MALLOC_TUNING": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_PROBE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    if not probe["tuned"]:
        pytest.skip("not glibc")
    assert probe["heap_kept"] < 16, probe  # activations freed between survivors stay in the heap...
    assert probe["trim_returned"] > 48, probe  # ...until release_free_memory() hands them back
    assert probe["vocoder_returned"] > 128, probe  # while vocoding, big blocks go back at once
    assert probe["cold_intact"], probe
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (5, 4):
        pytest.skip("MADV_PAGEOUT needs Linux 5.4+")
    assert probe["cold_returned"] > 24, probe  # the mapped checkpoint's pages left RSS
    assert probe["int8_fp32_returned"] > 48, probe  # quantising never holds both copies


def test_converted_checkpoint_tensors_are_paged_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An FP16 checkpoint loaded into an FP32 network: the FP16 originals were read once, and are
    paged out (their file pages would stay in RSS while the file stays mapped); adopted ones are not."""
    from cosyserve.nn import checkpoint

    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Embedding(10, 4))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["0.weight"] = state["0.weight"].half()
    state["0.bias"] = state["0.bias"].half()
    path = tmp_path / "net.pt"
    torch.save(state, path)
    loaded = torch.load(path, mmap=True, weights_only=True)
    paged: list[int] = []
    monkeypatch.setattr(checkpoint, "page_out", lambda t: paged.append(t.data_ptr()))
    checkpoint.load_into(net, loaded, path)
    assert sorted(paged) == sorted(loaded[k].data_ptr() for k in ("0.weight", "0.bias"))
    assert net[0].weight.dtype == torch.float32
    assert torch.equal(net[0].weight, loaded["0.weight"].float())
    assert net[1].weight.data_ptr() == loaded["1.weight"].data_ptr()  # adopted, still file-backed

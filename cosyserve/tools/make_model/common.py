"""What every family's model writer shares: seeded construction, atomic checkpoint writes, the
random vocoder's f0 head, built-in speakers and the directory's README."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The speaker names of the published CosyVoice-300M-SFT spk2info.pt, in its order.
SFT_SPEAKERS = ("中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女")

# Offsets of each artefact's seed (seed * 1000 + offset): regenerating one file never changes
# the others, and the numbers stay those of the first (v1) make-model.
SEED_OFFSETS = {"llm": 1, "flow": 2, "hift": 3, "speakers": 4}


@dataclass(frozen=True)
class MakeModelOptions:
    """The knobs of `cosyserve make-model` beyond the config and the output directory."""

    seed: int = 0
    speakers: int | None = None  # built-in speakers; None = the family's default
    tokenizer: str = "auto"  # CosyVoice2/3: "auto", "qwen2" or "byte-bpe"
    backbone_config: Path | None = None  # CosyVoice2/3: the Qwen2 config.json to take the dims from


@dataclass(frozen=True)
class WrittenFile:
    name: str  # path relative to the model directory
    bytes: int
    parameters: int | None = None  # module parameters (hift: weight norm folded, as at run time)
    entries: int | None = None  # tensors in the checkpoint (spk2info: speakers)
    checkpoint_values: int | None = None  # numbers in the checkpoint (hift: g and v counted)

    @classmethod
    def of(cls, root: Path, path: str | os.PathLike[str]) -> WrittenFile:
        """A plain file (no parameters) under ``root``."""
        path = Path(path)
        return cls(path.relative_to(root).as_posix(), path.stat().st_size)


def save_atomic(obj: object, path: Path) -> None:
    # A crash mid-write must not leave a truncated llm.pt that looks like a model.
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the default initialisers, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def network_seed(seed: int, name: str) -> int:
    return seed * 1000 + SEED_OFFSETS[name]


@torch.no_grad()
def voice_the_f0_head(hift: nn.Module) -> None:
    """Put the random vocoder's f0 in a speech range (~150 +- 30 Hz).

    With the default init the f0 head outputs ~0.1 Hz, below the 10 Hz voicing threshold, so
    every frame is unvoiced and the harmonic source (the path that needs the most care) would
    never run. The other layers keep torch's default init, which is also what upstream's
    weight-normalised layers effectively get.
    """
    classifier = getattr(getattr(hift, "f0_predictor", None), "classifier", None)
    if not isinstance(classifier, nn.Linear):
        logger.warning("hift has no f0_predictor.classifier Linear; f0 left at its default init")
        return
    nn.init.normal_(classifier.weight, 0.0, 30.0 / classifier.in_features**0.5)
    classifier.bias.fill_(150.0)


def build_seeded(name: str, build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` (a randomly initialised module, possibly adjusted) under the network's own seed."""
    with seeded(network_seed(seed, name)):
        module = build()
    return module.eval()


def save_network(
    name: str,
    module: nn.Module,
    out: Path,
    checkpoint: Callable[[nn.Module], Mapping[str, torch.Tensor]] | None = None,
) -> WrittenFile:
    """Save ``<name>.pt``: ``checkpoint(module)`` (the official state dict; default ``state_dict()``)."""
    params = sum(p.numel() for p in module.parameters())
    state = dict(checkpoint(module) if checkpoint is not None else module.state_dict())
    entries = len(state)
    # A tensor under two keys (a tied lm_head) is stored once by torch.save: count it once.
    values = sum(t.numel() for t in {(t.data_ptr(), t.shape): t for t in state.values()}.values())
    path = out / f"{name}.pt"
    save_atomic(state, path)
    return WrittenFile(path.name, path.stat().st_size, params, entries, values)


def write_network(
    name: str,
    build: Callable[[], nn.Module],
    out: Path,
    seed: int,
    checkpoint: Callable[[nn.Module], Mapping[str, torch.Tensor]] | None = None,
) -> WrittenFile:
    """Build one network, save ``<name>.pt`` and free it (one network in memory at a time)."""
    return save_network(name, build_seeded(name, build, seed), out, checkpoint)


def speaker_names(count: int) -> list[str]:
    """The published SFT names first, then ``speaker_8``, ``speaker_9``, ..."""
    return [*SFT_SPEAKERS[:count], *(f"speaker_{i + 1}" for i in range(len(SFT_SPEAKERS), count))]


def write_speakers(out: Path, names: Sequence[str], embed_dim: int, seed: int) -> WrittenFile:
    """``spk2info.pt``: ``{name: {"embedding": [1, embed_dim]}}`` with random x-vectors."""
    gen = torch.Generator().manual_seed(network_seed(seed, "speakers"))
    spk2info = {name: {"embedding": torch.randn(1, embed_dim, generator=gen)} for name in names}
    path = out / "spk2info.pt"
    save_atomic(spk2info, path)
    return WrittenFile(path.name, path.stat().st_size, entries=len(spk2info))


def readme(
    title: str, config_name: str, seed: int, notes: Sequence[str], written: Sequence[WrittenFile]
) -> str:
    lines = [
        f"# Random-weight {title} model directory",
        "",
        f"Written by `cosyserve make-model --config {config_name} --seed {seed}`.",
        *notes,
        "",
        "| file | bytes | parameters |",
        "|---|---:|---:|",
    ]
    for f in written:
        lines.append(f"| {f.name} | {f.bytes:,} | {'' if f.parameters is None else f'{f.parameters:,}'} |")
    return "\n".join(lines) + "\n"

"""`cosyserve make-model`: write a random-weight model directory in the official format.

From any CosyVoice v1 `cosyvoice.yaml` (the published full-size one, or a tiny one for tests) this
writes what a downloaded CosyVoice-300M-SFT directory holds, with seeded random weights::

    cosyvoice.yaml  llm.pt  flow.pt  hift.pt (legacy weight_g/weight_v names)  spk2info.pt
    campplus.onnx  speech_tokenizer_v1.onnx (small stand-ins with the official I/O)  README.md

The result loads with `load_model_directory` (strict) and synthesises noise-like audio. The same
seed gives the same files. Networks are built, saved and freed one at a time, so the full-size
model (~436M parameters) needs about one network's memory, not three.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cosyserve.errors import CosyserveError, ModelDirectoryError
from cosyserve.families.cosyvoice1.config import ModelConfig, load_model_config
from cosyserve.families.cosyvoice1.loader import CONFIG_FILE, REQUIRED_FILES, ZERO_SHOT_FILES, build_network

logger = logging.getLogger(__name__)

__all__ = ["SFT_SPEAKERS", "WrittenFile", "configure_parser", "main", "make_model"]

# The speaker names of the published CosyVoice-300M-SFT spk2info.pt, in its order.
SFT_SPEAKERS = ("中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女")


@dataclass(frozen=True)
class WrittenFile:
    name: str
    bytes: int
    parameters: int | None = None  # module parameters (hift: weight norm folded, as at run time)
    entries: int | None = None  # tensors in the checkpoint
    checkpoint_values: int | None = None  # numbers in the checkpoint (hift: g and v counted)


def _save_atomic(obj: object, path: Path) -> None:
    # A crash mid-write must not leave a truncated llm.pt that looks like a model.
    tmp = path.with_name(path.name + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for the default initialisers, restoring the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _hift_checkpoint(module: nn.Module) -> Mapping[str, torch.Tensor]:
    from cosyserve.nn import hift as hift_module

    to_legacy = getattr(hift_module, "to_legacy_weight_norm_state_dict", None)
    if to_legacy is None:  # older hift.py without the helper: plain weights still load
        logger.warning("hift.py has no to_legacy_weight_norm_state_dict; writing plain weights")
        return module.state_dict()
    return to_legacy(module)


@torch.no_grad()
def _voice_the_f0_head(hift: nn.Module) -> None:
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


def _write_network(name: str, config: ModelConfig, out: Path, seed: int) -> WrittenFile:
    # Distinct, fixed seeds per network: regenerating one file never changes the others.
    with _seeded(seed * 1000 + {"llm": 1, "flow": 2, "hift": 3}[name]):
        module = build_network(name, config)
        if name == "hift":
            _voice_the_f0_head(module)
    module.eval()
    params = sum(p.numel() for p in module.parameters())
    state = _hift_checkpoint(module) if name == "hift" else module.state_dict()
    entries = len(state)
    values = sum(t.numel() for t in state.values())
    path = out / f"{name}.pt"
    _save_atomic(dict(state), path)
    del state, module
    return WrittenFile(path.name, path.stat().st_size, params, entries, values)


def _write_speakers(config: ModelConfig, out: Path, seed: int) -> WrittenFile:
    gen = torch.Generator().manual_seed(seed * 1000 + 4)
    dim = config.llm.spk_embed_dim
    spk2info = {name: {"embedding": torch.randn(1, dim, generator=gen)} for name in SFT_SPEAKERS}
    path = out / "spk2info.pt"
    _save_atomic(spk2info, path)
    return WrittenFile(path.name, path.stat().st_size, entries=len(spk2info))


def _readme(config_path: Path, seed: int, written: list[WrittenFile]) -> str:
    lines = [
        "# Random-weight CosyVoice v1 model directory",
        "",
        f"Written by `cosyserve make-model --config {config_path.name} --seed {seed}`.",
        "The weights are random: this is NOT a trained model, its audio is noise-like. The ONNX files",
        "are small stand-ins with the official inputs/outputs, not CAM++ or the speech tokenizer.",
        "",
        "| file | bytes | parameters |",
        "|---|---:|---:|",
    ]
    for f in written:
        lines.append(f"| {f.name} | {f.bytes:,} | {'' if f.parameters is None else f'{f.parameters:,}'} |")
    return "\n".join(lines) + "\n"


def make_model(
    config_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    overwrite: bool = False,
) -> list[WrittenFile]:
    """Write a random-weight model directory for `config_path` into `out_dir`; returns what was written.

    Refuses to replace existing model files unless `overwrite`. Raises ModelConfigError for a
    config that cannot be built.
    """
    config_path = Path(config_path)
    config = load_model_config(config_path)  # validates before anything is written
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelDirectoryError(f"{out}: exists and is not a directory")
    existing = [n for n in (*REQUIRED_FILES, *ZERO_SHOT_FILES) if (out / n).exists()]
    same_yaml = (out / CONFIG_FILE).exists() and (out / CONFIG_FILE).resolve() == config_path.resolve()
    if existing and not overwrite and not (existing == [CONFIG_FILE] and same_yaml):
        raise ModelDirectoryError(f"{out}: already holds {', '.join(existing)}; pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)

    written: list[WrittenFile] = []
    if not same_yaml:
        shutil.copyfile(config_path, out / CONFIG_FILE)
    written.append(WrittenFile(CONFIG_FILE, (out / CONFIG_FILE).stat().st_size))
    for name in ("llm", "flow", "hift"):
        logger.info("building %s", name)
        written.append(_write_network(name, config, out, seed))
    written.append(_write_speakers(config, out, seed))

    from cosyserve.tools.onnx_standins import write_standins

    cam, tok = write_standins(
        out, seed=seed, embed_dim=config.llm.spk_embed_dim, vocab_size=config.llm.speech_token_size
    )
    written += [WrittenFile(Path(p).name, Path(p).stat().st_size) for p in (cam, tok)]
    (out / "README.md").write_text(_readme(config_path, seed, written), encoding="utf-8")
    return written


# ------------------------------------------------------------------------------------ CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a CosyVoice v1 cosyvoice.yaml")
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite model files already in --out")


def main(args: argparse.Namespace) -> int:
    try:
        written = make_model(args.config, args.out, seed=args.seed, overwrite=args.force)
    except CosyserveError as exc:
        print(f"cosyserve make-model: {exc.message}", file=sys.stderr)
        return 1
    out = Path(args.out).expanduser().resolve()
    print(f"wrote {out} (random weights, seed {args.seed}):")
    total = 0
    for f in written:
        extra = ""
        if f.parameters is not None:
            total += f.parameters
            extra = f"  {f.parameters:>13,} parameters, {f.entries} tensors"
            if f.checkpoint_values is not None and f.checkpoint_values != f.parameters:
                extra += f" ({f.checkpoint_values:,} values with weight-norm g/v)"
        elif f.entries is not None:
            extra = f"  {f.entries} speakers"
        print(f"  {f.name:<26}{f.bytes:>15,} bytes{extra}")
    print(f"  total parameters: {total:,}")
    return 0

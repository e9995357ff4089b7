"""The model-family registry: which CosyVoice generation a model directory holds, and where its code lives.

A family is one package under :mod:`cosyserve.families`, named here by ``"module"`` and imported
only when a directory of that family is opened (vLLM's model registry does the same). A model
directory is recognised by its config file name (``cosyvoice.yaml``, ``cosyvoice2.yaml``,
``cosyvoice3.yaml``: the official directories ship exactly one) and confirmed by the upstream class
paths its yaml names under the inference keys, so a directory whose file name and content disagree
is refused with a message that says which family its content belongs to.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from cosyserve.errors import ModelConfigError, ModelDirectoryError

__all__ = ["FAMILIES", "FamilyEntry", "detect", "detect_from_tree", "entry", "family_root", "import_family"]


@dataclass(frozen=True)
class FamilyEntry:
    """One registry line: what identifies a family and where its code is."""

    name: str  # "cosyvoice2": the id used in settings, saved voices, the API
    title: str  # "CosyVoice2": for messages
    config_file: str  # the yaml an official directory of this family ships
    module: str  # the family package, imported lazily
    markers: frozenset[str]  # upstream class paths that only this family's yaml names
    speech_tokenizer_file: str  # the prompt speech tokenizer's ONNX file
    speech_token_hz: int  # speech tokens per second of audio

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


FAMILIES: dict[str, FamilyEntry] = {
    e.name: e
    for e in (
        FamilyEntry(
            name="cosyvoice1",
            title="CosyVoice",
            config_file="cosyvoice.yaml",
            module="cosyserve.families.cosyvoice1",
            markers=frozenset({"cosyvoice.llm.llm.TransformerLM", "cosyvoice.flow.flow.MaskedDiffWithXvec"}),
            speech_tokenizer_file="speech_tokenizer_v1.onnx",
            speech_token_hz=50,
        ),
        FamilyEntry(
            name="cosyvoice2",
            title="CosyVoice2",
            config_file="cosyvoice2.yaml",
            module="cosyserve.families.cosyvoice2",
            markers=frozenset(
                {
                    "cosyvoice.llm.llm.Qwen2LM",
                    "cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
                    "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
                    "cosyvoice.flow.decoder.CausalConditionalDecoder",
                }
            ),
            speech_tokenizer_file="speech_tokenizer_v2.onnx",
            speech_token_hz=25,
        ),
        FamilyEntry(
            name="cosyvoice3",
            title="CosyVoice3",
            config_file="cosyvoice3.yaml",
            module="cosyserve.families.cosyvoice3",
            markers=frozenset(
                {
                    "cosyvoice.llm.llm.CosyVoice3LM",
                    "cosyvoice.flow.flow.CausalMaskedDiffWithDiT",
                    "cosyvoice.flow.DiT.dit.DiT",
                    "cosyvoice.hifigan.generator.CausalHiFTGenerator",
                    "cosyvoice.hifigan.f0_predictor.CausalConvRNNF0Predictor",
                }
            ),
            speech_tokenizer_file="speech_tokenizer_v3.onnx",
            speech_token_hz=25,
        ),
    )
}

_INFERENCE_KEYS = ("llm", "flow", "hift")


def entry(name: str) -> FamilyEntry:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ModelConfigError(f"unknown model family {name!r}; cosyserve knows {_known()}") from None


def import_family(name: str) -> ModuleType:
    """The family's package (imported on first use)."""
    return entry(name).load()


def _known() -> str:
    return ", ".join(f"{e.title} ({e.config_file})" for e in FAMILIES.values())


def _class_paths(node: Any) -> Iterable[str]:
    """Every `!new:` / `!name:` target in a parsed yaml subtree."""
    from cosyserve.nn.yaml_reader import Tagged

    if isinstance(node, Tagged):
        yield node.target
        for value in (*node.args, *node.kwargs.values()):
            yield from _class_paths(value)
    elif isinstance(node, dict):
        for value in node.values():
            yield from _class_paths(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _class_paths(value)


def detect_from_tree(tree: dict[str, Any]) -> FamilyEntry | None:
    """The family whose marker classes the inference keys of a parsed yaml name (None: no marker)."""
    targets = {t for key in _INFERENCE_KEYS for t in _class_paths(tree.get(key))}
    # Later families first: CosyVoice3 reuses some CosyVoice2 class paths, never the reverse.
    for family in reversed(FAMILIES.values()):
        if targets & family.markers:
            return family
    return None


def detect(model_dir: str | os.PathLike[str]) -> FamilyEntry:
    """The family of a model directory, from its config file name; refused with a message naming
    the families cosyserve knows when there is none (or several)."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise ModelDirectoryError(
            f"{root}: model directory not found" if not root.exists() else f"{root}: is not a directory"
        )
    found = [e for e in FAMILIES.values() if (root / e.config_file).is_file()]
    if not found:
        raise ModelDirectoryError(
            f"{root}: not a CosyVoice model directory of a known family: none of "
            f"{', '.join(e.config_file for e in FAMILIES.values())} is there (cosyserve knows {_known()})"
        )
    if len(found) > 1:
        raise ModelDirectoryError(
            f"{root}: holds the configs of several families ({', '.join(e.config_file for e in found)}); "
            "an official model directory has exactly one"
        )
    return found[0]


def family_root(model_dir: str | os.PathLike[str], family: str) -> Path:
    """The resolved root of a model directory that :func:`detect` finds to be of ``family``;
    ModelConfigError naming the family it does hold otherwise."""
    found = detect(model_dir)  # ModelDirectoryError: no such directory, no (or several) configs
    root = Path(model_dir).expanduser().resolve()
    if found.name != family:
        raise ModelConfigError(
            f"{root}: this is a {found.title} model directory ({found.config_file}), "
            f"not a {FAMILIES[family].title} one"
        )
    return root

"""Open a CosyVoice v1 model directory: check its files, read its config, load its weights.

The official layout (CosyVoice-300M, -SFT, -Instruct)::

    cosyvoice.yaml            architecture (read safely by yaml_config, nothing executed)
    llm.pt flow.pt hift.pt    torch.save(state_dict); hift.pt with weight-norm g/v tensors
    spk2info.pt               {speaker: {'embedding': FloatTensor[1, 192]}}
    campplus.onnx             speaker-embedding model   } zero-shot / cross-lingual only:
    speech_tokenizer_v1.onnx  speech tokenizer          } presence recorded, opened lazily

Every problem becomes ONE :class:`ModelDirectoryError` (or :class:`ModelConfigError`) that names
the file and what is wrong with it, never a stack trace from deep inside torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cosyserve.errors import ModelConfigError, ModelDirectoryError
from cosyserve.families import FAMILIES
from cosyserve.families.cosyvoice1.config import ModelConfig, load_model_config
from cosyserve.nn.checkpoint import (
    check_state_dict,
    detach_from_checkpoint,
    load_into,
    read_checkpoint,
    read_speakers,
    skip_random_init,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "REQUIRED_FILES",
    "ZERO_SHOT_FILES",
    "LoadedModel",
    "ModelFiles",
    "build_network",
    "build_networks",
    "check_state_dict",
    "detach_from_checkpoint",
    "find_model_files",
    "load_model_directory",
    "load_networks",
    "read_checkpoint",
    "read_speakers",
]

CONFIG_FILE = "cosyvoice.yaml"
REQUIRED_FILES = (CONFIG_FILE, "llm.pt", "flow.pt", "hift.pt", "spk2info.pt")
CAMPPLUS_FILE = "campplus.onnx"
SPEECH_TOKENIZER_FILE = "speech_tokenizer_v1.onnx"
ZERO_SHOT_FILES = (CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE)

_MAX_LISTED = 5


@dataclass(frozen=True)
class ModelFiles:
    """The files of a checked model directory. The ONNX models are None when absent."""

    root: Path
    config: Path
    llm: Path
    flow: Path
    hift: Path
    spk2info: Path
    campplus: Path | None
    speech_tokenizer: Path | None

    @property
    def supports_zero_shot(self) -> bool:
        """Zero-shot / cross-lingual cloning needs both ONNX front-end models."""
        return self.campplus is not None and self.speech_tokenizer is not None


def find_model_files(model_dir: str | os.PathLike[str]) -> ModelFiles:
    """Check that `model_dir` has the files of a CosyVoice v1 model directory."""
    root = Path(model_dir).expanduser()
    if not root.exists():
        raise ModelDirectoryError(f"{root}: model directory not found")
    if not root.is_dir():
        raise ModelDirectoryError(f"{root}: is not a directory")
    root = root.resolve()
    if not (root / CONFIG_FILE).is_file():
        other = [e for e in FAMILIES.values() if (root / e.config_file).is_file()]
        if other:
            raise ModelConfigError(
                f"{root}: this is a {other[0].title} model directory ({other[0].config_file}), not a "
                "CosyVoice v1 one; open it through its family (cosyserve.families.detect)"
            )
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    if missing:
        raise ModelDirectoryError(
            f"{root}: missing {', '.join(missing)} (a CosyVoice v1 model directory needs "
            f"{', '.join(REQUIRED_FILES)}; {', '.join(ZERO_SHOT_FILES)} for zero-shot)"
        )

    def optional(name: str) -> Path | None:
        path = root / name
        return path if path.is_file() else None

    files = ModelFiles(
        root=root,
        config=root / CONFIG_FILE,
        llm=root / "llm.pt",
        flow=root / "flow.pt",
        hift=root / "hift.pt",
        spk2info=root / "spk2info.pt",
        campplus=optional(CAMPPLUS_FILE),
        speech_tokenizer=optional(SPEECH_TOKENIZER_FILE),
    )
    if not files.supports_zero_shot:
        absent = [
            n
            for n, p in ((CAMPPLUS_FILE, files.campplus), (SPEECH_TOKENIZER_FILE, files.speech_tokenizer))
            if p is None
        ]
        logger.info(
            "%s: no %s: zero-shot / cross-lingual voice cloning is unavailable", root, ", ".join(absent)
        )
    return files


# ------------------------------------------------------------------------------------ networks


NETWORK_NAMES = ("llm", "flow", "hift")


def build_network(name: str, config: ModelConfig) -> nn.Module:
    """Instantiate one network ("llm", "flow" or "hift") from a config, randomly initialised."""
    # Imported here: the network modules are large and loader users often need only the files.
    if name == "llm":
        from cosyserve.families.cosyvoice1.llm import TransformerLM

        cls: type[nn.Module] = TransformerLM
    elif name == "flow":
        from cosyserve.families.cosyvoice1.flow import MaskedDiffWithXvec

        cls = MaskedDiffWithXvec
    elif name == "hift":
        from cosyserve.nn.hift import HiFTGenerator

        cls = HiFTGenerator
    else:
        raise ValueError(f"unknown network {name!r} (expected one of {NETWORK_NAMES})")
    try:
        return cls(getattr(config, name))
    except (ValueError, NotImplementedError, KeyError) as exc:
        # The network code refused an option the yaml reader let through.
        raise ModelConfigError(f"{CONFIG_FILE}: '{name}' cannot be built: {exc}") from exc


def build_networks(config: ModelConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Instantiate (llm, flow, hift) from a config, with their default (random) initialisation."""
    llm, flow, hift = (build_network(name, config) for name in NETWORK_NAMES)
    return llm, flow, hift


def load_network(
    name: str, files: ModelFiles, config: ModelConfig, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build one network ("llm", "flow" or "hift") and load its checkpoint: memory-mapped, strict,
    the checkpoint's tensors adopted rather than copied; eval mode on `device`."""
    path = getattr(files, name)
    if name == "hift":
        from cosyserve.nn.hift import load_hift_file

        return load_hift_file(path, config.hift, device, CONFIG_FILE)
    state_dict = read_checkpoint(path)
    with skip_random_init():
        module = build_network(name, config)
    load_into(module, state_dict, path, "", CONFIG_FILE)  # strict: every parameter is overwritten
    del state_dict
    return module.to(device).eval()


def load_networks(
    files: ModelFiles, config: ModelConfig, device: str | torch.device = "cpu"
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The three networks, one at a time (a checkpoint's pages are only read while it loads)."""
    llm, flow, hift = (load_network(name, files, config, device) for name in NETWORK_NAMES)
    return llm, flow, hift


# ------------------------------------------------------------------------------------ ONNX


@dataclass
class LoadedModel:
    """A model directory, loaded: config, networks (eval mode), speaker table. The zero-shot ONNX
    models are opened on demand by :class:`cosyserve.voices.prompt.PromptEncoder`."""

    files: ModelFiles
    config: ModelConfig
    llm: nn.Module
    flow: nn.Module
    hift: nn.Module
    speakers: dict[str, torch.Tensor]

    @property
    def supports_zero_shot(self) -> bool:
        return self.files.supports_zero_shot


def load_model_directory(
    model_dir: str | os.PathLike[str],
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Check, read and load a CosyVoice v1 model directory (see the module docstring).

    Raises ModelDirectoryError / ModelConfigError naming the file and the problem.
    """
    files = find_model_files(model_dir)
    config = load_model_config(files.config)
    speakers = read_speakers(files.spk2info, config.llm.spk_embed_dim)  # cheap checks first
    llm, flow, hift = load_networks(files, config, device)
    logger.info(
        "loaded %s: %d speakers, zero-shot %s",
        files.root,
        len(speakers),
        "available" if files.supports_zero_shot else "unavailable",
    )
    return LoadedModel(
        files=files,
        config=config,
        llm=llm,
        flow=flow,
        hift=hift,
        speakers=speakers,
    )

"""Open a CosyVoice3 model directory: check its files, read its config, load its weights.

The official layout (Fun-CosyVoice3-0.5B-2512)::

    cosyvoice3.yaml                     architecture (read inertly, nothing executed)
    llm.pt flow.pt hift.pt              state dicts (llm/flow fp16 storage; hift.pt weight_g/weight_v)
    campplus.onnx                       speaker embedding   } every request brings a voice (the
    speech_tokenizer_v3.onnx            prompt speech tokens } published model has no spk2info.pt)
    flow.decoder.estimator.fp32.onnx    optional: the DiT estimator for ONNX Runtime / TensorRT
    CosyVoice-BlankEN/config.json       the Qwen2 backbone's dimensions
    CosyVoice-BlankEN/vocab.json, merges.txt (or tokenizer.json), tokenizer_config.json
    CosyVoice-BlankEN/model.safetensors superseded by llm.pt: never read

The published directory has no ``spk2info.pt``; one that does (speakers saved as upstream's
``spk2info`` entries with an ``embedding``) gets built-in speakers, as upstream loads it. Networks
are memory-mapped and loaded strictly (every parameter overwritten, no second copy of the weights). The vocoder's fixed noise is the reference's seed-0
construction-time buffer, reproduced lazily from the config (:mod:`.noise`).

Every problem becomes ONE :class:`ModelDirectoryError` (or :class:`ModelConfigError`) that names
the file and what is wrong with it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cosyserve.errors import ModelDirectoryError
from cosyserve.families import FAMILIES, family_root
from cosyserve.families.cosyvoice2.llm import BACKBONE_DIR, LLM_CHECKPOINT
from cosyserve.families.cosyvoice2.loader import SPK2INFO_FILE, check_vocabularies, missing_tokenizer_files
from cosyserve.families.cosyvoice3.config import CONFIG_FILE, ModelConfig, load_model_config
from cosyserve.families.cosyvoice3.flow import CausalMaskedDiffWithDiT, load_flow
from cosyserve.families.cosyvoice3.hift import CausalHiFTGenerator, load_causal_hift_file
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM, load_llm
from cosyserve.families.cosyvoice3.noise import HiFTNoise, NoiseRecipe, ReferenceHiFTNoise
from cosyserve.nn.checkpoint import read_speakers
from cosyserve.text.qwen_tokenizer import QwenTokenizer, load_qwen_tokenizer
from cosyserve.voices.prompt import CAMPPLUS_FILE

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelFiles", "find_model_files", "load_model_directory"]

FAMILY = "cosyvoice3"
SPEECH_TOKENIZER_FILE = FAMILIES[FAMILY].speech_tokenizer_file
ESTIMATOR_ONNX_FILE = "flow.decoder.estimator.fp32.onnx"
REQUIRED_FILES = (CONFIG_FILE, LLM_CHECKPOINT, "flow.pt", "hift.pt", CAMPPLUS_FILE, SPEECH_TOKENIZER_FILE)
BACKBONE_CONFIG = f"{BACKBONE_DIR}/config.json"


@dataclass(frozen=True)
class ModelFiles:
    """The files of a checked CosyVoice3 model directory."""

    root: Path
    config: Path
    llm: Path
    flow: Path
    hift: Path
    campplus: Path
    speech_tokenizer: Path
    backbone: Path  # CosyVoice-BlankEN/: config.json and the tokenizer files
    estimator_onnx: Path | None  # the official ONNX export of the DiT, when shipped
    spk2info: Path | None = None  # built-in speakers: not in the published directory, read when present


def find_model_files(model_dir: str | os.PathLike[str]) -> ModelFiles:
    """Check that ``model_dir`` has the files of a CosyVoice3 model directory (module docstring)."""
    root = family_root(model_dir, FAMILY)
    missing = [name for name in (*REQUIRED_FILES, BACKBONE_CONFIG) if not (root / name).is_file()]
    backbone = root / BACKBONE_DIR
    missing += missing_tokenizer_files(backbone)
    if missing:
        raise ModelDirectoryError(
            f"{root}: missing {', '.join(missing)} (a CosyVoice3 model directory, as published as "
            f"Fun-CosyVoice3-0.5B-2512, has {', '.join(REQUIRED_FILES)} and {BACKBONE_DIR}/ with the "
            "backbone's config.json and tokenizer files)"
        )
    estimator = root / ESTIMATOR_ONNX_FILE
    speakers = root / SPK2INFO_FILE
    return ModelFiles(
        root=root,
        config=root / CONFIG_FILE,
        llm=root / LLM_CHECKPOINT,
        flow=root / "flow.pt",
        hift=root / "hift.pt",
        campplus=root / CAMPPLUS_FILE,
        speech_tokenizer=root / SPEECH_TOKENIZER_FILE,
        backbone=backbone,
        estimator_onnx=estimator if estimator.is_file() else None,
        spk2info=speakers if speakers.is_file() else None,
    )


@dataclass
class LoadedModel:
    """A CosyVoice3 directory, loaded: config, tokenizer, networks (eval mode) and the vocoder's
    fixed noise. The prompt ONNX models are opened on demand by the backend's PromptEncoder."""

    files: ModelFiles
    config: ModelConfig
    tokenizer: QwenTokenizer
    llm: CosyVoice3LM
    flow: CausalMaskedDiffWithDiT
    hift: CausalHiFTGenerator
    noise: HiFTNoise
    speakers: dict[str, torch.Tensor] = field(default_factory=dict)  # spk2info.pt, when present


def load_model_directory(
    model_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> LoadedModel:
    """Check, read and load a CosyVoice3 model directory (see the module docstring); the three
    networks one at a time, so a checkpoint's pages are only read while it loads."""
    files = find_model_files(model_dir)
    config = load_model_config(files.root)
    if config.llm is None:  # find_model_files checked the file; a race removed it
        raise ModelDirectoryError(f"{files.root / BACKBONE_CONFIG}: missing")
    tokenizer = load_qwen_tokenizer(files.backbone, FAMILY)  # cheap checks before the weights
    check_vocabularies(config, tokenizer, files.config)  # type: ignore[arg-type]  # the same fields
    speakers = read_speakers(files.spk2info, config.flow.spk_embed_dim) if files.spk2info else {}
    llm = load_llm(files.root, config.llm, endofprompt_id=tokenizer.endofprompt_id).to(device)
    flow = load_flow(files.flow, config.flow, device)
    hift = load_causal_hift_file(files.hift, config.hift, device)
    logger.info("loaded CosyVoice3 model %s", files.root)
    return LoadedModel(
        files=files,
        config=config,
        tokenizer=tokenizer,
        llm=llm,
        flow=flow,
        hift=hift,
        noise=ReferenceHiFTNoise(NoiseRecipe.from_config(config)),
        speakers=speakers,
    )

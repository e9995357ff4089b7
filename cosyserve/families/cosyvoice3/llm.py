"""CosyVoice3's ``CosyVoice3LM`` (``llm.pt``): CosyVoice2's Qwen2 LLM with a wider speech head.

Differences from :class:`~cosyserve.families.cosyvoice2.llm.Qwen2LM` (same backbone, same decoding
state machines and sampler):

* no ``llm_embedding``: ``sos`` (6561) and ``task_id`` (6563) are rows of ``speech_embedding``;
* the head ``llm_decoder`` has ``speech_token_size + 200`` outputs and no bias: speech tokens
  ``[0, 6561)``, SOS 6561, EOS 6562, task_id 6563, FILL 6564, 6565..6760 unused; every id from
  6561 on is a stop id;
* the text (prompt text ++ TTS text) must contain ``<|endofprompt|>``: a clear
  :class:`~cosyserve.errors.InvalidRequestError` here (the reference asserts); with text streamed
  in, the prompt text up to ``<|endofprompt|>`` follows ``sos`` directly.

Reference quirks kept (parity README "Upstream quirks recorded as-is"): ``ignore_eos`` masks id
6561, which is SOS here, so EOS is never masked and ``min_len`` is not enforced; with text
streamed in and no prompt speech, the first 15 speech tokens are decoded from ``[sos, instruct]``
before any TTS text is fed. Not kept: a stop id other than FILL while text streams in (or other
than EOS after it), an error that ends the reference's request, is never drawn (masked, as for
CosyVoice2: :class:`~cosyserve.families.cosyvoice2.llm.BistreamDecoder`).

:class:`SilentTokenFilter` is the reference ``llm_job``'s filter of long runs of silent tokens.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

from torch import Tensor, nn

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice2.llm import (
    ENDOFPROMPT_ID,
    InputKind,
    Qwen2Encoder,
    Qwen2LM,
    Qwen2LMConfig,
    SpeechVocab,
    build_llm,
    load_backbone_config,
    load_llm_weights,
    qwen2_lm_config,
)
from cosyserve.nn.qwen2 import Qwen2Config
from cosyserve.nn.yaml_reader import load_yaml_tree

COSYVOICE3_LM = "cosyvoice.llm.llm.CosyVoice3LM"
YAML_FILE = "cosyvoice3.yaml"
EXTRA_HEAD_IDS = 200  # the head scores speech_token_size + 200 ids

# upstream CosyVoice3Model.silent_tokens ("FSQ silent and breath token") and its run limit
SILENT_TOKENS = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
MAX_SILENT_RUN = 5


def cosyvoice3_vocab(speech_token_size: int) -> SpeechVocab:
    v = speech_token_size
    return SpeechVocab(
        v,
        v + EXTRA_HEAD_IDS,
        sos=v,
        task_id=v + 2,
        eos=v + 1,
        fill=v + 3,
        stop_ids=frozenset(range(v, v + EXTRA_HEAD_IDS)),
    )


def cosyvoice3_llm_config(
    tree: dict[str, Any], backbone: Qwen2Config, source: str = YAML_FILE
) -> Qwen2LMConfig:
    """The yaml's ``llm`` node (``CosyVoice3LM``) plus the backbone config, as :class:`Qwen2LMConfig`."""
    return qwen2_lm_config(tree, backbone, source, (COSYVOICE3_LM,))


def load_llm_config(model_dir: str | os.PathLike[str]) -> Qwen2LMConfig:
    """``cosyvoice3.yaml`` + ``CosyVoice-BlankEN/config.json`` of a model directory."""
    model_dir = Path(model_dir)
    path = model_dir / YAML_FILE
    return cosyvoice3_llm_config(load_yaml_tree(path), load_backbone_config(model_dir), str(path))


class CosyVoice3LM(Qwen2LM):
    """The CosyVoice3 speech-token LLM (see the module docstring for what differs)."""

    family = "cosyvoice3"

    def __init__(self, cfg: Qwen2LMConfig, endofprompt_id: int = ENDOFPROMPT_ID):
        super().__init__(cfg)
        self.endofprompt_id = int(endofprompt_id)

    @staticmethod
    def _make_vocab(cfg: Qwen2LMConfig) -> SpeechVocab:
        return cosyvoice3_vocab(cfg.speech_token_size)

    def _build_heads(self, cfg: Qwen2LMConfig) -> None:
        self.llm = Qwen2Encoder(cfg.backbone)
        self.llm_decoder = nn.Linear(cfg.llm_output_size, self.vocab.head_size, bias=False)
        self.speech_embedding = nn.Embedding(self.vocab.head_size, cfg.llm_input_size)

    def special_embedding(self, kind: InputKind) -> Tensor:
        row = self.vocab.sos if kind is InputKind.SOS else self.vocab.task_id
        return self.speech_embedding.weight[row]

    def _check_text(self, text: list[int], prompt_text: list[int]) -> None:
        if self.endofprompt_id not in text and self.endofprompt_id not in prompt_text:
            raise InvalidRequestError(
                "CosyVoice3 needs <|endofprompt|> in the text or the prompt text (e.g. a prompt text "
                "'You are a helpful assistant.<|endofprompt|>' followed by the prompt transcript)"
            )

    def _bistream_options(self) -> dict[str, Any]:
        return {"split_at_endofprompt": True, "endofprompt_id": self.endofprompt_id}


def load_llm(
    model_dir: str | os.PathLike[str], cfg: Qwen2LMConfig | None = None, endofprompt_id: int = ENDOFPROMPT_ID
) -> CosyVoice3LM:
    """Build and load ``<model_dir>/llm.pt`` (config from ``cosyvoice3.yaml`` unless given)."""
    model_dir = Path(model_dir)
    model = cast(CosyVoice3LM, build_llm(cfg or load_llm_config(model_dir), CosyVoice3LM))
    model.endofprompt_id = int(endofprompt_id)
    load_llm_weights(model, model_dir / "llm.pt")
    return model


class SilentTokenFilter:
    """Drop a silent token once more than ``max_run`` silent tokens came in a row (reference
    ``CosyVoice3Model.llm_job``): the run counter grows with every silent token, kept or not, and
    any other token resets it."""

    def __init__(self, silent: Iterable[int] = SILENT_TOKENS, max_run: int = MAX_SILENT_RUN):
        self.silent_tokens = frozenset(int(t) for t in silent)
        self.max_run = int(max_run)
        self._run = 0

    def keep(self, token: int) -> bool:
        """Whether ``token`` goes on to the flow."""
        if int(token) in self.silent_tokens:
            self._run += 1
            return self._run <= self.max_run
        self._run = 0
        return True

    def filter(self, tokens: Iterable[int]) -> list[int]:
        return [t for t in tokens if self.keep(t)]

"""CosyVoice3's text frontend: CosyVoice2's (same normalisation, segmentation, prompt trimming and
text streaming; see :mod:`cosyserve.families.cosyvoice2.frontend`) with the CosyVoice3 tokenizer
(278 added specials: tags, ``<|endofsystem|>``, CMU phones ``[AA1]``..., pinyin ``[ǐ]``...) and its
rule that every LLM input carries ``<|endofprompt|>``.

CosyVoice3 has no implicit system prompt: upstream's callers write it (frontend.json ``modes``):

* zero-shot: prompt text ``'You are a helpful assistant.<|endofprompt|>' + transcript``;
* cross-lingual: the TTS text itself starts ``'You are a helpful assistant.<|endofprompt|>'``;
* instruct2: instruct text ``'You are a helpful assistant. <instruction><|endofprompt|>'``.

Text in those forms is used exactly as upstream uses it (it contains ``<|...|>``, so it is neither
normalised nor split). Text without ``<|endofprompt|>`` gets the same form written here with
``system_prompt``, after the caller's part was normalised (and, for TTS text, split); upstream
would stop on its assert instead. ``system_prompt=None`` makes a missing ``<|endofprompt|>`` an
:class:`~cosyserve.errors.InvalidRequestError`.

SFT only for directories with a ``spk2info.pt`` (the published model has none), in the
cross-lingual text form. Upstream's saved-speaker instruct2 quirk
(the saved zero-shot prompt replaces the instruction) is not reproduced: instruct2 always uses the
instruction; upstream's behaviour is :meth:`CosyVoice3Frontend.zero_shot` with the saved prompt.
"""

from __future__ import annotations

from torch import Tensor

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice2.frontend import CosyVoice2Frontend, ModelInput
from cosyserve.text.qwen_tokenizer import ENDOFPROMPT, QwenTokenizer
from cosyserve.voices.prompt import PromptFeatures

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class CosyVoice3Frontend(CosyVoice2Frontend):
    """Text normalisation, segmentation and per-mode model inputs of a CosyVoice3 model."""

    family = "cosyvoice3"

    def __init__(
        self,
        tokenizer: QwenTokenizer,
        normalizer: str = "wetext",
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ):
        super().__init__(tokenizer, normalizer)
        self.system_prompt = system_prompt

    def _system_turn(self, what: str) -> str:
        if self.system_prompt is None:
            raise InvalidRequestError(
                f"CosyVoice3 needs <|endofprompt|> in the {what}, e.g. "
                f"'{DEFAULT_SYSTEM_PROMPT}<|endofprompt|>' before it"
            )
        return self.system_prompt + ENDOFPROMPT

    # -- modes ---------------------------------------------------------------------------------

    def sft(self, tts_text: str | None, embedding: Tensor, text_frontend: bool = True) -> list[ModelInput]:
        """A built-in speaker of a directory that has ``spk2info.pt`` (the published one has none):
        the text carries the system turn, as in cross-lingual, and the flow only the embedding."""
        inputs = super().sft(tts_text, embedding, text_frontend)
        if tts_text is None:  # streamed text: the system turn goes first, as prompt text
            inputs[0].prompt_text_ids = self.tokenize(self._system_turn("text"))
        return inputs

    def prompt_text(self, prompt_text: str, text_frontend: bool = True) -> str:
        """The zero-shot prompt text: as written when it has ``<|endofprompt|>``, else the system
        turn followed by the normalised transcript."""
        if ENDOFPROMPT in prompt_text:
            return prompt_text
        return self._system_turn("prompt text") + super().prompt_text(prompt_text, text_frontend)

    def cross_lingual(
        self, tts_text: str | None, prompt: PromptFeatures, text_frontend: bool = True
    ) -> list[ModelInput]:
        inputs = super().cross_lingual(tts_text, prompt, text_frontend)
        if tts_text is None:  # streamed text: the system turn goes first, as prompt text
            inputs[0].prompt_text_ids = self.tokenize(self._system_turn("text"))
        return inputs

    def _segment_ids(
        self, tts_text: str | None, text_frontend: bool, mode: str
    ) -> list[tuple[str | None, list[int] | None]]:
        if mode not in ("cross_lingual", "sft") or tts_text is None or ENDOFPROMPT in tts_text:
            return super()._segment_ids(tts_text, text_frontend, mode)
        turn = self._system_turn("text")
        return [(turn + s, self.tokenize(turn + s)) for s in self.segments(tts_text, text_frontend)]

    def _instruct_text(self, instruct_text: str) -> str:
        text = instruct_text.strip()
        if not text:
            raise InvalidRequestError("instruct_text is empty")
        if ENDOFPROMPT in text:
            return instruct_text
        if self.system_prompt is None:
            self._system_turn("instruct text")
        return f"{self.system_prompt} {text}{ENDOFPROMPT}"

"""CosyVoice2's text frontend and what each mode hands the LLM and the flow (upstream
``CosyVoiceFrontEnd`` with a Qwen2 tokenizer, ``CosyVoice2.inference_*``).

Text: :meth:`CosyVoice2Frontend.normalize` is upstream ``text_normalize`` (wetext TN, CosyVoice's
rules, ``split_paragraph`` with English lengths counted in Qwen tokens; text with ``<|...|>`` is
left alone), through :class:`cosyserve.text.frontend.TextFrontend`. Fine-grained tags (``[breath]``,
``<strong>``, ``[laughter]`` ... every special token of the family's tokenizer) pass through
untouched: where TN would change one (a CMU phone's stress digit, say), the text around the tags
is normalised with each tag held out, and the tags are put back before splitting.

Modes (one :class:`ModelInput` per text segment, as upstream's ``model_input``):

* ``sft``: speaker embedding only (``spk2info.pt``); the LLM ignores it, the flow uses it;
* ``zero_shot``: prompt transcript (normalised, unsplit) + prompt speech tokens for the LLM;
  prompt tokens, mel and embedding for the flow;
* ``cross_lingual``: zero-shot without the LLM prompt (the flow keeps the prompt);
* ``instruct2``: the instruction is the LLM's prompt text, with ``<|endofprompt|>`` appended
  (unless the caller wrote it); no LLM prompt speech; the flow keeps the prompt;
* ``vc``: no LLM; source speech tokens for the flow.

Prompt tokens and mel are trimmed to ``n = min(mel_frames // 2, n_tokens)`` tokens and ``2n``
frames (upstream at 24 kHz), except in ``vc`` (upstream does not trim there).

Text streamed in (upstream's bistream): :meth:`CosyVoice2Frontend.stream_text_ids` tokenises each
arriving piece and yields its ids one by one, as upstream's ``_extract_text_token_generator``
does (streamed text is not normalised); the mode's :class:`ModelInput` then has ``text_ids=None``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cosyserve.errors import InvalidRequestError, UnsupportedModeError
from cosyserve.text.frontend import TextFrontend
from cosyserve.text.normalize import detect_language, has_tags, is_only_punctuation
from cosyserve.text.qwen_tokenizer import ENDOFPROMPT, QwenTokenizer
from cosyserve.text.segment import pack_reference, split_reference
from cosyserve.voices.prompt import PromptFeatures, align_prompt_lengths

logger = logging.getLogger(__name__)

TOKEN_MEL_RATIO = 2  # 25 Hz speech tokens, 50 Hz mel frames
_PLACEHOLDER_PREFIX = "qqtagz"  # letters only: TN and CosyVoice's rules leave such words alone


@dataclass
class ModelInput:
    """What one text segment hands the model (upstream ``model_input``); empty = absent."""

    text_ids: list[int] | None  # None: the text is streamed in (see stream_text_ids)
    prompt_text_ids: list[int] = field(default_factory=list)
    llm_prompt_speech_tokens: list[int] = field(default_factory=list)
    flow_prompt_speech_tokens: Tensor = field(default_factory=lambda: torch.zeros(1, 0, dtype=torch.long))
    prompt_speech_feat: Tensor | None = None  # [1, 2n, 80]; None: no prompt mel
    flow_embedding: Tensor | None = None  # [1, 192]
    llm_embedding: Tensor | None = None  # passed by upstream, ignored by the Qwen2 LLMs
    source_speech_tokens: list[int] | None = None  # vc only
    text: str | None = None  # the segment (for logs and error messages)


class CosyVoice2Frontend:
    """Text normalisation, segmentation and per-mode model inputs of a CosyVoice2 model.

    ``normalizer`` as :class:`~cosyserve.text.frontend.TextFrontend` ("wetext", "none", "off").
    """

    family = "cosyvoice2"

    def __init__(self, tokenizer: QwenTokenizer, normalizer: str = "wetext"):
        self.tokenizer = tokenizer
        self.text = TextFrontend(tokenizer=tokenizer, normalizer=normalizer)
        self._as_written = TextFrontend(tokenizer=tokenizer, normalizer="off")
        tags = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._tag_pattern = re.compile("|".join(re.escape(t) for t in tags)) if tags else None

    # -- text ----------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def preload(self) -> None:
        self.text.preload()

    def normalize(
        self,
        text: str,
        split: bool = True,
        max_text_length: int | None = None,
        enable_smart_split: bool = True,
    ) -> list[str]:
        """Upstream ``text_normalize`` (see the module doc; the segmentation options are
        :meth:`TextFrontend.normalize`'s). Raises InvalidRequestError for text with nothing to say."""
        segments = self.text.normalize(text, split, max_text_length, enable_smart_split)
        if has_tags(text) or self._tags_kept(text, segments):
            return segments
        logger.debug("normalisation changed a tag; normalising around the tags instead")
        return self._normalize_around_tags(text, split, max_text_length, enable_smart_split)

    def _tags(self, text: str) -> list[str]:
        return self._tag_pattern.findall(text) if self._tag_pattern is not None else []

    def _tags_kept(self, text: str, segments: Sequence[str]) -> bool:
        return self._tags(text) == self._tags("".join(segments))

    def _normalize_around_tags(
        self, text: str, split: bool, max_text_length: int | None, enable_smart_split: bool
    ) -> list[str]:
        tags = self._tags(text)
        prefix = _PLACEHOLDER_PREFIX
        while prefix in text:
            prefix += "q"
        width = 4
        while 26**width < len(tags):
            width += 1
        marks = [prefix + _letters(i, width) for i in range(len(tags))]
        it = iter(marks)
        held_out = self._tag_pattern.sub(lambda _m: next(it), text)  # type: ignore[union-attr]
        normalized = self.text.normalize(held_out, split=False)[0]
        for mark, tag in zip(marks, tags):
            if normalized.count(mark) != 1:
                logger.warning("text normalisation lost a tag; the text is used as written")
                return self._as_written.normalize(text, split, max_text_length, enable_smart_split)
            normalized = normalized.replace(mark, tag)
        if not split:
            return [normalized]
        if max_text_length is not None or not enable_smart_split:
            return self._as_written.normalize(normalized, True, max_text_length, enable_smart_split)
        lang = detect_language(text)
        utts, _ = split_reference(normalized, lang, final=True)
        length = len if lang == "zh" else (lambda s: len(self.tokenize(s)))
        return [s for s in pack_reference(utts, length) if not is_only_punctuation(s)]

    def iter_segments(
        self, text: str, max_text_length: int | None = None, enable_smart_split: bool = True
    ) -> Iterator[str]:
        """A request's TTS text as the segments its LLM runs take, one by one: what
        :class:`~cosyserve.families.base.SpeechTask` iterates (TextFrontend's interface)."""
        return iter(self.normalize(text, True, max_text_length, enable_smart_split))

    def segments(self, tts_text: str, text_frontend: bool = True, **split_options) -> list[str]:
        """The TTS text's segments (one LLM run each); ``text_frontend=False`` keeps it whole."""
        if not text_frontend:
            return [tts_text]
        return self.normalize(tts_text, split=True, **split_options)

    def prompt_text(self, prompt_text: str, text_frontend: bool = True) -> str:
        """A prompt transcript as the LLM gets it: normalised, not split."""
        if not text_frontend:
            return prompt_text
        return self.normalize(prompt_text, split=False)[0]

    def stream_text_ids(self, pieces: Iterable[str]) -> Iterator[list[int]]:
        """Token ids of text arriving in pieces, one id per yielded piece (upstream's
        ``_extract_text_token_generator``: each piece is tokenised on its own, not normalised)."""
        for piece in pieces:
            if not isinstance(piece, str):
                raise InvalidRequestError(f"streamed text pieces must be strings, got {type(piece).__name__}")
            for token in self.tokenize(piece):
                yield [token]

    # -- modes ---------------------------------------------------------------------------------

    def sft(self, tts_text: str | None, embedding: Tensor, text_frontend: bool = True) -> list[ModelInput]:
        """A built-in speaker (``spk2info.pt`` entry ``embedding`` ``[1, 192]``): its embedding is
        all the flow gets. ``tts_text=None``: one input for text streamed in."""
        return [
            ModelInput(ids, flow_embedding=embedding, llm_embedding=embedding, text=s)
            for s, ids in self._segment_ids(tts_text, text_frontend, "sft")
        ]

    def zero_shot(
        self, tts_text: str | None, prompt_text: str, prompt: PromptFeatures, text_frontend: bool = True
    ) -> list[ModelInput]:
        """Clone the prompt's voice; ``prompt_text`` is its transcript. ``tts_text=None``: one
        input for text streamed in."""
        prompt_ids = self.tokenize(self.prompt_text(prompt_text, text_frontend))
        feat, tokens = _trimmed(prompt)
        return [
            ModelInput(
                ids,
                prompt_text_ids=prompt_ids,
                llm_prompt_speech_tokens=tokens.reshape(-1).tolist(),
                flow_prompt_speech_tokens=tokens,
                prompt_speech_feat=feat,
                flow_embedding=prompt.embedding,
                llm_embedding=prompt.embedding,
                text=s,
            )
            for s, ids in self._segment_ids(tts_text, text_frontend, "zero_shot")
        ]

    def cross_lingual(
        self, tts_text: str | None, prompt: PromptFeatures, text_frontend: bool = True
    ) -> list[ModelInput]:
        """The prompt's voice for text in another language: no LLM prompt, the flow keeps it."""
        feat, tokens = _trimmed(prompt)
        return [
            ModelInput(
                ids,
                flow_prompt_speech_tokens=tokens,
                prompt_speech_feat=feat,
                flow_embedding=prompt.embedding,
                llm_embedding=prompt.embedding,
                text=s,
            )
            for s, ids in self._segment_ids(tts_text, text_frontend, "cross_lingual")
        ]

    def instruct2(
        self, tts_text: str | None, instruct_text: str, prompt: PromptFeatures, text_frontend: bool = True
    ) -> list[ModelInput]:
        """The prompt's voice, directed by ``instruct_text`` ("用四川话说这句话", "speak happily")."""
        instruct_ids = self.instruct_ids(instruct_text)
        feat, tokens = _trimmed(prompt)
        return [
            ModelInput(
                ids,
                prompt_text_ids=instruct_ids,
                flow_prompt_speech_tokens=tokens,
                prompt_speech_feat=feat,
                flow_embedding=prompt.embedding,
                llm_embedding=prompt.embedding,
                text=s,
            )
            for s, ids in self._segment_ids(tts_text, text_frontend, "instruct2")
        ]

    def voice_input(
        self, mode: str, segment: str | None, prompt: PromptFeatures, instruct_text: str | None = None
    ) -> ModelInput:
        """What one segment (already normalised; None: text streamed in) hands the model for a
        voice from a recording or a saved voice: ``instruct2`` with the instruction; cross-lingual
        in that mode or when the voice has no transcript; zero-shot otherwise."""
        if mode == "instruct2":
            return self.instruct2(segment, instruct_text or "", prompt, text_frontend=False)[0]
        if mode == "cross_lingual" or not prompt.text:
            return self.cross_lingual(segment, prompt, text_frontend=False)[0]
        return self.zero_shot(segment, self.prompt_text(prompt.text), prompt, text_frontend=False)[0]

    def speaker_input(
        self, mode: str, segment: str | None, embedding: Tensor, instruct_text: str | None = None
    ) -> ModelInput:
        """What one segment (already normalised; None: text streamed in) hands the model for a
        built-in speaker: :meth:`sft`, or in ``instruct2`` the instruction as the LLM's prompt text."""
        if mode != "instruct2":
            return self.sft(segment, embedding, text_frontend=False)[0]
        ((text, ids),) = self._segment_ids(segment, False, "instruct2")
        instruct = self.instruct_ids(instruct_text or "")
        return ModelInput(ids, instruct, flow_embedding=embedding, llm_embedding=embedding, text=text)

    def vc(self, source_speech_tokens: Tensor | Sequence[int], prompt: PromptFeatures) -> ModelInput:
        """Voice conversion: the source's speech tokens in the prompt's voice (no LLM, no trimming)."""
        source = torch.as_tensor(source_speech_tokens, dtype=torch.long).reshape(-1).tolist()
        return ModelInput(
            None,
            flow_prompt_speech_tokens=prompt.speech_tokens,
            prompt_speech_feat=prompt.speech_feat,
            flow_embedding=prompt.embedding,
            source_speech_tokens=source,
        )

    def instruct_ids(self, instruct_text: str) -> list[int]:
        """The instruction as the LLM's prompt text (the family's end-of-prompt rule applied)."""
        return self.tokenize(self._instruct_text(instruct_text))

    # -- family rules (CosyVoice3 overrides these) ---------------------------------------------

    def _instruct_text(self, instruct_text: str) -> str:
        """CosyVoice2 appends ``<|endofprompt|>`` to the instruction (not normalised)."""
        text = instruct_text.strip()
        if not text:
            raise InvalidRequestError("instruct_text is empty")
        return instruct_text if ENDOFPROMPT in text else text + ENDOFPROMPT

    def _segment_ids(
        self, tts_text: str | None, text_frontend: bool, mode: str
    ) -> list[tuple[str | None, list[int] | None]]:
        """(segment, token ids) per segment of the TTS text; ``[(None, None)]`` when it streams in."""
        if tts_text is None:
            return [(None, None)]
        return [(s, self.tokenize(s)) for s in self.segments(tts_text, text_frontend)]


class StreamedTextTokenizer:
    """Token ids of text that arrives in arbitrary pieces (a client may split a word in two).

    Each piece is tokenised as it arrives (no normalisation, as upstream's text generator), except
    its trailing partial word: alphabetic words (and numbers) are held back, with the whitespace
    before them, until a later piece shows where they end, so "hel" + "lo world" gives the ids of
    "hello world". Characters of scripts without spaces go at once.
    """

    _PARTIAL_WORD = re.compile(r"\s*[0-9A-Za-z\u00C0-\u024F\u0370-\u03FF\u0400-\u04FF'\u2019]*$")

    def __init__(self, tokenizer: QwenTokenizer):
        self.tokenizer = tokenizer
        self._held = ""

    def push(self, text: str) -> list[int]:
        """Ids of the text that is now complete (possibly none)."""
        text = self._held + text
        cut = self._PARTIAL_WORD.search(text).start()  # type: ignore[union-attr] - always matches
        ready, self._held = text[:cut], text[cut:]
        return self.tokenizer.encode(ready) if ready else []

    def finish(self) -> list[int]:
        """Ids of the rest (the text ended)."""
        rest, self._held = self._held.rstrip(), ""
        return self.tokenizer.encode(rest) if rest else []


def _trimmed(prompt: PromptFeatures) -> tuple[Tensor, Tensor]:
    """(mel ``[1, 2n, 80]``, tokens ``[1, n]``) with ``n = min(frames // 2, tokens)``."""
    feat, tokens = align_prompt_lengths(prompt.speech_feat, prompt.speech_tokens, TOKEN_MEL_RATIO)
    if tokens.shape[1] == 0:
        raise InvalidRequestError("the prompt recording is too short: no speech tokens")
    return feat, tokens


def _letters(index: int, width: int) -> str:
    """0 -> 'aaaa', 1 -> 'aaab', ...: fixed width, so no placeholder is a prefix of another, and no
    digits (TN would read them)."""
    out = ""
    for _ in range(width):
        index, rest = divmod(index, 26)
        out = chr(ord("a") + rest) + out
    return out


def unsupported(mode: str, family: str, reason: str) -> UnsupportedModeError:
    return UnsupportedModeError(f"{mode} is not available for {family} models: {reason}")

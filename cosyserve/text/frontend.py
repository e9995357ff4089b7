"""Text frontend: CosyVoice v1 text normalisation and segmentation.

Normalisers (``TextFrontend(normalizer=...)``):

* ``"wetext"``: wetext 0.1.8 TN (zh or en grammar) followed by CosyVoice's own rules; this is
  upstream's ``text_frontend == "wetext"``.
* ``"none"``: CosyVoice's own rules only (upstream when no TN engine loads).
* ``"off"``: no normalisation at all (upstream ``text_normalize(..., text_frontend=False)``).

Segmentation (``split=True``), one LLM call per segment:

* ``max_text_length=None`` with ``enable_smart_split=True``: upstream ``split_paragraph``
  reproduced exactly (zh: 80/60/20 characters, en: 80/60/20 whisper tokens). The parity fixtures
  check this mode.
* ``max_text_length=N`` with ``enable_smart_split=True`` ("smart split"): sentences are packed
  greedily into segments of at most N characters. The unit is the character for every language:
  it is what the user sees, and N English characters are about N/5 words (~N/15 s of speech), so
  English gets shorter segments and a lower time to first audio than upstream's 80 tokens. A
  final remainder shorter than N/4 joins the previous segment when it fits. A sentence longer
  than N is cut after its last clause punctuation that fits (a natural pause); else at a space,
  else (text without spaces, e.g. Chinese) between two characters, near the point that gives
  pieces of equal length. A cut never falls inside a word, a run of digits / Latin letters, a
  spelled-out number ("three point five million", "一千二百") or before punctuation. A single
  unbreakable run longer than N (a 300-letter "word") stays whole: the only segment above N.
* ``enable_smart_split=False``: one segment per sentence (after ``。？！；.?!;`` or a newline), no
  packing: predictable boundaries, more and shorter LLM calls. With ``max_text_length`` set,
  over-long sentences are still cut as above.

In both of our modes segments are stripped, whitespace runs inside English become one space and
punctuation-only segments are dropped; the text is normalised in blocks of about
``BLOCK_CHARS`` characters cut at sentence ends (TN cost grows faster than linearly), so
``normalize(text, max_text_length=N)`` equals ``list(iter_segments(text, max_text_length=N))``.

Text containing both ``<|`` and ``|>`` (a language / instruct tag) is never normalised or split,
as upstream does; it is returned as one segment whatever the limit.

Deviations from upstream, all on inputs where upstream crashes or misreads: wetext gets the
language explicitly (upstream's "auto" sends a digits-only English text such as "2024" through the
Chinese grammar); where wetext fails (its English grammar asserts on double spaces and on some
symbol runs) it is retried with collapsed whitespace, then sentence by sentence and word by word,
keeping what still fails as written; numbers beyond inflect's range (10**36) are read digit by
digit; empty or punctuation-only text raises :class:`InvalidRequestError` (upstream returns
``['']`` or sends it to the LLM); text over ``EXACT_MAX_CHARS`` is normalised in blocks in the
reference mode too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import lru_cache
from itertools import chain
from typing import Protocol

from cosyserve.errors import InvalidRequestError
from cosyserve.text.normalize import (
    NORMALIZERS,
    detect_language,
    has_tags,
    is_only_punctuation,
    run_wetext,
    spell_out_number,
    wetext_normalizer,
    zh_rules,
)
from cosyserve.text.segment import (
    DEFAULT_MAX_TEXT_LENGTH,
    EXACT_MAX_CHARS,
    check_limit,
    pack_reference,
    pack_smart,
    raw_blocks,
    reference_sentences,
    require_speech,
    sentences,
    speakable,
    with_last,
    with_terminal_punct,
)

logger = logging.getLogger(__name__)


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise InvalidRequestError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InvalidRequestError("text is empty")


class TextFrontend:
    """Normalises and segments text for synthesis and tokenises segments for the LLM.

    ``tokenizer``: anything with ``encode(text) -> list[int]`` that turns written special tokens
    into their ids; default: the bundled whisper multilingual tokenizer (loaded on first use).
    ``normalizer``: "wetext" | "none" | "off" (see the module doc).
    """

    def __init__(self, tokenizer: Tokenizer | None = None, normalizer: str = "wetext"):
        if normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
        self._tokenizer = tokenizer
        self.normalizer = normalizer

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            from cosyserve.text.tokenizers import get_tokenizer

            self._tokenizer = get_tokenizer()
        return self._tokenizer

    def preload(self) -> None:
        """Build the tokenizer and TN engines now (server start) rather than on the first request."""
        _ = self.tokenizer
        if self.normalizer == "wetext":
            wetext_normalizer("zh")
            wetext_normalizer("en")

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detect_language(self, text: str) -> str:
        return detect_language(text)

    # -- normalisation of one block of raw text ------------------------------------------------

    def _normalize_block(self, text: str, lang: str, last: bool = True) -> str:
        """TN and CosyVoice's rules on one block of raw text (``last``: it ends the text)."""
        text = text.strip()
        if self.normalizer == "off":
            return text
        if lang == "zh":
            if self.normalizer == "wetext":
                text = run_wetext("zh", text)
            return zh_rules(text, last)
        if self.normalizer == "wetext":
            text = run_wetext("en", text)
        return spell_out_number(text)

    def _token_length(self, text: str) -> int:
        return len(self.tokenize(text))

    def _segments(self, blocks: Iterable[str], lang: str, limit: int | None, smart: bool) -> Iterator[str]:
        normalized = (t for t in (self._normalize_block(b, lang, last) for b, last in with_last(blocks)) if t)
        if limit is None and smart:
            length = len if lang == "zh" else self._token_length
            segments = pack_reference(reference_sentences(normalized, lang), length)
        else:
            sents = chain.from_iterable(sentences(t, lang) for t in with_terminal_punct(normalized, lang))
            segments = pack_smart(sents, limit, lang, pack=smart)
        return (s for s in segments if not is_only_punctuation(s))

    # -- public entry points -------------------------------------------------------------------

    def normalize(
        self,
        text: str,
        split: bool = True,
        max_text_length: int | None = None,
        enable_smart_split: bool = True,
    ) -> list[str]:
        """Normalised segments of ``text``. With the defaults this equals upstream
        ``text_normalize(text, split=True)``; ``max_text_length`` / ``enable_smart_split`` select
        our segmentation (module doc). ``split=False`` (prompt / instruct text) returns the whole
        normalised text as a one-element list and ignores both.

        Raises :class:`InvalidRequestError` for empty or punctuation-only text.
        """
        _check_text(text)
        limit = check_limit(max_text_length)
        if has_tags(text):
            return [text]
        if self.normalizer == "off" and (not split or (limit is None and enable_smart_split)):
            # upstream text_frontend=False: the text as given, unsplit
            require_speech([text])
            return [text]
        lang = detect_language(text)
        if not split:
            normalized = [self._normalize_block(text, lang)]
            require_speech(normalized)
            return normalized
        if limit is None and enable_smart_split and len(text) <= EXACT_MAX_CHARS:
            blocks: Iterable[str] = [text]  # TN sees the whole text, as upstream
        else:
            blocks = raw_blocks(text)
        segments = list(self._segments(blocks, lang, limit, enable_smart_split))
        require_speech(segments)
        return segments

    def iter_segments(
        self,
        text: str,
        max_text_length: int | None = None,
        enable_smart_split: bool = True,
    ) -> Iterator[str]:
        """Like ``normalize(text)`` but lazy: the text is normalised block by block (about
        ``BLOCK_CHARS`` characters, cut at sentence ends) and segments are yielded as they are
        ready, so memory stays bounded for very long text. Errors are raised by this call (the
        first speakable segment is computed eagerly), not during the iteration."""
        _check_text(text)
        limit = check_limit(max_text_length)
        if has_tags(text):
            return iter([text])
        if self.normalizer == "off" and limit is None and enable_smart_split:
            return iter(self.normalize(text))
        lang = detect_language(text)
        segments = self._segments(raw_blocks(text), lang, limit, enable_smart_split)
        head: list[str] = []
        for segment in segments:
            head.append(segment)
            if speakable(segment):
                return chain(head, segments)
        raise InvalidRequestError("text has nothing to speak (it is empty or only punctuation and symbols)")


@lru_cache(maxsize=1)
def default_frontend() -> TextFrontend:
    """The shared frontend (wetext, whisper tokenizer); engines load lazily on first use."""
    return TextFrontend()


def split_for_synthesis(
    text: str,
    max_text_length: int | None = None,
    enable_smart_split: bool = True,
) -> list[str]:
    """Segments of ``text`` ready for synthesis with the product defaults: smart split at
    ``max_text_length`` characters (None -> ``DEFAULT_MAX_TEXT_LENGTH`` = 100). Works for plain
    English (wetext's English grammar only). Raises :class:`InvalidRequestError` for empty or
    punctuation-only text."""
    limit = DEFAULT_MAX_TEXT_LENGTH if max_text_length is None else max_text_length
    return list(
        default_frontend().iter_segments(text, max_text_length=limit, enable_smart_split=enable_smart_split)
    )

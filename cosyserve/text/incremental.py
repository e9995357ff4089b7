"""Segmentation of text that arrives piece by piece (an LLM writing its answer token by token).

:class:`IncrementalSegmenter` buffers the pieces and hands out a segment as soon as it is
complete, so synthesis of the first sentence starts while the rest is still being written:

* ``segment_by="sentence"`` (default): a segment ends at a sentence end (``。？！；.?!;`` with its
  closing quotes, or a newline), exactly where :func:`cosyserve.text.frontend.sentences` cuts.
  A sentence end is *confirmed* only once the character after it has arrived: "3." may become
  "3.5", "Hi!" may become 'Hi!"'. A sentence that grows past ``max_chars`` without ending is cut
  at its last clause (or, failing that, at a space), as the smart splitter cuts long sentences.
* ``segment_by="clause"`` (lower latency, choppier prosody): a segment also ends at clause
  punctuation (``，,、：:—…``) once it holds at least ``min_clause_chars`` characters
  (``min_clause_chars_zh`` in Chinese), so very short clauses ("Well,") wait for the next one.
  ASCII punctuation counts only before whitespace: "1,000" and "7:30" are not pauses.

Sentences that are already complete when they arrive together (a client that sends a paragraph
at once) are packed with the smart splitter into segments of at most ``max_chars`` characters,
as the HTTP API segments the same text. ``flush()`` hands out whatever is buffered.

Text with ``<|...|>`` markup (language / instruct tags) is never split, as in the frontend: it is
held until ``flush()``.
"""

from __future__ import annotations

import logging
from typing import Literal

from cosyserve.text.normalize import detect_language, has_tags, is_only_punctuation
from cosyserve.text.segment import (
    CLAUSE_PUNCT,
    CLOSERS,
    DEFAULT_MAX_TEXT_LENGTH,
    MIN_MAX_TEXT_LENGTH,
    cut_long,
    pack_smart,
    sentences,
)

logger = logging.getLogger(__name__)

SegmentBy = Literal["sentence", "clause"]
SEGMENT_BY: tuple[str, ...] = ("sentence", "clause")
# Shorter clauses wait for the next one: a lone "Well," or "所以，" sounds cut off on its own.
# A Chinese character carries about as much speech as two or three Latin letters.
MIN_CLAUSE_CHARS = 16
MIN_CLAUSE_CHARS_ZH = 6


def speakable(segment: str) -> bool:
    """True when ``segment`` has something to say (not only punctuation, symbols, whitespace)."""
    return bool(segment.strip()) and not is_only_punctuation("".join(segment.split()))


class IncrementalSegmenter:
    """Turns a stream of text pieces into synthesis segments (see the module doc).

    ``push(piece)`` returns the segments completed by that piece (often none), ``flush()`` the
    rest. Segments are stripped; English whitespace runs become one space. A segment with nothing
    to speak (only punctuation) is dropped.
    """

    def __init__(
        self,
        segment_by: SegmentBy = "sentence",
        max_chars: int = DEFAULT_MAX_TEXT_LENGTH,
        min_clause_chars: int = MIN_CLAUSE_CHARS,
        min_clause_chars_zh: int = MIN_CLAUSE_CHARS_ZH,
    ):
        if segment_by not in SEGMENT_BY:
            raise ValueError(f"segment_by must be one of {', '.join(SEGMENT_BY)}, got {segment_by!r}")
        if max_chars < MIN_MAX_TEXT_LENGTH:
            raise ValueError(f"max_chars must be at least {MIN_MAX_TEXT_LENGTH}, got {max_chars}")
        self.segment_by = segment_by
        self.max_chars = max_chars
        self.min_clause_chars = {
            "en": min(min_clause_chars, max_chars),
            "zh": min(min_clause_chars_zh, max_chars),
        }
        self._buffer = ""
        self._lang: str | None = None  # "zh" once a CJK character was seen, for the whole stream

    @property
    def pending(self) -> str:
        """Text received but not yet handed out as a segment."""
        return self._buffer

    def _language(self) -> str:
        if self._lang != "zh":
            self._lang = detect_language(self._buffer)
        return self._lang

    def push(self, piece: str) -> list[str]:
        """Add ``piece``; return the segments it completed, in order."""
        if not piece:
            return []
        self._buffer += piece
        if has_tags(self._buffer):
            return []
        lang = self._language()
        parts = sentences(self._buffer, lang)
        if not parts:
            return []
        # The last part may still grow (its end is not confirmed yet); the others are final.
        complete, rest = parts[:-1], parts[-1]
        if rest[-1].isspace() and sentences(rest + "x", lang)[0] == rest:
            # Whitespace after a sentence end confirms it: nothing can join that sentence now.
            complete, rest = parts, ""
        heads, rest = self._split_open_sentence(rest, lang)
        self._buffer = rest
        return self._pack(complete, lang) + heads

    def flush(self) -> list[str]:
        """Everything buffered, as segments; the segmenter is empty afterwards."""
        text, self._buffer = self._buffer, ""
        if not text.strip():
            return []
        if has_tags(text):
            return [text.strip()]
        lang = self._language()
        return self._pack(sentences(text, lang), lang)

    # -- internals ---------------------------------------------------------------------------

    def _pack(self, parts: list[str], lang: str) -> list[str]:
        if not parts:
            return []
        return [s for s in pack_smart(parts, self.max_chars, lang) if speakable(s)]

    def _split_open_sentence(self, text: str, lang: str) -> tuple[list[str], str]:
        """Segments that can leave the unfinished last sentence now, and what stays buffered."""
        heads: list[str] = []
        if self.segment_by == "clause":
            cut = self._last_clause_end(text, lang)
            if cut > 0:
                heads.append(text[:cut])
                text = text[cut:]
        if len(text.strip()) > self.max_chars:
            # Too long to wait for its end: cut like the smart splitter; the last piece stays
            # open (its last word may be unfinished).
            pieces = cut_long(text, self.max_chars, lang)
            if len(pieces) > 1:
                kept = pieces[-1]
                heads.extend(pieces[:-1])
                text = text[text.rindex(kept) :]
        return [h for h in (self._tidy(h, lang) for h in heads) if speakable(h)], text

    def _tidy(self, segment: str, lang: str) -> str:
        segment = segment.strip()
        return segment if lang == "zh" else " ".join(segment.split())

    def _last_clause_end(self, text: str, lang: str) -> int:
        """End (exclusive, closing marks included) of the last confirmed clause boundary with at
        least ``min_clause_chars`` before it; 0 when there is none."""
        n = len(text)
        for i in range(n - 1, -1, -1):
            if text[i] not in CLAUSE_PUNCT:
                continue
            j = i + 1
            while j < n and text[j] in CLOSERS:
                j += 1
            if j >= n:
                continue  # nothing after it yet: a closing mark or more punctuation may follow
            nxt = text[j]
            if text[i].isascii() and not nxt.isspace():
                continue  # "1,000", "3.5", "7:30": not a pause
            if lang != "zh" and nxt in CLAUSE_PUNCT:
                continue
            if len(text[:j].strip()) >= self.min_clause_chars[lang]:
                return j
            return 0  # the last boundary is too early; earlier ones are earlier still
        return 0

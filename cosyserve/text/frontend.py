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
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from itertools import chain
from types import ModuleType
from typing import Any, Protocol

import regex

from cosyserve.errors import InvalidRequestError

logger = logging.getLogger(__name__)

NORMALIZERS = ("wetext", "none", "off")
DEFAULT_MAX_TEXT_LENGTH = 100  # characters; the product default of a request's max_text_length
MIN_MAX_TEXT_LENGTH = 10  # below this, words would not fit a segment

# Upstream split_paragraph constants.
REF_MAX, REF_MIN, REF_MERGE = 80, 60, 20
ZH_SPLIT_PUNCT = frozenset("。？！；：、.?!;")
EN_SPLIT_PUNCT = frozenset(".?!;:")
REF_CLOSING_QUOTES = frozenset('"”')

# Smart split: sentence ends, clause punctuation (cut points inside a long sentence) and closing
# marks that stay attached to the punctuation before them.
HARD_PUNCT = frozenset("。？！；.?!;")
CLAUSE_PUNCT = frozenset("，,、：:；;。？！.?!…—")
CLOSERS = frozenset("\"'”’）)」』》】]")

# TN cost grows faster than linearly with the input length (wetext en: 0.02 s for 200
# characters, 0.42 s for 1,600; zh: 0.08 s, 1.1 s), so text is normalised in blocks of at most
# BLOCK_CHARS raw characters cut at sentence ends. Only the reference packing of text up to
# EXACT_MAX_CHARS normalises the whole text at once, exactly as upstream.
BLOCK_CHARS = 200
EXACT_MAX_CHARS = 2000
_BLOCK_END = re.compile(r"""[。！？!?；;\n]["'”’）)」』》】\]]*|\.["'”’）)」』》】\]]*(?=\s)""")
_BLOCK_CLAUSE = re.compile(r"""(?:[，、：]|[,:](?=\s))["'”’）)」』》】\]]*""")

_CHINESE = re.compile(r"[\u4e00-\u9fff]")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_WHITESPACE = re.compile(r"\s+")
_SENTENCE_SPLIT = re.compile(r"((?<=[。！？；])\s*|(?<=[.!?;])\s+)")
_WORD_SPLIT = re.compile(r"(\s+)")
_ONLY_PUNCT = regex.compile(r"^[\p{P}\p{S}]*$")
_PUNCT_CHAR = regex.compile(r"[\p{P}\p{S}]")
# Spelled-out numbers (English after spell_out_number / wetext, Chinese after wetext): a cut
# between two of these words / characters would split one number across two segments.
_NUMBER_WORDS = frozenset((
    "zero", "oh", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
    "hundred", "thousand", "million", "billion", "trillion", "quadrillion", "quintillion",
))  # fmt: skip
_NUMBER_LINKS = frozenset({"and", "point"})
_ZH_NUMERALS = frozenset("零〇一二两三四五六七八九十百千万亿点")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------- shared engines

_lock = threading.Lock()  # guards lazy construction and the non-thread-safe engines below
_wetext: dict[str, Any] = {}
_wetext_failed = False
_inflect: Any = None


def _wetext_normalizer(lang: str) -> Any | None:
    """The shared wetext normaliser for ``lang`` ("zh" / "en"); None if wetext cannot load."""
    global _wetext_failed
    if lang in _wetext:
        return _wetext[lang]
    with _lock:
        if lang not in _wetext and not _wetext_failed:
            try:
                # Importing wetext 0.1.8 reads every bundled FST (~0.4 s, ~50 MB): only on first use.
                import wetext
            except Exception:  # any import failure means "no TN engine", as upstream
                _wetext_failed = True
                logger.warning("wetext is not available; text is normalised with CosyVoice's rules only")
            else:
                kwargs = {"remove_erhua": False} if lang == "zh" else {}
                _wetext[lang] = wetext.Normalizer(lang=lang, operator="tn", **kwargs)
        return _wetext.get(lang)


def _try_wetext(normalizer: Any, text: str) -> str | None:
    try:
        with _lock:
            return normalizer.normalize(text)
    except Exception:  # wetext asserts on some inputs (two spaces, some symbol runs in English)
        return None


def _wetext_piecewise(normalizer: Any, text: str, by_word: bool = False) -> str:
    """Normalise sentence by sentence, then word by word; what still fails is kept as written."""
    out = []
    for part in (_WORD_SPLIT if by_word else _SENTENCE_SPLIT).split(text):
        if not part or part.isspace():
            out.append(part)
            continue
        result = _try_wetext(normalizer, part)
        if result is None:
            result = part if by_word else _wetext_piecewise(normalizer, part, by_word=True)
        out.append(result)
    return "".join(out)


def _run_wetext(lang: str, text: str) -> str:
    normalizer = _wetext_normalizer(lang)
    if normalizer is None or not text:
        return text
    result = _try_wetext(normalizer, text)
    if result is not None:
        return result
    collapsed = _WHITESPACE.sub(" ", text)
    result = _try_wetext(normalizer, collapsed) if collapsed != text else None
    if result is not None:
        return result
    # Upstream would crash here; normalise what wetext can and keep the rest.
    logger.info("wetext failed on %d characters of %s text; normalising piece by piece", len(text), lang)
    return _wetext_piecewise(normalizer, collapsed)


def _import_inflect() -> ModuleType:
    """Import inflect without typeguard instrumentation.

    inflect >= 7.2 decorates its engine with typeguard's ``@typechecked``, which re-parses the
    module source once per method at import: ~1 s on a fast machine, ~10 s on two busy cores
    (jaraco/inflect#212). Those checks only catch programming errors, so the import sees a no-op
    decorator; if that ever fails (inflect changed), it falls back to the plain import.
    """
    if "inflect" in sys.modules:
        return sys.modules["inflect"]
    stub = ModuleType("typeguard")
    stub.typechecked = lambda target=None, **_: target if target is not None else (lambda t: t)  # type: ignore[attr-defined]
    saved = sys.modules.get("typeguard")
    sys.modules["typeguard"] = stub
    try:
        import inflect
    except ImportError:
        sys.modules.pop("inflect", None)
        inflect = None
    finally:
        if saved is None:
            sys.modules.pop("typeguard", None)
        else:
            sys.modules["typeguard"] = saved
    if inflect is None:
        import inflect
    return inflect


def _number_to_words(digits: str) -> str:
    global _inflect
    with _lock:
        if _inflect is None:
            _inflect = _import_inflect().engine()
        try:
            return _inflect.number_to_words(digits)
        except Exception:  # inflect stops at 10**36 (NumOutOfRangeError)
            return " ".join(_DIGIT_WORDS[int(d)] for d in digits)


# ----------------------------------------------------------------------------- upstream rules


def contains_chinese(text: str) -> bool:
    return _CHINESE.search(text) is not None


def is_only_punctuation(text: str) -> bool:
    """True for text made only of punctuation / symbols (or empty), as upstream filters."""
    return _ONLY_PUNCT.fullmatch(text) is not None


def has_tags(text: str) -> bool:
    """Text with ``<|...|>`` markup skips the whole frontend (upstream rule)."""
    return "<|" in text and "|>" in text


def spell_out_number(text: str) -> str:
    """Every maximal run of ASCII digits -> English words ("2021" -> "two thousand and twenty-one")."""
    return _ASCII_DIGITS.sub(lambda m: _number_to_words(m.group(0)), text)


def replace_blank(text: str) -> str:
    """Drop spaces unless both neighbours are non-space ASCII (keeps "machine learning")."""
    out = []
    last = len(text) - 1
    for i, c in enumerate(text):
        if c == " ":
            prev = text[i - 1] if i > 0 else ""
            nxt = text[i + 1] if i < last else ""
            if not (prev.isascii() and prev not in " " and nxt.isascii() and nxt not in " "):
                continue
        out.append(c)
    return "".join(out)


def _zh_rules(text: str, last: bool = True) -> str:
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = text.replace(".", "。").replace(" - ", "，")
    text = text.replace("（", "").replace("）", "").replace("【", "").replace("】", "").replace("`", "")
    text = text.replace("——", " ")
    # A trailing comma ends the text; a block cut after a comma continues in the next block.
    return _TRAILING_COMMAS.sub("。", text) if last else text


def split_reference(text: str, lang: str, final: bool = True) -> tuple[list[str], str]:
    """Upstream ``split_paragraph`` sentence split, quirks included: (sentences, leftover).

    With ``final`` a terminal ``。`` / ``.`` is appended when missing, so nothing is left over;
    otherwise the text after the last split mark is returned to prefix the next block. A closing
    quote right after a split mark stays attached; a split mark right after another one (``！！``)
    is dropped, as upstream does.
    """
    punct = ZH_SPLIT_PUNCT if lang == "zh" else EN_SPLIT_PUNCT
    if not text:
        return [], ""
    if final and text[-1] not in punct:
        text += "。" if lang == "zh" else "."
    utts: list[str] = []
    st = 0
    for i, c in enumerate(text):
        if c not in punct:
            continue
        if i > st:
            utts.append(text[st:i] + c)
        if i + 1 < len(text) and text[i + 1] in REF_CLOSING_QUOTES:
            if utts:  # upstream pops the previous sentence (and crashes when there is none)
                utts[-1] += text[i + 1]
            st = i + 2
        else:
            st = i + 1
    return utts, text[st:]


def pack_reference(
    utts: Iterable[str],
    length: Callable[[str], int],
    max_n: int = REF_MAX,
    min_n: int = REF_MIN,
    merge_n: int = REF_MERGE,
) -> Iterator[str]:
    """Upstream's greedy packing, lazily: a segment closes when the next sentence would exceed
    ``max_n`` and it already exceeds ``min_n``; a last remainder shorter than ``merge_n`` joins
    the previous segment (so each segment is yielded one step late)."""
    pending: str | None = None
    cur = ""
    for utt in utts:
        if length(cur + utt) > max_n and length(cur) > min_n:
            if pending is not None:
                yield pending
            pending, cur = cur, ""
        cur += utt
    if cur:
        if pending is not None and length(cur) < merge_n:
            pending += cur
        else:
            if pending is not None:
                yield pending
            pending = cur
    if pending is not None:
        yield pending


# ----------------------------------------------------------------------------- smart split


def _is_word_char(c: str) -> bool:
    """Digits and Latin letters: a segment boundary never falls inside a run of these."""
    return (
        c.isdigit() or ("a" <= c <= "z") or ("A" <= c <= "Z") or ("\u00c0" <= c <= "\u024f" and c.isalpha())
    )


def sentences(text: str, lang: str) -> list[str]:
    """Split at sentence ends, losing no character: a run of ``。？！；.?!;`` plus closing marks,
    or a newline. In English a ``.`` only ends a sentence before whitespace ("3.5", "e.g.x")."""
    out: list[str] = []
    st, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in HARD_PUNCT or c == "\n":
            j = i + 1
            while j < n and text[j] in HARD_PUNCT:
                j += 1
            while j < n and text[j] in CLOSERS:
                j += 1
            if c != "." or lang == "zh" or j == n or text[j].isspace():
                while j < n and text[j].isspace():
                    j += 1
                out.append(text[st:j])
                st = j
            i = j
        else:
            i += 1
    if st < n:
        out.append(text[st:])
    return out


def _word_at(s: str, i: int, left: bool) -> str:
    """The word left of / right of the space at ``i``, lower-cased, punctuation and hyphen parts
    stripped ("twenty-one," -> "one" on the left, "twenty" on the right)."""
    word = s[:i].rsplit(" ", 1)[-1] if left else s[i + 1 :].split(" ", 1)[0]
    word = word.strip(".,;:!?\"'()").lower()
    return word.rsplit("-", 1)[-1] if left else word.split("-", 1)[0]


def _inside_number(s: str, i: int) -> bool:
    """True when the space at ``i`` sits inside a spelled-out number ("three | point five")."""
    a, b = _word_at(s, i, left=True), _word_at(s, i, left=False)
    return (
        (a in _NUMBER_WORDS or a in _NUMBER_LINKS)
        and b in _NUMBER_WORDS
        or (a in _NUMBER_WORDS and b in _NUMBER_LINKS)
    )


def _last_space(s: str, lo: int, hi: int, lang: str, clean: bool) -> int:
    """Index of the last space in (lo, hi], -1 if none; with ``clean`` only a space that is not
    inside an English spelled-out number."""
    i = s.rfind(" ", lo + 1, hi + 1)
    while i > lo:
        if not clean or lang == "zh" or not _inside_number(s, i):
            return i
        i = s.rfind(" ", lo + 1, i)
    return -1


def _is_unbreakable(a: str, b: str) -> bool:
    """No cut between ``a`` and ``b``: inside a digit / Latin run or a Chinese numeral, or right
    before punctuation (which belongs to the text before it)."""
    if _is_word_char(a) and _is_word_char(b):
        return True
    if a in _ZH_NUMERALS and b in _ZH_NUMERALS:
        return True
    return bool(_PUNCT_CHAR.match(b)) or a.isspace()


def _cut_point(s: str, limit: int, lang: str) -> tuple[int, int]:
    """Where to cut ``s`` (longer than ``limit``): (end of the first piece, start of the rest).

    Preference: the last clause punctuation that fits (a natural pause); else a space, else a
    character boundary, near the position that gives pieces of equal length (so no tiny tail).
    """
    n = len(s)
    lo = limit // 3  # pieces shorter than a third of the limit only as a last resort
    n_pieces = -(-n // limit)
    soft = min(limit, -(-n // n_pieces) + limit // 10)  # balanced cut position, with some slack
    # 1. After the last clause punctuation (with its closing marks) that fits.
    early = -1
    for i in range(min(limit, n) - 1, -1, -1):
        if s[i] in CLAUSE_PUNCT:
            j = i + 1
            while j < n and s[j] in CLOSERS:
                j += 1
            if j > limit:
                continue
            # English "." / ":" inside a token ("3.5", "7:30") is not a clause end.
            if lang != "zh" and s[i].isascii() and j < n and not s[j].isspace():
                continue
            # inflect writes commas inside numbers ("one million, two hundred").
            if lang != "zh" and s[i] == "," and j < n and _inside_number(s, j):
                continue
            if j > lo:
                return j, j
            early = j
            break
    # 2. At a space, up to the balanced position if one is there, else up to the limit.
    for clean, hi in ((True, soft), (True, limit), (False, soft), (False, limit)):
        space = _last_space(s, lo, hi, lang, clean)
        if space > lo:
            return space, space + 1
    # 3. Between two characters (text without spaces), same preference.
    for hi in (soft, limit):
        p = hi
        while p > lo and _is_unbreakable(s[p - 1], s[p]):
            p -= 1
        if p > lo:
            return p, p
    # 4. Short pieces after all: earlier punctuation or space, else any boundary of a run.
    if early > 0:
        return early, early
    space = s.rfind(" ", 1, limit + 1)
    if space > 0:
        return space, space + 1
    p = limit
    while p > 0 and _is_word_char(s[p - 1]) and _is_word_char(s[p]):
        p -= 1
    if p > 0:
        return p, p
    # One unbreakable run longer than the limit: keep it whole.
    p = limit
    while p < n and _is_word_char(s[p - 1]) and _is_word_char(s[p]):
        p += 1
    return p, p


def cut_long(s: str, limit: int, lang: str) -> list[str]:
    """Cut one over-long sentence into pieces of at most ``limit`` characters (see module doc)."""
    pieces: list[str] = []
    s = s.strip()
    while len(s) > limit:
        end, start = _cut_point(s, limit, lang)
        piece = s[:end].strip()
        if piece:
            pieces.append(piece)
        s = s[start:].strip()
    if s:
        pieces.append(s)
    return pieces


def _join(a: str, b: str, lang: str) -> str:
    """Join two pieces: English words need a space, Chinese characters none (between two ASCII
    characters a space stays in Chinese too, as replace_blank keeps it)."""
    if not a or not b:
        return a or b
    ascii_a, ascii_b = a[-1].isascii(), b[0].isascii()
    space = (ascii_a or ascii_b) if lang != "zh" else (ascii_a and ascii_b)
    return f"{a} {b}" if space else a + b


def pack_smart(
    sentence_iter: Iterable[str], limit: int | None, lang: str, pack: bool = True
) -> Iterator[str]:
    """Our segmentation (see the module doc): stripped segments of at most ``limit`` characters."""
    merge_n = limit // 4 if limit else 0
    pending: str | None = None  # held back one step for the final merge
    cur = ""

    def pieces_of(sentence: str) -> list[str]:
        s = sentence.strip()
        if lang != "zh":
            s = _WHITESPACE.sub(" ", s)
        if limit is not None and len(s) > limit:
            return cut_long(s, limit, lang)
        return [s] if s else []

    for sentence in sentence_iter:
        for piece in pieces_of(sentence):
            if not pack:
                if pending is not None:
                    yield pending
                pending = piece
                continue
            joined = _join(cur, piece, lang)
            if cur and limit is not None and len(joined) > limit:
                if pending is not None:
                    yield pending
                pending, cur = cur, piece
            else:
                cur = joined
    if cur:
        if pending is not None and len(cur) < merge_n and len(_join(pending, cur, lang)) <= limit:
            pending = _join(pending, cur, lang)
        else:
            if pending is not None:
                yield pending
            pending = cur
    if pending is not None:
        yield pending


def raw_blocks(text: str, size: int = BLOCK_CHARS) -> Iterator[str]:
    """Cut raw text into blocks of at most ``size`` characters at sentence ends (else after a
    comma, else at a space, else outside a digit / Latin run), so each block can be normalised on
    its own."""
    pos, n = 0, len(text)
    while n - pos > size:
        window = text[pos : pos + size]
        cut = 0
        for m in _BLOCK_END.finditer(window):
            cut = m.end()
        if cut == 0:
            for m in _BLOCK_CLAUSE.finditer(window):
                cut = m.end()
        if cut == 0:
            cut = max(window.rfind(" "), window.rfind("\n"), window.rfind("\t")) + 1
        if cut == 0:
            cut = size
            while cut > 0 and _is_word_char(text[pos + cut - 1]) and _is_word_char(text[pos + cut]):
                cut -= 1
            cut = cut or size
        yield text[pos : pos + cut]
        pos += cut
    if pos < n:
        yield text[pos:]


# ----------------------------------------------------------------------------- public API


def detect_language(text: str) -> str:
    """Return "zh" if the text has a CJK unified ideograph (so kanji Japanese too), else "en"."""
    return "zh" if contains_chinese(text) else "en"


def _check_limit(max_text_length: int | None) -> int | None:
    if max_text_length is None:
        return None
    if isinstance(max_text_length, bool) or not isinstance(max_text_length, int):
        raise InvalidRequestError(f"max_text_length must be an integer, got {max_text_length!r}")
    if max_text_length < MIN_MAX_TEXT_LENGTH:
        raise InvalidRequestError(
            f"max_text_length must be at least {MIN_MAX_TEXT_LENGTH} characters, got {max_text_length}"
        )
    return max_text_length


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
            _wetext_normalizer("zh")
            _wetext_normalizer("en")

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
                text = _run_wetext("zh", text)
            return _zh_rules(text, last)
        if self.normalizer == "wetext":
            text = _run_wetext("en", text)
        return spell_out_number(text)

    def _token_length(self, text: str) -> int:
        return len(self.tokenize(text))

    def _segments(self, blocks: Iterable[str], lang: str, limit: int | None, smart: bool) -> Iterator[str]:
        normalized = (
            t for t in (self._normalize_block(b, lang, last) for b, last in _with_last(blocks)) if t
        )
        if limit is None and smart:
            length = len if lang == "zh" else self._token_length
            segments = pack_reference(_reference_sentences(normalized, lang), length)
        else:
            sents = chain.from_iterable(sentences(t, lang) for t in _with_terminal_punct(normalized, lang))
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
        limit = _check_limit(max_text_length)
        if has_tags(text):
            return [text]
        if self.normalizer == "off" and (not split or (limit is None and enable_smart_split)):
            # upstream text_frontend=False: the text as given, unsplit
            _require_speech([text])
            return [text]
        lang = detect_language(text)
        if not split:
            normalized = [self._normalize_block(text, lang)]
            _require_speech(normalized)
            return normalized
        if limit is None and enable_smart_split and len(text) <= EXACT_MAX_CHARS:
            blocks: Iterable[str] = [text]  # TN sees the whole text, as upstream
        else:
            blocks = raw_blocks(text)
        segments = list(self._segments(blocks, lang, limit, enable_smart_split))
        _require_speech(segments)
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
        limit = _check_limit(max_text_length)
        if has_tags(text):
            return iter([text])
        if self.normalizer == "off" and limit is None and enable_smart_split:
            return iter(self.normalize(text))
        lang = detect_language(text)
        segments = self._segments(raw_blocks(text), lang, limit, enable_smart_split)
        head: list[str] = []
        for segment in segments:
            head.append(segment)
            if _speakable(segment):
                return chain(head, segments)
        raise InvalidRequestError("text has nothing to speak (it is empty or only punctuation and symbols)")


_SPEAKABLE = regex.compile(r"[\p{L}\p{N}]")


def _speakable(segment: str) -> bool:
    # A letter or a digit of any script: punctuation, symbols, emoji, combining marks without a
    # base and invisible characters (zero-width spaces) alone give the model nothing to say.
    return _SPEAKABLE.search(segment) is not None


def _require_speech(segments: list[str]) -> None:
    if not any(_speakable(s) for s in segments):
        raise InvalidRequestError("text has nothing to speak (it is empty or only punctuation and symbols)")


def _with_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(item, is_last) pairs, looking one item ahead."""
    prev: str | None = None
    for item in items:
        if prev is not None:
            yield prev, False
        prev = item
    if prev is not None:
        yield prev, True


def _with_terminal_punct(blocks: Iterable[str], lang: str) -> Iterator[str]:
    """Append ``。`` / ``.`` to the last block when it does not end a sentence, as upstream
    split_paragraph does, so the LLM sees a finished sentence."""
    end = ZH_SPLIT_PUNCT if lang == "zh" else EN_SPLIT_PUNCT
    for block, last in _with_last(blocks):
        closed = block[-1] in CLOSERS and len(block) > 1 and block[-2] in end
        if last and block[-1] not in end and not closed:
            block += "。" if lang == "zh" else "."
        yield block


def _reference_sentences(blocks: Iterable[str], lang: str) -> Iterator[str]:
    """Upstream sentences over consecutive normalised blocks; a sentence cut by a block boundary
    is carried into the next block."""
    carry = ""
    prev = ""
    for block, last in _with_last(blocks):
        if carry:
            text = _join(carry, block, lang)
        elif prev and (lang != "zh" or (prev[-1].isascii() and block[0].isascii())):
            text = " " + block  # the whitespace the block cut removed, as upstream keeps it
        else:
            text = block
        utts, carry = split_reference(text, lang, final=last)
        prev = block
        yield from utts


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

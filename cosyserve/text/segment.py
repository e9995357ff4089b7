"""Segmentation of normalised text into LLM calls: upstream's ``split_paragraph`` reproduced
exactly (the reference mode), and our smart split at a character limit (see frontend.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator

import regex

from cosyserve.errors import InvalidRequestError
from cosyserve.text.normalize import WHITESPACE

logger = logging.getLogger(__name__)
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

# TN cost grows faster than linearly with the input length (figures: README, "Text"), so text is
# normalised in blocks of at most BLOCK_CHARS raw characters cut at sentence ends. Only the reference packing of text up to
# EXACT_MAX_CHARS normalises the whole text at once, exactly as upstream.
BLOCK_CHARS = 200
EXACT_MAX_CHARS = 2000
_BLOCK_END = re.compile(r"""[。！？!?；;\n]["'”’）)」』》】\]]*|\.["'”’）)」』》】\]]*(?=\s)""")
_BLOCK_CLAUSE = re.compile(r"""(?:[，、：]|[,:](?=\s))["'”’）)」』》】\]]*""")
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
            s = WHITESPACE.sub(" ", s)
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


def check_limit(max_text_length: int | None) -> int | None:
    if max_text_length is None:
        return None
    if isinstance(max_text_length, bool) or not isinstance(max_text_length, int):
        raise InvalidRequestError(f"max_text_length must be an integer, got {max_text_length!r}")
    if max_text_length < MIN_MAX_TEXT_LENGTH:
        raise InvalidRequestError(
            f"max_text_length must be at least {MIN_MAX_TEXT_LENGTH} characters, got {max_text_length}"
        )
    return max_text_length


_SPEAKABLE = regex.compile(r"[\p{L}\p{N}]")


def speakable(segment: str) -> bool:
    # A letter or a digit of any script: punctuation, symbols, emoji, combining marks without a
    # base and invisible characters (zero-width spaces) alone give the model nothing to say.
    return _SPEAKABLE.search(segment) is not None


def require_speech(segments: list[str]) -> None:
    if not any(speakable(s) for s in segments):
        raise InvalidRequestError("text has nothing to speak (it is empty or only punctuation and symbols)")


def with_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(item, is_last) pairs, looking one item ahead."""
    prev: str | None = None
    for item in items:
        if prev is not None:
            yield prev, False
        prev = item
    if prev is not None:
        yield prev, True


def with_terminal_punct(blocks: Iterable[str], lang: str) -> Iterator[str]:
    """Append ``。`` / ``.`` to the last block when it does not end a sentence, as upstream
    split_paragraph does, so the LLM sees a finished sentence."""
    end = ZH_SPLIT_PUNCT if lang == "zh" else EN_SPLIT_PUNCT
    for block, last in with_last(blocks):
        closed = block[-1] in CLOSERS and len(block) > 1 and block[-2] in end
        if last and block[-1] not in end and not closed:
            block += "。" if lang == "zh" else "."
        yield block


def reference_sentences(blocks: Iterable[str], lang: str) -> Iterator[str]:
    """Upstream sentences over consecutive normalised blocks; a sentence cut by a block boundary
    is carried into the next block."""
    carry = ""
    prev = ""
    for block, last in with_last(blocks):
        if carry:
            text = _join(carry, block, lang)
        elif prev and (lang != "zh" or (prev[-1].isascii() and block[0].isascii())):
            text = " " + block  # the whitespace the block cut removed, as upstream keeps it
        else:
            text = block
        utts, carry = split_reference(text, lang, final=last)
        prev = block
        yield from utts

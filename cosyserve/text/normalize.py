"""Text normalisation as CosyVoice does it: wetext TN (zh or en grammar), number spelling, and
CosyVoice's own rules; language detection. Shared by every family's text frontend."""

from __future__ import annotations

import logging
import re
import sys
import threading
from types import ModuleType
from typing import Any

import regex

logger = logging.getLogger(__name__)

WHITESPACE = re.compile(r"\s+")
SENTENCE_SPLIT = re.compile(r"((?<=[。！？；])\s*|(?<=[.!?;])\s+)")
WORD_SPLIT = re.compile(r"(\s+)")

NORMALIZERS = ("wetext", "none", "off")

_CHINESE = re.compile(r"[\u4e00-\u9fff]")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_ONLY_PUNCT = regex.compile(r"^[\p{P}\p{S}]*$")
_DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ----------------------------------------------------------------------------- shared engines

_lock = threading.Lock()  # guards lazy construction and the non-thread-safe engines below
_wetext: dict[str, Any] = {}
_wetext_failed = False
_inflect: Any = None


def wetext_normalizer(lang: str) -> Any | None:
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
    for part in (WORD_SPLIT if by_word else SENTENCE_SPLIT).split(text):
        if not part or part.isspace():
            out.append(part)
            continue
        result = _try_wetext(normalizer, part)
        if result is None:
            result = part if by_word else _wetext_piecewise(normalizer, part, by_word=True)
        out.append(result)
    return "".join(out)


def run_wetext(lang: str, text: str) -> str:
    normalizer = wetext_normalizer(lang)
    if normalizer is None or not text:
        return text
    result = _try_wetext(normalizer, text)
    if result is not None:
        return result
    collapsed = WHITESPACE.sub(" ", text)
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


def zh_rules(text: str, last: bool = True) -> str:
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = text.replace("²", "平方").replace("³", "立方")
    text = text.replace(".", "。").replace(" - ", "，")
    text = text.replace("（", "").replace("）", "").replace("【", "").replace("】", "").replace("`", "")
    text = text.replace("——", " ")
    # A trailing comma ends the text; a block cut after a comma continues in the next block.
    return _TRAILING_COMMAS.sub("。", text) if last else text


# ----------------------------------------------------------------------------- public API


def detect_language(text: str) -> str:
    """Return "zh" if the text has a CJK unified ideograph (so kanji Japanese too), else "en"."""
    return "zh" if contains_chinese(text) else "en"

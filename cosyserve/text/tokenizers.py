"""The text tokenizer of CosyVoice v1: whisper's multilingual BPE (tiktoken).

The vocabulary file ``multilingual.tiktoken`` ships inside the package (``cosyserve/assets``), so
nothing is downloaded at run time and openai-whisper is not a dependency. The special tokens are
laid out after the 50,257 BPE ranks in whisper's order (openai-whisper 20231117,
``num_languages=100``): ``<|endoftext|>``, ``<|startoftranscript|>``, one token per language,
``<|translate|>``, ``<|transcribe|>``, ``<|startoflm|>``, ``<|startofprev|>``, ``<|nospeech|>``,
``<|notimestamps|>`` and 1,501 timestamp tokens ``<|0.00|>`` .. ``<|30.00|>`` (51,866 in all).

``encode`` behaves like whisper's ``encode(text, allowed_special="all")``: a special token
written in the text (``<|en|>``) becomes its single id. No SOT/language/task prefix is added.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import tiktoken

logger = logging.getLogger(__name__)

# Language codes in whisper's order; the position decides the id of `<|xx|>`. The first 99 are
# whisper v1/v2's, `yue` is the 100th (large-v3 and CosyVoice v1).
LANGUAGE_CODES: tuple[str, ...] = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv",
    "it", "id", "hi", "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no",
    "th", "ur", "hr", "bg", "lt", "la", "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr",
    "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy", "ne", "mn", "bs", "kk", "sq", "sw",
    "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc", "ka", "be", "tg", "sd", "gu",
    "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl",
    "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su", "yue",
)  # fmt: skip

# GPT-2 style pre-tokenisation regex used by whisper's tiktoken encodings.
_PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_TIMESTAMPS = 1501  # 0.00 .. 30.00 s in steps of 0.02 s
VOCAB_FILE = "multilingual.tiktoken"


def default_vocab_path() -> Path:
    """Path of the bundled ``multilingual.tiktoken`` (openai-whisper 20231117, MIT)."""
    return Path(str(resources.files("cosyserve").joinpath("assets", VOCAB_FILE)))


def special_tokens(num_languages: int = 100) -> list[str]:
    """Whisper's special tokens in id order (they follow the BPE ranks)."""
    if not 1 <= num_languages <= len(LANGUAGE_CODES):
        raise ValueError(f"num_languages must be in 1..{len(LANGUAGE_CODES)}, got {num_languages}")
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGE_CODES[:num_languages]),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *(f"<|{i * 0.02:.2f}|>" for i in range(_TIMESTAMPS)),
    ]


def _load_ranks(path: Path) -> dict[bytes, int]:
    # One "base64(token) rank" pair per line; parsed here rather than through tiktoken's loader,
    # which wants to cache copies of the file in a temp directory.
    ranks: dict[bytes, int] = {}
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class WhisperTokenizer:
    """Whisper multilingual tokenizer: ``encode`` / ``decode`` plus the special-token ids."""

    def __init__(self, vocab_path: str | Path | None = None, num_languages: int = 100):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer vocabulary {path} is missing; reinstall cosyserve")
        ranks = _load_ranks(path)
        specials = special_tokens(num_languages)
        self.num_languages = num_languages
        self.special_ids: dict[str, int] = {tok: len(ranks) + i for i, tok in enumerate(specials)}
        self.encoding = tiktoken.Encoding(
            name=path.stem,
            explicit_n_vocab=len(ranks) + len(specials),
            pat_str=_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_ids,
        )
        logger.debug("loaded tokenizer %s: %d tokens", path, self.n_vocab)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    @property
    def eot(self) -> int:
        return self.special_ids["<|endoftext|>"]

    @property
    def sot(self) -> int:
        return self.special_ids["<|startoftranscript|>"]

    def language_token(self, language: str) -> int:
        """Id of ``<|language|>`` (e.g. ``"en"`` -> 50259)."""
        try:
            return self.special_ids[f"<|{language}|>"]
        except KeyError:
            raise KeyError(f"no language token for {language!r}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it become single ids."""
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids))


@lru_cache(maxsize=4)
def get_tokenizer(num_languages: int = 100) -> WhisperTokenizer:
    """The shared tokenizer for ``num_languages`` (built once: loading takes ~0.2 s)."""
    return WhisperTokenizer(num_languages=num_languages)

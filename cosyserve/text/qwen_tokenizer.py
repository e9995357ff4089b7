"""The Qwen2 byte-level BPE tokenizer of CosyVoice2 / CosyVoice3, loaded offline from a model directory.

A model directory's ``CosyVoice-BlankEN/`` holds the Hugging Face tokenizer files of the Qwen2
backbone: ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json``) and ``tokenizer_config.json``
with the base specials (``<|endoftext|>`` = 151643, ``<|im_start|>``, ``<|im_end|>``). Upstream loads
them with ``AutoTokenizer`` and then adds its family's special tokens (``CosyVoice2Tokenizer`` /
``CosyVoice3Tokenizer``), which take the next free ids in list order: ``<|endofprompt|>`` = 151646,
``[breath]`` = 151647, ... Here the same pipeline is built with the ``tokenizers`` package alone
(no ``transformers``): NFC normalisation, Qwen2's pre-tokenisation regex, byte-level BPE, the
specials as added tokens matched anywhere in the text (before normalisation).

``encode`` adds no BOS/EOS; ``decode`` drops special tokens (upstream ``skip_special_tokens=True``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cosyserve.errors import ModelDirectoryError

logger = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "CosyVoice-BlankEN"
ENDOFPROMPT = "<|endofprompt|>"

# Qwen2's pre-tokeniser (transformers' Qwen2TokenizerFast): contractions, letter runs with one
# leading non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# upstream cosyvoice/tokenizer/tokenizer.py (CosyVoice2Tokenizer): added in this order.
_COMMON_SPECIALS = (
    "<|im_start|>", "<|im_end|>", ENDOFPROMPT,
    "[breath]", "<strong>", "</strong>", "[noise]", "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]", "<laughter>", "</laughter>", "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]",
)  # fmt: skip
COSYVOICE2_SPECIAL_TOKENS: tuple[str, ...] = _COMMON_SPECIALS

# CosyVoice3Tokenizer adds <|endofsystem|>, the 84 CMU phones (ARPAbet, with stress digits) and
# 176 pinyin initials / finals with tones, each written as a bracketed tag.
_CMU_PHONES_TEXT = (
    "AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 B CH D DH "
    "EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 JH K L M N NG "
    "OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z ZH"
)
_PINYIN_TEXT = (
    "a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè ié iòng "
    "ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou p q r s sh t u "
    "uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān uāng uē uě uī uō uǎ uǎi "
    "uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn èng èr é éi én éng ér ì ìn ìng í "
    "ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn "
    "ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ"
)
_CMU_PHONES = _CMU_PHONES_TEXT.split()
_PINYIN = _PINYIN_TEXT.split()
COSYVOICE3_SPECIAL_TOKENS: tuple[str, ...] = (
    *_COMMON_SPECIALS,
    "<|endofsystem|>",
    *(f"[{p}]" for p in _CMU_PHONES),
    *(f"[{p}]" for p in _PINYIN),
)
CMU_PHONE_TAGS = frozenset(f"[{p}]" for p in _CMU_PHONES)
PINYIN_TAGS = frozenset(f"[{p}]" for p in _PINYIN)

FAMILY_SPECIAL_TOKENS = {
    "cosyvoice2": COSYVOICE2_SPECIAL_TOKENS,
    "cosyvoice3": COSYVOICE3_SPECIAL_TOKENS,
}


class QwenTokenizer:
    """Encode text to Qwen2 token ids and back (thread-safe: the Rust tokenizer is immutable here).

    Build it with :func:`load_qwen_tokenizer`. ``special_tokens`` maps every special token (base and
    family) to its id.
    """

    def __init__(self, tokenizer: Any, special_tokens: dict[str, int]):
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(special_tokens.values())

    @property
    def vocab_size(self) -> int:
        """Number of ids (BPE ranks plus every added token)."""
        return int(self._tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def endofprompt_id(self) -> int:
        return self.special_tokens[ENDOFPROMPT]

    def token_id(self, token: str) -> int:
        """The id of one special token (KeyError for anything else)."""
        return self.special_tokens[token]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS; special tokens written in the text become their ids)."""
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens dropped."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_dir(model_dir: str | os.PathLike[str]) -> Path:
    """The folder with the tokenizer files: ``<model_dir>/CosyVoice-BlankEN`` (or the folder itself)."""
    path = Path(model_dir)
    return path / TOKENIZER_SUBDIR if (path / TOKENIZER_SUBDIR).is_dir() else path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelDirectoryError(f"{path}: missing (the Qwen2 tokenizer needs it)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirectoryError(f"{path}: not a readable JSON file ({exc})") from exc


def _base_added_tokens(config: dict[str, Any], source: Path) -> dict[int, str]:
    """id -> content of the tokens ``tokenizer_config.json`` declares (``added_tokens_decoder``)."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ModelDirectoryError(f"{source}: 'added_tokens_decoder' must be a mapping of id -> token")
    added: dict[int, str] = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not isinstance(content, str) or not str(key).isdigit():
            raise ModelDirectoryError(f"{source}: bad added_tokens_decoder entry {key!r}: {entry!r}")
        added[int(key)] = content
    return added


def _bpe_tokenizer(directory: Path, base_added: dict[int, str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not vocab:
        raise ModelDirectoryError(f"{vocab_path}: expected a non-empty mapping of token -> id")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise ModelDirectoryError(f"{merges_path}: missing (the Qwen2 tokenizer needs it)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirectoryError(f"{merges_path}: cannot be read ({exc})") from exc
    merges = []
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ModelDirectoryError(f"{merges_path}:{number}: expected two tokens, got {line!r}")
        merges.append((parts[0], parts[1]))
    # The declared specials keep their declared ids (they are never produced by merges).
    for token_id, content in base_added.items():
        if vocab.get(content, token_id) != token_id:
            raise ModelDirectoryError(
                f"{directory / 'tokenizer_config.json'}: {content!r} is declared as id {token_id} but "
                f"{vocab_path.name} gives it id {vocab[content]}"
            )
    vocab = {**vocab, **{content: token_id for token_id, content in base_added.items()}}
    try:
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad merges
        raise ModelDirectoryError(f"{merges_path}: does not match {vocab_path.name}: {exc}") from exc
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_qwen_tokenizer(
    model_dir: str | os.PathLike[str], family: str = "cosyvoice2", extra_specials: Sequence[str] = ()
) -> QwenTokenizer:
    """The tokenizer of a CosyVoice2/3 model directory (or of its ``CosyVoice-BlankEN`` folder).

    ``family`` picks the special-token list upstream adds (``FAMILY_SPECIAL_TOKENS``). Raises
    :class:`ModelDirectoryError` naming the file for missing or unreadable tokenizer files.
    """
    from tokenizers import AddedToken, Tokenizer

    if family not in FAMILY_SPECIAL_TOKENS:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILY_SPECIAL_TOKENS)}")
    directory = tokenizer_dir(model_dir)
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.exists() else {}
    if not isinstance(config, dict):
        raise ModelDirectoryError(f"{config_path}: expected a JSON object")
    base_added = _base_added_tokens(config, config_path)
    if (directory / "tokenizer.json").exists():
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001
            raise ModelDirectoryError(f"{directory / 'tokenizer.json'}: cannot be loaded ({exc})") from exc
    else:
        tokenizer = _bpe_tokenizer(directory, base_added)
    tokenizer.no_truncation()
    tokenizer.no_padding()

    names = [*(base_added[i] for i in sorted(base_added)), *FAMILY_SPECIAL_TOKENS[family], *extra_specials]
    tokenizer.add_special_tokens(
        [AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False) for name in names]
    )
    special_tokens = {name: tokenizer.token_to_id(name) for name in dict.fromkeys(names)}
    for token_id, content in base_added.items():
        if special_tokens[content] != token_id:
            raise ModelDirectoryError(
                f"{config_path}: {content!r} is declared as id {token_id} but the vocabulary gives "
                f"{special_tokens[content]}"
            )
    logger.debug(
        "Qwen2 tokenizer from %s: %d ids, %s = %d",
        directory,
        tokenizer.get_vocab_size(with_added_tokens=True),
        ENDOFPROMPT,
        special_tokens[ENDOFPROMPT],
    )
    return QwenTokenizer(tokenizer, special_tokens)

"""The Qwen2 tokenizer outside the fixtures: the family special-token lists, encode/decode
behaviour, a ``tokenizer.json`` directory, and clear errors for broken tokenizer folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cosyserve.errors import ModelDirectoryError
from cosyserve.text.qwen_tokenizer import (
    COSYVOICE2_SPECIAL_TOKENS,
    COSYVOICE3_SPECIAL_TOKENS,
    load_qwen_tokenizer,
)
from tests.families.cosyvoice2.parity.test_frontend import qwen_files  # noqa: F401 - session fixture

pytestmark = pytest.mark.timeout(120)


def test_family_lists() -> None:
    assert COSYVOICE3_SPECIAL_TOKENS[: len(COSYVOICE2_SPECIAL_TOKENS)] == COSYVOICE2_SPECIAL_TOKENS
    assert len(COSYVOICE2_SPECIAL_TOKENS) == 19 and len(COSYVOICE3_SPECIAL_TOKENS) == 280
    assert len(set(COSYVOICE3_SPECIAL_TOKENS)) == 280
    assert "[IY1]" in COSYVOICE3_SPECIAL_TOKENS and "[ǐ]" in COSYVOICE3_SPECIAL_TOKENS


def test_encode_and_decode(qwen_files: Path) -> None:  # noqa: F811
    tok = load_qwen_tokenizer(qwen_files.parent, "cosyvoice3")  # the model dir or the folder itself
    eop = tok.endofprompt_id
    assert eop == 151646 and tok.token_id("<|endoftext|>") == 151643
    ids = tok.encode("Hi<|endofprompt|>[breath]你好[IY1]")
    assert ids[0] not in tok.special_tokens.values() and eop in ids
    assert tok.token_id("[breath]") in ids and tok.token_id("[IY1]") in ids
    assert tok.decode(ids) == "Hi你好"  # specials dropped
    assert tok.encode("") == []
    # v2's tokenizer does not know the CosyVoice3 phones: "[IY1]" is plain text there
    v2 = load_qwen_tokenizer(qwen_files, "cosyvoice2")
    assert v2.decode(v2.encode("[IY1]")) == "[IY1]" and v2.vocab_size < tok.vocab_size


def test_a_tokenizer_json_directory(qwen_files: Path, tmp_path: Path) -> None:  # noqa: F811
    tok = load_qwen_tokenizer(qwen_files, "cosyvoice2")
    folder = tmp_path / "CosyVoice-BlankEN"
    folder.mkdir()
    shutil.copy(qwen_files / "tokenizer_config.json", folder)
    tok._tokenizer.save(str(folder / "tokenizer.json"))
    again = load_qwen_tokenizer(tmp_path, "cosyvoice2")
    text = "Hello world! 今天天气很好<|endofprompt|>[laughter]"
    assert again.encode(text) == tok.encode(text)
    assert again.special_tokens == tok.special_tokens


@pytest.mark.parametrize("broken", ["vocab.json", "merges.txt"])
def test_missing_or_broken_files_are_clear_errors(qwen_files: Path, tmp_path: Path, broken: str) -> None:  # noqa: F811
    folder = tmp_path / "CosyVoice-BlankEN"
    shutil.copytree(qwen_files, folder)
    (folder / broken).unlink()
    with pytest.raises(ModelDirectoryError, match=broken):
        load_qwen_tokenizer(tmp_path)
    (folder / broken).write_text(
        "{oops" if broken == "vocab.json" else "#version: 0.2\nab\n", encoding="utf-8"
    )
    with pytest.raises(ModelDirectoryError, match=broken):
        load_qwen_tokenizer(tmp_path)


def test_declared_ids_must_match(qwen_files: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "CosyVoice-BlankEN"
    shutil.copytree(qwen_files, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"]["151643"]["content"] = "!"  # an id that already exists as text
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(ModelDirectoryError, match="declared"):
        load_qwen_tokenizer(tmp_path)

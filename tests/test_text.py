"""Text frontend: tokenizer, smart split (limits, never cutting words / numbers), the lazy
iterator on 50,000 characters, errors. Upstream parity is in tests/families/cosyvoice1/parity/test_frontend.py."""

from __future__ import annotations

import random
import re

import pytest

from cosyserve.errors import InvalidRequestError
from cosyserve.text import segment
from cosyserve.text.frontend import TextFrontend, detect_language, split_for_synthesis
from cosyserve.text.tokenizers import get_tokenizer

WORD = re.compile(r"[0-9A-Za-z]+")
ZH_LONG = (
    "人工智能技术在过去十年中取得了巨大的进步。从图像识别到自然语言处理，深度学习模型已经在许多任务上超越了人类的表现。"
    "语音合成作为其中的一个重要方向，也经历了从拼接合成、参数合成到端到端神经网络合成的发展过程。"
    "如今的语音合成系统不仅能够生成高度自然的语音，还可以模仿特定说话人的音色和情感。"
)
EN_LONG = (
    "Speech synthesis has come a long way over the past decade. Early systems stitched together small "
    "pieces of recorded audio, and the result often sounded robotic. Statistical parametric methods "
    "improved flexibility but produced muffled voices. Modern neural systems generate audio that "
    "listeners can hardly distinguish from real recordings."
)


@pytest.fixture(scope="module")
def plain() -> TextFrontend:
    """CosyVoice's rules only: fast and deterministic (digits are still spelled out in English)."""
    return TextFrontend(normalizer="none")


@pytest.fixture(scope="module")
def wetext() -> TextFrontend:
    return TextFrontend(normalizer="wetext")


def _random_english(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "engineers",
             "build", "fast", "servers", "for", "speech", "synthesis", "internationalization")  # fmt: skip
    parts: list[str] = []
    total = 0
    while total < n_chars:
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(2, 45))).capitalize()
        sentence += rng.choice([".", "!", "?", ",", ";", ":", ""])
        if rng.random() < 0.05:
            sentence += "\n"
        parts.append(sentence)
        total += len(sentence) + 1
    return " ".join(parts)[:n_chars].rstrip()


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_tokens() -> None:
    tok = get_tokenizer()
    assert tok.n_vocab == 51866
    ids = tok.special_ids
    assert ids["<|endoftext|>"] == 50257
    assert ids["<|startoftranscript|>"] == 50258
    assert tok.language_token("en") == 50259
    assert tok.language_token("zh") == 50260
    assert tok.language_token("yue") == 50358
    assert ids["<|translate|>"] == 50359
    assert ids["<|notimestamps|>"] == 50364
    assert ids["<|0.00|>"] == 50365
    assert ids["<|30.00|>"] == 51865


def test_tokenizer_encode() -> None:
    tok = get_tokenizer()
    assert tok.encode("<|en|>Hi") == [50259, *tok.encode("Hi")]
    assert tok.encode("<|endoftext|>") == [50257]
    text = "你好 world, 2024! こんにちは"
    assert tok.decode(tok.encode(text)) == text
    assert TextFrontend().tokenize("Hello world!") == [15947, 1002, 0]


# ----------------------------------------------------------------------------- language, modes


@pytest.mark.parametrize(
    ("text", "lang"),
    [("你好", "zh"), ("今日はいい天気", "zh"), ("こんにちは", "en"), ("안녕하세요", "en"), ("Hello", "en")],
)
def test_detect_language(text: str, lang: str) -> None:
    assert detect_language(text) == lang
    assert TextFrontend().detect_language(text) == lang


def test_reference_rules_without_tn(plain: TextFrontend) -> None:
    assert plain.normalize("你好") == ["你好。"]
    assert plain.normalize("你好，") == ["你好。"]
    assert plain.normalize("面积是3m²") == ["面积是3m平方。"]
    assert plain.normalize("I have 2 cats") == ["I have two cats."]
    assert plain.normalize("I have 2 cats", split=False) == ["I have two cats"]


def test_tags_bypass_everything(wetext: TextFrontend) -> None:
    text = "<|en|>Numbers like 42 stay. " * 10
    assert wetext.normalize(text) == [text]
    assert wetext.normalize(text, max_text_length=20) == [text]
    assert list(wetext.iter_segments(text, max_text_length=20)) == [text]


def test_off_keeps_text(plain: TextFrontend) -> None:
    off = TextFrontend(normalizer="off")
    assert off.normalize("  It costs $5.  ") == ["  It costs $5.  "]
    assert off.normalize("It costs $5. Really!", max_text_length=12) == ["It costs $5.", "Really!"]


def test_wetext_english(wetext: TextFrontend) -> None:
    # digits-only English goes through the English grammar (upstream's "auto" would read Chinese)
    assert wetext.normalize("2024") == ["twenty twenty four."]
    # wetext's English grammar asserts on double spaces / CRLF: retried with collapsed whitespace
    assert wetext.normalize("Hello  world.\r\nBye.") == ["Hello world. Bye."]


def test_huge_number_read_digit_by_digit(plain: TextFrontend) -> None:
    (segment,) = plain.normalize("1" * 40)
    assert segment == " ".join(["one"] * 40) + "."


# ----------------------------------------------------------------------------- smart split


@pytest.mark.parametrize("limit", [12, 25, 50, 100])
@pytest.mark.parametrize("text", [ZH_LONG, EN_LONG], ids=["zh", "en"])
def test_smart_split_respects_limit(plain: TextFrontend, text: str, limit: int) -> None:
    segments = plain.normalize(text, max_text_length=limit)
    assert segments
    assert max(len(s) for s in segments) <= limit
    assert all(s == s.strip() and s for s in segments)
    joined = "".join(segments) if detect_language(text) == "zh" else " ".join(segments)
    if detect_language(text) == "zh":
        assert joined == text
    else:
        assert WORD.findall(joined) == WORD.findall(text)
    assert segments == list(plain.iter_segments(text, max_text_length=limit))


def test_smart_split_packs_sentences(plain: TextFrontend) -> None:
    assert plain.normalize("Hi. How are you? Fine!", max_text_length=100) == ["Hi. How are you? Fine!"]
    # A short remainder joins the previous segment when it fits.
    text = "This sentence has exactly fifty characters in it. And this one is forty characters. Ok."
    segments = plain.normalize(text, max_text_length=90)
    assert segments == [
        "This sentence has exactly fifty characters in it. And this one is forty characters. Ok."
    ]


def test_smart_split_off_is_one_segment_per_sentence(plain: TextFrontend) -> None:
    text = "One. Two! Three? Four; five, six"
    assert plain.normalize(text, enable_smart_split=False) == [
        "One.",
        "Two!",
        "Three?",
        "Four;",
        "five, six.",
    ]
    assert plain.normalize("你好。我很好！谢谢", enable_smart_split=False) == ["你好。", "我很好！", "谢谢。"]
    # long sentences are still cut at the limit
    segments = plain.normalize(EN_LONG, max_text_length=40, enable_smart_split=False)
    assert max(len(s) for s in segments) <= 40


def test_long_english_sentence_cut_at_clause_then_space(plain: TextFrontend) -> None:
    text = "alpha beta gamma delta, " + " ".join(["epsilon"] * 30)
    segments = plain.normalize(text, max_text_length=60)
    assert segments[0] == "alpha beta gamma delta,"
    assert all(len(s) <= 60 for s in segments)
    assert WORD.findall(" ".join(segments)) == WORD.findall(text)


def test_spelled_out_number_not_cut(plain: TextFrontend) -> None:
    prefix = " ".join(["word"] * 14)  # 69 characters, so a plain cut would fall inside the number
    text = f"{prefix} 1234567 apples were counted in the orchard"
    segments = plain.normalize(text, max_text_length=100)
    number = "one million, two hundred and thirty-four thousand, five hundred and sixty-seven"
    assert any(number in s for s in segments), segments
    assert all(len(s) <= 100 for s in segments)


def test_chinese_cut_never_inside_digits_or_latin(plain: TextFrontend) -> None:
    rng = random.Random(1)
    runs = ["12345", "GPT", "machine", "2024", "abc123"]
    text = "".join(rng.choice(["的", "一", "是", "在", "我", rng.choice(runs)]) for _ in range(400))
    segments = plain.normalize(text, max_text_length=30)
    assert max(len(s) for s in segments) <= 30
    assert "".join(segments) == text + "。"
    assert [m for s in segments for m in WORD.findall(s)] == WORD.findall(text)


def test_chinese_prefers_clause_punctuation(plain: TextFrontend) -> None:
    text = "第一部分的内容比较长一些，第二部分的内容也不短而且没有任何标点符号一直写下去"
    assert plain.normalize(text, max_text_length=30) == [
        "第一部分的内容比较长一些，",
        "第二部分的内容也不短而且没有任何标点符号一直写下去。",
    ]


def test_unbreakable_run_stays_whole(plain: TextFrontend) -> None:
    word = "a" * 150
    assert plain.normalize(f"Start {word} end", max_text_length=50) == ["Start", word, "end."]


def test_split_for_synthesis_plain_english() -> None:
    segments = split_for_synthesis(EN_LONG + " It costs 12 dollars.")
    assert max(len(s) for s in segments) <= segment.DEFAULT_MAX_TEXT_LENGTH
    assert segments[-1].endswith("twelve dollars.")
    assert split_for_synthesis("Hello there") == ["Hello there."]


# ----------------------------------------------------------------------------- long input


def test_iter_segments_50k_characters(plain: TextFrontend) -> None:
    text = _random_english(50_000)
    assert len(text) >= 49_900
    segments = list(plain.iter_segments(text, max_text_length=100))
    assert max(len(s) for s in segments) <= 100
    assert all(s.strip() == s and s for s in segments)
    # every word, in order; segments are well filled (sentences are packed, tails merged)
    assert WORD.findall(" ".join(segments)) == WORD.findall(text)
    assert len(text) / 100 <= len(segments) <= len(text) / 40


def test_iter_segments_50k_chinese(plain: TextFrontend) -> None:
    text = (ZH_LONG * 300)[:50_000]
    segments = list(plain.iter_segments(text, max_text_length=80))
    assert max(len(s) for s in segments) <= 80
    assert "".join(segments) == text


def test_iter_segments_is_lazy(plain: TextFrontend, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = TextFrontend._normalize_block

    def counting(self, block, lang, last=True):
        calls.append(len(block))
        return original(self, block, lang, last)

    monkeypatch.setattr(TextFrontend, "_normalize_block", counting)
    segments = plain.iter_segments(_random_english(50_000), max_text_length=100)
    next(segments)
    # only the first blocks were normalised, each bounded
    assert len(calls) <= 3
    assert max(calls) <= segment.BLOCK_CHARS


def test_iter_segments_reference_mode_matches_normalize(plain: TextFrontend) -> None:
    for text in (ZH_LONG, EN_LONG):
        assert list(plain.iter_segments(text)) == plain.normalize(text)


def test_wetext_long_text_in_blocks(wetext: TextFrontend) -> None:
    text = ("On March 5, 2021, revenue was $3.5 million. " * 60).strip()
    segments = list(wetext.iter_segments(text, max_text_length=100))
    assert max(len(s) for s in segments) <= 100
    assert all(not re.search(r"\d", s) for s in segments)
    assert sum(s.count("three point five million dollars") for s in segments) == 60


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "。！？", "...", "!!! ???", "（）【】", "——"])
@pytest.mark.parametrize("normalizer", ["none", "wetext", "off"])
def test_nothing_to_speak(text: str, normalizer: str) -> None:
    fe = TextFrontend(normalizer=normalizer)
    with pytest.raises(InvalidRequestError):
        fe.normalize(text)
    with pytest.raises(InvalidRequestError):
        fe.normalize(text, max_text_length=50)
    with pytest.raises(InvalidRequestError):
        fe.iter_segments(text, max_text_length=50)  # raised by the call, not the iteration


def test_errors_are_clear() -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        split_for_synthesis("")
    with pytest.raises(InvalidRequestError, match="punctuation"):
        split_for_synthesis("?!")
    for bad in (0, 5, -1, True, "100", 12.5):
        with pytest.raises(InvalidRequestError, match="max_text_length"):
            split_for_synthesis("Hello.", max_text_length=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="string"):
        TextFrontend().normalize(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TextFrontend(normalizer="ttsfrd")

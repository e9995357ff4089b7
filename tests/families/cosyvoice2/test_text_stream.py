"""Text streamed in (the reference's bistream) through the CosyVoice2 backend: the library takes an
iterator of pieces, the batch runner parks a request while it waits for text (its KV rows kept
aside, no decode row spent), and the engine sleeps while every request waits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cosyserve.api import SynthesisRequest, TextStream, TextStreamRequest
from cosyserve.engine.batching import BatchConfig, BatchingPolicy, BatchRunner, run_alone
from cosyserve.engine.loop import EngineLoop
from cosyserve.families.cosyvoice2.backend import CosyVoice2Backend
from cosyserve.families.cosyvoice2.frontend import StreamedTextTokenizer
from cosyserve.synthesizer import Synthesizer
from tests.test_batching import audio_of

pytestmark = pytest.mark.timeout(600)

PIECES = ["Hello there, ", "this is text ", "that arrives ", "in pieces, ", "as an LLM ", "writes it."]


def streamed_ids(backend: CosyVoice2Backend, pieces: list[str]) -> list[int]:
    tokenizer = StreamedTextTokenizer(backend.frontend.tokenizer)
    ids = [i for piece in pieces for i in tokenizer.push(piece)]
    return ids + tokenizer.finish()


def reference_tokens(backend: CosyVoice2Backend, pieces: list[str], seed: int, **prompt) -> list[int]:
    """The batch-1 bistream decode of the same text ids (one id per piece, as upstream's text
    generator yields them), with the same sampling seed."""
    ids = streamed_ids(backend, pieces)
    return list(backend.llm.generate_bistream([[i] for i in ids], generator=seed, **prompt))


def test_streamed_text_tokenizer_keeps_words_whole(backend: CosyVoice2Backend) -> None:
    tokenizer = backend.frontend.tokenizer
    assert streamed_ids(backend, ["Hel", "lo wor", "ld, how ", "are you?"]) == tokenizer.encode(
        "Hello world, how are you?"
    )
    stream = StreamedTextTokenizer(tokenizer)
    assert stream.push("你好") == tokenizer.encode("你好")  # no spaces to wait for: at once
    assert stream.push("hello") == [] and stream.finish() == tokenizer.encode("hello")


def test_the_library_takes_pieces_and_speaks_before_the_text_ends(backend: CosyVoice2Backend) -> None:
    pulled: list[str] = []

    def pieces():
        for piece in PIECES:
            pulled.append(piece)
            yield piece

    tts = Synthesizer(backend=backend)
    chunks, info = tts.synthesize(pieces(), voice="中文女", stream=True, seed=3)
    first = next(chunks)
    assert first.audio.size and len(pulled) < len(PIECES), "audio only after the whole text"
    rest = list(chunks)
    audio = np.concatenate([first.audio, *(c.audio for c in rest)])
    assert len(pulled) == len(PIECES) and rest[-1].final
    assert np.isfinite(audio).all() and float(np.sqrt(np.mean(audio**2))) > 1e-3
    assert audio.size == 960 * info.speech_tokens


@pytest.mark.parametrize("stream", [True, False])
def test_tokens_equal_the_batch_1_bistream_decode(backend: CosyVoice2Backend, stream: bool) -> None:
    request = TextStreamRequest(text="", voice="英文女", seed=11, stream=stream)
    request.text_stream = iterator_stream(PIECES)
    task = backend.open(request)
    chunks = [c for c in run_alone(task) if c is not None]
    (tokens,) = task.segment_tokens
    assert tokens == reference_tokens(backend, PIECES, 11)
    assert audio_of(chunks).size == 960 * len(tokens)


def test_zero_shot_prompt_goes_first(backend: CosyVoice2Backend) -> None:
    from tests.families.cosyvoice2.test_backend import prompt

    recording = prompt()
    request = TextStreamRequest(text="", mode="zero_shot", prompt=recording, seed=5, stream=True)
    request.text_stream = iterator_stream(PIECES[:3])
    task = backend.open(request)
    list(run_alone(task))
    features = backend.prompt_encoder.encode(recording)
    n = min(features.speech_feat.shape[1] // 2, features.speech_tokens.shape[1])
    frontend = backend.frontend
    expected = reference_tokens(
        backend,
        PIECES[:3],
        5,
        prompt_text_ids=frontend.tokenize(frontend.prompt_text(recording.text or "")),
        prompt_speech_tokens=features.speech_tokens[0, :n].tolist(),
    )
    assert task.segment_tokens == [expected]


def iterator_stream(pieces: list[str]) -> TextStream:
    from cosyserve.api import IteratorTextStream

    return IteratorTextStream(pieces)


def test_waiting_requests_are_parked_and_match_their_solo_runs(backend: CosyVoice2Backend) -> None:
    """Text written while the runner steps (other requests decoding meanwhile): a waiting request
    leaves the decode batch with its KV rows and rejoins when text arrives; every request gets its
    solo result."""
    plain = SynthesisRequest(text="A sentence spoken meanwhile.", voice="中文男", seed=2, stream=True)
    solo_plain = backend.open(plain, num_tokens=120)
    list(run_alone(solo_plain))

    streamed = TextStreamRequest(text="", voice="英文女", seed=11, stream=True)
    task_streamed, task_plain = backend.open(streamed), backend.open(plain, num_tokens=120)
    runner = BatchRunner(backend, BatchConfig(max_batch=4, token_budget=0))
    runner.add(task_streamed)
    runner.add(task_plain)
    schedule = {3 + 20 * i: piece for i, piece in enumerate(PIECES)}
    parked: list[int] = []
    for step in range(3000):
        if step in schedule:
            streamed.text_stream.write(schedule[step])
        if step == max(schedule) + 20:
            streamed.text_stream.close()
        if not len(runner):
            break
        for event in runner.step():
            assert event.error is None, event.error
        parked.append(runner.parked_rows)
    assert not len(runner) and task_streamed.done and task_plain.done
    assert max(parked) == 1, "the request waiting for text should have been parked"
    assert task_plain.segment_tokens == solo_plain.segment_tokens
    assert task_streamed.segment_tokens == [reference_tokens(backend, PIECES, 11)]


def test_the_engine_sleeps_while_every_request_waits_for_text(backend: CosyVoice2Backend) -> None:
    engine = EngineLoop(backend, policy=BatchingPolicy(backend, BatchConfig()))

    async def main() -> tuple[int, int, np.ndarray]:
        request = TextStreamRequest(text="", voice="中文女", seed=1, stream=True)
        handle = engine.submit(request)
        request.text_stream.write("Hello there, ")
        await asyncio.sleep(1.0)  # the first piece is decoded up to its FILL, then it waits
        before = engine.counters.steps
        await asyncio.sleep(0.5)
        idle_steps = engine.counters.steps - before
        request.text_stream.write("and goodbye.")
        request.text_stream.close()
        audio, _ = await handle.collect()
        return idle_steps, engine.counters.steps - before, audio

    try:
        idle_steps, steps, audio = asyncio.run(main())
    finally:
        asyncio.run(engine.shutdown(5))
    assert idle_steps == 0, f"the engine stepped {idle_steps} times while the request waited for text"
    assert steps > 10 and audio.size and np.isfinite(audio).all()


def test_text_stream_requests_are_validated_like_others(backend: CosyVoice2Backend) -> None:
    from cosyserve.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="instruct2 mode needs an instruction"):
        backend.open(TextStreamRequest(text="", voice="中文女", mode="instruct2"))
    # Text that ends without a word: nothing is said (the reference would decode from nothing).
    task = backend.open(TextStreamRequest(text="", voice="中文女", seed=1))
    task.request.text_stream.write("  ")  # type: ignore[attr-defined]
    task.request.text_stream.close()  # type: ignore[attr-defined]
    chunks = [c for c in run_alone(task) if c is not None]
    assert [(c.audio.size, c.final) for c in chunks] == [(0, True)] and task.info.speech_tokens == 0

"""Continuous batching on the tiny model: each request's output in a batch equals its solo
output (mixed lengths and modes, requests joining and leaving mid-way, same seeds), the split
token → wav halves equal the reference token2wav, cancellation frees the KV row, stream first
chunks go first, and the engine / server run with the batching policy."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from cosyserve.api import PromptAudio, SynthesisRequest
from cosyserve.engine.batching import (
    BatchConfig,
    BatchingPolicy,
    BatchRunner,
    StepStats,
    make_policy,
    run_alone,
)
from cosyserve.engine.loop import EngineLoop, RequestState, RoundRobinPolicy
from cosyserve.families.base import SpeechTask
from cosyserve.families.cosyvoice1.backend import CosyVoiceBackend
from cosyserve.families.cosyvoice1.token2wav import (
    ChunkedToken2Wav,
    StreamingToken2Wav,
    WholeToken2Wav,
    token2wav,
)

AUDIO_ATOL = 2e-4


@pytest.fixture(scope="module")
def backend(tiny_backend) -> CosyVoiceBackend:
    torch.set_num_threads(1)
    return tiny_backend


def sft(text: str, seed: int, voice: str = "英文女", **kwargs) -> SynthesisRequest:
    return SynthesisRequest(text=text, voice=voice, seed=seed, **kwargs)


def solo(backend: CosyVoiceBackend, request: SynthesisRequest, num_tokens: int | None = None):
    """The library's batch-1 path: iterate the task."""
    task = backend.open(request, num_tokens=num_tokens)
    chunks = [c for c in run_alone(task) if c is not None]
    return task, chunks


def audio_of(chunks) -> np.ndarray:
    parts = [c.audio for c in chunks]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def drive(
    runner: BatchRunner,
    joins: dict[int, list[SpeechTask]],
    cancel_at: dict[int, SpeechTask] | None = None,
    max_steps: int = 5000,
) -> dict[int, list]:
    """Step the runner; tasks in ``joins[k]`` join before step k; ``cancel_at[k]`` leaves then."""
    out: dict[int, list] = {}
    last_join = max(joins)
    for step in range(max_steps):
        for task in joins.get(step, []):
            runner.add(task)
            out[id(task)] = []
        if cancel_at and step in cancel_at:
            task = cancel_at[step]
            runner.remove(task)
            task.cancel()
        if step > last_join and not len(runner):
            return out
        for event in runner.step():
            assert event.error is None, event.error
            if event.chunk is not None:
                out[id(event.task)].append(event.chunk)
    raise AssertionError("the runner did not finish")


def assert_same(task: SpeechTask, chunks, ref_task: SpeechTask, ref_chunks) -> None:
    assert task.segment_tokens == ref_task.segment_tokens  # same seeds → the same tokens
    assert [c.audio.size for c in chunks] == [c.audio.size for c in ref_chunks]
    assert [c.final for c in chunks] == [c.final for c in ref_chunks]
    np.testing.assert_allclose(audio_of(chunks), audio_of(ref_chunks), atol=AUDIO_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------
# The split token → wav halves equal the reference implementation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("speed", "first_hop"), [(1.0, None), (1.5, 25), (0.8, 30)])
def test_chunked_token2wav_equals_streaming_token2wav(backend, speed, first_hop) -> None:
    model = backend.model
    emb = backend.speakers["英文女"]
    tokens = torch.randint(0, 4096, (1, 287), generator=torch.Generator().manual_seed(5))[0].tolist()
    ref = StreamingToken2Wav(
        model.flow,
        model.hift,
        embedding=emb,
        speed=speed,
        generator=torch.Generator().manual_seed(11),
        first_hop=first_hop,
    )
    expected = [a for t in tokens for a in ref.push([t])] + [ref.finish()]
    sink = ChunkedToken2Wav(
        model.flow, model.hift, None, None, emb, speed, torch.Generator().manual_seed(11), first_hop=first_hop
    )
    got = []
    for t in tokens:
        due = sink.add(t)
        if due is not None:
            got.append(sink.complete(model.flow.decode([sink.prepare(due)])[0], finalize=False))
    last = sink.complete(model.flow.decode([sink.prepare(sink.remainder())])[0], finalize=True)
    got = [a for a in got if a.size] + [last]  # push() hands out non-empty chunks only
    assert len(got) == len(expected) >= 3
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


def test_whole_token2wav_equals_token2wav(backend) -> None:
    model = backend.model
    emb = backend.speakers["中文男"]
    tokens = torch.randint(0, 4096, (1, 90), generator=torch.Generator().manual_seed(2))
    expected = token2wav(
        model.flow, model.hift, tokens, embedding=emb, speed=1.25, generator=torch.Generator().manual_seed(3)
    )
    sink = WholeToken2Wav(model.flow, model.hift, None, None, emb, 1.25, torch.Generator().manual_seed(3))
    got = sink.complete(model.flow.decode([sink.prepare(tokens[0].tolist())])[0])
    np.testing.assert_array_equal(got, expected)


def test_solo_task_matches_generate_and_token2wav(backend) -> None:
    """The state machine alone reproduces the plain batch-1 pipeline (llm.generate → token2wav)."""
    from cosyserve.families.base import request_generators

    request = sft("Hello there, batching.", seed=9)
    task, chunks = solo(backend, request)
    llm_gen, audio_gen = request_generators(9)
    inputs = backend._segment_inputs(request, task.info.segments[0], None)
    model = backend.model
    tokens = list(model.llm.generate(inputs.text_ids, embedding=inputs.llm_embedding, generator=llm_gen))
    assert task.segment_tokens == [tokens]
    expected = token2wav(
        model.flow, model.hift, torch.tensor([tokens]), embedding=inputs.flow_embedding, generator=audio_gen
    )
    assert len(chunks) == 1 and chunks[0].final
    np.testing.assert_array_equal(chunks[0].audio, expected)


# ----------------------------------------------------------------------------------------------
# Batched == unbatched
# ----------------------------------------------------------------------------------------------


def _prompt() -> PromptAudio:
    sr = 16000
    t = np.arange(int(2.5 * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return PromptAudio(wav.astype(np.float32), sr, "A prompt transcript.")


MIXED = [
    (sft("Hello there.", seed=1), 60),
    (SynthesisRequest(text="你好，世界。", mode="zero_shot", prompt=_prompt(), seed=6, stream=True), 140),
    (
        sft(
            "A much longer sentence, with more words in it for a longer prefix.",
            seed=2,
            voice="中文男",
            stream=True,
        ),
        150,
    ),
    (sft("Short.", seed=3, voice="英文男", speed=1.3), None),
    (sft("Streaming again here. And a second sentence.", seed=4, stream=True, max_text_length=30), 130),
    (SynthesisRequest(text="你好。", voice="中文女", mode="instruct", instruct="Speak slowly.", seed=5), 70),
]


def test_batched_equals_unbatched_with_joins_and_leaves(backend) -> None:
    refs = [solo(backend, r, n) for r, n in MIXED]
    tasks = [backend.open(r, num_tokens=n) for r, n in MIXED]
    batch_sizes: list[int] = []
    runner = BatchRunner(
        backend,
        BatchConfig(max_batch=3, token_budget=300, flow_batch=4),
        on_step=lambda s: batch_sizes.append(s.llm_batch),
    )
    # Join at different steps (different prefix lengths and ages in one KV cache); leave at
    # different steps (different token counts, segment ends); more tasks than max_batch.
    out = drive(runner, {0: tasks[:2], 9: [tasks[2]], 23: tasks[3:5], 30: tasks[5:]})
    assert max(batch_sizes) == 3  # the batch really was shared, and capped
    for task, (ref_task, ref_chunks) in zip(tasks, refs):
        assert_same(task, out[id(task)], ref_task, ref_chunks)
        assert task.done


def test_equal_lengths_share_one_flow_call(backend) -> None:
    requests = [
        sft("Same length text.", seed=s, voice=v) for s, v in ((1, "英文女"), (2, "中文男"), (3, "英文男"))
    ]
    refs = [solo(backend, r, 80) for r in requests]
    tasks = [backend.open(r, num_tokens=80) for r in requests]
    stats: list[StepStats] = []
    runner = BatchRunner(backend, BatchConfig(token_budget=1000, flow_batch=8), on_step=stats.append)
    out = drive(runner, {0: tasks})
    assert any(s.audio_items == 3 and s.flow_calls == 1 for s in stats)
    assert max(s.llm_batch for s in stats) == 3
    for task, (ref_task, ref_chunks) in zip(tasks, refs):
        assert_same(task, out[id(task)], ref_task, ref_chunks)


def test_streams_with_equal_chunks_batch_their_flow(backend) -> None:
    requests = [sft("Streaming text number one.", seed=s, stream=True) for s in (7, 8)]
    refs = [solo(backend, r, 260) for r in requests]
    tasks = [backend.open(r, num_tokens=260) for r in requests]
    stats: list[StepStats] = []
    runner = BatchRunner(backend, BatchConfig(token_budget=1000), on_step=stats.append)
    out = drive(runner, {0: tasks})
    assert sum(1 for s in stats if s.audio_items == 2 and s.flow_calls == 1) >= 2
    for task, (ref_task, ref_chunks) in zip(tasks, refs):
        assert_same(task, out[id(task)], ref_task, ref_chunks)


def test_cancel_mid_batch_frees_the_row_and_others_are_unchanged(backend) -> None:
    requests = [sft(f"Cancel test number {i}.", seed=20 + i, stream=i == 1) for i in range(3)]
    refs = [solo(backend, r, 120) for r in requests]
    tasks = [backend.open(r, num_tokens=120) for r in requests]
    rows: list[int] = []
    runner = BatchRunner(backend, BatchConfig(), on_step=lambda s: rows.append(runner.llm_rows))
    out = drive(runner, {0: tasks}, cancel_at={30: tasks[1]})
    assert rows[28] == 3 and rows[30] == 2  # the cancelled row left the KV cache at once
    assert tasks[1].phase.value == "cancelled"
    for i in (0, 2):
        assert_same(tasks[i], out[id(tasks[i])], *refs[i])


def test_stream_first_chunk_goes_before_whole_segments(backend) -> None:
    """Four non-streaming requests and a stream make their audio due at the same step; with a
    budget of one item per step the stream's first chunk runs first."""
    tasks = [backend.open(sft(f"Long job {i}.", seed=i), num_tokens=45) for i in range(4)]
    backend.options.stream_first_hop = 25  # the first chunk is due at token 25 + 20
    try:
        stream = backend.open(sft("A stream.", seed=9, stream=True), num_tokens=200)
        order: list[SpeechTask] = []
        runner = BatchRunner(backend, BatchConfig(token_budget=0))
        for task in [*tasks, stream]:
            runner.add(task)
        while len(runner):
            for event in runner.step():
                assert event.error is None
                if event.chunk is not None and event.chunk.audio.size:
                    order.append(event.task)
    finally:
        backend.options.stream_first_hop = None
    assert order[0] is stream


def test_overdue_work_is_not_starved(backend) -> None:
    """With starvation_s=0 every item is overdue: oldest request first, streams or not."""
    tasks = [backend.open(sft(f"Old job {i}.", seed=i), num_tokens=45) for i in range(2)]
    backend.options.stream_first_hop = 25
    try:
        stream = backend.open(sft("A stream.", seed=9, stream=True), num_tokens=200)
        runner = BatchRunner(backend, BatchConfig(token_budget=0, starvation_s=0.0))
        for task in [*tasks, stream]:
            runner.add(task)
        order: list[SpeechTask] = []
        while len(runner):
            for event in runner.step():
                if event.chunk is not None and event.chunk.audio.size:
                    order.append(event.task)
    finally:
        backend.options.stream_first_hop = None
    assert order[:2] == tasks


# ----------------------------------------------------------------------------------------------
# The engine policy
# ----------------------------------------------------------------------------------------------


def test_make_policy_picks_batching_for_cosyvoice_only(backend) -> None:
    from types import SimpleNamespace

    from tests.server.fakes import FakeBackend

    policy = make_policy(backend, SimpleNamespace(max_active=4, max_batch=None, token_budget=128))
    assert isinstance(policy, BatchingPolicy)
    assert policy.config.max_batch == 4 and policy.config.token_budget == 128
    assert policy.config.flow_batch == 1  # CPU: no flow batching by default (measured: no gain)
    assert isinstance(make_policy(backend, SimpleNamespace(batching=False)), RoundRobinPolicy)
    assert isinstance(make_policy(FakeBackend(), None), RoundRobinPolicy)


def run(coro, timeout: float = 120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_engine_with_batching_policy_matches_solo_and_cancels(backend) -> None:
    requests = [
        sft("Engine batching one.", seed=31),
        sft("Engine batching two, streamed.", seed=32, stream=True),
        sft("Engine batching three.", seed=33),
    ]
    refs = [audio_of(solo(backend, r, 130)[1]) for r in requests]
    backend.options.num_tokens = 130
    try:
        policy = BatchingPolicy(backend, BatchConfig(max_batch=8))

        async def main():
            engine = EngineLoop(backend, max_active=8, policy=policy)
            handles = [engine.submit(r) for r in requests]
            victim = engine.submit(sft("Engine batching victim.", seed=34))

            async def cancel_soon():
                while policy.stats_.steps < 20:
                    await asyncio.sleep(0.01)
                victim.cancel()

            results = await asyncio.gather(*(h.collect() for h in handles), cancel_soon())
            with pytest.raises(Exception, match="cancel"):
                await victim.collect()
            await engine.shutdown(5)
            return handles, victim, [r[0] for r in results[:3]]

        handles, victim, audios = run(main())
    finally:
        backend.options.num_tokens = None
    for handle, audio, ref in zip(handles, audios, refs):
        assert handle.state is RequestState.DONE
        np.testing.assert_allclose(audio, ref, atol=AUDIO_ATOL, rtol=0)
    assert victim.state is RequestState.CANCELLED
    stats = policy.stats()
    assert stats["max_llm_batch"] == 4 and stats["mean_llm_batch"] > 1
    assert stats["mean_queue_wait_s"] is not None and stats["mean_join_wait_s"] is not None
    assert policy.runner.llm_rows == 0 and len(policy.runner) == 0


@pytest.fixture
def batching_client(backend) -> Iterator:
    from fastapi.testclient import TestClient

    from cosyserve.server.app import create_app
    from tests.server.conftest import make_settings

    settings = make_settings(max_text_chars=200)
    app = create_app(settings, backend=backend, launch_report={"plan": "test"})
    # create_app picks the batching policy for a CosyVoice backend by itself.
    assert isinstance(app.state.cosyserve.engine.policy, BatchingPolicy)
    with TestClient(app) as client:
        yield client


def test_server_with_batching_serves_concurrent_requests(batching_client) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.server.conftest import audio_duration

    client = batching_client

    def sft_stream(i: int):
        return client.post("/inference_sft", data={"tts_text": f"Hello number {i}.", "spk_id": "英文女"})

    def openai(i: int):
        return client.post(
            "/v1/audio/speech",
            json={"model": "tts-1", "input": f"Hi {i}.", "voice": "nova", "response_format": "wav"},
        )

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(sft_stream, range(3))) + list(pool.map(openai, range(3)))
    for response in responses:
        assert response.status_code == 200, response.text
    assert audio_duration(responses[0].content, "pcm", 22050) > 0
    assert audio_duration(responses[-1].content, "wav") > 0
    info = client.get("/performance_info").json()
    assert "Batching" in str(info)
    metrics = client.get("/metrics").text
    assert "cosyserve_llm_batch_size_count" in metrics
    assert 'cosyserve_engine_wait_seconds_count{stage="queue"}' in metrics
    assert 'cosyserve_engine_wait_seconds_count{stage="join"}' in metrics

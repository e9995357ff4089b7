"""The engine loop on its own: fairness, back-pressure, cancellation, failure isolation,
timeouts, engine-thread calls and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cosyserve.api import SynthesisRequest
from cosyserve.engine.loop import (
    EngineLoop,
    EngineObserver,
    EngineStoppedError,
    RequestState,
    RequestTimeoutError,
    SynthesisFailedError,
)
from cosyserve.errors import CancelledError, QueueFullError
from tests.server.fakes import FakeBackend


def req(text: str = "One. Two.", **kwargs) -> SynthesisRequest:
    return SynthesisRequest(text=text, voice="alice", **kwargs)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_request_completes_with_all_audio() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend)
        handle = engine.submit(req())
        audio, sr = await handle.collect()
        await engine.shutdown(1)
        return handle, audio, sr

    handle, audio, sr = run(main())
    assert sr == backend.sample_rate
    assert len(audio) / sr == pytest.approx(backend.expected_seconds("One. Two."))
    assert handle.state is RequestState.DONE
    assert handle.info is not None and handle.info.segments == ["One.", "Two."]
    assert handle.first_chunk_seconds is not None and handle.first_chunk_seconds <= handle.total_seconds
    assert handle.audio_seconds == pytest.approx(len(audio) / sr)
    # Only the engine thread touched the model.
    assert backend.threads == {"cosyserve-engine"}


def test_round_robin_first_chunks_do_not_wait_for_whole_jobs() -> None:
    backend = FakeBackend(chunks_per_segment=4, step_sleep_s=0.003)

    async def consume(handle, times):
        async for _ in handle:
            times.setdefault(handle.id, []).append(time.perf_counter())

    async def main():
        engine = EngineLoop(backend, max_active=4)
        handles = [engine.submit(req("A. B. C."), request_id=f"r{i}") for i in range(4)]
        times: dict[str, list[float]] = {}
        await asyncio.gather(*(consume(h, times) for h in handles))
        await engine.shutdown(1)
        return times

    times = run(main())
    for rid, stamps in times.items():
        other_last = min(s[-1] for r, s in times.items() if r != rid)
        assert stamps[0] < other_last, f"{rid} waited for another request's whole synthesis"


def test_queue_full_raises_with_retry_after() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend, max_active=1, max_queue=1)
        running = engine.submit(req("[hang]"))
        await asyncio.sleep(0.05)  # admitted: occupies the only slot
        queued = engine.submit(req())
        with pytest.raises(QueueFullError) as info:
            engine.submit(req())
        # Priority (health) requests bypass the bound and run without a free slot.
        probe = engine.submit(req("Hi."), priority=True)
        await probe.collect()
        assert running.state is RequestState.RUNNING and queued.state is RequestState.QUEUED
        running.cancel()
        await queued.collect()
        await engine.shutdown(1)
        return info.value, engine

    error, engine = run(main())
    assert error.retry_after_s >= 1
    assert engine.counters.rejected == 1


def test_cancel_running_job_frees_slot_and_calls_job_cancel() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend, max_active=1)
        hanging = engine.submit(req("[hang] forever"))
        nxt = engine.submit(req("Next."))
        await asyncio.sleep(0.05)
        assert hanging.state is RequestState.RUNNING
        assert nxt.state is RequestState.QUEUED
        hanging.cancel()
        with pytest.raises(CancelledError):
            await hanging.collect()
        audio, _ = await nxt.collect()
        await engine.shutdown(1)
        return hanging, nxt, audio

    hanging, nxt, audio = run(main())
    assert hanging.state is RequestState.CANCELLED
    assert "[hang] forever" in backend.cancelled
    assert nxt.state is RequestState.DONE and len(audio) > 0


def test_cancel_queued_request_frees_queue_slot_at_once() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend, max_active=1, max_queue=1)
        hanging = engine.submit(req("[hang]"))
        await asyncio.sleep(0.05)
        queued = engine.submit(req())
        queued.cancel()
        assert queued.state is RequestState.CANCELLED
        again = engine.submit(req())  # the slot is free again: no QueueFullError
        hanging.cancel()
        await again.collect()
        await engine.shutdown(1)

    run(main())
    assert len(backend.opened) == 2  # the cancelled request never reached the model


def test_failing_job_fails_only_its_request() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend, max_active=4)
        good = engine.submit(req("Good one. Two."))
        bad = engine.submit(req("[fail]"))
        mid = engine.submit(req("[failmid] x."))
        results = await asyncio.gather(good.collect(), bad.collect(), mid.collect(), return_exceptions=True)
        after = await engine.submit(req("After.")).collect()
        await engine.shutdown(1)
        return results, after, bad, mid

    (good_audio, bad_exc, mid_exc), after, bad, mid = run(main())
    assert len(good_audio[0]) > 0 and len(after[0]) > 0
    assert isinstance(bad_exc, SynthesisFailedError) and "exploded" in bad_exc.message
    assert isinstance(mid_exc, SynthesisFailedError)
    assert bad.state is RequestState.FAILED and mid.state is RequestState.FAILED


def test_open_error_keeps_its_status() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend)
        handle = engine.submit(SynthesisRequest(text="x", voice="nobody"))
        with pytest.raises(Exception) as info:
            await handle.collect()
        await engine.shutdown(1)
        return info.value

    error = run(main())
    assert getattr(error, "status_code", None) == 404


def test_request_timeout() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend, request_timeout_s=0.1)
        handle = engine.submit(req("[hang]"))
        with pytest.raises(RequestTimeoutError):
            await handle.collect()
        await engine.shutdown(1)

    run(main())
    assert "[hang]" in backend.cancelled


def test_call_runs_on_engine_thread_between_steps() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend)
        handle = engine.submit(req("[hang]"))
        name = await engine.call(lambda: threading.current_thread().name)
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda: 1 / 0)
        handle.cancel()
        await engine.shutdown(1)
        return name

    assert run(main()) == "cosyserve-engine"


def test_shutdown_lets_work_finish_then_refuses_new() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend)
        handle = engine.submit(req("A. B."))
        collected = asyncio.ensure_future(handle.collect())
        drained = await engine.shutdown(5)
        audio, _ = await collected
        with pytest.raises(EngineStoppedError):
            engine.submit(req())
        return drained, audio, engine

    drained, audio, engine = run(main())
    assert drained and len(audio) > 0
    assert not engine.running


def test_shutdown_timeout_cancels_stuck_requests() -> None:
    backend = FakeBackend()

    async def main():
        engine = EngineLoop(backend, max_active=1)
        stuck = engine.submit(req("[hang]"))
        waiting = engine.submit(req())
        started = time.perf_counter()
        drained = await engine.shutdown(0.2)
        took = time.perf_counter() - started
        errors = await asyncio.gather(stuck.collect(), waiting.collect(), return_exceptions=True)
        return drained, took, errors

    drained, took, errors = run(main())
    assert not drained and took < 3
    assert all(isinstance(e, EngineStoppedError) for e in errors)
    assert "[hang]" in backend.cancelled


def test_observer_hooks() -> None:
    backend = FakeBackend()
    seen: dict[str, list] = {"first": [], "finished": []}

    class Observer(EngineObserver):
        def first_chunk(self, item, seconds):
            seen["first"].append(seconds)

        def finished(self, item):
            seen["finished"].append((item.state, item.audio_seconds, item.rtf))

    async def main():
        engine = EngineLoop(backend, observer=Observer())
        await engine.submit(req()).collect()
        await engine.shutdown(1)

    run(main())
    assert len(seen["first"]) == 1 and seen["first"][0] > 0
    state, audio_s, rtf = seen["finished"][0]
    assert state is RequestState.DONE and audio_s > 0 and rtf > 0

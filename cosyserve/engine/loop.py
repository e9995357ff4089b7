"""The engine loop: one thread owns the backend and steps every active request.

The HTTP layer sees only :meth:`EngineLoop.submit` (→ :class:`RequestHandle`, an async
iterator of :class:`AudioChunk`), :meth:`EngineLoop.call` (run a function on the engine thread,
e.g. ``backend.add_voice``) and :meth:`EngineLoop.shutdown`. Everything about *how* requests
are advanced lives in a :class:`StepPolicy`: :class:`RoundRobinPolicy` calls ``next()`` once on
every active job per step (the embedded voice); the batching policy of
:mod:`cosyserve.engine.batching` runs one batched LLM decode step across all active requests of a
``batchable`` backend.

Life of a request::

    submit ─► QUEUED ──(slot free)──► RUNNING ──► DONE
                 │                       ├──────► FAILED     (exception in the job, timeout)
                 └──────(cancel)─────────┴──────► CANCELLED  (client gone, shutdown)

Results travel back to the asyncio side through a per-request ``asyncio.Queue`` fed with
``loop.call_soon_threadsafe``, so the event loop never waits on inference.

When every active request waits for input that has not arrived (text streamed in: the policy
says so with :meth:`StepPolicy.waiting_for_input`), the thread sleeps instead of stepping; a
request's input (:meth:`~cosyserve.api.SynthesisRequest.subscribe_input`), a new request, a call,
a cancel or the nearest deadline wakes it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from cosyserve.api import AudioChunk, SynthesisInfo, SynthesisRequest
from cosyserve.errors import (
    CancelledError,
    CosyserveError,
    EngineStoppedError,
    QueueFullError,
    RequestTimeoutError,
    SynthesisFailedError,
)
from cosyserve.interfaces import Backend, SynthesisJob

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RequestState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (RequestState.DONE, RequestState.CANCELLED, RequestState.FAILED)


_END = object()  # pushed to a handle's queue after its last chunk


@dataclass(frozen=True)
class _EngineCall:
    """A function queued by :meth:`EngineLoop.call`: ``run`` on the engine thread, or
    ``abort`` with an error when the engine stops first."""

    run: Callable[[], None]
    abort: Callable[[BaseException], None]


@dataclass(eq=False)
class EngineRequest:
    """One request inside the engine. Mutated only by the engine thread, except
    ``cancel_requested`` (set under the engine lock by :meth:`RequestHandle.cancel`)."""

    id: str
    request: SynthesisRequest
    deliver: Callable[[object], None]
    submitted_at: float = field(default_factory=time.perf_counter)
    deadline: float | None = None
    priority: bool = False
    state: RequestState = RequestState.QUEUED
    job: SynthesisJob | None = None
    cancel_requested: bool = False
    started_at: float | None = None
    first_chunk_at: float | None = None
    finished_at: float | None = None
    audio_seconds: float = 0.0
    steps: int = 0
    error: BaseException | None = None

    @property
    def queue_seconds(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.submitted_at

    @property
    def first_chunk_seconds(self) -> float | None:
        """Submit → first audio, queueing included: what the client waits."""
        return None if self.first_chunk_at is None else self.first_chunk_at - self.submitted_at

    @property
    def total_seconds(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return end - self.submitted_at

    @property
    def rtf(self) -> float:
        """Wall-clock real-time factor: submit → finish over audio produced."""
        return self.total_seconds / self.audio_seconds if self.audio_seconds > 0 else math.inf


# --------------------------------------------------------------------------------------------
# Stepping policy: the one place that decides how active jobs advance.
# --------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """What one step did for one request: a chunk (or None: work without audio yet), the end
    of the job, or an exception."""

    item: EngineRequest
    chunk: AudioChunk | None = None
    done: bool = False
    error: BaseException | None = None


class StepPolicy(ABC):
    """How the engine advances its active requests. Runs on the engine thread only."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def start(self, item: EngineRequest) -> None:
        """Admit a request: open its job (cheap; heavy work belongs to steps)."""
        item.job = self.backend.open(item.request)

    @abstractmethod
    def step(self, active: Sequence[EngineRequest]) -> Iterator[StepResult]:
        """Advance the active requests by one unit; yield one result per request touched.

        Results are delivered as they are yielded, so a per-job policy hands each chunk out
        before it computes the next job's.
        """

    def stop(self, item: EngineRequest) -> None:
        """Release a request that will not be stepped again (finished, cancelled, failed)."""
        if item.job is not None:
            item.job.cancel()

    def stats(self) -> dict[str, Any]:
        """Policy-specific figures for /performance_info (empty: nothing beyond the loop's own)."""
        return {}

    def waiting_for_input(self) -> bool:
        """True when no active request can advance until more of its input arrives (the engine
        then sleeps until woken). Called on the engine thread after a step."""
        return False


class RoundRobinPolicy(StepPolicy):
    """One ``next()`` per active job per step, in admission order: a new request's first chunk
    waits for at most one step of each other request, never for their whole synthesis."""

    def step(self, active: Sequence[EngineRequest]) -> Iterator[StepResult]:
        for item in active:
            assert item.job is not None  # noqa: S101 - engine invariant, not user input
            try:
                chunk = next(item.job)
            except StopIteration:
                yield StepResult(item, done=True)
            except Exception as exc:  # noqa: BLE001 - a failing job fails only its request
                yield StepResult(item, error=exc)
            else:
                yield StepResult(item, chunk=chunk)


# --------------------------------------------------------------------------------------------
# Observer hooks (metrics). Called from the engine thread.
# --------------------------------------------------------------------------------------------


class EngineObserver:
    """No-op hooks; :mod:`cosyserve.server.metrics` implements them with Prometheus."""

    def first_chunk(self, item: EngineRequest, seconds: float) -> None:
        """The request's first audio left the engine ``seconds`` after submit."""

    def finished(self, item: EngineRequest) -> None:
        """The request reached DONE, CANCELLED or FAILED."""

    def rejected(self, request: SynthesisRequest) -> None:
        """The queue was full."""


@dataclass
class EngineCounters:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    audio_seconds: float = 0.0
    steps: int = 0


# --------------------------------------------------------------------------------------------
# The asyncio-side handle.
# --------------------------------------------------------------------------------------------


class RequestHandle:
    """The asyncio side of one request: ``async for chunk in handle`` yields its audio; a
    failure is raised from the iteration (a :class:`CosyserveError` with a status code).
    After the end, :attr:`info` holds the job's :class:`SynthesisInfo` and the timing
    properties hold the engine's measurements."""

    def __init__(self, engine: EngineLoop, item: EngineRequest, queue: asyncio.Queue[object]):
        self._engine = engine
        self._item = item
        self._queue = queue
        self._finished = False

    @property
    def id(self) -> str:
        return self._item.id

    @property
    def request(self) -> SynthesisRequest:
        return self._item.request

    @property
    def state(self) -> RequestState:
        return self._item.state

    @property
    def info(self) -> SynthesisInfo | None:
        job = self._item.job
        return None if job is None else job.info

    @property
    def error(self) -> BaseException | None:
        return self._item.error

    @property
    def queue_seconds(self) -> float | None:
        return self._item.queue_seconds

    @property
    def first_chunk_seconds(self) -> float | None:
        return self._item.first_chunk_seconds

    @property
    def total_seconds(self) -> float:
        return self._item.total_seconds

    @property
    def audio_seconds(self) -> float:
        return self._item.audio_seconds

    @property
    def rtf(self) -> float:
        return self._item.rtf

    def cancel(self) -> None:
        """Drop the request (thread-safe, idempotent); the job is released at the next step."""
        self._engine._cancel(self._item)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._finished:
            raise StopAsyncIteration
        obj = await self._queue.get()
        if obj is _END:
            self._finished = True
            raise StopAsyncIteration
        if isinstance(obj, BaseException):
            self._finished = True
            raise obj
        assert isinstance(obj, AudioChunk)  # noqa: S101
        return obj

    async def collect(self) -> tuple[np.ndarray, int]:
        """Wait for the whole synthesis; return (float32 audio, sample rate)."""
        pieces: list[np.ndarray] = []
        sample_rate = self._engine.backend.sample_rate
        async for chunk in self:
            pieces.append(np.asarray(chunk.audio, dtype=np.float32).reshape(-1))
            sample_rate = chunk.sample_rate
        audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return audio, sample_rate


# --------------------------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------------------------


class EngineLoop:
    """Owns ``backend`` on one thread; see the module docstring.

    At most ``max_active + max_queue`` requests are in flight (running or waiting for a slot);
    beyond that :meth:`submit` raises :class:`QueueFullError` (429 with Retry-After).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_active: int = 8,
        max_queue: int = 64,
        request_timeout_s: float | None = None,
        policy: StepPolicy | None = None,
        observer: EngineObserver | None = None,
    ):
        self.backend = backend
        self.max_active = max(1, int(max_active))
        self.max_queue = max(0, int(max_queue))
        self.request_timeout_s = request_timeout_s
        self.policy = policy or RoundRobinPolicy(backend)
        self.observer = observer or EngineObserver()
        self.counters = EngineCounters()

        self._cond = threading.Condition()
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._active: list[EngineRequest] = []  # engine thread only
        self._calls: list[_EngineCall] = []
        self._accepting = True
        self._stop = False
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._duration_ema: float | None = None  # seconds per finished request, for Retry-After
        self._in_flight = 0  # submitted, not finished, not priority (guarded by _cond)
        # Sleeping while every active request waits for input (both guarded by _cond): set after a
        # step that found nothing to do, cleared by anything that may give the loop work.
        self._blocked = False
        self._wakeups = 0

    @classmethod
    def from_settings(cls, backend: Backend, settings: Any, **kwargs: Any) -> EngineLoop:
        return cls(
            backend,
            max_active=settings.max_active,
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
            **kwargs,
        )

    # ---- state -------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "queued": self.queue_depth,
            "active": self.active_count,
            "max_active": self.max_active,
            "max_queue": self.max_queue,
            "policy": type(self.policy).__name__,
            "submitted": c.submitted,
            "completed": c.completed,
            "failed": c.failed,
            "cancelled": c.cancelled,
            "timed_out": c.timed_out,
            "rejected": c.rejected,
            "audio_seconds": round(c.audio_seconds, 3),
            "steps": c.steps,
            **({"batching": policy_stats} if (policy_stats := self.policy.stats()) else {}),
        }

    # ---- asyncio-side API --------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._run, name="cosyserve-engine", daemon=True)
            self._thread.start()

    def submit(
        self, request: SynthesisRequest, *, request_id: str | None = None, priority: bool = False
    ) -> RequestHandle:
        """Queue a validated request; call from the event loop. ``priority`` requests (health
        checks) go first, do not count against ``max_queue`` and do not wait for a slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def deliver(obj: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, obj)

        deadline = None
        if self.request_timeout_s:
            deadline = time.perf_counter() + self.request_timeout_s
        item = EngineRequest(
            id=request_id or uuid.uuid4().hex[:16],
            request=request,
            deliver=deliver,
            deadline=deadline,
            priority=priority,
        )
        self.start()
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down; retry on another instance")
            if not priority and self._in_flight >= self.max_active + self.max_queue:
                self.counters.rejected += 1
                retry = self._retry_after_locked()
                self.observer.rejected(request)
                raise QueueFullError(
                    f"the server is busy ({len(self._active)} requests running, "
                    f"{len(self._waiting)} waiting); retry in {retry:.0f} s",
                    retry_after_s=retry,
                )
            if priority:
                self._waiting.appendleft(item)
            else:
                self._waiting.append(item)
                self._in_flight += 1
            self.counters.submitted += 1
            self._idle.clear()
            self._notify_locked()
        request.subscribe_input(self.wake)
        return RequestHandle(self, item, queue)

    def wake(self) -> None:
        """More input arrived for a request (thread-safe): step again if the loop sleeps."""
        with self._cond:
            self._notify_locked()

    def _notify_locked(self) -> None:
        self._wakeups += 1
        self._blocked = False
        self._cond.notify()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the engine thread between two steps and await its
        result: everything that touches the model (add_voice, warmup) goes through here."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if future.done():  # the caller gave up
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def run() -> None:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(settle, False, exc)
            else:
                loop.call_soon_threadsafe(settle, True, result)

        def abort(exc: BaseException) -> None:
            loop.call_soon_threadsafe(settle, False, exc)

        self.start()
        with self._cond:
            if self._stop:
                raise EngineStoppedError("the engine has stopped")
            self._calls.append(_EngineCall(run, abort))
            self._idle.clear()
            self._notify_locked()
        return await future

    async def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Stop taking work, let in-flight requests finish for up to ``timeout_s``, then cancel
        the rest and stop the thread. Returns True when everything finished in time."""
        with self._cond:
            self._accepting = False
            thread = self._thread
        drained = True
        if thread is not None:
            drained = await asyncio.to_thread(self._idle.wait, timeout_s)
            if not drained:
                logger.warning(
                    "shutdown: %d requests still running after %.1f s; cancelling them",
                    self.active_count + self.queue_depth,
                    timeout_s,
                )
        with self._cond:
            self._stop = True
            self._notify_locked()
        if thread is not None:
            # A job inside a long next() cannot be interrupted; do not hang the process on it.
            await asyncio.to_thread(thread.join, max(1.0, timeout_s))
            if thread.is_alive():
                logger.warning("shutdown: the engine thread is still inside a step; leaving it")
        return drained

    # ---- engine thread -----------------------------------------------------------------

    def _cancel(self, item: EngineRequest) -> None:
        with self._cond:
            if item.state.finished or item.cancel_requested:
                return
            item.cancel_requested = True
            if item.state is RequestState.QUEUED and item in self._waiting:
                # Free the queue slot at once; the engine never saw it.
                self._waiting.remove(item)
                self._finish(item, RequestState.CANCELLED, CancelledError("request cancelled"))
                if not self._waiting and not self._active and not self._calls:
                    self._idle.set()
            else:
                self._notify_locked()

    def _seconds_to_deadline(self) -> float | None:
        """Until the nearest deadline of an active request (None: none has one)."""
        deadlines = [item.deadline for item in self._active if item.deadline is not None]
        return max(0.0, min(deadlines) - time.perf_counter()) if deadlines else None

    def _retry_after_locked(self) -> float:
        per_request = self._duration_ema or 2.0
        waves = (len(self._waiting) + 1) / self.max_active
        return float(min(60, max(1, math.ceil(per_request * waves))))

    def _run(self) -> None:
        logger.debug("engine loop started (policy %s)", type(self.policy).__name__)
        while True:
            with self._cond:
                while not (
                    self._waiting or self._calls or self._stop or (self._active and not self._blocked)
                ):
                    if not self._active:
                        self._idle.set()
                        self._cond.wait()
                    elif not self._cond.wait(self._seconds_to_deadline()):
                        self._blocked = False  # a deadline passed: the step times the request out
                if self._stop:
                    break
                wakeups = self._wakeups
                calls, self._calls = self._calls, []
                admitted: list[EngineRequest] = []
                # Priority requests (health probes) sit at the front and do not wait for a slot:
                # a server busy with long requests is still healthy.
                while self._waiting and (
                    self._waiting[0].priority or len(self._active) + len(admitted) < self.max_active
                ):
                    admitted.append(self._waiting.popleft())
            try:
                self._iterate(calls, admitted)
                waiting = bool(self._active) and self.policy.waiting_for_input()
            except Exception:  # noqa: BLE001 - the loop must survive its own bugs
                logger.exception("engine loop iteration failed; failing the active requests")
                for item in list(self._active):
                    self._fail(item, SynthesisFailedError("internal engine error; see the server log"))
                waiting = False
            if waiting:
                with self._cond:
                    # Input that arrived during the step (a wake-up since it began) means: go on.
                    self._blocked = self._wakeups == wakeups
        self._stop_all()
        logger.debug("engine loop stopped")

    def _iterate(self, calls: list[_EngineCall], admitted: list[EngineRequest]) -> None:
        for call in calls:
            call.run()
        now = time.perf_counter()
        for item in admitted:
            if item.cancel_requested:
                self._finish(item, RequestState.CANCELLED, CancelledError("request cancelled"))
                continue
            if item.deadline is not None and now > item.deadline:
                self._timeout(item)
                continue
            item.state = RequestState.RUNNING
            item.started_at = time.perf_counter()
            try:
                self.policy.start(item)
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                self._fail(item, exc)
                continue
            self._active.append(item)

        # Drop what was cancelled or ran out of time before spending a step on it.
        for item in list(self._active):
            if item.cancel_requested:
                self._drop(item, RequestState.CANCELLED, CancelledError("request cancelled"))
            elif item.deadline is not None and now > item.deadline:
                self._timeout(item)
        if not self._active:
            return

        self.counters.steps += 1
        for result in self.policy.step(list(self._active)):
            self._apply(result)

    def _apply(self, result: StepResult) -> None:
        item = result.item
        if item.state.finished:
            return
        item.steps += 1
        if result.error is not None:
            self._fail(item, result.error)
        elif result.done:
            self._drop(item, RequestState.DONE, _END)
        elif result.chunk is not None and len(result.chunk.audio):
            chunk = result.chunk
            if item.cancel_requested:
                return  # nobody is listening
            if item.first_chunk_at is None:
                item.first_chunk_at = time.perf_counter()
                self.observer.first_chunk(item, item.first_chunk_at - item.submitted_at)
            item.audio_seconds += chunk.duration_s
            self._deliver(item, chunk)

    def _deliver(self, item: EngineRequest, obj: object) -> None:
        try:
            item.deliver(obj)
        except RuntimeError:  # the request's event loop is gone
            item.cancel_requested = True

    def _timeout(self, item: EngineRequest) -> None:
        self.counters.timed_out += 1
        limit = self.request_timeout_s or 0
        self._drop(
            item,
            RequestState.FAILED,
            RequestTimeoutError(
                f"synthesis took longer than the {limit:g} s request timeout; "
                "shorten the text or raise COSYSERVE_REQUEST_TIMEOUT_S"
            ),
        )

    def _fail(self, item: EngineRequest, exc: BaseException) -> None:
        if isinstance(exc, CosyserveError):
            error: BaseException = exc
            logger.info("request %s failed: %s", item.id, exc)
        else:
            logger.error("request %s failed in the backend", item.id, exc_info=exc)
            error = SynthesisFailedError(
                f"synthesis failed ({type(exc).__name__}: {exc}); request id {item.id}"
            )
        self._drop(item, RequestState.FAILED, error)

    def _drop(self, item: EngineRequest, state: RequestState, outcome: object) -> None:
        if item in self._active:
            self._active.remove(item)
        try:
            self.policy.stop(item)
        except Exception:  # noqa: BLE001 - releasing must not take the loop down
            logger.warning("request %s: releasing its job failed", item.id, exc_info=True)
        self._finish(item, state, outcome)

    def _finish(self, item: EngineRequest, state: RequestState, outcome: object) -> None:
        with self._cond:  # also reached from the asyncio thread (cancel while queued)
            if item.state.finished:
                return
            item.state = state
            item.finished_at = time.perf_counter()
            if not item.priority:
                self._in_flight -= 1
            if isinstance(outcome, BaseException):
                item.error = outcome
            c = self.counters
            if state is RequestState.DONE:
                c.completed += 1
                took = item.total_seconds
                ema = self._duration_ema
                self._duration_ema = took if ema is None else 0.8 * ema + 0.2 * took
            elif state is RequestState.FAILED:
                c.failed += 1
            else:
                c.cancelled += 1
            c.audio_seconds += item.audio_seconds
        self._deliver(item, outcome)
        try:
            self.observer.finished(item)
        except Exception:  # noqa: BLE001 - metrics must not break synthesis
            logger.warning("engine observer failed", exc_info=True)

    def _stop_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            calls, self._calls = self._calls, []
        stopped = EngineStoppedError("the server shut down before this request finished")
        for item in waiting:
            self._finish(item, RequestState.CANCELLED, stopped)
        for item in list(self._active):
            self._drop(item, RequestState.CANCELLED, stopped)
        for call in calls:  # let awaiting callers see an error rather than hang
            call.abort(stopped)
        self._idle.set()

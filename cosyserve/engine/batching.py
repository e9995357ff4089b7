"""Continuous batching: one engine step advances every active request together.

Each request is a family's :class:`~cosyserve.interfaces.BatchTask` (a state machine: queued ->
prompt -> llm -> token2wav -> done). This module drives many of them at once, through the
protocols of :mod:`cosyserve.interfaces` only (it imports no family):

* :class:`BatchRunner` owns one ragged KV cache with a row per request that is generating speech
  tokens. Each step it runs **one** batched LLM decode step for all rows, prefills the requests
  that join (left-padded, in one call) and stacks them in, and drops the rows of requests that
  finished a segment or were cancelled. Sampling stays per request (per-request generators).
  A request whose text is streamed in and has none to read (:attr:`BatchTask.waiting`) is parked:
  its rows leave the batch (no decode row is spent on it) and are kept aside until text arrives;
  one with several positions to run at once (text arrived) runs them as one chunk on its own
  rows, then rejoins. :meth:`BatchRunner.blocked` tells the engine when every request waits, so
  it can sleep until input arrives.
* Audio work (a streaming chunk, or a whole non-streaming segment) is queued per request. Each
  step runs **one** flow Euler loop: the most urgent item (overdue work first, so nothing starves;
  then streams' first chunks, for time to first audio; other stream chunks; whole segments; oldest
  request first within a class) together with the other due items of the same batch key, within a
  token budget and ``flow_batch``. Each item prepares its flow inputs on its own, the group shares
  the flow's ``decode``, then each completes its own cross-fades and vocoder. Only items with equal
  keys (equal frame counts, same attention mode) share an estimator call, so that each request's
  mel equals its solo run. One Euler loop per step bounds the step, so the LLM keeps going between
  audio calls.
* :class:`BatchingPolicy` plugs the runner into the engine loop as a
  :class:`~cosyserve.engine.loop.StepPolicy`; :func:`make_policy` picks it for backends that
  declare ``batchable`` and keeps :class:`~cosyserve.engine.loop.RoundRobinPolicy` for the others.

The library's batch-1 path (iterating a task) is the same runner with one task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cosyserve.api import AudioChunk, SynthesisRequest
from cosyserve.engine.loop import RoundRobinPolicy, StepPolicy, StepResult
from cosyserve.interfaces import AudioWork, Backend, BatchTask, KVCache, SpeechLM, SynthesisJob
from cosyserve.runtime.memory import page_out_cold_weights, release_free_memory

if TYPE_CHECKING:
    from cosyserve.engine.loop import EngineRequest

logger = logging.getLogger(__name__)

_EMPTY = np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


@dataclass
class BatchConfig:
    """Per-step limits. ``token_budget``: speech tokens of flow work per step (one item always
    runs, however long); ``flow_batch``: most requests per estimator call (1 = no flow batching);
    ``starvation_s``: audio work waiting longer than this jumps the priority classes."""

    max_batch: int = 8
    token_budget: int = 1024
    flow_batch: int = 8
    starvation_s: float = 15.0
    cache_headroom: int = 256  # KV slots reserved ahead when rows join (growth doubles after)

    def __post_init__(self) -> None:
        self.max_batch = max(1, int(self.max_batch))
        self.token_budget = max(0, int(self.token_budget))
        self.flow_batch = max(1, int(self.flow_batch))


@dataclass
class TaskEvent:
    """What a step did for one task: a chunk (None: work without audio), the end, or an error."""

    task: BatchTask
    chunk: AudioChunk | None = None
    done: bool = False
    error: BaseException | None = None


@dataclass
class StepStats:
    """One runner step, for metrics."""

    llm_batch: int = 0  # requests that got a token this step (decode rows + prefilled joiners)
    prefilled: int = 0  # requests that joined the decode batch
    audio_items: int = 0  # flow/vocoder items run
    flow_calls: int = 0  # Euler loops run (items / flow_calls = flow batch)
    llm_seconds: float = 0.0
    audio_seconds: float = 0.0
    seconds: float = 0.0


class BatchRunner:
    """Steps many :class:`~cosyserve.interfaces.BatchTask` of one backend together (engine thread
    only). The backend declares ``batchable`` and exposes its :class:`~cosyserve.interfaces.SpeechLM`
    as ``backend.llm``."""

    def __init__(
        self,
        backend: Backend,
        config: BatchConfig | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        self.backend = backend
        self.config = config or BatchConfig()
        self.on_step = on_step
        self.llm: SpeechLM = backend.llm  # type: ignore[attr-defined]
        self._tasks: list[BatchTask] = []  # admission order
        self._rows: list[BatchTask] = []  # row i of the KV cache
        self._cache: KVCache | None = None
        self._parked: dict[BatchTask, KVCache] = {}  # rows kept aside (waiting for input, catching up)

    # ---- membership ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def llm_rows(self) -> int:
        return len(self._rows)

    @property
    def parked_rows(self) -> int:
        return len(self._parked)

    def blocked(self) -> bool:
        """Every task waits for input that has not arrived (nothing to set up, decode or vocode):
        the engine can sleep until some arrives."""
        for task in self._tasks:
            if task.needs_setup or task.work:
                return False
            task.poll()
            if not task.waiting:
                return False
        return bool(self._tasks)

    def add(self, task: BatchTask) -> None:
        self._tasks.append(task)

    def remove(self, task: BatchTask) -> None:
        """Forget a task now (finished, cancelled, failed); its KV row is freed at once."""
        if task in self._tasks:
            self._tasks.remove(task)
        self._parked.pop(task, None)
        if task in self._rows:
            self._keep_rows([t for t in self._rows if t is not task])

    def _keep_rows(self, keep: list[BatchTask]) -> None:
        if len(keep) == len(self._rows):
            return
        if not keep or self._cache is None:
            self._rows, self._cache = [], None
            return
        index = {id(t): i for i, t in enumerate(self._rows)}
        self._cache = self._cache.select([index[id(t)] for t in keep])
        self._rows = keep

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> Iterator[TaskEvent]:
        """Advance every task by one unit; events are yielded as soon as they exist."""
        started = time.perf_counter()
        stats = StepStats()
        for task in list(self._tasks):
            try:
                if task.needs_setup:
                    task.setup()
                else:
                    task.poll()
            except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                yield self._fail(task, exc)
            else:
                yield TaskEvent(task)
        yield from self._llm_step(stats)
        yield from self._audio_step(stats)
        for task in list(self._tasks):
            if task.done:
                self.remove(task)
                yield TaskEvent(task, done=True)
        stats.seconds = time.perf_counter() - started
        if self.on_step is not None:
            try:
                self.on_step(stats)
            except Exception:  # noqa: BLE001 - metrics must not break synthesis
                logger.warning("batching metrics hook failed", exc_info=True)

    def _fail(self, task: BatchTask, exc: BaseException) -> TaskEvent:
        self.remove(task)
        return TaskEvent(task, error=exc)

    # ---- LLM -----------------------------------------------------------------------------

    @torch.inference_mode()
    def _llm_step(self, stats: StepStats) -> Iterator[TaskEvent]:
        self._park_rows()
        self._return_parked()
        rows = list(self._rows)
        room = self.config.max_batch - len(rows)
        catching_up = [t for t in self._parked if t.wants_prefill][: max(room, 0)]
        room -= len(catching_up)
        joiners = [t for t in self._tasks if t.wants_prefill and t not in rows and t not in self._parked][
            : max(room, 0)
        ]
        if not rows and not joiners and not catching_up:
            return
        t0 = time.perf_counter()
        sampled: list[tuple[BatchTask, Tensor]] = []
        failed: list[TaskEvent] = []
        if rows:
            assert self._cache is not None  # noqa: S101 - runner invariant
            try:
                logp = self._decode_rows(rows, self._cache)
            except Exception as exc:  # noqa: BLE001 - one request's fault must not fail the batch
                logger.warning(
                    "batched LLM decode failed for %d requests (%s: %s); stepping them one by one",
                    len(rows),
                    type(exc).__name__,
                    exc,
                )
                rows, logps, failures = self._decode_alone(rows)
                for task, error in failures:
                    yield self._fail(task, error)
                sampled += list(zip(rows, logps))
            else:
                sampled += [(t, logp[i]) for i, t in enumerate(rows)]
        for task in catching_up:
            try:
                logp_one = self.llm.prefill_logp(task.take_prefix(), self._parked[task]).float().cpu()
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                failed.append(TaskEvent(task, error=exc))
            else:
                sampled.append((task, logp_one[0]))
        prefixes: list[Tensor] = []
        for task in list(joiners):
            try:
                prefixes.append(task.take_prefix())
            except Exception as exc:  # noqa: BLE001 - a task in a bad state fails alone
                joiners.remove(task)
                yield self._fail(task, exc)
        if joiners:
            try:
                logp_new, cache = self._prefill(prefixes)
                caches = [cache]
            except Exception as exc:  # noqa: BLE001 - as above: find the request that causes it
                logger.warning(
                    "batched LLM prefill failed for %d requests (%s: %s); prefilling them one by one",
                    len(joiners),
                    type(exc).__name__,
                    exc,
                )
                joined: list[tuple[BatchTask, Tensor, KVCache]] = []
                for task, prefix in zip(joiners, prefixes):
                    try:
                        one_logp, one_cache = self._prefill([prefix])
                    except Exception as error:  # noqa: BLE001 - this request alone fails
                        logger.exception("LLM prefill failed for one request")
                        yield self._fail(task, error)
                    else:
                        joined.append((task, one_logp[0], one_cache))
                joiners = [task for task, _, _ in joined]
                logp_new = torch.stack([row for _, row, _ in joined]) if joined else torch.empty(0)
                caches = [c for _, _, c in joined]
            if joiners:
                sampled += [(t, logp_new[i]) for i, t in enumerate(joiners)]
                self._stack_in(caches)
                self._rows = rows + joiners
        llm_seconds = time.perf_counter() - t0
        stats.llm_batch, stats.prefilled, stats.llm_seconds = len(sampled), len(joiners), llm_seconds

        keep: list[BatchTask] = []
        for task, row in sampled:
            task.info.add_stage("llm", llm_seconds)  # wall time this request waited for its token
            try:
                alive = task.accept(row)
            except Exception as exc:  # noqa: BLE001
                failed.append(TaskEvent(task, error=exc))
                continue
            if task in self._parked:
                if not alive:
                    del self._parked[task]  # its segment is done: the rows go
            elif alive:
                keep.append(task)
        self._keep_rows(keep)
        for event in failed:
            yield self._fail(event.task, event.error)  # type: ignore[arg-type]
        for task, _ in sampled:
            if task in self._tasks:
                yield TaskEvent(task)

    def _decode_rows(self, rows: list[BatchTask], cache: KVCache) -> Tensor:
        """One decode step for ``rows`` (the rows of ``cache``) → log-probs ``[B, V]`` on the CPU:
        speech tokens for every row (the common case, the model's fast step), or input embeddings
        where some row feeds something else (text streamed in)."""
        inputs = [t.next_input() for t in rows]
        if all(isinstance(x, int) for x in inputs):
            logp = self.llm.decode_step(torch.tensor(inputs, dtype=torch.long), cache)
        else:
            embedded = [
                self.llm.embed_tokens(torch.tensor([x], dtype=torch.long))[0, 0] if isinstance(x, int) else x
                for x in inputs
            ]
            logp = self.llm.decode_embeddings(torch.stack(embedded).unsqueeze(1), cache)
        return logp.float().cpu()

    def _decode_alone(
        self, rows: list[BatchTask]
    ) -> tuple[list[BatchTask], list[Tensor], list[tuple[BatchTask, BaseException]]]:
        """After a failed batched decode: each row steps alone on its own slice of the cache
        (a failed step leaves the cache as it was: its length advances only at the end). The
        rows that fail alone are returned as failures; the others form the new batch."""
        assert self._cache is not None  # noqa: S101 - runner invariant
        kept: list[BatchTask] = []
        logps: list[Tensor] = []
        caches: list[KVCache] = []
        failures: list[tuple[BatchTask, BaseException]] = []
        for index, task in enumerate(rows):
            cache = self._cache.select([index])
            try:
                logps.append(self._decode_rows([task], cache)[0])
            except Exception as exc:  # noqa: BLE001 - this request alone fails
                logger.exception("LLM decode failed for one request on its own")
                failures.append((task, exc))
                continue
            kept.append(task)
            caches.append(cache)
        self._rows, self._cache = kept, None
        if caches:
            self._stack_in(caches)
        return kept, logps, failures

    def _park_rows(self) -> None:
        """Rows that cannot take one input this step leave the decode batch with their KV rows: a
        task waiting for input, or one with several positions to run (a chunk on its own rows)."""
        leaving = [t for t in self._rows if t.waiting or t.wants_prefill]
        if not leaving:
            return
        assert self._cache is not None  # noqa: S101 - runner invariant
        index = {id(t): i for i, t in enumerate(self._rows)}
        for task in leaving:
            self._parked[task] = self._cache.select([index[id(task)]])
        self._keep_rows([t for t in self._rows if t not in leaving])

    def _return_parked(self) -> None:
        """Parked tasks with exactly one position to run go back into the decode batch."""
        back = [t for t in self._parked if not t.waiting and not t.wants_prefill]
        if back:
            self._stack_in([self._parked.pop(t) for t in back])
            self._rows = self._rows + back

    def _stack_in(self, caches: list[KVCache]) -> None:
        """Append the rows of ``caches`` to the batch's cache (callers extend ``_rows`` to match)."""
        parts = ([self._cache] if self._cache is not None else []) + caches
        if len(parts) == 1:
            self._cache = parts[0]
            return
        self._cache = type(parts[0]).stack(parts, extra_capacity=self.config.cache_headroom)

    def _prefill(self, prefixes: list[Tensor]) -> tuple[Tensor, KVCache]:
        """Left-padded batched prefill of the joining tasks' prefixes → (log-probs, cache)."""
        longest = max(p.shape[1] for p in prefixes)
        pad = [longest - p.shape[1] for p in prefixes]
        lm_input = torch.cat([F.pad(p, (0, 0, n, 0)) for p, n in zip(prefixes, pad)])
        cache = self.llm.new_cache(len(prefixes), longest + self.config.cache_headroom, pad=pad)
        logp = self.llm.prefill_logp(lm_input, cache).float().cpu()
        return logp, cache

    # ---- audio ---------------------------------------------------------------------------

    def _pick_audio(self) -> list[tuple[BatchTask, AudioWork]]:
        """This step's audio work: the most urgent item, plus the other due items of the same
        batch key (one Euler loop) within the token budget and ``flow_batch``. Empty items
        (nothing to vocode) always go along: they cost nothing."""
        now = time.perf_counter()
        cfg = self.config
        heads = [(t, t.work[0]) for t in self._tasks if t.work and not t.done]

        def priority(entry: tuple[BatchTask, AudioWork]) -> tuple[int, int, float]:
            task, work = entry
            if now - work.enqueued_at > cfg.starvation_s:
                return (0, 0, task.info.started_at)  # overdue: oldest request first, whatever kind
            # A stream's first chunk is what its time to first audio waits for.
            kind = (1 if task.has_audio else 0) if work.streaming else 2
            return (1, kind, task.info.started_at)

        heads.sort(key=priority)
        picked = [(t, w) for t, w in heads if not w.tokens]
        real = [(t, w) for t, w in heads if w.tokens]
        if not real:
            return picked
        lead = real[0][1]
        key = lead.batch_key
        group = [real[0]]
        tokens = len(lead.tokens)
        for task, work in real[1:]:
            if len(group) >= cfg.flow_batch:
                break
            if tokens + len(work.tokens) <= cfg.token_budget and work.batch_key == key:
                group.append((task, work))
                tokens += len(work.tokens)
        return picked + group

    def _audio_step(self, stats: StepStats) -> Iterator[TaskEvent]:
        picked = self._pick_audio()
        if not picked:
            return
        t0 = time.perf_counter()
        page_out_cold_weights()  # what the LLM steps just read to grow caches, before the flow's peak
        group: list[tuple[BatchTask, AudioWork]] = []
        for task, work in picked:
            if not work.tokens:  # nothing to vocode (an empty segment)
                yield from self._finish_work(task, work, None)
                continue
            t_prep = time.perf_counter()
            try:
                work.prepared = work.sink.prepare(work.tokens, work.finalize)
            except Exception as exc:  # noqa: BLE001
                yield self._fail(task, exc)
                continue
            task.info.add_stage("token2wav", time.perf_counter() - t_prep)
            group.append((task, work))
        if group:
            yield from self._decode_group(group)
            stats.flow_calls = 1
        # The flow's and vocoder's activations are freed now: hand the heap pages back (CPU).
        release_free_memory()
        stats.audio_items = len(picked)
        stats.audio_seconds = time.perf_counter() - t0

    def _decode_group(self, group: list[tuple[BatchTask, AudioWork]]) -> Iterator[TaskEvent]:
        """One Euler loop for items of equal batch key (no padding: each mel equals its solo run)."""
        t0 = time.perf_counter()
        try:
            mels = group[0][1].sink.flow.decode([w.prepared for _, w in group])
        except Exception as exc:  # noqa: BLE001
            if len(group) == 1:
                logger.exception("flow decode failed for one request")
                yield self._fail(group[0][0], exc)
                return
            # The inputs are prepared (noise drawn): each item alone gives the same mel.
            logger.warning("batched flow decode failed for %d requests (%s); one by one", len(group), exc)
            for entry in group:
                yield from self._decode_group([entry])
            return
        flow_seconds = time.perf_counter() - t0
        for (task, work), mel in zip(group, mels):
            task.info.add_stage("token2wav", flow_seconds)
            yield from self._finish_work(task, work, mel)

    def _finish_work(self, task: BatchTask, work: AudioWork, mel: Tensor | None) -> Iterator[TaskEvent]:
        t0 = time.perf_counter()
        try:
            audio = _EMPTY if mel is None else work.sink.complete(mel, work.finalize)
            chunk = task.finish_work(work, audio, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            yield self._fail(task, exc)
            return
        yield TaskEvent(task, chunk=chunk)


def run_alone(job: SynthesisJob | BatchTask) -> Iterator[AudioChunk | None]:
    """Run one job on the calling thread, one unit of work per item: a batch task through a private
    one-task runner (the code path of batched serving), any other job as it iterates. Closing the
    iterator early cancels the job."""
    if not isinstance(job, BatchTask):
        yield from job
        return
    runner = BatchRunner(job.backend, BatchConfig(max_batch=1, token_budget=0, flow_batch=1))
    runner.add(job)
    try:
        while len(runner):
            chunk: AudioChunk | None = None
            for event in runner.step():
                if event.error is not None:
                    raise event.error
                if event.chunk is not None:
                    chunk = event.chunk
            if chunk is None:
                job.info.processing_seconds = time.perf_counter() - job.info.started_at
            yield chunk
    finally:
        if not job.done:
            job.cancel()


def synthesize_alone(backend: Backend, request: SynthesisRequest) -> np.ndarray:
    """The whole audio of one request, run alone on the calling thread."""
    parts = [chunk.audio for chunk in run_alone(backend.open(request)) if chunk is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# --------------------------------------------------------------------------------------------
# The engine policy
# --------------------------------------------------------------------------------------------


class BatchingStats:
    """Running counters of a :class:`BatchingPolicy` (read by /metrics and /performance_info)."""

    def __init__(self) -> None:
        self.steps = 0
        self.llm_steps = 0
        self.llm_rows = 0  # sum of decode batch sizes
        self.max_llm_batch = 0
        self.prefilled = 0
        self.audio_items = 0
        self.flow_calls = 0
        self.step_seconds = 0.0
        self.llm_seconds = 0.0
        self.audio_seconds = 0.0
        self.last: StepStats | None = None
        self.queue_wait_seconds = 0.0  # submit → engine admission, summed
        self.admitted = 0
        self.join_wait_seconds = 0.0  # engine admission → first LLM token, summed
        self.joined = 0

    def record(self, step: StepStats) -> None:
        self.steps += 1
        self.last = step
        if step.llm_batch or step.prefilled:
            self.llm_steps += 1
        self.llm_rows += step.llm_batch
        self.max_llm_batch = max(self.max_llm_batch, step.llm_batch)
        self.prefilled += step.prefilled
        self.audio_items += step.audio_items
        self.flow_calls += step.flow_calls
        self.step_seconds += step.seconds
        self.llm_seconds += step.llm_seconds
        self.audio_seconds += step.audio_seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "llm_steps": self.llm_steps,
            "mean_llm_batch": round(self.llm_rows / self.llm_steps, 3) if self.llm_steps else 0.0,
            "max_llm_batch": self.max_llm_batch,
            "prefilled": self.prefilled,
            "audio_items": self.audio_items,
            "flow_calls": self.flow_calls,
            "mean_flow_batch": round(self.audio_items / self.flow_calls, 3) if self.flow_calls else 0.0,
            "step_seconds": round(self.step_seconds, 3),
            "llm_seconds": round(self.llm_seconds, 3),
            "audio_seconds": round(self.audio_seconds, 3),
            "last_step_ms": round(1000 * self.last.seconds, 2) if self.last else None,
            "mean_queue_wait_s": round(self.queue_wait_seconds / self.admitted, 4) if self.admitted else None,
            "mean_join_wait_s": round(self.join_wait_seconds / self.joined, 4) if self.joined else None,
        }


class BatchingPolicy(StepPolicy):
    """Steps every active CosyVoice request together through one :class:`BatchRunner`.

    Hooks, called on the engine thread (see :func:`register_prometheus`): ``add_hook(f)`` gets
    each step's :class:`StepStats`; ``add_wait_hook(f)`` gets ``("queue", s)`` when a request is
    admitted (submit → admission) and ``("join", s)`` at its first token (admission → first token,
    i.e. the wait for a prefill slot in the decode batch).
    """

    def __init__(
        self,
        backend: Backend,
        config: BatchConfig | None = None,
        on_step: Callable[[StepStats], None] | None = None,
    ):
        super().__init__(backend)
        self.stats_ = BatchingStats()
        self._hooks: list[Callable[[StepStats], None]] = [self.stats_.record]
        if on_step is not None:
            self._hooks.append(on_step)
        self.runner = BatchRunner(backend, config, on_step=self._on_step)
        self._items: dict[int, EngineRequest] = {}  # id(task) -> engine request
        self._joined: set[int] = set()  # id(task) of requests whose first token was counted
        self._wait_hooks: list[Callable[[str, float], None]] = []

    @property
    def config(self) -> BatchConfig:
        return self.runner.config

    def add_hook(self, hook: Callable[[StepStats], None]) -> None:
        self._hooks.append(hook)

    def add_wait_hook(self, hook: Callable[[str, float], None]) -> None:
        self._wait_hooks.append(hook)

    def _waited(self, kind: str, seconds: float) -> None:
        if kind == "queue":
            self.stats_.queue_wait_seconds += seconds
            self.stats_.admitted += 1
        else:
            self.stats_.join_wait_seconds += seconds
            self.stats_.joined += 1
        for hook in self._wait_hooks:
            try:
                hook(kind, seconds)
            except Exception:  # noqa: BLE001 - metrics must not break synthesis
                logger.warning("batching wait hook failed", exc_info=True)

    def _on_step(self, step: StepStats) -> None:
        for hook in self._hooks:
            hook(step)

    def start(self, item: EngineRequest) -> None:
        task = self.backend.open(item.request)  # type: ignore[attr-defined]
        item.job = task
        self._items[id(task)] = item
        self.runner.add(task)
        if item.queue_seconds is not None:
            self._waited("queue", item.queue_seconds)

    def step(self, active: Sequence[EngineRequest]) -> Iterator[StepResult]:
        for event in self.runner.step():
            item = self._items.get(id(event.task))
            if item is None:
                continue
            if event.error is not None:
                yield StepResult(item, error=event.error)
            elif event.done:
                yield StepResult(item, done=True)
            else:
                first_token = event.task.first_token_at
                if first_token is not None and id(event.task) not in self._joined:
                    self._joined.add(id(event.task))
                    if item.started_at is not None:
                        self._waited("join", first_token - item.started_at)
                yield StepResult(item, chunk=event.chunk)

    def waiting_for_input(self) -> bool:
        return self.runner.blocked()

    def stop(self, item: EngineRequest) -> None:
        task = item.job
        if task is None:
            return
        self._items.pop(id(task), None)
        self._joined.discard(id(task))
        self.runner.remove(task)  # type: ignore[arg-type]
        task.cancel()

    def stats(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "max_batch": cfg.max_batch,
            "token_budget": cfg.token_budget,
            "flow_batch": cfg.flow_batch,
            "llm_rows_now": self.runner.llm_rows,
            "parked_rows_now": self.runner.parked_rows,
            **self.stats_.as_dict(),
        }


def config_from_settings(backend: Backend, settings: Any = None) -> BatchConfig:
    """Limits from settings (``max_batch``, ``token_budget``, ``flow_batch``,
    ``batch_starvation_s``); unset ones get device-aware defaults."""
    max_active = int(getattr(settings, "max_active", 8) or 8)
    cuda = getattr(getattr(backend, "device", None), "type", "cpu") == "cuda"

    def setting(name: str, default: Any) -> Any:
        value = getattr(settings, name, None)
        return default if value is None else value

    return BatchConfig(
        max_batch=setting("max_batch", max_active),
        # GPU: every due item of one key in one estimator call. CPU: the Euler loop costs the same
        # per item at batch 1, 2 or 4 (README, Performance), so batching would only delay the
        # first items: one item per step, most urgent first.
        token_budget=setting("token_budget", 4096 if cuda else 1024),
        flow_batch=setting("flow_batch", max_active if cuda else 1),
        starvation_s=float(setting("batch_starvation_s", 15.0)),
    )


def make_policy(backend: Backend, settings: Any = None) -> StepPolicy:
    """The engine policy for ``backend``: batching for backends that declare ``batchable`` (unless
    ``settings.batching`` is False), round-robin for everything else."""
    if backend.batchable and getattr(settings, "batching", True) is not False:
        config = config_from_settings(backend, settings)
        logger.info(
            "continuous batching: max_batch %d, token budget %d, flow batch %d",
            config.max_batch,
            config.token_budget,
            config.flow_batch,
        )
        return BatchingPolicy(backend, config)  # type: ignore[arg-type]
    return RoundRobinPolicy(backend)


__all__ = [
    "BatchConfig",
    "BatchRunner",
    "BatchingPolicy",
    "StepStats",
    "TaskEvent",
    "config_from_settings",
    "make_policy",
]

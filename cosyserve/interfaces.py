"""What the engine drives and what model families implement.

A :class:`Backend` turns a :class:`~cosyserve.api.SynthesisRequest` into a :class:`SynthesisJob`:
an iterator that yields ``AudioChunk`` objects as audio is made, or ``None`` after a unit of work
that produced no audio yet (so an engine loop can interleave many jobs and cancel between steps).

A backend that declares ``batchable = True`` also hands out :class:`BatchTask` objects, which the
engine's batch runner (:mod:`cosyserve.engine.batching`) steps together with other requests: one
LLM decode step for every generating request (:class:`SpeechLM`), and flow calls shared by audio
work items with equal :attr:`AudioWork.batch_key`. The runner never imports a family; families
implement these protocols.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from cosyserve.api import AudioChunk, PromptAudio, SynthesisInfo, SynthesisRequest, VoiceInfo
from cosyserve.errors import UnsupportedModeError

if TYPE_CHECKING:
    from torch import Tensor


class SynthesisJob(ABC, Iterator["AudioChunk | None"]):
    """One request in progress. Iterate it: each ``next()`` does one unit of work."""

    info: SynthesisInfo

    @abstractmethod
    def __next__(self) -> AudioChunk | None: ...

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Release resources early; the job will not be stepped again."""


class GeneratorJob(SynthesisJob):
    """A job backed by a generator function that yields chunks (or None between work units)."""

    def __init__(self, generator: Iterator[AudioChunk | None], info: SynthesisInfo):
        self._generator = generator
        self.info = info

    def __next__(self) -> AudioChunk | None:
        item = next(self._generator)
        if item is not None:
            self.info.record_chunk(item)
        else:
            self.info.processing_seconds = time.perf_counter() - self.info.started_at
        return item

    def cancel(self) -> None:
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()


class Backend(ABC):
    """A speech model that the engine loop can drive.

    Capabilities are class-level flags (as vLLM's model registry declares them), never discovered
    with ``isinstance`` checks in the engine or the server.
    """

    name: str = "backend"
    family: ClassVar[str] = ""  # the registry name of the model family ("cosyvoice1", "piper", ...)
    batchable: ClassVar[bool] = False  # open() returns BatchTasks that the batch runner can step
    # open() takes a TextStreamRequest: the model reads an utterance's text as it arrives
    accepts_text_stream: ClassVar[bool] = False
    sample_rate: int = 22050
    modes: frozenset[str] = frozenset({"sft"})

    @abstractmethod
    def voices(self) -> list[VoiceInfo]: ...

    @abstractmethod
    def open(self, request: SynthesisRequest) -> SynthesisJob | BatchTask:
        """Validate the request against this backend and start a job (no heavy work here): a
        :class:`BatchTask` when the backend is ``batchable``, else a :class:`SynthesisJob`."""

    def require_mode(self, mode: str) -> None:
        """Refuse a mode this model lacks (before anything else about the request is read)."""
        if mode not in self.modes:
            raise UnsupportedModeError(
                f"the loaded model ({self.name}) does not support {mode}; "
                f"supported: {', '.join(sorted(self.modes))}"
            )

    def check_request(self, request: SynthesisRequest) -> None:
        """Full up-front validation, before any queueing."""
        self.require_mode(request.mode)
        request.validate()

    def describe(self) -> dict[str, Any]:
        """Configuration and state for /performance_info."""
        return {
            "backend": self.name,
            "family": self.family,
            "sample_rate": self.sample_rate,
            "modes": sorted(self.modes),
        }

    def add_voice(self, name: str, prompt: PromptAudio) -> VoiceInfo:
        raise UnsupportedModeError(f"the loaded model ({self.name}) cannot clone voices")

    def delete_voice(self, name: str) -> None:
        raise UnsupportedModeError(f"the loaded model ({self.name}) has no saved voices")

    def warmup_request(self) -> SynthesisRequest:
        """A short request that runs every loaded path (warm-up at start, /health)."""
        voices = self.voices()
        return SynthesisRequest(
            text="Hello, this is a warm-up.", voice=voices[0].id if voices else None, seed=0
        )


# --------------------------------------------------------------------------------------------
# What the batch runner steps (engine/batching.py); families implement it
# --------------------------------------------------------------------------------------------


class KVCache(Protocol):
    """A key/value cache with one row per generating request (rows may have different lengths)."""

    def select(self, rows: Sequence[int]) -> KVCache:
        """The cache of these rows, in this order."""

    @staticmethod
    def stack(caches: Sequence[KVCache], extra_capacity: int = 0) -> KVCache:
        """The rows of ``caches``, one after the other, with room for ``extra_capacity`` more steps."""


class SpeechLM(Protocol):
    """The LLM that turns a prefix into speech tokens, stepped for many requests at once."""

    def new_cache(self, batch: int, capacity: int, pad: Sequence[int] | None = None) -> KVCache: ...

    def prefill_logp(self, prefixes: Tensor, cache: KVCache) -> Tensor:
        """Left-padded prefixes ``[B, L, D]`` into an empty cache -> log-probs ``[B, V]``."""

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """One speech token per row ``[B]`` -> log-probs ``[B, V]`` (the common, fast step)."""

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Speech tokens ``[B]`` -> their input embeddings ``[B, 1, D]``."""

    def decode_embeddings(self, inputs: Tensor, cache: KVCache) -> Tensor:
        """One input embedding per row ``[B, 1, D]`` -> log-probs ``[B, V]``."""


class FlowModel(Protocol):
    """A flow whose Euler loop several requests can share."""

    def decode(self, items: Sequence[Any]) -> list[Tensor]:
        """Prepared items (equal :attr:`AudioWork.batch_key`) -> one mel per item."""


class AudioSink(Protocol):
    """One segment's token -> waveform state, split around the flow's Euler loop."""

    streaming: bool
    flow: FlowModel

    def batch_key(self, tokens: Sequence[int], finalize: bool) -> Any:
        """Items with equal keys share one Euler loop (and match their solo runs exactly)."""

    def prepare(self, tokens: Sequence[int], finalize: bool) -> Any:
        """Per-request flow work before the Euler loop (encoder, noise, caches)."""

    def complete(self, mel: Tensor, finalize: bool) -> np.ndarray:
        """Per-request work after the Euler loop (cross-fades, speed, vocoder) -> samples."""


@dataclass(eq=False)
class AudioWork:
    """One flow + vocoder call a request waits for: a stream chunk or a whole segment."""

    sink: AudioSink
    tokens: list[int]
    finalize: bool  # the segment's last call (the sink flushes everything)
    last: bool  # the request's last audio
    segment: int
    enqueued_at: float = field(default_factory=time.perf_counter)
    prepared: Any = None

    @property
    def streaming(self) -> bool:
        return self.sink.streaming

    @property
    def batch_key(self) -> Any:
        return self.sink.batch_key(self.tokens, self.finalize)


class BatchTask(ABC):
    """One request as the batch runner sees it (families subclass it; see families/base.py). Run
    alone, it goes through a one-task runner (:func:`cosyserve.engine.batching.run_alone`).

    The runner calls :meth:`setup` while :attr:`needs_setup`, prefills :meth:`take_prefix` when
    :attr:`wants_prefill`, then feeds :meth:`next_input` and hands back each log-prob row to
    :meth:`accept` until it returns False (its segment's tokens are done; the KV row is freed).
    A task holding a KV row asks for a prefill again when it has several positions to run at once
    (:attr:`wants_prefill`: they run as one chunk on its own rows). A task :attr:`waiting` for
    input (text streamed in) leaves the decode batch, keeping its KV rows, until input arrives;
    :meth:`poll` hands it what arrived. Audio work appears in :attr:`work`, in output order; the
    runner completes the head with :meth:`finish_work`."""

    backend: Backend  # the backend that opened it
    info: SynthesisInfo
    work: deque[AudioWork]
    first_token_at: float | None

    @property
    @abstractmethod
    def needs_setup(self) -> bool: ...

    @property
    @abstractmethod
    def wants_prefill(self) -> bool: ...

    @property
    @abstractmethod
    def done(self) -> bool: ...

    @property
    def has_audio(self) -> bool:
        return self.info.first_chunk_seconds is not None

    @property
    def waiting(self) -> bool:
        """Nothing to run until more input arrives (its KV rows are kept aside meanwhile)."""
        return False

    def poll(self) -> None:  # noqa: B027 - optional hook
        """Take in the input that arrived since the last step (text streamed in)."""

    @abstractmethod
    def setup(self) -> None: ...

    @abstractmethod
    def take_prefix(self) -> Tensor:
        """The prefix ``[1, L, D]`` to prefill, handed over once."""

    @abstractmethod
    def next_input(self) -> int | Tensor:
        """This row's next input: a speech token id, or an embedding ``[D]``."""

    @abstractmethod
    def accept(self, logp: Tensor) -> bool:
        """One log-prob row ``[V]``; False when the segment's tokens are done."""

    @abstractmethod
    def finish_work(self, work: AudioWork, audio: np.ndarray, seconds: float) -> AudioChunk | None:
        """``work`` (the head of :attr:`work`) is done: the chunk to hand out, if any."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Release resources early; the task will not be stepped again."""


# --------------------------------------------------------------------------------------------
# What an acceleration plan may touch (acceleration/apply.py); families say what that is
# --------------------------------------------------------------------------------------------


@dataclass
class AccelTargets:
    """The parts of a loaded model that acceleration plans replace or tune. A family builds it
    (``backend.accel_targets()``); the acceleration code never reaches into a family's networks."""

    model_dir: Path
    llm: Any  # nn.Module: FP16, int8 linears, a CUDA-graph decode step
    flow: Any  # nn.Module: FP16
    # the flow's sampler: ``.estimator`` (nn.Module), ``.estimator_runner`` hook, ``.solve_euler``,
    # ``.serves_eager_estimator`` (some calls still run the torch estimator once a runner is set)
    cfm: Any
    vocoder: Any  # nn.Module with ``inference``: the allocation policy, ONNX Runtime
    vocoder_blocks: tuple[type, ...] = ()  # its residual blocks (free heap pages go back after each)
    cold_weights: list[Any] = field(default_factory=list)  # read only when a cache grows: paged out
    torchscript: bool = False  # the directory may hold official TorchScript exports of its parts
    graphed_decode: bool = False  # the LLM's decode step can be captured as a CUDA graph (jit plans)
    probe_flow: Callable[[], Any] | None = None  # one short flow call (the FP16 guard's probe)
    extra: dict[str, Any] = field(default_factory=dict)  # what was applied, for describe()

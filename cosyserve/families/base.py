"""What every CosyVoice family shares: the options, the backend's voice handling, and the request
state machine that the batch runner steps.

A request becomes a :class:`SpeechTask`, an explicit state machine::

    QUEUED ─► PROMPT ─► LLM ─► TOKEN2WAV ─► DONE        (CANCELLED from any state)
               (requests with a prompt recording only)

* PROMPT: the prompt recording is encoded (speaker embedding, speech tokens, mel).
* LLM: one text segment at a time, the task holds a prefix to prefill, then takes one sampled
  token per step (:meth:`SpeechTask.accept`); due audio work is queued as it appears (a stream
  chunk when the sink says one is due, a whole segment at its end). The next segment starts as
  soon as the previous one's tokens are done (its audio may still be pending).
* TOKEN2WAV: every token is made; queued audio work remains.
* DONE: the last chunk (``final=True``) is out.

The task does no model call by itself: the engine's batch runner steps it, batched with other
tasks, or alone (:func:`cosyserve.engine.batching.run_alone`: the same code path). What a
segment needs from its family (the LLM prefix, the sampler, the token -> wav sink) comes from
:meth:`FamilyBackend.plan_segment`.

Randomness: two per-request ``torch.Generator`` objects derived from the request's seed, one for
token sampling and one for the flow/vocoder noise, so that how audio work is scheduled relative to
token sampling (batching, priorities) never changes the result, and a seed gives the same speech
tokens whether the request streams or not.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cosyserve.api import AudioChunk, PromptAudio, SynthesisInfo, SynthesisRequest, VoiceInfo
from cosyserve.errors import UnknownVoiceError, UnsupportedModeError
from cosyserve.interfaces import AudioSink, AudioWork, Backend, BatchTask
from cosyserve.nn.sampling import TokenSampler, make_generator
from cosyserve.text.frontend import TextFrontend
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures
from cosyserve.voices.store import VoiceStore


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class FamilyOptions:
    """Runtime knobs of a CosyVoice backend, whatever its family (acceleration plans set these)."""

    device: str = "auto"
    fp16: bool = False  # LLM and flow in half precision (CUDA only); the vocoder stays FP32
    voices_dir: str | Path | None = None  # saved cloned voices; None: `<model_dir>/voices`
    normalizer: str = "wetext"
    # Streaming: tokens in the first chunk's hop (None: the reference's first hop).
    stream_first_hop: int | None = None
    num_threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    # Force exactly N speech tokens per segment (EOS masked until N): benchmarks and tests.
    num_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # accelerations applied, for describe()


@dataclass
class SegmentPlan:
    """What one text segment needs: the LLM prefix, the token sampler and the token -> wav sink."""

    prefix: Tensor | None  # [1, L, D]; None when there is nothing to generate
    sampler: TokenSampler
    sink: AudioSink


class FamilyBackend(Backend):
    """A loaded CosyVoice model of some family: built-in speakers, saved voices, prompt encoding.

    Subclasses set ``family``, ``modes``, ``sample_rate``, :attr:`llm` and implement
    :meth:`plan_segment`; the engine then batches their requests.
    """

    name = "cosyvoice"
    batchable = True

    def __init__(
        self,
        options: FamilyOptions,
        model_dir: Path,
        speakers: dict[str, Tensor],
        prompt_encoder: PromptEncoder,
        text: TextFrontend,
        speaker_languages: dict[str, str] | None = None,
    ):
        self.options = options
        self.model_dir = Path(model_dir)
        self.speakers = speakers
        self.speaker_languages = speaker_languages or {}
        self.prompt_encoder = prompt_encoder
        self.text = text
        self.voice_store = VoiceStore(self._voices_dir(), reserved_names=self.speakers.keys())
        # Installed by an FP16 plan: checks (and may repair) every audio chunk.
        self.audio_guard: Callable[[np.ndarray], np.ndarray] | None = None
        self._lock = threading.Lock()
        self.requests_served = 0

    @property
    def llm(self) -> Any:
        """The family's :class:`~cosyserve.interfaces.SpeechLM`."""
        raise NotImplementedError

    @property
    def flow_device(self) -> torch.device:
        return torch.device("cpu")

    def _voices_dir(self) -> Path:
        if self.options.voices_dir is not None:
            return Path(self.options.voices_dir)
        return self.model_dir / "voices"

    # -- voices ----------------------------------------------------------------------------------

    def voices(self) -> list[VoiceInfo]:
        builtin = [
            VoiceInfo(id=name, kind="sft", language=self.speaker_languages.get(name))
            for name in self.speakers
        ]
        return builtin + self.voice_store.list()

    def add_voice(self, name: str, prompt: PromptAudio) -> VoiceInfo:
        if not self.prompt_encoder.available:
            raise UnsupportedModeError(
                f"voice cloning needs {self.prompt_encoder.required_files} in the model directory"
            )
        features = self.prompt_encoder.encode(prompt)
        saved = self.voice_store.save(name, features, source={"duration_s": round(prompt.duration_s, 2)})
        return saved.info()

    def delete_voice(self, name: str) -> None:
        self.voice_store.delete(name)

    def voice_features(self, voice: str) -> Tensor | PromptFeatures:
        """A built-in speaker's embedding or a saved voice's prompt features."""
        if voice in self.speakers:
            return self.speakers[voice]
        if voice in self.voice_store:
            return self.voice_store.get(voice).features
        available = ", ".join(v.id for v in self.voices())
        raise UnknownVoiceError(f"unknown voice {voice!r}; available voices: {available}")

    # -- requests --------------------------------------------------------------------------------

    def check_request(self, request: SynthesisRequest) -> None:
        super().check_request(request)
        if request.prompt is None and request.voice:
            self.voice_features(request.voice)
        if request.prompt is not None:
            if not self.prompt_encoder.available:
                raise UnsupportedModeError(
                    f"{request.mode} with a prompt recording needs {self.prompt_encoder.required_files} "
                    "in the model directory"
                )
            PromptEncoder.check_prompt(request.prompt)

    def open(self, request: SynthesisRequest, *, num_tokens: int | None = None) -> SpeechTask:
        """Validate ``request`` and return its task (cheap: the work happens in steps).

        ``num_tokens`` forces exactly that many speech tokens per segment (default: the
        backend's ``options.num_tokens``, normally None = the LLM decides).
        """
        self.check_request(request)
        return SpeechTask(self, request, num_tokens=num_tokens)

    def prompt_features(self, request: SynthesisRequest, info: SynthesisInfo) -> PromptFeatures | None:
        """The request's prompt: encoded from its recording, or a saved voice's (None: a built-in
        speaker or no voice)."""
        if request.prompt is not None:
            t0 = time.perf_counter()
            features = self.prompt_encoder.encode(request.prompt)
            info.add_stage("prompt", time.perf_counter() - t0)
            return features
        if request.voice and request.voice not in self.speakers:
            features = self.voice_features(request.voice)
            assert isinstance(features, PromptFeatures)  # noqa: S101 - voice_features' contract
            return features
        return None

    def plan_segment(
        self,
        request: SynthesisRequest,
        segment: str,
        prompt: PromptFeatures | None,
        generators: tuple[torch.Generator, torch.Generator],
        num_tokens: int | None,
    ) -> SegmentPlan:
        """The family's part of a segment: prefix, sampler and sink."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model_dir": str(self.model_dir),
            "speakers": list(self.speakers),
            "saved_voices": len(self.voice_store),
            "zero_shot": self.prompt_encoder.available,
            "prompt_models_loaded": self.prompt_encoder.loaded,
            "stream_first_hop": self.options.stream_first_hop,
            "torch_threads": torch.get_num_threads(),
            "requests_served": self.requests_served,
            **self.options.extra,
        }

    def warmup_request(self) -> SynthesisRequest:
        if self.speakers:
            return SynthesisRequest(text="Hello, this is a warm-up.", voice=next(iter(self.speakers)), seed=0)
        return super().warmup_request()


# ------------------------------------------------------------------------------------------------
# The per-request state machine
# ------------------------------------------------------------------------------------------------


class TaskPhase(str, enum.Enum):
    QUEUED = "queued"  # opened; nothing computed yet
    PROMPT = "prompt"  # encoding the prompt recording
    LLM = "llm"  # generating a segment's speech tokens
    TOKEN2WAV = "token2wav"  # every token made; audio work left
    DONE = "done"
    CANCELLED = "cancelled"


_SEED_MIX = 0x9E3779B97F4A7C15  # splitmix64 increment: decorrelates the derived seed


def request_generators(
    seed: int | None, audio_device: torch.device | str = "cpu"
) -> tuple[torch.Generator, torch.Generator]:
    """(token sampling, flow/vocoder noise) generators for a request; fresh entropy without a seed.

    Sampling runs on the CPU; the noise generator lives on the flow's device (the flow draws its
    noise there)."""
    audio = torch.Generator(device=audio_device)
    if seed is None:
        audio.seed()
        return make_generator(None), audio
    audio.manual_seed((int(seed) * _SEED_MIX + 1) % (2**63))
    return make_generator(int(seed)), audio


class SpeechTask(BatchTask):
    """One request as a state machine (see the module docstring); the engine's batch runner steps
    it through :class:`~cosyserve.interfaces.BatchTask`."""

    def __init__(self, backend: FamilyBackend, request: SynthesisRequest, num_tokens: int | None = None):
        self.backend = backend
        self.request = request
        self.info = SynthesisInfo()
        self.phase = TaskPhase.QUEUED
        self.num_tokens = backend.options.num_tokens if num_tokens is None else num_tokens
        self.generators = request_generators(request.seed, backend.flow_device)
        self.work: deque[AudioWork] = deque()  # audio calls waiting, in output order
        self.last_token: int | None = None  # the decode step's input for this task's row
        self.first_token_at: float | None = None
        self._prompt: PromptFeatures | None = None
        self._segments: Iterator[str] | None = None  # the normalised segments
        self._next_segment: str | None = None  # one segment of lookahead: is this one the last?
        self._segment = -1
        self._sampler: TokenSampler | None = None
        self._prefix: Tensor | None = None  # set while the segment waits for its prefill
        self._sink: Any = None  # the segment's AudioSink
        self._tokens: list[int] = []  # the segment's tokens (non-streaming)
        self.segment_tokens: list[list[int]] = []  # speech tokens made, per segment (tests, debugging)

    # -- state seen by the runner ------------------------------------------------------------

    @property
    def needs_setup(self) -> bool:
        return self.phase in (TaskPhase.QUEUED, TaskPhase.PROMPT)

    @property
    def wants_prefill(self) -> bool:
        return self.phase is TaskPhase.LLM and self._prefix is not None

    @property
    def done(self) -> bool:
        return self.phase is TaskPhase.DONE

    # -- transitions ---------------------------------------------------------------------------

    def setup(self) -> None:
        """One setup transition per call: QUEUED → PROMPT (with a prompt recording) or LLM;
        PROMPT → LLM (the prompt recording is encoded: its own step, it is not cheap)."""
        backend, request = self.backend, self.request
        if self.phase is TaskPhase.QUEUED and request.prompt is not None:
            self.phase = TaskPhase.PROMPT
            return
        self._prompt = backend.prompt_features(request, self.info)
        self._segments = iter(
            backend.text.iter_segments(
                request.text,
                max_text_length=request.max_text_length,
                enable_smart_split=request.enable_smart_split,
            )
        )
        self._next_segment = next(self._segments, None)
        self._open_next_segment()

    def _open_next_segment(self) -> None:
        """Set up the next segment's LLM input, or move on to TOKEN2WAV / DONE at the end."""
        while self._next_segment is not None:
            assert self._segments is not None  # noqa: S101 - set by setup()
            segment = self._next_segment
            self._next_segment = next(self._segments, None)
            self._segment += 1
            self.info.segments.append(segment)
            t0 = time.perf_counter()
            with torch.inference_mode():
                plan = self.backend.plan_segment(
                    self.request, segment, self._prompt, self.generators, self.num_tokens
                )
            self._sampler, self._sink = plan.sampler, plan.sink
            self._tokens = []
            self.segment_tokens.append([])
            if plan.prefix is None or self._sampler.finished:  # nothing to generate: an empty segment
                self._end_segment()
                continue
            self._prefix = plan.prefix
            self.info.add_stage("llm", time.perf_counter() - t0)
            self.phase = TaskPhase.LLM
            return
        self._sampler = None
        self.phase = TaskPhase.TOKEN2WAV if self.work else TaskPhase.DONE

    def take_prefix(self) -> Tensor:
        prefix, self._prefix = self._prefix, None
        if prefix is None:
            raise RuntimeError("this task has no prefix waiting for a prefill")
        return prefix

    def next_input(self) -> int | Tensor:
        if self.last_token is None:
            raise RuntimeError("this task has no token to feed")
        return self.last_token

    def accept(self, logp: Tensor) -> bool:
        """Sample from this request's log-probs row `[V]`; False when its segment's tokens are done
        (the runner then frees its KV row)."""
        assert self._sampler is not None and self._sink is not None  # noqa: S101 - runner invariant
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        token = self._sampler.choose(logp)
        if token is None:  # EOS
            self._end_segment()
            self._open_next_segment()
            return False
        self.last_token = token
        self.info.speech_tokens += 1
        self.segment_tokens[-1].append(token)
        if self._sink.streaming:
            chunk = self._sink.add(token)
            if chunk is not None:
                self._queue(chunk, finalize=False, last=False)
        else:
            self._tokens.append(token)
        if self._sampler.finished:  # max_len reached
            self._end_segment()
            self._open_next_segment()
            return False
        return True

    def _end_segment(self) -> None:
        assert self._sink is not None  # noqa: S101
        tokens = self._sink.remainder() if self._sink.streaming else self._tokens
        self._queue(tokens, finalize=True, last=self._next_segment is None)
        self._tokens = []

    def _queue(self, tokens: list[int], *, finalize: bool, last: bool) -> None:
        assert self._sink is not None  # noqa: S101
        self.work.append(AudioWork(self._sink, list(tokens), finalize, last, max(self._segment, 0)))

    def finish_work(self, work: AudioWork, audio: np.ndarray, seconds: float) -> AudioChunk | None:
        if not self.work or self.work[0] is not work:
            raise RuntimeError("audio work must be finished in the order it was queued")
        self.work.popleft()
        self.info.add_stage("token2wav", seconds)
        if work.last:
            self.phase = TaskPhase.DONE
            with self.backend._lock:
                self.backend.requests_served += 1
        if not audio.size and not work.last:
            return None
        if self.backend.audio_guard is not None:
            audio = self.backend.audio_guard(audio)
        chunk = AudioChunk(
            np.asarray(audio, dtype=np.float32), self.backend.sample_rate, work.segment, work.last
        )
        self.info.record_chunk(chunk)
        return chunk

    def cancel(self) -> None:
        """Release everything; the task will not be stepped again."""
        if self.phase is not TaskPhase.DONE:
            self.phase = TaskPhase.CANCELLED
        self._prefix = None
        self._sink = None
        self._sampler = None
        self.work.clear()

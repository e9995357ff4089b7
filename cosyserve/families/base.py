"""What every CosyVoice family shares: the options, the backend's voice handling, and the request
state machine that the batch runner steps.

A request becomes a :class:`SpeechTask`, an explicit state machine::

    QUEUED ─► PROMPT ─► LLM ─► TOKEN2WAV ─► DONE        (CANCELLED from any state)
               (requests with a prompt recording only)

* PROMPT: the prompt recording is encoded (speaker embedding, speech tokens, mel).
* LLM: one text segment at a time, driven by the segment's :class:`SegmentDecoder` (what to run
  next and what each log-prob row means): a prefix to prefill, then one input position per step
  (:meth:`SpeechTask.accept` takes the row of log-probs that follows it); due audio work is queued
  as it appears (a stream chunk when the sink says one is due, a whole segment at its end). The
  next segment starts as soon as the previous one's tokens are done (its audio may still be
  pending). A request whose text is streamed in (:class:`~cosyserve.api.TextStreamRequest`) is one
  segment whose decoder takes the text as it arrives (:meth:`SpeechTask.poll`); while it waits
  for text it is :attr:`~SpeechTask.waiting` and the runner parks its KV rows.
* TOKEN2WAV: every token is made; queued audio work remains.
* DONE: the last chunk (``final=True``) is out.

The task does no model call by itself: the engine's batch runner steps it, batched with other
tasks, or alone (:func:`cosyserve.engine.batching.run_alone`: the same code path). What a
segment needs from its family (its decoder and its token -> wav sink) comes from
:meth:`FamilyBackend.plan_segment`.

Randomness: two per-request ``torch.Generator`` objects derived from the request's seed, one for
token sampling and one for the flow/vocoder noise, so that how audio work is scheduled relative to
token sampling (batching, priorities) never changes the result, and a seed gives the same speech
tokens whether the request streams or not.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from cosyserve.api import (
    AudioChunk,
    PromptAudio,
    SynthesisInfo,
    SynthesisRequest,
    TextStream,
    TextStreamRequest,
    VoiceInfo,
)
from cosyserve.errors import UnknownVoiceError, UnsupportedModeError
from cosyserve.interfaces import AccelTargets, AudioSink, AudioWork, Backend, BatchTask
from cosyserve.nn.conformer import RelPositionMultiHeadedAttention
from cosyserve.nn.hift import ResBlock
from cosyserve.nn.sampling import TokenSampler, make_generator
from cosyserve.text.frontend import TextFrontend
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures, warmup_prompt
from cosyserve.voices.store import VoiceStore

logger = logging.getLogger(__name__)

# Languages of the seven SFT speakers the official releases name in spk2info.pt, for /list_voices.
SFT_LANGUAGES = {
    "中文女": "zh",
    "中文男": "zh",
    "日语男": "ja",
    "粤语女": "yue",
    "英文女": "en",
    "英文男": "en",
    "韩语女": "ko",
}


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


class SegmentDecoder(ABC):
    """The LLM side of one segment, as :class:`SpeechTask` steps it: which input positions to run
    (a prefill, then one per step) and what the log-probs after each of them mean."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """No more speech tokens will come."""

    @property
    @abstractmethod
    def pending(self) -> int:
        """Input positions that can be run now."""

    @property
    def waiting(self) -> bool:
        """Nothing can be run until more input arrives (text streamed in)."""
        return False

    @abstractmethod
    def take_prefix(self) -> Tensor:
        """Every pending position, embedded ``[1, L, D]`` (run as one chunk)."""

    @abstractmethod
    def next_input(self) -> int | Tensor:
        """One pending position: a speech token id (the common, fast case) or an embedding ``[D]``."""

    @abstractmethod
    def accept(self, logp: Tensor) -> int | None:
        """The log-probs ``[V]`` after the last position run -> the speech token to emit, or None
        (no output at this position, a token that is not speech, the end)."""

    def push_text(self, text: str) -> None:
        """More of the segment's text (text streamed in)."""
        raise UnsupportedModeError("this model does not take text while it speaks")

    def end_text(self) -> None:
        """The segment's text is complete (text streamed in)."""
        raise UnsupportedModeError("this model does not take text while it speaks")


class SampledDecoder(SegmentDecoder):
    """A prefix, then each sampled speech token fed back (CosyVoice v1's decoding)."""

    def __init__(self, prefix: Tensor | None, sampler: TokenSampler):
        self._prefix = prefix
        self.sampler = sampler
        self._last: int | None = None

    @property
    def finished(self) -> bool:
        return self.sampler.finished

    @property
    def pending(self) -> int:
        if self.sampler.finished:
            return 0
        if self._prefix is not None:
            return int(self._prefix.shape[1])
        return 0 if self._last is None else 1

    def take_prefix(self) -> Tensor:
        prefix, self._prefix = self._prefix, None
        if prefix is None:
            raise RuntimeError("this segment's prefix was already taken")
        return prefix

    def next_input(self) -> int:
        if self._last is None:
            raise RuntimeError("this segment has no token to feed")
        return self._last

    def accept(self, logp: Tensor) -> int | None:
        self._last = self.sampler.choose(logp)
        return self._last


@dataclass
class SegmentPlan:
    """What one text segment needs: its decoder (LLM side) and its token -> wav sink."""

    decoder: SegmentDecoder
    sink: AudioSink


class FamilyBackend(Backend):
    """A loaded CosyVoice model of some family: built-in speakers, saved voices, prompt encoding.

    Subclasses set ``family``, ``modes``, ``sample_rate``, :attr:`llm` and implement
    :meth:`plan_segment`; the engine then batches their requests.
    """

    name = "cosyvoice"
    batchable = True
    # The family's directory loader: (model_dir, device=...) -> its loaded model (``files.root``
    # and the ``llm``, ``flow``, ``hift`` networks), kept as :attr:`model`.
    load_directory: ClassVar[Callable[..., Any]]
    # The official directories may hold TorchScript exports of the networks (v1's JIT plan), and
    # the jit plans can capture the LLM's decode step as a CUDA graph (acceleration/jit.py).
    official_torchscript: ClassVar[bool] = False
    graphed_decode: ClassVar[bool] = False
    model: Any

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
        self.voice_store = VoiceStore(
            self._voices_dir(), reserved_names=self.speakers.keys(), family=self.family
        )
        # Installed by an FP16 plan: checks (and may repair) every audio chunk.
        self.audio_guard: Callable[[np.ndarray], np.ndarray] | None = None
        self._lock = threading.Lock()
        self.requests_served = 0

    @classmethod
    def from_dir(cls, model_dir: str | Path, options: FamilyOptions | None = None) -> Any:
        """Load ``model_dir`` (the family's :attr:`load_directory`) and serve it with ``options``."""
        options = options or FamilyOptions()
        if options.num_threads:
            torch.set_num_threads(int(options.num_threads))
        device = pick_device(options.device)
        t0 = time.perf_counter()
        model = cls.load_directory(model_dir, device=device)
        if options.fp16:
            if device.type != "cuda":
                raise UnsupportedModeError("fp16 needs a CUDA device")
            model.llm.half()
            model.flow.half()
        logger.info("model loaded from %s on %s in %.1f s", model_dir, device, time.perf_counter() - t0)
        return cls(model, options)  # type: ignore[call-arg] - every family takes (model, options)

    @property
    def llm(self) -> Any:
        """The family's :class:`~cosyserve.interfaces.SpeechLM`."""
        return self.model.llm

    @property
    def device(self) -> torch.device:
        return next(self.model.llm.parameters()).device

    @property
    def flow_device(self) -> torch.device:
        return next(self.model.flow.parameters()).device

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
        """A built-in speaker's embedding or a saved voice's prompt features (a saved voice of
        another model family is refused: :class:`~cosyserve.voices.store.VoiceFamilyError`)."""
        if voice in self.speakers:
            return self.speakers[voice]
        if voice in self.voice_store:
            return self.voice_store.get(voice).features
        raise self._unknown_voice(voice)

    def resolve_voice(self, voice: str) -> str:
        """The id of ``voice`` (exact name first, then case-insensitive); unknown voices and saved
        voices of another family are refused with a message that says so."""
        if voice in self.speakers:
            return voice
        if voice in self.voice_store:
            return self.voice_store.get(voice).name
        folded = {v.id.casefold(): v.id for v in self.voices()}
        if voice.casefold() in folded:
            return folded[voice.casefold()]
        raise self._unknown_voice(voice)

    def _unknown_voice(self, voice: str) -> UnknownVoiceError:
        available = ", ".join(v.id for v in self.voices()) or "none (save one from a recording)"
        return UnknownVoiceError(f"unknown voice {voice!r}; available voices: {available}")

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

    def segments(self, request: SynthesisRequest) -> Iterator[str | None]:
        """The request's text segments, one LLM run each (lazily normalised); a request whose
        text is streamed in is one segment, ``None``, whose text its decoder takes as it arrives."""
        if isinstance(request, TextStreamRequest):
            return iter([None])
        return iter(
            self.text.iter_segments(
                request.text,
                max_text_length=request.max_text_length,
                enable_smart_split=request.enable_smart_split,
            )
        )

    def plan_segment(
        self,
        request: SynthesisRequest,
        segment: str | None,
        prompt: PromptFeatures | None,
        generators: tuple[torch.Generator, torch.Generator],
        num_tokens: int | None,
    ) -> SegmentPlan:
        """The family's part of a segment (``None``: text streamed in): its decoder and its sink."""
        raise NotImplementedError

    # -- operations ------------------------------------------------------------------------------

    def _probe_flow(self, ids: Tensor, embedding: Tensor, generator: torch.Generator) -> Tensor:
        """One flow call over ``ids`` ``[1, N]`` -> its mel (the FP16 guard's probe)."""
        raise NotImplementedError

    def accel_targets(self) -> AccelTargets:
        model = self.model
        flow = model.flow

        def probe_flow() -> Tensor:
            gen = torch.Generator().manual_seed(0)
            device = next(flow.parameters()).device
            ids = torch.randint(0, flow.cfg.vocab_size, (1, 60), generator=gen).to(device)
            embedding = (
                next(iter(self.speakers.values()))
                if self.speakers
                else torch.randn(1, flow.cfg.spk_embed_dim, generator=gen)
            )
            return self._probe_flow(ids, embedding.to(device), gen)

        return AccelTargets(
            model_dir=Path(model.files.root),
            llm=model.llm,
            flow=flow,
            cfm=flow.decoder,
            vocoder=model.hift,
            vocoder_blocks=(ResBlock,),
            # Read only when a position cache grows (~80 MB full size): not resident between requests.
            cold_weights=[
                m.linear_pos.weight
                for net in (model.llm, flow)
                for m in net.modules()
                if isinstance(m, RelPositionMultiHeadedAttention)
            ],
            torchscript=self.official_torchscript,
            graphed_decode=self.graphed_decode,
            probe_flow=probe_flow,
            extra=self.options.extra,
        )

    def describe(self) -> dict[str, Any]:
        params = {
            name: sum(p.numel() for p in getattr(self.model, name).parameters())
            for name in ("llm", "flow", "hift")
        }
        return {
            **super().describe(),
            "device": str(self.device),
            "precision": "fp16" if self.options.fp16 else "fp32",
            "parameters": params,
            "model_dir": str(self.model_dir),
            "speakers": list(self.speakers),
            "saved_voices": len(self.voice_store.list()),
            "zero_shot": self.prompt_encoder.available,
            "prompt_models_loaded": self.prompt_encoder.loaded,
            "stream_first_hop": self.options.stream_first_hop,
            "torch_threads": torch.get_num_threads(),
            "requests_served": self.requests_served,
            **self.options.extra,
        }

    def warmup_request(self) -> SynthesisRequest:
        """A built-in speaker, else a saved voice, else a generated prompt recording (zero-shot):
        whatever the model has, the request runs every loaded path.

        A short text: a model that babbles (random weights, or a bad one) runs to the length limit
        of its text, and the start-up check should cost no more than a short real synthesis (time,
        and the process's peak memory: README, Performance)."""
        text = "Hello."
        if self.speakers:
            return SynthesisRequest(text=text, voice=next(iter(self.speakers)), seed=0)
        saved = self.voice_store.list()
        if saved:
            return SynthesisRequest(text=text, voice=saved[0].id, seed=0)
        if self.prompt_encoder.available and "zero_shot" in self.modes:
            return SynthesisRequest(text=text, mode="zero_shot", prompt=warmup_prompt(), seed=0)
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
        self.first_token_at: float | None = None
        self._text_stream: TextStream | None = (
            request.text_stream if isinstance(request, TextStreamRequest) else None
        )
        self._prompt: PromptFeatures | None = None
        self._segments: Iterator[str | None] | None = None  # the normalised segments
        self._next_segment: str | None = None  # one segment of lookahead: is this one the last?
        self._more_segments = False
        self._segment = -1
        self._decoder: SegmentDecoder | None = None  # the segment's LLM side
        self._has_row = False  # the segment's positions so far are in a KV cache row
        self._sink: Any = None  # the segment's AudioSink
        self._tokens: list[int] = []  # the segment's tokens (non-streaming)
        self.segment_tokens: list[list[int]] = []  # speech tokens made, per segment (tests, debugging)

    # -- state seen by the runner ------------------------------------------------------------

    @property
    def needs_setup(self) -> bool:
        return self.phase in (TaskPhase.QUEUED, TaskPhase.PROMPT)

    @property
    def wants_prefill(self) -> bool:
        """Positions to run as one chunk: the segment's first ones, or several at once (text
        that arrived while the task waited)."""
        if self.phase is not TaskPhase.LLM or self._decoder is None:
            return False
        pending = self._decoder.pending
        return pending > 1 or (pending == 1 and not self._has_row)

    @property
    def waiting(self) -> bool:
        return self.phase is TaskPhase.LLM and self._decoder is not None and self._decoder.waiting

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
        self._segments = backend.segments(request)
        self._advance_segments()
        self._open_next_segment()

    def _advance_segments(self) -> None:
        assert self._segments is not None  # noqa: S101 - set by setup()
        self._more_segments = True
        try:
            self._next_segment = next(self._segments)
        except StopIteration:
            self._next_segment, self._more_segments = None, False

    def _open_next_segment(self) -> None:
        """Set up the next segment's LLM input, or move on to TOKEN2WAV / DONE at the end."""
        while self._more_segments:
            segment = self._next_segment
            self._advance_segments()
            self._segment += 1
            self.info.segments.append(segment or "")
            t0 = time.perf_counter()
            with torch.inference_mode():
                plan = self.backend.plan_segment(
                    self.request, segment, self._prompt, self.generators, self.num_tokens
                )
            self._decoder, self._sink = plan.decoder, plan.sink
            self._has_row = False
            self._tokens = []
            self.segment_tokens.append([])
            if plan.decoder.finished:  # nothing to generate: an empty segment
                self._end_segment()
                continue
            self.info.add_stage("llm", time.perf_counter() - t0)
            self.phase = TaskPhase.LLM
            self.poll()
            return
        self._decoder = None
        self.phase = TaskPhase.TOKEN2WAV if self.work else TaskPhase.DONE

    def poll(self) -> None:
        """Hand the text that arrived to the decoder once it needs more (text streamed in; a
        stream that pulls from an iterator is read no earlier than the reference reads it)."""
        stream, decoder = self._text_stream, self._decoder
        if stream is None or decoder is None or self.phase is not TaskPhase.LLM or not decoder.waiting:
            return
        text, finished = stream.read()
        if text:
            decoder.push_text(text)
        if finished:
            decoder.end_text()
            self._text_stream = None  # everything is read
            if decoder.finished and not self._has_row:  # the text ended before anything was run
                self._end_segment()
                self._open_next_segment()

    def take_prefix(self) -> Tensor:
        if self._decoder is None:
            raise RuntimeError("this task has no positions waiting to be run")
        self._has_row = True
        return self._decoder.take_prefix()

    def next_input(self) -> int | Tensor:
        if self._decoder is None:
            raise RuntimeError("this task has no input to feed")
        return self._decoder.next_input()

    def accept(self, logp: Tensor) -> bool:
        """The log-probs after this task's last position; False when its segment's tokens are
        done (the runner then frees its KV row)."""
        decoder, sink = self._decoder, self._sink
        assert decoder is not None and sink is not None  # noqa: S101 - runner invariant
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        token = decoder.accept(logp)
        if token is not None:
            self.info.speech_tokens += 1
            self.segment_tokens[-1].append(token)
            if sink.streaming:
                chunk = sink.add(token)
                if chunk is not None:
                    self._queue(chunk, finalize=False, last=False)
            else:
                self._tokens.append(token)
        if decoder.finished:  # EOS, or the length limit
            self._end_segment()
            self._open_next_segment()
            return False
        return True

    def _end_segment(self) -> None:
        assert self._sink is not None  # noqa: S101
        tokens = self._sink.remainder() if self._sink.streaming else self._tokens
        self._queue(tokens, finalize=True, last=not self._more_segments)
        self._tokens = []
        self._has_row = False

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
        self._decoder = None
        self._sink = None
        self.work.clear()

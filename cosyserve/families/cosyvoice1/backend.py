"""The CosyVoice v1 backend: text → segments → speech tokens (LLM) → mel (flow) → waveform (HiFT).

One :class:`CosyVoiceBackend` owns the loaded networks; each request becomes a
:class:`CosyVoiceTask`, an explicit state machine::

    QUEUED ─► PROMPT ─► LLM ─► TOKEN2WAV ─► DONE        (CANCELLED from any state)
               (zero-shot / cross-lingual only)

* PROMPT: the prompt recording is encoded (speaker embedding, speech tokens, mel).
* LLM: one segment at a time, the task holds a prefix to prefill, then takes one sampled token
  per step (:meth:`CosyVoiceTask.accept`); due audio work is queued as it appears (a stream
  chunk every hop, a whole segment at its end). The next segment starts as soon as the previous
  one's tokens are done (its audio may still be pending).
* TOKEN2WAV: every token is made; queued audio work remains.
* DONE: the last chunk (``final=True``) is out.

The task does no model call by itself: a :class:`~cosyserve.engine.batching.BatchRunner` steps
it, batched with other tasks (the engine's ``BatchingPolicy``) or alone (iterating the task, as
``Synthesizer.synthesize`` does, runs a private one-task runner: the same code path).

Randomness: two per-request ``torch.Generator`` objects derived from the request's seed, one for
token sampling and one for the flow/HiFT noise, so that how audio work is scheduled relative to
token sampling (batching, priorities) never changes the result, and a seed gives the same
speech tokens whether the request streams or not.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cosyserve.acceleration.fp16 import guard_chunk
from cosyserve.api import MODES, AudioChunk, PromptAudio, SynthesisInfo, SynthesisRequest, VoiceInfo
from cosyserve.engine.batching import AudioWork, BatchConfig, BatchRunner, ChunkedToken2Wav, WholeToken2Wav
from cosyserve.errors import InvalidRequestError, UnknownVoiceError, UnsupportedModeError
from cosyserve.families.cosyvoice1.llm import TokenSampler, length_limits
from cosyserve.families.cosyvoice1.loader import LoadedModel, load_model_directory
from cosyserve.families.cosyvoice1.token2wav import TOKEN_HOP_LEN
from cosyserve.interfaces import Backend, SynthesisJob
from cosyserve.nn.sampling import make_generator
from cosyserve.text.frontend import TextFrontend
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures
from cosyserve.voices.store import VoiceStore

logger = logging.getLogger(__name__)

# Languages of the seven SFT speakers, for /list_voices.
SFT_LANGUAGES = {
    "中文女": "zh",
    "中文男": "zh",
    "日语男": "ja",
    "粤语女": "yue",
    "英文女": "en",
    "英文男": "en",
    "韩语女": "ko",
}
INSTRUCT_SUFFIX = "<endofprompt>"


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class CosyVoiceOptions:
    """Runtime knobs of the CosyVoice backend (acceleration plans set these)."""

    device: str = "auto"
    fp16: bool = False  # LLM and flow in half precision (CUDA only); HiFT stays FP32
    voices_dir: str | Path | None = None  # saved cloned voices; None: `<model_dir>/voices` if writable
    normalizer: str = "wetext"
    # Streaming: tokens in the first chunk's hop (None: the reference hop of 100 tokens).
    stream_first_hop: int | None = None
    num_threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    # Force exactly N speech tokens per segment (EOS masked until N): benchmarks and tests.
    num_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # accelerations applied, for describe()


@dataclass
class _ModelInputs:
    """What one segment needs, per mode (all tensors on the model device)."""

    text_ids: torch.Tensor
    llm_embedding: torch.Tensor | None
    flow_embedding: torch.Tensor
    prompt_text_ids: torch.Tensor | None = None
    llm_prompt_tokens: torch.Tensor | None = None
    flow_prompt_tokens: torch.Tensor | None = None
    prompt_feat: torch.Tensor | None = None


class CosyVoiceBackend(Backend):
    name = "cosyvoice"
    modes = frozenset(MODES)

    def __init__(self, model: LoadedModel, options: CosyVoiceOptions | None = None):
        self.options = options or CosyVoiceOptions()
        self.model = model
        self.config = model.config
        self.sample_rate = int(model.config.sample_rate)
        self.device = next(model.llm.parameters()).device
        self.text = TextFrontend(normalizer=self.options.normalizer)
        self.prompt_encoder = PromptEncoder(model.files.root, model.config.mel, device="cpu")
        self.speakers = model.speakers
        self.voice_store = VoiceStore(self._voices_dir(), reserved_names=self.speakers.keys())
        self._lock = threading.Lock()
        self.requests_served = 0

    @classmethod
    def from_dir(cls, model_dir: str | Path, options: CosyVoiceOptions | None = None) -> CosyVoiceBackend:
        options = options or CosyVoiceOptions()
        if options.num_threads:
            torch.set_num_threads(int(options.num_threads))
        device = pick_device(options.device)
        t0 = time.perf_counter()
        model = load_model_directory(model_dir, device=device)
        if options.fp16:
            if device.type != "cuda":
                raise UnsupportedModeError("fp16 needs a CUDA device")
            model.llm.half()
            model.flow.half()
        logger.info("model loaded from %s on %s in %.1f s", model_dir, device, time.perf_counter() - t0)
        return cls(model, options)

    def _voices_dir(self) -> Path:
        if self.options.voices_dir is not None:
            return Path(self.options.voices_dir)
        return Path(self.model.files.root) / "voices"

    # -- voices ----------------------------------------------------------------------------------

    def voices(self) -> list[VoiceInfo]:
        builtin = [VoiceInfo(id=name, kind="sft", language=SFT_LANGUAGES.get(name)) for name in self.speakers]
        return builtin + self.voice_store.list()

    def add_voice(self, name: str, prompt: PromptAudio) -> VoiceInfo:
        if not self.prompt_encoder.available:
            raise UnsupportedModeError(
                "voice cloning needs campplus.onnx and speech_tokenizer_v1.onnx in the model directory"
            )
        features = self.prompt_encoder.encode(prompt)
        saved = self.voice_store.save(name, features, source={"duration_s": round(prompt.duration_s, 2)})
        return saved.info()

    def delete_voice(self, name: str) -> None:
        self.voice_store.delete(name)

    # -- requests --------------------------------------------------------------------------------

    def check_request(self, request: SynthesisRequest) -> None:
        super().check_request(request)
        if request.mode in ("sft", "instruct"):
            self._resolve_voice(request.voice or "")
        if request.mode == "instruct" and request.voice not in self.speakers:
            raise InvalidRequestError("instruct mode needs a built-in speaker (spk_id), not a saved voice")
        if request.mode in ("zero_shot", "cross_lingual") and not self.prompt_encoder.available:
            raise UnsupportedModeError(
                f"{request.mode} needs campplus.onnx and speech_tokenizer_v1.onnx in the model directory"
            )
        if request.prompt is not None:
            PromptEncoder.check_prompt(request.prompt)

    def _resolve_voice(self, voice: str) -> torch.Tensor | PromptFeatures:
        if voice in self.speakers:
            return self.speakers[voice]
        if voice in self.voice_store:
            return self.voice_store.get(voice).features
        available = ", ".join(v.id for v in self.voices())
        raise UnknownVoiceError(f"unknown voice {voice!r}; available voices: {available}")

    def open(self, request: SynthesisRequest, *, num_tokens: int | None = None) -> CosyVoiceTask:
        """Validate ``request`` and return its task (cheap: the work happens in steps).

        ``num_tokens`` forces exactly that many speech tokens per segment (default: the
        backend's ``options.num_tokens``, normally None = the LLM decides).
        """
        self.check_request(request)
        return CosyVoiceTask(self, request, num_tokens=num_tokens)

    # -- the pipeline ----------------------------------------------------------------------------

    def _tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([self.text.tokenize(text)], dtype=torch.long, device=self.device)

    def _prompt_features(self, request: SynthesisRequest, info: SynthesisInfo) -> PromptFeatures | None:
        if request.mode in ("zero_shot", "cross_lingual"):
            t0 = time.perf_counter()
            features = self.prompt_encoder.encode(request.prompt)  # type: ignore[arg-type]
            info.add_stage("prompt", time.perf_counter() - t0)
            return features
        if request.mode == "sft" and request.voice not in self.speakers:
            features = self._resolve_voice(request.voice or "")
            assert isinstance(features, PromptFeatures)
            return features
        return None

    def _segment_inputs(
        self, request: SynthesisRequest, segment: str, prompt: PromptFeatures | None
    ) -> _ModelInputs:
        text_ids = self._tokens(segment)
        dev = self.device
        if prompt is not None:  # zero-shot, cross-lingual or a saved voice
            embedding = prompt.embedding.to(dev)
            flow_tokens = prompt.speech_tokens.to(dev)
            feat = prompt.speech_feat.to(dev)
            if request.mode == "cross_lingual" or not prompt.text:
                # Cross-lingual: the LLM sees neither the prompt text nor its speech tokens.
                return _ModelInputs(text_ids, embedding, embedding, None, None, flow_tokens, feat)
            prompt_text = self.text.normalize(prompt.text, split=False)[0]
            return _ModelInputs(
                text_ids, embedding, embedding, self._tokens(prompt_text), flow_tokens, flow_tokens, feat
            )
        embedding = self.speakers[request.voice].to(dev)  # type: ignore[index]
        if request.mode == "instruct":
            # v1 instruct drops the speaker embedding from the LLM (it leaks the timbre) and puts
            # the instruction where a zero-shot prompt text would go.
            instruct = self.text.normalize(request.instruct or "", split=False)[0] + INSTRUCT_SUFFIX
            return _ModelInputs(text_ids, None, embedding, self._tokens(instruct))
        return _ModelInputs(text_ids, embedding, embedding)

    def _sink(
        self, inputs: _ModelInputs, request: SynthesisRequest, generator: torch.Generator
    ) -> ChunkedToken2Wav | WholeToken2Wav:
        """The token → wav half of one segment (streaming or whole)."""
        model = self.model
        args = (model.flow, model.hift, inputs.flow_prompt_tokens, inputs.prompt_feat, inputs.flow_embedding)
        if request.stream:
            return ChunkedToken2Wav(
                *args,
                speed=request.speed,
                generator=generator,
                hop=TOKEN_HOP_LEN,
                first_hop=self.options.stream_first_hop,
            )
        return WholeToken2Wav(*args, speed=request.speed, generator=generator)

    # -- operations ------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        params = {
            name: sum(p.numel() for p in getattr(self.model, name).parameters())
            for name in ("llm", "flow", "hift")
        }
        return {
            **super().describe(),
            "model_dir": str(self.model.files.root),
            "family": cfg.family,
            "device": str(self.device),
            "precision": "fp16" if self.options.fp16 else "fp32",
            "parameters": params,
            "speakers": list(self.speakers),
            "saved_voices": len(self.voice_store),
            "zero_shot": self.prompt_encoder.available,
            "prompt_models_loaded": self.prompt_encoder.loaded,
            "stream_first_hop": self.options.stream_first_hop,
            "torch_threads": torch.get_num_threads(),
            "requests_served": self.requests_served,
            **self.options.extra,
        }

    def warmup(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        voice = next(iter(self.speakers))
        for _ in self.open(SynthesisRequest(text="Hello.", voice=voice, seed=0)):
            pass
        return {"warmed": ["llm", "flow", "hift"], "seconds": round(time.perf_counter() - t0, 3)}


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
    """(token sampling, flow/HiFT noise) generators for a request; fresh entropy without a seed.

    Sampling runs on the CPU; the noise generator lives on the flow's device (the flow draws its
    noise there)."""
    audio = torch.Generator(device=audio_device)
    if seed is None:
        audio.seed()
        return make_generator(None), audio
    audio.manual_seed((int(seed) * _SEED_MIX + 1) % (2**63))
    return make_generator(int(seed)), audio


class CosyVoiceTask(SynthesisJob):
    """One CosyVoice request as a state machine (see the module docstring).

    A :class:`~cosyserve.engine.batching.BatchRunner` calls :meth:`setup`, :meth:`take_prefix`,
    :meth:`accept` and :meth:`finish_work`; iterating the task (``next()``) drives it alone
    through a private runner, one step per call, returning an audio chunk or None.
    """

    def __init__(self, backend: CosyVoiceBackend, request: SynthesisRequest, num_tokens: int | None = None):
        self.backend = backend
        self.request = request
        self.info = SynthesisInfo()
        self.phase = TaskPhase.QUEUED
        self.num_tokens = backend.options.num_tokens if num_tokens is None else num_tokens
        flow_device = next(backend.model.flow.parameters()).device
        self.llm_generator, self.audio_generator = request_generators(request.seed, flow_device)
        self.work: deque[AudioWork] = deque()  # audio calls waiting, in output order
        self.last_token: int | None = None  # the decode step's input for this task's row
        self.first_token_at: float | None = None
        self._prompt: PromptFeatures | None = None
        self._segments: Any = None  # iterator over the normalised segments
        self._next_segment: str | None = None  # one segment of lookahead: is this one the last?
        self._segment = -1
        self._sampler: TokenSampler | None = None
        self._prefix: Tensor | None = None  # set while the segment waits for its prefill
        self._sink: ChunkedToken2Wav | WholeToken2Wav | None = None
        self._tokens: list[int] = []  # the segment's tokens (non-streaming)
        self.segment_tokens: list[list[int]] = []  # speech tokens made, per segment (tests, debugging)
        self._solo: BatchRunner | None = None

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

    @property
    def has_audio(self) -> bool:
        return self.info.first_chunk_seconds is not None

    # -- transitions ---------------------------------------------------------------------------

    def setup(self) -> None:
        """One setup transition per call: QUEUED → PROMPT (zero-shot / cross-lingual) or LLM;
        PROMPT → LLM (the prompt recording is encoded: its own step, it is not cheap)."""
        backend, request = self.backend, self.request
        if self.phase is TaskPhase.QUEUED and request.mode in ("zero_shot", "cross_lingual"):
            self.phase = TaskPhase.PROMPT
            return
        self._prompt = backend._prompt_features(request, self.info)
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
        backend, request = self.backend, self.request
        llm = backend.model.llm
        while self._next_segment is not None:
            segment = self._next_segment
            self._next_segment = next(self._segments, None)
            self._segment += 1
            self.info.segments.append(segment)
            t0 = time.perf_counter()
            inputs = backend._segment_inputs(request, segment, self._prompt)
            lo, hi = length_limits(int(inputs.text_ids.numel()), llm.cfg)
            if self.num_tokens is not None:
                lo = hi = int(self.num_tokens)
            self._sampler = TokenSampler(llm.eos_id, lo, hi, self.llm_generator, llm.cfg.sampling)
            self._sink = backend._sink(inputs, request, self.audio_generator)
            self._tokens = []
            self.segment_tokens.append([])
            if self._sampler.finished:  # nothing to generate: an empty segment
                self._end_segment()
                continue
            with torch.inference_mode():
                self._prefix = llm.build_prefix(
                    inputs.text_ids, inputs.prompt_text_ids, inputs.llm_prompt_tokens, inputs.llm_embedding
                )
            self.info.add_stage("llm", time.perf_counter() - t0)
            self.phase = TaskPhase.LLM
            return
        self._sampler = None
        self.phase = TaskPhase.TOKEN2WAV if self.work else TaskPhase.DONE

    def take_prefix(self) -> Tensor:
        """The segment's LLM prefix `[1, L, D]`, handed over once to be prefilled."""
        prefix, self._prefix = self._prefix, None
        if prefix is None:
            raise RuntimeError("this task has no prefix waiting for a prefill")
        return prefix

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
        if isinstance(self._sink, ChunkedToken2Wav):
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
        tokens = self._sink.remainder() if isinstance(self._sink, ChunkedToken2Wav) else self._tokens
        self._queue(tokens, finalize=True, last=self._next_segment is None)
        self._tokens = []

    def _queue(self, tokens: list[int], *, finalize: bool, last: bool) -> None:
        assert self._sink is not None  # noqa: S101
        self.work.append(AudioWork(self._sink, list(tokens), finalize, last, max(self._segment, 0)))

    def finish_work(self, work: AudioWork, audio: np.ndarray, seconds: float) -> AudioChunk | None:
        """The runner finished ``work`` (the head of :attr:`work`): the chunk to hand out, if any."""
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
        audio = guard_chunk(self.backend, audio)  # FP16 plans: NaN/silence switches the flow to FP32
        chunk = AudioChunk(
            np.asarray(audio, dtype=np.float32), self.backend.sample_rate, work.segment, work.last
        )
        self.info.record_chunk(chunk)
        return chunk

    # -- SynthesisJob: the batch-1 path --------------------------------------------------------

    def __next__(self) -> AudioChunk | None:
        if self.phase is TaskPhase.CANCELLED:
            raise StopIteration
        if self._solo is None:
            self._solo = BatchRunner(self.backend, BatchConfig(max_batch=1, token_budget=0, flow_batch=1))
            self._solo.add(self)
        if not len(self._solo):
            raise StopIteration
        chunk: AudioChunk | None = None
        for event in self._solo.step():
            if event.error is not None:
                self.phase = TaskPhase.CANCELLED
                raise event.error
            if event.chunk is not None:
                chunk = event.chunk
        if chunk is None:
            if not len(self._solo):
                raise StopIteration
            self.info.processing_seconds = time.perf_counter() - self.info.started_at
        return chunk

    def cancel(self) -> None:
        """Release everything; the task will not be stepped again."""
        if self.phase is not TaskPhase.DONE:
            self.phase = TaskPhase.CANCELLED
        self._solo = None
        self._prefix = None
        self._sink = None
        self._sampler = None
        self.work.clear()

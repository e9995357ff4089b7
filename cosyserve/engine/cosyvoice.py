"""The CosyVoice v1 backend: text → segments → speech tokens (LLM) → mel (flow) → waveform (HiFT).

One :class:`CosyVoiceBackend` owns the loaded networks; each request becomes a
:class:`~cosyserve.engine.types.GeneratorJob` whose every ``next()`` does one small unit of work
(prompt encoding, one LLM decode step, one flow+vocoder chunk), so the engine loop can interleave
requests and cancel between steps. Randomness comes from one per-request ``torch.Generator``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyserve.engine.token2wav import StreamingToken2Wav, token2wav
from cosyserve.engine.types import (
    MODES,
    AudioChunk,
    Backend,
    GeneratorJob,
    PromptAudio,
    SynthesisInfo,
    SynthesisJob,
    SynthesisRequest,
    VoiceInfo,
)
from cosyserve.errors import InvalidRequestError, UnknownVoiceError, UnsupportedModeError
from cosyserve.frontend.prompt import PromptEncoder, PromptFeatures
from cosyserve.frontend.text import TextFrontend
from cosyserve.frontend.voices import VoiceStore
from cosyserve.models.llm import make_generator
from cosyserve.models.loader import LoadedModel, load_model_directory

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

    def open(self, request: SynthesisRequest) -> SynthesisJob:
        self.check_request(request)
        info = SynthesisInfo()
        return GeneratorJob(self._run(request, info), info)

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

    def _run(self, request: SynthesisRequest, info: SynthesisInfo) -> Iterator[AudioChunk | None]:
        generator = make_generator(request.seed)
        prompt = self._prompt_features(request, info)
        if prompt is not None:
            yield None
        segments = self.text.iter_segments(
            request.text,
            max_text_length=request.max_text_length,
            enable_smart_split=request.enable_smart_split,
        )
        index = -1
        pending: AudioChunk | None = None  # held back one step so the last chunk can say final=True
        for index, segment in enumerate(segments):
            info.segments.append(segment)
            inputs = self._segment_inputs(request, segment, prompt)
            for audio in self._synthesize_segment(inputs, request, generator, info):
                if audio is None:
                    yield None
                    continue
                if pending is not None:
                    yield pending
                pending = AudioChunk(audio, self.sample_rate, segment=index)
        if pending is None:
            pending = AudioChunk(np.zeros(0, np.float32), self.sample_rate, segment=max(index, 0))
        pending.final = True
        with self._lock:
            self.requests_served += 1
        yield pending

    def _synthesize_segment(
        self,
        inputs: _ModelInputs,
        request: SynthesisRequest,
        generator: torch.Generator,
        info: SynthesisInfo,
    ) -> Iterator[np.ndarray | None]:
        """Yield float32 audio arrays for one segment, or None after each unit of work."""
        model = self.model
        tokens_iter = model.llm.generate(
            inputs.text_ids,
            prompt_text_ids=inputs.prompt_text_ids,
            prompt_speech_tokens=inputs.llm_prompt_tokens,
            embedding=inputs.llm_embedding,
            generator=generator,
        )
        flow_kwargs = dict(
            prompt_tokens=inputs.flow_prompt_tokens,
            prompt_feat=inputs.prompt_feat,
            embedding=inputs.flow_embedding,
            speed=request.speed,
            generator=generator,
        )
        streamer = (
            StreamingToken2Wav(model.flow, model.hift, first_hop=self.options.stream_first_hop, **flow_kwargs)
            if request.stream
            else None
        )
        tokens: list[int] = []
        while True:
            t0 = time.perf_counter()
            token = next(tokens_iter, None)
            info.add_stage("llm", time.perf_counter() - t0)
            if token is None:
                break
            tokens.append(token)
            info.speech_tokens += 1
            if streamer is None:
                yield None
                continue
            t0 = time.perf_counter()
            ready = streamer.push([token])
            if ready:
                info.add_stage("token2wav", time.perf_counter() - t0)
                yield from ready
            else:
                yield None
        t0 = time.perf_counter()
        if streamer is not None:
            tail = streamer.finish()
            info.add_stage("token2wav", time.perf_counter() - t0)
            if len(tail):
                yield tail
            return
        if not tokens:
            return
        speech = token2wav(model.flow, model.hift, torch.tensor([tokens], device=self.device), **flow_kwargs)
        info.add_stage("token2wav", time.perf_counter() - t0)
        yield speech

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
        job = self.open(SynthesisRequest(text="Hello.", voice=voice, seed=0))
        for _ in job:
            pass
        return {"warmed": ["llm", "flow", "hift"], "seconds": round(time.perf_counter() - t0, 3)}

"""The CosyVoice3 backend: text -> segments -> speech tokens (Qwen2 LLM) -> mel (DiT flow) -> 24 kHz
waveform (causal HiFT).

One :class:`CosyVoice3Backend` owns the loaded networks; the request state machine, the batching
and the voice handling are the families' shared :mod:`cosyserve.families.base` and the engine's.
This module says what a CosyVoice3 segment is made of (:meth:`CosyVoice3Backend.plan_segment`):

* the LLM input per mode, from :class:`~.frontend.CosyVoice3Frontend` (every LLM input carries
  ``<|endofprompt|>``; text without one gets the reference's system prompt; tags, phones and
  pinyin pass through to the tokenizer):

  - ``zero_shot``: a prompt recording and its transcript (LLM prompt text and speech tokens);
  - ``cross_lingual``: a prompt recording's voice only (the flow keeps the prompt);
  - ``instruct2``: a voice (recording or saved) directed by an instruction;
  - a saved voice by name (what ``sft`` requests mean here: there are no built-in speakers)
    speaks as zero-shot with its transcript, as cross-lingual without one;

* the token sampler: the reference's unistream decoding (:class:`DecodeStateSampler` over
  :class:`~cosyserve.families.cosyvoice2.llm.UnistreamDecoder`: stop ids 6561..6760, its
  ``ignore_eos`` quirk) with repetition-aware sampling from the request's generator;
* the sink: :class:`~.token2wav.WholeToken2Wav` or, streaming, :class:`~.token2wav.ChunkedToken2Wav`
  (the flow re-run over all tokens so far, the causal vocoder's caches kept), behind the
  reference's silent-token filter.

Voice conversion (:meth:`CosyVoice3Backend.convert_voice`, upstream ``inference_vc``): a source
recording's speech tokens spoken in another voice, no LLM; a :class:`VoiceConversionTask` runs it
through the same runner and sinks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cosyserve.api import PromptAudio, SynthesisRequest
from cosyserve.errors import InvalidRequestError, UnsupportedModeError
from cosyserve.families.base import (
    FamilyBackend,
    FamilyOptions,
    SegmentPlan,
    SpeechTask,
    TaskPhase,
    pick_device,
)
from cosyserve.families.cosyvoice2.frontend import ModelInput
from cosyserve.families.cosyvoice2.llm import DecodeStateSampler, SpeechTokenSampler
from cosyserve.families.cosyvoice3.frontend import CosyVoice3Frontend
from cosyserve.families.cosyvoice3.hift import CausalResBlock
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM
from cosyserve.families.cosyvoice3.loader import LoadedModel, load_model_directory
from cosyserve.families.cosyvoice3.token2wav import ChunkedToken2Wav, WholeToken2Wav
from cosyserve.interfaces import AccelTargets
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures

logger = logging.getLogger(__name__)

MODES = frozenset({"zero_shot", "cross_lingual", "instruct2"})
WARMUP_TEXT = "Hello, this is a warm-up."
WARMUP_TRANSCRIPT = "Hello."

Sink = WholeToken2Wav | ChunkedToken2Wav


def warmup_prompt(seconds: float = 2.0, sample_rate: int = 16000) -> PromptAudio:
    """A generated prompt recording (a voiced, vowel-like harmonic tone with a slow pitch glide and
    syllable-rate loudness) for warm-up and /health on models without built-in speakers."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = 120.0 + 20.0 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / sample_rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 9))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t) ** 2
    audio = 0.1 * envelope * harmonics
    return PromptAudio(audio.astype(np.float32), sample_rate, WARMUP_TRANSCRIPT)


class VoiceConversionTask(SpeechTask):
    """Voice conversion as the batch runner steps it (upstream ``inference_vc``): setup encodes the
    source recording's speech tokens and the target voice, then the tokens go straight to the
    sink (no LLM, no silent-token filter, the prompt not trimmed to 2 frames per token)."""

    backend: CosyVoice3Backend

    def __init__(self, backend: CosyVoice3Backend, request: SynthesisRequest, source: PromptAudio):
        super().__init__(backend, request)
        self.source = source

    def setup(self) -> None:
        if self.phase is TaskPhase.QUEUED:
            self.phase = TaskPhase.PROMPT  # the recordings are encoded in a step of their own
            return
        backend, request = self.backend, self.request
        prompt = backend.prompt_features(request, self.info)
        if prompt is None:
            raise InvalidRequestError(
                "voice conversion needs a target voice: a prompt recording or a saved voice"
            )
        t0 = time.perf_counter()
        tokens = backend.prompt_encoder.source_tokens(self.source).reshape(-1).tolist()
        self.info.add_stage("prompt", time.perf_counter() - t0)
        sink = backend.make_sink(request, backend.frontend.vc(tokens, prompt), drop_silent=False)
        self._segment, self._sink = 0, sink
        self.info.segments.append("")
        self.segment_tokens.append(tokens)
        self.info.speech_tokens += len(tokens)
        if sink.streaming:
            for token in tokens:
                chunk = sink.add(token)
                if chunk is not None:
                    self._queue(chunk, finalize=False, last=False)
        else:
            self._tokens = tokens
        self._end_segment()
        self.phase = TaskPhase.TOKEN2WAV


class CosyVoice3Backend(FamilyBackend):
    """A loaded Fun-CosyVoice3 model (see the module docstring)."""

    name = "cosyvoice3"
    family = "cosyvoice3"
    modes = MODES

    def __init__(self, model: LoadedModel, options: FamilyOptions | None = None):
        options = options or FamilyOptions()
        self.frontend = CosyVoice3Frontend(model.tokenizer, normalizer=options.normalizer)
        super().__init__(
            options,
            model_dir=model.files.root,
            speakers={},
            # Features are kept untrimmed: each mode trims them as the reference does (vc does not).
            prompt_encoder=PromptEncoder(
                model.files.root,
                model.config.mel,
                device="cpu",
                speech_tokenizer_file=model.files.speech_tokenizer.name,
            ),
            text=self.frontend,  # type: ignore[arg-type]  # segments with tags held out of TN
        )
        self.model = model
        self.config = model.config
        self.sample_rate = int(model.config.sample_rate)
        self.device = model.llm.device

    @classmethod
    def from_dir(cls, model_dir: str | Path, options: FamilyOptions | None = None) -> CosyVoice3Backend:
        options = options or FamilyOptions()
        if options.num_threads:
            torch.set_num_threads(int(options.num_threads))
        device = pick_device(options.device)
        if options.fp16 and device.type != "cuda":
            raise UnsupportedModeError("fp16 needs a CUDA device")
        t0 = time.perf_counter()
        model = load_model_directory(model_dir, device=device)
        if options.fp16:
            model.llm.half()
            model.flow.half()
        logger.info("CosyVoice3 loaded from %s on %s in %.1f s", model_dir, device, time.perf_counter() - t0)
        return cls(model, options)

    @property
    def llm(self) -> CosyVoice3LM:
        return self.model.llm

    @property
    def flow_device(self) -> torch.device:
        return next(self.model.flow.parameters()).device

    # -- requests --------------------------------------------------------------------------------

    def require_mode(self, mode: str) -> None:
        if mode == "sft":
            return  # a voice by name: with no built-in speakers, a saved voice (checked per request)
        super().require_mode(mode)

    def check_request(self, request: SynthesisRequest) -> None:
        if request.mode == "sft" and request.voice and request.voice not in self.voice_store:
            raise UnsupportedModeError(
                f"CosyVoice3 has no built-in speakers, and {request.voice!r} is not a saved voice: send a "
                "prompt recording (zero-shot, cross-lingual, instruct2) or save one with POST /v1/voices"
            )
        super().check_request(request)

    def warmup_request(self) -> SynthesisRequest:
        """A short zero-shot request with a generated prompt recording (no built-in speakers)."""
        return SynthesisRequest(text=WARMUP_TEXT, mode="zero_shot", prompt=warmup_prompt(), seed=0)

    # -- the pipeline ----------------------------------------------------------------------------

    def model_input(self, request: SynthesisRequest, segment: str, prompt: PromptFeatures) -> ModelInput:
        """What the reference's frontend hands the model for one (already normalised) segment."""
        frontend = self.frontend
        if request.mode == "instruct2":
            inputs = frontend.instruct2(segment, request.instruct or "", prompt, text_frontend=False)
        elif request.mode == "cross_lingual" or not prompt.text:
            inputs = frontend.cross_lingual(segment, prompt, text_frontend=False)
        else:  # zero-shot, or a saved voice with its transcript
            transcript = frontend.prompt_text(prompt.text)  # normalised unless it has <|...|>
            inputs = frontend.zero_shot(segment, transcript, prompt, text_frontend=False)
        return inputs[0]

    def token_sampler(self, generator: torch.Generator) -> SpeechTokenSampler:
        """The per-segment output chooser (tests replay recorded draws through it)."""
        return SpeechTokenSampler(self.llm.cfg.sampling, generator)

    def make_sink(self, request: SynthesisRequest, inputs: ModelInput, drop_silent: bool = True) -> Sink:
        """The segment's token -> waveform sink (``drop_silent``: the tokens come from the LLM)."""
        model, device = self.model, self.flow_device
        feat = inputs.prompt_speech_feat
        embedding = inputs.flow_embedding
        if embedding is None:
            raise InvalidRequestError("CosyVoice3 needs a voice: a prompt recording or a saved voice")
        args = (
            model.flow,
            model.hift,
            model.noise,
            inputs.flow_prompt_speech_tokens.to(device),
            None if feat is None else feat.to(device),
            embedding.to(device),
        )
        if request.stream:
            return ChunkedToken2Wav(*args, speed=request.speed, drop_silent=drop_silent)
        return WholeToken2Wav(*args, speed=request.speed, drop_silent=drop_silent)

    def plan_segment(
        self,
        request: SynthesisRequest,
        segment: str,
        prompt: PromptFeatures | None,
        generators: tuple[torch.Generator, torch.Generator],
        num_tokens: int | None,
    ) -> SegmentPlan:
        if prompt is None:  # check_request makes every request name a voice
            raise InvalidRequestError("CosyVoice3 needs a voice: a prompt recording or a saved voice")
        inputs = self.model_input(request, segment, prompt)
        llm = self.llm
        state = llm.unistream(
            inputs.text_ids or [],
            inputs.prompt_text_ids,
            inputs.llm_prompt_speech_tokens,
            num_tokens=num_tokens,
        )
        sampler = DecodeStateSampler(state, self.token_sampler(generators[0]))
        prefix = None if state.done else llm.embed_inputs(state.take_inputs()).unsqueeze(0)
        return SegmentPlan(prefix, sampler, self.make_sink(request, inputs))  # type: ignore[arg-type]

    # -- voice conversion ------------------------------------------------------------------------

    def convert_voice(
        self,
        source: PromptAudio,
        *,
        voice: str | None = None,
        prompt: PromptAudio | None = None,
        stream: bool = False,
        speed: float = 1.0,
    ) -> VoiceConversionTask:
        """Speak the source recording's content in a voice (a prompt recording, or a saved voice):
        the reference's ``inference_vc``. Run the task like any other (``run_alone``, the engine)."""
        if (prompt is None) == (voice is None):
            raise InvalidRequestError(
                "voice conversion needs one target voice: a prompt recording or a saved voice"
            )
        if not self.prompt_encoder.available:
            raise UnsupportedModeError(f"voice conversion needs {self.prompt_encoder.required_files}")
        PromptEncoder.check_prompt(source)
        # Carries the target voice and the options (its text is not read): a saved voice by name,
        # or a recording whose transcript does not matter.
        request = SynthesisRequest(
            text="(voice conversion)",
            voice=voice,
            mode="sft" if prompt is None else "cross_lingual",
            prompt=prompt,
            stream=stream,
            speed=speed,
        )
        self.check_request(request)
        return VoiceConversionTask(self, request, source)

    # -- operations ------------------------------------------------------------------------------

    def accel_targets(self) -> AccelTargets:
        model = self.model
        flow = model.flow

        def probe_flow() -> torch.Tensor:
            gen = torch.Generator().manual_seed(0)
            device = next(flow.parameters()).device
            ids = torch.randint(0, flow.cfg.vocab_size, (1, 60), generator=gen).to(device)
            embedding = torch.randn(1, flow.cfg.spk_embed_dim, generator=gen).to(device)
            return flow.inference(ids, embedding=embedding)

        return AccelTargets(
            model_dir=Path(model.files.root),
            llm=model.llm,  # its Qwen2 linears: int8, FP16
            flow=flow,
            cfm=flow.decoder,  # the DiT estimator: ONNX Runtime, TensorRT, int8
            vocoder=model.hift,
            vocoder_blocks=(CausalResBlock,),
            torchscript=False,  # the published directory ships no TorchScript parts
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
            "estimator_onnx": self.model.files.estimator_onnx is not None,
            "voice_conversion": self.prompt_encoder.available,
        }

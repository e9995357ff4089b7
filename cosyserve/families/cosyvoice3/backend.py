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
  - a saved voice by name (``sft`` requests: the published model has no built-in speakers)
    speaks as zero-shot with its transcript, as cross-lingual without one; a directory with a
    ``spk2info.pt`` also has built-in speakers (the embedding alone, text as in cross-lingual);

* the decoder (:class:`~cosyserve.families.cosyvoice2.backend.StateDecoder`, shared with
  CosyVoice2): the reference's decoding state machine, the whole text at once (unistream: stop ids
  6561..6760, its ``ignore_eos`` quirk) or text streamed in (bistream, for a
  :class:`~cosyserve.api.TextStreamRequest`: the prompt text up to ``<|endofprompt|>`` first), with
  repetition-aware sampling from the request's generator;
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
from typing import Any

import torch
from torch import Tensor

from cosyserve.api import PromptAudio, SynthesisRequest
from cosyserve.errors import InvalidRequestError, UnsupportedModeError
from cosyserve.families.base import (
    FamilyBackend,
    FamilyOptions,
    SegmentPlan,
    SpeechTask,
    TaskPhase,
)
from cosyserve.families.cosyvoice2.backend import StateDecoder
from cosyserve.families.cosyvoice2.frontend import ModelInput
from cosyserve.families.cosyvoice2.llm import SpeechTokenSampler
from cosyserve.families.cosyvoice3.frontend import CosyVoice3Frontend
from cosyserve.families.cosyvoice3.hift import CausalResBlock
from cosyserve.families.cosyvoice3.llm import CosyVoice3LM
from cosyserve.families.cosyvoice3.loader import LoadedModel, load_model_directory
from cosyserve.families.cosyvoice3.token2wav import ChunkedToken2Wav, WholeToken2Wav
from cosyserve.interfaces import AccelTargets
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures

logger = logging.getLogger(__name__)

MODES = frozenset({"zero_shot", "cross_lingual", "instruct2"})
Sink = WholeToken2Wav | ChunkedToken2Wav


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
    accepts_text_stream = True
    load_directory = staticmethod(load_model_directory)
    modes = MODES
    model: LoadedModel

    def __init__(self, model: LoadedModel, options: FamilyOptions | None = None):
        options = options or FamilyOptions()
        self.frontend = CosyVoice3Frontend(model.tokenizer, normalizer=options.normalizer)
        super().__init__(
            options,
            model_dir=model.files.root,
            speakers=model.speakers,
            # Features are kept untrimmed: each mode trims them as the reference does (vc does not).
            prompt_encoder=PromptEncoder(
                model.files.root,
                model.config.mel,
                device="cpu",
                speech_tokenizer_file=model.files.speech_tokenizer.name,
            ),
            text=self.frontend,  # type: ignore[arg-type]  # its segments keep the tags out of TN
        )
        self.model = model
        self.config = model.config
        self.sample_rate = int(model.config.sample_rate)
        if model.speakers:  # a directory with spk2info.pt (the published one has none)
            self.modes = MODES | {"sft"}

    @property
    def llm(self) -> CosyVoice3LM:
        return self.model.llm

    # -- requests --------------------------------------------------------------------------------

    def require_mode(self, mode: str) -> None:
        if mode == "sft":
            return  # a voice by name: a built-in speaker or a saved voice (checked per request)
        super().require_mode(mode)

    def check_request(self, request: SynthesisRequest) -> None:
        voice = request.voice
        if request.mode == "sft" and voice and voice not in self.speakers and voice not in self.voice_store:
            if self.speakers:
                what = f"{voice!r} is neither a built-in speaker of this CosyVoice3 model nor a saved voice"
            else:
                what = f"CosyVoice3 has no built-in speakers, and {voice!r} is not a saved voice"
            raise UnsupportedModeError(
                f"{what}: send a prompt recording (zero-shot, cross-lingual, instruct2) or save one with "
                "POST /v1/voices"
            )
        super().check_request(request)

    # -- the pipeline ----------------------------------------------------------------------------

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
        segment: str | None,
        prompt: PromptFeatures | None,
        generators: tuple[torch.Generator, torch.Generator],
        num_tokens: int | None,
    ) -> SegmentPlan:
        if prompt is not None:
            inputs = self.frontend.voice_input(request.mode, segment, prompt, request.instruct)
        elif request.voice in self.speakers:  # a built-in speaker (spk2info.pt)
            embedding = self.speakers[request.voice]
            inputs = self.frontend.speaker_input(request.mode, segment, embedding, request.instruct)
        else:  # check_request makes every request name a voice
            raise InvalidRequestError("CosyVoice3 needs a voice: a prompt recording or a saved voice")
        sampler = self.token_sampler(generators[0])
        decoder = StateDecoder.for_input(self.llm, inputs, sampler, num_tokens, self.frontend.tokenizer)
        return SegmentPlan(decoder, self.make_sink(request, inputs))

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

    def _probe_flow(self, ids: Tensor, embedding: Tensor, generator: torch.Generator) -> Tensor:
        return self.model.flow.inference(ids, embedding=embedding)  # no randomness: the fixed noise

    def accel_targets(self) -> AccelTargets:
        targets = super().accel_targets()
        targets.vocoder_blocks = (CausalResBlock,)
        return targets

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "text_stream": self.accepts_text_stream,
            "estimator_onnx": self.model.files.estimator_onnx is not None,
            "voice_conversion": self.prompt_encoder.available,
        }

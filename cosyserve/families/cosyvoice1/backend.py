"""The CosyVoice v1 backend: text → segments → speech tokens (LLM) → mel (flow) → waveform (HiFT).

One :class:`CosyVoiceBackend` owns the loaded networks; the request state machine and voice
handling are the families' shared :mod:`cosyserve.families.base`. This module says what a v1
segment is made of: the LLM prefix per mode (SFT, zero-shot, cross-lingual, instruct), the
sampler, and the streaming or whole token → wav sink.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cosyserve.api import SynthesisRequest
from cosyserve.errors import InvalidRequestError
from cosyserve.families.base import (
    SFT_LANGUAGES,
    FamilyBackend,
    FamilyOptions,
    SampledDecoder,
    SegmentPlan,
)
from cosyserve.families.cosyvoice1.llm import length_limits
from cosyserve.families.cosyvoice1.loader import LoadedModel, load_model_directory
from cosyserve.families.cosyvoice1.token2wav import TOKEN_HOP_LEN, ChunkedToken2Wav, WholeToken2Wav
from cosyserve.nn.sampling import TokenSampler
from cosyserve.text.frontend import TextFrontend
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures

logger = logging.getLogger(__name__)

INSTRUCT_SUFFIX = "<endofprompt>"
MODES = frozenset({"sft", "zero_shot", "cross_lingual", "instruct"})


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


class CosyVoiceBackend(FamilyBackend):
    family = "cosyvoice1"
    modes = MODES
    load_directory = staticmethod(load_model_directory)
    official_torchscript = True
    graphed_decode = True
    model: LoadedModel

    def __init__(self, model: LoadedModel, options: FamilyOptions | None = None):
        options = options or FamilyOptions()
        super().__init__(
            options,
            model_dir=model.files.root,
            speakers=model.speakers,
            prompt_encoder=PromptEncoder(model.files.root, model.config.mel, device="cpu"),
            text=TextFrontend(normalizer=options.normalizer),
            speaker_languages=SFT_LANGUAGES,
        )
        self.model = model
        self.config = model.config
        self.sample_rate = int(model.config.sample_rate)

    # -- requests --------------------------------------------------------------------------------

    def check_request(self, request: SynthesisRequest) -> None:
        super().check_request(request)
        if request.mode == "instruct" and request.voice not in self.speakers:
            raise InvalidRequestError("instruct mode needs a built-in speaker (spk_id), not a saved voice")

    # -- the pipeline ----------------------------------------------------------------------------

    def _tokens(self, text: str) -> torch.Tensor:
        return torch.tensor([self.text.tokenize(text)], dtype=torch.long, device=self.device)

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

    def plan_segment(
        self,
        request: SynthesisRequest,
        segment: str | None,
        prompt: PromptFeatures | None,
        generators: tuple[torch.Generator, torch.Generator],
        num_tokens: int | None,
    ) -> SegmentPlan:
        llm_generator, audio_generator = generators
        assert segment is not None  # noqa: S101 - v1 takes no text stream (accepts_text_stream False)
        inputs = self._segment_inputs(request, segment, prompt)
        llm = self.llm
        lo, hi = length_limits(int(inputs.text_ids.numel()), llm.cfg)
        if num_tokens is not None:
            lo = hi = int(num_tokens)
        sampler = TokenSampler(llm.eos_id, lo, hi, llm_generator, llm.cfg.sampling)
        model = self.model
        args = (model.flow, model.hift, inputs.flow_prompt_tokens, inputs.prompt_feat, inputs.flow_embedding)
        sink: ChunkedToken2Wav | WholeToken2Wav
        if request.stream:
            sink = ChunkedToken2Wav(
                *args,
                speed=request.speed,
                generator=audio_generator,
                hop=TOKEN_HOP_LEN,
                first_hop=self.options.stream_first_hop,
            )
        else:
            sink = WholeToken2Wav(*args, speed=request.speed, generator=audio_generator)
        prefix = None
        if not sampler.finished:
            prefix = llm.build_prefix(
                inputs.text_ids, inputs.prompt_text_ids, inputs.llm_prompt_tokens, inputs.llm_embedding
            )
        return SegmentPlan(SampledDecoder(prefix, sampler), sink)

    def _probe_flow(
        self, ids: torch.Tensor, embedding: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return self.model.flow.inference(ids, embedding=embedding, generator=generator)[0]

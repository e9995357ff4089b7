"""The CosyVoice2 backend: text → segments → speech tokens (Qwen2 LLM) → mel (causal flow) →
24 kHz waveform (HiFT).

One :class:`CosyVoice2Backend` owns the loaded networks; the request state machine, the voices
and the batching are the families' shared :mod:`cosyserve.families.base`. This module says what a
CosyVoice2 segment is made of:

* what each mode hands the model (:mod:`.frontend`): ``sft`` (a built-in speaker of
  ``spk2info.pt``, or a saved voice: zero-shot with its transcript, cross-lingual without),
  ``zero_shot``, ``cross_lingual`` and ``instruct2`` (a voice plus an instruction);
* its decoder (:class:`StateDecoder`): the LLM's state machine, whole text at once (unistream) or
  text streamed in (the reference's bistream, for a :class:`~cosyserve.api.TextStreamRequest`),
  with the reference's sampling;
* its token → wav sink (:class:`~.token2wav.WholeSink` / :class:`~.token2wav.ChunkedSink`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from cosyserve.api import SynthesisRequest
from cosyserve.errors import ModelDirectoryError, UnsupportedModeError
from cosyserve.families.base import (
    SFT_LANGUAGES,
    FamilyBackend,
    FamilyOptions,
    SegmentDecoder,
    SegmentPlan,
)
from cosyserve.families.cosyvoice2.frontend import CosyVoice2Frontend, ModelInput, StreamedTextTokenizer
from cosyserve.families.cosyvoice2.llm import (
    BistreamDecoder,
    DecodeState,
    InputKind,
    Qwen2LM,
    SpeechTokenSampler,
)
from cosyserve.families.cosyvoice2.loader import SPEECH_TOKENIZER_FILE, LoadedModel, load_model_directory
from cosyserve.families.cosyvoice2.token2wav import (
    TOKEN_HOP_LEN,
    ChunkedSegment,
    ChunkedSink,
    WholeSegment,
    WholeSink,
)
from cosyserve.text.qwen_tokenizer import QwenTokenizer
from cosyserve.voices.prompt import PromptEncoder, PromptFeatures

logger = logging.getLogger(__name__)

# Upstream resamples every prompt to 24 kHz and keeps exactly 2 mel frames per 25 Hz token.
TOKEN_MEL_RATIO = 2


class StateDecoder(SegmentDecoder):
    """A segment's LLM side: the Qwen2 LLM's decoding state machine (:class:`UnistreamDecoder` or,
    for text streamed in, :class:`BistreamDecoder`) with its sampler.

    Speech-token inputs go to the runner as ids (its fast decode step); the rest (text, the
    special rows) as embeddings. Streamed text is tokenised as it arrives
    (:class:`StreamedTextTokenizer`) and handed to the state machine one id per piece, as the
    reference's text generator yields it."""

    def __init__(
        self,
        lm: Qwen2LM,
        state: DecodeState,
        sampler: SpeechTokenSampler,
        text: StreamedTextTokenizer | None = None,
    ):
        self.lm = lm
        self.state = state
        self.sampler = sampler
        self._text = text
        self._text_ids = 0  # ids streamed in so far
        self._no_text = False  # the streamed text ended without a word: nothing to say

    @classmethod
    def for_input(
        cls,
        lm: Qwen2LM,
        inputs: ModelInput,
        sampler: SpeechTokenSampler,
        num_tokens: int | None = None,
        tokenizer: QwenTokenizer | None = None,
    ) -> StateDecoder:
        """The decoder of one segment's model input: the whole text at once, or (``text_ids`` None)
        text streamed in, tokenised by ``tokenizer``. ``num_tokens``: exactly that many tokens."""
        if inputs.text_ids is None:
            if tokenizer is None:
                raise ValueError("text streamed in needs the tokenizer")
            state: DecodeState = lm.bistream(inputs.prompt_text_ids, inputs.llm_prompt_speech_tokens)
            return cls(lm, state, sampler, StreamedTextTokenizer(tokenizer))
        state = lm.unistream(
            inputs.text_ids, inputs.prompt_text_ids, inputs.llm_prompt_speech_tokens, num_tokens=num_tokens
        )
        return cls(lm, state, sampler)

    @property
    def finished(self) -> bool:
        return self._no_text or self.state.done

    @property
    def pending(self) -> int:
        return self.state.pending

    @property
    def waiting(self) -> bool:
        return isinstance(self.state, BistreamDecoder) and self.state.waiting

    def take_prefix(self) -> Tensor:
        return self.lm.embed_inputs(self.state.take_inputs()).unsqueeze(0)

    def next_input(self) -> int | Tensor:
        item = self.state.next_input()
        if item is None:
            raise RuntimeError("the decoder has no input to feed")
        if item.kind is InputKind.SPEECH:
            return item.id
        return self.lm.embed_inputs([item])[0]

    def accept(self, logp: Tensor) -> int | None:
        if not self.state.output_due:  # a position fed ahead of its output (text streamed in)
            return None
        return self.state.accept(self.sampler.choose(logp, self.state))

    def push_text(self, text: str) -> None:
        self._push(self._stream_tokenizer().push(text))

    def end_text(self) -> None:
        self._push(self._stream_tokenizer().finish())
        if not self._text_ids:
            self._no_text = True  # the reference would still decode from [sos, task_id]
            return
        self.state.end_text()  # type: ignore[attr-defined]

    def _push(self, ids: list[int]) -> None:
        self._text_ids += len(ids)
        for token in ids:
            self.state.push_text([token])  # type: ignore[attr-defined]

    def _stream_tokenizer(self) -> StreamedTextTokenizer:
        if self._text is None:
            raise UnsupportedModeError("this segment's text was given whole")
        return self._text


class CosyVoice2Backend(FamilyBackend):
    family = "cosyvoice2"
    accepts_text_stream = True
    load_directory = staticmethod(load_model_directory)
    model: LoadedModel

    def __init__(self, model: LoadedModel, options: FamilyOptions | None = None):
        options = options or FamilyOptions()
        config = model.config
        self.frontend = CosyVoice2Frontend(model.tokenizer, normalizer=options.normalizer)
        super().__init__(
            options,
            model_dir=model.files.root,
            speakers=model.speakers,
            prompt_encoder=PromptEncoder(
                model.files.root,
                config.mel,
                device="cpu",
                token_mel_ratio=TOKEN_MEL_RATIO,
                speech_tokenizer_file=SPEECH_TOKENIZER_FILE,
            ),
            text=self.frontend,  # type: ignore[arg-type]  # its segments keep the tags out of TN
            speaker_languages=SFT_LANGUAGES,
        )
        self.model = model
        self.config = config
        self.sample_rate = int(config.sample_rate)
        voices = bool(self.speakers) or self.prompt_encoder.available
        if not voices:
            raise ModelDirectoryError(
                f"{model.files.root}: no voice to speak with: neither built-in speakers (spk2info.pt) nor "
                f"the voice-cloning models ({self.prompt_encoder.required_files})"
            )
        cloning = {"zero_shot", "cross_lingual"} if self.prompt_encoder.available else set()
        # sft: a built-in speaker or a saved voice; instruct2: either of those, or a recording.
        self.modes = frozenset({"sft", "instruct2", *cloning})

    @property
    def llm(self) -> Qwen2LM:
        return self.model.llm

    # -- the pipeline ----------------------------------------------------------------------------

    def _model_input(
        self, request: SynthesisRequest, segment: str | None, prompt: PromptFeatures | None
    ) -> ModelInput:
        """What the segment hands the model in the request's mode (``segment`` None: streamed in)."""
        if prompt is None:  # a built-in speaker
            embedding = self.speakers[request.voice]  # type: ignore[index]
            return self.frontend.speaker_input(request.mode, segment, embedding, request.instruct)
        return self.frontend.voice_input(request.mode, segment, prompt, request.instruct)

    def plan_segment(
        self,
        request: SynthesisRequest,
        segment: str | None,
        prompt: PromptFeatures | None,
        generators: tuple[torch.Generator, torch.Generator],
        num_tokens: int | None,
    ) -> SegmentPlan:
        llm_generator, audio_generator = generators
        inputs = self._model_input(request, segment, prompt)
        sampler = SpeechTokenSampler(self.llm.cfg.sampling, llm_generator)
        decoder = StateDecoder.for_input(self.llm, inputs, sampler, num_tokens, self.frontend.tokenizer)
        model = self.model
        args = (
            model.flow,
            model.hift,
            inputs.flow_prompt_speech_tokens,
            inputs.prompt_speech_feat,
            inputs.flow_embedding,
            request.speed,
            audio_generator,
            self.flow_device,
        )
        sink: WholeSink | ChunkedSink
        if request.stream:
            first_hop = self.options.stream_first_hop or TOKEN_HOP_LEN
            sink = ChunkedSink(ChunkedSegment(*args, first_hop=first_hop))
        else:
            sink = WholeSink(WholeSegment(*args))
        return SegmentPlan(decoder, sink)

    # -- operations ------------------------------------------------------------------------------

    def _probe_flow(self, ids: Tensor, embedding: Tensor, generator: torch.Generator) -> Tensor:
        return self.model.flow.inference(ids, embedding=embedding)  # no randomness: the fixed noise

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "text_stream": self.accepts_text_stream}

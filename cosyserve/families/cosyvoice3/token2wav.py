"""Speech tokens -> 24 kHz waveform for CosyVoice3 (flow + causal HiFT), non-streaming and
streaming, equivalent to upstream ``CosyVoice3Model.tts`` (token path).

* non-stream: ``mel = flow(all tokens, streaming=False, finalize=True)``; with ``speed != 1``
  the mel is linearly interpolated to ``int(T / speed)`` frames; ``speech = hift(mel)``.
* stream: hops of 25 tokens, doubling per chunk up to 100; the first hop is padded so that prompt
  + first hop fill whole 25-token attention chunks (``pad = ceil(P / 25) * 25 - P``). A chunk is
  due once ``hop + 3`` tokens beyond the offset exist; it runs the flow over ALL tokens so far
  plus the 3 look-ahead tokens (``streaming=True, finalize=False``: chunk-masked attention) and
  keeps the mel from ``2 * offset``. The last call runs the flow over all tokens with
  ``streaming=False, finalize=True``. The mel of every call is appended to the vocoder's input;
  upstream re-runs HiFT over the whole accumulated mel every chunk and yields the new tail, here
  :class:`~cosyserve.families.cosyvoice3.hift.StreamingVocoder` runs only the new frames plus
  the decoder's receptive field, with the same samples (up to float rounding; tested).

Beyond upstream: speed control while streaming (upstream refuses it) resamples the stream of
committed mel frames by linear interpolation at scale ``speed``, incrementally, into
``int(T / speed)`` frames in total; chunk boundaries do not change the result
(:class:`~cosyserve.families.cosyvoice1.token2wav.StreamingMelResampler`, shared with v1; the
non-stream path interpolates the whole mel at scale ``T / int(T / speed)``, a hair different). Upstream also never
resets its streaming hop after a request (the next request starts where the last one grew to);
here every request starts at 25.

For the batching runner, :class:`WholeToken2Wav` and :class:`ChunkedToken2Wav` split each call
around the flow's Euler loop (``prepare`` -> ``flow.decode(items)`` -> ``complete``), as v1's do.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cosyserve.families.cosyvoice3.flow import CausalMaskedDiffWithDiT, FlowInputs
from cosyserve.families.cosyvoice3.hift import CausalHiFTGenerator, StreamingVocoder
from cosyserve.families.cosyvoice3.llm import SilentTokenFilter
from cosyserve.families.cosyvoice3.noise import HiFTNoise
from cosyserve.nn.streaming import (
    StreamingMelResampler,
    apply_speed,
    speech_to_numpy,
    speed_frames,
)

logger = logging.getLogger(__name__)

TOKEN_HOP_LEN = 25  # first hop (upstream token_hop_len), = the DiT's attention chunk in tokens
TOKEN_MAX_HOP_LEN = 100  # 4 x token_hop_len
STREAM_SCALE_FACTOR = 2  # the hop doubles after every chunk

_EMPTY = np.zeros(0, dtype=np.float32)


def first_hop(prompt_tokens: int, hop: int = TOKEN_HOP_LEN) -> int:
    """The first streaming hop: ``hop`` plus the pad that makes prompt + hop a multiple of ``hop``."""
    return hop + math.ceil(prompt_tokens / hop) * hop - prompt_tokens


@dataclass
class CallRecord:
    """One flow + vocoder call of a segment (kept with ``record=True``; names as the fixtures')."""

    flow_ntok: int  # speech tokens given to the flow (prompt excluded)
    flow_flags: tuple[bool, bool]  # (streaming, finalize)
    flow_mel: Tensor  # flow output, prompt frames removed, before the offset cut
    hift_mel: Tensor  # what this call appended to the vocoder's input (after speed change)
    hift_in_frames: tuple[int, bool]  # (accumulated vocoder input frames, finalize)
    hift_speech_len: int  # samples of upstream's whole re-synthesis at this call
    out: Tensor  # samples released by this call [1, n]


class _Segment:
    """What both sinks know of one segment: the networks, its prompt and speaker, its noise.

    ``drop_silent``: the tokens come from the LLM, and the reference's ``llm_job`` filter
    (:class:`~cosyserve.families.cosyvoice3.llm.SilentTokenFilter`) stands between it and the
    flow; tokens given directly (voice conversion, the model-level API) are not filtered."""

    streaming = False

    def __init__(
        self,
        flow: CausalMaskedDiffWithDiT,
        hift: CausalHiFTGenerator,
        noise: HiFTNoise,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        speed: float = 1.0,
        record: bool = False,
        drop_silent: bool = False,
    ):
        if not (speed > 0 and math.isfinite(speed)):
            raise ValueError(f"speed must be a positive number, got {speed!r}")
        self.drop_silent = drop_silent
        self.flow, self.hift, self.noise = flow, hift, noise
        self.prompt_tokens, self.prompt_feat, self.embedding = prompt_tokens, prompt_feat, embedding
        self.speed = float(speed)
        self.device = next(flow.parameters()).device
        self.n_prompt_tokens = 0 if prompt_tokens is None else int(prompt_tokens.shape[1])
        self.prompt_frames = 0 if prompt_feat is None else int(prompt_feat.shape[1])
        self.ratio = flow.token_mel_ratio
        self.lookahead = flow.pre_lookahead_len
        self.trace: list[CallRecord] | None = [] if record else None
        self.last_tokens = 0

    def flow_frames(self, n_tokens: int, finalize: bool) -> int:
        """Frames of the Euler loop of a call over ``n_tokens`` (prompt included): calls with equal
        frames and streaming flags batch without padding."""
        return self.ratio * (self.n_prompt_tokens + n_tokens - (0 if finalize else self.lookahead))

    def batch_key(self, tokens: Sequence[int], finalize: bool) -> tuple[int, bool]:
        """(Euler-loop frames, chunk-masked attention): calls with equal keys share one loop and
        each gives its solo run's mel (the AudioSink protocol)."""
        return self.flow_frames(len(tokens), finalize), self.streaming and not finalize

    @torch.inference_mode()
    def prepare(self, tokens: Sequence[int], finalize: bool = True) -> FlowInputs:
        token_tensor = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        self.last_tokens = token_tensor.shape[1]  # for the trace
        return self.flow.prepare(
            token_tensor,
            self.prompt_tokens,
            self.prompt_feat,
            self.embedding,
            streaming=self.streaming and not finalize,
            finalize=finalize,
        )


class WholeToken2Wav(_Segment):
    """Non-streaming token -> waveform for one segment, in two halves around ``flow.decode``; the
    tokens are the segment's whole LLM output (filtered here with ``drop_silent``)."""

    streaming = False

    def _kept(self, tokens: Sequence[int]) -> list[int]:
        return SilentTokenFilter().filter(tokens) if self.drop_silent else list(tokens)

    def batch_key(self, tokens: Sequence[int], finalize: bool = True) -> tuple[int, bool]:
        return super().batch_key(self._kept(tokens), finalize)

    def prepare(self, tokens: Sequence[int], finalize: bool = True) -> FlowInputs:
        return super().prepare(self._kept(tokens), finalize)

    @torch.inference_mode()
    def complete(self, mel: Tensor, finalize: bool = True) -> np.ndarray:
        frames = speed_frames(mel.shape[2], self.speed)
        if frames == 0:
            return _EMPTY  # too few frames to survive the speed change
        hift_mel = apply_speed(mel, self.speed)
        speech, _ = self.hift.inference(hift_mel, self.noise, finalize=True)
        if self.trace is not None:
            n = self.hift.samples_per_frame
            self.trace.append(
                CallRecord(self.last_tokens, (False, True), mel, hift_mel, (frames, True), frames * n, speech)
            )
        return speech_to_numpy(speech)


class ChunkedToken2Wav(_Segment):
    """Streaming token -> waveform for one segment, in two halves around ``flow.decode``.

    ``add(token)`` returns the tokens of a chunk that became due (all tokens from the first, up to
    the chunk's look-ahead); ``remainder()`` those of the final call. Each is then
    ``prepare(tokens, finalize)``-d, decoded (possibly batched with other requests' calls) and
    ``complete(mel, finalize)``-d, in the order the calls were returned.
    """

    streaming = True

    def __init__(
        self,
        flow: CausalMaskedDiffWithDiT,
        hift: CausalHiFTGenerator,
        noise: HiFTNoise,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        speed: float = 1.0,
        hop: int = TOKEN_HOP_LEN,
        max_hop: int = TOKEN_MAX_HOP_LEN,
        scale: int = STREAM_SCALE_FACTOR,
        record: bool = False,
        drop_silent: bool = False,
    ):
        super().__init__(flow, hift, noise, prompt_tokens, prompt_feat, embedding, speed, record, drop_silent)
        if hop < 1 or max_hop < hop or scale < 1:
            raise ValueError(f"bad streaming hops: hop {hop}, max_hop {max_hop}, scale {scale}")
        self.max_hop, self.scale = max_hop, scale
        self._tokens: list[int] = []
        self._offset = 0  # tokens whose mel has been handed on
        self._base_hop = hop  # upstream's token_hop_len: 25, then 50, 100, 100, ...
        self._hop = first_hop(self.n_prompt_tokens, hop)  # this chunk's hop (the first one padded)
        self._pending: deque[tuple[int, int]] = deque()  # (token offset, tokens) of calls to complete
        self._resampler = StreamingMelResampler(self.speed) if self.speed != 1.0 else None
        self.vocoder = StreamingVocoder(hift, noise)
        self._silence = SilentTokenFilter() if drop_silent else None
        self.finished = False

    @property
    def tokens(self) -> list[int]:
        return self._tokens

    def add(self, token: int) -> list[int] | None:
        """Buffer one token; returns the tokens of the chunk that became due, if any."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        if self._silence is not None and not self._silence.keep(token):
            return None
        self._tokens.append(int(token))
        if len(self._tokens) - self._offset < self._hop + self.lookahead:
            return None
        chunk = self._tokens[: self._offset + self._hop + self.lookahead]
        self._pending.append((self._offset, len(chunk)))
        self._offset += self._hop
        self._base_hop = min(self.max_hop, self._base_hop * self.scale)
        self._hop = self._base_hop
        return chunk

    def remainder(self) -> list[int]:
        """The tokens of the final call (all of them); no more tokens may be added."""
        self.finished = True
        if not self._tokens:
            return []
        self._pending.append((self._offset, len(self._tokens)))
        return list(self._tokens)

    @torch.inference_mode()
    def complete(self, mel: Tensor, finalize: bool) -> np.ndarray:
        offset, n_tokens = self._pending.popleft()
        new = mel[:, :, offset * self.ratio :]
        if self._resampler is not None:
            new = self._resampler.finish(new) if finalize else self._resampler.push(new)
        out = self.vocoder.push(new, finalize)
        if self.trace is not None:
            frames, n = self.vocoder.frames, self.hift.samples_per_frame
            whole = frames * n if finalize else max(frames - self.hift.held_back_frames, 0) * n
            self.trace.append(
                CallRecord(
                    flow_ntok=n_tokens,
                    flow_flags=(not finalize, finalize),
                    flow_mel=mel,
                    hift_mel=new if new is not None else mel[:, :, :0],
                    hift_in_frames=(frames, finalize),
                    hift_speech_len=whole,
                    out=out,
                )
            )
        return speech_to_numpy(out) if out.numel() else _EMPTY


# ------------------------------------------------------------------------------- batch-1 drivers
@torch.inference_mode()
def token2wav(
    flow: CausalMaskedDiffWithDiT,
    hift: CausalHiFTGenerator,
    noise: HiFTNoise,
    tokens: Tensor,
    prompt_tokens: Tensor | None = None,
    prompt_feat: Tensor | None = None,
    embedding: Tensor | None = None,
    speed: float = 1.0,
) -> np.ndarray:
    """Non-stream token -> waveform: float32 samples at 24 kHz, ``480 * int(T / speed)`` long.

    tokens ``[1, N]``; prompt_tokens ``[1, Np]``; prompt_feat ``[1, P, 80]``; embedding ``[1, 192]``.
    """
    if tokens.shape[-1] == 0:
        return _EMPTY
    if embedding is None:
        raise ValueError("the flow needs a speaker embedding [1, 192]")
    sink = WholeToken2Wav(flow, hift, noise, prompt_tokens, prompt_feat, embedding, speed)
    item = sink.prepare(tokens[0].tolist(), finalize=True)
    return sink.complete(flow.decode([item])[0])


class StreamingToken2Wav:
    """Per-request streaming token -> waveform (batch 1): ``push(tokens)`` returns the audio chunks
    that became ready, ``finish()`` the last one. With ``speed=1`` the chunks equal upstream's."""

    def __init__(
        self,
        flow: CausalMaskedDiffWithDiT,
        hift: CausalHiFTGenerator,
        noise: HiFTNoise,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        speed: float = 1.0,
        hop: int = TOKEN_HOP_LEN,
        record: bool = False,
    ):
        if embedding is None:
            raise ValueError("the flow needs a speaker embedding [1, 192]")
        self.flow = flow
        self.sink = ChunkedToken2Wav(
            flow, hift, noise, prompt_tokens, prompt_feat, embedding, speed, hop=hop, record=record
        )

    @property
    def trace(self) -> list[CallRecord] | None:
        return self.sink.trace

    def _run(self, tokens: list[int], finalize: bool) -> np.ndarray:
        item = self.sink.prepare(tokens, finalize)
        return self.sink.complete(self.flow.decode([item])[0], finalize)

    def push(self, tokens: Iterable[int]) -> list[np.ndarray]:
        ready = []
        for token in tokens:
            chunk = self.sink.add(int(token))
            if chunk is not None:
                out = self._run(chunk, finalize=False)
                if out.size:
                    ready.append(out)
        return ready

    def finish(self) -> np.ndarray:
        tokens = self.sink.remainder()
        if not tokens:
            return _EMPTY
        return self._run(tokens, finalize=True)

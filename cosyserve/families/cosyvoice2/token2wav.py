"""CosyVoice2 speech tokens -> 24 kHz waveform (flow + HiFT), non-stream and stream, with speed.

Equivalent to upstream ``CosyVoice2Model.tts`` (token path) and its ``token2wav``:

* non-stream: one flow call over all tokens (``streaming=False, finalize=True``); with
  ``speed != 1`` the mel is linearly interpolated to ``int(T / speed)`` frames; HiFT.
* stream: a chunk is due once ``hop + 3`` tokens beyond ``token_offset`` exist (the 3 are the
  pre-lookahead context). Each chunk re-runs the flow over ALL tokens so far,
  ``[0, offset + hop + 3)``, with ``streaming=True, finalize=False`` (block-causal attention; the 3
  context tokens make no frames), keeps the frames from ``2 * offset`` on, then
  ``offset += hop`` and ``hop = min(100, 2 * hop)``. The first hop is 25 tokens plus
  ``prompt_token_pad = ceil(P / 25) * 25 - P`` for P prompt tokens (so the first chunk ends on a
  25-token chunk boundary of the flow's attention). The last call runs every token with
  ``streaming=False, finalize=True`` (full attention). HiFT keeps upstream's cache: 8 mel frames
  of context, the last 3840 source samples, and a ``hamming(7680)`` speech cross-fade; each chunk
  holds back its last 3840 samples, the last one nothing.

Beyond upstream: the first hop (and the largest) can be set (the defaults reproduce upstream);
the hop schedule starts afresh for every segment (upstream's ``token_hop_len`` never resets, so
its next request would start at 50 or 100); and speed control while streaming, done as v1 does it:
the stream of committed mel frames is resampled incrementally with the non-stream interpolation
(:class:`~cosyserve.nn.streaming.StreamingMelResampler`) before HiFT.

Work the reference repeats, and what is done about it:

* The flow over the tokens of earlier chunks: every chunk recomputes all frames from token 0 and
  drops those already vocoded. With the block-causal masks a chunk's frames only depend on tokens
  up to 3 past its end, but the recomputed frames still differ from the earlier call's in the last
  float bits (different matmul shapes; ~1e-6 in the fixtures), and the last call switches to full
  attention, which changes every frame. Skipping them would need the estimator's per-step
  activations of earlier chunks, so it is not equal to the reference: the recomputation is kept.
* HiFT: only the new frames plus the 8 cached context frames are vocoded (the context is needed for
  the cross-fade); nothing already emitted is vocoded again, as upstream.

The segment classes are split around the flow's Euler loop (:meth:`ChunkedSegment.prepare`,
then ``flow.decode([...])`` for one or several requests, then :meth:`ChunkedSegment.complete`), so
a batching runner can share the loop between requests; the batch-1 :func:`token2wav` and
:class:`StreamingToken2Wav` are the same pieces run one request at a time. All randomness (HiFT's
initial phases and noise) comes from a per-request ``torch.Generator`` or is injected (tests).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from cosyserve.families.cosyvoice2.flow import CausalFlowInputs
from cosyserve.nn.hift import HiFTGenerator
from cosyserve.nn.streaming import (
    StreamingMelResampler,
    StreamingVocoder,
    VocoderStep,
    apply_speed,
    module_device,
    speech_to_numpy,
    speed_frames,
)

logger = logging.getLogger(__name__)

TOKEN_HOP_LEN = 25  # first hop; must match the flow's attention chunk (static_chunk_size) upstream
TOKEN_MAX_HOP_LEN = 4 * TOKEN_HOP_LEN
STREAM_SCALE_FACTOR = 2  # each chunk's hop is twice the previous one, up to the max
MEL_CACHE_LEN = 8  # HiFT mel context frames; x 480 = 3840 source / speech cross-fade samples

_EMPTY = np.zeros(0, dtype=np.float32)


class CausalFlow(Protocol):
    """What token2wav needs from the flow (:class:`~cosyserve.families.cosyvoice2.flow.CausalMaskedDiffWithXvec`)."""

    token_mel_ratio: int
    pre_lookahead_len: int

    def prepare(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        streaming: bool = False,
        finalize: bool = True,
    ) -> CausalFlowInputs: ...

    def decode(self, items: Sequence[CausalFlowInputs], n_timesteps: int | None = None) -> list[Tensor]: ...


@dataclass(frozen=True)
class FlowCall:
    """One flow call of a segment: the flow runs over `tokens` (always from the segment's first
    token), and the frames of the first `token_offset` tokens (already vocoded) are dropped."""

    tokens: tuple[int, ...]
    token_offset: int
    streaming: bool
    finalize: bool


class HopSchedule:
    """When a stream's chunks are due (upstream's ``token_hop_len`` logic, per segment).

    A chunk is due when ``n_tokens - offset >= hop + lookahead`` (``hop`` includes the prompt pad
    for the first chunk); it covers tokens ``[0, offset + hop + lookahead)``; then ``offset += hop``
    and ``hop = min(max_hop, hop * scale)``.
    """

    def __init__(
        self,
        n_prompt_tokens: int = 0,
        first_hop: int = TOKEN_HOP_LEN,
        max_hop: int = TOKEN_MAX_HOP_LEN,
        scale: int = STREAM_SCALE_FACTOR,
        lookahead: int = 3,
    ):
        if first_hop < 1 or max_hop < first_hop or scale < 1:
            raise ValueError(
                f"stream hops must satisfy 1 <= first_hop <= max_hop and scale >= 1, "
                f"got first_hop={first_hop}, max_hop={max_hop}, scale={scale}"
            )
        self.max_hop = max_hop
        self.scale = scale
        self.lookahead = lookahead
        # Pads the first chunk so that it ends on a multiple of the first hop, prompt included.
        self.prompt_pad = math.ceil(n_prompt_tokens / first_hop) * first_hop - n_prompt_tokens
        self.hop = first_hop
        self.offset = 0

    @property
    def next_hop(self) -> int:
        return self.hop + self.prompt_pad if self.offset == 0 else self.hop

    def due(self, n_tokens: int) -> tuple[int, int] | None:
        """``(end, offset)`` of the next chunk if ``n_tokens`` tokens suffice for it (and advance)."""
        hop = self.next_hop
        if n_tokens - self.offset < hop + self.lookahead:
            return None
        end, offset = self.offset + hop + self.lookahead, self.offset
        self.offset += hop
        self.hop = min(self.max_hop, self.hop * self.scale)
        return end, offset


@dataclass
class ChunkRecord:
    """What one flow call of a stream did (kept only with ``record=True``)."""

    call: FlowCall
    flow_mel: Tensor  # the flow's mel (prompt frames removed), before the offset slicing
    vocoder: VocoderStep | None


class _Segment:
    """What both segment kinds know: the networks, the prompt and speaker, the speed, the RNG."""

    streaming: bool = False

    def __init__(
        self,
        flow: CausalFlow,
        hift: HiFTGenerator,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ):
        if embedding is None:
            raise ValueError("the flow needs a speaker embedding [1, 192]")
        if not (speed > 0 and math.isfinite(speed)):
            raise ValueError(f"speed must be a positive number, got {speed!r}")
        self.flow, self.hift = flow, hift
        self.device = torch.device(device) if device is not None else module_device(flow)
        self.prompt_tokens = None if prompt_tokens is None else prompt_tokens.to(self.device)
        self.prompt_feat = prompt_feat
        self.embedding = embedding
        self.speed = float(speed)
        self.generator = generator
        self.n_prompt_tokens = 0 if prompt_tokens is None else int(prompt_tokens.shape[1])
        self.prompt_frames = 0 if prompt_feat is None else int(prompt_feat.shape[1])

    def frames(self, call: FlowCall) -> int:
        """Frames of the call's Euler loop (prompt included): equal frames (and equal
        ``call.streaming``) batch exactly."""
        return self.call_frames(len(call.tokens), call.finalize)

    def call_frames(self, n_tokens: int, finalize: bool) -> int:
        """Frames of the Euler loop of a call over ``n_tokens`` tokens (prompt included)."""
        n = self.n_prompt_tokens + n_tokens
        if not finalize:
            n -= self.flow.pre_lookahead_len
        return n * self.flow.token_mel_ratio

    @torch.inference_mode()
    def prepare(self, call: FlowCall) -> CausalFlowInputs:
        """Everything before the flow's Euler loop (encoder, conditions, noise) for one call."""
        tokens = torch.tensor([list(call.tokens)], dtype=torch.long, device=self.device)
        return self.flow.prepare(
            tokens, self.prompt_tokens, self.prompt_feat, self.embedding, call.streaming, call.finalize
        )

    def run_flow(self, call: FlowCall) -> Tensor:
        """Both halves of the flow for one call, alone (batch 1)."""
        return self.flow.decode([self.prepare(call)])[0]


class WholeSegment(_Segment):
    """Non-stream token -> waveform for one segment, split around the flow's Euler loop."""

    streaming = False

    def call(self, tokens: Sequence[int]) -> FlowCall:
        return FlowCall(tuple(int(t) for t in tokens), 0, streaming=False, finalize=True)

    @torch.inference_mode()
    def complete(
        self, call: FlowCall, mel: Tensor, hift_noise: tuple[Tensor | None, Tensor | None] | None = None
    ) -> np.ndarray:
        """Flow mel -> speech (float32 samples at the HiFT rate, ``hop * int(T / speed)`` long)."""
        if speed_frames(mel.shape[2], self.speed) == 0:
            return _EMPTY  # too few frames to survive the speed change
        phase, sine_noise = hift_noise if hift_noise is not None else (None, None)
        speech, _ = self.hift.inference(
            apply_speed(mel, self.speed), generator=self.generator, phase=phase, sine_noise=sine_noise
        )
        return speech_to_numpy(speech)


class ChunkedSegment(_Segment):
    """Streaming token -> waveform for one segment, split around the flow's Euler loop.

    :meth:`add` buffers tokens and returns the flow calls that became due; :meth:`remainder`
    gives the final call. Each call goes through :meth:`prepare`, ``flow.decode`` (alone or with
    other requests' calls of the same frame count and ``streaming`` flag) and :meth:`complete`,
    in the order the calls were returned.
    """

    streaming = True

    def __init__(
        self,
        flow: CausalFlow,
        hift: HiFTGenerator,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        first_hop: int = TOKEN_HOP_LEN,
        max_hop: int = TOKEN_MAX_HOP_LEN,
        hift_noises: Sequence[tuple[Tensor | None, Tensor | None]] | None = None,
    ):
        super().__init__(flow, hift, prompt_tokens, prompt_feat, embedding, speed, generator, device)
        self.schedule = HopSchedule(
            self.n_prompt_tokens, first_hop, max(max_hop, first_hop), lookahead=flow.pre_lookahead_len
        )
        self.resampler = StreamingMelResampler(self.speed) if self.speed != 1.0 else None
        self.vocoder = StreamingVocoder(
            hift,
            generator,
            hift_noises,  # type: ignore[arg-type] - a None half is drawn from the generator
            mel_cache_len=MEL_CACHE_LEN,
            source_cache_len=MEL_CACHE_LEN * hift.upsample_factor,
        )
        self._tokens: list[int] = []
        self.finished = False

    def add(self, tokens: int | Sequence[int]) -> list[FlowCall]:
        """Buffer tokens; returns the flow calls now due (usually none or one)."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        self._tokens.extend(
            [int(tokens)] if isinstance(tokens, (int, np.integer)) else (int(t) for t in tokens)
        )
        calls = []
        while (due := self.schedule.due(len(self._tokens))) is not None:
            end, offset = due
            calls.append(FlowCall(tuple(self._tokens[:end]), offset, streaming=True, finalize=False))
        return calls

    def remainder(self) -> FlowCall | None:
        """The final call (every token, full attention); None if the segment had no tokens."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        self.finished = True
        if not self._tokens:
            return None
        return FlowCall(tuple(self._tokens), self.schedule.offset, streaming=False, finalize=True)

    @torch.inference_mode()
    def commit(self, call: FlowCall, mel: Tensor) -> VocoderStep | None:
        """Flow mel of a call -> its new frames (speed applied) -> HiFT; None while HiFT waits
        for more frames (only with speed change)."""
        new = mel[:, :, call.token_offset * self.flow.token_mel_ratio :]
        if self.resampler is not None:
            new = self.resampler.finish(new) if call.finalize else self.resampler.push(new)
        return self.vocoder.push(new, call.finalize)

    def complete(self, call: FlowCall, mel: Tensor) -> np.ndarray:
        step = self.commit(call, mel)
        return _EMPTY if step is None else speech_to_numpy(step.out)


# ------------------------------------------------------------------------------- engine sinks
# The two segment kinds as the engine's AudioSink (cosyserve.interfaces): the task hands tokens
# in (a streaming sink says when a flow call is due), the batch runner prepares each call, runs
# the Euler loops of calls with equal batch keys together and completes them, in order.


class WholeSink:
    """A non-stream segment as an :class:`~cosyserve.interfaces.AudioSink`: one flow call over
    all of its tokens (full attention), HiFT."""

    streaming = False

    def __init__(self, segment: WholeSegment):
        self.segment = segment
        self.flow = segment.flow
        self._call: FlowCall | None = None

    def batch_key(self, tokens: Sequence[int], finalize: bool = True) -> tuple[int, bool]:
        """(Euler-loop frames, streaming attention): equal keys share a loop exactly."""
        return self.segment.call_frames(len(tokens), True), False

    def prepare(self, tokens: Sequence[int], finalize: bool = True) -> CausalFlowInputs:
        self._call = self.segment.call(tokens)
        return self.segment.prepare(self._call)

    def complete(self, mel: Tensor, finalize: bool = True) -> np.ndarray:
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError("complete() without prepare()")
        return self.segment.complete(call, mel)


class ChunkedSink:
    """A streamed segment as an :class:`~cosyserve.interfaces.AudioSink`: :meth:`add` returns
    the tokens of a flow call when one is due (every call re-runs the flow over all tokens so far,
    block-causally), :meth:`remainder` those of the final call (full attention)."""

    streaming = True

    def __init__(self, segment: ChunkedSegment):
        self.segment = segment
        self.flow = segment.flow
        self._due: deque[FlowCall] = deque()  # calls handed out, not yet prepared
        self._call: FlowCall | None = None

    def add(self, token: int) -> list[int] | None:
        calls = self.segment.add(token)
        if not calls:
            return None
        if len(calls) > 1:  # one token never completes two hops
            raise RuntimeError("one token made two flow calls due")
        self._due.append(calls[0])
        return list(calls[0].tokens)

    def remainder(self) -> list[int]:
        call = self.segment.remainder()
        if call is None:
            return []
        self._due.append(call)
        return list(call.tokens)

    def batch_key(self, tokens: Sequence[int], finalize: bool) -> tuple[int, bool]:
        """(Euler-loop frames, streaming attention): streamed chunks attend block-causally, the
        final call fully, so only calls of equal frames and kind share a loop."""
        return self.segment.call_frames(len(tokens), finalize), not finalize

    def prepare(self, tokens: Sequence[int], finalize: bool) -> CausalFlowInputs:
        call = self._due.popleft()
        if len(call.tokens) != len(tokens) or call.finalize != finalize:
            raise RuntimeError("flow calls must be prepared in the order they were handed out")
        self._call = call
        return self.segment.prepare(call)

    def complete(self, mel: Tensor, finalize: bool) -> np.ndarray:
        call, self._call = self._call, None
        if call is None:
            raise RuntimeError("complete() without prepare()")
        return self.segment.complete(call, mel)


# ------------------------------------------------------------------------------- batch 1
@torch.inference_mode()
def token2wav(
    flow: CausalFlow,
    hift: HiFTGenerator,
    tokens: Tensor,
    prompt_tokens: Tensor | None = None,
    prompt_feat: Tensor | None = None,
    embedding: Tensor | None = None,
    speed: float = 1.0,
    generator: torch.Generator | None = None,
    hift_noise: tuple[Tensor | None, Tensor | None] | None = None,
) -> np.ndarray:
    """Non-stream token -> waveform: float32 samples at 24 kHz, ``480 * int(T / speed)`` long.

    tokens ``[1, N]``; ``hift_noise`` ``(phase [1, 9, 1], sine_noise [1, 9, L])`` is injected
    when given (either half may be None), else drawn from ``generator``.
    """
    if tokens.shape[-1] == 0:
        return _EMPTY
    segment = WholeSegment(flow, hift, prompt_tokens, prompt_feat, embedding, speed, generator, tokens.device)
    call = segment.call(tokens[0].tolist())
    return segment.complete(call, segment.run_flow(call), hift_noise)


class StreamingToken2Wav:
    """Per-request streaming token -> waveform state machine (batch 1).

    ``push(tokens)`` buffers tokens and returns the audio chunks that became ready (float32 numpy
    arrays); ``finish()`` runs the final call and returns the last chunk. With the default hops
    and ``speed=1`` the output equals upstream's streaming ``tts`` chunk for chunk.
    ``hift_noises``: per-HiFT-call ``(phase, sine_noise)`` to inject (tests; either may be None);
    once used up, noise comes from ``generator``. ``record=True`` keeps a :class:`ChunkRecord`
    per flow call in ``trace``.
    """

    def __init__(
        self,
        flow: CausalFlow,
        hift: HiFTGenerator,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        first_hop: int = TOKEN_HOP_LEN,
        max_hop: int = TOKEN_MAX_HOP_LEN,
        hift_noises: Sequence[tuple[Tensor | None, Tensor | None]] | None = None,
        device: torch.device | str | None = None,
        record: bool = False,
    ):
        self.segment = ChunkedSegment(
            flow,
            hift,
            prompt_tokens,
            prompt_feat,
            embedding,
            speed,
            generator,
            device,
            first_hop,
            max_hop,
            hift_noises,
        )
        self.trace: list[ChunkRecord] | None = [] if record else None

    @property
    def finished(self) -> bool:
        return self.segment.finished

    def _run(self, call: FlowCall) -> np.ndarray:
        mel = self.segment.run_flow(call)
        step = self.segment.commit(call, mel)
        if self.trace is not None:
            self.trace.append(ChunkRecord(call, mel, step))
        return _EMPTY if step is None else speech_to_numpy(step.out)

    def push(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """Add speech tokens; returns the audio chunks that are ready (possibly none)."""
        chunks = [self._run(call) for call in self.segment.add(tokens)]
        return [c for c in chunks if c.size]

    def finish(self) -> np.ndarray:
        """Run the final call (every token, nothing held back); returns the last audio chunk."""
        call = self.segment.remainder()
        return _EMPTY if call is None else self._run(call)

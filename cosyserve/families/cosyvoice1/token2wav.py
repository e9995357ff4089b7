"""Speech tokens -> waveform (flow + HiFT), non-streaming and streaming, with speed control.

Equivalent to upstream ``CosyVoiceModel.token2wav`` / ``tts(stream=...)`` for CosyVoice v1:

* non-stream: ``mel = flow(tokens)``; with ``speed != 1`` the mel is linearly interpolated
  (align_corners False) to ``int(T / speed)`` frames; ``speech = hift(mel)``.
* stream: chunks of ``hop + overlap`` tokens (100 + 20), advancing by ``hop``; the flow cache
  keeps the noise/mu of the 34 overlap frames, the mel overlap is cross-faded with a
  ``hamming(68)`` window, HiFT gets 20 frames of mel context plus the last 5120 source samples,
  and its speech is cross-faded over 5120 samples with ``hamming(10240)``. The last chunk
  (``finish``) runs the remaining tokens and withholds nothing.

Beyond upstream: a smaller first hop (lower first-chunk latency; the default hop reproduces
upstream exactly) and speed control while streaming. The latter resamples the stream of
committed mel frames (after the mel cross-fade, before HiFT) with the same linear
interpolation as the non-stream path, incrementally, so the chunking does not change the result
(see :class:`StreamingMelResampler`).

Note: like upstream, streaming makes ``172`` mel frames per 100-token hop while the non-stream
flow makes ``int(n * 1.7227)`` for ``n`` tokens, so a long stream is a few frames shorter than
the non-stream output (see :func:`stream_num_frames`).

All randomness comes from a per-request ``torch.Generator`` or is injected (tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cosyserve.families.cosyvoice1.flow import MEL_HOP, FlowInputs, MaskedDiffWithXvec, token_frames
from cosyserve.nn.hift import HiFTGenerator
from cosyserve.nn.streaming import (
    StreamingMelResampler,
    StreamingVocoder,
    VocoderStep,
    apply_speed,
    fade_in_out,
    hamming,
    speech_to_numpy,
    speed_frames,
)

logger = logging.getLogger(__name__)

TOKEN_HOP_LEN = 100  # 2 * input_frame_rate; stream_scale_factor = 1, so it never grows
TOKEN_OVERLAP_LEN = 20
MEL_CACHE_LEN = 20  # HiFT mel context frames
SOURCE_CACHE_LEN = MEL_CACHE_LEN * MEL_HOP  # 5120 samples of source / speech cross-fade


def stream_num_frames(
    n_tokens: int,
    hop: int = TOKEN_HOP_LEN,
    first_hop: int | None = None,
    overlap: int = TOKEN_OVERLAP_LEN,
    input_frame_rate: int = 50,
) -> int:
    """Mel frames (samples / 256) a stream of ``n_tokens`` tokens produces at speed 1.

    Each non-final chunk of ``h + overlap`` tokens commits ``token_frames(h + overlap) - 34``
    frames; the final chunk commits all of its frames.
    """
    mel_overlap = token_frames(overlap, input_frame_rate)
    frames, remaining, h = 0, n_tokens, first_hop or hop
    while remaining >= h + overlap:
        frames += token_frames(h + overlap, input_frame_rate) - mel_overlap
        remaining -= h
        h = hop
    return frames + token_frames(remaining, input_frame_rate)


# ------------------------------------------------------------------------------- streaming


@dataclass
class ChunkRecord:
    """What one flow chunk of a stream did (kept only with ``record=True``)."""

    tokens: Tensor
    flow_cache_in: Tensor | None
    flow_mel: Tensor
    flow_cache_out: Tensor
    vocoder: VocoderStep | None


def check_stream_hops(hop: int, first_hop: int, overlap: int, frame_rate: int) -> None:
    """Refuse hops the streaming chunker cannot use.

    hop > overlap: a chunk of more than 2 * overlap tokens is length-regulated as head / middle /
    tail, so its last `overlap` tokens map exactly onto the 34 mel frames the flow cache hands to
    the next chunk; and each chunk must commit >= 20 frames, the HiFT mel cache."""
    for name, h in (("hop", hop), ("first_hop", first_hop)):
        if (
            h <= overlap
            or token_frames(h + overlap, frame_rate) - token_frames(overlap, frame_rate) < MEL_CACHE_LEN
        ):
            raise ValueError(
                f"{name}={h} tokens is too small for streaming: it must exceed the overlap ({overlap})"
            )


class ChunkCommitter:
    """What follows the flow for each streamed chunk: cross-fade its mel with the previous
    chunk's held-back overlap, hold back its own tail (unless final), apply speed, vocode.

    Shared by the batch-1 streamer below and the batching runner's chunked sink, so both give
    the same audio for the same flow output."""

    def __init__(
        self,
        hift: HiFTGenerator,
        overlap_frames: int,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        hift_noises: Sequence[tuple[Tensor, Tensor]] | None = None,
    ):
        self.overlap_frames = overlap_frames
        self.window = hamming(2 * overlap_frames)
        self.resampler = StreamingMelResampler(speed) if speed != 1.0 else None
        self.vocoder = StreamingVocoder(
            hift, generator, hift_noises, mel_cache_len=MEL_CACHE_LEN, source_cache_len=SOURCE_CACHE_LEN
        )
        self._mel_overlap: Tensor | None = None

    def commit(self, mel: Tensor, finalize: bool) -> VocoderStep | None:
        if self._mel_overlap is not None:
            mel = fade_in_out(mel, self._mel_overlap, self.window)
        if not finalize:
            self._mel_overlap = mel[:, :, -self.overlap_frames :]
            mel = mel[:, :, : -self.overlap_frames]
        if self.resampler is not None:
            mel = self.resampler.finish(mel) if finalize else self.resampler.push(mel)
        return self.vocoder.push(mel, finalize)


# ------------------------------------------------------------------------------- sinks
# token -> wav for one segment, split around the flow's Euler loop so that the batch runner can
# share that loop between requests (engine/batching.py); the batch-1 drivers at the end run the
# same code for the library's tests and tools.

_EMPTY = np.zeros(0, dtype=np.float32)


class _SegmentSink:
    """What both sinks know of one segment: the networks, its prompt and speaker, its RNG.

    ``flow_noises`` / ``hift_noises``: per-call noises to inject (tests); once used up, noise comes
    from ``generator``."""

    def __init__(
        self,
        flow: MaskedDiffWithXvec,
        hift: HiFTGenerator,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        flow_noises: Sequence[Tensor] | None = None,
        hift_noises: Sequence[tuple[Tensor, Tensor]] | None = None,
    ):
        self.flow, self.hift = flow, hift
        self.prompt_tokens, self.prompt_feat, self.embedding = prompt_tokens, prompt_feat, embedding
        self.speed = float(speed)
        self.generator = generator
        self.device = (
            next(flow.parameters()).device if isinstance(flow, torch.nn.Module) else torch.device("cpu")
        )
        self.frame_rate = int(getattr(flow, "input_frame_rate", 50))
        self.prompt_frames = 0 if prompt_feat is None else int(prompt_feat.shape[1])
        self._flow_noises = list(flow_noises or [])
        self._hift_noises = list(hift_noises or [])

    def batch_key(self, tokens: Sequence[int], finalize: bool) -> int:
        """Mel frames of the Euler loop (prompt included): equal frames batch exactly."""
        return self.prompt_frames + token_frames(len(tokens), self.frame_rate)

    def _flow_inputs(self, tokens: Sequence[int], flow_cache: Tensor | None) -> FlowInputs:
        token_tensor = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        noise = self._flow_noises.pop(0) if self._flow_noises else None
        return self.flow.prepare(
            token_tensor,
            self.prompt_tokens,
            self.prompt_feat,
            self.embedding,
            flow_cache=flow_cache,
            noise=noise,
            generator=self.generator,
        )


class WholeToken2Wav(_SegmentSink):
    """Non-streaming token -> waveform for one segment: ``flow(tokens)``, speed, HiFT."""

    streaming = False

    @torch.inference_mode()
    def prepare(self, tokens: Sequence[int], finalize: bool = True) -> FlowInputs:
        return self._flow_inputs(tokens, None)

    @torch.inference_mode()
    def complete(self, mel: Tensor, finalize: bool = True) -> np.ndarray:
        if speed_frames(mel.shape[2], self.speed) == 0:
            return _EMPTY  # too few frames to survive the speed change
        phase, sine_noise = self._hift_noises.pop(0) if self._hift_noises else (None, None)
        speech, _ = self.hift.inference(
            apply_speed(mel, self.speed), generator=self.generator, phase=phase, sine_noise=sine_noise
        )
        return speech_to_numpy(speech)


class ChunkedToken2Wav(_SegmentSink):
    """Streaming token -> waveform for one segment (see the module docstring).

    Chunks of ``hop + overlap`` tokens, the first advancing by ``first_hop``; 34-frame flow cache
    and mel cross-fade; HiFT through :class:`StreamingVocoder`. A due chunk is *returned* by
    :meth:`add`, so the runner can batch its Euler loop with other requests' chunks; chunks must be
    completed in the order they were returned. ``record=True`` keeps a :class:`ChunkRecord` per
    chunk in :attr:`trace` (tests).
    """

    streaming = True

    def __init__(
        self,
        flow: MaskedDiffWithXvec,
        hift: HiFTGenerator,
        prompt_tokens: Tensor | None,
        prompt_feat: Tensor | None,
        embedding: Tensor,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        hop: int = TOKEN_HOP_LEN,
        first_hop: int | None = None,
        overlap: int = TOKEN_OVERLAP_LEN,
        flow_noises: Sequence[Tensor] | None = None,
        hift_noises: Sequence[tuple[Tensor, Tensor]] | None = None,
        record: bool = False,
    ):
        super().__init__(flow, hift, prompt_tokens, prompt_feat, embedding, speed, generator, flow_noises)
        self.overlap = overlap
        self.hop = hop
        self.first_hop = first_hop or hop
        check_stream_hops(self.hop, self.first_hop, overlap, self.frame_rate)
        self.tail = ChunkCommitter(
            hift, token_frames(overlap, self.frame_rate), self.speed, generator, hift_noises
        )
        self._tokens: list[int] = []
        self._next_hop = self.first_hop
        self._flow_cache: Tensor | None = None
        self.trace: list[ChunkRecord] | None = [] if record else None
        self._pending_record: ChunkRecord | None = None

    def add(self, token: int) -> list[int] | None:
        """Buffer one token; returns the tokens of the chunk that became due, if any."""
        self._tokens.append(int(token))
        if len(self._tokens) < self._next_hop + self.overlap:
            return None
        chunk = self._tokens[: self._next_hop + self.overlap]
        self._tokens = self._tokens[self._next_hop :]
        self._next_hop = self.hop
        return chunk

    def remainder(self) -> list[int]:
        """The tokens of the final chunk (those not yet committed); empties the buffer."""
        tokens, self._tokens = self._tokens, []
        return tokens

    @torch.inference_mode()
    def prepare(self, tokens: Sequence[int], finalize: bool = False) -> FlowInputs:
        cache_in = self._flow_cache
        item = self._flow_inputs(tokens, cache_in)
        self._flow_cache = item.cache
        if self.trace is not None:
            self._pending_record = ChunkRecord(
                torch.tensor([list(tokens)]), cache_in, torch.empty(0), item.cache, None
            )
        return item

    @torch.inference_mode()
    def complete(self, mel: Tensor, finalize: bool) -> np.ndarray:
        step = self.tail.commit(mel, finalize)
        if self.trace is not None and self._pending_record is not None:
            self._pending_record.flow_mel, self._pending_record.vocoder = mel, step
            self.trace.append(self._pending_record)
            self._pending_record = None
        return _EMPTY if step is None else speech_to_numpy(step.out)


def _run_call(sink: WholeToken2Wav | ChunkedToken2Wav, tokens: Sequence[int], finalize: bool) -> np.ndarray:
    """One flow + vocoder call of a sink, alone (the batch runner shares the middle with others)."""
    item = sink.prepare(tokens, finalize)
    with torch.inference_mode():
        mel = sink.flow.decode([item])[0]
    return sink.complete(mel, finalize)


def token2wav(
    flow: MaskedDiffWithXvec,
    hift: HiFTGenerator,
    tokens: Tensor,
    prompt_tokens: Tensor | None = None,
    prompt_feat: Tensor | None = None,
    embedding: Tensor | None = None,
    speed: float = 1.0,
    generator: torch.Generator | None = None,
    flow_noise: Tensor | None = None,
    hift_noise: tuple[Tensor, Tensor] | None = None,
) -> np.ndarray:
    """Non-stream token -> waveform at batch 1: float32 samples, ``256 * int(T / speed)`` long.

    tokens ``[1, N]``; ``flow_noise`` ``[1, 80, P + T]`` and ``hift_noise`` ``(phase [1, 9, 1],
    sine_noise [1, 9, L])`` are injected when given, else drawn from ``generator``.
    """
    if tokens.shape[-1] == 0:
        return _EMPTY
    sink = WholeToken2Wav(
        flow,
        hift,
        prompt_tokens,
        prompt_feat,
        embedding,
        speed,
        generator,
        [flow_noise] if flow_noise is not None else None,
        [hift_noise] if hift_noise is not None else None,
    )
    return _run_call(sink, tokens[0].tolist(), True)


class StreamingToken2Wav:
    """Streaming token -> waveform at batch 1: :class:`ChunkedToken2Wav` with its flow calls run
    at once. ``push(tokens)`` returns the audio chunks that became ready; ``finish()`` the last one.
    With the default hops and speed 1 the output equals upstream's streaming ``tts`` chunk for chunk."""

    def __init__(
        self,
        flow: MaskedDiffWithXvec,
        hift: HiFTGenerator,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        speed: float = 1.0,
        generator: torch.Generator | None = None,
        hop: int = TOKEN_HOP_LEN,
        first_hop: int | None = None,
        overlap: int = TOKEN_OVERLAP_LEN,
        flow_noises: Sequence[Tensor] | None = None,
        hift_noises: Sequence[tuple[Tensor, Tensor]] | None = None,
        record: bool = False,
    ):
        self.sink = ChunkedToken2Wav(
            flow,
            hift,
            prompt_tokens,
            prompt_feat,
            embedding,  # type: ignore[arg-type]
            speed,
            generator,
            hop,
            first_hop,
            overlap,
            flow_noises,
            hift_noises,
            record,
        )
        self.finished = False

    @property
    def trace(self) -> list[ChunkRecord] | None:
        return self.sink.trace

    def push(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """Add speech tokens; returns the audio chunks that are ready (possibly none)."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        ready: list[np.ndarray] = []
        for token in tokens:
            chunk = self.sink.add(token)
            if chunk is not None:
                out = _run_call(self.sink, chunk, False)
                if out.size:
                    ready.append(out)
        return ready

    def finish(self) -> np.ndarray:
        """Vocode the remaining tokens (withholding nothing); returns the last audio chunk."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        self.finished = True
        tokens = self.sink.remainder()
        if not tokens:
            # Only possible before any chunk ran (later chunks keep `overlap` tokens back).
            return _EMPTY
        return _run_call(self.sink, tokens, True)

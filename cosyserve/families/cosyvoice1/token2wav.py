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
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from cosyserve.nn.hift import HiFTGenerator
from cosyserve.nn.streaming import (  # noqa: F401 - re-exported: shared with the other families
    StreamingMelResampler,
    StreamingVocoder,
    VocoderStep,
    apply_speed,
    fade_in_out,
    hamming,
    module_device,
    speech_to_numpy,
    speed_frames,
)

logger = logging.getLogger(__name__)

MEL_SAMPLE_RATE = 22050  # upstream hard-codes the v1 rate and hop in these constants
MEL_HOP = 256
TOKEN_HOP_LEN = 100  # 2 * input_frame_rate; stream_scale_factor = 1, so it never grows
TOKEN_OVERLAP_LEN = 20
MEL_CACHE_LEN = 20  # HiFT mel context frames
SOURCE_CACHE_LEN = MEL_CACHE_LEN * MEL_HOP  # 5120 samples of source / speech cross-fade


class FlowModel(Protocol):
    """What token2wav needs from the flow (``cosyserve.families.cosyvoice1.flow.MaskedDiffWithXvec``)."""

    input_frame_rate: int

    def inference(
        self,
        tokens: Tensor,
        prompt_tokens: Tensor | None = None,
        prompt_feat: Tensor | None = None,
        embedding: Tensor | None = None,
        flow_cache: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]: ...


def token_frames(n_tokens: int, input_frame_rate: int = 50) -> int:
    """Mel frames the flow makes for ``n_tokens`` tokens: ``int(n / rate * 22050 / 256)``."""
    return int(n_tokens / input_frame_rate * MEL_SAMPLE_RATE / MEL_HOP)


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


# ------------------------------------------------------------------------------- non-stream
@torch.inference_mode()
def token2wav(
    flow: FlowModel,
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
    """Non-stream token -> waveform: float32 samples at 22050 Hz, ``256 * int(T / speed)`` long.

    tokens ``[1, N]``; ``flow_noise`` ``[1, 80, P + T]`` and ``hift_noise`` ``(phase [1, 9, 1],
    sine_noise [1, 9, L])`` are injected when given, else drawn from ``generator``.
    """
    if tokens.shape[-1] == 0:
        return np.zeros(0, dtype=np.float32)
    mel, _ = flow.inference(
        tokens, prompt_tokens, prompt_feat, embedding, flow_cache=None, noise=flow_noise, generator=generator
    )
    if speed_frames(mel.shape[2], speed) == 0:
        return np.zeros(0, dtype=np.float32)  # too few frames to survive the speed change
    mel = apply_speed(mel, speed)
    phase, sine_noise = hift_noise if hift_noise is not None else (None, None)
    speech, _ = hift.inference(mel, generator=generator, phase=phase, sine_noise=sine_noise)
    return speech_to_numpy(speech)


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


class StreamingToken2Wav:
    """Per-request streaming token -> waveform state machine.

    ``push(tokens)`` buffers tokens and returns the audio chunks that became ready (float32
    numpy arrays); ``finish()`` vocodes what is left and returns the last chunk. With the
    default ``hop`` / no ``first_hop`` / ``speed=1`` the output equals upstream's streaming
    ``tts`` chunk for chunk.

    ``first_hop``: tokens advanced by the first chunk (e.g. 25-50; more than ``overlap``) for
    lower first-chunk latency; later chunks use ``hop``. ``speed``: tempo change applied to the committed mel
    stream (upstream refuses speed with streaming). ``flow_noises`` / ``hift_noises``: per-call
    noises to inject (tests); once used up, noise comes from ``generator``.
    """

    def __init__(
        self,
        flow: FlowModel,
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
        device: torch.device | str | None = None,
        record: bool = False,
    ):
        self.flow = flow
        self.prompt_tokens = prompt_tokens
        self.prompt_feat = prompt_feat
        self.embedding = embedding
        self.generator = generator
        self.frame_rate = int(getattr(flow, "input_frame_rate", 50))
        self.overlap = overlap
        self.hop = hop
        self.first_hop = first_hop or hop
        check_stream_hops(self.hop, self.first_hop, overlap, self.frame_rate)
        self.device = torch.device(device) if device is not None else module_device(flow)
        self.speed = float(speed)
        self.tail = ChunkCommitter(
            hift, token_frames(overlap, self.frame_rate), self.speed, generator, hift_noises
        )
        self._flow_noises = list(flow_noises or [])
        self._tokens: list[int] = []
        self._flow_cache: Tensor | None = None
        self._next_hop = self.first_hop
        self.chunks_done = 0
        self.finished = False
        self.trace: list[ChunkRecord] | None = [] if record else None

    @torch.inference_mode()
    def _chunk(self, tokens: list[int], finalize: bool) -> np.ndarray | None:
        token_tensor = torch.tensor([tokens], dtype=torch.long, device=self.device)
        noise = self._flow_noises.pop(0) if self._flow_noises else None
        cache_in = self._flow_cache
        mel, self._flow_cache = self.flow.inference(
            token_tensor,
            self.prompt_tokens,
            self.prompt_feat,
            self.embedding,
            flow_cache=cache_in,
            noise=noise,
            generator=self.generator,
        )
        step = self.tail.commit(mel, finalize)
        self.chunks_done += 1
        if self.trace is not None:
            self.trace.append(ChunkRecord(token_tensor, cache_in, mel, self._flow_cache, step))
        return None if step is None else speech_to_numpy(step.out)

    def push(self, tokens: Sequence[int]) -> list[np.ndarray]:
        """Add speech tokens; returns the audio chunks that are ready (possibly none)."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        self._tokens.extend(int(t) for t in tokens)
        ready: list[np.ndarray] = []
        while len(self._tokens) >= self._next_hop + self.overlap:
            out = self._chunk(self._tokens[: self._next_hop + self.overlap], finalize=False)
            self._tokens = self._tokens[self._next_hop :]
            self._next_hop = self.hop
            if out is not None and out.size:
                ready.append(out)
        return ready

    def finish(self) -> np.ndarray:
        """Vocode the remaining tokens (withholding nothing); returns the last audio chunk."""
        if self.finished:
            raise RuntimeError("the stream is already finished")
        self.finished = True
        if not self._tokens:
            # Only possible before any chunk ran (later chunks keep `overlap` tokens back).
            return np.zeros(0, dtype=np.float32)
        out = self._chunk(self._tokens, finalize=True)
        self._tokens = []
        return out if out is not None else np.zeros(0, dtype=np.float32)
